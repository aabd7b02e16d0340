//! Writing and opening model files, and every way a file can be bad.

use std::path::{Path, PathBuf};

use rankd_formats::synth::{write_synthetic, ModelKind, SynthOptions};
use rankd_formats::{
    Activation, BlobRef, FormatError, Integrity, ModelFile, ModelSpec, ModelWriter, StreamCheck,
    HEADER_LEN,
};

fn synth(dir: &Path, kind: ModelKind) -> PathBuf {
    let path = dir.join(format!("{kind:?}.rkm"));
    write_synthetic(
        &path,
        &SynthOptions {
            kind,
            ..SynthOptions::default()
        },
    )
    .unwrap();
    path
}

#[test]
fn every_kind_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    for (kind, name) in [
        (ModelKind::Wide, "wide"),
        (ModelKind::Deep, "deep"),
        (ModelKind::WideDeep, "wide_and_deep"),
        (ModelKind::DeepFm, "deepfm"),
    ] {
        let path = synth(dir.path(), kind);
        let model = ModelFile::open(&path).unwrap();
        assert_eq!(model.integrity(), Integrity::Verified);
        let spec = model.spec();
        assert_eq!(spec.architecture.kind(), name);
        assert_eq!(spec.metadata.name, "synthetic");
        assert_eq!(spec.features.slots.len(), 8);
        // Weights are read in place: the slice points into the map, 64-byte aligned.
        for (what, blob) in spec.architecture.blobs() {
            let w = model.weights(blob);
            assert_eq!(w.len() as u64, blob.len, "{what}");
            assert_eq!(w.as_ptr() as usize % 64, 0, "{what}");
            assert!(w.iter().all(|x| x.is_finite() && x.abs() < 2.0), "{what}");
        }
        // No leftovers of the atomic write.
        assert!(!path.with_extension("rkm.partial").exists());
    }
}

#[test]
fn the_same_options_give_the_same_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let a = synth(dir.path(), ModelKind::DeepFm);
    let b = dir.path().join("again.rkm");
    write_synthetic(
        &b,
        &SynthOptions {
            kind: ModelKind::DeepFm,
            ..SynthOptions::default()
        },
    )
    .unwrap();
    assert_eq!(std::fs::read(a).unwrap(), std::fs::read(b).unwrap());
}

/// Writes `spec` with freshly written blobs of the sizes it asks for, then returns the error.
fn write_err(spec: &ModelSpec) -> String {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.rkm");
    let mut w = ModelWriter::create(&path).unwrap();
    w.write_blob(&vec![0.5; 100_000]).unwrap();
    let err = w.finish(spec).unwrap_err().to_string();
    assert!(!path.exists(), "an invalid model must not be written");
    assert!(!dir.path().join("bad.rkm.partial").exists());
    err
}

fn valid_spec(dir: &Path) -> ModelSpec {
    ModelFile::open(synth(dir, ModelKind::DeepFm))
        .unwrap()
        .spec()
        .clone()
}

