//! One behaviour suite, run against every store implementation.

use bytes::Bytes;

use crate::*;

const WINDOW_MS: u64 = 60_000;

fn config() -> StoreConfig {
    StoreConfig {
        durability: Durability::Wal,
        idempotency_window_ms: WINDOW_MS,
        block_cache_bytes: 8 << 20,
        clock: Clock::system(),
    }
}

fn msg(inbox: u64, sender: u64, cmid: u64, ts: u64, body: &str) -> NewMessage {
    NewMessage {
        inbox,
        idempotency: Some(IdempotencyKey::new(sender, cmid)),
        form: Form::Record,
        record: Record {
            server_msg_id: cmid * 1000 + inbox,
            sender,
            sender_device: 7,
            client_msg_id: cmid,
            timestamp_ms: ts,
            dest_tag: 1,
            dest_id: inbox,
            kind: 1,
            payload: Bytes::copy_from_slice(body.as_bytes()),
        },
    }
}

fn seqs(outcomes: &[AppendOutcome]) -> Vec<u64> {
    outcomes
        .iter()
        .map(|o| match o {
            AppendOutcome::Stored(p) | AppendOutcome::Duplicate(p) => p.seq,
            AppendOutcome::Conflict => 0,
        })
        .collect()
}

pub(crate) fn sequences_are_gap_free_per_inbox(s: &dyn InboxStore) {
    let out = s
        .append(
            &[
                msg(1, 9, 1, 10, "a"),
                msg(2, 9, 2, 10, "b"),
                msg(1, 9, 3, 10, "c"),
            ],
            10,
        )
        .unwrap();
    assert_eq!(seqs(&out), vec![1, 1, 2]);
    let out = s.append(&[msg(1, 9, 4, 11, "d")], 11).unwrap();
    assert_eq!(seqs(&out), vec![3]);
    assert_eq!(s.state(1).unwrap().head_seq, 3);
    assert_eq!(s.state(2).unwrap().head_seq, 1);
    assert_eq!(s.state(3).unwrap(), InboxState::default());
}

pub(crate) fn reads_return_order_and_respect_limit(s: &dyn InboxStore) {
    let batch: Vec<_> = (1..=10)
        .map(|i| msg(5, 9, i, i, &format!("m{i}")))
        .collect();
    s.append(&batch, 10).unwrap();
    // Another user's inbox right beside it must not leak into reads.
    s.append(&[msg(6, 9, 100, 1, "other")], 10).unwrap();
    let all = s.read_after(5, 0, 100).unwrap();
    assert_eq!(
        all.iter().map(|m| m.seq).collect::<Vec<_>>(),
        (1..=10).collect::<Vec<_>>()
    );
    assert_eq!(all[3].record.payload, Bytes::from_static(b"m4"));
    assert_eq!(all[3].record.sender_device, 7);
    let page = s.read_after(5, 4, 3).unwrap();
    assert_eq!(
        page.iter().map(|m| m.seq).collect::<Vec<_>>(),
        vec![5, 6, 7]
    );
    assert!(s.read_after(5, 10, 10).unwrap().is_empty());
    assert!(s.read_after(5, u64::MAX, 10).unwrap().is_empty());
    assert!(s.read_after(77, 0, 10).unwrap().is_empty());
}

pub(crate) fn retries_are_stored_once(s: &dyn InboxStore) {
    let first = s.append(&[msg(1, 9, 42, 10, "x")], 10).unwrap();
    let AppendOutcome::Stored(p) = first[0] else {
        panic!("first append not stored: {first:?}")
    };
    let again = s.append(&[msg(1, 9, 42, 20, "x")], 20).unwrap();
    assert_eq!(again, vec![AppendOutcome::Duplicate(p)]);
    // The same key twice inside one batch is stored once too.
    let both = s
        .append(&[msg(1, 9, 43, 20, "y"), msg(1, 9, 43, 20, "y")], 20)
        .unwrap();
    let AppendOutcome::Stored(q) = both[0] else {
        panic!("{both:?}")
    };
    assert_eq!(both[1], AppendOutcome::Duplicate(q));
    assert_eq!(s.read_after(1, 0, 10).unwrap().len(), 2);
    // Reusing the id for another destination is a conflict, stored nowhere.
    let conflict = s.append(&[msg(2, 9, 42, 30, "z")], 30).unwrap();
    assert_eq!(conflict, vec![AppendOutcome::Conflict]);
    assert!(s.read_after(2, 0, 10).unwrap().is_empty());
    // Another sender may use the same client id.
    let other = s.append(&[msg(1, 8, 42, 30, "w")], 30).unwrap();
    assert!(matches!(other[0], AppendOutcome::Stored(_)));
    // Past the window the key is forgotten.
    let late = s
        .append(
            &[msg(1, 9, 42, 10 + WINDOW_MS + 1, "x")],
            10 + WINDOW_MS + 1,
        )
        .unwrap();
    assert!(matches!(late[0], AppendOutcome::Stored(_)));
}

