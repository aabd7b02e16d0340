//! The transform rules of docs/feature-ops.md, checked value by value.

use rankd_feature_ops::hash::{hash_int, hash_str, ValueHasher};
use rankd_feature_ops::{
    CompiledSpec, Error, FeatureSpec, FeatureType, RawFeature, SlotBatch, SlotKind, SlotSpec,
    Transform, Value, Vocabulary,
};

fn feature(name: &str, ty: FeatureType) -> RawFeature {
    RawFeature {
        name: name.into(),
        ty,
    }
}

fn slot(name: &str, transform: Transform) -> SlotSpec {
    SlotSpec {
        name: name.into(),
        transform,
    }
}

fn compile(features: Vec<RawFeature>, slots: Vec<SlotSpec>) -> Result<CompiledSpec, Error> {
    CompiledSpec::compile(&FeatureSpec {
        hash_seed: 0,
        features,
        slots,
    })
}

/// Runs one row and returns slot 0's ids.
fn ids(spec: &CompiledSpec, row: &[Value<'_>], slot: usize) -> Vec<u32> {
    let mut out = SlotBatch::new();
    spec.transform_row(row, &mut out).unwrap();
    out.ids(slot, 0).to_vec()
}

fn piecewise() -> CompiledSpec {
    compile(
        vec![feature("x", FeatureType::Float)],
        vec![slot(
            "x_b",
            Transform::Piecewise {
                input: "x".into(),
                boundaries: vec![0.0, 10.0, 20.0],
            },
        )],
    )
    .unwrap()
}

#[test]
fn piecewise_worked_example() {
    let spec = piecewise();
    assert_eq!(spec.slots()[0].kind, SlotKind::Ids { num_ids: 5 });
    let check = |v: Value<'_>, expected: u32| assert_eq!(ids(&spec, &[v], 0), [expected], "{v:?}");
    check(Value::F64(-5.0), 0);
    check(Value::F64(0.0), 1);
    check(Value::F32(9.9), 1);
    check(Value::F64(10.0), 2);
    check(Value::F64(25.0), 3);
    check(Value::Missing, 4);
    check(Value::F64(f64::NAN), 4);
    check(Value::F32(f32::NAN), 4);
    check(Value::F64(f64::INFINITY), 3);
    check(Value::F64(f64::NEG_INFINITY), 0);
    check(Value::Int(10), 2);
    check(Value::F64(-0.0), 1);
}

#[test]
fn piecewise_rejects_bad_boundaries_at_compile_time() {
    for (b, needle) in [
        (vec![0.0, 1.0, 1.0], "strictly increasing"),
        (vec![2.0, 1.0], "strictly increasing"),
        (vec![0.0, f64::NAN], "not finite"),
        (vec![f64::INFINITY], "not finite"),
    ] {
        let err = compile(
            vec![feature("x", FeatureType::Float)],
            vec![slot(
                "s",
                Transform::Piecewise {
                    input: "x".into(),
                    boundaries: b,
                },
            )],
        )
        .unwrap_err();
        assert!(err.to_string().contains(needle), "{err}");
    }
    // No boundaries is allowed: every number is id 0, missing is id 1.
    let spec = compile(
        vec![feature("x", FeatureType::Float)],
        vec![slot(
            "s",
            Transform::Piecewise {
                input: "x".into(),
                boundaries: vec![],
            },
        )],
    )
    .unwrap();
    assert_eq!(ids(&spec, &[Value::F64(1e300)], 0), [0]);
    assert_eq!(ids(&spec, &[Value::Missing], 0), [1]);
}

fn pickcat_str(m: u32) -> CompiledSpec {
    compile(
        vec![
            feature("city", FeatureType::String),
            feature("tags", FeatureType::StringList),
        ],
        vec![
            slot(
                "city_id",
                Transform::Pickcat {
                    input: "city".into(),
                    vocabulary: Vocabulary::Str(vec!["Paris".into(), "Tokyo".into()]),
                    oov_buckets: m,
                },
            ),
            slot(
                "tag_id",
                Transform::Pickcat {
                    input: "tags".into(),
                    vocabulary: Vocabulary::Str(vec!["a".into(), "b".into(), "c".into()]),
                    oov_buckets: m,
                },
            ),
        ],
    )
    .unwrap()
}

#[test]
fn pickcat_strings_vocabulary_oov_and_missing() {
    let spec = pickcat_str(10);
    assert_eq!(spec.slots()[0].kind, SlotKind::Ids { num_ids: 13 });
    assert_eq!(ids(&spec, &[Value::Str("Tokyo")], 0), [1]);
    assert_eq!(ids(&spec, &[Value::Str("Paris")], 0), [0]);
    let oov = 2 + (hash_str(0, "Beijing") % 10) as u32;
    assert_eq!(oov, 2 + (5488856726142131741u64 % 10) as u32);
    assert_eq!(ids(&spec, &[Value::Str("Beijing")], 0), [oov]);
    assert_eq!(ids(&spec, &[Value::Missing], 0), [12]);
    // Case matters, as does every byte.
    assert_ne!(ids(&spec, &[Value::Str("paris")], 0), [0]);

    let tags = vec!["c", "zz", "a", "c"];
    let row = [Value::Missing, Value::StrList(&tags)];
    let zz = 3 + (hash_str(0, "zz") % 10) as u32;
    assert_eq!(ids(&spec, &row, 1), [2, zz, 0, 2]);
    let empty: Vec<&str> = vec![];
    assert_eq!(
        ids(&spec, &[Value::Missing, Value::StrList(&empty)], 1),
        [13]
    );
}

#[test]
fn pickcat_integers_use_the_seeded_hash() {
    let spec = CompiledSpec::compile(&FeatureSpec {
        hash_seed: 7,
        features: vec![
            feature("item", FeatureType::Int),
            feature("hist", FeatureType::IntList),
        ],
        slots: vec![
            slot(
                "item_id",
                Transform::Pickcat {
                    input: "item".into(),
                    vocabulary: Vocabulary::Int(vec![100, 42, -3]),
                    oov_buckets: 1000,
                },
            ),
            slot(
                "hist_id",
                Transform::Pickcat {
                    input: "hist".into(),
                    vocabulary: Vocabulary::Int(vec![5]),
                    oov_buckets: 1,
                },
            ),
        ],
    })
    .unwrap();
    assert_eq!(ids(&spec, &[Value::Int(42)], 0), [1]);
    assert_eq!(ids(&spec, &[Value::Int(-3)], 0), [2]);
    assert_eq!(
        ids(&spec, &[Value::Int(7)], 0),
        [3 + (hash_int(7, 7) % 1000) as u32]
    );
    assert_ne!(hash_int(7, 7), hash_int(0, 7));
    assert_eq!(ids(&spec, &[Value::Missing], 0), [1003]);
    let hist = vec![5i64, 6, 5];
    assert_eq!(
        ids(&spec, &[Value::Missing, Value::IntList(&hist)], 1),
        [0, 1, 0]
    );
}

#[test]
fn pickcat_config_errors() {
    let bad = |ty, vocabulary, m| {
        compile(
            vec![feature("f", ty)],
            vec![slot(
                "s",
                Transform::Pickcat {
                    input: "f".into(),
                    vocabulary,
                    oov_buckets: m,
                },
            )],
        )
        .unwrap_err()
        .to_string()
    };
    assert!(bad(FeatureType::Int, Vocabulary::Int(vec![1]), 0).contains("oov_buckets"));
    assert!(bad(FeatureType::Int, Vocabulary::Int(vec![1, 2, 1]), 1).contains("repeats"));
    assert!(bad(
        FeatureType::String,
        Vocabulary::Str(vec!["a".into(), "a".into()]),
        1
    )
    .contains("repeats"));
    assert!(
        bad(FeatureType::Int, Vocabulary::Str(vec!["a".into()]), 1).contains("string vocabulary")
    );
    assert!(bad(FeatureType::String, Vocabulary::Int(vec![1]), 1).contains("integer vocabulary"));
    assert!(bad(FeatureType::Float, Vocabulary::Int(vec![1]), 1).contains("cannot read"));
    assert!(bad(FeatureType::Int, Vocabulary::Int(vec![]), u32::MAX).contains("2^31"));
}

#[test]
fn descartes_is_an_exact_mixed_radix_cross() {
    let spec = compile(
        vec![
            feature("a", FeatureType::Float),
            feature("b", FeatureType::IntList),
            feature("c", FeatureType::Int),
        ],
        vec![
            slot(
                "a_b",
                Transform::Piecewise {
                    input: "a".into(),
                    boundaries: vec![0.0, 1.0],
                },
            ),
            slot(
                "b_id",
                Transform::Pickcat {
                    input: "b".into(),
                    vocabulary: Vocabulary::Int(vec![10, 20, 30]),
                    oov_buckets: 2,
                },
            ),
            slot(
                "c_id",
                Transform::Pickcat {
                    input: "c".into(),
                    vocabulary: Vocabulary::Int(vec![1]),
                    oov_buckets: 1,
                },
            ),
            slot(
                "x",
                Transform::Descartes {
                    inputs: vec!["a_b".into(), "b_id".into(), "c_id".into()],
                },
            ),
        ],
    )
    .unwrap();
    // num_ids: 4 * 6 * 3
    assert_eq!(spec.slots()[3].kind, SlotKind::Ids { num_ids: 72 });
    assert_eq!(spec.slots()[3].features, vec![0, 1, 2]);
    let b = vec![30i64, 10];
    let row = [Value::F64(0.5), Value::IntList(&b), Value::Int(1)];
    // a -> 1; b -> [2, 0]; c -> 0. ids = 1*18 + b*3 + 0
    assert_eq!(ids(&spec, &row, 3), [18 + 6, 18]);
    let row = [Value::Missing, Value::Missing, Value::Missing];
    // a -> 3; b -> 5; c -> 2
    assert_eq!(ids(&spec, &row, 3), [3 * 18 + 5 * 3 + 2]);
}

#[test]
fn descartes_limits() {
    let features = vec![
        feature("a", FeatureType::Int),
        feature("l", FeatureType::IntList),
    ];
    let big = |name: &str, input: &str| {
        slot(
            name,
            Transform::Combinehash {
                inputs: vec![input.into()],
                buckets: 1 << 20,
            },
        )
    };
    let err = compile(
        features.clone(),
        vec![
            big("p", "a"),
            big("q", "a"),
            slot(
                "x",
                Transform::Descartes {
                    inputs: vec!["p".into(), "q".into()],
                },
            ),
        ],
    )
    .unwrap_err();
    assert!(matches!(err, Error::TooManyIds { .. }), "{err}");
    let err = compile(
        features.clone(),
        vec![
            big("p", "a"),
            slot(
                "x",
                Transform::Descartes {
                    inputs: vec!["p".into(), "later".into()],
                },
            ),
            big("later", "a"),
        ],
    )
    .unwrap_err();
    assert!(matches!(err, Error::UnknownSlot { .. }), "{err}");

    // A cross of two huge lists is refused per row instead of exhausting memory.
    let spec = compile(
        features,
        vec![
            slot(
                "l1",
                Transform::Pickcat {
                    input: "l".into(),
                    vocabulary: Vocabulary::Int(vec![]),
                    oov_buckets: 100,
                },
            ),
            slot(
                "l2",
                Transform::Pickcat {
                    input: "l".into(),
                    vocabulary: Vocabulary::Int(vec![]),
                    oov_buckets: 100,
                },
            ),
            slot(
                "x",
                Transform::Descartes {
                    inputs: vec!["l1".into(), "l2".into()],
                },
            ),
        ],
    )
    .unwrap()
    .with_max_ids_per_row(1000);
    let huge: Vec<i64> = (0..500).collect();
    let mut out = SlotBatch::new();
    let ok: Vec<i64> = (0..20).collect();
    spec.transform_row(&[Value::Missing, Value::IntList(&ok)][..], &mut out)
        .unwrap();
    let err = spec
        .transform_row(&[Value::Missing, Value::IntList(&huge)][..], &mut out)
        .unwrap_err();
    assert!(
        matches!(err, Error::RowTooLarge { count: 250_000, .. }),
        "{err}"
    );
    // The failed row left nothing behind; the earlier row is intact.
    assert_eq!(out.rows(), 1);
    assert_eq!(out.ids(2, 0).len(), 400);
    assert_eq!(out.column(0).ids.len(), 20);
}

#[test]
fn combinehash_check_value_lists_and_missing() {
    let spec = compile(
        vec![
            feature("education", FeatureType::String),
            feature("occupation", FeatureType::String),
            feature("ids", FeatureType::IntList),
        ],
        vec![
            slot(
                "edu_occ",
                Transform::Combinehash {
                    inputs: vec!["education".into(), "occupation".into()],
                    buckets: 1000,
                },
            ),
            slot(
                "ids_h",
                Transform::Combinehash {
                    inputs: vec!["education".into(), "ids".into()],
                    buckets: 1 << 30,
                },
            ),
        ],
    )
    .unwrap();
    assert_eq!(spec.slots()[0].kind, SlotKind::Ids { num_ids: 1001 });
    let row = [
        Value::Str("Bachelors"),
        Value::Str("Exec-managerial"),
        Value::Missing,
    ];
    assert_eq!(ids(&spec, &row, 0), [948]);
    // Missing input -> B.
    assert_eq!(ids(&spec, &row, 1), [1 << 30]);
    let row = [
        Value::Missing,
        Value::Str("Exec-managerial"),
        Value::Missing,
    ];
    assert_eq!(ids(&spec, &row, 0), [1000]);
    // A list contributes its elements in order; an empty list contributes nothing.
    let list = vec![1i64, 2];
    let row = [Value::Str("x"), Value::Missing, Value::IntList(&list)];
    let mut h = ValueHasher::new(0);
    h.str("x");
    h.int(1);
    h.int(2);
    assert_eq!(ids(&spec, &row, 1), [(h.finish() % (1 << 30)) as u32]);
    let empty: Vec<i64> = vec![];
    let row = [Value::Str("x"), Value::Missing, Value::IntList(&empty)];
    assert_eq!(ids(&spec, &row, 1), [(hash_str(0, "x") % (1 << 30)) as u32]);
}

#[test]
fn normalize_dense_values() {
    let spec = compile(
        vec![feature("x", FeatureType::Float)],
        vec![
            slot(
                "plain",
                Transform::Normalize {
                    input: "x".into(),
                    mean: 10.0,
                    std: 4.0,
                    clip: None,
                    log1p: false,
                },
            ),
            slot(
                "clipped_log",
                Transform::Normalize {
                    input: "x".into(),
                    mean: 1.0,
                    std: 0.5,
                    clip: Some(3.0),
                    log1p: true,
                },
            ),
        ],
    )
    .unwrap();
    assert_eq!(spec.slots()[0].kind, SlotKind::Dense);
    let run = |v: Value<'_>| {
        let mut out = SlotBatch::new();
        spec.transform_row(&[v][..], &mut out).unwrap();
        (out.dense(0, 0), out.dense(1, 0))
    };
    assert_eq!(run(Value::F64(18.0)).0, 2.0);
    assert_eq!(run(Value::Int(6)).0, -1.0);
    let (a, b) = run(Value::F64(std::f64::consts::E - 1.0));
    assert!((a - (-2.070_429_6)).abs() < 1e-6, "{a}");
    assert!(b.abs() < 1e-6, "{b}");
    assert_eq!(run(Value::F64(1e9)).1, 3.0);
    assert_eq!(run(Value::Missing), (0.0, 0.0));
    assert_eq!(run(Value::F64(f64::NAN)), (0.0, 0.0));
    assert_eq!(run(Value::F64(f64::INFINITY)), (f32::INFINITY, 3.0));
    // log1p below -1 is NaN: treated like a missing value.
    assert_eq!(run(Value::F64(-5.0)).1, 0.0);
    for (mean, std, clip) in [
        (f64::NAN, 1.0, None),
        (0.0, 0.0, None),
        (0.0, 1.0, Some(-1.0)),
    ] {
        let err = compile(
            vec![feature("x", FeatureType::Float)],
            vec![slot(
                "n",
                Transform::Normalize {
                    input: "x".into(),
                    mean,
                    std,
                    clip,
                    log1p: false,
                },
            )],
        )
        .unwrap_err();
        assert!(matches!(err, Error::Parameter { .. }), "{err}");
    }
}

