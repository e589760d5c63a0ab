//! One Courier (or relay) user as one task over its raw connection: the
//! generator's hot loop.
//!
//! The task reads frames straight out of its buffer, handles every frame a
//! read brought, then writes what that produced in one write: the
//! acknowledgement of the batch it read (as a phone does on receiving:
//! that is what makes the sender's delivered tick appear), read marks that
//! have come due, and new sends for the room the acks made in its window.
//! No channel, lock, task or allocation per message; shared counters are
//! touched once per batch. Receipts that come back to the user (it is a
//! sender too) are counted per message for the checker, which requires
//! exactly one delivered or read receipt per message as the reader's marks
//! call for. Taken as facts (per reader, the highest inbox sequence
//! delivered and read), each acknowledged message waits in its reader's
//! queues, ordered by its `SendAck.seq`, until a fact covers it: that is
//! its receipt, counted once; a fact that goes back is an error.
//!
//! The frames of the hot path are parsed and written by hand from the byte
//! layouts in the protocol document (`Deliver`, where the codec would
//! build a `Vec<Message>` per frame, and `Send`, whose payload is written
//! in place); the rest goes through the codec, and anything not for a user
//! is ignored.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Buf, BufMut, BytesMut};
use courier_client::RawSession;
use courier_protocol::{
    decode, encode, frame_type, Body, Destination, ErrorCode, Frame, Mark, MessageKind,
    ReceiptPayload, ReceiptStatus,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::checker::Checker;
use crate::options::Acks;
use crate::pacer::Pacer;
use crate::plan::{
    client_msg_id, conversation, route_and_number, template_payload, Numbering, Route, Routes,
};
use crate::stamp;
use crate::tally::{Phase, Shared, Tally};

/// How a user reads and what it sends: the run's habits.
#[derive(Clone, Copy)]
pub(crate) struct Habits {
    pub acks: Acks,
    /// Share of read batches the user then opens (marks read).
    pub read_share: f64,
    /// How long after receiving a batch the user opens it.
    pub read_delay: Duration,
    /// Sends in flight at most.
    pub window: usize,
    /// Payload bytes.
    pub size: usize,
    /// The target writes receipts (Courier does; the relay does not).
    pub receipts: bool,
    /// ...as facts (`Receipts` frames), not as receipt messages.
    pub facts: bool,
}

/// One reader of the user's one-to-one messages, as its facts tell: how
/// far it got (inbox sequences), and the acknowledged messages not yet
/// covered as delivered, then as read: (inbox sequence, conversation,
/// number), each queue in sequence order.
#[derive(Default)]
struct Reader {
    delivered: u64,
    read: u64,
    undelivered: VecDeque<(u64, u64, u64)>,
    unread: VecDeque<(u64, u64, u64)>,
}

/// Inserts `m` in sequence order (nearly always at the back).
fn insert_by_seq(q: &mut VecDeque<(u64, u64, u64)>, m: (u64, u64, u64)) {
    let at = q.iter().rposition(|e| e.0 < m.0).map_or(0, |i| i + 1);
    q.insert(at, m);
}

/// One user's sending side.
pub(crate) struct Sender {
    pub routes: Vec<Route>,
    pub pacer: Pacer,
}

/// Deliveries between two acknowledgements in lazy mode.
const LAZY_ACK_EVERY: u32 = 256;
/// A deadline that never comes (nothing is due: the loop waits for its
/// socket or a change of the run's phase, with no timer firing).
const NEVER: Duration = Duration::from_secs(86_400);
/// How long a sender waits for its last acks.
const LAST_ACKS: Duration = Duration::from_secs(30);
/// Read buffer growth step (a frame larger than this grows it to fit).
const READ_CHUNK: usize = 16 << 10;

/// A message in flight: (route, number, intended send time).
type Slot = Option<(usize, u64, Instant)>;

/// A read mark waiting for its time: when, up to which inbox sequence, and
/// (conversation, last number read) of each conversation then.
type ReadMark = (Instant, u64, Vec<(u64, u64)>);

struct Loop {
    me: u64,
    habits: Habits,
    shared: Arc<Shared>,
    routes: Arc<Routes>,
    out: BytesMut,
    checker: Checker,
    tally: Tally,
    rng: u64,
    // Sending.
    sender: Option<Sender>,
    numbering: Numbering,
    slots: Vec<Slot>,
    free: Vec<u32>,
    /// The pacer has no more messages; when the last ack is awaited until.
    sent_all: Option<Instant>,
    /// When the next message is due (open loop), if the window has room.
    next_send: Option<Instant>,
    // Receiving.
    /// The highest inbox sequence read and the highest acknowledged.
    inbox_read: u64,
    inbox_acked: u64,
    /// Per log-strategy group stream: (group, read, acknowledged).
    streams: Vec<(u64, u64, u64)>,
    unacked: u32,
    /// Per conversation that owes receipts (not a group's): the last
    /// message number read, and the highest number a read mark covered.
    owed: Vec<(u64, u64, u64)>,
    reads: VecDeque<ReadMark>,
    /// Receipts as facts: per reader of this user's one-to-one messages.
    readers: HashMap<u64, Reader>,
    /// The highest fact version told.
    fact_version: u64,
    // Counted locally, added to the shared counters once per turn.
    delivered: u64,
    acked: u64,
    expected: u64,
    receipts: u64,
    closed: bool,
}

/// Runs one user until the run stops (or its connection ends); returns
/// what it saw for the checker.
pub(crate) async fn drive(
    me: u64,
    session: RawSession,
    sender: Option<Sender>,
    habits: Habits,
    shared: Arc<Shared>,
    routes: Arc<Routes>,
) -> Checker {
    let RawSession {
        mut reader,
        mut writer,
        welcome,
        buffered: mut input,
    } = session;
    let max_frame = welcome.max_frame_len as usize;
    let routes_len = sender.as_ref().map(|s| s.routes.len()).unwrap_or(0);
    let window = habits.window.max(1);
    let mut l = Loop {
        me,
        habits,
        shared: shared.clone(),
        routes,
        out: BytesMut::with_capacity(4096),
        checker: Checker::new(),
        tally: Tally::new(),
        rng: me.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1,
        numbering: Numbering::new(me, routes_len),
        slots: vec![None; if sender.is_some() { window } else { 0 }],
        free: if sender.is_some() {
            (1..=window as u32).rev().collect()
        } else {
            Vec::new()
        },
        sender,
        sent_all: None,
        next_send: None,
        inbox_read: welcome.resume_from.saturating_sub(1),
        inbox_acked: welcome.resume_from.saturating_sub(1),
        streams: Vec::new(),
        unacked: 0,
        owed: Vec::new(),
        reads: VecDeque::new(),
        readers: HashMap::new(),
        fact_version: 0,
        delivered: 0,
        acked: 0,
        expected: 0,
        receipts: 0,
        closed: false,
    };
    if l.sender.is_none() {
        l.sent_all = Some(Instant::now());
    }
    let never = Instant::now() + NEVER;
    let sleep = tokio::time::sleep_until(never.into());
    tokio::pin!(sleep);
    let mut wake = never;
    let mut phase = shared.watch_phase();
    let mut final_acks = false;
    loop {
        let now = Instant::now();
        l.send_due(now);
        l.reads_due(now);
        match shared.phase() {
            Phase::Running => {}
            Phase::Settling => {
                if !final_acks {
                    final_acks = true;
                    l.reads.clear();
                    l.ack_all();
                }
            }
            Phase::Stopped => break,
        }
        l.flush_counts();
        if !l.out.is_empty() {
            if writer.write_all(&l.out).await.is_err() {
                l.closed = true;
            }
            l.out.clear();
        }
        if l.closed {
            break;
        }
        // Sleep until the next due send or read mark, or the end of the
        // wait for the last acks; a quiet connection arms no timer at all
        // (10,000 of them ticking would cost the generator a good share of
        // a core).
        let mut until = never;
        if let Some(at) = l.next_send {
            until = until.min(at);
        }
        if let Some((at, _, _)) = l.reads.front() {
            until = until.min(*at);
        }
        if let (Some(_), Some(last_acks)) = (&l.sender, l.sent_all) {
            until = until.min(last_acks);
        }
        if until != wake {
            wake = until;
            sleep.as_mut().reset(wake.into());
        }
        if input.capacity() - input.len() < READ_CHUNK / 4 {
            input.reserve(READ_CHUNK);
        }
        tokio::select! {
            r = reader.read_buf(&mut input) => match r {
                Ok(0) | Err(_) => l.closed = true,
                Ok(_) => {
                    if let Err(e) = l.frames(&mut input, max_frame) {
                        shared.error(e);
                        l.closed = true;
                    }
                }
            },
            _ = &mut sleep => {}
            _ = phase.changed() => {}
        }
        if l.closed {
            if l.sent_all.is_none() {
                shared.error("closed".into());
            }
            break;
        }
    }
    l.finish();
    l.checker
}

impl Loop {
    /// Handles every whole frame in `input`.
    fn frames(&mut self, input: &mut BytesMut, max_frame: usize) -> Result<(), String> {
        let now = Instant::now();
        let mut delivered_now = false;
        while input.len() >= 4 {
            let len = u32::from_be_bytes(input[..4].try_into().expect("4 bytes")) as usize;
            if !(5..=max_frame).contains(&len) {
                return Err(format!("frame length {len}"));
            }
            if input.len() < 4 + len {
                input.reserve(4 + len - input.len());
                break;
            }
            let frame = &input[4..4 + len];
            let (kind, rid, body) = (
                frame[0],
                u32::from_be_bytes(frame[1..5].try_into().expect("4 bytes")),
                &frame[5..],
            );
            match kind {
                // SendAck: client id 8, server id 8, seq 8...
                frame_type::SEND_ACK => {
                    let seq = u64_at(body, 16).ok_or("malformed send ack")?;
                    self.answered(rid, None, now, None, seq)
                }
                frame_type::RECEIPTS => self.facts(body).ok_or("malformed receipts")?,
                // BroadcastAck: client id, server id, timestamp, delivered u16...
                frame_type::BROADCAST_ACK => {
                    let delivered = body.get(24..26).map(|d| u16::from_be_bytes([d[0], d[1]]));
                    self.answered(rid, None, now, delivered, 0)
                }
                // A request failed (request id 0: the session did).
                frame_type::ERROR => {
                    let code = reason(&input[..4 + len], max_frame)?;
                    if rid == 0 {
                        return Err(format!("{code:?}"));
                    }
                    self.answered(rid, Some(code), now, None, 0);
                }
                frame_type::GOODBYE => {
                    let code = reason(&input[..4 + len], max_frame)?;
                    if self.sent_all.is_none() || self.shared.phase() == Phase::Running {
                        self.shared.error(format!("goodbye {code:?}"));
                    }
                    self.closed = true;
                }
                frame_type::DELIVER => {
                    self.deliver(0, body, now).ok_or("malformed deliver")?;
                    delivered_now = true;
                }
                frame_type::GROUP_DELIVER => {
                    let group = u64_at(body, 0).ok_or("malformed group deliver")?;
                    self.deliver(group, &body[8..], now)
                        .ok_or("malformed group deliver")?;
                    delivered_now = true;
                }
                _ => {}
            }
            input.advance(4 + len);
        }
        if delivered_now {
            self.batch_read(now);
        }
        Ok(())
    }

    /// One `Deliver` body (`count`, then records) on `stream`.
    fn deliver(&mut self, stream: u64, body: &[u8], now: Instant) -> Option<()> {
        let count = u16_at(body, 0)?;
        let mut at = 2;
        for _ in 0..count {
            // seq 8, server id 8, sender 8, device 4, client id 8, time 8,
            // destination 9, kind 1, payload 4+n.
            let seq = u64_at(body, at)?;
            let dest_tag = *body.get(at + 44)?;
            let kind = *body.get(at + 53)?;
            let len = u32_at(body, at + 54)? as usize;
            let payload = body.get(at + 58..at + 58 + len)?;
            at += 58 + len;
            self.note_seq(stream, seq);
            if kind == 2 {
                self.receipt(payload);
                continue;
            }
            let Some((conv, n)) = self.shared.note_delivery(
                self.me,
                payload,
                now,
                &mut self.checker,
                &mut self.tally,
            ) else {
                continue;
            };
            self.delivered += 1;
            // A group's messages get counts, not receipts.
            if self.habits.receipts && dest_tag != 2 {
                match self.owed.iter_mut().find(|o| o.0 == conv) {
                    Some(o) => o.1 = o.1.max(n),
                    None => self.owed.push((conv, n, 0)),
                }
            }
        }
        (at == body.len()).then_some(())
    }

    fn note_seq(&mut self, stream: u64, seq: u64) {
        self.unacked += 1;
        if stream == 0 {
            self.inbox_read = self.inbox_read.max(seq);
            return;
        }
        match self.streams.iter_mut().find(|s| s.0 == stream) {
            Some(s) => s.1 = s.1.max(seq),
            None => self.streams.push((stream, seq, 0)),
        }
    }

    /// A receipt in this user's inbox: each message it names, counted.
    fn receipt(&mut self, p: &[u8]) {
        let Ok(r) = ReceiptPayload::decode(p) else {
            self.shared.error("malformed receipt".into());
            return;
        };
        let read = match r.status {
            ReceiptStatus::Delivered => false,
            ReceiptStatus::Read => true,
            ReceiptStatus::Viewed => return,
        };
        // Only this run's messages (ids carry the run's tag).
        for (route, n) in r
            .messages
            .iter()
            .filter_map(|&(id, _)| route_and_number(self.routes.tag, id))
        {
            self.checker
                .receipt(r.reader, conversation(self.me, route), n, read);
            self.receipts += 1;
        }
    }

    /// A `Receipts` body: `count`, then (reader, delivered, read, version)
    /// items; each moves its reader's fact, which may never go back.
    fn facts(&mut self, body: &[u8]) -> Option<()> {
        let count = u16_at(body, 0)? as usize;
        if body.len() != 2 + 32 * count {
            return None;
        }
        for i in 0..count {
            let at = 2 + 32 * i;
            let (reader, delivered, read, version) = (
                u64_at(body, at)?,
                u64_at(body, at + 8)?,
                u64_at(body, at + 16)?,
                u64_at(body, at + 24)?,
            );
            if version <= self.fact_version {
                continue; // told again (a catch-up after a missed one)
            }
            self.fact_version = version;
            let r = self.readers.entry(reader).or_default();
            if delivered < r.delivered || read < r.read {
                self.shared.error(format!(
                    "a receipt fact went back: reader {reader} from {}/{} to {delivered}/{read}",
                    r.delivered, r.read
                ));
                continue;
            }
            (r.delivered, r.read) = (delivered, read);
            self.resolve(reader);
        }
        Some(())
    }

    /// Counts the receipts `reader`'s fact now gives: each waiting message
    /// it covers as read gets a read receipt; as delivered only, a
    /// delivered one (and waits to be read).
    fn resolve(&mut self, reader: u64) {
        let Some(r) = self.readers.get_mut(&reader) else {
            return;
        };
        while let Some(&(seq, conv, n)) = r.undelivered.front() {
            if seq > r.delivered {
                break;
            }
            r.undelivered.pop_front();
            if seq <= r.read {
                self.checker.receipt(reader, conv, n, true);
            } else {
                self.checker.receipt(reader, conv, n, false);
                insert_by_seq(&mut r.unread, (seq, conv, n));
            }
            self.receipts += 1;
        }
        while let Some(&(seq, conv, n)) = r.unread.front() {
            if seq > r.read {
                break;
            }
            r.unread.pop_front();
            self.checker.receipt(reader, conv, n, true);
            self.receipts += 1;
        }
    }

    /// A read brought deliveries: acknowledge them (each batch, or every
    /// `LAZY_ACK_EVERY` in lazy mode) and perhaps open them later.
    fn batch_read(&mut self, now: Instant) {
        match self.habits.acks {
            Acks::EachBatch => self.ack_all(),
            Acks::Lazy if self.unacked >= LAZY_ACK_EVERY => self.ack_all(),
            Acks::Lazy => {}
        }
        if self.habits.read_share > 0.0 && self.chance() < self.habits.read_share {
            let convs = self.owed.iter().map(|o| (o.0, o.1)).collect();
            self.reads
                .push_back((now + self.habits.read_delay, self.inbox_read, convs));
        }
    }

    /// Acknowledges everything read so far: `Ack` for the inbox, `Mark`
    /// delivered for each log-strategy group.
    fn ack_all(&mut self) {
        self.unacked = 0;
        if self.inbox_read > self.inbox_acked {
            self.inbox_acked = self.inbox_read;
            encode(
                &Frame::new(
                    0,
                    Body::Ack {
                        up_to_seq: self.inbox_read,
                    },
                ),
                &mut self.out,
            );
        }
        for s in &mut self.streams {
            if s.1 > s.2 {
                s.2 = s.1;
                put_mark(&mut self.out, s.0, s.1, ReceiptStatus::Delivered);
            }
        }
    }

    /// Read marks whose time has come.
    fn reads_due(&mut self, now: Instant) {
        while self.reads.front().is_some_and(|r| r.0 <= now) {
            let (_, seq, convs) = self.reads.pop_front().expect("checked");
            put_mark(&mut self.out, 0, seq, ReceiptStatus::Read);
            for (conv, n) in convs {
                if let Some(o) = self.owed.iter_mut().find(|o| o.0 == conv) {
                    o.2 = o.2.max(n);
                }
            }
        }
    }

    /// Fills the window with the messages that are due.
    fn send_due(&mut self, now: Instant) {
        self.next_send = None;
        let Some(s) = &self.sender else { return };
        if self.sent_all.is_some() {
            return;
        }
        while let Some(&slot) = self.free.last() {
            let Some(intended) = s.pacer.intended(self.numbering.count) else {
                self.sent_all = Some(now + LAST_ACKS);
                break;
            };
            // (A closed loop's intended time is the moment of asking.)
            if intended > Instant::now() {
                self.next_send = Some(intended);
                break;
            }
            self.free.pop();
            let (ri, n) = self.numbering.next(&s.routes);
            let conv = conversation(self.me, ri);
            let dest = self.routes.destination(s.routes[ri].dest);
            // Send, encoded here so that the payload is written in place
            // (the codec would take it as `Bytes`, one allocation per
            // message): length, type, request id (the window slot,
            // 1-based), client id 8, destination 9, kind 1, payload 4+n.
            let size = self.habits.size.max(stamp::HEADER_LEN);
            let since = self.shared.since_start(intended);
            // The business scenario sends its template, the stamp its
            // parameter (one allocation per message there).
            let template = self
                .routes
                .template
                .then(|| template_payload(&stamp::payload(conv, n, since, stamp::HEADER_LEN)));
            let len = template.as_ref().map_or(size, |t| t.len());
            self.out.put_u32((1 + 4 + 8 + 9 + 1 + 4 + len) as u32);
            self.out.put_u8(frame_type::SEND);
            self.out.put_u32(slot);
            self.out.put_u64(client_msg_id(self.routes.tag, ri, n));
            self.out.put_u8(dest.tag());
            self.out.put_u64(dest.id());
            match &template {
                Some(t) => {
                    self.out.put_u8(MessageKind::Template as u8);
                    self.out.put_u32(len as u32);
                    self.out.put_slice(t);
                }
                None => {
                    self.out.put_u8(MessageKind::Chat as u8);
                    self.out.put_u32(size as u32);
                    stamp::put(&mut self.out, conv, n, since, size);
                }
            }
            self.slots[slot as usize - 1] = Some((ri, n, intended));
            self.tally.at(&self.shared, now).sent += 1;
            self.shared.sent.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The answer to request `rid` (a window slot): acknowledged, or
    /// refused with `code`.
    fn answered(
        &mut self,
        rid: u32,
        code: Option<ErrorCode>,
        now: Instant,
        delivered: Option<u16>,
        seq: u64,
    ) {
        let Some((ri, n, intended)) = self
            .slots
            .get_mut((rid as usize).wrapping_sub(1))
            .and_then(Option::take)
        else {
            return; // the answer to something else (a ping)
        };
        self.free.push(rid);
        let Some(s) = &self.sender else { return };
        if let Some(code) = code {
            self.shared.error(format!("{code:?}"));
            return;
        }
        let route = &s.routes[ri];
        // A broadcast answered after its leaving recipient opted out went
        // to the others.
        let without: Vec<u64>;
        let recipients = match route.leaving {
            Some(gone) if delivered == Some(route.recipients.len() as u16 - 1) => {
                without = route
                    .recipients
                    .iter()
                    .copied()
                    .filter(|&r| r != gone)
                    .collect();
                &without[..]
            }
            _ => &route.recipients[..],
        };
        let conv = conversation(self.me, ri);
        let dest = self.routes.destination(route.dest);
        let ack = (conv, n, recipients);
        self.acked += 1;
        self.expected +=
            self.shared
                .note_ack(ack, intended, now, &mut self.checker, &mut self.tally);
        if let (true, Destination::User(reader)) = (self.habits.facts, dest) {
            let r = self.readers.entry(reader).or_default();
            insert_by_seq(&mut r.undelivered, (seq, conv, n));
            self.resolve(reader);
        }
    }

    /// Adds this turn's counts to the shared ones; a sender whose window
    /// emptied after its last message (or that gave up waiting) is done.
    fn flush_counts(&mut self) {
        let s = &self.shared;
        let now = Instant::now();
        if self.delivered > 0 {
            s.delivered.fetch_add(self.delivered, Ordering::Relaxed);
            s.last_delivery_ns
                .fetch_max(s.since_start(now), Ordering::Relaxed);
            self.delivered = 0;
        }
        if self.acked > 0 {
            s.acked.fetch_add(self.acked, Ordering::Relaxed);
            s.expected.fetch_add(self.expected, Ordering::Relaxed);
            (self.acked, self.expected) = (0, 0);
        }
        if self.receipts > 0 {
            s.receipts.fetch_add(self.receipts, Ordering::Relaxed);
            self.receipts = 0;
        }
        if let Some(until) = self.sent_all {
            if self.sender.is_some() && (self.free.len() == self.slots.len() || now >= until) {
                if self.free.len() != self.slots.len() {
                    s.error("no ack before the end".into());
                }
                self.sender = None;
                s.sending_left.fetch_sub(1, Ordering::Relaxed);
            }
        }
    }

    /// At the end: counts out, and the receipts this user's reads call for
    /// handed to the checker.
    fn finish(&mut self) {
        self.flush_counts();
        if self.sender.is_some() {
            // Closed before its last acks: it sends no more.
            self.sender = None;
            self.shared.sending_left.fetch_sub(1, Ordering::Relaxed);
        }
        self.tally.flush(&self.shared);
        for &(conv, _, read_up_to) in &self.owed {
            self.checker.owes_receipts(self.me, conv, read_up_to);
        }
    }

    /// A number in [0, 1) (xorshift: each user's own sequence).
    fn chance(&mut self) -> f64 {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        (self.rng >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// The code of a whole `Error` or `Goodbye` frame (rare: the codec reads it).
fn reason(frame: &[u8], max_frame: usize) -> Result<ErrorCode, String> {
    match decode(frame, max_frame as u32) {
        Ok(Some((
            Frame {
                body: Body::Error(r) | Body::Goodbye(r),
                ..
            },
            _,
        ))) => Ok(r.code),
        _ => Err("malformed error frame".into()),
    }
}

fn put_mark(out: &mut BytesMut, stream: u64, up_to_seq: u64, status: ReceiptStatus) {
    let mark = Mark {
        stream,
        up_to_seq,
        status,
    };
    encode(&Frame::new(0, Body::Mark(mark)), out);
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_be_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_be_bytes(b.get(at..at + 8)?.try_into().ok()?))
}