#[test]
fn the_writer_refuses_inconsistent_models() {
    let dir = tempfile::tempdir().unwrap();
    let good = valid_spec(dir.path());
    let check = |f: &dyn Fn(&mut ModelSpec), needle: &str| {
        let mut spec = good.clone();
        f(&mut spec);
        let err = write_err(&spec);
        assert!(err.contains(needle), "expected `{needle}` in: {err}");
    };
    check(
        &|s| s.architecture.embeddings[0].rows += 1,
        "rows but the slot has",
    );
    check(
        &|s| s.architecture.embeddings[1].slot = "nope".into(),
        "not defined",
    );
    check(
        &|s| s.architecture.embeddings[0].slot = "age".into(),
        "dense",
    );
    check(
        &|s| s.architecture.deep[1].in_dim += 1,
        "deep layer 1 takes",
    );
    check(
        &|s| s.architecture.deep[0].in_dim += 1,
        "deep layer 0 takes",
    );
    check(
        &|s| s.architecture.deep.last_mut().unwrap().activation = Activation::Relu,
        "last deep layer",
    );
    check(
        &|s| {
            let e = &mut s.architecture.embeddings[2];
            e.dim = 3;
            e.weights.len = e.rows * 3;
        },
        "FM term needs equal",
    );
    check(
        &|s| s.architecture.dense_inputs.push("city".into()),
        "is an id slot",
    );
    check(
        &|s| s.architecture.wide.as_mut().unwrap().slots[0].weights.len -= 1,
        "wide weights",
    );
    check(
        &|s| {
            s.architecture.deep[0].bias = BlobRef {
                offset: 64,
                len: 32,
            }
        },
        "overlap",
    );
    check(
        &|s| {
            s.architecture.deep[0].bias = BlobRef {
                offset: 96,
                len: 32,
            }
        },
        "not a multiple of 64",
    );
    check(
        &|s| s.architecture.deep[0].bias.offset = 1 << 40,
        "outside the blob region",
    );
    check(
        &|s| s.architecture.deep[0].bias.len = u64::MAX,
        "has 18446744073709551615 values",
    );
    check(
        &|s| {
            s.architecture.deep.clear();
            s.architecture.wide = None;
            s.architecture.fm = false;
        },
        "neither",
    );
    check(&|s| s.metadata.name.clear(), "no name");
    check(
        &|s| {
            s.features.slots[0].transform = rankd_feature_ops::Transform::Piecewise {
                input: "user_age".into(),
                boundaries: vec![2.0, 1.0],
            }
        },
        "strictly increasing",
    );
}

fn open_err(bytes: &[u8]) -> FormatError {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.rkm");
    std::fs::write(&path, bytes).unwrap();
    ModelFile::open(&path).unwrap_err()
}

#[test]
fn bad_files_give_typed_errors() {
    let dir = tempfile::tempdir().unwrap();
    let good = std::fs::read(synth(dir.path(), ModelKind::WideDeep)).unwrap();

    assert!(matches!(open_err(&[]), FormatError::Truncated(_)));
    assert!(matches!(open_err(&good[..40]), FormatError::Truncated(_)));
    let e = open_err(&good[..good.len() - 1]);
    assert!(matches!(e, FormatError::Truncated(_)), "{e}");
    assert!(e.to_string().contains("the header says"), "{e}");
    let e = open_err(&good[..good.len() / 2]);
    assert!(matches!(e, FormatError::Truncated(_)), "{e}");

    let mut bad = good.clone();
    bad[0] = b'X';
    let e = open_err(&bad);
    assert!(matches!(e, FormatError::BadMagic(_)), "{e}");
    assert!(e.to_string().contains("not a rankd model file"));

    // A future version is reported as such, not as a checksum failure.
    let mut bad = good.clone();
    bad[8..12].copy_from_slice(&(rankd_formats::FORMAT_VERSION + 1).to_le_bytes());
    let e = open_err(&bad);
    assert!(
        matches!(
            e,
            FormatError::UnsupportedVersion {
                found,
                supported: rankd_formats::FORMAT_VERSION
            } if found == rankd_formats::FORMAT_VERSION + 1
        ),
        "{e}"
    );

    let mut bad = good.clone();
    bad.push(0);
    assert!(matches!(open_err(&bad), FormatError::Header(_)));

    let garbage: Vec<u8> = (0..5000u32).map(|i| (i * 7919 % 256) as u8).collect();
    assert!(matches!(open_err(&garbage), FormatError::BadMagic(_)));
    let mut garbage_with_magic = garbage.clone();
    garbage_with_magic[..8].copy_from_slice(b"RANKDMDL");
    garbage_with_magic[8..12].copy_from_slice(&1u32.to_le_bytes());
    assert!(matches!(
        open_err(&garbage_with_magic),
        FormatError::Checksum { part: "header", .. }
    ));
}

/// Checks `bytes` as a stream in blocks of `block` bytes.
fn stream_check(bytes: &[u8], block: usize) -> Result<rankd_formats::Parsed, FormatError> {
    let mut check = StreamCheck::new(bytes.len() as u64);
    for b in bytes.chunks(block) {
        check.update(b)?;
    }
    check.finish()
}

