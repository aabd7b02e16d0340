//! Vocabulary lookup tables for `pickcat`.
//!
//! Open addressing with linear probing over a power-of-two table at most half full, one flat
//! allocation per table, so a lookup in a vocabulary of millions touches one or two cache lines.
//! String tables are keyed by `H(v)` itself, the hash the out-of-vocabulary rule needs anyway, so
//! a string is hashed once whether or not it is found.

use crate::hash::hash_str;

const EMPTY: u32 = u32::MAX;

/// A finalizer with full avalanche (MurmurHash3's fmix64): integer keys are often small and
/// dense, and the table index is taken from the low bits.
#[inline]
fn mix(mut k: u64) -> u64 {
    k ^= k >> 33;
    k = k.wrapping_mul(0xff51afd7ed558ccd);
    k ^= k >> 33;
    k = k.wrapping_mul(0xc4ceb9fe1a85ec53);
    k ^ (k >> 33)
}

fn capacity_for(n: usize) -> usize {
    (n.max(1) * 2).next_power_of_two()
}

/// Integer vocabulary: value -> position.
#[derive(Clone, Debug)]
pub struct IntVocab {
    /// `(key, index)`; `index == EMPTY` marks a free entry.
    table: Box<[(i64, u32)]>,
    mask: usize,
    len: usize,
}

impl IntVocab {
    /// Builds the table. Returns the position of the first duplicate value as the error.
    pub fn new(values: &[i64]) -> Result<Self, usize> {
        let cap = capacity_for(values.len());
        let mut table = vec![(0i64, EMPTY); cap].into_boxed_slice();
        let mask = cap - 1;
        for (idx, &v) in values.iter().enumerate() {
            let mut pos = mix(v as u64) as usize & mask;
            loop {
                let entry = &mut table[pos];
                if entry.1 == EMPTY {
                    *entry = (v, idx as u32);
                    break;
                }
                if entry.0 == v {
                    return Err(idx);
                }
                pos = (pos + 1) & mask;
            }
        }
        Ok(IntVocab {
            table,
            mask,
            len: values.len(),
        })
    }

