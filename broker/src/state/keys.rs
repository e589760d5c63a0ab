//! Key layouts of the broker's state in the store's key-value spaces. One
//! leading byte names the table; ids are big-endian so a prefix is a range.
//! The values are the row types of [`super::rows`].
//!
//! | key                         | value ([`super::rows`])                  | written by |
//! |-----------------------------|------------------------------------------|------------|
//! | `G` group                   | [`GroupState`](super::rows::GroupState)  | group's shard |
//! | `F` group                   | [`FanMark`](super::rows::FanMark): refs fan-out done up to | group's shard |
//! | `U` user . group            | [`MemberRow`](super::rows::MemberRow): joined . left . log_from | group's shard |
//! | `C` group . user            | [`Cursors`](super::rows::Cursors): delivered . read (group seqs) | user's shard |
//! | `R` user                    | [`ReceiptRow`](super::rows::ReceiptRow): delivered . read (inbox seqs receipted) . emitted | user's shard |
//! | `O` user . emission         | [`OutboxRow`](super::rows::OutboxRow): a receipt not yet durable at its sender | user's shard |
//! | `I` user                    | empty: the user takes its one-to-one receipts as facts (set by its first session that asks, never unset) | user's shard |
//! | `D` sender . reader         | [`FactRow`](super::rows::FactRow): delivered . read (reader-inbox seqs) . version | sender's shard |
//! | `K` user . contact          | empty                                    | user's session |
//! | `L` user . list             | [`UserList`](super::rows::UserList): count u16 . users | user's session |
//! | `B` business                | [`BusinessRow`](super::business::BusinessRow) (JSON) | business's shard |
//! | `T` business . name (UTF-8) | [`Template`](super::business::Template) (JSON) | business's shard |
//! | `P` business . customer     | [`PairRow`](super::business::PairRow): window, conversation, consent, block | business's shard |
//! | `J` business . customer . n | [`ConsentEntry`](super::business::ConsentEntry) (JSON), never rewritten | business's shard |
//! | `Q` business . day          | [`DayCounts`](super::business::DayCounts) (JSON): the quality rating's signals | business's shard |
//! | `X` business . client msg id . customer | [`MessageRow`](super::business_events::MessageRow) (binary; JSON before): one business message's status for one customer (a list send has one per customer) | business's shard |
//! | `V` business . seq          | [`EventRow`](super::business_events::EventRow) (binary; JSON before): a status change told to the business | business's shard |
//! | `W` business                | [`EventHead`](super::business_events::EventHead): last event seq . delivered by the webhook | business's shard |
//! | `Y` business . period . start . template NUL language | [`Counts`](super::business_events::Counts) (binary; JSON before): one period's statistics (empty template: all messages) | business's shard |
//! | `A` business                | [`Engagement`](super::business_events::Engagement) (JSON): when customers write, waits, reads by hour | business's shard |
//! | `N` business . customer     | JSON list of the conversation's labels | business's shard |
//! | `E` business . campaign     | [`CampaignRow`](super::campaigns::CampaignRow) (JSON): a campaign's definition, state, cursor, refusals and counts | business's shard |
//! | `H` business . campaign . chunk | the campaign's segment: up to 4,096 customer ids (u64 each) | business's shard |
//! | `Z` business . customer     | u64: since when the customer waits for the business's answer | business's shard |
//! | `M` customer                | [`MarketingRow`](super::business::MarketingRow): marketing templates received lately | customer's shard |
//! | expiring `S` poster . expires_at . status_id | [`StatusRow`](super::rows::StatusRow): posted_at . audience . users . payload | poster's session |
//!
//! Every row belongs to the shard that writes it, and its key names that
//! shard's id ([`owner`]): the first id, except in `U` and `C` rows, where
//! the writer's id comes second. A cluster node's store puts each row in
//! its owner's slot, so a shard that moves takes exactly its own rows.

fn key(tag: u8, ids: &[u64]) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + 8 * ids.len());
    k.push(tag);
    for id in ids {
        k.extend_from_slice(&id.to_be_bytes());
    }
    k
}