#[test]
fn wrong_type_names_the_feature_and_leaves_the_batch_untouched() {
    let spec = pickcat_str(3);
    let mut out = SlotBatch::new();
    spec.transform_row(&[Value::Str("Paris")][..], &mut out)
        .unwrap();
    let err = spec
        .transform_row(&[Value::Int(3)][..], &mut out)
        .unwrap_err();
    assert_eq!(
        err,
        Error::WrongType {
            feature: "city".into(),
            expected: FeatureType::String,
            got: "int"
        }
    );
    assert_eq!(
        err.to_string(),
        "feature `city` is declared string but the value is int"
    );
    let list = vec![1i64];
    let err = spec
        .transform_row(&[Value::Str("Paris"), Value::IntList(&list)][..], &mut out)
        .unwrap_err();
    assert!(err.to_string().contains("`tags`"), "{err}");
    assert_eq!(out.rows(), 1);
    assert_eq!(out.column(0).ids, [0]);
    assert_eq!(out.column(1).ids, [6]);
    // Floats never fit integer features.
    let spec = compile(
        vec![feature("n", FeatureType::Int)],
        vec![slot(
            "b",
            Transform::Piecewise {
                input: "n".into(),
                boundaries: vec![1.0],
            },
        )],
    )
    .unwrap();
    assert!(spec
        .transform_row(&[Value::F64(1.5)][..], &mut SlotBatch::new())
        .is_err());
}

