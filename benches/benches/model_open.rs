//! Open + verify cost of model files: a 1 MiB model and a 2 GiB one, with the checksum
//! (`ModelFile::open`) and without (`ModelFile::open_trusted`).

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use rankd_formats::synth::{write_synthetic, BigTable, ModelKind, SynthOptions};
use rankd_formats::ModelFile;

fn bench_open(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        // item table 16k x 16 f32 = 1 MiB.
        ("1MiB", 16_384u32),
        // item table 32M x 16 f32 = 2 GiB.
        ("2GiB", 32 << 20),
    ];
    let mut group = c.benchmark_group("model_open");
    group.sample_size(10);
    for (name, buckets) in cases {
        let path = dir.path().join(format!("{name}.rkm"));
        let written = write_synthetic(
            &path,
            &SynthOptions {
                kind: ModelKind::Deep,
                dim: 16,
                hidden: vec![256, 128],
                item_buckets: buckets,
                big_table: BigTable::Dense,
                ..SynthOptions::default()
            },
        )
        .unwrap();
        group.throughput(Throughput::Bytes(written.file_len));
        group.bench_with_input(BenchmarkId::new("verified", name), &path, |b, p| {
            b.iter(|| ModelFile::open(p).unwrap())
        });
        group.bench_with_input(BenchmarkId::new("trusted", name), &path, |b, p| {
            // SAFETY: the file was written above and verified by the `verified` case.
            b.iter(|| unsafe { ModelFile::open_trusted(p) }.unwrap())
        });
    }
    group.finish();
}

criterion_group!(benches, bench_open);
criterion_main!(benches);
