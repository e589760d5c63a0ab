//! The Courier endpoint (also the relay's, which speaks the protocol):
//! sends by destination, and the groups and lists a scenario needs.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use courier_client::{Client, ClientError};
use courier_protocol::{Destination, MessageKind};

use crate::plan::{Dest, Plan, Routes, LIST_ID};

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
    let ack: std::pin::Pin<Box<dyn std::future::Future<Output = _> + Send>> =
        match routes.destination(dest) {
            Destination::List(list) => {
                let ack = c.start_broadcast(id, list, MessageKind::Chat, body)?;
                Box::pin(async move { ack.await.map(|_| ()) })
            }
            d => {
                let ack = c.start_send(id, d, MessageKind::Chat, body)?;
                Box::pin(async move { ack.await.map(|_| ()) })
            }
        };
    Ok(ack)
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
/// business as a contact; the business sets its list of every customer.
pub(crate) async fn create_lists(
    clients: &HashMap<u64, Arc<Client>>,
    plan: &Plan,
) -> anyhow::Result<()> {
    let client = |u: u64| &clients[&u];
    for (business, customers, consenting) in &plan.lists {
        for &c in consenting {
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
