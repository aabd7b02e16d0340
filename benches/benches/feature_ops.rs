//! Values per second per core for each transform, on realistic inputs: Zipf-distributed ids and
//! strings of 8-32 bytes, vocabularies of 100 and 1,000,000 entries.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use std::collections::HashMap;

use rankd_benches::Zipf;
use rankd_feature_ops::hash::hash_str;
use rankd_feature_ops::{
    CompiledSpec, FeatureSpec, FeatureType, RawFeature, SlotBatch, SlotSpec, Transform, Value,
    Vocabulary,
};

const ROWS: usize = 8192;

fn spec(features: &[(&str, FeatureType)], slots: Vec<(&str, Transform)>) -> CompiledSpec {
    CompiledSpec::compile(&FeatureSpec {
        hash_seed: 0,
        features: features
            .iter()
            .map(|(n, t)| RawFeature {
                name: (*n).into(),
                ty: *t,
            })
            .collect(),
        slots: slots
            .into_iter()
            .map(|(n, t)| SlotSpec {
                name: n.into(),
                transform: t,
            })
            .collect(),
    })
    .unwrap()
}

/// A string of 8..=32 bytes for rank `r`.
fn word(r: usize) -> String {
    let len = 8 + (r.wrapping_mul(2_654_435_761) % 25);
    let mut s = format!("w{r:x}_");
    while s.len() < len {
        s.push((b'a' + (s.len() * 7 + r) as u8 % 26) as char);
    }
    s.truncate(len.max(s.len().min(32)));
    s
}

