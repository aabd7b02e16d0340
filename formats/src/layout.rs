//! The byte layout of a model file: header, blob region, metadata section, checksums.
//!
//! ```text
//! offset  size  field
//! 0       8     magic "RANKDMDL"
//! 8       4     format version (u32 LE), currently 1
//! 12      4     log2 of the checksum chunk size (u32 LE)
//! 16      8     file length in bytes (u64 LE)
//! 24      8     metadata offset (u64 LE, multiple of 64)
//! 32      8     metadata length (u64 LE, at most 2 GiB - 1)
//! 40      8     body checksum (u64 LE)
//! 48      8     reserved, zero
//! 56      8     header checksum: XXH3-64 of bytes 0..56
//! 64      ...   weight blobs, each at a multiple of 64, little-endian f32
//! meta    ...   the FlatBuffer (schema/model.fbs), padded with zeros to the file end
//! ```
//!
//! The body checksum covers bytes `64..file_len` in chunks of `2^chunk_log2` bytes: it is the
//! XXH3-64 of the concatenated little-endian XXH3-64s of the chunks. Chunks hash independently,
//! so a multi-GiB file verifies on every core at once.

use xxhash_rust::xxh3::{xxh3_64, Xxh3};

use crate::error::{FormatError, Result};

/// The eight magic bytes at offset 0.
pub const MAGIC: [u8; 8] = *b"RANKDMDL";
/// The newest format version this build reads and writes. Version 2 adds f16 and int8 embedding
/// tables, version 3 DCN-v2 cross layers,
/// version 4 multi-task heads; a file is written with the oldest version that holds
/// it, so older readers read what they can ([`crate::ModelSpec::format_version`]).
pub const FORMAT_VERSION: u32 = 4;
/// Size of the fixed header.
pub const HEADER_LEN: usize = 64;
/// Alignment of every blob and of the metadata section.
pub const BLOB_ALIGN: u64 = 64;
/// Chunk size the writer uses for the body checksum: 4 MiB.
pub const DEFAULT_CHUNK_LOG2: u32 = 22;
/// The FlatBuffer must stay addressable by 32-bit offsets.
pub const MAX_META_LEN: u64 = (1 << 31) - 1;

/// The decoded fixed header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// Format version.
    pub version: u32,
    /// log2 of the checksum chunk size.
    pub chunk_log2: u32,
    /// Total file length.
    pub file_len: u64,
    /// Offset of the FlatBuffer.
    pub meta_offset: u64,
    /// Length of the FlatBuffer.
    pub meta_len: u64,
    /// Body checksum.
    pub body_checksum: u64,
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

impl Header {
    /// Encodes the header, header checksum included.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..8].copy_from_slice(&MAGIC);
        b[8..12].copy_from_slice(&self.version.to_le_bytes());
        b[12..16].copy_from_slice(&self.chunk_log2.to_le_bytes());
        b[16..24].copy_from_slice(&self.file_len.to_le_bytes());
        b[24..32].copy_from_slice(&self.meta_offset.to_le_bytes());
        b[32..40].copy_from_slice(&self.meta_len.to_le_bytes());
        b[40..48].copy_from_slice(&self.body_checksum.to_le_bytes());
        let h = xxh3_64(&b[..56]);
        b[56..64].copy_from_slice(&h.to_le_bytes());
        b
    }

    /// Decodes and checks the header of a file of `actual_len` bytes whose first bytes are
    /// `bytes`. Checks, in order: length, magic, version, header checksum, field ranges.
    pub fn decode(bytes: &[u8], actual_len: u64) -> Result<Header> {
        if bytes.len() < HEADER_LEN {
            return Err(FormatError::Truncated(format!(
                "{} bytes, shorter than the {HEADER_LEN}-byte header",
                bytes.len()
            )));
        }
        let magic: [u8; 8] = bytes[0..8].try_into().expect("8 bytes");
        if magic != MAGIC {
            return Err(FormatError::BadMagic(magic));
        }
        let version = u32_at(bytes, 8);
        if version == 0 || version > FORMAT_VERSION {
            return Err(FormatError::UnsupportedVersion {
                found: version,
                supported: FORMAT_VERSION,
            });
        }
        let stored = u64_at(bytes, 56);
        let computed = xxh3_64(&bytes[..56]);
        if stored != computed {
            return Err(FormatError::Checksum {
                part: "header",
                stored,
                computed,
            });
        }
        let h = Header {
            version,
            chunk_log2: u32_at(bytes, 12),
            file_len: u64_at(bytes, 16),
            meta_offset: u64_at(bytes, 24),
            meta_len: u64_at(bytes, 32),
            body_checksum: u64_at(bytes, 40),
        };
        if u64_at(bytes, 48) != 0 {
            return Err(FormatError::Header("reserved field is not zero".into()));
        }
        if actual_len < h.file_len {
            return Err(FormatError::Truncated(format!(
                "the header says {} bytes but the file has {actual_len}",
                h.file_len
            )));
        }
        if actual_len > h.file_len {
            return Err(FormatError::Header(format!(
                "the header says {} bytes but the file has {actual_len} (trailing bytes)",
                h.file_len
            )));
        }
        if !(12..=40).contains(&h.chunk_log2) {
            return Err(FormatError::Header(format!(
                "checksum chunk size 2^{} is out of range 2^12..=2^40",
                h.chunk_log2
            )));
        }
        let meta_end = h.meta_offset.checked_add(h.meta_len);
        if h.meta_offset < HEADER_LEN as u64
            || !h.meta_offset.is_multiple_of(BLOB_ALIGN)
            || h.meta_len == 0
            || h.meta_len > MAX_META_LEN
            || meta_end.is_none_or(|end| end > h.file_len)
        {
            return Err(FormatError::Header(format!(
                "metadata section {}+{} does not fit the file of {} bytes",
                h.meta_offset, h.meta_len, h.file_len
            )));
        }
        Ok(h)
    }
}

