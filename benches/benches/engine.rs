//! The engine on the synthetic feed model (docs/benchmarks.md): 200-item requests on one core,
//! with and without the request-level split, the deep layers alone, and the single-core sgemm
//! peak of `gemm` on a 256x512x256 product measured in the same run. `benches/peers.py` measures
//! onnxruntime on the same deep layers and batch.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use rankd_benches::feed;
use rankd_engine::cpu::{CpuEngine, Split};
use rankd_engine::request::DenseRequest;
use rankd_engine::{BatchOutput, InferenceBackend, Model};

const ITEMS: usize = 200;

fn sgemm_peak(c: &mut Criterion) {
    let (m, k, n) = (256usize, 512usize, 256usize);
    let a: Vec<f32> = (0..m * k).map(|i| (i % 17) as f32 * 0.01).collect();
    let b: Vec<f32> = (0..k * n).map(|i| (i % 13) as f32 * 0.01).collect();
    let mut dst = vec![0f32; m * n];
    let mut group = c.benchmark_group("sgemm");
    // Throughput in FLOPs: criterion's "elem/s" then reads as FLOP/s.
    group.throughput(Throughput::Elements((2 * m * k * n) as u64));
    group.bench_function("gemm_256x512x256", |bench| {
        bench.iter(|| {
            // SAFETY: the three buffers are sized exactly for the row-major shapes below and do
            // not overlap.
            unsafe {
                gemm::gemm(
                    m,
                    n,
                    k,
                    dst.as_mut_ptr(),
                    1,
                    n as isize,
                    false,
                    a.as_ptr(),
                    1,
                    k as isize,
                    b.as_ptr(),
                    1,
                    n as isize,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    gemm::Parallelism::None,
                )
            };
            dst[0]
        })
    });
    group.finish();
}

fn engine(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("feed.rkm");
    feed::write(&path).unwrap();
    let model = Model::open(&path).unwrap();
    println!(
        "feed model: deep input {}, {} deep MACs per item",
        model.deep_input_dim(),
        model.deep_macs_per_item()
    );
    let values: Vec<feed::Values> = (0..8).map(|s| feed::request(ITEMS, s + 1)).collect();
    let requests: Vec<DenseRequest<'_>> = values.iter().map(DenseRequest::from).collect();

    let mut group = c.benchmark_group("engine_feed");
    group.throughput(Throughput::Elements(ITEMS as u64));
    for (name, split) in [("split", Split::RequestLevel), ("no_split", Split::Off)] {
        let mut engine = CpuEngine::with_split(split);
        let mut out = BatchOutput::default();
        let mut i = 0;
        group.bench_function(BenchmarkId::new("200_items", name), |b| {
            b.iter(|| {
                out.clear();
                engine.score(&model, &[&requests[i % requests.len()]], &mut out);
                i += 1;
                out.scores.len()
            })
        });
    }
    // The deep layers alone on a ready 200-row input: the part onnxruntime is compared on.
    let mut engine = CpuEngine::new();
    let x: Vec<f32> = (0..ITEMS * model.deep_input_dim())
        .map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5)
        .collect();
    let mut logits = Vec::new();
    group.bench_function("deep_layers_only_200", |b| {
        b.iter(|| {
            engine.forward_dense(&model, &x, ITEMS, &mut logits);
            logits[0]
        })
    });
    group.finish();
}

criterion_group!(benches, sgemm_peak, engine);
criterion_main!(benches);