fn run(c: &mut Criterion, name: &str, spec: &CompiledSpec, rows: &[Vec<Value<'_>>]) {
    let mut group = c.benchmark_group("feature_ops");
    group.throughput(Throughput::Elements(rows.len() as u64));
    let mut out = SlotBatch::new();
    group.bench_function(name, |b| {
        b.iter(|| {
            out.clear();
            for r in rows {
                spec.transform_row(r, &mut out).unwrap();
            }
            out.rows()
        })
    });
    group.finish();
}

fn bench(c: &mut Criterion) {
    let mut zipf_small = Zipf::new(120, 1.1, 1);
    let mut zipf_big = Zipf::new(1_200_000, 1.05, 2);

    // piecewise: 50 quantile-like boundaries.
    let boundaries: Vec<f64> = (0..50).map(|i| (i * i) as f64).collect();
    let s = spec(
        &[("x", FeatureType::Float)],
        vec![(
            "b",
            Transform::Piecewise {
                input: "x".into(),
                boundaries,
            },
        )],
    );
    let rows: Vec<Vec<Value<'_>>> = (0..ROWS)
        .map(|i| vec![Value::F64((i * 37 % 2600) as f64 * 0.97)])
        .collect();
    run(c, "piecewise_50_boundaries", &s, &rows);

    // pickcat on integers.
    for (label, n, zipf) in [
        ("pickcat_int_vocab_100", 100usize, &mut zipf_small),
        ("pickcat_int_vocab_1M", 1_000_000, &mut zipf_big),
    ] {
        let vocab: Vec<i64> = (0..n as i64).map(|i| i * 7919 + 13).collect();
        let s = spec(
            &[("id", FeatureType::Int)],
            vec![(
                "p",
                Transform::Pickcat {
                    input: "id".into(),
                    vocabulary: Vocabulary::Int(vocab),
                    oov_buckets: 1000,
                },
            )],
        );
        let rows: Vec<Vec<Value<'_>>> = (0..ROWS)
            .map(|_| vec![Value::Int(zipf.next_rank() as i64 * 7919 + 13)])
            .collect();
        run(c, label, &s, &rows);
    }

    // pickcat on strings of 8-32 bytes.
    for (label, n, zipf) in [
        ("pickcat_str_vocab_100", 100usize, &mut zipf_small),
        ("pickcat_str_vocab_1M", 1_000_000, &mut zipf_big),
    ] {
        let vocab: Vec<String> = (0..n).map(word).collect();
        let s = spec(
            &[("w", FeatureType::String)],
            vec![(
                "p",
                Transform::Pickcat {
                    input: "w".into(),
                    vocabulary: Vocabulary::Str(vocab),
                    oov_buckets: 1000,
                },
            )],
        );
        let words: Vec<String> = (0..ROWS).map(|_| word(zipf.next_rank())).collect();
        let rows: Vec<Vec<Value<'_>>> = words.iter().map(|w| vec![Value::Str(w)]).collect();
        run(c, label, &s, &rows);
        // Baseline in the same run: std HashMap<String, u32> (SipHash) lookups of the same words,
        // with the spec's hash on a miss.
        let map: HashMap<String, u32> = (0..n).map(|i| (word(i), i as u32)).collect();
        let mut group = c.benchmark_group("feature_ops");
        group.throughput(Throughput::Elements(words.len() as u64));
        let mut ids = Vec::with_capacity(words.len());
        group.bench_function(format!("baseline_std_hashmap_{label}"), |b| {
            b.iter(|| {
                ids.clear();
                for w in &words {
                    ids.push(match map.get(w.as_str()) {
                        Some(&i) => i,
                        None => n as u32 + (hash_str(0, w) % 1000) as u32,
                    });
                }
                ids.len()
            })
        });
        group.finish();
    }

    // combinehash on 16-byte strings, one and two inputs.
    let words: Vec<String> = (0..ROWS).map(|i| format!("user_{i:011}")).collect();
    assert!(words.iter().all(|w| w.len() == 16));
    let s = spec(
        &[("w", FeatureType::String)],
        vec![(
            "h",
            Transform::Combinehash {
                inputs: vec!["w".into()],
                buckets: 1 << 24,
            },
        )],
    );
    let rows: Vec<Vec<Value<'_>>> = words.iter().map(|w| vec![Value::Str(w)]).collect();
    run(c, "combinehash_str16", &s, &rows);
    let s = spec(
        &[("w", FeatureType::String), ("v", FeatureType::String)],
        vec![(
            "h",
            Transform::Combinehash {
                inputs: vec!["w".into(), "v".into()],
                buckets: 1 << 24,
            },
        )],
    );
    let rows: Vec<Vec<Value<'_>>> = words
        .iter()
        .zip(words.iter().rev())
        .map(|(a, b)| vec![Value::Str(a), Value::Str(b)])
        .collect();
    run(c, "combinehash_str16_x2", &s, &rows);

    // descartes of two integer pickcats (counted per row: three slots each).
    let s = spec(
        &[("a", FeatureType::Int), ("b", FeatureType::Int)],
        vec![
            (
                "pa",
                Transform::Pickcat {
                    input: "a".into(),
                    vocabulary: Vocabulary::Int((0..100).collect()),
                    oov_buckets: 1,
                },
            ),
            (
                "pb",
                Transform::Pickcat {
                    input: "b".into(),
                    vocabulary: Vocabulary::Int((0..50).collect()),
                    oov_buckets: 1,
                },
            ),
            (
                "x",
                Transform::Descartes {
                    inputs: vec!["pa".into(), "pb".into()],
                },
            ),
        ],
    );
    let rows: Vec<Vec<Value<'_>>> = (0..ROWS)
        .map(|i| vec![Value::Int((i % 101) as i64), Value::Int((i % 53) as i64)])
        .collect();
    run(c, "pickcat_x2_plus_descartes", &s, &rows);

    let s = spec(
        &[("x", FeatureType::Float)],
        vec![(
            "n",
            Transform::Normalize {
                input: "x".into(),
                mean: 3.0,
                std: 2.0,
                clip: Some(4.0),
                log1p: true,
            },
        )],
    );
    let rows: Vec<Vec<Value<'_>>> = (0..ROWS).map(|i| vec![Value::F64(i as f64)]).collect();
    run(c, "normalize_log1p_clip", &s, &rows);
}

criterion_group!(benches, bench);
criterion_main!(benches);