#[test]
fn spec_errors_name_what_is_wrong() {
    let err = compile(
        vec![
            feature("a", FeatureType::Int),
            feature("a", FeatureType::Int),
        ],
        vec![],
    )
    .unwrap_err();
    assert_eq!(err, Error::DuplicateFeature("a".into()));
    let err = compile(
        vec![feature("a", FeatureType::Int)],
        vec![slot(
            "s",
            Transform::Combinehash {
                inputs: vec!["nope".into()],
                buckets: 4,
            },
        )],
    )
    .unwrap_err();
    assert_eq!(
        err.to_string(),
        "feature spec: slot `s` reads raw feature `nope`, which is not declared"
    );
}

#[test]
fn batch_reuse_keeps_rows_separate() {
    let spec = pickcat_str(4);
    let mut out = SlotBatch::new();
    let tags: Vec<Vec<&str>> = vec![vec!["a"], vec![], vec!["b", "c", "q"]];
    for t in &tags {
        spec.transform_row(&[Value::Str("Tokyo"), Value::StrList(t)][..], &mut out)
            .unwrap();
    }
    assert_eq!(out.rows(), 3);
    assert_eq!(out.ids(1, 0), [0]);
    assert_eq!(out.ids(1, 1), [7]);
    assert_eq!(out.ids(1, 2).len(), 3);
    out.clear();
    assert_eq!(out.rows(), 0);
    spec.transform_row(&[Value::Missing, Value::Missing][..], &mut out)
        .unwrap();
    assert_eq!(out.ids(0, 0), [6]);
    assert_eq!(out.ids(1, 0), [7]);
}

