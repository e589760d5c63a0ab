//! Starts the real `courier` binary on loopback port 0 and talks to it over
//! TCP with the real client.

#![allow(dead_code, reason = "each test file uses part of the harness")]

pub mod hook;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use courier_broker::auth::{load_or_create_secret, Claims};
use courier_client::{Client, ClientConfig};
use courier_protocol::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

pub const WAIT: Duration = Duration::from_secs(20);

/// Log lines a test keeps of one node at most.
const LOG_LINES_MAX: usize = 100_000;

pub struct Server {
    pub child: Child,
    pub addr: String,
    pub admin: String,
    pub data_dir: PathBuf,
    /// What the node printed when it started.
    pub banner: Vec<String>,
    /// Every line the node has logged (stderr) so far; also echoed to the
    /// test's own stderr.
    pub log: Arc<Mutex<Vec<String>>>,
    env: Vec<(String, String)>,
    deny_uring: bool,
    open_files: Option<u64>,
    _tmp: Option<tempfile::TempDir>,
}

impl Server {
    /// A node in a fresh data dir, with `COURIER_*` settings from `env`.
    pub fn start(env: &[(&str, &str)]) -> Server {
        Server::start_in_fresh_dir(env, false, None)
    }

    /// A node whose process may not use io_uring (a seccomp filter, as a
    /// container runtime's default profile installs).
    pub fn start_without_uring(env: &[(&str, &str)]) -> Server {
        Server::start_in_fresh_dir(env, true, None)
    }

    /// A node whose process may open at most `n` files (soft and hard
    /// RLIMIT_NOFILE), as a container's `--ulimit nofile=` makes it.
    pub fn start_with_open_files(env: &[(&str, &str)], n: u64) -> Server {
        Server::start_in_fresh_dir(env, false, Some(n))
    }

    /// A node on `dir` (kept by the caller: a file system the test
    /// mounted, or a store it prepared).
    pub fn start_in(dir: &Path, env: &[(&str, &str)]) -> Server {
        let env = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Server::spawn(dir, env, false, None)
    }

    /// Waits for the node's process to end (after `terminate`).
    pub fn wait_exit(&mut self) {
        let _ = self.child.wait();
    }

    fn start_in_fresh_dir(
        env: &[(&str, &str)],
        deny_uring: bool,
        open_files: Option<u64>,
    ) -> Server {
        let tmp = tempfile::tempdir().unwrap();
        let env = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let mut s = Server::spawn(tmp.path(), env, deny_uring, open_files);
        s._tmp = Some(tmp);
        s
    }

