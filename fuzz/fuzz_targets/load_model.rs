//! Fuzzes the model loader: every input must give `Ok` or a typed error, never a panic or UB.
//!
//! Raw inputs rarely pass the header checksum, so half of the inputs are first wrapped into a
//! file with a correct header and body checksum around fuzzer-chosen blob and metadata bytes:
//! that drives the FlatBuffers verifier, the decoder and the invariants.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rankd_formats::{body_checksum, Header, FORMAT_VERSION, HEADER_LEN};

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode & 1 == 0 {
        let _ = rankd_formats::parse(rest);
        return;
    }
    // Wrap: the next two bytes pick how many 64-byte blocks of blob region precede the metadata.
    if rest.len() < 2 {
        return;
    }
    let blocks = u16::from_le_bytes([rest[0], rest[1]]) as usize % 64;
    let body = &rest[2..];
    let blob_len = (blocks * 64).min(body.len() / 64 * 64);
    let (blobs, meta) = body.split_at(blob_len);
    if meta.is_empty() {
        return;
    }
    let mut file = vec![0u8; HEADER_LEN];
    file.extend_from_slice(blobs);
    file.extend_from_slice(meta);
    let chunk_log2 = 12;
    let header = Header {
        version: FORMAT_VERSION,
        chunk_log2,
        file_len: file.len() as u64,
        meta_offset: (HEADER_LEN + blob_len) as u64,
        meta_len: meta.len() as u64,
        body_checksum: body_checksum(&file, chunk_log2, 1),
    };
    file[..HEADER_LEN].copy_from_slice(&header.encode());
    let _ = rankd_formats::parse(&file);
});