/// The streaming check (a deploy's copy) accepts and refuses exactly what `parse` does, with
/// the same kind of error, whatever the block size.
#[test]
fn streaming_check_agrees_with_parse() {
    let dir = tempfile::tempdir().unwrap();
    let good = std::fs::read(synth(dir.path(), ModelKind::DeepFm)).unwrap();
    let meta_offset = u64::from_le_bytes(good[24..32].try_into().unwrap()) as usize;
    let mut cases: Vec<(&str, Vec<u8>)> = vec![
        ("good", good.clone()),
        ("empty", Vec::new()),
        ("header only", good[..HEADER_LEN].to_vec()),
        ("short header", good[..40].to_vec()),
        ("one byte short", good[..good.len() - 1].to_vec()),
        ("trailing byte", [&good[..], &[0]].concat()),
    ];
    for (name, pos) in [
        ("magic", 0),
        ("header field", 20),
        ("first body byte", HEADER_LEN),
        ("mid body", good.len() / 2),
        ("metadata", meta_offset + 12),
        ("last byte", good.len() - 1),
    ] {
        let mut bad = good.clone();
        bad[pos] ^= 0x20;
        cases.push((name, bad));
    }
    for (name, bytes) in &cases {
        let want = rankd_formats::parse(bytes);
        for block in [1 << 20, 4096, 61, usize::MAX] {
            let got = stream_check(bytes, block.min(bytes.len().max(1)));
            match (&want, &got) {
                (Ok(w), Ok(g)) => {
                    assert_eq!(w.header, g.header, "{name}");
                    assert_eq!(w.spec, g.spec, "{name}");
                }
                (Err(w), Err(g)) => assert_eq!(
                    std::mem::discriminant(w),
                    std::mem::discriminant(g),
                    "{name}, block {block}: parse says {w}, the stream says {g}"
                ),
                _ => panic!(
                    "{name}, block {block}: parse says {:?}, the stream says {:?}",
                    want.as_ref().err(),
                    got.as_ref().err()
                ),
            }
        }
    }
    // Bytes beyond the announced length are refused at once.
    let mut check = StreamCheck::new(10);
    assert!(check.update(&good[..11]).is_err());
}

/// One flipped byte anywhere is caught: in the header by the header checksum, elsewhere by the
/// body checksum. Sampled positions cover every region of the file.
#[test]
fn any_flipped_byte_is_caught() {
    let dir = tempfile::tempdir().unwrap();
    let good = std::fs::read(synth(dir.path(), ModelKind::Wide)).unwrap();
    let meta_offset = u64::from_le_bytes(good[24..32].try_into().unwrap()) as usize;
    let mut positions: Vec<usize> = (0..HEADER_LEN + 8).collect();
    positions.extend((HEADER_LEN..good.len()).step_by(97));
    positions.extend(meta_offset..meta_offset + 64);
    positions.push(good.len() - 1);
    for pos in positions {
        let mut bad = good.clone();
        bad[pos] ^= 0x04;
        let e = rankd_formats::parse(&bad).unwrap_err();
        let ok = match e {
            FormatError::Checksum { part, .. } => (part == "header") == (pos < HEADER_LEN),
            FormatError::BadMagic(_) | FormatError::UnsupportedVersion { .. } => pos < 12,
            _ => false,
        };
        assert!(ok, "flip at {pos} gave {e}");
    }
}

/// With the checksum skipped (trusted open), a corrupt blob changes only values, but a corrupt
/// shape in the metadata is still refused by the invariants.
#[test]
fn trusted_open_still_checks_the_header_and_invariants() {
    let dir = tempfile::tempdir().unwrap();
    let path = synth(dir.path(), ModelKind::Deep);
    // SAFETY: the file was just written by the writer and is not modified.
    let model = unsafe { ModelFile::open_trusted(&path) }.unwrap();
    assert_eq!(model.integrity(), Integrity::Trusted);
    let verified = ModelFile::open(&path).unwrap();
    assert_eq!(model.spec(), verified.spec());

    let mut bytes = std::fs::read(&path).unwrap();
    bytes[20] ^= 1;
    std::fs::write(&path, &bytes).unwrap();
    // SAFETY: only the header was changed, which is checked on this path.
    let e = unsafe { ModelFile::open_trusted(&path) }.unwrap_err();
    assert!(
        matches!(e, FormatError::Checksum { part: "header", .. }),
        "{e}"
    );
}