    fn spawn(
        dir: &Path,
        env: Vec<(String, String)>,
        deny_uring: bool,
        open_files: Option<u64>,
    ) -> Server {
        let mut cmd = serve_command(dir);
        if deny_uring {
            deny_io_uring(&mut cmd);
        }
        if let Some(n) = open_files {
            limit_open_files(&mut cmd, n);
        }
        cmd.env(
            "COURIER_LOG",
            std::env::var("COURIER_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
        for (k, v) in &env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("start courier");
        let log = Arc::new(Mutex::new(Vec::new()));
        let stderr = BufReader::new(child.stderr.take().unwrap());
        let sink = log.clone();
        // Echoed with the process's id: several nodes share the test's
        // stderr.
        let pid = child.id();
        std::thread::spawn(move || {
            for line in stderr.lines().map_while(Result::ok) {
                eprintln!("[courier {pid}] {line}");
                let mut log = sink.lock().unwrap();
                if log.len() < LOG_LINES_MAX {
                    log.push(line);
                }
            }
        });
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let (mut addr, mut admin) = (None, None);
        let mut banner = Vec::new();
        // The banner ends with the network path line.
        while banner
            .last()
            .is_none_or(|l: &String| !l.trim().starts_with("io:"))
        {
            let line = lines
                .next()
                .expect("courier exited before printing its addresses")
                .unwrap();
            if let Some(a) = line.trim().strip_prefix("clients: ") {
                addr = Some(a.to_owned());
            }
            if let Some(a) = line.trim().strip_prefix("admin:   http://") {
                admin = Some(a.trim_end_matches("/healthz").to_owned());
            }
            banner.push(line);
        }
        // Keep draining stdout so the server never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        Server {
            child,
            addr: addr.unwrap(),
            admin: admin.unwrap(),
            data_dir: dir.to_owned(),
            banner,
            log,
            env,
            deny_uring,
            open_files,
            _tmp: None,
        }
    }

    /// The lines logged so far that contain `needle`.
    pub fn logged(&self, needle: &str) -> Vec<String> {
        let log = self.log.lock().unwrap();
        log.iter().filter(|l| l.contains(needle)).cloned().collect()
    }

    /// The lines containing `needle`, waiting up to `WAIT` for the first
    /// (the node's log is read by another thread, a moment behind).
    pub fn logged_soon(&self, needle: &str) -> Vec<String> {
        let deadline = std::time::Instant::now() + WAIT;
        loop {
            let found = self.logged(needle);
            if !found.is_empty() || std::time::Instant::now() > deadline {
                return found;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL: no shutdown path runs.
    pub fn kill(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// SIGTERM: graceful shutdown.
    pub fn terminate(&mut self) {
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
    }

    /// Sets (or replaces) one environment variable for the next restart.
    pub fn set_env(&mut self, key: &str, value: &str) {
        self.env.retain(|(k, _)| k != key);
        self.env.push((key.to_owned(), value.to_owned()));
    }

    /// Starts the node again on the same data dir (new ports).
    pub fn restart(&mut self) {
        let tmp = self._tmp.take();
        let next = Server::spawn(
            &self.data_dir,
            self.env.clone(),
            self.deny_uring,
            self.open_files,
        );
        let old = std::mem::replace(self, next);
        drop(old); // already stopped; dropping reaps it
        self._tmp = tmp;
    }

    /// The token secret: the node's own, or the one it was told to share.
    fn secret_path(&self) -> PathBuf {
        self.env
            .iter()
            .find(|(k, _)| k == "COURIER_AUTH_SECRET_FILE")
            .map_or_else(|| self.data_dir.join("secret.key"), |(_, v)| v.into())
    }

    pub fn token(&self, user: u64, device: u32, expires_at_s: u64) -> String {
        load_or_create_secret(&self.secret_path())
            .unwrap()
            .mint(Claims {
                user_id: user,
                device_id: device,
                expires_at_s,
            })
    }

    pub fn config(&self, user: u64) -> ClientConfig {
        ClientConfig::new(
            self.addr.clone(),
            user,
            1,
            self.token(user, 1, u64::MAX / 2),
        )
    }

    pub async fn client(&self, user: u64) -> (Client, Welcome) {
        Client::connect(self.config(user)).await.expect("connect")
    }

    pub async fn resume(&self, user: u64, after: u64) -> (Client, Welcome) {
        let mut c = self.config(user);
        c.resume_after = Some(after);
        Client::connect(c).await.expect("connect")
    }

    /// One HTTP GET on the admin port: (status code, body).
    pub async fn admin_get(&self, path: &str) -> (u16, String) {
        self.get(path, "").await
    }

    /// One GET of an operator request (`/admin/...`) with an admin token:
    /// (status code, body).
    pub async fn admin_request(&self, path: &str) -> (u16, String) {
        let token = self.token(0, 0, u64::MAX / 2);
        self.get(path, &format!("authorization: Bearer {token}\r\n"))
            .await
    }

    /// One POST of an operator request (`/admin/...`) with an admin token:
    /// (status code, body).
    pub async fn admin_post(&self, path: &str) -> (u16, String) {
        let token = self.token(0, 0, u64::MAX / 2);
        self.http("POST", path, &format!("authorization: Bearer {token}\r\n"))
            .await
    }

    /// One operator request with a JSON body (empty: none), answered with
    /// JSON: (status code, the answer).
    pub async fn admin_json(
        &self,
        method: &str,
        path: &str,
        body: serde_json::Value,
    ) -> (u16, serde_json::Value) {
        let token = self.token(0, 0, u64::MAX / 2);
        let body = if body.is_null() {
            String::new()
        } else {
            body.to_string()
        };
        let headers = format!(
            "authorization: Bearer {token}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        );
        let mut s = TcpStream::connect(&self.admin).await.unwrap();
        s.write_all(format!("{method} {path} HTTP/1.1\r\nhost: x\r\n{headers}").as_bytes())
            .await
            .unwrap();
        let mut text = String::new();
        s.read_to_string(&mut text).await.unwrap();
        let code = text.split(' ').nth(1).unwrap().parse().unwrap();
        let answer = text.split("\r\n\r\n").nth(1).unwrap_or("");
        (
            code,
            serde_json::from_str(answer).unwrap_or(serde_json::Value::Null),
        )
    }

    /// Makes `b` a business named Shop with the approved utility templates
    /// `templates` (name, body) and every one of `customers` opted in to
    /// utility messages, each request answered 200.
    pub async fn utility_business(&self, b: u64, templates: &[(&str, &str)], customers: &[u64]) {
        let path = format!("/admin/businesses/{b}");
        let mut setup = vec![(
            "PUT",
            path.clone(),
            serde_json::json!({ "display_name": "Shop" }),
        )];
        for (name, body) in templates {
            setup.push((
                "PUT",
                format!("{path}/templates/{name}"),
                serde_json::json!({ "category": "utility", "versions": [{ "language": "en_US", "body": body, "examples": {} }] }),
            ));
            setup.push((
                "POST",
                format!("{path}/templates/{name}/status"),
                serde_json::json!({ "status": "approved" }),
            ));
        }
        for c in customers {
            setup.push((
                "POST",
                format!("{path}/consent"),
                serde_json::json!({ "customer": c, "action": "opt_in", "purpose": "utility", "source": "web_form", "text": "Notices, please" }),
            ));
        }
        for (method, at, body) in setup {
            let (status, answer) = self.admin_json(method, &at, body).await;
            assert_eq!(status, 200, "{at}: {answer}");
        }
    }

    /// Moves the node's clock forward (a node started with
    /// `COURIER_TEST_CLOCK=true`).
    pub async fn advance_clock(&self, ms: u64) {
        let (code, body) = self
            .admin_json(
                "POST",
                &format!("/admin/clock/advance/{ms}"),
                serde_json::Value::Null,
            )
            .await;
        assert_eq!(code, 200, "{body}");
    }

    async fn get(&self, path: &str, headers: &str) -> (u16, String) {
        self.http("GET", path, headers).await
    }

    async fn http(&self, method: &str, path: &str, headers: &str) -> (u16, String) {
        let mut s = TcpStream::connect(&self.admin).await.unwrap();
        s.write_all(format!("{method} {path} HTTP/1.1\r\nhost: x\r\n{headers}\r\n").as_bytes())
            .await
            .unwrap();
        let mut text = String::new();
        s.read_to_string(&mut text).await.unwrap();
        let code = text.split(' ').nth(1).unwrap().parse().unwrap();
        (code, text.split("\r\n\r\n").nth(1).unwrap_or("").to_owned())
    }

    /// Load-generator options against this node (tokens from its secret).
    pub fn load_options(&self) -> courier_loadtest::Options {
        let key = load_or_create_secret(&self.secret_path()).unwrap();
        courier_loadtest::Options::new(courier_loadtest::Target::Courier, self.addr.clone(), key)
    }

    /// A short open-loop run of the load generator: 20 users for 2 s,
    /// offering `rate` messages/s, users numbered from `first_user`.
    pub async fn short_load(
        &self,
        scenario: courier_loadtest::Scenario,
        group_sizes: Vec<(usize, u32)>,
        first_user: u64,
        rate: f64,
    ) -> courier_loadtest::Report {
        let report = courier_loadtest::run(courier_loadtest::Options {
            scenario,
            users: 20,
            first_user,
            duration: Duration::from_secs(2),
            rate: Some(rate),
            group_sizes,
            ..self.load_options()
        })
        .await
        .unwrap();
        println!("{}", report.summary());
        report
    }

    /// The value of one sample on the node's `/metrics`, by its exact name
    /// and labels (`courier_x_total` or `courier_x_total{reason="y"}`).
    pub async fn metric(&self, name: &str) -> u64 {
        let (_, body) = self.admin_get("/metrics").await;
        body.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
            .unwrap_or_else(|| panic!("{name} not in /metrics:\n{body}"))
    }

    /// Waits (bounded by `WAIT`) until the sample `name` is at least `value`.
    pub async fn wait_for_metric(&self, name: &str, value: u64) {
        self.wait_metric(name, &format!("at least {value}"), |now| now >= value)
            .await;
    }

    /// Waits (bounded by `WAIT`) until the sample `name` is `wanted`
    /// (described as `what` if it never is).
    pub async fn wait_metric(&self, name: &str, what: &str, wanted: impl Fn(u64) -> bool) {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let now = self.metric(name).await;
            if wanted(now) {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{name} stayed at {now}, not {what}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The path of the program `name` (from `from`: a Debian package, PyPI),
/// or `None` after saying loudly that the test skips; with
/// `TEST_REQUIRE_TOOLS=1` (set by `scripts/test`) a missing one fails the
/// test instead.
pub fn tool(name: &str, from: &str) -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(name))
            .find(|p| p.is_file())
    });
    if found.is_none() {
        let required = std::env::var("TEST_REQUIRE_TOOLS").is_ok_and(|v| v == "1");
        assert!(
            !required,
            "{name} is not installed ({from}; scripts/test installs it)"
        );
        eprintln!(
            "\n*** SKIPPED: {name} is not installed. Install it ({from}; scripts/test does) \
             to run this test. ***\n"
        );
    }
    found
}

/// `courier serve` on `dir`, both listeners on any free loopback port.
pub fn serve_command(dir: &Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_courier"));
    cmd.args([
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--admin-listen",
        "127.0.0.1:0",
        "--data-dir",
    ])
    .arg(dir);
    cmd
}

/// Sets `cmd`'s process's open-file limit (soft and hard) to `n`.
pub fn limit_open_files(cmd: &mut Command, n: u64) {
    use std::os::unix::process::CommandExt;
    // SAFETY: between fork and exec only setrlimit runs (async-signal-safe)
    // on a struct on the stack.
    unsafe {
        cmd.pre_exec(move || {
            let r = libc::rlimit {
                rlim_cur: n,
                rlim_max: n,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &r) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// A TCP connection to `addr` from the loopback address `127.0.0.<last>`
/// (a different source address for the node's per-source budgets).
pub async fn connect_from(last: u8, addr: &str) -> TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket
        .bind(std::net::SocketAddr::from(([127, 0, 0, last], 0)))
        .unwrap();
    socket.connect(addr.parse().unwrap()).await.unwrap()
}

/// Makes `cmd`'s process unable to use io_uring: a seccomp filter that
/// answers `io_uring_setup` with EPERM, as container runtimes' profiles do.
pub fn deny_io_uring(cmd: &mut Command) {
    seccomp_deny_uring_setup(cmd, None);
}

/// Makes `io_uring_setup` fail with EPERM in `cmd`'s process for rings of
/// `entries` entries, or for every ring with `None`.
pub fn seccomp_deny_uring_setup(cmd: &mut Command, entries: Option<u32>) {
    use std::os::unix::process::CommandExt;
    const IO_URING_SETUP: u32 = 425; // the same number on every architecture
    let f = |code, jt, jf, k| libc::sock_filter { code, jt, jf, k };
    let deny = 0x0005_0000 | libc::EPERM as u32; // SECCOMP_RET_ERRNO
    let allow = 0x7fff_0000; // SECCOMP_RET_ALLOW
    let program = match entries {
        None => vec![
            f(0x20, 0, 0, 0),              // A = seccomp_data.nr
            f(0x15, 0, 1, IO_URING_SETUP), // A == io_uring_setup ? next : skip 1
            f(0x06, 0, 0, deny),
            f(0x06, 0, 0, allow),
        ],
        Some(n) => vec![
            f(0x20, 0, 0, 0),              // A = seccomp_data.nr
            f(0x15, 0, 3, IO_URING_SETUP), // not io_uring_setup: allow
            f(0x20, 0, 0, 16),             // A = low half of args[0] (entries)
            f(0x15, 0, 1, n),              // A == n ? deny : allow
            f(0x06, 0, 0, deny),
            f(0x06, 0, 0, allow),
        ],
    };
    let filter = Box::leak(program.into_boxed_slice());
    let (at, len) = (filter.as_mut_ptr() as usize, filter.len() as u16);
    // SAFETY: between fork and exec only prctl runs, on memory that lives
    // for the whole process (leaked above); both are async-signal-safe.
    unsafe {
        cmd.pre_exec(move || {
            let prog = libc::sock_fprog {
                len,
                filter: at as *mut libc::sock_filter,
            };
            if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
                || libc::prctl(libc::PR_SET_SECCOMP, libc::SECCOMP_MODE_FILTER, &prog) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// A loopback port free right now (for a server that must keep its port
/// across restarts, or a peer started by a test).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Sends chat messages "m<i>" for each `i` to `to`, each acknowledged.
pub async fn send_numbered(client: &Client, to: u64, range: std::ops::RangeInclusive<u64>) {
    for i in range {
        client
            .send(
                Destination::User(to),
                MessageKind::Chat,
                chat(format!("m{i}")),
            )
            .await
            .unwrap();
    }
}

/// `from` sends `text` to user `to`; `receiver` (a session of `to`) gets it next.
pub async fn exchange(from: &Client, to: u64, receiver: &Client, text: &str) {
    from.send(Destination::User(to), MessageKind::Chat, chat(text))
        .await
        .unwrap();
    assert_eq!(
        receiver.recv_timeout(WAIT).await.unwrap().payload,
        chat(text)
    );
}

/// The code of a request the server refused (panics on anything else).
pub fn rejected<T: std::fmt::Debug>(r: Result<T, courier_client::ClientError>) -> ErrorCode {
    match r {
        Err(courier_client::ClientError::Rejected(code, _)) => code,
        other => panic!("expected a rejection, got {other:?}"),
    }
}

pub fn chat(text: impl Into<Vec<u8>>) -> Bytes {
    Bytes::from(text.into())
}

/// A raw connection for sending what a well-behaved client never would.
pub struct Raw {
    pub stream: TcpStream,
    buf: BytesMut,
}

impl Raw {
    pub async fn connect(addr: &str) -> Raw {
        Raw::over(TcpStream::connect(addr).await.unwrap())
    }

    pub fn over(stream: TcpStream) -> Raw {
        Raw {
            stream,
            buf: BytesMut::new(),
        }
    }

    pub async fn send(&mut self, frame: &Frame) {
        self.stream
            .write_all(&encode_to_bytes(frame))
            .await
            .unwrap();
    }

    pub async fn send_bytes(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.unwrap();
    }

    /// The next frame, or `None` once the server closed the connection.
    pub async fn next(&mut self) -> Option<Frame> {
        tokio::time::timeout(WAIT, async {
            loop {
                if let Some((f, n)) = decode(&self.buf, u32::MAX).unwrap() {
                    let _ = self.buf.split_to(n);
                    return Some(f);
                }
                // Into the buffer on the heap: a 64 KiB array here would sit
                // in every future that awaits this one.
                self.buf.reserve(65536);
                match self.stream.read_buf(&mut self.buf).await {
                    Ok(0) | Err(_) => return None,
                    Ok(_) => {}
                }
            }
        })
        .await
        .expect("server answered in time")
    }

    /// Reads until a Goodbye; returns its code and checks the server closes.
    pub async fn expect_goodbye(&mut self) -> ErrorCode {
        loop {
            match self.next().await {
                Some(Frame {
                    body: Body::Goodbye(r),
                    ..
                }) => {
                    assert!(
                        self.next().await.is_none(),
                        "connection closed after goodbye"
                    );
                    return r.code;
                }
                Some(_) => continue,
                None => panic!("closed without goodbye"),
            }
        }
    }

    /// A raw session of `user` (device 1) from `127.0.0.<source>`, after
    /// its welcome.
    pub async fn welcomed_from(server: &Server, user: u64, source: u8) -> Raw {
        let mut raw = Raw::over(connect_from(source, &server.addr).await);
        raw.send(&Raw::hello(user, &server.token(user, 1, u64::MAX / 2)))
            .await;
        match raw.next().await {
            Some(Frame {
                body: Body::Welcome(_),
                ..
            }) => raw,
            other => panic!("expected welcome, got {other:?}"),
        }
    }

    pub fn hello(user: u64, token: &str) -> Frame {
        Frame::new(
            1,
            Body::Hello(Hello {
                version: PROTOCOL_VERSION,
                user_id: user,
                device_id: 1,
                resume_after: None,
                receipts_after: None,
                token: Bytes::from(token.as_bytes().to_vec()),
            }),
        )
    }
}

/// Runs the load generator with `opts` on a runtime of its own (two
/// worker threads) in a thread of its own, so the test can inject faults
/// meanwhile; join it for the report.
pub fn load_in_background(
    opts: courier_loadtest::Options,
) -> std::thread::JoinHandle<anyhow::Result<courier_loadtest::Report>> {
    std::thread::spawn(move || {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap()
            .block_on(courier_loadtest::run(opts))
    })
}

/// What a resilient load under faults must show: every acknowledged
/// message delivered once and in order, a real load (1,000 acknowledged),
/// and no send given up (every send answered once the faults healed).
pub fn assert_load_held(what: &str, report: &courier_loadtest::Report) {
    println!("under load, {what}:\n{}", report.summary());
    assert!(report.verdict.ok(), "{what}:\n{}", report.summary());
    assert!(
        report.acked >= 1000,
        "{what}: the load ran:\n{}",
        report.summary()
    );
    assert_eq!(
        report.abandoned,
        0,
        "{what}: sends given up unacknowledged:\n{}",
        report.summary()
    );
}

/// Shards node `id` owns in a cluster status (`GET /admin/cluster`); 0
/// before it registered.
pub fn shards_of(status: &serde_json::Value, id: &str) -> u64 {
    status["nodes"]
        .as_array()
        .and_then(|n| n.iter().find(|n| n["id"] == id))
        .and_then(|n| n["shards"].as_u64())
        .unwrap_or(0)
}

/// How many shards the nodes in `status` lead together.
pub fn shards_led(status: &serde_json::Value) -> u64 {
    status["nodes"].as_array().map_or(0, |n| {
        n.iter().map(|n| n["shards"].as_u64().unwrap_or(0)).sum()
    })
}