#[test]
fn specs_read_from_toml_style_json() {
    let json = r#"{
        "hash_seed": 3,
        "features": [{"name": "age", "type": "float"}, {"name": "edu", "type": "string"}],
        "slots": [
            {"name": "age_b", "transform": "piecewise", "input": "age", "boundaries": [18, 30]},
            {"name": "edu_id", "transform": "pickcat", "input": "edu", "vocabulary": ["a", "b"], "oov_buckets": 2},
            {"name": "age_n", "transform": "normalize", "input": "age", "mean": 38.0, "std": 13.0, "clip": 5.0}
        ]
    }"#;
    let spec: FeatureSpec = serde_json::from_str(json).unwrap();
    assert_eq!(spec.hash_seed, 3);
    assert!(matches!(
        &spec.slots[1].transform,
        Transform::Pickcat { vocabulary: Vocabulary::Str(v), .. } if v.len() == 2
    ));
    CompiledSpec::compile(&spec).unwrap();
    let round: FeatureSpec = serde_json::from_str(&serde_json::to_string(&spec).unwrap()).unwrap();
    assert_eq!(round, spec);
    let typo = json.replace("\"oov_buckets\"", "\"oov_bucket\"");
    assert!(serde_json::from_str::<FeatureSpec>(&typo).is_err());
}

