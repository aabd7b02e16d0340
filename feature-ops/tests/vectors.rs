//! Cross-language vectors written by an independent Python implementation of the rules
//! (`scripts/feature_ops_vectors.py`), and property tests over random rows.

use proptest::prelude::*;
use rankd_feature_ops::{
    CompiledSpec, FeatureSpec, FeatureType, OwnedValue, SlotBatch, SlotKind, Value,
};
use serde_json::Value as Json;

/// One raw value of the vectors file, owned so that `Value`s can borrow from it.
fn from_json(v: Option<&Json>, ty: FeatureType) -> OwnedValue {
    match (v, ty) {
        (None, _) => OwnedValue::Missing,
        (Some(v), FeatureType::Float) => OwnedValue::Float(v.as_f64().unwrap()),
        (Some(v), FeatureType::Int) => OwnedValue::Int(v.as_i64().unwrap()),
        (Some(v), FeatureType::String) => OwnedValue::Str(v.as_str().unwrap().to_owned()),
        (Some(v), FeatureType::IntList) => OwnedValue::IntList(
            v.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_i64().unwrap())
                .collect(),
        ),
        (Some(v), FeatureType::StringList) => OwnedValue::StrList(
            v.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_str().unwrap().to_owned())
                .collect(),
        ),
    }
}

#[test]
fn cross_language_vectors() {
    let data: Json =
        serde_json::from_str(include_str!("data/vectors.json")).expect("vectors.json parses");
    let spec: FeatureSpec = serde_json::from_value(data["spec"].clone()).unwrap();
    let compiled = CompiledSpec::compile(&spec).unwrap();
    let cases = data["cases"].as_array().unwrap();
    assert!(cases.len() >= 300);
    let mut out = SlotBatch::new();
    for (i, case) in cases.iter().enumerate() {
        let cells: Vec<OwnedValue> = spec
            .features
            .iter()
            .map(|f| from_json(case["row"].get(&f.name), f.ty))
            .collect();
        let row: Vec<Value<'_>> = cells.iter().map(OwnedValue::value).collect();
        out.clear();
        compiled.transform_row(&row, &mut out).unwrap();
        for (s, info) in compiled.slots().iter().enumerate() {
            let expected = &case["expected"][&info.name];
            match info.kind {
                SlotKind::Ids { .. } => {
                    let want: Vec<u32> = expected
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|x| x.as_u64().unwrap() as u32)
                        .collect();
                    assert_eq!(out.ids(s, 0), want, "case {i} slot {}", info.name);
                }
                SlotKind::Dense => {
                    let want = expected.as_f64().unwrap();
                    let got = out.dense(s, 0);
                    assert!(
                        (f64::from(got) - want).abs() <= 1e-6 * want.abs().max(1.0),
                        "case {i} slot {}: {got} vs {want}",
                        info.name
                    );
                }
            }
        }
    }
}

fn fixture() -> CompiledSpec {
    let data: Json = serde_json::from_str(include_str!("data/vectors.json")).unwrap();
    let spec: FeatureSpec = serde_json::from_value(data["spec"].clone()).unwrap();
    CompiledSpec::compile(&spec).unwrap()
}

fn cell_strategy(ty: FeatureType) -> BoxedStrategy<OwnedValue> {
    let missing = Just(OwnedValue::Missing).boxed();
    let some = match ty {
        FeatureType::Float => prop_oneof![
            any::<f64>().prop_map(OwnedValue::Float),
            (-100.0f64..200.0).prop_map(OwnedValue::Float),
            Just(OwnedValue::Float(f64::NAN)),
            Just(OwnedValue::Float(f64::INFINITY)),
        ]
        .boxed(),
        FeatureType::Int => any::<i64>().prop_map(OwnedValue::Int).boxed(),
        FeatureType::String => ".{0,40}".prop_map(OwnedValue::Str).boxed(),
        FeatureType::IntList => proptest::collection::vec(any::<i64>(), 0..50)
            .prop_map(OwnedValue::IntList)
            .boxed(),
        FeatureType::StringList => proptest::collection::vec(".{0,20}", 0..20)
            .prop_map(OwnedValue::StrList)
            .boxed(),
    };
    prop_oneof![1 => missing, 4 => some].boxed()
}

fn row_strategy() -> impl Strategy<Value = Vec<OwnedValue>> {
    let spec = fixture();
    spec.features()
        .iter()
        .map(|f| cell_strategy(f.ty))
        .collect::<Vec<_>>()
}

proptest! {
    #[test]
    fn ids_are_in_range_and_deterministic(rows in proptest::collection::vec(row_strategy(), 1..20)) {
        let spec = fixture();
        let mut batch = SlotBatch::new();
        for cells in &rows {
            let row: Vec<Value<'_>> = cells.iter().map(OwnedValue::value).collect();
            spec.transform_row(&row, &mut batch).unwrap();
        }
        prop_assert_eq!(batch.rows(), rows.len());
        for (s, info) in spec.slots().iter().enumerate() {
            if let SlotKind::Ids { num_ids } = info.kind {
                for r in 0..rows.len() {
                    let ids = batch.ids(s, r);
                    prop_assert!(!ids.is_empty(), "slot {} row {} has no ids", info.name, r);
                    prop_assert!(ids.iter().all(|&id| id < num_ids), "slot {}: {:?} vs {}", info.name, ids, num_ids);
                }
            } else {
                for r in 0..rows.len() {
                    prop_assert!(batch.dense(s, r).abs() <= 2.5 || info.name != "age_n");
                    prop_assert!(!batch.dense(s, r).is_nan());
                }
            }
        }
        // Same rows, one at a time in a fresh batch: the same output.
        for (r, cells) in rows.iter().enumerate() {
            let row: Vec<Value<'_>> = cells.iter().map(OwnedValue::value).collect();
            let mut single = SlotBatch::new();
            spec.transform_row(&row, &mut single).unwrap();
            for s in 0..spec.slots().len() {
                prop_assert_eq!(single.ids(s, 0), batch.ids(s, r));
                if spec.slots()[s].kind == SlotKind::Dense {
                    prop_assert_eq!(single.dense(s, 0).to_bits(), batch.dense(s, r).to_bits());
                }
            }
        }
    }
}