#[test]
fn blob_lookup_rejects_foreign_references() {
    let dir = tempfile::tempdir().unwrap();
    let model = ModelFile::open(synth(dir.path(), ModelKind::Wide)).unwrap();
    assert!(model.blob(BlobRef { offset: 0, len: 4 }).is_none());
    assert!(model
        .blob(BlobRef {
            offset: 64,
            len: u64::MAX
        })
        .is_none());
    assert!(model
        .blob(BlobRef {
            offset: model.header().meta_offset,
            len: 1
        })
        .is_none());
    assert!(model.blob(BlobRef { offset: 65, len: 1 }).is_none());
}

/// A file written by format version 1 (committed, never regenerated) still opens, with the
/// same spec and weights. Regenerate only when adding a new version's fixture beside it.
#[test]
fn format_v1_fixture_still_opens() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/v1-deepfm.rkm");
    let model = ModelFile::open(&path).unwrap();
    let spec = model.spec();
    assert_eq!(spec.metadata.name, "fixture");
    assert_eq!(spec.metadata.version, 1);
    assert_eq!(spec.architecture.kind(), "deepfm");
    assert_eq!(model.header().version, 1);
    // Pin a few weights (produced by Rng::new(7)).
    let first = model.weights(spec.architecture.embeddings[0].weights)[0];
    let dir = tempfile::tempdir().unwrap();
    let again = dir.path().join("again.rkm");
    rankd_formats::synth::write_synthetic(&again, &fixture_options()).unwrap();
    let fresh = ModelFile::open(&again).unwrap();
    assert_eq!(fresh.spec().architecture, spec.architecture);
    assert_eq!(
        first,
        fresh.weights(fresh.spec().architecture.embeddings[0].weights)[0]
    );
}

fn fixture_options() -> SynthOptions {
    SynthOptions {
        name: "fixture".into(),
        version: 1,
        kind: ModelKind::DeepFm,
        dim: 4,
        hidden: vec![8],
        item_buckets: 50,
        seed: 7,
        ..SynthOptions::default()
    }
}

/// Writes the v1 fixture when `RANKD_WRITE_FIXTURE=1` (kept for adding the next version's).
#[test]
fn write_fixture_when_asked() {
    if std::env::var("RANKD_WRITE_FIXTURE").as_deref() != Ok("1") {
        println!("skipped: set RANKD_WRITE_FIXTURE=1 to rewrite tests/data/v1-deepfm.rkm");
        return;
    }
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/v1-deepfm.rkm");
    rankd_formats::synth::write_synthetic(&path, &fixture_options()).unwrap();
}

/// A small model with an f16, an f32 and an int8 embedding table (format version 2).
fn write_v2_fixture(path: &Path) {
    use rankd_formats::config::{ModelConfig, TensorMap};
    let text = r#"
hash_seed = 3
[[feature]]
name = "city"
type = "string"
[[feature]]
name = "item"
type = "int"
[[slot]]
name = "city"
transform = "hash"
input = "city"
buckets = 20
[[slot]]
name = "item"
transform = "hash"
input = "item"
buckets = 30
[[slot]]
name = "zone"
transform = "hash"
input = "city"
buckets = 6
[[embedding]]
slot = "city"
dim = 3
weight_type = "f16"
[[embedding]]
slot = "item"
dim = 4
[[embedding]]
slot = "zone"
dim = 3
weight_type = "int8"
[wide]
slots = ["city"]
[deep]
dense = []
layers = [5, 1]
"#;
    let config = ModelConfig::from_toml(text, &[]).unwrap();
    let mut rng = rankd_formats::synth::Rng::new(11);
    let mut tensors = TensorMap::new();
    for t in config.tensors().unwrap() {
        let n = t.numel() as usize;
        tensors.insert(t.name, (t.shape, rng.vec(n, 0.5)));
    }
    let metadata = rankd_formats::Metadata {
        name: "fixture-v2".into(),
        version: 2,
        ..Default::default()
    };
    rankd_formats::config::write_model(&config, metadata, &tensors, path).unwrap();
}

