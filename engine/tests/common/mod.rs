//! Models and requests shared by the engine tests.

#![allow(dead_code)]

use rankd_engine::request::DenseRequest;
use rankd_engine::Model;
use rankd_feature_ops::Value;
use rankd_formats::synth::{write_synthetic, ModelKind, SynthOptions};

pub const TOLERANCE: f64 = 1e-5;

pub fn model(kind: ModelKind, dir: &std::path::Path) -> Model {
    let path = dir.join(format!("{kind:?}.rkm"));
    write_synthetic(
        &path,
        &SynthOptions {
            kind,
            dim: 8,
            hidden: vec![24, 12],
            item_buckets: 500,
            seed: 42,
            ..SynthOptions::default()
        },
    )
    .unwrap();
    Model::open(&path).unwrap()
}

/// Feature order of the synthetic spec: user_age, user_city, hour, item_id, item_tags, item_price.
pub struct Owned {
    tags: Vec<Vec<String>>,
}

pub fn owned(n: usize) -> Owned {
    let pool = ["news", "sport", "unknown-tag", "film", "zzz"];
    Owned {
        tags: (0..n)
            .map(|i| {
                (0..(i % 4))
                    .map(|j| pool[(i + j) % pool.len()].to_string())
                    .collect()
            })
            .collect(),
    }
}

pub fn request<'a>(o: &'a Owned, n: usize, variant: usize) -> DenseRequest<'a> {
    let cities = ["Paris", "Atlantis", "Tokyo"];
    let user = vec![
        if variant % 3 == 2 {
            Value::Missing
        } else {
            Value::F64(31.5 + variant as f64)
        },
        Value::Str(cities[variant % 3]),
        Value::Int((variant as i64 * 5) % 30),
        Value::Missing,
        Value::Missing,
        Value::Missing,
    ];
    let items = (0..n)
        .map(|i| {
            let mut v = vec![Value::Missing; 6];
            v[3] = if i % 7 == 6 {
                Value::Missing
            } else {
                Value::Int(i as i64 * 7919)
            };
            v[4] = Value::StrList(&o.tags[i]);
            v[5] = if i % 5 == 4 {
                Value::Missing
            } else {
                Value::F64(i as f64 * 0.37)
            };
            if i % 6 == 1 {
                // An item overriding a request-level feature.
                v[1] = Value::Str("Lima");
            }
            v
        })
        .collect();
    DenseRequest { user, items }
}

/// Every GPU the CUDA driver finds, started; `None` (and the reason printed) where there is none.
pub fn real_gpus() -> Option<std::sync::Arc<rankd_engine::gpu::Gpus>> {
    use rankd_engine::gpu::{probe, BatchSettings, Gpus};
    match probe() {
        Err(why) => {
            eprintln!("skipped: no GPU here: {why}");
            None
        }
        Ok(devs) => {
            let ordinals: Vec<usize> = devs.iter().map(|d| d.ordinal).collect();
            Some(Gpus::start(&ordinals, BatchSettings::default()).expect("the GPUs start"))
        }
    }
}

/// Feed-model requests of these sizes, each from a seed of its own (3, 4, ...).
pub fn feed_requests(sizes: &[usize]) -> Vec<rankd_formats::synth::feed::Values> {
    sizes
        .iter()
        .enumerate()
        .map(|(i, &n)| rankd_formats::synth::feed::request(n, 3 + i as u64))
        .collect()
}

/// Every head's scores of every item of `reqs` (one head for a single-task model), request
/// after request.
pub fn scores(
    engine: &mut rankd_engine::cpu::CpuEngine,
    model: &Model,
    reqs: &[DenseRequest<'_>],
) -> Vec<f32> {
    use rankd_engine::InferenceBackend;
    let refs: Vec<&dyn rankd_engine::Request> = reqs
        .iter()
        .map(|r| r as &dyn rankd_engine::Request)
        .collect();
    let mut out = rankd_engine::BatchOutput::default();
    engine.score(model, &refs, &mut out);
    let mut all = Vec::new();
    for i in 0..reqs.len() {
        for h in 0..model.num_heads() {
            all.extend_from_slice(out.head(i, h).unwrap().unwrap());
        }
    }
    all
}

/// Ids of every slot `reqs` touch (request-level and item rows, through the real transforms),
/// per slot.
pub fn touched(model: &Model, reqs: &[DenseRequest<'_>]) -> Vec<std::collections::BTreeSet<u32>> {
    use rankd_engine::{ItemRow, UserRow};
    let spec = model.features();
    let mut out = vec![std::collections::BTreeSet::new(); spec.slots().len()];
    for r in reqs {
        let mut rows = Vec::new();
        let mut b = rankd_feature_ops::SlotBatch::new();
        spec.transform_row(&UserRow(r), &mut b).unwrap();
        rows.push(b);
        for item in 0..rankd_engine::Request::num_items(r) {
            let mut b = rankd_feature_ops::SlotBatch::new();
            spec.transform_row(&ItemRow { request: r, item }, &mut b)
                .unwrap();
            rows.push(b);
        }
        for b in &rows {
            for (s, set) in out.iter_mut().enumerate() {
                if spec.slots()[s].kind.num_ids().is_some() {
                    set.extend(b.ids(s, 0).iter().copied());
                }
            }
        }
    }
    out
}
