//! The business dashboard in a real browser: Debian's headless Chromium,
//! driven by ChromeDriver through Selenium (PyPI), against a real node
//! that ran a campaign. The numbers the page shows must be the API's; the
//! live feed must show an event made after the page loaded; screenshots
//! are kept under the target directory (`tmp/dashboard/`). Skips loudly
//! without the browser unless `TEST_REQUIRE_TOOLS=1` (`scripts/test`
//! installs it).

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use courier_protocol::{Destination, MessageKind};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use common::{chat, Server, WAIT};

/// GET `path` on the HTTP port with `bearer` (if any): status and body.
async fn get(s: &Server, path: &str, bearer: Option<&str>) -> (u16, Value) {
    let mut conn = tokio::net::TcpStream::connect(&s.admin).await.unwrap();
    let auth = bearer.map_or(String::new(), |t| format!("authorization: Bearer {t}\r\n"));
    conn.write_all(format!("GET {path} HTTP/1.1\r\nhost: x\r\n{auth}\r\n").as_bytes())
        .await
        .unwrap();
    let mut text = String::new();
    conn.read_to_string(&mut text).await.unwrap();
    let code = text.split(' ').nth(1).unwrap().parse().unwrap();
    let body = text.split("\r\n\r\n").nth(1).unwrap_or("");
    (code, serde_json::from_str(body).unwrap_or(Value::Null))
}

