//! Payloads of business messages (kind `template`): what a business sends to
//! ask for a template ([`TemplateSend`]) and what its customer receives, the
//! template rendered in one language ([`TemplateMessage`]). Byte layouts in
//! `PROTOCOL.md`, section "Business messages".

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::payload::PayloadError;

/// The format byte every [`TemplateMessage`] starts with.
pub const TEMPLATE_FORMAT: u8 = 1;

/// A business's send of a template: `Send` with kind `template` from a
/// business, its payload this.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TemplateSend {
    pub name: String,
    /// `en_US`, `pt_BR`...; empty: the customer's preferred language, with
    /// the fallback in `PROTOCOL.md`.
    pub language: String,
    /// Positional parameters (`{{1}}`, `{{2}}`...) have an empty name and
    /// come in order; named ones (`{{order_id}}`) name theirs.
    pub params: Vec<(String, String)>,
}

/// A template's category, which is also the purpose a customer's opt-in
/// must cover (marketing, or utility for the other two).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Category {
    Marketing = 1,
    Utility = 2,
    Authentication = 3,
}

impl Category {
    pub fn from_u8(v: u8) -> Option<Category> {
        Some(match v {
            1 => Category::Marketing,
            2 => Category::Utility,
            3 => Category::Authentication,
            _ => return None,
        })
    }
}

/// What a template's header holds.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Header {
    #[default]
    None,
    Text(String),
    /// A reference to media in the platform's media store.
    Media(String),
}

/// A button's kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum ButtonKind {
    /// Sends `value` back as the customer's answer.
    QuickReply = 1,
    /// Opens `value`, a URL.
    Url = 2,
    /// Calls `value`, a phone number.
    Phone = 3,
}

impl ButtonKind {
    pub fn from_u8(v: u8) -> Option<ButtonKind> {
        Some(match v {
            1 => ButtonKind::QuickReply,
            2 => ButtonKind::Url,
            3 => ButtonKind::Phone,
            _ => return None,
        })
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Button {
    pub kind: ButtonKind,
    pub text: String,
    pub value: String,
}

/// A template rendered in one language, as the customer receives it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TemplateMessage {
    /// The business is verified (the mark customers see).
    pub verified: bool,
    pub category: Category,
    pub name: String,
    /// The language this rendering is in.
    pub language: String,
    pub header: Header,
    pub body: String,
    /// Empty: none.
    pub footer: String,
    pub buttons: Vec<Button>,
}

impl TemplateSend {
    pub fn encode(&self) -> Bytes {
        let mut out = BytesMut::new();
        put_short(&self.name, &mut out);
        put_short(&self.language, &mut out);
        out.put_u8(u8::try_from(self.params.len()).expect("at most 255 parameters"));
        for (name, value) in &self.params {
            put_short(name, &mut out);
            put_long(value, &mut out);
        }
        out.freeze()
    }

    pub fn decode(mut b: &[u8]) -> Result<TemplateSend, PayloadError> {
        let name = short(&mut b)?;
        let language = short(&mut b)?;
        let count = byte(&mut b)?;
        let mut params = Vec::with_capacity(usize::from(count).min(b.len() / 3));
        for _ in 0..count {
            let name = short(&mut b)?;
            params.push((name, long(&mut b)?));
        }
        end(b)?;
        Ok(TemplateSend {
            name,
            language,
            params,
        })
    }
}

impl TemplateMessage {
    pub fn encode(&self) -> Bytes {
        let mut out = BytesMut::new();
        out.put_u8(TEMPLATE_FORMAT);
        out.put_u8(self.verified as u8);
        out.put_u8(self.category as u8);
        put_short(&self.name, &mut out);
        put_short(&self.language, &mut out);
        match &self.header {
            Header::None => {
                out.put_u8(0);
                put_long("", &mut out);
            }
            Header::Text(t) => {
                out.put_u8(1);
                put_long(t, &mut out);
            }
            Header::Media(m) => {
                out.put_u8(2);
                put_long(m, &mut out);
            }
        }
        put_long(&self.body, &mut out);
        put_long(&self.footer, &mut out);
        out.put_u8(u8::try_from(self.buttons.len()).expect("at most 255 buttons"));
        for b in &self.buttons {
            out.put_u8(b.kind as u8);
            put_short(&b.text, &mut out);
            put_long(&b.value, &mut out);
        }
        out.freeze()
    }