fn hash_and_prefix() -> CompiledSpec {
    compile(
        vec![
            feature("zip", FeatureType::String),
            feature("uid", FeatureType::Int),
            feature("tags", FeatureType::StringList),
        ],
        vec![
            slot(
                "zip3",
                Transform::Prefix {
                    input: "zip".into(),
                    length: 3,
                    buckets: 1000,
                },
            ),
            slot(
                "uid_h",
                Transform::Hash {
                    input: "uid".into(),
                    buckets: 97,
                },
            ),
            slot(
                "uid_pc",
                Transform::Pickcat {
                    input: "uid".into(),
                    vocabulary: Vocabulary::Int(vec![]),
                    oov_buckets: 97,
                },
            ),
            slot(
                "tag_h",
                Transform::Hash {
                    input: "tags".into(),
                    buckets: 50,
                },
            ),
            slot(
                "tag2",
                Transform::Prefix {
                    input: "tags".into(),
                    length: 2,
                    buckets: 50,
                },
            ),
        ],
    )
    .unwrap()
}

#[test]
fn hash_is_pickcat_with_an_empty_vocabulary() {
    let spec = hash_and_prefix();
    assert_eq!(spec.slots()[1].kind, SlotKind::Ids { num_ids: 98 });
    for uid in [0i64, 1, -7, i64::MAX, 123_456_789_012] {
        let row = [Value::Missing, Value::Int(uid), Value::Missing];
        let h = ids(&spec, &row, 1);
        assert_eq!(h, [(hash_int(0, uid) % 97) as u32]);
        assert_eq!(h, ids(&spec, &row, 2));
    }
    let missing = [Value::Missing, Value::Missing, Value::Missing];
    assert_eq!(ids(&spec, &missing, 1), [97]);
    assert_eq!(ids(&spec, &missing, 3), [50]);
    // A list: one id per element, each hashed on its own (combinehash would give one id).
    let tags = vec!["news", "sport"];
    let row = [Value::Missing, Value::Missing, Value::StrList(&tags)];
    assert_eq!(
        ids(&spec, &row, 3),
        [
            (hash_str(0, "news") % 50) as u32,
            (hash_str(0, "sport") % 50) as u32
        ]
    );
}