pub fn group(g: u64) -> Vec<u8> {
    key(b'G', &[g])
}
pub fn fanned(g: u64) -> Vec<u8> {
    key(b'F', &[g])
}
pub fn fanned_prefix() -> Vec<u8> {
    vec![b'F']
}
pub fn user_group(user: u64, g: u64) -> Vec<u8> {
    key(b'U', &[user, g])
}
pub fn user_groups(user: u64) -> Vec<u8> {
    key(b'U', &[user])
}
pub fn cursor(g: u64, user: u64) -> Vec<u8> {
    key(b'C', &[g, user])
}
pub fn cursors(g: u64) -> Vec<u8> {
    key(b'C', &[g])
}
pub fn receipts(user: u64) -> Vec<u8> {
    key(b'R', &[user])
}
pub fn outbox(reader: u64, emission: u64) -> Vec<u8> {
    key(b'O', &[reader, emission])
}
pub fn outbox_prefix() -> Vec<u8> {
    vec![b'O']
}
pub fn facts_on(user: u64) -> Vec<u8> {
    key(b'I', &[user])
}
pub fn fact(sender: u64, reader: u64) -> Vec<u8> {
    key(b'D', &[sender, reader])
}
pub fn facts(sender: u64) -> Vec<u8> {
    key(b'D', &[sender])
}
pub fn contact(user: u64, contact: u64) -> Vec<u8> {
    key(b'K', &[user, contact])
}
pub fn contacts(user: u64) -> Vec<u8> {
    key(b'K', &[user])
}
pub fn list(user: u64, list: u64) -> Vec<u8> {
    key(b'L', &[user, list])
}
pub fn business(b: u64) -> Vec<u8> {
    key(b'B', &[b])
}
pub fn businesses() -> Vec<u8> {
    vec![b'B']
}
pub fn template(b: u64, name: &str) -> Vec<u8> {
    let mut k = key(b'T', &[b]);
    k.extend_from_slice(name.as_bytes());
    k
}
pub fn templates(b: u64) -> Vec<u8> {
    key(b'T', &[b])
}
pub fn pair(b: u64, customer: u64) -> Vec<u8> {
    key(b'P', &[b, customer])
}
pub fn pairs(b: u64) -> Vec<u8> {
    key(b'P', &[b])
}
pub fn ledger_entry(b: u64, customer: u64, n: u64) -> Vec<u8> {
    key(b'J', &[b, customer, n])
}
pub fn ledger(b: u64, customer: u64) -> Vec<u8> {
    key(b'J', &[b, customer])
}
pub fn ledgers(b: u64) -> Vec<u8> {
    key(b'J', &[b])
}
pub fn quality_day(b: u64, day: u64) -> Vec<u8> {
    key(b'Q', &[b, day])
}
pub fn quality_days(b: u64) -> Vec<u8> {
    key(b'Q', &[b])
}
pub fn message_status(b: u64, client_msg_id: u64, customer: u64) -> Vec<u8> {
    key(b'X', &[b, client_msg_id, customer])
}
pub fn message_statuses_of(b: u64, client_msg_id: u64) -> Vec<u8> {
    key(b'X', &[b, client_msg_id])
}
pub fn message_statuses(b: u64) -> Vec<u8> {
    key(b'X', &[b])
}
pub fn event(b: u64, seq: u64) -> Vec<u8> {
    key(b'V', &[b, seq])
}
pub fn events(b: u64) -> Vec<u8> {
    key(b'V', &[b])
}
pub fn event_head(b: u64) -> Vec<u8> {
    key(b'W', &[b])
}
pub fn stats(b: u64, period: u8, start_ms: u64, template: &str, language: &str) -> Vec<u8> {
    let mut k = key(b'Y', &[b, u64::from(period), start_ms]);
    k.extend_from_slice(template.as_bytes());
    k.push(0);
    k.extend_from_slice(language.as_bytes());
    k
}
pub fn stats_of(b: u64, period: u8) -> Vec<u8> {
    key(b'Y', &[b, u64::from(period)])
}
pub fn engagement(b: u64) -> Vec<u8> {
    key(b'A', &[b])
}
pub fn labels(b: u64, customer: u64) -> Vec<u8> {
    key(b'N', &[b, customer])
}
pub fn labels_of(b: u64) -> Vec<u8> {
    key(b'N', &[b])
}
pub fn campaign(b: u64, id: u64) -> Vec<u8> {
    key(b'E', &[b, id])
}
pub fn campaigns(b: u64) -> Vec<u8> {
    key(b'E', &[b])
}
pub fn all_campaigns() -> Vec<u8> {
    vec![b'E']
}
pub fn segment(b: u64, id: u64, chunk: u64) -> Vec<u8> {
    key(b'H', &[b, id, chunk])
}
pub fn awaiting(b: u64, customer: u64) -> Vec<u8> {
    key(b'Z', &[b, customer])
}
pub fn marketing(customer: u64) -> Vec<u8> {
    key(b'M', &[customer])
}
pub fn status(poster: u64, expires_at_ms: u64, id: u64) -> Vec<u8> {
    key(b'S', &[poster, expires_at_ms, id])
}
pub fn statuses(poster: u64) -> Vec<u8> {
    key(b'S', &[poster])
}