/// Files smaller than this are checksummed on one thread.
const PARALLEL_MIN_BYTES: usize = 32 << 20;

/// The body checksum of `file` (the whole file, header included; the header is skipped), using
/// up to `threads` threads.
pub fn body_checksum(file: &[u8], chunk_log2: u32, threads: usize) -> u64 {
    let body = file.get(HEADER_LEN..).unwrap_or(&[]);
    let chunk = 1usize << chunk_log2.min(usize::BITS - 2);
    let n_chunks = body.len().div_ceil(chunk);
    let mut hashes = vec![0u64; n_chunks];
    // Spawning threads costs more than hashing a small file on the caller's thread.
    let threads = if body.len() < PARALLEL_MIN_BYTES {
        1
    } else {
        threads.clamp(1, n_chunks.max(1))
    };
    if threads == 1 {
        for (h, c) in hashes.iter_mut().zip(body.chunks(chunk)) {
            *h = xxh3_64(c);
        }
    } else {
        let per = n_chunks.div_ceil(threads);
        std::thread::scope(|s| {
            for (t, out) in hashes.chunks_mut(per).enumerate() {
                let start = t * per * chunk;
                let end = (start + per * chunk).min(body.len());
                let part = &body[start..end];
                s.spawn(move || {
                    for (h, c) in out.iter_mut().zip(part.chunks(chunk)) {
                        *h = xxh3_64(c);
                    }
                });
            }
        });
    }
    let mut cat = Vec::with_capacity(hashes.len() * 8);
    for h in hashes {
        cat.extend_from_slice(&h.to_le_bytes());
    }
    xxh3_64(&cat)
}

/// Like [`body_checksum`] on the caller's thread, reading at most `bytes_per_sec` on average:
/// after each chunk it sleeps while it is ahead of that pace. A daemon verifying a new version
/// in the background spreads the file's pass through the shared caches and memory over time
/// instead of bursting it beside the cores that serve requests.
pub fn body_checksum_paced(file: &[u8], chunk_log2: u32, bytes_per_sec: u64) -> u64 {
    let body = file.get(HEADER_LEN..).unwrap_or(&[]);
    let chunk = 1usize << chunk_log2.min(usize::BITS - 2);
    let start = std::time::Instant::now();
    let mut done = 0u64;
    let mut hasher = BodyHasher::new(chunk_log2);
    for c in body.chunks(chunk) {
        hasher.update(c);
        done += c.len() as u64;
        let due = std::time::Duration::from_secs_f64(done as f64 / bytes_per_sec.max(1) as f64);
        let now = start.elapsed();
        if due > now + std::time::Duration::from_millis(1) {
            std::thread::sleep(due - now);
        }
    }
    hasher.finish()
}

/// [`body_checksum`] over a body that arrives in pieces: feed it every byte after the header,
/// in order, then [`BodyHasher::finish`].
#[derive(Clone)]
pub struct BodyHasher {
    chunk: u64,
    filled: u64,
    state: Xxh3,
    cat: Vec<u8>,
}

impl std::fmt::Debug for BodyHasher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BodyHasher")
            .field("chunk", &self.chunk)
            .field("filled", &self.filled)
            .field("chunks_done", &(self.cat.len() / 8))
            .finish()
    }
}

