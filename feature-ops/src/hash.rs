//! `H`: the one hash function of the feature spec.
//!
//! `H(v1, v2, ...)` is XXH3-64 with the spec's seed over the concatenated encodings of the
//! values: an integer is the byte `0x01` then 8 bytes little-endian two's complement; a string is
//! the byte `0x02`, 4 bytes little-endian length, then its UTF-8 bytes. The encoding is built in a
//! stack buffer and streamed into XXH3 only when it outgrows the buffer, so hashing allocates
//! nothing. `docs/feature-ops.md` states the same rule for other languages.

use xxhash_rust::xxh3::{xxh3_64_with_seed, Xxh3};

const TAG_INT: u8 = 0x01;
const TAG_STR: u8 = 0x02;
const STACK: usize = 192;

/// Incremental builder of `H(v1, v2, ...)`.
pub struct ValueHasher {
    seed: u64,
    buf: [u8; STACK],
    len: usize,
    /// Created on the first overflow of `buf`; boxed because the XXH3 state is large and the
    /// common case (short values) never needs it.
    stream: Option<Box<Xxh3>>,
}

impl std::fmt::Debug for ValueHasher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ValueHasher")
            .field("seed", &self.seed)
            .field("buffered", &self.len)
            .field("streaming", &self.stream.is_some())
            .finish()
    }
}

impl ValueHasher {
    /// A hasher over no values yet.
    #[inline]
    pub fn new(seed: u64) -> Self {
        ValueHasher {
            seed,
            buf: [0; STACK],
            len: 0,
            stream: None,
        }
    }

    #[inline]
    fn push(&mut self, bytes: &[u8]) {
        if self.len + bytes.len() <= STACK {
            self.buf[self.len..self.len + bytes.len()].copy_from_slice(bytes);
            self.len += bytes.len();
            return;
        }
        let seed = self.seed;
        let stream = self
            .stream
            .get_or_insert_with(|| Box::new(Xxh3::with_seed(seed)));
        stream.update(&self.buf[..self.len]);
        self.len = 0;
        if bytes.len() <= STACK {
            self.buf[..bytes.len()].copy_from_slice(bytes);
            self.len = bytes.len();
        } else {
            stream.update(bytes);
        }
    }

    /// Appends an integer.
    #[inline]
    pub fn int(&mut self, v: i64) {
        let mut enc = [0u8; 9];
        let n = encode_int(v, &mut enc);
        self.push(&enc[..n]);
    }

    /// Appends a string.
    ///
    /// # Panics
    /// Never for inputs the serving path can see: strings over 4 GiB cannot arrive in a frame.
    /// The length is saturated rather than checked, which is unreachable in practice.
    #[inline]
    pub fn str(&mut self, v: &str) {
        self.push(&str_head(v));
        self.push(v.as_bytes());
    }

    /// The hash of everything appended so far.
    #[inline]
    pub fn finish(&self) -> u64 {
        match &self.stream {
            None => xxh3_64_with_seed(&self.buf[..self.len], self.seed),
            Some(stream) => {
                let mut s = stream.as_ref().clone();
                s.update(&self.buf[..self.len]);
                s.digest()
            }
        }
    }
}

/// `H(v)` for one integer.
#[inline]
pub fn hash_int(seed: u64, v: i64) -> u64 {
    let mut enc = [0u8; 9];
    let n = encode_int(v, &mut enc);
    hash_encoded(seed, &enc[..n])
}

/// Writes what `H` hashes for the integer `v` (its tag and 8 bytes) to the start of `enc` (at
/// least 9 bytes) and returns its length, as [`encode_str`] does for strings.
#[inline]
pub(crate) fn encode_int(v: i64, enc: &mut [u8]) -> usize {
    enc[0] = TAG_INT;
    enc[1..9].copy_from_slice(&v.to_le_bytes());
    9
}

/// `H(v)` for one string.
#[inline]
pub fn hash_str(seed: u64, v: &str) -> u64 {
    let mut enc = [0u8; 64];
    match encode_str(v, &mut enc) {
        Some(n) => hash_encoded(seed, &enc[..n]),
        None => {
            let mut h = ValueHasher::new(seed);
            h.str(v);
            h.finish()
        }
    }
}

/// Writes what `H` hashes for the string `v` (its tag, length and bytes) to the start of `enc`
/// and returns its length, when it fits (in `enc.len() - 5` bytes); [`hash_encoded`] then
/// gives `H(v)`. Callers hashing many strings encode several before hashing the first, so that
/// the hash reads bytes already in the cache instead of waiting for the encoding's stores.
#[inline]
pub(crate) fn encode_str(v: &str, enc: &mut [u8]) -> Option<usize> {
    let n = v.len() + 5;
    if n > enc.len() {
        return None;
    }
    enc[..5].copy_from_slice(&str_head(v));
    enc[5..n].copy_from_slice(v.as_bytes());
    Some(n)
}