/// The id whose shard writes the row `k` (see the table), if `k` reaches
/// it: a prefix such as `U user` does not (the store then scans every
/// slot for it).
pub fn owner(k: &[u8]) -> Option<u64> {
    match k.first()? {
        b'U' | b'C' => be_u64(k, 9),
        _ => be_u64(k, 1),
    }
}

/// A cluster node's store layout: each shard a run of slots, one key
/// range per space, keys placed by [`owner`].
pub fn slotted() -> courier_storage::Layout {
    courier_storage::Layout::Slotted { owner }
}

/// The last id of a key (the group of a `U` row, the user of a `C` row...).
pub fn last_id(k: &[u8]) -> Option<u64> {
    k.len().checked_sub(8).and_then(|at| be_u64(k, at))
}

/// A big-endian u64 at `at`, if the bytes are there.
pub(crate) fn be_u64(v: &[u8], at: usize) -> Option<u64> {
    v.get(at..at + 8)
        .map(|b| u64::from_be_bytes(b.try_into().expect("8 bytes")))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each row's owner is the id of the shard the table says writes it.
    #[test]
    fn every_row_names_the_shard_that_writes_it() {
        let (user, g, other) = (11, 22, 33);
        assert_eq!(owner(&group(g)), Some(g));
        assert_eq!(owner(&fanned(g)), Some(g));
        assert_eq!(
            owner(&user_group(user, g)),
            Some(g),
            "written by the group's shard"
        );
        assert_eq!(
            owner(&cursor(g, user)),
            Some(user),
            "written by the user's shard"
        );
        assert_eq!(owner(&receipts(user)), Some(user));
        assert_eq!(owner(&outbox(user, 5)), Some(user));
        assert_eq!(owner(&facts_on(user)), Some(user));
        assert_eq!(owner(&fact(user, other)), Some(user), "the sender's shard");
        assert_eq!(owner(&facts(user)), Some(user));
        assert_eq!(owner(&contact(user, other)), Some(user));
        assert_eq!(owner(&list(user, other)), Some(user));
        assert_eq!(owner(&status(user, 1_000, 7)), Some(user));
        assert_eq!(owner(&statuses(user)), Some(user));
        assert_eq!(owner(&contacts(user)), Some(user));
        assert_eq!(owner(&business(user)), Some(user));
        assert_eq!(owner(&template(user, "order_update")), Some(user));
        assert_eq!(
            owner(&pair(user, other)),
            Some(user),
            "the business's shard"
        );
        assert_eq!(owner(&ledger_entry(user, other, 3)), Some(user));
        assert_eq!(owner(&quality_day(user, 20_000)), Some(user));
        assert_eq!(owner(&marketing(user)), Some(user), "the customer's shard");
        assert_eq!(owner(&campaign(user, 3)), Some(user));
        assert_eq!(owner(&segment(user, 3, 0)), Some(user));
        for prefix in [
            user_groups(user),
            cursors(g),
            fanned_prefix(),
            outbox_prefix(),
            all_campaigns(),
        ] {
            assert_eq!(owner(&prefix), None, "{prefix:?} spans owners");
        }
    }
}