#[test]
fn prefix_hashes_the_first_characters() {
    let spec = hash_and_prefix();
    assert_eq!(spec.slots()[0].kind, SlotKind::Ids { num_ids: 1001 });
    let id = |s: &str| (hash_str(0, s) % 1000) as u32;
    let check = |zip: &str, expected: &str| {
        let row = [Value::Str(zip), Value::Missing, Value::Missing];
        assert_eq!(ids(&spec, &row, 0), [id(expected)], "{zip}");
    };
    check("94105", "941");
    check("94110", "941");
    check("10001", "100");
    check("12", "12");
    check("", "");
    // Characters, not bytes: "Zürich" keeps "Zür" (4 bytes).
    check("Zürich", "Zür");
    check("日本語テキスト", "日本語");
    let row = [Value::Missing, Value::Missing, Value::Missing];
    assert_eq!(ids(&spec, &row, 0), [1000]);
    let tags = vec!["news", "sport", "n"];
    let row = [Value::Missing, Value::Missing, Value::StrList(&tags)];
    let id50 = |s: &str| (hash_str(0, s) % 50) as u32;
    assert_eq!(ids(&spec, &row, 4), [id50("ne"), id50("sp"), id50("n")]);
    let empty: Vec<&str> = vec![];
    let row = [Value::Missing, Value::Missing, Value::StrList(&empty)];
    assert_eq!(ids(&spec, &row, 4), [50]);
}

