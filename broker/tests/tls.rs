//! TLS on the client port, on whichever network path the suite runs
//! (`COURIER_IO`): sessions over TLS 1.3, plain TCP and TLS 1.2 refused by
//! default, certificates reloaded on SIGHUP without dropping a session,
//! client certificates required when configured. Certificates are made by
//! the test (rcgen), nothing is fetched.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use common::*;
use courier_client::{Client, ClientError, ClientTls};
use courier_protocol::*;
use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};

/// A CA and, signed by it, a certificate for `name`, as PEM files in `dir`
/// named after `tag`: (ca.pem, cert.pem, key.pem).
fn issue(dir: &Path, tag: &str, name: &str) -> (PathBuf, PathBuf, PathBuf) {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec![name.to_owned()])
        .unwrap()
        .signed_by(&key, &ca, &ca_key)
        .unwrap();
    let paths = (
        dir.join(format!("{tag}-ca.pem")),
        dir.join(format!("{tag}-cert.pem")),
        dir.join(format!("{tag}-key.pem")),
    );
    std::fs::write(&paths.0, ca.pem()).unwrap();
    std::fs::write(&paths.1, cert.pem()).unwrap();
    std::fs::write(&paths.2, key.serialize_pem()).unwrap();
    paths
}

fn tls_node(cert: &Path, key: &Path, more: &[(&str, &str)]) -> Server {
    let mut env = vec![
        ("COURIER_TLS_CERT_FILE", cert.to_str().unwrap()),
        ("COURIER_TLS_KEY_FILE", key.to_str().unwrap()),
    ];
    env.extend_from_slice(more);
    Server::start(&env)
}