/// Waits (bounded) for the JSON file `name` in `dir`, or the script's end.
fn wait_file(dir: &Path, name: &str, script: &mut std::process::Child) -> Value {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        if let Ok(text) = std::fs::read_to_string(dir.join(name)) {
            return serde_json::from_str(&text).unwrap();
        }
        if let Some(status) = script.try_wait().unwrap() {
            panic!("the browser script ended ({status}) before writing {name}");
        }
        assert!(Instant::now() < deadline, "no {name} from the browser");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// How the page writes a number of seconds.
fn seconds(v: &Value) -> String {
    match v.as_u64() {
        None => "–".into(),
        Some(s) if s < 60 => format!("{s} s"),
        Some(s) if s < 3600 => format!("{} min", (s as f64 / 60.0).round()),
        Some(s) => format!("{:.1} h", s as f64 / 3600.0),
    }
}

/// A figure as the page writes it: the number, or the API's "< 5".
fn text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "–".into(),
        other => other.to_string(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_the_apis_figures_in_a_real_browser() {
    let (Some(_), Some(_)) = (
        common::tool("chromium", "Debian's chromium"),
        common::tool("chromedriver", "Debian's chromium-driver"),
    ) else {
        return;
    };
    let selenium = std::process::Command::new("python3")
        .args(["-c", "import selenium"])
        .status()
        .is_ok_and(|s| s.success());
    if !selenium {
        let required = std::env::var("TEST_REQUIRE_TOOLS").is_ok_and(|v| v == "1");
        assert!(
            !required,
            "selenium is not installed (PyPI; scripts/test installs it)"
        );
        eprintln!(
            "\n*** SKIPPED: selenium (PyPI) is not installed; scripts/test installs it. ***\n"
        );
        return;
    }
    let s = Server::start(&[]);
    let b = 9401;
    let customers: Vec<u64> = (9402..9414).collect();
    let path = format!("/admin/businesses/{b}");
    s.utility_business(b, &[("notice", "Notice")], &customers)
        .await;

    // Six customers write and are answered (a heatmap cell and response
    // times that show); a campaign of two variants reaches all twelve,
    // eight read it (a best hour).
    let (business, _) = s.client(b).await;
    let mut clients = Vec::new();
    for (i, &c) in customers.iter().enumerate() {
        let (client, _) = s.client(c).await;
        if i < 6 {
            client
                .send(Destination::User(b), MessageKind::Chat, chat("hello?"))
                .await
                .unwrap();
            business
                .send(Destination::User(c), MessageKind::Chat, chat("hi!"))
                .await
                .unwrap();
        }
        clients.push(client);
    }
    let (code, created) = s
        .admin_json(
            "POST",
            &format!("{path}/campaigns"),
            json!({
                "name": "Notice",
                "variants": [
                    { "name": "a", "template": "notice" },
                    { "name": "b", "template": "notice", "language": "en_US" }
                ],
                "segment": { "customers": customers },
            }),
        )
        .await;
    assert_eq!(code, 200, "{created}");
    let id = created["id"].as_u64().unwrap();
    for (i, client) in clients.iter().enumerate() {
        let deadline = Instant::now() + WAIT;
        let m = loop {
            let m = client.recv_timeout(WAIT).await.expect("a message");
            if m.kind == MessageKind::Template {
                break m;
            }
            assert!(Instant::now() < deadline);
        };
        if i < 8 {
            client.mark_read(m.seq).await.unwrap();
        }
    }
    let message = created["message_id"].as_str().unwrap().to_owned();
    let deadline = Instant::now() + WAIT;
    let report = loop {
        let (_, v) = s
            .admin_json("GET", &format!("{path}/campaigns/{id}"), Value::Null)
            .await;
        let (_, rows) = s
            .admin_json("GET", &format!("{path}/messages/{message}"), Value::Null)
            .await;
        let read = rows["customers"]
            .as_array()
            .map_or(0, |r| r.iter().filter(|c| c["status"] == "read").count());
        if v["state"] == "done" && read == 8 {
            break v;
        }
        assert!(Instant::now() < deadline, "{v} {rows}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let (_, engagement) = s
        .admin_json("GET", &format!("{path}/engagement"), Value::Null)
        .await;

    // Who may look: a business's token only.
    let token = s.token(b, 1, u64::MAX / 2);
    assert_eq!(get(&s, "/dashboard/api", None).await.0, 401);
    let customer_token = s.token(customers[0], 1, u64::MAX / 2);
    let (code, refused) = get(&s, "/dashboard/api", Some(&customer_token)).await;
    assert_eq!(code, 403, "{refused}");
    assert_eq!(
        get(&s, "/dashboard/api", Some(&s.token(0, 0, u64::MAX / 2)))
            .await
            .0,
        403
    );
    assert_eq!(get(&s, "/dashboard/api", Some("forged")).await.0, 403);
    let (code, api) = get(&s, "/dashboard/api", Some(&token)).await;
    assert_eq!(code, 200, "{api}");
    assert_eq!(api["business"], b);

    // The browser.
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("dashboard");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser/dashboard.py");
    let mut browser = std::process::Command::new("python3")
        .arg(&script)
        .arg(format!("http://{}", s.admin))
        .arg(&token)
        .arg(&dir)
        .spawn()
        .expect("python3 runs the browser script");
    let shown = tokio::task::block_in_place(|| wait_file(&dir, "figures.json", &mut browser));
    assert!(
        shown["refused"]
            .as_str()
            .unwrap()
            .contains("not a valid token"),
        "{shown}"
    );
    let figures = &shown["figures"];
    assert_eq!(figures["business"], format!("business {b}"));
    for v in report["variants"].as_array().unwrap() {
        let name = v["name"].as_str().unwrap();
        for f in [
            "targeted",
            "sent",
            "delivered",
            "read",
            "clicked",
            "converted",
        ] {
            assert_eq!(
                figures[format!("campaign.{id}.{name}.{f}")]
                    .as_str()
                    .unwrap(),
                text(&v[f]),
                "variant {name}'s {f}"
            );
        }
    }
    assert_eq!(figures[format!("campaign.{id}.state")], "done");
    for (d, row) in engagement["heatmap"].as_array().unwrap().iter().enumerate() {
        for (h, cell) in row.as_array().unwrap().iter().enumerate() {
            // A hidden figure ("< 5") is a blank cell.
            let want = if cell.is_u64() {
                cell.to_string()
            } else {
                String::new()
            };
            assert!(cell.is_u64() || cell == "< 5", "{cell}");
            assert_eq!(
                figures[format!("heat.{d}.{h}")].as_str().unwrap(),
                want,
                "{d} {h}"
            );
        }
    }
    assert!(
        engagement["heatmap"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|r| r.as_array().unwrap())
            .any(|c| c == 6),
        "the six writers show: {engagement}"
    );
    assert_eq!(
        figures["response.median"].as_str().unwrap(),
        seconds(&engagement["response"]["median_s"])
    );
    assert_eq!(
        figures["response.p90"].as_str().unwrap(),
        seconds(&engagement["response"]["p90_s"])
    );
    assert_eq!(
        figures["response.replies"],
        engagement["response"]["replies"].to_string()
    );
    assert_eq!(
        figures["best_hour"].as_str().unwrap(),
        format!("{:02}:00", engagement["best_hour"].as_u64().unwrap())
    );
    let feed: Vec<u64> = shown["feed"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect();
    let (_, events) = s
        .admin_json("GET", &format!("{path}/events/0/1000"), Value::Null)
        .await;
    let last = events["last"].as_u64().unwrap();
    assert_eq!(
        feed.first(),
        Some(&last),
        "the newest event on top: {feed:?}"
    );

    // Live: a conversion made now appears in the open page's feed.
    let (code, _) = s
        .admin_json(
            "POST",
            &format!("{path}/campaigns/{id}/{}/converted", customers[0]),
            Value::Null,
        )
        .await;
    assert_eq!(code, 200);
    std::fs::write(dir.join("next_event"), (last + 1).to_string()).unwrap();
    let live = tokio::task::block_in_place(|| wait_file(&dir, "live.json", &mut browser));
    assert_eq!(live["feed"][0], last + 1, "{live}");
    let status = tokio::task::block_in_place(|| browser.wait()).unwrap();
    assert!(status.success(), "the browser script: {status}");
    for shot in [
        "dashboard-sign-in.png",
        "dashboard.png",
        "dashboard-live.png",
    ] {
        let len = std::fs::metadata(dir.join(shot))
            .map(|m| m.len())
            .unwrap_or(0);
        assert!(len > 10_000, "{shot} kept ({len} bytes)");
    }
}