impl BodyHasher {
    /// A hasher for chunks of `1 << chunk_log2` bytes (the header's `chunk_log2`).
    pub fn new(chunk_log2: u32) -> BodyHasher {
        BodyHasher {
            chunk: 1u64 << chunk_log2.min(usize::BITS - 2),
            filled: 0,
            state: Xxh3::new(),
            cat: Vec::new(),
        }
    }

    /// The next bytes of the body.
    pub fn update(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            let take = (self.chunk - self.filled).min(bytes.len() as u64) as usize;
            self.state.update(&bytes[..take]);
            self.filled += take as u64;
            bytes = &bytes[take..];
            if self.filled == self.chunk {
                self.cat
                    .extend_from_slice(&self.state.digest().to_le_bytes());
                self.state.reset();
                self.filled = 0;
            }
        }
    }

    /// The body checksum of everything fed.
    pub fn finish(mut self) -> u64 {
        if self.filled > 0 {
            self.cat
                .extend_from_slice(&self.state.digest().to_le_bytes());
        }
        xxh3_64(&self.cat)
    }
}

/// The number of threads checksum verification uses by default.
pub fn default_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Rounds `x` up to a multiple of [`BLOB_ALIGN`].
pub fn align_up(x: u64) -> u64 {
    x.div_ceil(BLOB_ALIGN) * BLOB_ALIGN
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> Header {
        Header {
            version: 1,
            chunk_log2: 12,
            file_len: 256,
            meta_offset: 128,
            meta_len: 100,
            body_checksum: 7,
        }
    }

    #[test]
    fn paced_checksum_equals_the_parallel_one_and_keeps_its_pace() {
        let file: Vec<u8> = (0..(3 << 20) + 777).map(|i| (i * 31 % 251) as u8).collect();
        let want = body_checksum(&file, 16, 2);
        assert_eq!(body_checksum(&file, 16, 1), want);
        let start = std::time::Instant::now();
        // 3 MiB at 32 MiB/s: at least ~94 ms.
        assert_eq!(body_checksum_paced(&file, 16, 32 << 20), want);
        assert!(
            start.elapsed() >= std::time::Duration::from_millis(85),
            "{:?}",
            start.elapsed()
        );
    }

    #[test]
    fn body_hasher_equals_the_one_shot_checksum_whatever_the_pieces() {
        for len in [
            0usize,
            1,
            63,
            64,
            65,
            64 + 4096,
            64 + 3 * 4096,
            64 + 3 * 4096 + 5,
            50_000,
        ] {
            let file: Vec<u8> = (0..len).map(|i| (i * 131 % 253) as u8).collect();
            let want = body_checksum(&file, 12, 1);
            let body = file.get(HEADER_LEN..).unwrap_or(&[]);
            for piece in [1usize, 7, 4095, 4096, 4097, 1 << 20] {
                let mut h = BodyHasher::new(12);
                for p in body.chunks(piece) {
                    h.update(p);
                }
                assert_eq!(h.finish(), want, "len {len}, pieces of {piece}");
            }
        }
        // The chunking matters: a different chunk size gives a different checksum.
        let file: Vec<u8> = (0..20_000).map(|i| (i % 256) as u8).collect();
        let mut h = BodyHasher::new(13);
        h.update(&file[HEADER_LEN..]);
        assert_ne!(h.finish(), body_checksum(&file, 12, 1));
    }

    #[test]
    fn header_round_trips() {
        let h = header();
        assert_eq!(Header::decode(&h.encode(), 256).unwrap(), h);
    }

    #[test]
    fn every_header_byte_is_protected() {
        let good = header().encode();
        for i in 0..HEADER_LEN {
            let mut b = good;
            b[i] ^= 0x10;
            assert!(
                Header::decode(&b, 256).is_err(),
                "flip at byte {i} went unnoticed"
            );
        }
    }

    #[test]
    fn checksum_is_independent_of_thread_count() {
        let data: Vec<u8> = (0..100_000u32).map(|i| (i * 31 % 251) as u8).collect();
        let one = body_checksum(&data, 12, 1);
        for t in 2..6 {
            assert_eq!(body_checksum(&data, 12, t), one);
        }
        // Large enough to use threads.
        let big: Vec<u8> = (0..PARALLEL_MIN_BYTES + 12345)
            .map(|i| (i % 251) as u8)
            .collect();
        let single = body_checksum(&big, 16, 1);
        assert_eq!(body_checksum(&big, 16, 2), single);
        assert_eq!(body_checksum(&big, 16, 7), single);
        let mut other = data.clone();
        other[99_999] ^= 1;
        assert_ne!(body_checksum(&other, 12, 3), one);
        // The header bytes are not part of the body.
        other = data.clone();
        other[3] ^= 1;
        assert_eq!(body_checksum(&other, 12, 1), one);
    }
}
