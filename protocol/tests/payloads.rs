//! The business payload examples in PROTOCOL.md ("#### Payload: NAME"),
//! checked against the code both ways.

use courier_protocol::business::*;
use courier_protocol::token::{decode_hex, encode_hex};

fn document(name: &str) -> Vec<u8> {
    let doc = include_str!("../PROTOCOL.md");
    let at = doc
        .find(&format!("#### Payload: {name}\n"))
        .unwrap_or_else(|| panic!("no payload {name} in PROTOCOL.md"));
    let block = doc[at..]
        .split("```hex")
        .nth(1)
        .unwrap()
        .split("```")
        .next()
        .unwrap();
    let hex: String = block
        .lines()
        .map(|l| l.split('#').next().unwrap_or("").trim())
        .collect();
    decode_hex(&hex).expect("the payload's hex")
}

#[test]
fn the_documented_business_payloads_match_the_code() {
    let send = TemplateSend {
        name: "order_update".into(),
        language: "pt_BR".into(),
        params: vec![(String::new(), "#7".into()), (String::new(), "Ana".into())],
    };
    assert_eq!(
        encode_hex(&document("template_send")),
        encode_hex(&send.encode()),
        "template_send"
    );
    assert_eq!(
        TemplateSend::decode(&document("template_send")).unwrap(),
        send
    );
    let message = TemplateMessage {
        verified: true,
        category: Category::Utility,
        name: "order_update".into(),
        language: "pt_BR".into(),
        header: Header::Text("Pedido #7".into()),
        body: "Olá Ana".into(),
        footer: String::new(),
        buttons: vec![Button {
            kind: ButtonKind::Url,
            text: "Ver".into(),
            value: "https://s.co/7".into(),
        }],
    };
    assert_eq!(
        encode_hex(&document("template_message")),
        encode_hex(&message.encode()),
        "template_message"
    );
    assert_eq!(
        TemplateMessage::decode(&document("template_message")).unwrap(),
        message
    );
}
