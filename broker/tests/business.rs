//! Business messaging over real TCP against the real `courier` process:
//! accounts and verification, templates and their lifecycle, consent, the
//! service window, keywords, blocks, the messaging tier and the rates.
//! Every time rule is reached by moving the node's clock (`test_clock`),
//! never by waiting.

mod common;

use std::time::Duration;

use courier_client::Client;
use courier_protocol::business::{Category, Header, TemplateMessage, TemplateSend};
use courier_protocol::*;
use serde_json::{json, Value};

use common::hook::Hook;
use common::{chat, rejected, Server, WAIT};

const HOUR: u64 = 3600 * 1000;
const DAY: u64 = 24 * HOUR;

fn node() -> Server {
    Server::start(&[("COURIER_TEST_CLOCK", "true")])
}

async fn register(s: &Server, b: u64, name: &str) {
    let (code, body) = s
        .admin_json(
            "PUT",
            &format!("/admin/businesses/{b}"),
            json!({ "display_name": name }),
        )
        .await;
    assert_eq!(code, 200, "{body}");
}

async fn template(s: &Server, b: u64, name: &str, def: Value) -> (u16, Value) {
    s.admin_json(
        "PUT",
        &format!("/admin/businesses/{b}/templates/{name}"),
        def,
    )
    .await
}

async fn set_status(s: &Server, b: u64, name: &str, status: &str) -> Value {
    let (code, body) = s
        .admin_json(
            "POST",
            &format!("/admin/businesses/{b}/templates/{name}/status"),
            json!({ "status": status, "reason": "review" }),
        )
        .await;
    assert_eq!(code, 200, "{body}");
    body
}

/// A utility template in English and Brazilian Portuguese, approved.
async fn order_update(s: &Server, b: u64) {
    let def = json!({
        "category": "utility",
        "versions": [
            {
                "language": "en_US",
                "header": { "kind": "text", "text": "Order {{1}}" },
                "body": "Hi {{2}}, your order {{1}} has shipped.",
                "footer": "Shop",
                "buttons": [{ "kind": "url", "text": "Track", "value": "https://shop.test/t/{{1}}" }],
                "examples": { "1": "#42", "2": "Ana" }
            },
            {
                "language": "pt_BR",
                "header": { "kind": "text", "text": "Pedido {{1}}" },
                "body": "Olá {{2}}, seu pedido {{1}} foi enviado.",
                "examples": { "1": "#42", "2": "Ana" }
            }
        ]
    });
    let (code, body) = template(s, b, "order_update", def).await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["status"], "pending");
    set_status(s, b, "order_update", "approved").await;
}

/// A utility template without parameters, approved.
async fn notice(s: &Server, b: u64) {
    let def = json!({
        "category": "utility",
        "versions": [{ "language": "en_US", "body": "Notice", "examples": {} }]
    });
    let (code, body) = template(s, b, "notice", def).await;
    assert_eq!(code, 200, "{body}");
    set_status(s, b, "notice", "approved").await;
}

fn notice_send() -> TemplateSend {
    TemplateSend {
        name: "notice".into(),
        language: String::new(),
        params: Vec::new(),
    }
}

/// A marketing template, approved.
async fn promo(s: &Server, b: u64) {
    let def = json!({
        "category": "marketing",
        "versions": [{ "language": "en_US", "body": "Sale today", "examples": {} }]
    });
    let (code, body) = template(s, b, "promo", def).await;
    assert_eq!(code, 200, "{body}");
    set_status(s, b, "promo", "approved").await;
}

async fn consent(s: &Server, b: u64, customer: u64, action: &str, purpose: &str) -> (u16, Value) {
    s.admin_json(
        "POST",
        &format!("/admin/businesses/{b}/consent"),
        json!({
            "customer": customer,
            "action": action,
            "purpose": purpose,
            "source": "web_form",
            "text_version": 3,
            "text": "Yes, send me order updates",
            "language": "pt_BR",
        }),
    )
    .await
}

fn order(id: &str, name: &str) -> TemplateSend {
    TemplateSend {
        name: "order_update".into(),
        language: String::new(),
        params: vec![(String::new(), id.into()), (String::new(), name.into())],
    }
}

fn promo_send() -> TemplateSend {
    TemplateSend {
        name: "promo".into(),
        language: "en_US".into(),
        params: Vec::new(),
    }
}

/// The code `business`'s template send is refused with.
async fn refused(business: &Client, id: u64, customer: u64, send: &TemplateSend) -> ErrorCode {
    rejected(business.send_template(id, customer, send).await)
}

async fn received_template(c: &Client) -> (Message, TemplateMessage) {
    let m = c.recv_timeout(WAIT).await.expect("a message");
    assert_eq!(m.kind, MessageKind::Template);
    let t = TemplateMessage::decode(&m.payload).expect("a rendered template");
    (m, t)
}