#[test]
fn format_v2_fixture_with_an_f16_table_still_opens() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/v2-f16.rkm");
    if std::env::var_os("RANKD_WRITE_FIXTURES").is_some() {
        write_v2_fixture(&path);
    }
    let model = ModelFile::open(&path).unwrap();
    assert_eq!(model.header().version, 2);
    let arch = &model.spec().architecture;
    assert_eq!(
        arch.embeddings[0].weight_type,
        rankd_formats::WeightType::F16
    );
    assert_eq!(
        arch.embeddings[1].weight_type,
        rankd_formats::WeightType::F32
    );
    // 21 x 3 = 63 halves: 32 words, the last half padding.
    assert_eq!(arch.embeddings[0].weights.len, 32);
    let dir = tempfile::tempdir().unwrap();
    let again = dir.path().join("again.rkm");
    write_v2_fixture(&again);
    let fresh = ModelFile::open(&again).unwrap();
    assert_eq!(fresh.spec().architecture, *arch);
    let (a, b) = (
        model.weights_f16(arch.embeddings[0].weights),
        fresh.weights_f16(fresh.spec().architecture.embeddings[0].weights),
    );
    assert_eq!(a, b);
    assert_eq!(a[63], 0, "the padding half is zero");
    // The same values as f32 are the generator's, rounded to f16.
    let mut rng = rankd_formats::synth::Rng::new(11);
    let first = rng.vec(63, 0.5);
    for (h, x) in a.iter().zip(&first) {
        assert_eq!(*h, half::f16::from_f32(*x).to_bits());
    }
    // The int8 table: 7 rows x 3 bytes in 6 words, a scale per row, each value within half a
    // step of the generator's (drawn after the 63 + 31 x 4 values before it).
    let z = &arch.embeddings[2];
    assert_eq!(z.weight_type, rankd_formats::WeightType::I8);
    assert_eq!(z.weights.len, 6);
    let (q, s) = (
        model.weights_i8(z.weights),
        model.weights(z.scales.unwrap()),
    );
    assert_eq!(s.len(), 7);
    let _ = rng.vec(31 * 4, 0.5);
    let zone = rng.vec(21, 0.5);
    for (i, x) in zone.iter().enumerate() {
        assert!((f32::from(q[i]) * s[i / 3] - x).abs() <= s[i / 3] * 0.5 + 1e-7);
    }
    assert_eq!(&q[21..24], &[0, 0, 0], "padding bytes are zero");
}

#[test]
fn the_writer_refuses_inconsistent_multitask_models() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mt.rkm");
    let config = rankd_formats::synth::feed::multitask_config(3, &[16, 8], &[4, 1], 2);
    rankd_formats::synth::feed::write_config(&path, &config, 1, 3).unwrap();
    let good = ModelFile::open(&path).unwrap().spec().clone();
    assert_eq!(good.format_version(), 4);
    assert_eq!(good.architecture.kind(), "mmoe");
    let check = |f: &dyn Fn(&mut rankd_formats::MultiTask), needle: &str| {
        let mut spec = good.clone();
        f(spec.architecture.multitask.as_mut().unwrap());
        let err = write_err(&spec);
        assert!(err.contains(needle), "expected `{needle}` in: {err}");
    };
    check(
        &|m| m.heads[1].gate = None,
        "has no gate over the 3 experts",
    );
    check(
        &|m| m.experts[2].layers[1].out_dim = 9,
        "expert 2 has layer widths",
    );
    check(
        &|m| m.experts[0].layers[0].in_dim += 1,
        "expert 0 layer 0 takes",
    );
    check(
        &|m| m.heads[0].tower[1].activation = Activation::Relu,
        "tower must be hidden layers with ReLU",
    );
    check(
        &|m| m.heads[1].name = m.heads[0].name.clone(),
        "defined twice",
    );
    check(&|m| m.heads[0].name = "no spaces".into(), "is not 1 to 64");
    check(
        &|m| m.heads[0].gate.as_mut().unwrap().out_dim = 2,
        "one per expert",
    );
    check(&|m| m.heads[1].tower.clear(), "has no tower");
    check(&|m| m.experts.clear(), "0 experts");
    check(&|m| m.heads[0].tower[0].bias.len += 1, "tower layer 0 bias");
    let mut spec = good.clone();
    spec.architecture.fm = true;
    assert!(write_err(&spec).contains("no deep layers outside its experts"));
}