pub(crate) fn acks_clamp_and_never_go_back(s: &dyn InboxStore) {
    s.append(&[msg(1, 9, 1, 1, "a"), msg(1, 9, 2, 1, "b")], 1)
        .unwrap();
    assert_eq!(s.ack(1, 1).unwrap().acked_seq, 1);
    assert_eq!(s.ack(1, 99).unwrap().acked_seq, 2, "clamped to head");
    assert_eq!(s.ack(1, 1).unwrap().acked_seq, 2, "never backwards");
    assert_eq!(s.state(1).unwrap().acked_seq, 2);
}

pub(crate) fn trim_removes_only_old_acked_messages(s: &dyn InboxStore) {
    let batch: Vec<_> = (1..=6).map(|i| msg(3, 9, i, i * 100, "m")).collect();
    s.append(&batch, 600).unwrap();
    // Nothing acked: nothing trimmed.
    assert_eq!(s.trim_acked(3, u64::MAX).unwrap().oldest_seq, 1);
    s.ack(3, 4).unwrap();
    // Only messages older than 250 ms (seq 1, 2) go.
    let st = s.trim_acked(3, 250).unwrap();
    assert_eq!(st.oldest_seq, 3);
    assert_eq!(s.read_after(3, 0, 10).unwrap()[0].seq, 3);
    // Everything acked goes, unacked stays.
    let st = s.trim_acked(3, u64::MAX).unwrap();
    assert_eq!((st.oldest_seq, st.acked_seq, st.head_seq), (5, 4, 6));
    let rest: Vec<_> = s
        .read_after(3, 0, 10)
        .unwrap()
        .iter()
        .map(|m| m.seq)
        .collect();
    assert_eq!(rest, vec![5, 6]);
    // Appends continue the sequence after a trim.
    assert_eq!(
        seqs(&s.append(&[msg(3, 9, 50, 700, "n")], 700).unwrap()),
        vec![7]
    );
}

/// A log entry stored once and referenced from two inboxes reads back as
/// the full record in each, with its own inbox sequence; scoped keys make
/// each reference idempotent on its own.
pub(crate) fn references_resolve_and_are_idempotent_per_scope(s: &dyn InboxStore) {
    const LOG: u64 = 1 << 63 | 5;
    let body = msg(LOG, 9, 1, 100, "group body");
    let out = s.append(std::slice::from_ref(&body), 100).unwrap();
    assert_eq!(seqs(&out), vec![1]);
    let reference = |inbox: u64| NewMessage {
        inbox,
        idempotency: Some(IdempotencyKey {
            sender: LOG,
            client_msg_id: 1,
            scope: inbox,
        }),
        record: body.record.clone(),
        form: Form::Reference(LogRef { log: LOG, seq: 1 }),
    };
    // Inbox 21 already holds one message, so the reference lands at seq 2.
    s.append(&[msg(21, 8, 1, 90, "earlier")], 90).unwrap();
    let out = s.append(&[reference(20), reference(21)], 101).unwrap();
    assert_eq!(seqs(&out), vec![1, 2]);
    // Re-applying the fan-out (recovery, a retried send) stores nothing.
    let again = s.append(&[reference(20), reference(21)], 102).unwrap();
    assert!(again
        .iter()
        .all(|o| matches!(o, AppendOutcome::Duplicate(_))));
    for (inbox, seq) in [(20, 1), (21, 2)] {
        let read = s.read_after(inbox, seq - 1, 10).unwrap();
        assert_eq!(read.len(), 1, "inbox {inbox}");
        assert_eq!(read[0].seq, seq);
        assert_eq!(read[0].record, body.record);
        assert_eq!(read[0].via, Some(LogRef { log: LOG, seq: 1 }));
    }
    // References age like records: acked and old, they are trimmed.
    s.ack(20, 1).unwrap();
    assert_eq!(s.trim_acked(20, 1000).unwrap().oldest_seq, 2);
    assert_eq!(s.read_after(LOG, 0, 10).unwrap().len(), 1, "log untouched");
}

