//! The token format: what a client puts in `Hello.token`. Tokens are verified
//! without a lookup: HMAC-SHA256 over the user
//! id, device id and expiry, with a secret only the node (and whoever mints
//! tokens for it) holds.
//!
//! Token layout before base64url (no padding) encoding, 53 bytes:
//!
//! ```text
//! 0  u8  token format version (1)
//! 1  u64 user id (BE)      9  u32 device id (BE)    13 u64 expiry, unix seconds (BE)
//! 21 [u8; 32] HMAC-SHA256(secret, bytes 0..21)
//! ```

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use thiserror::Error;

type HmacSha256 = Hmac<Sha256>;

const TOKEN_VERSION: u8 = 1;
const SIGNED_LEN: usize = 21;
const TOKEN_LEN: usize = SIGNED_LEN + 32;
/// Secrets shorter than this are refused.
pub const SECRET_LEN_MIN: usize = 32;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum TokenError {
    #[error("token is not valid base64url or has the wrong length")]
    Malformed,
    #[error("token signature does not verify")]
    BadSignature,
    #[error("token was issued for another user or device")]
    WrongIdentity,
    #[error("token expired")]
    Expired,
}

/// The claims a verified token carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Claims {
    pub user_id: u64,
    pub device_id: u32,
    pub expires_at_s: u64,
}

#[derive(Clone)]
pub struct TokenKey {
    secret: Vec<u8>,
}

impl TokenKey {
    pub fn new(secret: Vec<u8>) -> TokenKey {
        assert!(secret.len() >= SECRET_LEN_MIN, "secret too short");
        TokenKey { secret }
    }

    fn mac(&self, signed: &[u8]) -> HmacSha256 {
        let mut mac = HmacSha256::new_from_slice(&self.secret).expect("HMAC takes any key length");
        mac.update(signed);
        mac
    }

    /// An HMAC-SHA256 tag over `data` for another use of the same secret
    /// (`domain` names the use, so a tag for one can never pass for
    /// another, nor for a token).
    pub fn tag(&self, domain: &str, data: &[u8]) -> [u8; 32] {
        let mut mac = self.mac(domain.as_bytes());
        mac.update(&[0]);
        mac.update(data);
        mac.finalize().into_bytes().into()
    }

    pub fn mint(&self, claims: Claims) -> String {
        let mut raw = Vec::with_capacity(TOKEN_LEN);
        raw.push(TOKEN_VERSION);
        raw.extend_from_slice(&claims.user_id.to_be_bytes());
        raw.extend_from_slice(&claims.device_id.to_be_bytes());
        raw.extend_from_slice(&claims.expires_at_s.to_be_bytes());
        let tag = self.mac(&raw).finalize().into_bytes();
        raw.extend_from_slice(&tag);
        URL_SAFE_NO_PAD.encode(raw)
    }

    /// Verifies `token` for `user_id`/`device_id` at `now_s` (unix seconds).
    pub fn verify(
        &self,
        token: &[u8],
        user_id: u64,
        device_id: u32,
        now_s: u64,
    ) -> Result<Claims, TokenError> {
        let claims = self.signed(token)?;
        if claims.user_id != user_id || claims.device_id != device_id {
            return Err(TokenError::WrongIdentity);
        }
        if now_s >= claims.expires_at_s {
            return Err(TokenError::Expired);
        }
        Ok(claims)
    }

    /// Verifies `token` at `now_s` for whoever it names (a web page's
    /// login, which learns the user from the token).
    pub fn verify_any(&self, token: &[u8], now_s: u64) -> Result<Claims, TokenError> {
        let claims = self.signed(token)?;
        if now_s >= claims.expires_at_s {
            return Err(TokenError::Expired);
        }
        Ok(claims)
    }

