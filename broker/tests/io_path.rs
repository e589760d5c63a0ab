//! The network path: the node runs the one it was asked for and says which,
//! falls back to epoll where io_uring is refused (a seccomp filter, as
//! container runtimes install), refuses to start when io_uring is forced but
//! refused, and on either path really closes the sockets of connections it
//! gives up on.
//!
//! The rest of the end-to-end suite runs on whichever path `COURIER_IO`
//! names; `scripts/test` runs it once per path.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;
use courier_protocol::*;

/// The path a node started by this suite runs.
fn expected_path() -> &'static str {
    match std::env::var("COURIER_IO").as_deref() {
        Ok("uring") => "uring",
        Ok("epoll") => "epoll",
        _ => match courier_broker::net::probe_uring() {
            Ok(()) => "uring",
            Err(why) => {
                eprintln!(
                    "!!! io_uring is unavailable here ({why}): only the epoll path is tested"
                );
                "epoll"
            }
        },
    }
}

/// `courier serve --io <io>` on loopback port 0 with its data in `data`.
fn serve(io: &str, data: &std::path::Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_courier"));
    cmd.args(["serve", "--io", io, "--listen", "127.0.0.1:0"])
        .args(["--admin-listen", "127.0.0.1:0", "--data-dir"])
        .arg(data);
    cmd
}

async fn io_path_gauge(s: &Server, path: &str) -> u64 {
    s.metric(&format!("courier_io_path{{path=\"{path}\"}}"))
        .await
}

#[tokio::test]
async fn the_node_runs_and_reports_its_path() {
    let want = expected_path();
    let s = Server::start(&[]);
    let other = if want == "uring" { "epoll" } else { "uring" };
    assert_eq!(io_path_gauge(&s, want).await, 1);
    assert_eq!(io_path_gauge(&s, other).await, 0);
    let io_line = s.banner.last().unwrap();
    assert!(
        io_line.contains(if want == "uring" { "io_uring" } else { "epoll" }),
        "{io_line}"
    );
    let (a, _) = s.client(1).await;
    let (b, _) = s.client(2).await;
    exchange(&a, 2, &b, "over the chosen path").await;
}

#[tokio::test]
async fn auto_falls_back_to_epoll_where_io_uring_is_refused() {
    let s = Server::start_without_uring(&[("COURIER_IO", "auto")]);
    assert_eq!(io_path_gauge(&s, "epoll").await, 1);
    assert_eq!(io_path_gauge(&s, "uring").await, 0);
    let io_line = s.banner.last().unwrap();
    assert!(
        io_line.contains("epoll (io_uring unavailable: blocked by a seccomp profile"),
        "{io_line}"
    );
    let (a, _) = s.client(1).await;
    let (b, _) = s.client(2).await;
    exchange(&a, 2, &b, "over epoll").await;
}

#[test]
fn forcing_io_uring_where_it_is_refused_fails_before_opening_anything() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let mut cmd = serve("uring", &data);
    deny_io_uring(&mut cmd);
    let out = cmd.output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "started anyway: {err}");
    assert!(
        err.contains("io = \"uring\" but io_uring is unavailable: blocked by a seccomp profile"),
        "{err}"
    );
    assert!(!data.exists(), "created the data dir before failing");
}

#[test]
fn a_ring_the_kernel_refuses_stops_the_node_with_the_reason() {
    // The probe's small ring is allowed; the rings of 128 entries are not
    // (as when the kernel refuses a ring's memory).
    for io in ["uring", "auto"] {
        let tmp = tempfile::tempdir().unwrap();
        let mut cmd = serve(io, tmp.path());
        cmd.env("COURIER_IO_RING_ENTRIES", "128");
        seccomp_deny_uring_setup(&mut cmd, Some(128));
        let out = cmd.output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        let said = String::from_utf8_lossy(&out.stdout);
        assert!(!out.status.success(), "{io}: started anyway: {err}");
        assert!(
            err.contains("creating io_uring ring 0 (128 entries)")
                && err.contains("Operation not permitted"),
            "{io}: {err}"
        );
        assert!(
            !said.contains("clients:"),
            "{io}: announced a node that is not serving"
        );
    }
}

#[test]
fn an_unknown_io_setting_is_refused_by_name() {
    let tmp = tempfile::tempdir().unwrap();
    let out = serve("kqueue", tmp.path()).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("unknown variant `kqueue`"), "{err}");
}

/// The inode of the node's end of `raw`'s connection (from the kernel's
/// TCP table, matched by both ports; "0" until the node accepts it).
fn node_end(raw: &Raw) -> String {
    let ours = raw.stream.local_addr().unwrap().port();
    let theirs = raw.stream.peer_addr().unwrap().port();
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap();
    let port = |a: &str| u16::from_str_radix(a.rsplit(':').next().unwrap(), 16).unwrap();
    table
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|f| port(f[1]) == theirs && port(f[2]) == ours)
        .map(|f| f[9].to_owned())
        .expect("the node's end of the connection")
}

/// Whether the node's process has the socket `inode` open.
fn holds(s: &Server, inode: &str) -> bool {
    let want = format!("socket:[{inode}]");
    std::fs::read_dir(format!("/proc/{}/fd", s.child.id()))
        .unwrap()
        .any(|e| std::fs::read_link(e.unwrap().path()).is_ok_and(|t| t.to_string_lossy() == want))
}

#[tokio::test]
async fn connections_timed_out_release_their_sockets() {
    let s = Server::start(&[
        ("COURIER_LIMITS_IDLE_TIMEOUT_MS", "500"),
        ("COURIER_LIMITS_HANDSHAKE_TIMEOUT_MS", "500"),
    ]);
    // Peers that go quiet and never close their end: a read of the node's
    // is waiting on each when it gives up on them.
    let mut silent = Raw::connect(&s.addr).await;
    let mut idle = Raw::connect(&s.addr).await;
    idle.send(&Raw::hello(7, &s.token(7, 1, u64::MAX / 2)))
        .await;
    assert!(matches!(
        idle.next().await.map(|f| f.body),
        Some(Body::Welcome(_))
    ));
    // The node's ends, once it has accepted both (the silent one may still
    // wait in the listen queue).
    let accepted = |raw: &Raw| {
        let deadline = std::time::Instant::now() + WAIT;
        loop {
            let inode = node_end(raw);
            if holds(&s, &inode) {
                return inode;
            }
            assert!(std::time::Instant::now() < deadline, "never accepted");
            std::thread::sleep(Duration::from_millis(10));
        }
    };
    let ends = [accepted(&silent), accepted(&idle)];
    assert_eq!(silent.expect_goodbye().await, ErrorCode::HANDSHAKE_TIMEOUT);
    assert_eq!(idle.expect_goodbye().await, ErrorCode::IDLE_TIMEOUT);
    // After the linger (1 s) the node closes both, though the peers still
    // hold theirs open and send nothing.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while ends.iter().any(|i| holds(&s, i)) && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for i in &ends {
        assert!(!holds(&s, i), "the node still holds socket {i}");
    }
    drop((silent, idle));
}