/// A copy of a log entry kept in another store (a group log on another
/// cluster node) holds the record in full: it reads back with the position
/// it copies though that log is not in this store, is idempotent per
/// scope, and ages like any entry.
pub(crate) fn copies_of_log_entries_kept_elsewhere_read_back_whole(s: &dyn InboxStore) {
    const LOG: u64 = 1 << 63 | 6;
    let at = LogRef { log: LOG, seq: 4 };
    let body = msg(LOG, 9, 3, 100, "a group message from another node");
    let copy = |inbox: u64| NewMessage {
        inbox,
        idempotency: Some(IdempotencyKey {
            sender: LOG,
            client_msg_id: at.seq,
            scope: inbox,
        }),
        record: body.record.clone(),
        form: Form::Copy(at),
    };
    s.append(&[msg(31, 8, 1, 90, "earlier")], 90).unwrap();
    let out = s.append(&[copy(30), copy(31)], 101).unwrap();
    assert_eq!(seqs(&out), vec![1, 2]);
    let again = s.append(&[copy(30), copy(31)], 102).unwrap();
    assert!(again
        .iter()
        .all(|o| matches!(o, AppendOutcome::Duplicate(_))));
    assert!(s.read_after(LOG, 0, 10).unwrap().is_empty(), "no log here");
    for (inbox, seq) in [(30, 1), (31, 2)] {
        let read = s.read_after(inbox, seq - 1, 10).unwrap();
        assert_eq!(read.len(), 1, "inbox {inbox}");
        assert_eq!(read[0].seq, seq);
        assert_eq!(read[0].record, body.record);
        assert_eq!(read[0].via, Some(at));
    }
    s.ack(30, 1).unwrap();
    assert_eq!(s.trim_acked(30, 1000).unwrap().oldest_seq, 2);
    assert!(s.read_after(30, 0, 10).unwrap().is_empty());
}

pub(crate) fn kv_writes_are_atomic_with_appends_and_scan_by_prefix(s: &dyn InboxStore) {
    let put = |k: &[u8], v: &[u8]| KvOp::Put {
        key: k.to_vec(),
        value: v.to_vec(),
    };
    s.append_with(
        &[msg(30, 9, 1, 10, "a")],
        &[
            put(b"g\x01a", b"1"),
            put(b"g\x01b", b"2"),
            put(b"g\x02a", b"3"),
        ],
        10,
    )
    .unwrap();
    assert_eq!(s.get(b"g\x01b").unwrap(), Some(b"2".to_vec()));
    assert_eq!(s.get(b"nope").unwrap(), None);
    let keys: Vec<_> = s
        .scan(b"g\x01", 10)
        .unwrap()
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    assert_eq!(keys, vec![b"g\x01a".to_vec(), b"g\x01b".to_vec()]);
    assert_eq!(s.scan(b"g", 1).unwrap().len(), 1, "limit");
    s.append_with(
        &[],
        &[KvOp::Delete {
            key: b"g\x01a".to_vec(),
        }],
        11,
    )
    .unwrap();
    assert_eq!(s.scan(b"g\x01", 10).unwrap().len(), 1);
    s.write_lazy(&[put(b"lazy", b"1")]).unwrap();
    assert_eq!(s.get(b"lazy").unwrap(), Some(b"1".to_vec()));
    // A 0xff prefix has no successor key; the scan must still stop at it.
    s.append_with(&[], &[put(b"\xff\xff", b"x")], 12).unwrap();
    assert_eq!(s.scan(b"\xff", 10).unwrap().len(), 1);
}

