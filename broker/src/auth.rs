//! Token verification for the server, and the node's secret file.
//!
//! The token format itself (HMAC-SHA256 over user, device and expiry) lives
//! in `courier_protocol::token`, so clients and the load generator can mint
//! tokens for a node whose secret they hold without depending on the server.

use std::fs;
use std::io::Write;
use std::path::Path;

use courier_protocol::token::{decode_hex, encode_hex};
pub use courier_protocol::token::{Claims, TokenError as AuthError, TokenKey, SECRET_LEN_MIN};

/// The hex secret in `text` (read from `path`), at least
/// `SECRET_LEN_MIN` bytes.
fn parse_secret(text: &str, path: &Path) -> anyhow::Result<Vec<u8>> {
    use anyhow::Context;
    let secret = decode_hex(text.trim())
        .with_context(|| format!("secret file {} is not hex", path.display()))?;
    anyhow::ensure!(
        secret.len() >= SECRET_LEN_MIN,
        "secret in {} is {} bytes; at least {SECRET_LEN_MIN} required",
        path.display(),
        secret.len()
    );
    Ok(secret)
}

/// Reads the hex secret at `path` (which must exist): the token secret,
/// or a cluster's link secret.
pub fn read_secret(path: &Path) -> anyhow::Result<Vec<u8>> {
    use anyhow::Context;
    let text = fs::read_to_string(path)
        .with_context(|| format!("reading secret file {}", path.display()))?;
    parse_secret(&text, path)
}

/// Loads the hex secret at `path`, creating a random one (mode 0600) if the
/// file does not exist.
pub fn load_or_create_secret(path: &Path) -> anyhow::Result<TokenKey> {
    use anyhow::Context;
    match fs::read_to_string(path) {
        Ok(text) => Ok(TokenKey::new(parse_secret(&text, path)?)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let secret: [u8; 32] = rand::random();
            if let Some(dir) = path.parent() {
                fs::create_dir_all(dir)?;
            }
            let mut opts = fs::OpenOptions::new();
            opts.write(true).create_new(true);
            #[cfg(unix)]
            {
                use std::os::unix::fs::OpenOptionsExt;
                opts.mode(0o600);
            }
            let mut f = opts
                .open(path)
                .with_context(|| format!("creating secret file {}", path.display()))?;
            writeln!(f, "{}", encode_hex(&secret))?;
            f.sync_all()?;
            Ok(TokenKey::new(secret.to_vec()))
        }
        Err(e) => Err(e).with_context(|| format!("reading secret file {}", path.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_file_is_created_once_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secret.key");
        let a = load_or_create_secret(&path).unwrap();
        let b = load_or_create_secret(&path).unwrap();
        let claims = Claims {
            user_id: 1,
            device_id: 1,
            expires_at_s: 9,
        };
        assert_eq!(a.mint(claims), b.mint(claims), "the same secret");
        fs::write(&path, "abcd\n").unwrap();
        assert!(
            load_or_create_secret(&path).is_err(),
            "short secret refused"
        );
    }
}