#[test]
fn hash_and_prefix_config_errors() {
    let one = |ty: FeatureType, t: Transform| compile(vec![feature("f", ty)], vec![slot("s", t)]);
    let prefix = |length, buckets| Transform::Prefix {
        input: "f".into(),
        length,
        buckets,
    };
    assert!(
        one(FeatureType::Int, prefix(3, 10)).is_err(),
        "prefix of an int"
    );
    assert!(one(FeatureType::Float, prefix(3, 10)).is_err());
    assert!(one(FeatureType::String, prefix(0, 10)).is_err(), "length 0");
    assert!(
        one(FeatureType::String, prefix(3, 0)).is_err(),
        "no buckets"
    );
    assert!(one(FeatureType::String, prefix(3, 10)).is_ok());
    let hash = |buckets| Transform::Hash {
        input: "f".into(),
        buckets,
    };
    assert!(
        one(FeatureType::Float, hash(10)).is_err(),
        "hash of a float"
    );
    assert!(one(FeatureType::String, hash(0)).is_err());
    assert!(one(FeatureType::IntList, hash(10)).is_ok());
    // The config names (JSON here; TOML reads the same fields).
    let spec: FeatureSpec = serde_json::from_str(
        r#"{"features": [{"name": "zip", "type": "string"}],
            "slots": [{"name": "z", "transform": "prefix", "input": "zip", "length": 3, "buckets": 100},
                      {"name": "h", "transform": "hash", "input": "zip", "buckets": 100}]}"#,
    )
    .unwrap();
    assert!(CompiledSpec::compile(&spec).is_ok());
}

/// Rows of a batch as a plain table (row-major, by feature).
struct Table<'a>(Vec<Vec<Value<'a>>>);

impl rankd_feature_ops::Rows for Table<'_> {
    fn num_rows(&self) -> usize {
        self.0.len()
    }
    fn value(&self, row: usize, feature: usize) -> Value<'_> {
        self.0[row][feature]
    }
}

