//! A model file well over 4 GiB: blob offsets past 2^32 must work end to end.
//!
//! The 4.8 GB embedding table is written as a hole (sparse file) except its last row, so the test
//! costs almost no disk and little time; the full open still hashes every byte.

use rankd_formats::synth::{write_synthetic, BigTable, ModelKind, SynthOptions};
use rankd_formats::ModelFile;

#[test]
fn a_file_over_4_gib_opens_and_reads_past_the_32_bit_boundary() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("big.rkm");
    let dim = 8u32;
    let buckets = 150_000_000u32;
    let written = write_synthetic(
        &path,
        &SynthOptions {
            kind: ModelKind::Deep,
            dim,
            hidden: vec![16],
            item_buckets: buckets,
            big_table: BigTable::SparseExceptLastRow,
            ..SynthOptions::default()
        },
    )
    .unwrap();
    assert!(
        written.file_len > 4 << 30,
        "only {} bytes",
        written.file_len
    );

    let model = ModelFile::open(&path).unwrap();
    let arch = &model.spec().architecture;
    let item = arch.embeddings.iter().find(|e| e.slot == "item").unwrap();
    assert_eq!(item.rows, u64::from(buckets) + 1);
    let table = model.weights(item.weights);
    assert_eq!(table.len() as u64, item.rows * u64::from(dim));
    let last_row_offset = item.weights.offset + (item.rows - 1) * u64::from(dim) * 4;
    assert!(
        last_row_offset > 1 << 32,
        "the last row must lie past 4 GiB"
    );
    let last = &table[table.len() - dim as usize..];
    assert!(last.iter().all(|&x| x != 0.0 && x.abs() <= 0.1), "{last:?}");
    let middle = &table[table.len() / 2..table.len() / 2 + dim as usize];
    assert!(middle.iter().all(|&x| x == 0.0));
    // Layers written after the big table also lie past 4 GiB and read back intact.
    let layer = &arch.deep[0];
    assert!(layer.weight.offset > 1 << 32);
    assert!(model.weights(layer.weight).iter().any(|&x| x != 0.0));
    // The metadata section itself is small and sits at the end.
    assert!(model.header().meta_offset > 1 << 32);
    assert!(model.header().meta_len < 1 << 20);
}
