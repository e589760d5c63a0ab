//! Fuzz targets for the decoders of this crate, and a small seeded mutator.
//!
//! Each target takes arbitrary bytes and checks what must hold for every
//! input: no panic, no allocation sized by a claim beyond the bytes present
//! (the decoders' own rule), and for what decodes, a re-encoding that gives
//! the same bytes back. The same functions run in two places: the
//! `cargo fuzz` targets in `fuzz/` (coverage-guided, long runs, see
//! `docs/RELIABILITY.md`), and every crate's test suite, which drives them
//! briefly with [`Mutator`] from the test vectors (no sanitizer build).

use bytes::BytesMut;

use crate::codec::{decode, encode};
use crate::frame::DEFAULT_MAX_FRAME_LEN;
use crate::payload::{GroupEvent, ReceiptPayload};
use crate::token::TokenKey;

/// Frames: whatever `data` is, decoding returns a frame, "need more" or an
/// error; a decoded frame used at most the bytes given and re-encodes to
/// exactly them; the rest decodes on (back-to-back frames).
pub fn frames(data: &[u8]) {
    let mut rest = data;
    while let Ok(Some((frame, used))) = decode(rest, DEFAULT_MAX_FRAME_LEN) {
        assert!(
            used > 0 && used <= rest.len(),
            "used {used} of {}",
            rest.len()
        );
        let mut again = BytesMut::new();
        encode(&frame, &mut again);
        assert_eq!(&again[..], &rest[..used], "re-encoding differs");
        rest = &rest[used..];
    }
}

/// The payloads the server writes (receipts, group events): decode or
/// refuse, never panic; what decodes re-encodes to the same bytes.
pub fn payloads(data: &[u8]) {
    if let Ok(r) = ReceiptPayload::decode(data) {
        assert_eq!(&r.encode()[..], data);
    }
    if let Ok(e) = GroupEvent::decode(data) {
        assert_eq!(&e.encode()[..], data);
    }
    if let Ok(t) = crate::business::TemplateSend::decode(data) {
        assert_eq!(&t.encode()[..], data);
    }
    if let Ok(t) = crate::business::TemplateMessage::decode(data) {
        assert_eq!(&t.encode()[..], data);
    }
}

/// The key [`tokens`] verifies with (seeds mint with it).
pub fn token_key() -> TokenKey {
    TokenKey::new(b"a fuzzing secret of at least 32 bytes".to_vec())
}

/// Tokens: `data` is an identity (user u64, device u32) then a token.
/// Verification refuses or accepts, never panics, and accepts only the
/// key's own token for that identity, byte for byte (no other spelling of
/// it, no forgery).
pub fn tokens(data: &[u8]) {
    let (Some(user), Some(device)) = (data.get(..8), data.get(8..12)) else {
        return;
    };
    let user = u64::from_be_bytes(user.try_into().expect("8 bytes"));
    let device = u32::from_be_bytes(device.try_into().expect("4 bytes"));
    let token = &data[12..];
    let key = token_key();
    if let Ok(claims) = key.verify(token, user, device, 0) {
        assert_eq!(
            key.mint(claims).as_bytes(),
            token,
            "a token that is not the key's own verified"
        );
    }
}

/// A seeded byte-level mutator: the test suites' stand-in for a fuzzer's
/// mutation engine (flip, insert, delete, duplicate a slice, splice two
/// seeds, write an interesting integer), so a run can be replayed from its
/// seed.
pub struct Mutator {
    state: u64,
}

impl Mutator {
    pub fn new(seed: u64) -> Mutator {
        Mutator {
            state: seed ^ 0x9e37_79b9_7f4a_7c15,
        }
    }

    fn next(&mut self) -> u64 {
        // xorshift64*
        let mut x = self.state;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.state = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }

    /// One input: a seed (chosen at random) with 1 to 8 mutations.
    pub fn input(&mut self, seeds: &[Vec<u8>]) -> Vec<u8> {
        let mut v = seeds
            .get(self.below(seeds.len()))
            .cloned()
            .unwrap_or_default();
        for _ in 0..=self.below(8) {
            self.mutate(&mut v, seeds);
        }
        v
    }

    fn mutate(&mut self, v: &mut Vec<u8>, seeds: &[Vec<u8>]) {
        const INTERESTING: [u64; 8] =
            [0, 1, 0x7f, 0xff, 0xffff, 0x7fff_ffff, 0xffff_ffff, u64::MAX];
        let at = self.below(v.len() + 1);
        match self.below(7) {
            0 if !v.is_empty() => {
                let i = self.below(v.len());
                v[i] ^= 1 << self.below(8);
            }
            1 => v.insert(at, self.next() as u8),
            2 if at < v.len() => {
                let n = self.below(v.len() - at) + 1;
                v.drain(at..at + n.min(16));
            }
            3 if !v.is_empty() => {
                let from = self.below(v.len());
                let n = (self.below(v.len() - from) + 1).min(64);
                let piece = v[from..from + n].to_vec();
                v.splice(at..at, piece);
            }
            4 => {
                let other = seeds
                    .get(self.below(seeds.len()))
                    .cloned()
                    .unwrap_or_default();
                let from = self.below(other.len() + 1);
                v.truncate(at);
                v.extend_from_slice(&other[from..]);
            }
            5 => {
                let x = INTERESTING[self.below(INTERESTING.len())];
                let width = [1, 2, 4, 8][self.below(4)];
                let bytes = &x.to_be_bytes()[8 - width..];
                for (i, b) in bytes.iter().enumerate() {
                    if let Some(slot) = v.get_mut(at + i) {
                        *slot = *b;
                    }
                }
            }
            _ => {
                let i = self.below(v.len() + 1);
                v.truncate(i);
            }
        }
    }
}

/// Runs `target` on `count` inputs mutated from `seeds` with `seed`, and
/// on the seeds themselves. A panic names the seed and the input index so
/// the run can be replayed.
pub fn drive(name: &str, seed: u64, count: usize, seeds: &[Vec<u8>], target: impl Fn(&[u8])) {
    for s in seeds {
        target(s);
    }
    let mut m = Mutator::new(seed);
    for i in 0..count {
        let input = m.input(seeds);
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| target(&input)));
        if let Err(e) = result {
            panic!("fuzz target {name}: input {i} of seed {seed} failed ({input:02x?}): {e:?}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mutator_is_replayable_and_varied() {
        let seeds = vec![b"hello world".to_vec()];
        let a: Vec<Vec<u8>> = (0..50)
            .scan(Mutator::new(7), |m, _| Some(m.input(&seeds)))
            .collect();
        let b: Vec<Vec<u8>> = (0..50)
            .scan(Mutator::new(7), |m, _| Some(m.input(&seeds)))
            .collect();
        assert_eq!(a, b, "the same seed gives the same inputs");
        let distinct: std::collections::HashSet<_> = a.iter().collect();
        assert!(
            distinct.len() > 40,
            "only {} distinct inputs",
            distinct.len()
        );
    }
}