async fn info(c: &Client, b: u64) -> Result<BusinessInfo, courier_client::ClientError> {
    c.business(BusinessOp::Info, b, Purpose::None, "", "").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accounts_are_registered_checked_verified_and_seen_by_customers() {
    let s = node();
    let (b, customer) = (5001, 5002);
    let path = format!("/admin/businesses/{b}");
    // Each profile rule has its code; nothing is registered by a refusal.
    let bad = [
        (json!({ "display_name": "" }), "display_name_invalid"),
        (
            json!({ "display_name": "x".repeat(256) }),
            "display_name_invalid",
        ),
        (
            json!({ "display_name": "Shop", "profile": { "about": "a".repeat(140) } }),
            "about_too_long",
        ),
        (
            json!({ "display_name": "Shop", "profile": { "address": "a".repeat(257) } }),
            "address_too_long",
        ),
        (
            json!({ "display_name": "Shop", "profile": { "description": "a".repeat(513) } }),
            "description_too_long",
        ),
        (
            json!({ "display_name": "Shop", "profile": { "email": "no-at-sign" } }),
            "email_invalid",
        ),
        (
            json!({ "display_name": "Shop", "profile": { "websites": ["https://a.test", "https://b.test", "https://c.test"] } }),
            "too_many_websites",
        ),
        (
            json!({ "display_name": "Shop", "colour": "red" }),
            "body_invalid",
        ),
    ];
    for (body, code) in bad {
        let (status, answer) = s.admin_json("PUT", &path, body).await;
        assert_eq!(
            (status, answer["code"].as_str()),
            (400, Some(code)),
            "{answer}"
        );
    }
    let (status, _) = s.admin_json("GET", &path, Value::Null).await;
    assert_eq!(status, 404, "a refused registration registers nothing");
    let (client, _) = s.client(customer).await;
    assert_eq!(rejected(info(&client, b).await), ErrorCode::NOT_A_BUSINESS);

    // Registered at the boundaries: a 255-character name, a 139-character about.
    let name = "S".repeat(255);
    let (status, answer) = s
        .admin_json(
            "PUT",
            &path,
            json!({
                "display_name": name,
                "profile": { "about": "a".repeat(139), "websites": ["https://shop.test", "https://shop.test/help"], "email": "help@shop.test", "picture": "media://p/1" }
            }),
        )
        .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["tier"], 250, "an unverified business starts at 250");
    let seen = info(&client, b).await.unwrap();
    assert_eq!(seen.display_name, name);
    assert!(!seen.verified);
    assert_eq!(seen.websites.len(), 2);

    // The business edits its profile; a new display name waits for review.
    let (status, answer) = s
        .admin_json(
            "PUT",
            &path,
            json!({ "display_name": "Shop & Co", "profile": { "about": "We ship" } }),
        )
        .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["pending_display_name"], "Shop & Co");
    let seen = info(&client, b).await.unwrap();
    assert_eq!(
        (seen.display_name.as_str(), seen.about.as_str()),
        (name.as_str(), "We ship")
    );

    let (status, answer) = s
        .admin_json(
            "POST",
            &format!("{path}/verify"),
            json!({ "verified": true, "reason": "documents checked" }),
        )
        .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["tier"], 2000, "a verified business starts at 2,000");
    assert_eq!(answer["verification_reason"], "documents checked");
    let seen = info(&client, b).await.unwrap();
    assert!(seen.verified, "customers see the mark");
    assert_eq!(seen.display_name, "Shop & Co", "the reviewed name is shown");

    // The platform's own account exists from the start, verified.
    let platform = (1u64 << 63) - 1;
    let seen = info(&client, platform).await.unwrap();
    assert!(seen.verified);

    // All of it survives a crash.
    drop(client);
    let mut s = s;
    s.kill();
    s.restart();
    let (client, _) = s.client(customer).await;
    let seen = info(&client, b).await.unwrap();
    assert!(seen.verified && seen.display_name == "Shop & Co" && seen.about == "We ship");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn templates_follow_their_schema_and_lifecycle_and_render_in_the_customers_language() {
    let s = node();
    let (b, customer, other) = (6001, 6002, 6003);
    register(&s, b, "Shop").await;
    // One code per schema violation (every code is unit-tested; these
    // cross the API).
    let bad = [
        (
            json!({ "category": "spam", "versions": [{ "language": "en", "body": "x" }] }),
            "category_invalid",
        ),
        (
            json!({ "category": "utility", "versions": [] }),
            "no_versions",
        ),
        (
            json!({ "category": "utility", "versions": [{ "language": "en", "body": "x".repeat(1025) }] }),
            "body_too_long",
        ),
        (
            json!({ "category": "utility", "versions": [{ "language": "en", "body": "Hi {{1}} {{name}}", "examples": { "1": "a", "name": "b" } }] }),
            "params_mixed",
        ),
        (
            json!({ "category": "utility", "versions": [{ "language": "en", "body": "Hi {{1}}" }] }),
            "example_missing",
        ),
        (
            json!({ "category": "utility", "versions": [{ "language": "en", "body": "x", "header": { "kind": "text", "text": "h".repeat(61) } }] }),
            "header_too_long",
        ),
        (
            json!({ "category": "utility", "versions": [{ "language": "en", "body": "x", "footer": "f".repeat(61) }] }),
            "footer_too_long",
        ),
    ];
    for (def, code) in bad {
        let (status, answer) = template(&s, b, "t", def).await;
        assert_eq!(
            (status, answer["code"].as_str()),
            (400, Some(code)),
            "{answer}"
        );
    }
    let (status, answer) = template(
        &s,
        b,
        "Bad-Name",
        json!({ "category": "utility", "versions": [{ "language": "en", "body": "x" }] }),
    )
    .await;
    assert_eq!(
        (status, answer["code"].as_str()),
        (400, Some("name_invalid"))
    );

    order_update(&s, b).await;
    let (business, _) = s.client(b).await;
    let (client, _) = s.client(customer).await;
    let (status, _) = consent(&s, b, customer, "opt_in", "utility").await;
    assert_eq!(status, 200);

    // Rendered in the customer's preferred language (the opt-in's: pt_BR).
    business
        .send_template(1, customer, &order("#7", "Ana"))
        .await
        .unwrap();
    let (m, t) = received_template(&client).await;
    assert_eq!(m.sender, b);
    assert_eq!(t.language, "pt_BR");
    assert_eq!(t.body, "Olá Ana, seu pedido #7 foi enviado.");
    assert_eq!(t.header, Header::Text("Pedido #7".into()));
    assert_eq!(t.category, Category::Utility);
    assert!(!t.verified);
    // Asked for in English: English, with the button rendered.
    let mut english = order("#8", "Ana");
    english.language = "en_US".into();
    business.send_template(2, customer, &english).await.unwrap();
    let (_, t) = received_template(&client).await;
    assert_eq!(t.body, "Hi Ana, your order #8 has shipped.");
    assert_eq!(t.buttons[0].value, "https://shop.test/t/#8");
    // A language the template lacks, when asked for: refused.
    let mut german = order("#9", "Ana");
    german.language = "de_DE".into();
    assert_eq!(
        refused(&business, 3, customer, &german).await,
        ErrorCode::NO_SUCH_TEMPLATE
    );
    // Wrong parameters, an unknown template.
    let short = TemplateSend {
        params: vec![(String::new(), "#9".into())],
        ..order("", "")
    };
    assert_eq!(
        refused(&business, 4, customer, &short).await,
        ErrorCode::TEMPLATE_PARAMS_INVALID
    );
    let unknown = TemplateSend {
        name: "nope".into(),
        ..order("#9", "Ana")
    };
    assert_eq!(
        refused(&business, 5, customer, &unknown).await,
        ErrorCode::NO_SUCH_TEMPLATE
    );
    // Another customer with no language of their own gets the fallback
    // (the first version).
    let (status, _) = s
        .admin_json(
            "POST",
            &format!("/admin/businesses/{b}/consent"),
            json!({ "customer": other, "action": "opt_in", "purpose": "utility", "source": "api_import", "text": "imported" }),
        )
        .await;
    assert_eq!(status, 200);
    let (other_client, _) = s.client(other).await;
    business
        .send_template(20, other, &order("#5", "Bo"))
        .await
        .unwrap();
    let (_, t) = received_template(&other_client).await;
    assert_eq!(
        (t.language.as_str(), t.body.as_str()),
        ("en_US", "Hi Bo, your order #5 has shipped.")
    );

    // Pending (a change is reviewed again), rejected: not sent.
    template(
        &s,
        b,
        "later",
        json!({ "category": "utility", "versions": [{ "language": "en_US", "body": "Later" }] }),
    )
    .await;
    let later = TemplateSend {
        name: "later".into(),
        language: String::new(),
        params: vec![],
    };
    assert_eq!(
        refused(&business, 6, customer, &later).await,
        ErrorCode::TEMPLATE_NOT_APPROVED
    );
    set_status(&s, b, "later", "rejected").await;
    assert_eq!(
        refused(&business, 7, customer, &later).await,
        ErrorCode::TEMPLATE_NOT_APPROVED
    );

    // Paused for 3 hours, then 6, then disabled; a paused send is refused
    // with the time left as its hint, and not counted.
    let paused = set_status(&s, b, "order_update", "paused").await;
    assert_eq!(paused["status"], "paused");
    let first = business
        .send_template(8, customer, &order("#1", "Ana"))
        .await;
    match first {
        Err(courier_client::ClientError::Rejected(code, message)) => {
            assert_eq!(code, ErrorCode::TEMPLATE_PAUSED);
            let hint = courier_protocol::error::retry_after_ms(&message).expect("a hint");
            assert!(hint > 3 * HOUR - 60_000 && hint <= 3 * HOUR, "{message}");
        }
        other => panic!("expected TEMPLATE_PAUSED, got {other:?}"),
    }
    s.advance_clock(3 * HOUR - 1000).await;
    assert_eq!(
        refused(&business, 9, customer, &order("#1", "Ana")).await,
        ErrorCode::TEMPLATE_PAUSED
    );
    s.advance_clock(1000).await;
    business
        .send_template(10, customer, &order("#1", "Ana"))
        .await
        .unwrap();
    received_template(&client).await;
    let second = set_status(&s, b, "order_update", "paused").await;
    assert_eq!(second["pauses"], 2);
    s.advance_clock(6 * HOUR).await;
    business
        .send_template(11, customer, &order("#2", "Ana"))
        .await
        .unwrap();
    received_template(&client).await;
    let third = set_status(&s, b, "order_update", "paused").await;
    assert_eq!(third["status"], "disabled", "the third pause disables it");
    assert_eq!(
        refused(&business, 12, customer, &order("#3", "Ana")).await,
        ErrorCode::TEMPLATE_NOT_APPROVED
    );

    // Each status change reached the business as an event in its inbox.
    let mut events = Vec::new();
    while let Ok(m) = business.recv_timeout(Duration::from_millis(500)).await {
        assert_eq!(m.kind, MessageKind::System);
        let e: Value = serde_json::from_slice(&m.payload).unwrap();
        events.push(format!(
            "{} {}",
            e["template"].as_str().unwrap(),
            e["status"].as_str().unwrap()
        ));
    }
    for expected in [
        "order_update pending",
        "order_update approved",
        "later rejected",
        "order_update paused",
        "order_update disabled",
    ] {
        assert!(
            events.iter().any(|e| e == expected),
            "{expected} not in {events:?}"
        );
    }

    // At most 250 templates per business (251 with this one would be over).
    let (status, list) = s
        .admin_json(
            "GET",
            &format!("/admin/businesses/{b}/templates"),
            Value::Null,
        )
        .await;
    assert_eq!(status, 200);
    let have = list.as_array().unwrap().len();
    for i in have..250 {
        let (status, answer) = template(
            &s,
            b,
            &format!("t{i}"),
            json!({ "category": "utility", "versions": [{ "language": "en", "body": "x" }] }),
        )
        .await;
        assert_eq!(status, 200, "{answer}");
    }
    let (status, answer) = template(
        &s,
        b,
        "one_too_many",
        json!({ "category": "utility", "versions": [{ "language": "en", "body": "x" }] }),
    )
    .await;
    assert_eq!(
        (status, answer["code"].as_str()),
        (400, Some("too_many_templates"))
    );
    let (status, _) = template(
        &s,
        b,
        "t10",
        json!({ "category": "utility", "versions": [{ "language": "en", "body": "changed" }] }),
    )
    .await;
    assert_eq!(status, 200, "replacing one is not a new one");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consent_the_window_keywords_and_blocks_are_enforced_and_survive_a_crash() {
    let mut s = node();
    let (b, customer) = (7001, 7002);
    register(&s, b, "Shop").await;
    order_update(&s, b).await;
    promo(&s, b).await;
    let (business, _) = s.client(b).await;
    let (client, _) = s.client(customer).await;

    // No opt-in: no template of either purpose.
    assert_eq!(
        refused(&business, 1, customer, &order("#1", "Ana")).await,
        ErrorCode::NO_CONSENT
    );
    assert_eq!(
        refused(&business, 2, customer, &promo_send()).await,
        ErrorCode::NO_CONSENT
    );
    // An opt-in covers its purpose only.
    let (status, state) = consent(&s, b, customer, "opt_in", "marketing").await;
    assert_eq!(status, 200, "{state}");
    business
        .send_template(3, customer, &promo_send())
        .await
        .unwrap();
    assert_eq!(
        refused(&business, 4, customer, &order("#1", "Ana")).await,
        ErrorCode::NO_CONSENT
    );
    // The customer opts in to utility in the app.
    let seen = client
        .business(
            BusinessOp::OptIn,
            b,
            Purpose::Utility,
            "en_US",
            "Get order updates",
        )
        .await
        .unwrap();
    assert!(seen.utility && seen.marketing);
    business
        .send_template(5, customer, &order("#1", "Ana"))
        .await
        .unwrap();
    assert_eq!(received_template(&client).await.1.name, "promo");
    assert_eq!(received_template(&client).await.1.language, "en_US");

    // Free-form: only inside the 24-hour window the customer's message opens.
    let text = |t: &str| (Destination::User(customer), MessageKind::Chat, chat(t));
    let (d, k, p) = text("hello?");
    assert_eq!(
        rejected(business.send_with_id(6, d, k, p).await),
        ErrorCode::OUTSIDE_WINDOW
    );
    client
        .send(
            Destination::User(b),
            MessageKind::Chat,
            chat("where is my order?"),
        )
        .await
        .unwrap();
    let (d, k, p) = text("on its way");
    business.send_with_id(7, d, k, p).await.unwrap();
    s.advance_clock(DAY - 1000).await;
    let (d, k, p) = text("still there?");
    business.send_with_id(8, d, k, p).await.unwrap();
    s.advance_clock(2000).await;
    let (d, k, p) = text("too late");
    assert_eq!(
        rejected(business.send_with_id(9, d, k, p).await),
        ErrorCode::OUTSIDE_WINDOW
    );

    // STOP withdraws every opt-in at once; START restores them.
    client
        .send(Destination::User(b), MessageKind::Chat, chat(" Stop "))
        .await
        .unwrap();
    assert_eq!(
        refused(&business, 10, customer, &order("#2", "Ana")).await,
        ErrorCode::NO_CONSENT
    );
    assert_eq!(
        refused(&business, 11, customer, &promo_send()).await,
        ErrorCode::NO_CONSENT
    );
    let seen = info(&client, b).await.unwrap();
    assert!(!seen.marketing && !seen.utility);
    // The business may still answer in the window the STOP opened.
    let (d, k, p) = text("you are unsubscribed");
    business.send_with_id(12, d, k, p).await.unwrap();
    client
        .send(Destination::User(b), MessageKind::Chat, chat("START"))
        .await
        .unwrap();
    business
        .send_template(13, customer, &order("#3", "Ana"))
        .await
        .unwrap();

    // The ledger holds every change, in order, with its source and wording.
    let (status, ledger) = s
        .admin_json(
            "GET",
            &format!("/admin/businesses/{b}/consent/{customer}"),
            Value::Null,
        )
        .await;
    assert_eq!(status, 200);
    let history: Vec<String> = ledger["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            format!(
                "{} {} {}",
                e["action"].as_str().unwrap(),
                e["purpose"].as_str().unwrap(),
                e["source"].as_str().unwrap()
            )
        })
        .collect();
    assert_eq!(
        history,
        [
            "opt_in marketing web_form",
            "opt_in utility in_chat",
            "opt_out marketing keyword",
            "opt_out utility keyword",
            "opt_in marketing keyword",
            "opt_in utility keyword",
        ]
    );
    assert_eq!(ledger["history"][0]["text"], "Yes, send me order updates");
    assert_eq!(ledger["history"][0]["text_version"], 3);
    assert_eq!(ledger["current"]["marketing"], true);
    let (status, export) = s
        .admin_json("GET", &format!("/admin/businesses/{b}/export"), Value::Null)
        .await;
    assert_eq!(status, 200);
    assert_eq!(export["ledger"].as_array().unwrap().len(), 6);
    assert_eq!(export["ledger"][0]["customer"], customer);
    // Bad ledger entries, each with its code.
    for (body, code) in [
        (
            json!({ "customer": customer, "action": "maybe", "purpose": "utility", "source": "web_form", "text": "x" }),
            "action_invalid",
        ),
        (
            json!({ "customer": customer, "action": "opt_in", "purpose": "spam", "source": "web_form", "text": "x" }),
            "purpose_invalid",
        ),
        (
            json!({ "customer": customer, "action": "opt_in", "purpose": "utility", "source": "rumour", "text": "x" }),
            "source_invalid",
        ),
        (
            json!({ "customer": customer, "action": "opt_in", "purpose": "utility", "source": "web_form" }),
            "text_missing",
        ),
        (
            json!({ "customer": 0, "action": "opt_in", "purpose": "utility", "source": "web_form", "text": "x" }),
            "customer_invalid",
        ),
    ] {
        let (status, answer) = s
            .admin_json("POST", &format!("/admin/businesses/{b}/consent"), body)
            .await;
        assert_eq!(
            (status, answer["code"].as_str()),
            (400, Some(code)),
            "{answer}"
        );
    }

    // A block stops everything from the business; an unblock lets it again.
    let seen = client
        .business(BusinessOp::Block, b, Purpose::None, "", "")
        .await
        .unwrap();
    assert!(seen.blocked);
    assert_eq!(
        refused(&business, 14, customer, &order("#4", "Ana")).await,
        ErrorCode::BLOCKED_BY_CUSTOMER
    );
    client
        .business(BusinessOp::Report, b, Purpose::None, "", "spam")
        .await
        .unwrap();

    // After a crash: the block, the consent and the window are as they were.
    drop((business, client));
    s.kill();
    s.restart();
    let (business, _) = s.client(b).await;
    let (client, _) = s.client(customer).await;
    assert_eq!(
        refused(&business, 15, customer, &order("#5", "Ana")).await,
        ErrorCode::BLOCKED_BY_CUSTOMER
    );
    let seen = client
        .business(BusinessOp::Unblock, b, Purpose::None, "", "")
        .await
        .unwrap();
    assert!(!seen.blocked && seen.marketing && seen.utility);
    business
        .send_template(16, customer, &order("#6", "Ana"))
        .await
        .unwrap();
    let (d, k, p) = text("still in the window");
    business.send_with_id(17, d, k, p).await.unwrap();
    let (status, ledger) = s
        .admin_json(
            "GET",
            &format!("/admin/businesses/{b}/consent/{customer}"),
            Value::Null,
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(ledger["current"]["reports"], 1);
    assert_eq!(ledger["history"].as_array().unwrap().len(), 6);
    // A retried template (same client id) is one message.
    let again = business
        .send_template(16, customer, &order("#6", "Ana"))
        .await
        .unwrap();
    assert!(again.duplicate);

    // Erasure: the ledger's details go, a tombstone says when; the rules
    // see a customer the business never had.
    let erased = erase(&s, b, customer).await;
    assert_eq!(erased["ledger_entries_erased"], 6);
    let (status, export) = s
        .admin_json(
            "GET",
            &format!("/admin/businesses/{b}/export/{customer}"),
            Value::Null,
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(export["ledger"], json!([]));
    assert_eq!(export["erasures"][0]["customer"], customer);
    assert_eq!(
        export["erasures"][0]["erased_at_ms"],
        erased["erased_at_ms"]
    );
    assert_eq!(
        refused(&business, 18, customer, &order("#7", "Ana")).await,
        ErrorCode::NO_CONSENT
    );
    let (d, k, p) = text("hello after erasure");
    assert_eq!(
        rejected(business.send_with_id(19, d, k, p).await),
        ErrorCode::OUTSIDE_WINDOW
    );
}

/// Erasure of a customer's data held for a business reaches the messages:
/// every entry the customer left in the business's inbox (messages,
/// receipts) reads back as kind `erased`, empty, in its place, in a fetch
/// and in a resume after a crash alike. Other customers' messages stay, a
/// retry of an erased message is still the one message, the export shows
/// the tombstone, and what the customer writes next is stored as sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn erasure_empties_what_the_customer_left_in_the_business_inbox() {
    let mut s = node();
    let (b, one_id, two_id) = (7101, 7102, 7103);
    register(&s, b, "Shop").await;
    let (business, _) = s.client(b).await;
    let (one, _) = s.client(one_id).await;
    let (two, _) = s.client(two_id).await;
    let (status, state) = consent(&s, b, one_id, "opt_in", "utility").await;
    assert_eq!(status, 200, "{state}");
    let to_b = |t: &str| (Destination::User(b), MessageKind::Chat, chat(t));
    let (d, k, p) = to_b("my address is 1 Main St");
    one.send_with_id(1, d, k, p).await.unwrap();
    let (d, k, p) = to_b("call me on 555 0100");
    one.send_with_id(2, d, k, p).await.unwrap();
    let (d, k, p) = to_b("hello from the other customer");
    two.send_with_id(1, d, k, p).await.unwrap();
    // The business answers in the window; the customer reads it: a
    // receipt in the business's inbox.
    business
        .send(Destination::User(one_id), MessageKind::Chat, chat("noted"))
        .await
        .unwrap();
    let answer = one.recv_timeout(WAIT).await.unwrap();
    one.mark_read(answer.seq).await.unwrap();
    let mut before = Vec::new();
    while before.len() < 4 {
        before.push(business.recv_timeout(WAIT).await.unwrap());
    }
    let kinds: Vec<_> = before.iter().map(|m| (m.sender, m.kind)).collect();
    assert_eq!(
        kinds,
        [
            (one_id, MessageKind::Chat),
            (one_id, MessageKind::Chat),
            (two_id, MessageKind::Chat),
            (one_id, MessageKind::Receipt),
        ]
    );

    let erased = erase(&s, b, one_id).await;
    assert_eq!(erased["messages_erased"], 3, "{erased}");
    assert_eq!(erased["ledger_entries_erased"], 1, "{erased}");
    let erased_view = |m: &Message| {
        if m.sender == one_id {
            Message {
                kind: MessageKind::Erased,
                payload: Default::default(),
                ..m.clone()
            }
        } else {
            m.clone()
        }
    };
    let expected: Vec<Message> = before.iter().map(erased_view).collect();
    let fetched = business.fetch(0, 100).await.unwrap().messages;
    assert_eq!(fetched, expected);
    let (d, k, p) = to_b("my address is 1 Main St");
    let again = one.send_with_id(1, d, k, p).await.unwrap();
    assert!(again.duplicate, "a retry of an erased message: {again:?}");
    let (status, export) = s
        .admin_json(
            "GET",
            &format!("/admin/businesses/{b}/export/{one_id}"),
            Value::Null,
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(export["ledger"], json!([]));
    assert_eq!(
        export["erasures"][0]["erased_at_ms"],
        erased["erased_at_ms"]
    );

    // After a crash a business resuming from the start reads them erased.
    drop((business, one, two));
    s.kill();
    s.restart();
    let (business, _) = s.resume(b, 0).await;
    let mut resumed = Vec::new();
    while resumed.len() < 4 {
        resumed.push(business.recv_timeout(WAIT).await.unwrap());
    }
    assert_eq!(resumed, expected);
    // The data is gone, not the customer: the next message is as sent, and
    // erasing again erases it.
    let (one, _) = s.client(one_id).await;
    let (d, k, p) = to_b("back again");
    one.send_with_id(3, d, k, p).await.unwrap();
    let next = business.recv_timeout(WAIT).await.unwrap();
    assert_eq!(
        (next.kind, next.payload),
        (MessageKind::Chat, chat("back again"))
    );
    assert_eq!(erase(&s, b, one_id).await["messages_erased"], 1);
}

async fn erase(s: &Server, b: u64, customer: u64) -> Value {
    let path = format!("/admin/businesses/{b}/erase/{customer}");
    let (status, erased) = s.admin_json("POST", &path, Value::Null).await;
    assert_eq!(status, 200, "{erased}");
    erased
}

/// A STOP racing a campaign: the business's sends are admitted in order on
/// its shard, so the customer's inbox holds a prefix of the campaign, and
/// every send begun after the STOP was acknowledged is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_opt_out_takes_effect_for_every_send_admitted_after_it() {
    // A campaign of 40 marketing messages to one customer: over the
    // marketing cap (2 a day) unless it is raised.
    let s = Server::start(&[
        ("COURIER_TEST_CLOCK", "true"),
        ("COURIER_BUSINESS_MARKETING_PER_CUSTOMER", "1000"),
    ]);
    let (b, customer) = (8001, 8002);
    register(&s, b, "Shop").await;
    promo(&s, b).await;
    consent(&s, b, customer, "opt_in", "marketing").await;
    // Bursts of 45 per customer would stop the campaign before the race.
    let (status, _) = s
        .admin_json(
            "POST",
            &format!("/admin/businesses/{b}/limits"),
            json!({ "messages_per_sec": 1000 }),
        )
        .await;
    assert_eq!(status, 200);
    let (business, _) = s.client(b).await;
    let (client, _) = s.client(customer).await;
    let campaign = tokio::spawn(async move {
        let mut outcomes = Vec::new();
        for id in 1..=40u64 {
            let began = std::time::Instant::now();
            let r = business.send_template(id, customer, &promo_send()).await;
            outcomes.push((id, began, r.map_err(|e| format!("{e:?}"))));
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        outcomes
    });
    tokio::time::sleep(Duration::from_millis(20)).await;
    client
        .send(Destination::User(b), MessageKind::Chat, chat("STOP"))
        .await
        .unwrap();
    let stopped = std::time::Instant::now();
    let outcomes: Vec<(u64, std::time::Instant, Result<SendAck, String>)> = campaign.await.unwrap();
    for (id, began, r) in &outcomes {
        if *began > stopped {
            assert!(
                r.is_err(),
                "send {id} began after the STOP was acknowledged"
            );
        }
    }
    let outcomes: Vec<(u64, Result<SendAck, String>)> =
        outcomes.into_iter().map(|(id, _, r)| (id, r)).collect();
    let first_refused = outcomes.iter().position(|(_, r)| r.is_err());
    let accepted = first_refused.unwrap_or(outcomes.len());
    assert!(
        accepted < outcomes.len(),
        "the STOP refused the rest of the campaign"
    );
    for (id, r) in &outcomes[accepted..] {
        let e = r
            .as_ref()
            .expect_err("every send after the first refusal is refused");
        assert!(e.contains("NO_CONSENT"), "send {id}: {e}");
    }
    // Exactly the accepted ones reached the customer, in order.
    for (id, _) in &outcomes[..accepted] {
        let m = client.recv_timeout(WAIT).await.unwrap();
        assert_eq!(m.client_msg_id, *id);
    }
    assert!(
        client
            .recv_timeout(Duration::from_millis(300))
            .await
            .is_err(),
        "nothing after the opt-out"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tier_counts_new_conversations_and_the_rates_hold() {
    let s = node();
    let b = 9001;
    register(&s, b, "Shop").await;
    order_update(&s, b).await;
    let (status, _) = s
        .admin_json(
            "POST",
            &format!("/admin/businesses/{b}/limits"),
            json!({ "messages_per_sec": 1000 }),
        )
        .await;
    assert_eq!(status, 200);
    let customers: Vec<u64> = (10_000..10_252).collect();
    for &c in &customers {
        assert_eq!(consent(&s, b, c, "opt_in", "utility").await.0, 200);
    }
    let (business, _) = s.client(b).await;
    // 250 new conversations in the rolling 24 hours (the unverified tier)...
    for (i, &c) in customers[..250].iter().enumerate() {
        business
            .send_template(i as u64 + 1, c, &order("#1", "A"))
            .await
            .unwrap();
    }
    // ...the 251st is refused, and not counted.
    let c251 = customers[250];
    assert_eq!(
        refused(&business, 1000, c251, &order("#1", "A")).await,
        ErrorCode::TIER_LIMIT_REACHED
    );
    // A customer already in a conversation is not a new one.
    business
        .send_template(1001, customers[0], &order("#2", "A"))
        .await
        .unwrap();
    // A customer who wrote first is in a service window: not counted.
    let (writer, _) = s.client(customers[251]).await;
    writer
        .send(Destination::User(b), MessageKind::Chat, chat("hi"))
        .await
        .unwrap();
    business
        .send_template(1002, customers[251], &order("#3", "A"))
        .await
        .unwrap();
    // 24 hours on, the conversations have aged out.
    s.advance_clock(DAY).await;
    business
        .send_template(1003, c251, &order("#4", "A"))
        .await
        .unwrap();
    let (status, account) = s
        .admin_json("GET", &format!("/admin/businesses/{b}"), Value::Null)
        .await;
    assert_eq!(status, 200);
    assert_eq!(account["conversations_started_in_period"], 1);

    // A fresh template for the rates (the first, sent 251 times and never
    // read, was paused for its quality once a day had passed).
    notice(&s, b).await;
    // One customer: bursts of 45, then one per 6 seconds.
    let c = customers[1];
    s.advance_clock(DAY).await;
    for i in 0..45 {
        business
            .send_template(2000 + i, c, &notice_send())
            .await
            .unwrap();
    }
    match business.send_template(2045, c, &notice_send()).await {
        Err(courier_client::ClientError::Rejected(code, message)) => {
            assert_eq!(code, ErrorCode::BUSINESS_RATE_LIMITED);
            let hint = courier_protocol::error::retry_after_ms(&message).expect("a hint");
            assert!(hint > 0 && hint <= 6000, "{message}");
        }
        other => panic!("the 46th of a burst: {other:?}"),
    }
    s.advance_clock(6000).await;
    business
        .send_template(2046, c, &notice_send())
        .await
        .unwrap();

    // The business's own rate: 5 a second, then refused with a hint.
    let (status, _) = s
        .admin_json(
            "POST",
            &format!("/admin/businesses/{b}/limits"),
            json!({ "messages_per_sec": 5 }),
        )
        .await;
    assert_eq!(status, 200);
    s.advance_clock(1000).await;
    let mut refused = 0;
    for (i, &c) in customers[2..12].iter().enumerate() {
        if let Err(courier_client::ClientError::Rejected(code, _)) = business
            .send_template(3000 + i as u64, c, &notice_send())
            .await
        {
            assert_eq!(code, ErrorCode::BUSINESS_RATE_LIMITED);
            refused += 1;
        }
    }
    assert!(refused >= 4, "10 sends at 5 a second: {refused} refused");
    let (status, answer) = s
        .admin_json(
            "POST",
            &format!("/admin/businesses/{b}/limits"),
            json!({ "messages_per_sec": 1001 }),
        )
        .await;
    assert_eq!(
        (status, answer["code"].as_str()),
        (400, Some("messages_per_sec_invalid"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_platform_account_messages_every_user_and_bad_business_requests_are_refused() {
    let s = node();
    let platform = (1u64 << 63) - 1;
    let customer = 11_001;
    let (account, _) = s.client(platform).await;
    let (client, _) = s.client(customer).await;
    // No window, no opt-in needed: service messages.
    account
        .send(
            Destination::User(customer),
            MessageKind::Chat,
            chat("Your account was verified"),
        )
        .await
        .unwrap();
    assert_eq!(client.recv_timeout(WAIT).await.unwrap().sender, platform);
    // A business request about oneself or user 0, an opt-in with no purpose.
    assert_eq!(
        rejected(info(&client, customer).await),
        ErrorCode::INVALID_REQUEST
    );
    assert_eq!(rejected(info(&client, 0).await), ErrorCode::INVALID_REQUEST);
    assert_eq!(
        rejected(
            client
                .business(BusinessOp::OptIn, platform, Purpose::None, "", "yes")
                .await
        ),
        ErrorCode::INVALID_REQUEST
    );
    // Admin: a business that does not exist, a path that does not.
    let (status, answer) = s
        .admin_json("GET", "/admin/businesses/424242", Value::Null)
        .await;
    assert_eq!(
        (status, answer["code"].as_str()),
        (404, Some("not_a_business"))
    );
    let (status, _) = s
        .admin_json("GET", "/admin/businesses/0", Value::Null)
        .await;
    assert_eq!(status, 400);
    let (status, _) = s
        .admin_json("GET", "/admin/businesses/5/nothing", Value::Null)
        .await;
    assert_eq!(status, 404);
}

/// A business's broadcast list reaches the customers its consent ledger
/// allows (not its contacts), each in their own language.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_business_broadcast_list_follows_the_consent_ledger() {
    let s = node();
    let (b, yes, never, stopped, contact) = (12_001, 12_002, 12_003, 12_004, 12_005);
    let also = 12_006;
    register(&s, b, "Shop").await;
    order_update(&s, b).await;
    consent(&s, b, yes, "opt_in", "utility").await;
    consent(&s, b, also, "opt_in", "utility").await;
    consent(&s, b, stopped, "opt_in", "utility").await;
    consent(&s, b, stopped, "opt_out", "utility").await;
    let (business, _) = s.client(b).await;
    let (c_yes, _) = s.client(yes).await;
    let (c_contact, _) = s.client(contact).await;
    // Having the business as a contact is not an opt-in.
    c_contact.contacts(ContactsOp::Add, vec![b]).await.unwrap();
    business
        .list(ListOp::Set, 1, vec![yes, never, stopped, contact, also])
        .await
        .unwrap();
    let payload = order("#1", "Ana").encode();
    let ack = business
        .broadcast_with_id(77, 1, MessageKind::Template, payload.clone())
        .await
        .unwrap();
    assert_eq!((ack.delivered, ack.skipped), (2, 3));
    let (m, t) = received_template(&c_yes).await;
    assert_eq!(t.language, "pt_BR", "rendered for this customer");
    assert_eq!(m.destination, Destination::User(yes));
    // One status per customer the list send reached; each moves on its own.
    c_yes.mark_read(m.seq).await.unwrap();
    wait_status(&s, b, 77, yes, "read").await;
    let (status, rows) = s
        .admin_json(
            "GET",
            &format!("/admin/businesses/{b}/messages/77"),
            Value::Null,
        )
        .await;
    assert_eq!(status, 200, "{rows}");
    let seen: Vec<(u64, &str)> = rows["customers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["customer"].as_u64().unwrap(),
                r["status"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(seen, [(yes, "read"), (also, "sent")]);
    assert!(c_contact
        .recv_timeout(Duration::from_millis(300))
        .await
        .is_err());
    // A retry stores no second copy.
    let again = business
        .broadcast_with_id(77, 1, MessageKind::Template, payload)
        .await
        .unwrap();
    assert!(again.duplicate && again.delivered == 2);
    assert!(c_yes
        .recv_timeout(Duration::from_millis(300))
        .await
        .is_err());
}

/// `courier admin business ...` drives the same requests from a shell.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_command_registers_verifies_and_reads_businesses() {
    let s = node();
    let dir = s.data_dir.display().to_string();
    let admin = s.admin.clone();
    let run = |args: &[&str]| -> (bool, Value, String) {
        let mut all = vec![
            "admin",
            "--admin-addr",
            &admin,
            "--data-dir",
            &dir,
            "business",
        ];
        all.extend_from_slice(args);
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_courier"))
            .args(&all)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        (
            out.status.success(),
            serde_json::from_str(&text).unwrap_or(Value::Null),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok, account, err) = run(&[
        "13001",
        "register",
        "--name",
        "Shop",
        "--profile",
        r#"{"about": "We ship"}"#,
    ]);
    assert!(ok, "{err}");
    assert_eq!(account["profile"]["about"], "We ship");
    let (ok, account, err) = run(&["13001", "verify", "--reason", "checked"]);
    assert!(ok, "{err}");
    assert_eq!(account["verified"], true);
    let file = s.data_dir.join("t.json");
    std::fs::write(
        &file,
        r#"{"category": "utility", "versions": [{"language": "en", "body": "Hi"}]}"#,
    )
    .unwrap();
    let (ok, t, err) = run(&["13001", "template", "hi", file.to_str().unwrap()]);
    assert!(ok, "{err}");
    assert_eq!(t["status"], "pending");
    let (ok, t, err) = run(&["13001", "template-status", "hi", "approved"]);
    assert!(ok, "{err}");
    assert_eq!(t["status"], "approved");
    let (ok, shown, _) = run(&["13001", "show"]);
    assert!(ok);
    assert_eq!(
        (shown["templates"].as_u64(), shown["tier"].as_u64()),
        (Some(1), Some(2000))
    );
    // A refusal is a failing command with the code in its output.
    let (ok, answer, _) = run(&["13001", "limits", "--tier", "9"]);
    assert!(!ok);
    assert_eq!(answer["code"], "tier_invalid");
    // The reports: events, statistics, engagement (nothing sent yet).
    let (ok, events, err) = run(&["13001", "events"]);
    assert!(ok, "{err}");
    assert_eq!(
        (
            events["last"].as_u64(),
            events["events"].as_array().map(Vec::len)
        ),
        (Some(0), Some(0))
    );
    let (ok, stats, err) = run(&["13001", "stats", "month"]);
    assert!(ok, "{err}");
    assert_eq!(stats["period"], "month");
    let (ok, e, err) = run(&["13001", "engagement"]);
    assert!(ok, "{err}");
    assert_eq!(e["heatmap"].as_array().map(Vec::len), Some(7));
    let (ok, answer, _) = run(&["13001", "stats", "week"]);
    assert!(!ok);
    assert_eq!(answer["code"], "period_invalid");
}

async fn account(s: &Server, b: u64) -> Value {
    let (status, v) = s
        .admin_json("GET", &format!("/admin/businesses/{b}"), Value::Null)
        .await;
    assert_eq!(status, 200, "{v}");
    v
}

/// Quality: a template nobody reads is paused on its own; a business whose
/// messages are read and that used half its tier moves up a tier after 6
/// hours; blocks and reports count against it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quality_pauses_an_unread_template_and_moves_a_good_business_up_a_tier() {
    let s = node();
    let (unread, good) = (14_001, 14_002);
    for b in [unread, good] {
        register(&s, b, "Shop").await;
        order_update(&s, b).await;
        let (status, _) = s
            .admin_json(
                "POST",
                &format!("/admin/businesses/{b}/limits"),
                json!({ "messages_per_sec": 1000 }),
            )
            .await;
        assert_eq!(status, 200);
    }
    // 100 template messages, none read a day later: rated low, the
    // template is paused (the message that found it so is sent; the next
    // is refused).
    let (business, _) = s.client(unread).await;
    for c in 20_000..20_102u64 {
        consent(&s, unread, c, "opt_in", "utility").await;
    }
    for (i, c) in (20_000..20_100u64).enumerate() {
        business
            .send_template(i as u64 + 1, c, &order("#1", "A"))
            .await
            .unwrap();
    }
    assert_eq!(
        account(&s, unread).await["quality"],
        "high",
        "not judged the same day"
    );
    s.advance_clock(DAY).await;
    business
        .send_template(500, 20_100, &order("#1", "A"))
        .await
        .unwrap();
    assert_eq!(
        refused(&business, 501, 20_101, &order("#1", "A")).await,
        ErrorCode::TEMPLATE_PAUSED
    );
    let a = account(&s, unread).await;
    assert_eq!(a["quality"], "low", "{a}");
    assert_eq!(a["last_7_days"]["template_messages"], 101, "{a}");
    let mut paused = None;
    while let Ok(m) = business.recv_timeout(Duration::from_millis(500)).await {
        let e: Value = serde_json::from_slice(&m.payload).unwrap();
        if e["status"] == "paused" {
            paused = Some(e);
        }
    }
    let paused = paused.expect("a paused event");
    assert!(
        paused["reason"]
            .as_str()
            .unwrap()
            .starts_with("quality low"),
        "{paused}"
    );

    // A good business: a fifth of its messages read, 125 conversations
    // (half of 250) started in a day; judged a day later, the next
    // conversation moves it up.
    let (business, _) = s.client(good).await;
    for c in 30_000..30_126u64 {
        consent(&s, good, c, "opt_in", "utility").await;
    }
    let mut id = 1;
    let mut readers = Vec::new();
    for c in 30_000..30_025u64 {
        business
            .send_template(id, c, &order("#1", "A"))
            .await
            .unwrap();
        id += 1;
        let (reader, _) = s.client(c).await;
        let m = reader.recv_timeout(WAIT).await.unwrap();
        reader.mark_read(m.seq).await.unwrap();
        readers.push(reader);
    }
    let deadline = tokio::time::Instant::now() + WAIT;
    while account(&s, good).await["last_7_days"]["read"] != 25 {
        assert!(tokio::time::Instant::now() < deadline, "25 reads counted");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for c in 30_025..30_125u64 {
        business
            .send_template(id, c, &order("#1", "A"))
            .await
            .unwrap();
        id += 1;
    }
    let a = account(&s, good).await;
    assert_eq!(a["tier"], 250, "{a}");
    s.advance_clock(DAY).await;
    business
        .send_template(id, 30_125, &order("#1", "A"))
        .await
        .unwrap();
    let a = account(&s, good).await;
    assert_eq!(
        (a["quality"].as_str(), a["tier"].as_u64()),
        (Some("medium"), Some(2000)),
        "a fifth read: medium, and moved up a tier: {a}"
    );

    // Blocks and reports: 3 of 126 customers block it: low.
    for (i, reader) in readers.iter().take(3).enumerate() {
        let op = if i == 0 {
            BusinessOp::Report
        } else {
            BusinessOp::Block
        };
        reader
            .business(op, good, Purpose::None, "", "spam")
            .await
            .unwrap();
    }
    let a = account(&s, good).await;
    assert_eq!(
        (
            a["last_7_days"]["blocks"].as_u64(),
            a["last_7_days"]["reports"].as_u64()
        ),
        (Some(2), Some(1))
    );
    assert_eq!(a["quality"], "low", "{a}");
}

/// The marketing cap: two marketing templates a day per customer, from all
/// businesses together; utility templates are not counted; a retry of a
/// counted one is its duplicate; a day later there is room again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn marketing_templates_are_capped_per_customer_across_businesses() {
    let s = node();
    let (a, b, customer) = (15_001, 15_002, 15_003);
    for shop in [a, b] {
        register(&s, shop, "Shop").await;
        promo(&s, shop).await;
        order_update(&s, shop).await;
        consent(&s, shop, customer, "opt_in", "marketing").await;
        consent(&s, shop, customer, "opt_in", "utility").await;
    }
    let (shop_a, _) = s.client(a).await;
    let (shop_b, _) = s.client(b).await;
    shop_a
        .send_template(1, customer, &promo_send())
        .await
        .unwrap();
    shop_b
        .send_template(1, customer, &promo_send())
        .await
        .unwrap();
    match shop_a.send_template(2, customer, &promo_send()).await {
        Err(courier_client::ClientError::Rejected(code, message)) => {
            assert_eq!(code, ErrorCode::MARKETING_CAP_REACHED);
            let hint = courier_protocol::error::retry_after_ms(&message).expect("a hint");
            assert!(hint > DAY - 60_000 && hint <= DAY, "{message}");
        }
        other => panic!("the third marketing message of the day: {other:?}"),
    }
    // Utility is not marketing; a retry of a counted message is its duplicate.
    shop_a
        .send_template(3, customer, &order("#1", "Ana"))
        .await
        .unwrap();
    let again = shop_b
        .send_template(1, customer, &promo_send())
        .await
        .unwrap();
    assert!(again.duplicate);
    // Only businesses send templates to users.
    let (user, _) = s.client(15_004).await;
    let forged = user
        .send(
            Destination::User(customer),
            MessageKind::Template,
            promo_send().encode(),
        )
        .await;
    assert_eq!(rejected(forged), ErrorCode::KIND_NOT_ALLOWED);
    s.advance_clock(DAY).await;
    shop_a
        .send_template(4, customer, &promo_send())
        .await
        .unwrap();
}

/// Template packs: a customer's client fetches a business's approved
/// templates, keeps them 31 days, and after a failed fetch waits 5 minutes
/// before asking again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_fetch_template_packs_keep_them_31_days_and_retry_failures_after_5_minutes() {
    let s = node();
    let (b, customer, later) = (16_001, 16_002, 16_003);
    register(&s, b, "Shop").await;
    order_update(&s, b).await;
    template(
        &s,
        b,
        "draft",
        json!({ "category": "utility", "versions": [{ "language": "en", "body": "x" }] }),
    )
    .await;
    let (c, _) = s.client(customer).await;
    // The client's wall clock, as the server's (the test clock is not moved).
    let t0 = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let pack = c.template_pack_at(b, t0).await.unwrap();
    let list: Value = serde_json::from_str(&pack.json).unwrap();
    let names: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["order_update"], "approved ones only");
    assert_eq!(list[0]["versions"][1]["language"], "pt_BR");
    let valid = pack.valid_until_ms;
    // Kept: no second request while the pack is valid.
    c.template_pack_at(b, t0 + 1000).await.unwrap();
    assert_eq!(c.template_pack_fetches(), 1);
    let server_now = valid - 31 * DAY;
    c.template_pack_at(b, valid - 1).await.unwrap();
    assert_eq!(
        c.template_pack_fetches(),
        1,
        "kept until {valid} (server time {server_now})"
    );
    c.template_pack_at(b, valid).await.unwrap();
    assert_eq!(c.template_pack_fetches(), 2, "fetched again once expired");

    // A failed fetch (not a business yet) is not asked again for 5 minutes.
    assert_eq!(
        rejected(c.template_pack_at(later, t0).await),
        ErrorCode::NOT_A_BUSINESS
    );
    register(&s, later, "Later").await;
    assert_eq!(
        rejected(c.template_pack_at(later, t0 + 299_999).await),
        ErrorCode::NOT_A_BUSINESS
    );
    assert_eq!(c.template_pack_fetches(), 3);
    let pack = c.template_pack_at(later, t0 + 300_000).await.unwrap();
    assert_eq!(pack.json, "[]");
    assert_eq!(c.template_pack_fetches(), 4);
}

/// The changes of `events` for message `id`, in order.
fn changes_of(events: &[Value], id: u64) -> Vec<String> {
    events
        .iter()
        .filter(|e| e["message"] == id)
        .map(|e| e["change"].as_str().unwrap().to_owned())
        .collect()
}

/// Waits (bounded) until message `id` of business `b` has `status` for
/// `customer`.
async fn wait_status(s: &Server, b: u64, id: u64, customer: u64, status: &str) -> Value {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (code, v) = s
            .admin_json(
                "GET",
                &format!("/admin/businesses/{b}/messages/{id}/{customer}"),
                Value::Null,
            )
            .await;
        if code == 200 && v["status"] == status {
            return v;
        }
        assert!(tokio::time::Instant::now() < deadline, "{code} {v}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Each business message moves accepted, sent, delivered, read (and
/// converted when the business says so), told as events with the
/// business's own gap-free sequence: over the admin API, and to a signed
/// webhook that fails, times out and recovers, at least once and with no
/// status going back. Refused sends are no messages. Events survive a
/// SIGKILL and the webhook goes on after it; events the webhook has not
/// taken in 7 days are dropped and counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn message_statuses_reach_the_business_as_events_and_signed_webhooks() {
    let mut s = Server::start(&[
        ("COURIER_TEST_CLOCK", "true"),
        ("COURIER_BUSINESS_WEBHOOK_TIMEOUT_MS", "300"),
        ("COURIER_BUSINESS_WEBHOOK_RETRY_MS", "50"),
        ("COURIER_BUSINESS_WEBHOOK_RETRY_MAX_MS", "200"),
    ]);
    let (b, customer, stranger) = (9001, 9002, 9003);
    register(&s, b, "Shop").await;
    notice(&s, b).await;
    consent(&s, b, customer, "opt_in", "utility").await;
    let (hook, url) = Hook::start(true).await;
    let secret = "whsec_a-long-enough-secret";
    let path = format!("/admin/businesses/{b}/webhook");
    for (body, code) in [
        (
            json!({ "url": "https://shop.test/h", "secret": secret }),
            "webhook_url_invalid",
        ),
        (
            json!({ "url": url, "secret": "short" }),
            "webhook_secret_invalid",
        ),
    ] {
        let (status, answer) = s.admin_json("PUT", &path, body).await;
        assert_eq!(
            (status, answer["code"].as_str()),
            (400, Some(code)),
            "{answer}"
        );
    }
    let (status, answer) = s
        .admin_json("PUT", &path, json!({ "url": url, "secret": secret }))
        .await;
    assert_eq!(status, 200, "{answer}");
    assert!(answer.get("secret").is_none(), "the secret is not shown");

    let (business, _) = s.client(b).await;
    let (client, _) = s.client(customer).await;
    business
        .send_template(1, customer, &notice_send())
        .await
        .unwrap();
    assert_eq!(
        refused(&business, 2, stranger, &notice_send()).await,
        ErrorCode::NO_CONSENT
    );
    let (m, _) = received_template(&client).await;
    wait_status(&s, b, 1, customer, "sent").await;
    client.ack(m.seq).await.unwrap();
    wait_status(&s, b, 1, customer, "delivered").await;
    client.mark_read(m.seq).await.unwrap();
    wait_status(&s, b, 1, customer, "read").await;
    let (status, converted) = s
        .admin_json(
            "POST",
            &format!("/admin/businesses/{b}/messages/1/{customer}/converted"),
            Value::Null,
        )
        .await;
    assert_eq!(status, 200, "{converted}");
    assert_eq!(
        (
            converted["converted"].as_bool(),
            converted["customer"].as_u64()
        ),
        (Some(true), Some(customer))
    );
    let (status, none) = s
        .admin_json(
            "GET",
            &format!("/admin/businesses/{b}/messages/2"),
            Value::Null,
        )
        .await;
    assert_eq!(
        (status, none["code"].as_str()),
        (404, Some("no_such_message")),
        "a refused send is no message"
    );

    let (status, events) = s
        .admin_json("GET", &format!("/admin/businesses/{b}/events"), Value::Null)
        .await;
    assert_eq!(status, 200, "{events}");
    let events = events["events"].as_array().unwrap().clone();
    assert_eq!(
        changes_of(&events, 1),
        ["accepted", "sent", "delivered", "read", "converted"]
    );
    let seqs: Vec<u64> = events.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, [1, 2, 3, 4, 5]);
    // A retry is the same message: answered as a duplicate, told nothing new.
    let again = business
        .send_template(1, customer, &notice_send())
        .await
        .unwrap();
    assert!(again.duplicate);
    let (_, after_retry) = s
        .admin_json("GET", &format!("/admin/businesses/{b}/events"), Value::Null)
        .await;
    assert_eq!(after_retry["last"], 5, "{after_retry}");
    assert_eq!(events[0]["id"], format!("{b}-1"));
    assert_eq!(events[0]["template"], "notice");
    assert_eq!(events[0]["customer"], customer);
    let (status, page) = s
        .admin_json(
            "GET",
            &format!("/admin/businesses/{b}/events/3/1"),
            Value::Null,
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(page["events"][0]["seq"], 4, "after 3, one");
    // The same stream over the protocol, resumable after a sequence.
    let (last, json) = business.events(0, 100).await.unwrap();
    assert_eq!(last, 5);
    assert_eq!(
        serde_json::from_str::<Value>(&json).unwrap(),
        Value::from(events.clone())
    );
    let (_, rest) = business.events(3, 100).await.unwrap();
    let rest: Vec<Value> = serde_json::from_str(&rest).unwrap();
    assert_eq!(rest[..], events[3..], "resumed after 3");
    assert_eq!(
        rejected(business.events(0, 0).await),
        ErrorCode::INVALID_REQUEST
    );
    assert_eq!(
        rejected(client.events(0, 10).await),
        ErrorCode::NOT_A_BUSINESS,
        "a customer has no events"
    );
    let (status, bad) = s
        .admin_json(
            "GET",
            &format!("/admin/businesses/{b}/events/x"),
            Value::Null,
        )
        .await;
    assert_eq!((status, bad["code"].as_str()), (400, Some("range_invalid")));

    // The webhook: a 500, a timeout, then every event, in order per message.
    let taken = hook.wait_taken(secret, 5).await;
    assert!(
        hook.requests.lock().unwrap().len() >= 3,
        "retried after a 500 and a timeout"
    );
    let mut firsts: Vec<Value> = Vec::new();
    for e in &taken {
        if !firsts.iter().any(|f| f["id"] == e["id"]) {
            firsts.push(e.clone());
        }
    }
    assert_eq!(
        firsts, events,
        "each event once, as the API tells it, in order"
    );

    // After a SIGKILL: the events are still there and the webhook goes on.
    drop((business, client));
    s.kill();
    s.restart();
    let (business, _) = s.client(b).await;
    let (client, _) = s.client(customer).await;
    business
        .send_template(3, customer, &notice_send())
        .await
        .unwrap();
    received_template(&client).await;
    let taken = hook.wait_taken(secret, 7).await;
    assert_eq!(changes_of(&taken, 3)[..2], ["accepted", "sent"]);
    let (_, after) = s
        .admin_json("GET", &format!("/admin/businesses/{b}/events"), Value::Null)
        .await;
    assert_eq!(after["events"].as_array().unwrap()[..5], events[..]);

    // An endpoint that fails for 7 days loses those events, counted.
    hook.failing
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let failed_before = hook.requests.lock().unwrap().len();
    business
        .send_template(4, customer, &notice_send())
        .await
        .unwrap();
    wait_status(&s, b, 4, customer, "sent").await;
    let deadline = tokio::time::Instant::now() + WAIT;
    while hook.requests.lock().unwrap().len() == failed_before {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no request while failing"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    s.advance_clock(7 * DAY + 1000).await;
    s.wait_for_metric("courier_webhook_events_total{outcome=\"dropped\"}", 2)
        .await;
    hook.failing
        .store(false, std::sync::atomic::Ordering::SeqCst);
    let (m, _) = received_template(&client).await;
    client.mark_read(m.seq).await.unwrap();
    wait_status(&s, b, 4, customer, "read").await;
    let taken = hook
        .wait_until(secret, |t| changes_of(t, 4).iter().any(|c| c == "read"))
        .await;
    assert_eq!(
        changes_of(&taken, 4),
        ["delivered", "read"],
        "the dropped events never came, the later ones did"
    );

    // Events are kept 30 days (business.events_kept_ms), then deleted once
    // the webhook took them or gave up; the sequence goes on.
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (_, w) = s.admin_json("GET", &path, Value::Null).await;
        if w["delivered_up_to"] == w["last_event"] {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{w}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop((business, client));
    s.kill();
    s.restart();
    // (A restarted node's clock starts unmoved: the events are 7 days on.)
    s.advance_clock(38 * DAY).await;
    let events_path = format!("/admin/businesses/{b}/events");
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (status, v) = s.admin_json("GET", &events_path, Value::Null).await;
        assert_eq!(status, 200, "{v}");
        if v["events"].as_array().unwrap().is_empty() {
            assert!(v["last"].as_u64().unwrap() >= 11, "{v}");
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "still kept: {v}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Statistics are counted as the statuses move, per UTC half hour, day
/// and month of sending, for the business and per template and language;
/// a figure that describes fewer than 5 customers shows "< 5", and a
/// rate only when both its figures show.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statistics_count_each_status_and_hide_figures_of_fewer_than_five_customers() {
    let s = node();
    let b = 9101;
    let customers: Vec<u64> = (9102..=9107).collect();
    register(&s, b, "Shop").await;
    notice(&s, b).await;
    let (business, _) = s.client(b).await;
    let mut clients = Vec::new();
    for (i, &c) in customers.iter().enumerate() {
        consent(&s, b, c, "opt_in", "utility").await;
        let (client, _) = s.client(c).await;
        business
            .send_template(i as u64 + 1, c, &notice_send())
            .await
            .unwrap();
        let (m, _) = received_template(&client).await;
        clients.push((client, m.seq));
    }
    let stats = |period: &'static str| {
        let s = &s;
        async move {
            let (status, v) = s
                .admin_json(
                    "GET",
                    &format!("/admin/businesses/{b}/stats/{period}"),
                    Value::Null,
                )
                .await;
            assert_eq!(status, 200, "{v}");
            v["rows"].as_array().unwrap().clone()
        }
    };
    // Four of six read: four customers are fewer than five.
    for (i, (client, seq)) in clients.iter().take(4).enumerate() {
        client.mark_read(*seq).await.unwrap();
        wait_status(&s, b, i as u64 + 1, customers[i], "read").await;
    }
    for i in 5..=6 {
        wait_status(&s, b, i, customers[i as usize - 1], "sent").await;
    }
    let day = stats("day").await;
    assert_eq!(
        day.len(),
        2,
        "the business's totals and its template's: {day:?}"
    );
    let total = day.iter().find(|r| r["template"] == "").unwrap();
    let template = day.iter().find(|r| r["template"] == "notice").unwrap();
    assert_eq!(template["language"], "en_US");
    for row in [total, template] {
        assert_eq!(row["sent"], 6, "{row}");
        assert_eq!(row["read"], "< 5", "{row}");
        assert_eq!(row["delivered"], "< 5", "{row}");
        assert_eq!(row["read_rate"], Value::Null, "{row}");
        assert_eq!(row["delivery_rate"], Value::Null, "{row}");
    }
    // The fifth reader: now they show, with their rates.
    let (client, seq) = &clients[4];
    client.mark_read(*seq).await.unwrap();
    wait_status(&s, b, 5, customers[4], "read").await;
    for i in 1..=5 {
        let path = format!(
            "/admin/businesses/{b}/messages/{i}/{}/converted",
            customers[i as usize - 1]
        );
        let (status, _) = s.admin_json("POST", &path, Value::Null).await;
        assert_eq!(status, 200);
    }
    for period in ["half_hour", "day", "month"] {
        let rows = stats(period).await;
        let total = rows.iter().find(|r| r["template"] == "").unwrap();
        let expected = json!({
            "accepted": 6, "sent": 6, "delivered": 5, "read": 5, "converted": 5,
            "failed": {},
            "delivery_rate": 0.8333, "read_rate": 1.0, "conversion_rate": 0.8333,
        });
        for (k, v) in expected.as_object().unwrap() {
            assert_eq!(&total[k], v, "{period} {k}: {total}");
        }
        let start = total["start_ms"].as_u64().unwrap();
        let step = match period {
            "half_hour" => 1_800_000,
            "day" => DAY,
            _ => 1,
        };
        assert_eq!(start % step, 0, "{period} starts on its boundary");
    }
    let (status, bad) = s
        .admin_json(
            "GET",
            &format!("/admin/businesses/{b}/stats/week"),
            Value::Null,
        )
        .await;
    assert_eq!(
        (status, bad["code"].as_str()),
        (400, Some("period_invalid"))
    );

    // Platform-wide, without business labels.
    assert_eq!(
        s.metric("courier_business_message_changes_total{change=\"read\"}")
            .await,
        5
    );
    assert_eq!(
        s.metric("courier_business_message_changes_total{change=\"sent\"}")
            .await,
        6
    );

    // The same rows as CSV.
    let (status, csv) = s
        .admin_request(&format!("/admin/businesses/{b}/stats/day.csv"))
        .await;
    assert_eq!(status, 200, "{csv}");
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(
        lines[0],
        "start_ms,template,language,campaign,variant,accepted,sent,delivered,read,clicked,converted,failed,delivery_rate,read_rate,click_through_rate,conversion_rate"
    );
    let total_line = lines
        .iter()
        .find(|l| l.split(',').nth(1) == Some(""))
        .unwrap();
    let cells: Vec<&str> = total_line.split(',').collect();
    assert_eq!(&cells[3..5], ["", ""], "no campaign, no variant");
    assert_eq!(
        &cells[5..],
        ["6", "6", "5", "5", "< 5", "5", "", "0.8333", "1.0", "", "0.8333"]
    );

    // An erased customer leaves the figures' future: their read, stored
    // in the business's inbox after the erasure, counts nowhere.
    let last = customers[5];
    erase(&s, b, last).await;
    let (client, seq) = &clients[5];
    client.mark_read(*seq).await.unwrap();
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let inbox = business.fetch(0, 1000).await.unwrap().messages;
        if inbox
            .iter()
            .any(|m| m.sender == last && m.kind == MessageKind::Receipt)
        {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no receipt from {last}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let total = stats("day")
        .await
        .into_iter()
        .find(|r| r["template"] == "")
        .unwrap();
    assert_eq!(
        (total["read"].as_u64(), total["delivered"].as_u64()),
        (Some(5), Some(5))
    );
    let (status, _) = s
        .admin_json(
            "GET",
            &format!("/admin/businesses/{b}/messages/6"),
            Value::Null,
        )
        .await;
    assert_eq!(status, 404, "the erased customer's message status is gone");
}

/// One GET on the node's HTTP port, redirects not followed: the status
/// and the `location` header.
async fn get_raw(addr: &str, path: &str) -> (u16, Option<String>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut sock = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    sock.write_all(request.as_bytes()).await.unwrap();
    let mut answer = String::new();
    sock.read_to_string(&mut answer).await.unwrap();
    let status = answer.split(' ').nth(1).unwrap().parse().unwrap();
    let location = answer
        .lines()
        .find_map(|l| l.strip_prefix("location: "))
        .map(|l| l.trim().to_owned());
    (status, location)
}

/// With `business.click_base_url` set, a template's URL button goes
/// through a tracked link: opening it redirects to the button's own URL
/// and counts `clicked` once (which implies read), told as an event and
/// in the statistics; a forged link is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tracked_links_count_a_click_and_redirect() {
    let s = Server::start(&[
        ("COURIER_TEST_CLOCK", "true"),
        ("COURIER_BUSINESS_CLICK_BASE_URL", "http://links.test/"),
    ]);
    let (b, customer) = (9201, 9202);
    register(&s, b, "Shop").await;
    order_update(&s, b).await;
    consent(&s, b, customer, "opt_in", "utility").await;
    let (business, _) = s.client(b).await;
    let (client, _) = s.client(customer).await;
    let send = TemplateSend {
        language: "en_US".into(),
        ..order("#7", "Ana")
    };
    business.send_template(1, customer, &send).await.unwrap();
    let (_, t) = received_template(&client).await;
    let link = t.buttons[0].value.clone();
    let path = link
        .strip_prefix("http://links.test")
        .unwrap_or_else(|| panic!("a tracked link: {link}"));
    assert!(path.starts_with("/c/"), "{link}");
    wait_status(&s, b, 1, customer, "sent").await;
    for _ in 0..2 {
        assert_eq!(
            get_raw(&s.admin, path).await,
            (302, Some("https://shop.test/t/#7".to_owned()))
        );
    }
    let row = wait_status(&s, b, 1, customer, "read").await;
    assert_eq!(row["clicked"], true, "{row}");
    let (_, events) = s
        .admin_json("GET", &format!("/admin/businesses/{b}/events"), Value::Null)
        .await;
    assert_eq!(
        changes_of(events["events"].as_array().unwrap(), 1),
        ["accepted", "sent", "delivered", "read", "clicked"],
        "a click implies read, and counts once"
    );
    // A character in the middle (the message's id): decodes, fails the tag.
    let mut forged: Vec<char> = path.chars().collect();
    forged[12] = if forged[12] == 'A' { 'B' } else { 'A' };
    let forged: String = forged.into_iter().collect();
    assert_eq!(get_raw(&s.admin, &forged).await.0, 404);
    assert_eq!(get_raw(&s.admin, "/c/").await.0, 404);
}

/// Engagement from a synthetic history, checked against figures computed
/// here from the times the node stamped: when customers write (weekday x
/// hour in the business's time zone), how long they wait for the first
/// answer (median and p90 by the documented buckets), and the read rate
/// by the hour messages were sent, with the best hour.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn engagement_figures_match_a_history_computed_independently() {
    const BOUNDS: [u64; 16] = [
        1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 14400, 86400,
    ];
    let offset: i64 = 120;
    // Weekday (0 Monday) and hour at +02:00.
    let slot = |ms: u64| {
        let local = ms as i64 + offset * 60_000;
        let day = local.div_euclid(DAY as i64);
        (
            (day + 3).rem_euclid(7) as usize,
            (local.rem_euclid(DAY as i64) / 3_600_000) as usize,
        )
    };
    let bucket = |ms: u64| {
        let s = ms.div_ceil(1000);
        BOUNDS.iter().copied().find(|&b| s <= b).unwrap_or(u64::MAX)
    };
    let s = node();
    let b = 9301;
    register(&s, b, "Shop").await;
    let (status, v) = s
        .admin_json(
            "PUT",
            &format!("/admin/businesses/{b}/time_zone"),
            json!({ "utc_offset_minutes": offset }),
        )
        .await;
    assert_eq!(
        (status, v["utc_offset_minutes"].as_i64()),
        (200, Some(offset)),
        "{v}"
    );
    let (business, _) = s.client(b).await;
    let delays_s = [3u64, 8, 40, 100, 250, 1000];
    // The first five conversations are labelled "returns".
    for c in 9302..9307u64 {
        let path = format!("/admin/businesses/{b}/labels/{c}");
        let (status, v) = s
            .admin_json("PUT", &path, json!({ "labels": ["returns"] }))
            .await;
        assert_eq!(status, 200, "{v}");
    }
    let (status, bad) = s
        .admin_json(
            "PUT",
            &format!("/admin/businesses/{b}/labels/9302"),
            json!({ "labels": ["Returns!"] }),
        )
        .await;
    assert_eq!(
        (status, bad["code"].as_str()),
        (400, Some("labels_invalid"))
    );
    let mut wrote = Vec::new();
    let mut waits = Vec::new();
    let mut sent = Vec::new();
    let mut clients = Vec::new();
    for (i, delay) in delays_s.iter().enumerate() {
        let c = 9302 + i as u64;
        let (client, _) = s.client(c).await;
        let asked = client
            .send(Destination::User(b), MessageKind::Chat, chat("hello?"))
            .await
            .unwrap();
        // A second message before the answer: the wait runs from the first.
        s.advance_clock(1000).await;
        client
            .send(Destination::User(b), MessageKind::Chat, chat("anyone?"))
            .await
            .unwrap();
        s.advance_clock(delay * 1000 - 1000).await;
        let answer = business
            .send(Destination::User(c), MessageKind::Chat, chat("here"))
            .await
            .unwrap();
        wrote.push((c, asked.timestamp_ms));
        wrote.push((c, asked.timestamp_ms + 1000));
        waits.push(bucket(answer.timestamp_ms - asked.timestamp_ms));
        sent.push(answer.timestamp_ms);
        let m = client.recv_timeout(WAIT).await.unwrap();
        clients.push((client, m.seq, c, answer.client_msg_id));
    }
    for (client, seq, c, id) in &clients {
        client.mark_read(*seq).await.unwrap();
        wait_status(&s, b, *id, *c, "read").await;
    }
    let (status, e) = s
        .admin_json(
            "GET",
            &format!("/admin/businesses/{b}/engagement"),
            Value::Null,
        )
        .await;
    assert_eq!(status, 200, "{e}");
    // Response times: median and p90 of the bucketed waits.
    let waits_in_order = waits.clone();
    waits.sort_unstable();
    let q = |p: f64| waits[((p * waits.len() as f64).ceil() as usize).max(1) - 1];
    assert_eq!(e["response"]["replies"], 6, "{e}");
    assert_eq!(e["response"]["median_s"], q(0.5), "{e}");
    assert_eq!(e["response"]["p90_s"], q(0.9), "{e}");
    // Per label: the five labelled conversations' messages and waits.
    let labelled = &e["labels"]["returns"];
    assert_eq!(labelled["messages"], 10, "{e}");
    assert_eq!(labelled["response"]["replies"], 5, "{e}");
    let mut five = waits_in_order[..5].to_vec();
    five.sort_unstable();
    assert_eq!(labelled["response"]["median_s"], five[2], "{e}");
    // The heatmap: each cell's customers, shown only from five.
    let mut cells: std::collections::BTreeMap<(usize, usize), Vec<u64>> = Default::default();
    for (c, at) in &wrote {
        cells.entry(slot(*at)).or_default().push(*c);
    }
    for d in 0..7 {
        for h in 0..24 {
            let who = cells.get(&(d, h)).cloned().unwrap_or_default();
            let mut distinct = who.clone();
            distinct.dedup();
            let expected = if distinct.len() >= 5 {
                json!(who.len())
            } else {
                json!("< 5")
            };
            assert_eq!(e["heatmap"][d][h], expected, "cell {d} {h}: {e}");
        }
    }
    // Read rate by the hour of sending, and the best hour.
    let mut by_hour: std::collections::BTreeMap<usize, usize> = Default::default();
    for at in &sent {
        *by_hour.entry(slot(*at).1).or_default() += 1;
    }
    let best = by_hour.iter().find(|(_, n)| **n >= 5).map(|(h, _)| *h);
    assert_eq!(e["best_hour"].as_u64().map(|h| h as usize), best, "{e}");
    if let Some(h) = best {
        assert_eq!(e["hours"][h]["read_rate"], 1.0, "{e}");
    }
    let (status, bad) = s
        .admin_json(
            "PUT",
            &format!("/admin/businesses/{b}/time_zone"),
            json!({ "utc_offset_minutes": 900 }),
        )
        .await;
    assert_eq!(
        (status, bad["code"].as_str()),
        (400, Some("time_zone_invalid"))
    );
}

/// The variant split as docs/BUSINESS.md gives it, written here from the
/// document: `splitmix64(seed XOR customer) mod` the weights' sum.
fn variant_of(seed: u64, customer: u64, weights: &[u64]) -> usize {
    let mut z = (seed ^ customer).wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    let mut r = z % weights.iter().sum::<u64>();
    for (i, &w) in weights.iter().enumerate() {
        if r < w {
            return i;
        }
        r -= w;
    }
    unreachable!()
}

/// Business `b`'s campaign `id` as the API reports it.
async fn campaign(s: &Server, b: u64, id: u64) -> Value {
    let (code, v) = s
        .admin_json(
            "GET",
            &format!("/admin/businesses/{b}/campaigns/{id}"),
            Value::Null,
        )
        .await;
    assert_eq!(code, 200, "{v}");
    v
}

async fn create_campaign(s: &Server, b: u64, body: Value) -> (u16, Value) {
    s.admin_json("POST", &format!("/admin/businesses/{b}/campaigns"), body)
        .await
}

/// Pauses, resumes or cancels campaign `id`.
async fn campaign_ctl(s: &Server, b: u64, id: u64, action: &str) -> (u16, Value) {
    s.admin_json(
        "POST",
        &format!("/admin/businesses/{b}/campaigns/{id}/{action}"),
        Value::Null,
    )
    .await
}

/// Polls campaign `id` (bounded) until `done` holds of it.
async fn campaign_until(s: &Server, b: u64, id: u64, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let v = campaign(s, b, id).await;
        if done(&v) {
            return v;
        }
        assert!(tokio::time::Instant::now() < deadline, "{v}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A figure as reports show it: the number, or "< 5".
fn shown(n: u64) -> Value {
    if n >= 5 {
        n.into()
    } else {
        "< 5".into()
    }
}

fn rate(num: u64, den: u64) -> Value {
    if num >= 5 && den >= 5 {
        ((num as f64 / den as f64 * 10_000.0).round() / 10_000.0).into()
    } else {
        Value::Null
    }
}

/// A campaign of two variants to 1,000 customers: 100 without consent,
/// some opted out while it is paused, 150 offline until it is over (100
/// of them read, 50 only receive), the rest never connect; the node is
/// SIGKILLed mid-campaign. Every customer is counted exactly once, under
/// the variant the documented split gives it: refused by reason, sent,
/// delivered, read, converted, with the rates; the statistics carry the
/// variants; the webhook gets every event, signed, with no status going
/// back; pause, resume and cancel obey their states.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_two_variant_campaign_counts_every_customer_once_across_a_sigkill() {
    let mut s = node();
    let b = 9301;
    let n = 1000u64;
    let customer = |i: u64| 880_000 + i;
    register(&s, b, "Shop").await;
    promo(&s, b).await;
    let def = json!({
        "category": "marketing",
        "versions": [{ "language": "en_US", "body": "Sale: {{1}} off", "examples": { "1": "10%" } }]
    });
    let (code, body) = template(&s, b, "promo_b", def).await;
    assert_eq!(code, 200, "{body}");
    set_status(&s, b, "promo_b", "approved").await;
    let (code, body) = s
        .admin_json(
            "POST",
            &format!("/admin/businesses/{b}/limits"),
            json!({ "tier": 4, "messages_per_sec": 100 }),
        )
        .await;
    assert_eq!(code, 200, "{body}");
    let (hook, url) = Hook::start(false).await;
    let secret = "a-campaign-secret-of-32-chars-ok";
    let (code, body) = s
        .admin_json(
            "PUT",
            &format!("/admin/businesses/{b}/webhook"),
            json!({ "url": url, "secret": secret }),
        )
        .await;
    assert_eq!(code, 200, "{body}");
    for i in (0..n).filter(|i| i % 10 != 0) {
        let (code, body) = consent(&s, b, customer(i), "opt_in", "marketing").await;
        assert_eq!(code, 200, "{body}");
    }

    // Bad bodies get their codes.
    let create = |body: Value| create_campaign(&s, b, body);
    let (code, bad) = create(json!({
        "name": "x", "variants": [{ "name": "a", "template": "nope" }],
        "segment": { "customers": [1] }
    }))
    .await;
    assert_eq!(
        (code, bad["code"].as_str()),
        (404, Some("no_such_template"))
    );
    let (code, bad) = create(json!({
        "name": "x", "variants": [{ "name": "a", "template": "promo" }],
        "segment": { "label": "nobody_has_it" }
    }))
    .await;
    assert_eq!((code, bad["code"].as_str()), (400, Some("segment_empty")));
    let (code, bad) = create(json!({ "name": "x" })).await;
    assert_eq!((code, bad["code"].as_str()), (400, Some("body_invalid")));

    // The campaign (customers given in reverse, one twice, the business
    // itself once: each customer is reached once, in id order), paused
    // at once.
    let mut segment: Vec<u64> = (0..n).rev().map(customer).collect();
    segment.push(customer(5));
    segment.push(b);
    let seed = 42;
    let (code, created) = create(json!({
        "name": "Winter sale",
        "seed": seed,
        "variants": [
            { "name": "plain", "template": "promo", "language": "en_US", "weight": 1 },
            { "name": "off20", "template": "promo_b", "language": "en_US", "params": ["20%"], "weight": 1 }
        ],
        "segment": { "customers": segment },
    }))
    .await;
    assert_eq!(code, 200, "{created}");
    let id = created["id"].as_u64().unwrap();
    assert_eq!(created["customers"], n);
    let (code, paused) = campaign_ctl(&s, b, id, "pause").await;
    assert_eq!(
        (code, paused["state"].as_str()),
        (200, Some("paused")),
        "{paused}"
    );
    let p = paused["processed"].as_u64().unwrap();
    assert!(p < n / 2, "paused before half: {paused}");
    // While paused nobody is admitted.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(campaign(&s, b, id).await["processed"], p);
    // Customers ending in 1 opt out now: those not reached yet are refused.
    for i in (0..n).filter(|i| i % 10 == 1) {
        consent(&s, b, customer(i), "opt_out", "marketing").await;
    }
    let (code, resumed) = campaign_ctl(&s, b, id, "resume").await;
    assert_eq!((code, resumed["state"].as_str()), (200, Some("running")));

    // SIGKILL mid-campaign, then it goes on from what was written.
    campaign_until(&s, b, id, |v| v["processed"].as_u64().unwrap() >= 600).await;
    s.kill();
    s.restart();
    let done = campaign_until(&s, b, id, |v| v["state"] == "done").await;
    assert_eq!(done["processed"], n, "{done}");
    assert_eq!(done["awaiting_outcome"], 0);
    let (code, again) = campaign_ctl(&s, b, id, "pause").await;
    assert_eq!(
        (code, again["code"].as_str()),
        (400, Some("campaign_finished"))
    );

    // Later, 150 customers come online: 100 read, 50 only receive.
    let variant = |i: u64| variant_of(seed, customer(i), &[1, 1]);
    let refused = |i: u64| i.is_multiple_of(10) || (i % 10 == 1 && i >= p);
    let reads = |i: u64| i < 500 && matches!(i % 10, 2 | 3);
    let receives = |i: u64| i < 500 && matches!(i % 10, 2..=4);
    let converts = |i: u64| reads(i) && i.is_multiple_of(3);
    for i in (0..n).filter(|&i| receives(i)) {
        let (c, _) = s.client(customer(i)).await;
        let (m, t) = received_template(&c).await;
        assert_eq!(
            t.name,
            ["promo", "promo_b"][variant(i)],
            "customer {i} got its variant"
        );
        c.ack(m.seq).await.unwrap();
        if reads(i) {
            c.mark_read(m.seq).await.unwrap();
        }
        assert!(
            c.recv_timeout(Duration::from_millis(20)).await.is_err(),
            "one message to customer {i}, whatever the crash"
        );
    }
    let expect_read: u64 = (0..n).filter(|&i| reads(i) && !refused(i)).count() as u64;
    campaign_until(&s, b, id, |v| {
        let read: u64 = v["variants"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x["read"].as_u64().unwrap_or(0))
            .sum();
        read == expect_read
    })
    .await;
    for i in (0..n).filter(|&i| converts(i) && !refused(i)) {
        let (code, body) = s
            .admin_json(
                "POST",
                &format!(
                    "/admin/businesses/{b}/campaigns/{id}/{}/converted",
                    customer(i)
                ),
                Value::Null,
            )
            .await;
        assert_eq!(code, 200, "{body}");
    }
    let report = campaign(&s, b, id).await;

    // Every figure, per variant, computed here from the rules above.
    for (v, row) in report["variants"].as_array().unwrap().iter().enumerate() {
        let mine: Vec<u64> = (0..n).filter(|&i| variant(i) == v).collect();
        let count = |f: &dyn Fn(u64) -> bool| mine.iter().filter(|&&i| f(i)).count() as u64;
        let no_consent = count(&|i| refused(i));
        let sent = mine.len() as u64 - no_consent;
        let delivered = count(&|i| receives(i) && !refused(i));
        let read = count(&|i| reads(i) && !refused(i));
        let converted = count(&|i| converts(i) && !refused(i));
        let name = ["plain", "off20"][v];
        let expected = json!({
            "name": name,
            "targeted": mine.len(),
            "refused": { "NO_CONSENT": shown(no_consent) },
            "accepted": shown(sent),
            "sent": shown(sent),
            "delivered": shown(delivered),
            "read": shown(read),
            "clicked": "< 5",
            "converted": shown(converted),
            "failed": {},
            "delivery_rate": rate(delivered, sent),
            "read_rate": rate(read, delivered),
            "conversion_rate": rate(converted, sent),
        });
        for (k, want) in expected.as_object().unwrap() {
            assert_eq!(&row[k], want, "variant {v} {k}: {row}");
        }
    }
    let targeted: u64 = report["variants"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["targeted"].as_u64().unwrap())
        .sum();
    assert_eq!(targeted, n, "each customer once");

    // The statistics carry each variant under the campaign.
    let (_, day) = s
        .admin_json(
            "GET",
            &format!("/admin/businesses/{b}/stats/day"),
            Value::Null,
        )
        .await;
    for (v, row) in report["variants"].as_array().unwrap().iter().enumerate() {
        let stat = day["rows"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["campaign"] == id && r["variant"] == ["plain", "off20"][v])
            .unwrap_or_else(|| panic!("variant {v} in {day}"));
        for k in ["sent", "delivered", "read", "converted"] {
            assert_eq!(stat[k], row[k], "{k}");
        }
    }

    // The webhook: every customer's events, signed, never going back.
    let message = report["message_id"]
        .as_str()
        .unwrap()
        .parse::<u64>()
        .unwrap();
    let expected_events: usize = (0..n)
        .filter(|&i| !refused(i))
        .map(|i| 2 + receives(i) as usize + reads(i) as usize + converts(i) as usize)
        .sum();
    let taken = hook
        .wait_until(secret, |t| {
            let ids: std::collections::HashSet<&str> =
                t.iter().map(|e| e["id"].as_str().unwrap()).collect();
            ids.len() >= expected_events
        })
        .await;
    let rank = |c: &str| {
        ["accepted", "sent", "delivered", "read", "converted"]
            .iter()
            .position(|x| *x == c)
            .unwrap_or_else(|| panic!("{c}"))
    };
    let mut seen: std::collections::HashMap<u64, Vec<usize>> = Default::default();
    let mut ids = std::collections::HashSet::new();
    for e in &taken {
        if !ids.insert(e["id"].as_str().unwrap().to_owned()) {
            continue;
        }
        assert_eq!(e["message"], message);
        seen.entry(e["customer"].as_u64().unwrap())
            .or_default()
            .push(rank(e["change"].as_str().unwrap()));
    }
    for i in 0..n {
        let got = seen.remove(&customer(i)).unwrap_or_default();
        let mut want = Vec::new();
        if !refused(i) {
            want = vec![0, 1];
            if receives(i) {
                want.push(2);
            }
            if reads(i) {
                want.push(3);
            }
            if converts(i) {
                want.push(4);
            }
        }
        assert_eq!(got, want, "customer {i}'s events in order");
    }

    // A second campaign, cancelled before its start, admits nobody.
    let (code, later) = create_campaign(
        &s,
        b,
        json!({
            "name": "Next year",
            "variants": [{ "name": "a", "template": "promo" }],
            "segment": { "customers": [customer(2)] },
            "schedule": { "local_time": "2099-01-01T09:00" },
        }),
    )
    .await;
    assert_eq!((code, later["state"].as_str()), (200, Some("scheduled")));
    let id2 = later["id"].as_u64().unwrap();
    assert_eq!(id2, id + 1);
    let (code, cancelled) = s
        .admin_json(
            "POST",
            &format!("/admin/businesses/{b}/campaigns/{id2}/cancel"),
            Value::Null,
        )
        .await;
    assert_eq!(
        (code, cancelled["state"].as_str()),
        (200, Some("cancelled"))
    );
    assert_eq!(cancelled["processed"], 0);
    let (_, list) = s
        .admin_json(
            "GET",
            &format!("/admin/businesses/{b}/campaigns"),
            Value::Null,
        )
        .await;
    assert_eq!(list["campaigns"].as_array().unwrap().len(), 2);
}

/// Each customer's own best hour, from its own reads: a
/// `customer_best_hour` campaign reaches each customer at the next start
/// of the local hour its messages were read at the best rate, and those
/// who read nothing yet at the segment's best hour; a `best_hour`
/// campaign starts at the best hour of its segment's customers, though
/// the business's own figures are too few to show one. The hours are
/// computed here from the history the test made.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_campaign_reaches_each_customer_at_its_own_best_hour() {
    let s = node();
    let b = 9501;
    // Customers a and b read, c never does, d has no history.
    let (ca, cb, cc, cd) = (9502u64, 9503u64, 9504u64, 9505u64);
    s.utility_business(b, &[("notice", "Notice")], &[ca, cb, cc, cd])
        .await;
    // The business is at +05:30: hours are local.
    let offset: u64 = 330 * 60_000;
    let (code, v) = s
        .admin_json(
            "PUT",
            &format!("/admin/businesses/{b}/time_zone"),
            json!({ "utc_offset_minutes": 330 }),
        )
        .await;
    assert_eq!(code, 200, "{v}");
    let hour_of = |ms: u64| ((ms + offset) / HOUR % 24) as usize;
    // The node's clock runs on from where the test moves it: the history
    // starts a minute into a local hour, so each step stays inside its hour.
    let (stranger, _) = s.client(9598).await;
    let clock = stranger
        .send(Destination::User(9599), MessageKind::Chat, chat("time?"))
        .await
        .unwrap()
        .timestamp_ms;
    let local = clock + offset;
    s.advance_clock(HOUR - local % HOUR + 60_000).await;
    let (business, _) = s.client(b).await;
    let mut clients = std::collections::HashMap::new();
    for c in [ca, cb, cc, cd] {
        clients.insert(c, s.client(c).await.0);
    }
    let mut next_id = 1u64;
    // Sends `notice` to `c`; it reads it if `read`. The send's time.
    let mut history = async |c: u64, read: bool| -> u64 {
        let id = next_id;
        next_id += 1;
        let ack = business.send_template(id, c, &notice_send()).await.unwrap();
        let (m, _) = received_template(&clients[&c]).await;
        clients[&c].ack(m.seq).await.unwrap();
        if read {
            clients[&c].mark_read(m.seq).await.unwrap();
            wait_status(&s, b, id, c, "read").await;
        } else {
            wait_status(&s, b, id, c, "delivered").await;
        }
        ack.timestamp_ms
    };
    // Hour h0: a reads, c does not. Three hours on: b reads, a and c do not.
    let t0 = history(ca, true).await;
    history(cc, false).await;
    s.advance_clock(3 * HOUR).await;
    let t3 = history(cb, true).await;
    history(ca, false).await;
    history(cc, false).await;
    let (h_a, h_b) = (hour_of(t0), hour_of(t3));
    assert_eq!(h_b, (h_a + 3) % 24);
    // The segment's best hour: h_a (a read 1 of 1) over h_b (1 of 3).
    // The business's own engagement shows none: fewer than 5 customers.
    let (_, e) = s
        .admin_json(
            "GET",
            &format!("/admin/businesses/{b}/engagement"),
            Value::Null,
        )
        .await;
    assert_eq!(e["best_hour"], Value::Null, "{e}");
    // The totals' statistics: a row for each half hour sent in, and a day's
    // rows made of them, one per day whatever half hours it holds.
    let starts = async |period: &str| -> Vec<u64> {
        let (code, v) = s
            .admin_json(
                "GET",
                &format!("/admin/businesses/{b}/stats/{period}"),
                Value::Null,
            )
            .await;
        assert_eq!(code, 200, "{v}");
        let rows = v["rows"].as_array().unwrap().iter();
        rows.filter(|r| r["template"] == "")
            .map(|r| r["start_ms"].as_u64().unwrap())
            .collect()
    };
    let half = HOUR / 2;
    assert_eq!(starts("half_hour").await, [t0 - t0 % half, t3 - t3 % half]);
    let mut days = vec![t0 - t0 % DAY, t3 - t3 % DAY];
    days.dedup();
    assert_eq!(starts("day").await, days);

    // Twenty hours on: an hour before h_a comes again.
    s.advance_clock(20 * HOUR).await;
    let now = t3 + 20 * HOUR;
    assert_eq!(hour_of(now), (h_a + 23) % 24);
    // The next start of local hour h after `now`.
    let next_start = |h: usize| {
        let local = now + offset;
        let mut at = local - local % DAY + h as u64 * HOUR;
        if at + HOUR <= local {
            at += DAY;
        }
        at.max(local) - offset
    };
    let (at_a, at_b) = (next_start(h_a), next_start(h_b));
    assert!(now < at_a && at_a < at_b, "{now} {at_a} {at_b}");
    let (code, created) = create_campaign(
        &s,
        b,
        json!({
            "name": "Own hours",
            "variants": [{ "name": "only", "template": "notice" }],
            "segment": { "customers": [cd, cc, cb, ca] },
            "schedule": "customer_best_hour",
        }),
    )
    .await;
    assert_eq!(code, 200, "{created}");
    let id = created["id"].as_u64().unwrap();
    assert_eq!(created["state"], "scheduled", "{created}");
    assert_eq!(created["start_ms"], at_a, "{created}");
    assert_eq!(
        created["waves"],
        json!([
            { "hour": h_a, "start_ms": at_a, "customers": "< 5" },
            { "hour": h_b, "start_ms": at_b, "customers": "< 5" },
        ]),
        "{created}"
    );
    // A best_hour campaign to b and c: their sums make h_b the best
    // (b read 1 of 1 there; c read nothing).
    let (code, by_segment) = create_campaign(
        &s,
        b,
        json!({
            "name": "Segment hour",
            "variants": [{ "name": "only", "template": "notice" }],
            "segment": { "customers": [cb, cc] },
            "schedule": "best_hour",
        }),
    )
    .await;
    assert_eq!(code, 200, "{by_segment}");
    assert_eq!(by_segment["start_ms"], at_b, "{by_segment}");
    let second = by_segment["id"].as_u64().unwrap();
    let (code, _) = campaign_ctl(&s, b, second, "cancel").await;
    assert_eq!(code, 200);

    // Before h_a nobody is reached.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(campaign(&s, b, id).await["processed"], 0);
    // At h_a: a, c (no read: the segment's hour) and d (no history).
    s.advance_clock(at_a - now).await;
    let v = campaign_until(&s, b, id, |v| {
        v["processed"] == 3 && v["awaiting_outcome"] == 0
    })
    .await;
    assert_eq!(v["state"], "running", "{v}");
    for c in [ca, cc, cd] {
        let (m, t) = received_template(&clients[&c]).await;
        assert_eq!(t.name, "notice");
        assert_eq!(hour_of(m.timestamp_ms), h_a, "customer {c} at its hour");
        assert!(m.timestamp_ms >= at_a, "customer {c} not before its hour");
    }
    assert!(
        clients[&cb]
            .recv_timeout(Duration::from_millis(300))
            .await
            .is_err(),
        "b's hour has not come"
    );
    // At h_b: b, and the campaign is done.
    s.advance_clock(at_b - at_a).await;
    let v = campaign_until(&s, b, id, |v| v["state"] == "done").await;
    assert_eq!(v["processed"], 4, "{v}");
    let (m, _) = received_template(&clients[&cb]).await;
    assert_eq!(hour_of(m.timestamp_ms), h_b);
    assert!(m.timestamp_ms >= at_b);
}
