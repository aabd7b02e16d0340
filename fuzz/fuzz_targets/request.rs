//! Fuzzes the network input: frame headers, FlatBuffers request bodies, their resolution against
//! a model's feature spec (`FbRequest`) and the engine that scores them. Every input must give a
//! result or a typed error, never a panic or UB.
//!
//! Raw bytes rarely pass the FlatBuffers verifier, so half of the inputs drive a builder instead:
//! fuzzer-chosen item counts, kinds (right or wrong), values, offsets and missing bitmaps in a
//! well-formed buffer, which reaches `FbRequest::new` and the engine.
#![no_main]

use std::sync::OnceLock;

use flatbuffers::FlatBufferBuilder;
use libfuzzer_sys::fuzz_target;
use rankd_formats::synth::{write_synthetic, ModelKind, SynthOptions};
use rankd_serving::engine::cpu::CpuEngine;
use rankd_serving::engine::{BatchOutput, InferenceBackend, Model, Request};
use rankd_serving::fbrequest::FbRequest;
use rankd_serving::gen::rankd::rpc as fb;
use rankd_serving::protocol::{FrameHeader, HEADER_LEN};

fn model() -> &'static Model {
    static MODEL: OnceLock<Model> = OnceLock::new();
    MODEL.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("rankd-fuzz-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("model.rkm");
        write_synthetic(
            &path,
            &SynthOptions {
                kind: ModelKind::DeepFm,
                ..SynthOptions::default()
            },
        )
        .unwrap();
        Model::open(&path).unwrap()
    })
}

/// Resolves and scores one request body.
fn score(body: &[u8]) {
    let Ok(req) =
        flatbuffers::root_with_opts::<fb::ScoreRequest<'_>>(&rankd_serving::fbrequest::verifier_options(), body)
    else {
        return;
    };
    let model = model();
    if req.num_items() > 10_000 {
        return;
    }
    let Ok(view) = FbRequest::new(model.features(), req) else {
        return;
    };
    let mut engine = CpuEngine::new();
    let mut out = BatchOutput::default();
    let reqs: [&dyn Request; 1] = [&view];
    engine.score(model, &reqs, &mut out);
    if let Ok(scores) = out.get(0) {
        assert_eq!(scores.len(), req.num_items() as usize);
    }
}

/// A byte source that yields zeros when exhausted.
struct Bytes<'a>(&'a [u8]);

impl Bytes<'_> {
    fn u8(&mut self) -> u8 {
        let Some((&b, rest)) = self.0.split_first() else {
            return 0;
        };
        self.0 = rest;
        b
    }
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes([self.u8(), self.u8(), self.u8(), self.u8()])
    }
    fn i64(&mut self) -> i64 {
        i64::from_le_bytes(std::array::from_fn(|_| self.u8()))
    }
    fn f64(&mut self) -> f64 {
        f64::from_bits(self.i64() as u64)
    }
    fn str(&mut self) -> String {
        let n = (self.u8() % 12) as usize;
        (0..n).map(|_| char::from(b'a' + self.u8() % 6)).collect()
    }
}

const NAMES: [&str; 7] = [
    "user_age", "user_city", "hour", "item_id", "item_tags", "item_price", "unknown",
];

fn build(b: &mut Bytes<'_>) -> Vec<u8> {
    let mut fbb = FlatBufferBuilder::new();
    let n = (b.u8() % 40) as u32;
    let mut user = Vec::new();
    for _ in 0..b.u8() % 5 {
        let name = fbb.create_string(NAMES[(b.u8() % 7) as usize]);
        let kind = fb::Kind(b.u8() % 7);
        let s = fbb.create_string(&b.str());
        let i64s = fbb.create_vector(&[b.i64(), b.i64()]);
        let s1 = b.str();
        let parts = [fbb.create_string(&s1), fbb.create_string("news")];
        let strs = fbb.create_vector(&parts);
        user.push(fb::Feature::create(
            &mut fbb,
            &fb::FeatureArgs {
                name: Some(name),
                kind,
                f64_: b.f64(),
                i64_: b.i64(),
                str: (b.u8() & 1 == 0).then_some(s),
                i64s: (b.u8() & 1 == 0).then_some(i64s),
                strs: (b.u8() & 1 == 0).then_some(strs),
            },
        ));
    }
    let mut cols = Vec::new();
    for _ in 0..b.u8() % 5 {
        let name = fbb.create_string(NAMES[(b.u8() % 7) as usize]);
        let kind = fb::Kind(b.u8() % 7);
        // Lengths near the right one, sometimes off by a little.
        let len = (n as i64 + i64::from(b.u8() % 3) - 1).max(0) as usize;
        let f64s: Vec<f64> = (0..len).map(|_| b.f64()).collect();
        let i64s: Vec<i64> = (0..len).map(|_| b.i64() % 100).collect();
        let strings: Vec<String> = (0..len).map(|_| b.str()).collect();
        let refs: Vec<&str> = strings.iter().map(String::as_str).collect();
        let mut offsets = vec![0u32];
        for _ in 0..n {
            let last = *offsets.last().unwrap_or(&0);
            offsets.push(last + u32::from(b.u8() % 3));
        }
        if b.u8() % 8 == 0 {
            offsets.push(b.u32());
        }
        let missing: Vec<u8> = (0..n.div_ceil(8) as usize + (b.u8() % 2) as usize)
            .map(|_| b.u8())
            .collect();
        let f64s = fbb.create_vector(&f64s);
        let i64s = fbb.create_vector(&i64s);
        let parts: Vec<_> = refs.iter().map(|s| fbb.create_string(s)).collect();
        let strs = fbb.create_vector(&parts);
        let offsets = fbb.create_vector(&offsets);
        let missing = fbb.create_vector(&missing);
        let flags = b.u8();
        cols.push(fb::ItemColumn::create(
            &mut fbb,
            &fb::ItemColumnArgs {
                name: Some(name),
                kind,
                f64s: (flags & 1 != 0).then_some(f64s),
                i64s: (flags & 2 != 0).then_some(i64s),
                strs: (flags & 4 != 0).then_some(strs),
                offsets: (flags & 8 != 0).then_some(offsets),
                missing: (flags & 16 != 0).then_some(missing),
            },
        ));
    }
    let model = fbb.create_string("m");
    let user = fbb.create_vector(&user);
    let cols = fbb.create_vector(&cols);
    let r = fb::ScoreRequest::create(
        &mut fbb,
        &fb::ScoreRequestArgs {
            model: Some(model),
            num_items: n,
            user: Some(user),
            items: Some(cols),
            ..Default::default()
        },
    );
    fbb.finish(r, None);
    fbb.finished_data().to_vec()
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode & 1 == 0 {
        // A stream of frames, parsed as the server's reader does.
        let mut at = 0;
        while rest.len() - at >= HEADER_LEN {
            let h: &[u8; HEADER_LEN] = rest[at..at + HEADER_LEN].try_into().unwrap();
            let Ok(header) = FrameHeader::decode(h, 1 << 20) else {
                return;
            };
            let end = at + HEADER_LEN + header.body_len as usize;
            if end > rest.len() {
                return;
            }
            score(&rest[at + HEADER_LEN..end]);
            at = end;
        }
    } else {
        score(&build(&mut Bytes(rest)));
    }
});