pub(crate) fn expiring_entries_vanish_from_scans_and_range_deletes(s: &dyn InboxStore) {
    let put = |k: &[u8], exp: u64| KvOp::PutExpiring {
        key: k.to_vec(),
        expires_at_ms: exp,
        value: b"v".to_vec(),
    };
    s.append_with(&[], &[put(b"s1", 100), put(b"s2", 200), put(b"t1", 100)], 0)
        .unwrap();
    assert_eq!(s.scan_expiring(b"s", 50, 10).unwrap().len(), 2);
    let live = s.scan_expiring(b"s", 150, 10).unwrap();
    assert_eq!(live, vec![(b"s2".to_vec(), 200, b"v".to_vec())]);
    s.append_with(
        &[],
        &[KvOp::DeleteExpiringRange {
            from: b"s".to_vec(),
            to: b"t".to_vec(),
        }],
        0,
    )
    .unwrap();
    assert!(s.scan_expiring(b"s", 0, 10).unwrap().is_empty());
    assert_eq!(s.scan_expiring(b"t", 0, 10).unwrap().len(), 1);
}

macro_rules! suite {
    ($module:ident, $make:expr) => {
        mod $module {
            #[allow(unused_imports, reason = "used by some store constructors")]
            use super::*;
            fn with_store(f: fn(&dyn crate::InboxStore)) {
                let (_guard, store) = $make;
                f(&store);
            }
            #[test]
            fn sequences_are_gap_free_per_inbox() {
                with_store(super::sequences_are_gap_free_per_inbox)
            }
            #[test]
            fn reads_return_order_and_respect_limit() {
                with_store(super::reads_return_order_and_respect_limit)
            }
            #[test]
            fn retries_are_stored_once() {
                with_store(super::retries_are_stored_once)
            }
            #[test]
            fn acks_clamp_and_never_go_back() {
                with_store(super::acks_clamp_and_never_go_back)
            }
            #[test]
            fn trim_removes_only_old_acked_messages() {
                with_store(super::trim_removes_only_old_acked_messages)
            }
            #[test]
            fn references_resolve_and_are_idempotent_per_scope() {
                with_store(super::references_resolve_and_are_idempotent_per_scope)
            }
            #[test]
            fn copies_of_log_entries_kept_elsewhere_read_back_whole() {
                with_store(super::copies_of_log_entries_kept_elsewhere_read_back_whole)
            }
            #[test]
            fn kv_writes_are_atomic_with_appends_and_scan_by_prefix() {
                with_store(super::kv_writes_are_atomic_with_appends_and_scan_by_prefix)
            }
            #[test]
            fn expiring_entries_vanish_from_scans_and_range_deletes() {
                with_store(super::expiring_entries_vanish_from_scans_and_range_deletes)
            }
        }
    };
}

suite!(memory, ((), crate::MemoryStore::new(config())));
suite!(rocks, {
    let dir = tempfile::tempdir().unwrap();
    let store = crate::RocksStore::open(dir.path(), config()).unwrap();
    (dir, store)
});

mod rocks_only {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;

    /// With an injected clock moved past the expiry, a compaction removes
    /// expired entries from the files: they are gone from storage, not
    /// merely filtered out of reads.
    #[test]
    fn expired_entries_leave_the_disk_at_compaction() {
        let dir = tempfile::tempdir().unwrap();
        let now = Arc::new(AtomicU64::new(1_000));
        let clock = {
            let now = now.clone();
            Clock(Arc::new(move || now.load(Ordering::SeqCst)))
        };
        let store = crate::RocksStore::open(dir.path(), StoreConfig { clock, ..config() }).unwrap();
        let put = |k: &[u8], exp: u64| KvOp::PutExpiring {
            key: k.to_vec(),
            expires_at_ms: exp,
            value: vec![7; 100],
        };
        store
            .append_with(&[], &[put(b"old", 5_000), put(b"new", 90_000)], 1_000)
            .unwrap();
        store
            .db
            .flush_cf(store.db.cf_handle("expiring").unwrap())
            .unwrap();
        store.compact_expiring();
        assert_eq!(
            store.raw_expiring_keys().unwrap().len(),
            2,
            "nothing expired yet"
        );
        now.store(6_000, Ordering::SeqCst);
        store.compact_expiring();
        assert_eq!(store.raw_expiring_keys().unwrap(), vec![b"new".to_vec()]);
        now.store(100_000, Ordering::SeqCst);
        store.compact_expiring();
        assert!(store.raw_expiring_keys().unwrap().is_empty());
    }