    /// Position of `v`, if present.
    #[inline]
    pub fn get(&self, v: i64) -> Option<u32> {
        let mut pos = mix(v as u64) as usize & self.mask;
        loop {
            let (key, idx) = self.table[pos];
            if idx == EMPTY {
                return None;
            }
            if key == v {
                return Some(idx);
            }
            pos = (pos + 1) & self.mask;
        }
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// String vocabulary: value -> position, keyed by `H(v)` with the spec's seed.
#[derive(Clone, Debug)]
pub struct StrVocab {
    /// `(H(v), index, start)`; `index == EMPTY` marks a free entry. `start` is where the string
    /// is stored in `bytes`, so a lookup reads the table entry and then one place in `bytes`.
    table: Box<[(u64, u32, u32)]>,
    mask: usize,
    /// All strings, each prefixed by its length: one byte below 255, else 255 and 4 bytes LE.
    bytes: Box<[u8]>,
    len: usize,
    seed: u64,
}

/// The length-prefixed string stored at `start`.
#[inline]
fn stored(bytes: &[u8], start: u32) -> &[u8] {
    let s = start as usize;
    match bytes[s] {
        255 => {
            let n = u32::from_le_bytes(bytes[s + 1..s + 5].try_into().expect("4 bytes")) as usize;
            &bytes[s + 5..s + 5 + n]
        }
        n => &bytes[s + 1..s + 1 + n as usize],
    }
}

/// Byte-slice equality without a call into libc for the short strings vocabularies hold: one or
/// two overlapping word compares up to 16 bytes.
#[inline]
fn bytes_eq(a: &[u8], b: &[u8]) -> bool {
    let n = a.len();
    if n != b.len() {
        return false;
    }
    let word = |s: &[u8], at: usize| u64::from_le_bytes(s[at..at + 8].try_into().expect("8 bytes"));
    let half = |s: &[u8], at: usize| u32::from_le_bytes(s[at..at + 4].try_into().expect("4 bytes"));
    match n {
        0 => true,
        1..=3 => a == b,
        4..=7 => half(a, 0) == half(b, 0) && half(a, n - 4) == half(b, n - 4),
        8..=16 => word(a, 0) == word(b, 0) && word(a, n - 8) == word(b, n - 8),
        _ => a == b,
    }
}

/// Errors building a [`StrVocab`].
#[derive(Debug, PartialEq, Eq)]
pub enum StrVocabError {
    /// The value at this position repeats an earlier one.
    Duplicate(usize),
    /// The strings add up to more than 4 GiB.
    TooLarge,
}

impl StrVocab {
    /// Builds the table.
    pub fn new<S: AsRef<str>>(values: &[S], seed: u64) -> Result<Self, StrVocabError> {
        let total: usize = values
            .iter()
            .map(|s| s.as_ref().len() + if s.as_ref().len() < 255 { 1 } else { 5 })
            .sum();
        if u32::try_from(total).is_err() {
            return Err(StrVocabError::TooLarge);
        }
        let cap = capacity_for(values.len());
        let mut vocab = StrVocab {
            table: vec![(0u64, EMPTY, 0u32); cap].into_boxed_slice(),
            mask: cap - 1,
            bytes: Box::default(),
            len: values.len(),
            seed,
        };
        let mut bytes = Vec::with_capacity(total);
        for (idx, v) in values.iter().enumerate() {
            let v = v.as_ref();
            let start = bytes.len() as u32;
            if v.len() < 255 {
                bytes.push(v.len() as u8);
            } else {
                bytes.push(255);
                bytes.extend_from_slice(&(v.len() as u32).to_le_bytes());
            }
            bytes.extend_from_slice(v.as_bytes());
            let h = hash_str(seed, v);
            let mut pos = h as usize & vocab.mask;
            loop {
                let (key, other, other_start) = vocab.table[pos];
                if other == EMPTY {
                    vocab.table[pos] = (h, idx as u32, start);
                    break;
                }
                if key == h && stored(&bytes, other_start) == v.as_bytes() {
                    return Err(StrVocabError::Duplicate(idx));
                }
                pos = (pos + 1) & vocab.mask;
            }
        }
        vocab.bytes = bytes.into_boxed_slice();
        Ok(vocab)
    }

    /// The seed the table was keyed with.
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// Asks the cache for the table slot where the lookup of a value hashed to `h` starts (no
    /// effect on the result of any lookup).
    #[inline]
    pub fn prefetch(&self, h: u64) {
        crate::prefetch::line(&self.table[h as usize & self.mask]);
    }

    /// Position of `v`, given `h = H(v)` computed with [`StrVocab::seed`].
    #[inline]
    pub fn get_hashed(&self, v: &str, h: u64) -> Option<u32> {
        let mut pos = h as usize & self.mask;
        loop {
            let (key, idx, start) = self.table[pos];
            if idx == EMPTY {
                return None;
            }
            if key == h && bytes_eq(stored(&self.bytes, start), v.as_bytes()) {
                return Some(idx);
            }
            pos = (pos + 1) & self.mask;
        }
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn int_lookup_finds_every_entry_and_nothing_else() {
        let values: Vec<i64> = (0..10_000).map(|i| i * 7 - 30_000).collect();
        let vocab = IntVocab::new(&values).unwrap();
        for (i, &v) in values.iter().enumerate() {
            assert_eq!(vocab.get(v), Some(i as u32));
        }
        assert_eq!(vocab.get(1), None);
        assert_eq!(vocab.get(i64::MAX), None);
        assert_eq!(IntVocab::new(&[3, 4, 3]).unwrap_err(), 2);
        assert_eq!(IntVocab::new(&[]).unwrap().get(0), None);
    }

    #[test]
    fn short_byte_compare_agrees_with_slice_equality() {
        let words: Vec<Vec<u8>> = (0..=20)
            .flat_map(|n| {
                let base: Vec<u8> = (0..n as u8).map(|i| b'a' + i).collect();
                let mut out = vec![base.clone()];
                for at in 0..n {
                    let mut w = base.clone();
                    w[at] ^= 1;
                    out.push(w);
                }
                out
            })
            .collect();
        for a in &words {
            for b in &words {
                assert_eq!(bytes_eq(a, b), a == b, "{a:?} vs {b:?}");
            }
        }
    }

    #[test]
    fn str_lookup_finds_every_entry_and_nothing_else() {
        let values: Vec<String> = (0..5_000).map(|i| format!("v{i}")).collect();
        let vocab = StrVocab::new(&values, 5).unwrap();
        for (i, v) in values.iter().enumerate() {
            assert_eq!(vocab.get_hashed(v, hash_str(5, v)), Some(i as u32));
        }
        assert_eq!(vocab.get_hashed("nope", hash_str(5, "nope")), None);
        assert_eq!(vocab.get_hashed("", hash_str(5, "")), None);
        assert_eq!(
            StrVocab::new(&["a", "b", "a"], 0).unwrap_err(),
            StrVocabError::Duplicate(2)
        );
        // Empty strings and lengths around the one-byte length prefix's limit.
        let values: Vec<String> = [0usize, 1, 254, 255, 256, 1000]
            .iter()
            .map(|&n| "x".repeat(n))
            .chain(["y".repeat(255)])
            .collect();
        let vocab = StrVocab::new(&values, 1).unwrap();
        for (i, v) in values.iter().enumerate() {
            assert_eq!(
                vocab.get_hashed(v, hash_str(1, v)),
                Some(i as u32),
                "len {}",
                v.len()
            );
        }
        let other = "x".repeat(257);
        assert_eq!(vocab.get_hashed(&other, hash_str(1, &other)), None);
        let mut dup = values.clone();
        dup.push("x".repeat(1000));
        assert_eq!(
            StrVocab::new(&dup, 1).unwrap_err(),
            StrVocabError::Duplicate(7)
        );
    }
}
