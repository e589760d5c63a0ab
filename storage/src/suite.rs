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
        layout: Layout::Flat,
    }
}

/// The slotted layout with the suite's owner rule: the byte after a key's
/// first names its owner (keys shorter than that name none).
fn slotted() -> StoreConfig {
    fn owner(k: &[u8]) -> Option<u64> {
        k.get(1).map(|b| u64::from(*b))
    }
    StoreConfig {
        layout: Layout::Slotted { owner },
        ..config()
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
            AppendOutcome::Conflict | AppendOutcome::NotServed => 0,
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
    // Reusing the id for another destination is a conflict, stored
    // nowhere (a slotted store keeps the index by the inbox's slot, so
    // there it sees reuse for destinations in the same slot).
    let other = (2..).find(|d| slot_of(*d) == slot_of(1)).unwrap();
    let conflict = s.append(&[msg(other, 9, 42, 30, "z")], 30).unwrap();
    assert_eq!(conflict, vec![AppendOutcome::Conflict]);
    assert!(s.read_after(other, 0, 10).unwrap().is_empty());
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

/// An acknowledgement written as a key-value op (a shard's marks ride its
/// next write) moves the cursor as `ack` does: clamped to the head, never
/// backwards, after the messages of the same write; `acked_state` tells
/// what it will leave without writing anything.
pub(crate) fn acks_ride_key_value_writes(s: &dyn InboxStore) {
    let batch: Vec<_> = (1..=4).map(|i| msg(1, 9, i, i, "m")).collect();
    s.append(&batch, 5).unwrap();
    assert_eq!(s.acked_state(1, 2).unwrap().acked_seq, 2);
    assert_eq!(
        s.state(1).unwrap().acked_seq,
        0,
        "acked_state writes nothing"
    );
    let ack = |up_to_seq| KvOp::Ack {
        inbox: 1,
        up_to_seq,
    };
    s.write_lazy(&[ack(99)]).unwrap();
    assert_eq!(s.state(1).unwrap().acked_seq, 4, "clamped to the head");
    s.write_lazy(&[ack(1)]).unwrap();
    assert_eq!(s.state(1).unwrap().acked_seq, 4, "never backwards");
    assert_eq!(s.acked_state(1, 2).unwrap().acked_seq, 4);
    let out = s
        .append_with(&[msg(1, 9, 5, 5, "m")], &[ack(5)], 6)
        .unwrap();
    assert_eq!(seqs(&out), vec![5]);
    assert_eq!(
        s.state(1).unwrap().acked_seq,
        5,
        "after the write's own messages"
    );
    s.write_lazy(&[KvOp::Ack {
        inbox: 2,
        up_to_seq: 3,
    }])
    .unwrap();
    assert_eq!(
        s.state(2).unwrap().acked_seq,
        0,
        "nothing stored, nothing acknowledged"
    );
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

/// Erasing messages rewrites them where they are: the sequence, ids,
/// sender and time stay (the inbox keeps no gap, a retry is still a
/// duplicate), the kind becomes the one given and the payload goes. Copies
/// are erased too; references (the body is the log's), sequences never
/// stored and entries already erased are not counted.
pub(crate) fn erased_messages_keep_their_place_and_lose_their_payload(s: &dyn InboxStore) {
    const ERASED: u8 = 6;
    const LOG: u64 = 1 << 63 | 7;
    let body = msg(LOG, 5, 1, 100, "group body");
    s.append(std::slice::from_ref(&body), 100).unwrap();
    let at = LogRef { log: LOG, seq: 1 };
    let from_log = |form: Form, scope: u64| NewMessage {
        inbox: 40,
        idempotency: Some(IdempotencyKey {
            sender: LOG,
            client_msg_id: scope,
            scope: 40,
        }),
        record: body.record.clone(),
        form,
    };
    let out = s
        .append(
            &[
                msg(40, 9, 1, 101, "one"),
                msg(40, 8, 2, 102, "two"),
                msg(40, 9, 3, 103, "three"),
                from_log(Form::Reference(at), 1),
                from_log(Form::Copy(at), 2),
            ],
            103,
        )
        .unwrap();
    assert_eq!(seqs(&out), vec![1, 2, 3, 4, 5]);
    let before = s.read_after(40, 0, 10).unwrap();
    assert_eq!(s.erase(40, &[1, 3, 4, 5, 99], ERASED).unwrap(), 3);
    let after = s.read_after(40, 0, 10).unwrap();
    assert_eq!(after.len(), 5);
    for (b, a) in before.iter().zip(&after) {
        assert_eq!((a.seq, a.via), (b.seq, b.via));
        let erased = [1, 3, 5].contains(&a.seq);
        let expected = if erased {
            Record {
                kind: ERASED,
                payload: Bytes::new(),
                ..b.record.clone()
            }
        } else {
            b.record.clone()
        };
        assert_eq!(a.record, expected, "seq {}", a.seq);
    }
    assert_eq!(s.erase(40, &[1, 3, 5], ERASED).unwrap(), 0, "done already");
    assert_eq!(s.erase(41, &[1], ERASED).unwrap(), 0, "an empty inbox");
    assert_eq!(s.state(40).unwrap().head_seq, 5);
    let retry = s.append(&[msg(40, 9, 1, 101, "one")], 104).unwrap();
    assert!(
        matches!(retry[0], AppendOutcome::Duplicate(p) if p.seq == 1),
        "{retry:?}"
    );
    assert_eq!(s.read_after(LOG, 0, 1).unwrap()[0].record, body.record);
    s.ack(40, 2).unwrap();
    assert_eq!(s.trim_acked(40, 1000).unwrap().oldest_seq, 3);
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
            fn acks_ride_key_value_writes() {
                with_store(super::acks_ride_key_value_writes)
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
            fn erased_messages_keep_their_place_and_lose_their_payload() {
                with_store(super::erased_messages_keep_their_place_and_lose_their_payload)
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
suite!(rocks_slotted, {
    let dir = tempfile::tempdir().unwrap();
    let store = crate::RocksStore::open(dir.path(), slotted()).unwrap();
    (dir, store)
});

mod slots {
    use super::*;

    #[test]
    fn every_shard_is_one_run_of_slots_and_the_runs_cover_them_all() {
        for shards in [1, 2, 3, 7, 64, 100, 255, 256] {
            let mut next = 0;
            for shard in 0..shards {
                let run = slots_of_shard(shard, shards);
                assert_eq!(
                    run.start, next,
                    "{shard} of {shards} follows the previous run"
                );
                assert!(!run.is_empty(), "{shard} of {shards} has slots");
                for slot in run.clone() {
                    assert_eq!(shard_of_slot(slot as u8, shards), shard);
                }
                next = run.end;
            }
            assert_eq!(next as usize, SLOTS, "{shards} shards cover every slot");
        }
        let mut seen = [0u32; SLOTS];
        for id in 1..=25_600u64 {
            seen[slot_of(id) as usize] += 1;
        }
        assert!(
            seen.iter().all(|n| (50..=150).contains(n)),
            "sequential ids spread over the slots: {seen:?}"
        );
    }

    #[test]
    fn a_store_keeps_the_layout_it_was_created_with() {
        let dir = tempfile::tempdir().unwrap();
        RocksStore::open(dir.path(), slotted())
            .unwrap()
            .append(&[msg(1, 9, 1, 1, "m")], 1)
            .unwrap();
        match RocksStore::open(dir.path(), config()) {
            Err(StoreError::Layout(why)) => assert!(why.contains("slotted"), "{why}"),
            other => panic!("a slotted store opened flat: {:?}", other.err()),
        }
        let s = RocksStore::open(dir.path(), slotted()).unwrap();
        assert_eq!(s.read_after(1, 0, 10).unwrap().len(), 1);
        assert!(s.transfer().is_some());

        // A store written before layouts were recorded holds flat keys.
        let old = tempfile::tempdir().unwrap();
        {
            let s = RocksStore::open(old.path(), config()).unwrap();
            assert!(s.transfer().is_none(), "a flat store gives nothing away");
            s.append(&[msg(1, 9, 1, 1, "m")], 1).unwrap();
            s.db.delete(b"layout").unwrap();
        }
        assert!(matches!(
            RocksStore::open(old.path(), slotted()),
            Err(StoreError::Layout(_))
        ));
        let s = RocksStore::open(old.path(), config()).unwrap();
        assert_eq!(s.read_after(1, 0, 10).unwrap().len(), 1);
    }

    #[test]
    fn a_key_value_key_without_an_owner_is_refused_in_the_slotted_layout() {
        let dir = tempfile::tempdir().unwrap();
        let s = RocksStore::open(dir.path(), slotted()).unwrap();
        let put = KvOp::Put {
            key: b"x".to_vec(),
            value: b"1".to_vec(),
        };
        let r = s.append_with(&[msg(1, 9, 1, 1, "m")], &[put], 1);
        assert!(matches!(r, Err(StoreError::Layout(_))), "{r:?}");
        assert!(
            s.read_after(1, 0, 10).unwrap().is_empty(),
            "nothing of the refused write was stored"
        );
    }

    /// A scan for a moved shard reads only its run in the slotted layout,
    /// in key order; a flat store (no slots) reads everything.
    #[test]
    fn a_scan_of_a_run_of_slots_reads_only_that_run_where_slots_exist() {
        let dir = tempfile::tempdir().unwrap();
        let s = RocksStore::open(dir.path(), slotted()).unwrap();
        let owners: Vec<u64> = (1..200u64).collect();
        let puts: Vec<KvOp> = owners
            .iter()
            .map(|&u| KvOp::Put {
                key: vec![b'r', u as u8],
                value: b"1".to_vec(),
            })
            .collect();
        s.write_lazy(&puts).unwrap();
        let run = u16::from(slot_of(7))..u16::from(slot_of(7)) + 16;
        let inside: Vec<Vec<u8>> = owners
            .iter()
            .filter(|&&u| run.contains(&u16::from(slot_of(u))))
            .map(|&u| vec![b'r', u as u8])
            .collect();
        assert!(inside.len() < owners.len() && !inside.is_empty());
        let got: Vec<Vec<u8>> = s
            .scan_slots(b"r", run.clone(), usize::MAX)
            .unwrap()
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        let mut want = inside.clone();
        want.sort();
        assert_eq!(got, want);
        assert_eq!(s.scan(b"r", usize::MAX).unwrap().len(), owners.len());

        let flat_dir = tempfile::tempdir().unwrap();
        let flat = RocksStore::open(flat_dir.path(), config()).unwrap();
        flat.write_lazy(&puts).unwrap();
        assert_eq!(
            flat.scan_slots(b"r", run, usize::MAX).unwrap().len(),
            owners.len(),
            "a flat store has no slots to pick"
        );
    }

    /// A slot that is not served takes no message (the outcome says so,
    /// per message, the rest of the write goes ahead) and no other write;
    /// serving it again takes them.
    #[test]
    fn slots_not_served_take_no_writes_and_say_so() {
        let dir = tempfile::tempdir().unwrap();
        let s = RocksStore::open(dir.path(), slotted()).unwrap();
        let t = s.transfer().unwrap();
        let a = 1u64;
        let b = (2..255u64).find(|u| slot_of(*u) != slot_of(a)).unwrap();
        let put = |u: u64| KvOp::Put {
            key: vec![b'r', u as u8],
            value: b"1".to_vec(),
        };
        let only_a = u16::from(slot_of(a))..u16::from(slot_of(a)) + 1;
        t.serve_only(&[only_a]);
        assert!(t.serves(slot_of(a)) && !t.serves(slot_of(b)));
        let out = s
            .append_with(
                &[msg(a, 9, 1, 1, "a"), msg(b, 9, 2, 1, "b")],
                &[put(a), put(b)],
                1,
            )
            .unwrap();
        assert!(matches!(out[0], AppendOutcome::Stored(_)), "{out:?}");
        assert_eq!(out[1], AppendOutcome::NotServed);
        assert!(s.get(&[b'r', a as u8]).unwrap().is_some());
        assert!(
            s.get(&[b'r', b as u8]).unwrap().is_none(),
            "the row was dropped"
        );
        assert!(s.read_after(b, 0, 10).unwrap().is_empty());
        assert_eq!(s.ack(b, 1).unwrap(), InboxState::default());
        assert!(t.not_served() >= 2);
        assert!(
            matches!(s.erase(b, &[1], 6), Err(StoreError::Unreplicated(_))),
            "an erasure of an inbox not served is refused"
        );
        let again = s.append(&[msg(b, 9, 2, 1, "b")], 2).unwrap();
        assert_eq!(again[0], AppendOutcome::NotServed, "not remembered either");
        t.serve_only(std::slice::from_ref(&(0..SLOTS as u16)));
        let out = s.append(&[msg(b, 9, 2, 1, "b")], 3).unwrap();
        assert!(
            matches!(out[0], AppendOutcome::Stored(p) if p.seq == 1),
            "{out:?}"
        );
    }

    /// Every write to served slots reaches the tap as the raw entries it
    /// committed (messages, idempotency keys, heads, rows, acks, trims,
    /// expiring rows); applied in order to another store they leave the
    /// same digest, run by run. Imports are not told; nothing after the
    /// tap is removed is.
    #[test]
    fn a_tap_sees_every_served_write_and_its_entries_rebuild_an_equal_copy() {
        struct Tap(std::sync::Mutex<Vec<RawEntry>>);
        impl crate::WriteTap for Tap {
            fn committed(&self, entries: Vec<RawEntry>) {
                self.0.lock().unwrap().extend(entries);
            }
        }
        let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let a = RocksStore::open(da.path(), slotted()).unwrap();
        let b = RocksStore::open(db.path(), slotted()).unwrap();
        let all = 0..SLOTS as u16;
        b.transfer().unwrap().serve_only(&[]);
        let tap = std::sync::Arc::new(Tap(Default::default()));
        a.transfer().unwrap().set_tap(Some(tap.clone()));
        let mut cmid = 0;
        for round in 1..=3u64 {
            let mut batch = Vec::new();
            let mut kv = Vec::new();
            for u in 1..=64u64 {
                cmid += 1;
                batch.push(msg(u, 9, cmid, round * 10, "m"));
                kv.push(KvOp::Put {
                    key: vec![b'r', u as u8],
                    value: round.to_be_bytes().to_vec(),
                });
                kv.push(KvOp::PutExpiring {
                    key: vec![b's', u as u8, round as u8],
                    expires_at_ms: u64::MAX,
                    value: b"status".to_vec(),
                });
            }
            a.append_with(&batch, &kv, round * 10).unwrap();
            a.write_lazy(&[KvOp::Delete { key: vec![b'r', 3] }])
                .unwrap();
            a.ack(5, 2).unwrap();
            a.trim_acked(5, u64::MAX).unwrap();
            assert_eq!(a.erase(7, &[round], 6).unwrap(), 1);
        }
        let entries = std::mem::take(&mut *tap.0.lock().unwrap());
        assert!(
            entries
                .iter()
                .any(|e| matches!(e, RawEntry::DeleteRange { .. })),
            "the trim"
        );
        b.transfer().unwrap().import(&entries).unwrap();
        let now = 1_000;
        let (da_, db_) = (
            a.transfer().unwrap().digest(all.clone(), now).unwrap(),
            b.transfer().unwrap().digest(all.clone(), now).unwrap(),
        );
        assert!(da_.entries > 64 * 3);
        assert_eq!(da_, db_, "the copy from the tap digests the same");
        for shard in 0..4 {
            let run = slots_of_shard(shard, 4);
            assert_eq!(
                a.transfer().unwrap().digest(run.clone(), now).unwrap(),
                b.transfer().unwrap().digest(run, now).unwrap()
            );
        }
        assert_eq!(picture(&a, 1..=64), picture(&b, 1..=64));
        // An import is another node's write: not told. Neither is anything
        // once the tap is gone.
        a.transfer()
            .unwrap()
            .serve_only(std::slice::from_ref(&(0..1)));
        let foreign = [RawEntry::Put {
            space: Space::Kv,
            key: vec![7, b'r', 1],
            value: b"x".to_vec(),
        }];
        a.transfer().unwrap().import(&foreign).unwrap();
        assert!(tap.0.lock().unwrap().is_empty(), "imports are not tapped");
        a.transfer().unwrap().serve_only(std::slice::from_ref(&all));
        a.transfer().unwrap().set_tap(None);
        a.append(&[msg(1, 9, 999, 99, "m")], 99).unwrap();
        assert!(tap.0.lock().unwrap().is_empty());
        // A digest changes with any entry.
        let before = a.transfer().unwrap().digest(all.clone(), now).unwrap();
        a.write_lazy(&[KvOp::Put {
            key: vec![b'r', 1],
            value: b"y".to_vec(),
        }])
        .unwrap();
        assert_ne!(before, a.transfer().unwrap().digest(all, now).unwrap());
    }

    /// The head cache keeps only inboxes of served slots. A state read where
    /// the slot is not served (a copy's target, a paused old owner) is
    /// answered from disk and not kept, and a change of the served set drops
    /// the states of the slots it changed: an import landing while such a
    /// read is under way cannot leave an older head behind for the slot's
    /// next owner to hand out again.
    #[test]
    fn only_the_inboxes_of_served_slots_are_cached() {
        let dir = tempfile::tempdir().unwrap();
        let s = RocksStore::open(dir.path(), slotted()).unwrap();
        let run = slots_of_shard(1, 4);
        let others = [0..run.start, run.end..SLOTS as u16];
        let u = (1..=255u64)
            .find(|u| run.contains(&u16::from(slot_of(*u))))
            .unwrap();
        let t = s.transfer().unwrap();
        assert_eq!(seqs(&s.append(&[msg(u, 9, 1, 1, "m")], 1).unwrap()), [1]);
        assert_eq!(s.cached(u).map(|c| c.head_seq), Some(1), "served: cached");
        t.serve_only(&others);
        assert_eq!(
            s.cached(u),
            None,
            "dropped when the slot stops being served"
        );
        assert_eq!(s.state(u).unwrap().head_seq, 1);
        assert_eq!(s.cached(u), None, "a read where not served is not kept");
        t.serve_only(std::slice::from_ref(&(0..SLOTS as u16)));
        assert_eq!(s.state(u).unwrap().head_seq, 1);
        assert_eq!(
            s.cached(u).map(|c| c.head_seq),
            Some(1),
            "served again: cached"
        );
    }

    /// A node that has moved shards away deletes their runs (a range
    /// deletion over each, and every cached head forgotten) while its other
    /// inboxes go on taking messages, acknowledgements and trims: each of
    /// those inboxes' heads, read again from disk, is still its last
    /// sequence, from the memtable and from table files alike.
    #[test]
    fn deleting_a_moved_run_leaves_the_other_inboxes_heads() {
        let dir = tempfile::tempdir().unwrap();
        let s = RocksStore::open(dir.path(), slotted()).unwrap();
        let t = s.transfer().unwrap();
        let runs: Vec<_> = (0..8).map(|n| slots_of_shard(n, 8)).collect();
        let in_run = |u: u64, r: &std::ops::Range<u16>| r.contains(&u16::from(slot_of(u)));
        let users: Vec<u64> = (1..=255).collect();
        let mut heads = std::collections::HashMap::<u64, u64>::new();
        let mut cmid = 0u64;
        for round in 0..40u64 {
            // The run that leaves this round (all of it served again after).
            let leaving = &runs[(round % 8) as usize];
            let kept: Vec<u64> = users
                .iter()
                .copied()
                .filter(|u| !in_run(*u, leaving))
                .collect();
            let mut batch = Vec::new();
            for &u in &kept {
                for _ in 0..1 + (u + round) % 3 {
                    cmid += 1;
                    batch.push(msg(u, 9, cmid, cmid, "m"));
                }
            }
            let acks: Vec<KvOp> = kept
                .iter()
                .filter(|u| (*u + round) % 2 == 0)
                .map(|&u| KvOp::Ack {
                    inbox: u,
                    up_to_seq: heads.get(&u).copied().unwrap_or(0) + 1,
                })
                .collect();
            for (m, o) in batch
                .iter()
                .zip(s.append_with(&batch, &acks, cmid).unwrap())
            {
                match o {
                    AppendOutcome::Stored(p) => {
                        let h = heads.entry(m.inbox).or_default();
                        assert_eq!(p.seq, *h + 1, "round {round}: inbox {}", m.inbox);
                        *h = p.seq;
                    }
                    other => panic!("round {round}: {other:?}"),
                }
            }
            for &u in kept.iter().filter(|u| (*u + round) % 3 == 0) {
                s.trim_acked(u, u64::MAX).unwrap();
            }
            if round % 5 == 4 {
                s.flush_memtables().unwrap();
            }
            let others: Vec<_> = runs.iter().filter(|r| *r != leaving).cloned().collect();
            t.serve_only(&others);
            t.delete_slots(leaving.clone()).unwrap();
            for &u in &kept {
                assert_eq!(
                    s.state(u).unwrap().head_seq,
                    heads.get(&u).copied().unwrap_or(0),
                    "round {round}: inbox {u}"
                );
            }
            // The leaving users come back empty: their heads start again.
            for &u in users.iter().filter(|u| in_run(**u, leaving)) {
                heads.remove(&u);
            }
            t.serve_only(std::slice::from_ref(&(0..SLOTS as u16)));
        }
    }

    /// What the other spaces hold for `users`, for comparing two stores.
    fn picture(s: &RocksStore, users: impl Iterator<Item = u64>) -> Vec<String> {
        let mut out = Vec::new();
        for u in users {
            let st = s.state(u).unwrap();
            let read: Vec<_> = s
                .read_after(u, 0, 1000)
                .unwrap()
                .into_iter()
                .map(|m| (m.seq, m.record.client_msg_id))
                .collect();
            let kv = s.get(&[b'r', u as u8]).unwrap();
            let statuses = s.scan_expiring(&[b's', u as u8], 0, 100).unwrap();
            out.push(format!("{u}: {st:?} {read:?} {kv:?} {statuses:?}"));
        }
        out
    }

    /// A run of slots whose inboxes lie in several table files is copied
    /// whole in small chunks: each chunk after the first starts with a
    /// seek to the last one's next key, which in the inbox family's
    /// prefix mode skipped the files without that key's owner (a drain
    /// under load lost one user's whole inbox this way: its new owner
    /// began it again at sequence 1).
    #[test]
    fn a_run_of_slots_in_several_files_is_exported_whole_in_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let s = RocksStore::open(dir.path(), slotted()).unwrap();
        let run = slots_of_shard(1, 4);
        let moving: Vec<u64> = (1..=2000u64)
            .filter(|u| run.contains(&u16::from(slot_of(*u))))
            .collect();
        assert!(moving.len() > 200);
        // Owners in key order, in three files: the first third, the
        // second, the last (each flushed on its own).
        let mut keyed = moving.clone();
        keyed.sort_by_key(|&u| (slot_of(u), u));
        let mut cmid = 0;
        for part in keyed.chunks(keyed.len().div_ceil(3)) {
            let batch: Vec<NewMessage> = part
                .iter()
                .flat_map(|&u| (0..3).map(move |i| msg(u, 9, u * 10 + i, u * 10 + i, "m")))
                .collect();
            cmid += 1;
            s.append_with(&batch, &[], cmid).unwrap();
            s.flush_memtables().unwrap();
        }
        let transfer = s.transfer().unwrap();
        let mut from = None;
        let (mut chunks, mut inbox_rows) = (0, 0u64);
        loop {
            let chunk = transfer.export(run.clone(), from, 2048).unwrap();
            chunks += 1;
            inbox_rows += chunk
                .entries
                .iter()
                .filter(|e| {
                    matches!(
                        e,
                        RawEntry::Put {
                            space: Space::Inbox,
                            ..
                        }
                    )
                })
                .count() as u64;
            from = chunk.next;
            if from.is_none() {
                break;
            }
        }
        assert!(chunks > 10, "{chunks} chunks");
        assert_eq!(
            inbox_rows,
            moving.len() as u64 * 3,
            "every inbox row of the run"
        );
        assert_eq!(
            transfer.count(run).unwrap()[Space::Inbox as usize],
            inbox_rows
        );
    }

    /// A shard (a run of slots) copied from one store to another while the
    /// first keeps taking writes, then brought up to date from what the
    /// watch saw, ends equal: every inbox (messages, cursors, trims),
    /// key-value and expiring row, and the idempotency entries; nothing of
    /// other slots comes along; the source then deletes the run and keeps
    /// the rest.
    #[test]
    fn a_run_of_slots_copied_while_written_ends_equal_and_leaves_the_source_cleanly() {
        let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let a = RocksStore::open(da.path(), slotted()).unwrap();
        let b = RocksStore::open(db.path(), slotted()).unwrap();
        let run = slots_of_shard(1, 4);
        let all = 0..SLOTS as u16;
        let others = [0..run.start, run.end..SLOTS as u16];
        // The new owner serves the run only once it is switched to it, and
        // takes no copy into, nor deletes, a run it serves.
        let stray = [RawEntry::Put {
            space: Space::Kv,
            key: vec![run.start as u8, b'r', 1],
            value: b"x".to_vec(),
        }];
        assert!(matches!(
            b.transfer().unwrap().import(&stray),
            Err(StoreError::Layout(_))
        ));
        assert!(b.transfer().unwrap().delete_slots(run.clone()).is_err());
        b.transfer().unwrap().serve_only(&others);
        // As a copy begins: the new owner deletes what an earlier attempt
        // left (a range tombstone under every row the copy brings).
        b.transfer().unwrap().delete_slots(run.clone()).unwrap();
        let moving = |u: u64| run.contains(&u16::from(slot_of(u)));
        let users = || 1..=255u64;
        assert!(users().filter(|u| moving(*u)).count() > 30);
        let mut cmid = 0u64;
        let mut round = |s: &RocksStore, n: u64| {
            let mut batch = Vec::new();
            let mut kv = Vec::new();
            for u in users().filter(|u| u % n == 0) {
                cmid += 1;
                batch.push(msg(u, 9, cmid, cmid, "m"));
                kv.push(KvOp::Put {
                    key: vec![b'r', u as u8],
                    value: cmid.to_be_bytes().to_vec(),
                });
                kv.push(KvOp::PutExpiring {
                    key: vec![b's', u as u8, cmid as u8],
                    expires_at_ms: u64::MAX,
                    value: b"st".to_vec(),
                });
            }
            s.append_with(&batch, &kv, cmid).unwrap();
        };
        for _ in 0..4 {
            round(&a, 1);
        }
        let transfer = a.transfer().unwrap();
        transfer.watch(run.clone());
        let mut from = None;
        let mut chunks = 0;
        loop {
            let chunk = transfer.export(run.clone(), from, 2048).unwrap();
            b.transfer().unwrap().import(&chunk.entries).unwrap();
            chunks += 1;
            // Writes while the copy runs: new messages, cursors moved and
            // trims (range deletions), rows replaced and deleted.
            round(&a, 1 + chunks % 3);
            for u in users().filter(|u| u % 5 == chunks % 5) {
                a.ack(u, 2).unwrap();
                a.trim_acked(u, u64::MAX).unwrap();
                a.append_with(
                    &[],
                    &[
                        KvOp::Delete {
                            key: vec![b'r', u as u8],
                        },
                        KvOp::DeleteExpiringRange {
                            from: vec![b's', u as u8],
                            to: vec![b's', u as u8, 3],
                        },
                    ],
                    0,
                )
                .unwrap();
            }
            // Readers on the new owner while it copies (a session sent
            // away): what they see is not kept for later.
            for u in users().filter(|u| moving(*u)).take(8) {
                b.state(u).unwrap();
                assert_eq!(b.cached(u), None, "inbox {u}: read where not served, kept");
            }
            from = chunk.next;
            if from.is_none() {
                break;
            }
        }
        assert!(chunks > 5, "the copy took several chunks ({chunks})");
        for _ in 0..3 {
            let changes = transfer.changes();
            assert!(!changes.is_empty(), "writes happened since");
            b.transfer()
                .unwrap()
                .import(&transfer.read(&changes).unwrap())
                .unwrap();
            round(&a, 2);
        }
        // The shard pauses: its slots stop taking writes, which go on for
        // the others (and are refused for it); the last round.
        transfer.serve_only(&others);
        let refused = transfer.not_served();
        round(&a, 1);
        assert!(
            transfer.not_served() > refused,
            "the paused slots refused writes"
        );
        let last = transfer.changes();
        b.transfer()
            .unwrap()
            .import(&transfer.read(&last).unwrap())
            .unwrap();
        transfer.unwatch();
        assert!(transfer.changes().is_empty());

        assert_eq!(
            picture(&b, users().filter(|u| moving(*u))),
            picture(&a, users().filter(|u| moving(*u))),
            "the copy equals the source"
        );
        let (in_a, in_b) = (
            transfer.count(run.clone()).unwrap(),
            b.transfer().unwrap().count(run.clone()).unwrap(),
        );
        assert_eq!(in_a, in_b, "every space, entry for entry");
        assert!(in_a.iter().all(|n| *n > 0), "{in_a:?}");
        let outside = others.clone();
        for r in outside.clone() {
            assert_eq!(
                b.transfer().unwrap().count(r).unwrap(),
                [0; 5],
                "nothing else came"
            );
        }
        // The switch: the new owner serves the run.
        b.transfer().unwrap().serve_only(std::slice::from_ref(&all));
        // Retries of moved messages are recognised at the new owner.
        let u = users().find(|u| moving(*u)).unwrap();
        let first = a.read_after(u, 0, 1).unwrap()[0].record.clone();
        let again = b
            .append(
                &[msg(u, 9, first.client_msg_id, 1, "m")],
                first.timestamp_ms + 1,
            )
            .unwrap();
        assert!(matches!(again[0], AppendOutcome::Duplicate(_)), "{again:?}");
        let head = b.state(u).unwrap().head_seq;
        let next = b.append(&[msg(u, 9, 1 << 40, 1, "m")], 1).unwrap();
        assert_eq!(
            seqs(&next),
            vec![head + 1],
            "the new owner goes on from the head"
        );

        let others: Vec<String> = picture(&a, users().filter(|u| !moving(*u)));
        let others_counts: Vec<[u64; 5]> = outside
            .iter()
            .map(|r| transfer.count(r.clone()).unwrap())
            .collect();
        transfer.delete_slots(run.clone()).unwrap();
        assert_eq!(transfer.count(run.clone()).unwrap(), [0; 5]);
        assert_eq!(
            a.state(u).unwrap(),
            InboxState::default(),
            "gone from the source"
        );
        assert!(a.get(&[b'r', u as u8]).unwrap().is_none());
        assert_eq!(
            picture(&a, users().filter(|u| !moving(*u))),
            others,
            "the rest stays"
        );
        let after: Vec<[u64; 5]> = outside
            .iter()
            .map(|r| transfer.count(r.clone()).unwrap())
            .collect();
        assert_eq!(after, others_counts);
    }
}

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

    /// Appends write no meta row: after a reopen an inbox's head is its last
    /// row's sequence, or, once a trim removed every row, the head the trim
    /// wrote; never a sequence handed out again. Neighbouring inboxes' rows
    /// never lend their sequences. Both layouts, from the WAL and from
    /// table files.
    #[test]
    fn reopened_heads_come_from_the_last_row_or_the_trim_that_removed_it() {
        for (layout, cfg) in [("flat", config()), ("slotted", slotted())] {
            for flushed in [false, true] {
                let dir = tempfile::tempdir().unwrap();
                {
                    let s = RocksStore::open(dir.path(), cfg.clone()).unwrap();
                    // 1: four rows, never acknowledged; 2: three rows, all
                    // acknowledged and trimmed; 3: one row; 4: nothing.
                    let batch: Vec<_> = (1..=4)
                        .map(|i| msg(1, 9, i, i, "a"))
                        .chain((1..=3).map(|i| msg(2, 9, 10 + i, i, "b")))
                        .chain([msg(3, 9, 20, 1, "c")])
                        .collect();
                    s.append(&batch, 5).unwrap();
                    s.ack(2, 3).unwrap();
                    assert_eq!(s.trim_acked(2, 10).unwrap().oldest_seq, 4);
                    let meta = s.db.cf_handle("meta").unwrap();
                    let metas = s.db.iterator_cf(meta, rocksdb::IteratorMode::Start).count();
                    assert_eq!(metas, 1, "{layout}: only the ack and the trim wrote meta");
                    if flushed {
                        s.flush_memtables().unwrap();
                    }
                }
                let s = RocksStore::open(dir.path(), cfg.clone()).unwrap();
                let heads: Vec<_> = (1..=4).map(|u| s.state(u).unwrap().head_seq).collect();
                assert_eq!(heads, vec![4, 3, 1, 0], "{layout}, flushed {flushed}");
                let st = s.state(2).unwrap();
                assert_eq!((st.acked_seq, st.oldest_seq), (3, 4));
                let next = s
                    .append(
                        &[
                            msg(1, 9, 5, 6, "a"),
                            msg(2, 9, 14, 6, "b"),
                            msg(4, 9, 30, 6, "d"),
                        ],
                        6,
                    )
                    .unwrap();
                assert_eq!(seqs(&next), vec![5, 4, 1], "{layout}, flushed {flushed}");
                let again = s.append(&[msg(1, 9, 4, 7, "a")], 7).unwrap();
                assert!(matches!(again[0], AppendOutcome::Duplicate(p) if p.seq == 4));
            }
        }
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

    /// An inbox's head comes from its last key: a key there of another
    /// length is reported, never read as an empty inbox (which would hand
    /// out its sequences again).
    #[test]
    fn a_corrupt_last_inbox_key_is_reported_not_read_as_no_row() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = RocksStore::open(dir.path(), config()).unwrap();
            s.append(&[msg(1, 9, 1, 1, "x")], 1).unwrap();
            let cf = s.db.cf_handle("inbox").unwrap();
            let mut key = 1u64.to_be_bytes().to_vec();
            key.extend_from_slice(&[0xff; 3]);
            s.db.put_cf(cf, key, b"junk").unwrap();
        }
        let s = RocksStore::open(dir.path(), config()).unwrap();
        assert!(matches!(s.state(1), Err(StoreError::Corrupt { .. })));
        assert!(matches!(
            s.append(&[msg(1, 9, 2, 2, "y")], 2),
            Err(StoreError::Corrupt { .. })
        ));
        assert_eq!(s.state(2).unwrap().head_seq, 0, "other inboxes are read");
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