    #[test]
    fn reopen_recovers_heads_cursors_messages_and_idempotency() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = RocksStore::open(dir.path(), config()).unwrap();
            let batch: Vec<_> = (1..=5).map(|i| msg(1, 9, i, i, "m")).collect();
            s.append(&batch, 5).unwrap();
            s.append(&[msg(2, 9, 99, 5, "other")], 5).unwrap();
            s.ack(1, 3).unwrap();
            s.trim_acked(1, 3).unwrap(); // seq 1, 2
        }
        let s = RocksStore::open(dir.path(), config()).unwrap();
        let st = s.state(1).unwrap();
        assert_eq!((st.head_seq, st.acked_seq, st.oldest_seq), (5, 3, 3));
        assert_eq!(s.state(2).unwrap().head_seq, 1);
        assert_eq!(
            seqs(&s.append(&[msg(1, 9, 6, 6, "m")], 6).unwrap()),
            vec![6]
        );
        let dup = s.append(&[msg(1, 9, 4, 7, "m")], 7).unwrap();
        assert!(matches!(dup[0], AppendOutcome::Duplicate(p) if p.seq == 4));
        let seqs_read: Vec<_> = s
            .read_after(1, 0, 10)
            .unwrap()
            .iter()
            .map(|m| m.seq)
            .collect();
        assert_eq!(seqs_read, vec![3, 4, 5, 6]);
    }

    #[test]
    fn fsync_mode_appends_and_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = StoreConfig {
            durability: Durability::Fsync,
            ..config()
        };
        let s = RocksStore::open(dir.path(), cfg).unwrap();
        s.append(&[msg(1, 9, 1, 1, "durable")], 1).unwrap();
        s.sync().unwrap();
        assert_eq!(
            s.read_after(1, 0, 1).unwrap()[0].record.payload,
            Bytes::from_static(b"durable")
        );
    }

    #[test]
    fn corrupt_meta_is_reported_not_served() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = RocksStore::open(dir.path(), config()).unwrap();
            let cf = s.db.cf_handle("meta").unwrap();
            s.db.put_cf(cf, 1u64.to_be_bytes(), b"short").unwrap();
        }
        let s = RocksStore::open(dir.path(), config()).unwrap();
        assert!(matches!(s.state(1), Err(StoreError::Corrupt { .. })));
        assert!(matches!(
            s.append(&[msg(1, 9, 1, 1, "x")], 1),
            Err(StoreError::Corrupt { .. })
        ));
    }
}

mod corruption {
    use super::*;

    /// Bytes flipped inside an SST file's data blocks are caught by RocksDB's
    /// block checksums on read and reported as corruption, never returned as
    /// messages.
    #[test]
    fn flipped_bytes_on_disk_are_reported_not_served() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = RocksStore::open(dir.path(), config()).unwrap();
            let batch: Vec<_> = (1..=200)
                .map(|i| msg(1, 9, i, i, &"payload-".repeat(20)))
                .collect();
            s.append(&batch, 200).unwrap();
            let cf = s.db.cf_handle("inbox").unwrap();
            s.db.flush_cf(cf).unwrap();
        }
        let mut ssts: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|x| x == "sst"))
            .collect();
        ssts.sort_by_key(|p| std::fs::metadata(p).unwrap().len());
        let biggest = ssts.last().expect("an SST file after the flush");
        let mut bytes = std::fs::read(biggest).unwrap();
        // The data blocks come first; flip bytes well inside them.
        for b in &mut bytes[100..400] {
            *b ^= 0x5a;
        }
        std::fs::write(biggest, &bytes).unwrap();

        let result = RocksStore::open(dir.path(), config()).and_then(|s| s.read_after(1, 0, 1000));
        match result {
            Err(StoreError::Corrupt { .. }) => {}
            Err(other) => panic!("expected a corruption error, got {other}"),
            Ok(messages) => panic!("served {} messages from a corrupt file", messages.len()),
        }
    }
}