/// `rows` transformed as one batch, each slot of each row checked against the row alone.
fn batch_equal_to_rows(spec: &CompiledSpec, rows: &[Vec<Value<'_>>]) -> SlotBatch {
    let mut batch = SlotBatch::new();
    spec.transform_rows_masked(&Table(rows.to_vec()), None, &mut batch)
        .unwrap();
    assert_eq!(batch.rows(), rows.len());
    for (r, row) in rows.iter().enumerate() {
        for s in 0..spec.slots().len() {
            assert_eq!(batch.ids(s, r), ids(spec, row, s), "row {r} slot {s}");
        }
    }
    batch
}

/// The row a batch of `bad` rows fails at, appended to `batch`, which must be left as it was.
fn first_bad_row(spec: &CompiledSpec, bad: Vec<Vec<Value<'_>>>, batch: &SlotBatch) -> usize {
    let mut out = batch.clone();
    let err = spec
        .transform_rows_masked(&Table(bad), None, &mut out)
        .unwrap_err();
    assert_eq!(out.rows(), batch.rows(), "{err:?}");
    for s in 0..spec.slots().len() {
        assert_eq!(out.column(s).ids, batch.column(s).ids, "slot {s}: {err:?}");
        assert_eq!(out.column(s).offsets, batch.column(s).offsets, "slot {s}");
    }
    err.row
}

#[test]
fn a_batch_of_string_lookups_equals_its_rows_one_by_one_and_fails_at_the_first_bad_row() {
    // Over several groups of rows that are looked up together: known, unknown and missing
    // values and lists (empty, known, unknown) in both slots.
    let spec = pickcat_str(7).with_max_ids_per_row(3);
    let cities = ["Paris", "Tokyo", "Lima", "", "Tokyo", "Oslo"];
    let tags: Vec<Vec<&str>> = vec![vec![], vec!["a"], vec!["c", "zz", "b"], vec!["q"]];
    let rows: Vec<Vec<Value<'_>>> = (0..53)
        .map(|r| {
            let city = if r % 7 == 3 {
                Value::Missing
            } else {
                Value::Str(cities[r % cities.len()])
            };
            vec![city, Value::StrList(&tags[r % tags.len()])]
        })
        .collect();
    let batch = batch_equal_to_rows(&spec, &rows);

    // In one slot, a list over the limit and a wrong type, in the same group of rows and in
    // different groups: the first row is reported, and the batch is left as it was.
    let long = vec!["a", "b", "c", "a"];
    for (bad_type_at, too_long_at, want) in [(25, 20, 20), (17, 30, 17), (40, 10, 10), (3, 50, 3)] {
        let mut bad = rows.clone();
        bad[too_long_at][1] = Value::StrList(&long);
        bad[bad_type_at][1] = Value::Int(4);
        assert_eq!(first_bad_row(&spec, bad, &batch), want);
    }
}

#[test]
fn a_batch_of_single_input_hashes_equals_its_rows_one_by_one_and_fails_at_the_first_bad_row() {
    // Integers, strings short and too long to encode with the group (27 bytes fit, 28 do not),
    // missing values and lists, over several groups of rows hashed together.
    let spec = compile(
        vec![
            feature("item", FeatureType::Int),
            feature("name", FeatureType::String),
            feature("tags", FeatureType::IntList),
        ],
        ["item", "name", "tags"]
            .iter()
            .map(|input| {
                slot(
                    &format!("{input}_h"),
                    Transform::Combinehash {
                        inputs: vec![(*input).into()],
                        buckets: 1000,
                    },
                )
            })
            .collect(),
    )
    .unwrap();
    let (long, edge, past) = ("x".repeat(70), "y".repeat(27), "z".repeat(28));
    let names = [
        "a",
        "",
        "Tokyo",
        long.as_str(),
        "exactly-fifty-nine-bytes-long-string-for-the-edge-case-1234",
        edge.as_str(),
        past.as_str(),
    ];
    assert_eq!(names[4].len(), 59);
    let lists: Vec<Vec<i64>> = vec![vec![], vec![3], vec![-1, 5, 7]];
    let rows: Vec<Vec<Value<'_>>> = (0..41i64)
        .map(|r| {
            let item = if r % 5 == 2 {
                Value::Missing
            } else {
                Value::Int(r * 7_919 - 100)
            };
            let name = if r % 6 == 5 {
                Value::Missing
            } else {
                Value::Str(names[r as usize % names.len()])
            };
            vec![item, name, Value::IntList(&lists[r as usize % lists.len()])]
        })
        .collect();
    let batch = batch_equal_to_rows(&spec, &rows);
    for (r, row) in rows.iter().enumerate() {
        // Against the incremental hasher, which encodes values its own way.
        if let Value::Str(v) = row[1] {
            let mut h = ValueHasher::new(0);
            h.str(v);
            assert_eq!(batch.ids(1, r), [(h.finish() % 1000) as u32], "row {r}");
        }
        if let Value::Int(v) = row[0] {
            let mut h = ValueHasher::new(0);
            h.int(v);
            assert_eq!(batch.ids(0, r), [(h.finish() % 1000) as u32], "row {r}");
        }
    }
    for bad_at in [0, 15, 16, 40] {
        let mut bad = rows.clone();
        bad[bad_at][1] = Value::Int(1);
        assert_eq!(first_bad_row(&spec, bad, &batch), bad_at);
    }
}