    pub fn decode(mut b: &[u8]) -> Result<TemplateMessage, PayloadError> {
        if byte(&mut b)? != TEMPLATE_FORMAT {
            return Err(PayloadError("unknown template format"));
        }
        let verified = match byte(&mut b)? {
            0 => false,
            1 => true,
            _ => return Err(PayloadError("verified flag is neither 0 nor 1")),
        };
        let category = Category::from_u8(byte(&mut b)?).ok_or(PayloadError("unknown category"))?;
        let name = short(&mut b)?;
        let language = short(&mut b)?;
        let header_kind = byte(&mut b)?;
        let header_text = long(&mut b)?;
        let header = match header_kind {
            0 => Header::None,
            1 => Header::Text(header_text),
            2 => Header::Media(header_text),
            _ => return Err(PayloadError("unknown header kind")),
        };
        let body = long(&mut b)?;
        let footer = long(&mut b)?;
        let count = byte(&mut b)?;
        let mut buttons = Vec::with_capacity(usize::from(count).min(b.len() / 4));
        for _ in 0..count {
            let kind = ButtonKind::from_u8(byte(&mut b)?).ok_or(PayloadError("unknown button"))?;
            let text = short(&mut b)?;
            buttons.push(Button {
                kind,
                text,
                value: long(&mut b)?,
            });
        }
        end(b)?;
        Ok(TemplateMessage {
            verified,
            category,
            name,
            language,
            header,
            body,
            footer,
            buttons,
        })
    }
}

fn put_short(t: &str, out: &mut BytesMut) {
    out.put_u8(u8::try_from(t.len()).expect("text of at most 255 bytes"));
    out.put_slice(t.as_bytes());
}

fn put_long(t: &str, out: &mut BytesMut) {
    out.put_u16(u16::try_from(t.len()).expect("text of at most 65535 bytes"));
    out.put_slice(t.as_bytes());
}

fn byte(b: &mut &[u8]) -> Result<u8, PayloadError> {
    if b.is_empty() {
        return Err(PayloadError("payload shorter than its fields"));
    }
    Ok(b.get_u8())
}

fn text(b: &mut &[u8], len: usize) -> Result<String, PayloadError> {
    if b.len() < len {
        return Err(PayloadError("payload shorter than its fields"));
    }
    let (head, tail) = b.split_at(len);
    *b = tail;
    String::from_utf8(head.to_vec()).map_err(|_| PayloadError("text is not UTF-8"))
}

fn short(b: &mut &[u8]) -> Result<String, PayloadError> {
    let len = byte(b)? as usize;
    text(b, len)
}

fn long(b: &mut &[u8]) -> Result<String, PayloadError> {
    if b.len() < 2 {
        return Err(PayloadError("payload shorter than its fields"));
    }
    let len = b.get_u16() as usize;
    text(b, len)
}

fn end(b: &[u8]) -> Result<(), PayloadError> {
    match b.is_empty() {
        true => Ok(()),
        false => Err(PayloadError("trailing bytes after the payload")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_payloads_round_trip_and_refuse_what_is_cut_short() {
        let send = TemplateSend {
            name: "order_update".into(),
            language: "pt_BR".into(),
            params: vec![("".into(), "Ana".into()), ("".into(), "#42".into())],
        };
        let bytes = send.encode();
        assert_eq!(TemplateSend::decode(&bytes).unwrap(), send);
        assert!(TemplateSend::decode(&bytes[..bytes.len() - 1]).is_err());
        let m = TemplateMessage {
            verified: true,
            category: Category::Utility,
            name: "order_update".into(),
            language: "pt_BR".into(),
            header: Header::Text("Pedido #42".into()),
            body: "Olá Ana".into(),
            footer: "Loja".into(),
            buttons: vec![Button {
                kind: ButtonKind::Url,
                text: "Ver".into(),
                value: "https://example.com/o/42".into(),
            }],
        };
        let bytes = m.encode();
        assert_eq!(TemplateMessage::decode(&bytes).unwrap(), m);
        let mut longer = bytes.to_vec();
        longer.push(0);
        assert!(TemplateMessage::decode(&longer).is_err());
        assert!(TemplateMessage::decode(&bytes[..10]).is_err());
    }
}