    /// The claims of a token whose signature verifies.
    fn signed(&self, token: &[u8]) -> Result<Claims, TokenError> {
        let raw = URL_SAFE_NO_PAD
            .decode(token)
            .map_err(|_| TokenError::Malformed)?;
        if raw.len() != TOKEN_LEN || raw[0] != TOKEN_VERSION {
            return Err(TokenError::Malformed);
        }
        // Constant-time comparison inside verify_slice.
        self.mac(&raw[..SIGNED_LEN])
            .verify_slice(&raw[SIGNED_LEN..])
            .map_err(|_| TokenError::BadSignature)?;
        let claims = Claims {
            user_id: u64::from_be_bytes(raw[1..9].try_into().expect("8 bytes")),
            device_id: u32::from_be_bytes(raw[9..13].try_into().expect("4 bytes")),
            expires_at_s: u64::from_be_bytes(raw[13..21].try_into().expect("8 bytes")),
        };
        Ok(claims)
    }
}

/// Lower-case hex of `bytes` (the secret file's format).
pub fn encode_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Bytes of a hex string; `None` if it is not hex.
pub fn decode_hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

impl TokenKey {
    /// A key from the text of a secret file (hex, surrounding whitespace
    /// ignored); `None` if it is not hex or shorter than [`SECRET_LEN_MIN`].
    pub fn from_hex(text: &str) -> Option<TokenKey> {
        let secret = decode_hex(text.trim())?;
        (secret.len() >= SECRET_LEN_MIN).then(|| TokenKey::new(secret))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> TokenKey {
        TokenKey::new(vec![7u8; 32])
    }

    #[test]
    fn minted_tokens_verify_for_their_identity_only() {
        let claims = Claims {
            user_id: 42,
            device_id: 3,
            expires_at_s: 1000,
        };
        let t = key().mint(claims);
        assert_eq!(key().verify(t.as_bytes(), 42, 3, 999), Ok(claims));
        assert_eq!(
            key().verify(t.as_bytes(), 43, 3, 999),
            Err(TokenError::WrongIdentity)
        );
        assert_eq!(
            key().verify(t.as_bytes(), 42, 4, 999),
            Err(TokenError::WrongIdentity)
        );
        assert_eq!(
            key().verify(t.as_bytes(), 42, 3, 1000),
            Err(TokenError::Expired)
        );
        let other = TokenKey::new(vec![8u8; 32]);
        assert_eq!(
            other.verify(t.as_bytes(), 42, 3, 999),
            Err(TokenError::BadSignature)
        );
    }

    /// Identity before expiry (PROTOCOL.md); `verify_any` learns the
    /// identity from the token and checks the rest.
    #[test]
    fn identity_is_checked_before_expiry_and_verify_any_takes_any_identity() {
        let claims = Claims {
            user_id: 42,
            device_id: 3,
            expires_at_s: 1000,
        };
        let t = key().mint(claims);
        assert_eq!(
            key().verify(t.as_bytes(), 43, 3, 5000),
            Err(TokenError::WrongIdentity)
        );
        assert_eq!(key().verify_any(t.as_bytes(), 999), Ok(claims));
        assert_eq!(
            key().verify_any(t.as_bytes(), 1000),
            Err(TokenError::Expired)
        );
        assert_eq!(
            TokenKey::new(vec![8u8; 32]).verify_any(t.as_bytes(), 999),
            Err(TokenError::BadSignature)
        );
        assert_eq!(
            key().verify_any(b"garbage", 999),
            Err(TokenError::Malformed)
        );
    }

    #[test]
    fn tampered_or_garbage_tokens_fail() {
        let t = key().mint(Claims {
            user_id: 1,
            device_id: 1,
            expires_at_s: u64::MAX,
        });
        let mut raw = URL_SAFE_NO_PAD.decode(&t).unwrap();
        raw[1] ^= 1; // claim another user
        let forged = URL_SAFE_NO_PAD.encode(&raw);
        assert_eq!(
            key().verify(forged.as_bytes(), 1 ^ (1 << 56), 1, 0),
            Err(TokenError::BadSignature)
        );
        assert_eq!(
            key().verify(b"not a token!", 1, 1, 0),
            Err(TokenError::Malformed)
        );
        assert_eq!(key().verify(b"", 1, 1, 0), Err(TokenError::Malformed));
    }
}