/// What `H` hashes before a string's bytes: its tag and its length (saturated at `u32::MAX`,
/// which no string the serving path can see reaches).
#[inline]
fn str_head(v: &str) -> [u8; 5] {
    let len = u32::try_from(v.len()).unwrap_or(u32::MAX);
    let mut head = [0u8; 5];
    head[0] = TAG_STR;
    head[1..].copy_from_slice(&len.to_le_bytes());
    head
}

/// `H` of a value encoded by [`encode_str`] or [`encode_int`].
#[inline]
pub(crate) fn hash_encoded(seed: u64, enc: &[u8]) -> u64 {
    xxh3_64_with_seed(enc, seed)
}

/// `x mod d` for a fixed divisor `d`, without a division instruction: with
/// `c = ceil(2^128 / d)`, `x mod d = ((c * x) mod 2^128) * d / 2^128` exactly for every 64-bit
/// `x` (Lemire, Kaser and Kurz, "Faster remainder by direct computation", 2019). The hashing
/// transforms reduce every hash by their bucket count.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FastMod {
    c: u128,
    d: u32,
}

impl FastMod {
    /// The reducer for divisor `d`.
    ///
    /// # Panics
    /// If `d` is 0.
    pub fn new(d: u32) -> FastMod {
        assert!(d > 0, "modulo by zero");
        // d = 1: c = 2^128 wraps to 0, and 0 is the right remainder.
        let c = (u128::MAX / u128::from(d)).wrapping_add(1);
        FastMod { c, d }
    }

    /// The divisor.
    #[inline]
    pub fn divisor(&self) -> u32 {
        self.d
    }

    /// `x mod d`.
    #[inline]
    pub fn rem(&self, x: u64) -> u32 {
        let low = self.c.wrapping_mul(u128::from(x));
        let d = u128::from(self.d);
        let lo = (low as u64 as u128) * d;
        let hi = (low >> 64) * d;
        ((hi + (lo >> 64)) >> 64) as u32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(seed: u64, f: impl FnOnce(&mut ValueHasher)) -> u64 {
        let mut hasher = ValueHasher::new(seed);
        f(&mut hasher);
        hasher.finish()
    }

    /// The check values of the spec (docs/feature-ops.md); independent of this code, they were
    /// computed with the Python `xxhash` package.
    #[test]
    fn spec_check_values() {
        assert_eq!(h(0, |_| {}), 0x2d06800538d394c2);
        assert_eq!(hash_str(0, "Beijing"), 5488856726142131741);
        assert_eq!(hash_str(7, "Beijing"), 17350227834697080378);
        assert_eq!(hash_int(0, 42), 4435642637180117100);
        let two = h(0, |h| {
            h.str("Bachelors");
            h.str("Exec-managerial");
        });
        assert_eq!(two, 6260398409332401948);
        assert_eq!(two % 1000, 948);
        let mixed = h(0, |h| {
            h.int(1234567890123);
            h.str("item_9");
        });
        assert_eq!(mixed, 3218985593075669235);
    }

    #[test]
    fn single_value_shortcuts_match_the_builder() {
        for s in [
            "",
            "a",
            "Beijing",
            &"x".repeat(59),
            &"y".repeat(60),
            &"z".repeat(500),
        ] {
            assert_eq!(hash_str(3, s), h(3, |h| h.str(s)), "len {}", s.len());
        }
        for v in [0, -1, i64::MIN, i64::MAX, 42] {
            assert_eq!(hash_int(9, v), h(9, |h| h.int(v)));
        }
    }

    #[test]
    fn fast_mod_equals_the_remainder() {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let divisors = [
            1,
            2,
            3,
            7,
            10,
            100,
            1000,
            100_000,
            999_983,
            1 << 31,
            u32::MAX - 1,
            u32::MAX,
        ];
        for &d in &divisors {
            let f = FastMod::new(d);
            for v in [
                0,
                1,
                u64::from(d) - 1,
                u64::from(d),
                u64::MAX,
                u64::MAX - 1,
                1 << 63,
            ] {
                assert_eq!(u64::from(f.rem(v)), v % u64::from(d), "{v} mod {d}");
            }
            for _ in 0..10_000 {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                assert_eq!(u64::from(f.rem(x)), x % u64::from(d), "{x} mod {d}");
            }
        }
    }

    /// Streaming past the stack buffer must give the one-shot hash of the full encoding.
    #[test]
    fn long_inputs_stream_to_the_same_hash() {
        let parts: Vec<String> = (0..100)
            .map(|i| format!("value-{i}-{}", "q".repeat(i)))
            .collect();
        let mut enc = Vec::new();
        let mut hasher = ValueHasher::new(11);
        for (i, p) in parts.iter().enumerate() {
            hasher.str(p);
            enc.push(TAG_STR);
            enc.extend_from_slice(&(p.len() as u32).to_le_bytes());
            enc.extend_from_slice(p.as_bytes());
            hasher.int(i as i64);
            enc.push(TAG_INT);
            enc.extend_from_slice(&(i as i64).to_le_bytes());
        }
        assert_eq!(hasher.finish(), xxh3_64_with_seed(&enc, 11));
    }
}
