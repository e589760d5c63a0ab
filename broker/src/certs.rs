//! The client port's TLS configuration: certificates and keys read from
//! the files `tls.*` names, turned into a rustls server configuration, and
//! read again on SIGHUP. New handshakes take the configuration current at
//! their start; sessions already open keep theirs, so a reload drops no
//! one. A reload that fails (a missing or bad file) keeps the old
//! configuration and says why.

use std::path::Path;
use std::sync::{Arc, RwLock};

use anyhow::Context;
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::config::Tls;

/// The node's TLS configuration, swappable.
pub struct TlsSettings {
    files: Tls,
    current: RwLock<Arc<ServerConfig>>,
}

impl TlsSettings {
    /// `None` when no certificate is configured (plain TCP).
    pub fn load(files: &Tls) -> anyhow::Result<Option<TlsSettings>> {
        if files.cert_file.as_os_str().is_empty() {
            return Ok(None);
        }
        let config = server_config(files)?;
        Ok(Some(TlsSettings {
            files: files.clone(),
            current: RwLock::new(Arc::new(config)),
        }))
    }

    /// The configuration a new handshake uses.
    pub fn current(&self) -> Arc<ServerConfig> {
        self.current.read().expect("tls config lock").clone()
    }

    /// Reads the files again; on failure the old configuration stays.
    pub fn reload(&self) -> anyhow::Result<()> {
        let config = server_config(&self.files)?;
        *self.current.write().expect("tls config lock") = Arc::new(config);
        Ok(())
    }
}

fn certificates(path: &Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_file_iter(path)
        .with_context(|| format!("reading certificates from {}", path.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("parsing certificates in {}", path.display()))?;
    anyhow::ensure!(!certs.is_empty(), "no certificate in {}", path.display());
    Ok(certs)
}

/// The rustls configuration `files` describe: TLS 1.3 only unless
/// `min_version` is 1.2; client certificates asked for (and verified
/// against `client_ca_file`) when that file is set, required when
/// `require_client_cert` says so.
pub fn server_config(files: &Tls) -> anyhow::Result<ServerConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let versions: &[&rustls::SupportedProtocolVersion] = if files.min_version == "1.2" {
        &[&rustls::version::TLS13, &rustls::version::TLS12]
    } else {
        &[&rustls::version::TLS13]
    };
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(versions)
        .context("TLS versions")?;
    let builder = if files.client_ca_file.as_os_str().is_empty() {
        builder.with_no_client_auth()
    } else {
        let mut roots = RootCertStore::empty();
        for ca in certificates(&files.client_ca_file)? {
            roots.add(ca).context("a client CA certificate")?;
        }
        let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
        let verifier = if files.require_client_cert {
            verifier
        } else {
            verifier.allow_unauthenticated()
        };
        builder.with_client_cert_verifier(verifier.build().context("client certificate verifier")?)
    };
    let key = PrivateKeyDer::from_pem_file(&files.key_file)
        .with_context(|| format!("reading the private key in {}", files.key_file.display()))?;
    builder
        .with_single_cert(certificates(&files.cert_file)?, key)
        .context("the certificate and its key")
}
