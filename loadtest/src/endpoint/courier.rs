//! The Courier endpoint (also the relay's, which speaks the protocol):
//! sends by destination, and the groups and lists a scenario needs.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use courier_client::{Client, ClientError};
use courier_protocol::{Destination, MessageKind};

use crate::plan::{template_payload, Dest, Plan, Routes, LIST_ID, TEMPLATE};

pub(crate) fn client_error(e: ClientError) -> String {
    match e {
        ClientError::Rejected(code, _) => format!("{code:?}"),
        ClientError::Closed(_) => "closed".into(),
        ClientError::Timeout => "timeout".into(),
        _ => "io".into(),
    }
}

/// Queues a send on a Courier client; the future is its acknowledgement.
pub(crate) fn courier_send(
    c: &Arc<Client>,
    id: u64,
    dest: Dest,
    routes: &Routes,
    body: Bytes,
) -> Result<impl std::future::Future<Output = Result<(), ClientError>> + Send + 'static, ClientError>
{
    let (kind, body) = match routes.template {
        true => (MessageKind::Template, template_payload(&body)),
        false => (MessageKind::Chat, body),
    };
    let ack: std::pin::Pin<Box<dyn std::future::Future<Output = _> + Send>> =
        match routes.destination(dest) {
            Destination::List(list) => {
                let ack = c.start_broadcast(id, list, kind, body)?;
                Box::pin(async move { ack.await.map(|_| ()) })
            }
            d => {
                let ack = c.start_send(id, d, kind, body)?;
                Box::pin(async move { ack.await.map(|_| ()) })
            }
        };
    Ok(ack)
}

/// Registers each list's business over the admin port `admin`, with an
/// approved utility template [`TEMPLATE`] whose body is its one parameter
/// and 1,000 messages a second, and records the consenting customers'
/// opt-ins (source `api_import`).
pub(crate) async fn set_up_businesses(
    admin: &str,
    key: &courier_protocol::token::TokenKey,
    plan: &Plan,
) -> anyhow::Result<()> {
    let token = admin_token(key);
    for (business, _, consenting) in &plan.lists {
        let at = |rest: &str| format!("/admin/businesses/{business}{rest}");
        let template = serde_json::json!({
            "category": "utility",
            "versions": [{ "language": "en_US", "body": "{{1}}", "examples": { "1": "stamp" } }]
        });
        let steps = [
            (
                "PUT",
                at(""),
                serde_json::json!({ "display_name": format!("Load {business}") }),
            ),
            (
                "POST",
                at("/limits"),
                serde_json::json!({ "messages_per_sec": 1000 }),
            ),
            ("PUT", at(&format!("/templates/{TEMPLATE}")), template),
            (
                "POST",
                at(&format!("/templates/{TEMPLATE}/status")),
                serde_json::json!({ "status": "approved" }),
            ),
        ];
        for (method, path, body) in steps {
            admin_request(admin, &token, method, &path, &body).await?;
        }
        for &c in consenting {
            let body = serde_json::json!({
                "customer": c, "action": "opt_in", "purpose": "utility",
                "source": "api_import", "text": "load test opt-in"
            });
            admin_request(admin, &token, "POST", &at("/consent"), &body).await?;
        }
    }
    Ok(())
}

/// `customer` withdraws its opt-in for `business`'s utility templates
/// (over the admin port, as a web form would).
pub(crate) async fn opt_out(
    admin: &str,
    key: &courier_protocol::token::TokenKey,
    business: u64,
    customer: u64,
) -> anyhow::Result<()> {
    let token = admin_token(key);
    let body = serde_json::json!({
        "customer": customer, "action": "opt_out", "purpose": "utility",
        "source": "web_form", "text": "stop sending me these"
    });
    let path = format!("/admin/businesses/{business}/consent");
    admin_request(admin, &token, "POST", &path, &body).await
}

fn admin_token(key: &courier_protocol::token::TokenKey) -> String {
    key.mint(courier_protocol::token::Claims {
        user_id: 0,
        device_id: 0,
        expires_at_s: u64::MAX / 2,
    })
}

/// One admin request with a JSON body; an answer other than 200 is an error.
async fn admin_request(
    admin: &str,
    token: &str,
    method: &str,
    path: &str,
    body: &serde_json::Value,
) -> anyhow::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let body = body.to_string();
    let ask = async {
        let mut s = tokio::net::TcpStream::connect(admin).await?;
        let request = format!(
            "{method} {path} HTTP/1.1\r\nhost: {admin}\r\nauthorization: Bearer {token}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        );
        s.write_all(request.as_bytes()).await?;
        let mut answer = String::new();
        s.read_to_string(&mut answer).await?;
        anyhow::Ok(answer)
    };
    let answer = tokio::time::timeout(std::time::Duration::from_secs(10), ask)
        .await
        .map_err(|_| {
            anyhow::anyhow!("the admin port at {admin} did not answer {method} {path}")
        })??;
    anyhow::ensure!(
        answer.starts_with("HTTP/1.1 200"),
        "{method} {path}: {}",
        answer.lines().last().unwrap_or("")
    );
    Ok(())
}

/// Creates the plan's groups (each by its first member) and returns their
/// ids by plan index.
pub(crate) async fn create_groups(
    clients: &HashMap<u64, Arc<Client>>,
    plan: &Plan,
) -> anyhow::Result<Vec<u64>> {
    let mut ids = Vec::with_capacity(plan.groups.len());
    for members in &plan.groups {
        let creator = &clients[&members[0]];
        ids.push(creator.create_group(members[1..].to_vec()).await?.group);
    }
    Ok(ids)
}

/// Sets up the plan's broadcast lists: consenting customers add the
/// business as a contact (with `contacts`; a registered business's list
/// goes by its consent ledger instead); the business sets its list of
/// every customer.
pub(crate) async fn create_lists(
    clients: &HashMap<u64, Arc<Client>>,
    plan: &Plan,
    contacts: bool,
) -> anyhow::Result<()> {
    let client = |u: u64| &clients[&u];
    for (business, customers, consenting) in &plan.lists {
        for &c in consenting.iter().filter(|_| contacts) {
            client(c)
                .contacts(courier_protocol::ContactsOp::Add, vec![*business])
                .await?;
        }
        client(*business)
            .list(courier_protocol::ListOp::Set, LIST_ID, customers.clone())
            .await?;
    }
    Ok(())
}