async fn tls_client(server: &Server, user: u64, tls: ClientTls) -> Result<Client, ClientError> {
    let mut config = server.config(user);
    config.tls = Some(tls);
    Client::connect(config).await.map(|(c, _)| c)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_run_over_tls_and_plain_or_old_clients_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, cert, key) = issue(dir.path(), "node", "localhost");
    let server = tls_node(&cert, &key, &[]);
    let tls = ClientTls::from_files(&ca, "localhost", None).unwrap();
    let alice = tls_client(&server, 1, tls.clone()).await.unwrap();
    let bob = tls_client(&server, 2, tls.clone()).await.unwrap();
    exchange(&alice, 2, &bob, "over tls").await;
    // A larger exchange: frames over many TLS records, both ways.
    let big = chat(vec![b'z'; 60_000]);
    alice
        .send(Destination::User(2), MessageKind::Chat, big.clone())
        .await
        .unwrap();
    assert_eq!(bob.recv_timeout(WAIT).await.unwrap().payload, big);

    // Plain TCP to a TLS port: no welcome, the connection is closed.
    let plain = Client::connect(server.config(3)).await;
    assert!(plain.is_err(), "a plain client got a session");
    // A client that offers only TLS 1.2: refused (1.3 only by default).
    use rustls_pki_types::pem::PemObject;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pki_types::CertificateDer::pem_file_iter(&ca).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let old = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS12])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let old = ClientTls {
        config: Arc::new(old),
        server_name: "localhost".into(),
    };
    assert!(
        tls_client(&server, 4, old).await.is_err(),
        "TLS 1.2 accepted"
    );
    // A client that does not trust the node's certificate gives up.
    let (other_ca, _, _) = issue(dir.path(), "other", "localhost");
    let distrust = ClientTls::from_files(&other_ca, "localhost", None).unwrap();
    assert!(tls_client(&server, 5, distrust).await.is_err());
    assert!(server.metric("courier_tls_handshake_failures_total").await >= 2);
    // The sessions that did get in are unharmed.
    exchange(&bob, 1, &alice, "still here").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_certificates_and_drops_no_session() {
    let dir = tempfile::tempdir().unwrap();
    let (ca1, cert1, key1) = issue(dir.path(), "first", "localhost");
    let (ca2, cert2, key2) = issue(dir.path(), "second", "localhost");
    let live_cert = dir.path().join("live-cert.pem");
    let live_key = dir.path().join("live-key.pem");
    std::fs::copy(&cert1, &live_cert).unwrap();
    std::fs::copy(&key1, &live_key).unwrap();
    let server = tls_node(&live_cert, &live_key, &[]);
    let trusts_first = ClientTls::from_files(&ca1, "localhost", None).unwrap();
    let trusts_second = ClientTls::from_files(&ca2, "localhost", None).unwrap();
    let alice = tls_client(&server, 1, trusts_first.clone()).await.unwrap();
    let bob = tls_client(&server, 2, trusts_first.clone()).await.unwrap();
    assert!(tls_client(&server, 3, trusts_second.clone()).await.is_err());

    // A bad file first: the reload fails and the old certificate stays.
    std::fs::write(&live_cert, "not a certificate").unwrap();
    unsafe { libc::kill(server.child.id() as i32, libc::SIGHUP) };
    assert_eq!(server.logged_soon("TLS certificates not reloaded").len(), 1);
    tls_client(&server, 4, trusts_first.clone()).await.unwrap();

    std::fs::copy(&cert2, &live_cert).unwrap();
    std::fs::copy(&key2, &live_key).unwrap();
    unsafe { libc::kill(server.child.id() as i32, libc::SIGHUP) };
    let deadline = tokio::time::Instant::now() + WAIT;
    while server.metric("courier_tls_reloads_total").await < 1 {
        assert!(tokio::time::Instant::now() < deadline, "no reload");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    // New handshakes present the new certificate...
    let carol = tls_client(&server, 3, trusts_second).await.unwrap();
    assert!(tls_client(&server, 5, trusts_first).await.is_err());
    // ...and the sessions opened before go on.
    exchange(&alice, 2, &bob, "across the reload").await;
    exchange(&carol, 1, &alice, "old and new").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_certificates_are_required_when_configured() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, cert, key) = issue(dir.path(), "node", "localhost");
    let (clients_ca, service_cert, service_key) = issue(dir.path(), "service", "billing");
    let server = tls_node(
        &cert,
        &key,
        &[
            ("COURIER_TLS_CLIENT_CA_FILE", clients_ca.to_str().unwrap()),
            ("COURIER_TLS_REQUIRE_CLIENT_CERT", "true"),
        ],
    );
    let anonymous = ClientTls::from_files(&ca, "localhost", None).unwrap();
    assert!(tls_client(&server, 1, anonymous).await.is_err());
    let service =
        ClientTls::from_files(&ca, "localhost", Some((&service_cert, &service_key))).unwrap();
    let a = tls_client(&server, 1, service.clone()).await.unwrap();
    let b = tls_client(&server, 2, service).await.unwrap();
    exchange(&a, 2, &b, "with a certificate").await;
}

/// The load generator speaks TLS too: a short run over TLS delivers every
/// message it counts, checked like any run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_load_generator_runs_over_tls() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, cert, key) = issue(dir.path(), "node", "localhost");
    let server = tls_node(&cert, &key, &[]);
    let report = courier_loadtest::run(courier_loadtest::Options {
        users: 20,
        duration: std::time::Duration::from_secs(2),
        rate: Some(2_000.0),
        tls: Some(ClientTls::from_files(&ca, "localhost", None).unwrap()),
        ..server.load_options()
    })
    .await
    .unwrap();
    println!("{}", report.summary());
    assert!(report.verdict.ok(), "{}", report.summary());
    assert!(report.acked > 1000, "{}", report.summary());
}

/// SIGHUP reloads certificates; a node without TLS says there is nothing
/// to reload and goes on (the signal's default action would end it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_does_not_stop_a_node_without_tls() {
    let server = Server::start(&[]);
    unsafe { libc::kill(server.child.id() as i32, libc::SIGHUP) };
    assert_eq!(server.logged_soon("no TLS certificates to reload").len(), 1);
    let (a, _) = server.client(1).await;
    let (b, _) = server.client(2).await;
    exchange(&a, 2, &b, "still up").await;
}
