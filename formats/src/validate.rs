//! The invariants of a model beyond what the FlatBuffers verifier checks: names resolve, shapes
//! match, layers chain, blobs are aligned, inside the blob region and disjoint.
//!
//! The writer runs the same checks before it writes, so it never produces a file the reader
//! would reject.

use rankd_feature_ops::{CompiledSpec, SlotKind};

use crate::error::{FormatError, Result};
use crate::layout::{BLOB_ALIGN, HEADER_LEN};
use crate::spec::{Activation, BlobRef, ModelSpec};
use crate::WeightType;

fn invalid(msg: String) -> FormatError {
    FormatError::Invalid(msg)
}

fn id_slot(compiled: &CompiledSpec, slot: &str, what: &str) -> Result<u32> {
    let idx = compiled
        .slot_index(slot)
        .ok_or_else(|| invalid(format!("{what} names slot `{slot}`, which is not defined")))?;
    compiled.slots()[idx].kind.num_ids().ok_or_else(|| {
        invalid(format!(
            "{what} names slot `{slot}`, which is dense; it needs an id slot"
        ))
    })
}

fn expect_len(what: &str, blob: BlobRef, expected: Option<u64>) -> Result<()> {
    match expected {
        Some(n) if n == blob.len => Ok(()),
        Some(n) => Err(invalid(format!(
            "{what} has {} values, expected {n}",
            blob.len
        ))),
        None => Err(invalid(format!("{what}: shape overflows u64"))),
    }
}

/// Checks `spec` for a file whose blob region ends at `blob_end` (the metadata offset) and
/// returns the compiled feature spec.
pub fn validate(spec: &ModelSpec, blob_end: u64) -> Result<CompiledSpec> {
    if spec.metadata.name.is_empty() {
        return Err(invalid("the model has no name".into()));
    }
    let compiled = CompiledSpec::compile(&spec.features)?;
    let arch = &spec.architecture;

    let mut seen = std::collections::HashSet::new();
    for e in &arch.embeddings {
        let what = format!("embedding table `{}`", e.slot);
        if !seen.insert(e.slot.as_str()) {
            return Err(invalid(format!("{what} is defined twice")));
        }
        let num_ids = id_slot(&compiled, &e.slot, &what)?;
        if e.rows != u64::from(num_ids) {
            return Err(invalid(format!(
                "{what} has {} rows but the slot has {num_ids} ids",
                e.rows
            )));
        }
        if e.dim == 0 {
            return Err(invalid(format!("{what} has dimension 0")));
        }
        expect_len(
            &what,
            e.weights,
            e.rows
                .checked_mul(u64::from(e.dim))
                .map(|n| e.weight_type.words(n)),
        )?;
        match (e.weight_type, e.scales) {
            (WeightType::I8, Some(s)) => expect_len(&format!("{what} scales"), s, Some(e.rows))?,
            (WeightType::I8, None) => {
                return Err(invalid(format!("{what} is int8 without scales")))
            }
            (_, Some(_)) => {
                return Err(invalid(format!(
                    "{what} has row scales but is not an int8 table"
                )))
            }
            (_, None) => {}
        }
    }
    for d in &arch.dense_inputs {
        let idx = compiled
            .slot_index(d)
            .ok_or_else(|| invalid(format!("dense input `{d}` is not a defined slot")))?;
        if compiled.slots()[idx].kind != SlotKind::Dense {
            return Err(invalid(format!(
                "dense input `{d}` is an id slot; use a normalize slot"
            )));
        }
    }
    if let Some(wide) = &arch.wide {
        if !wide.bias.is_finite() {
            return Err(invalid(format!("wide bias {} is not finite", wide.bias)));
        }
        let mut seen = std::collections::HashSet::new();
        for s in &wide.slots {
            let what = format!("wide weights of `{}`", s.slot);
            if !seen.insert(s.slot.as_str()) {
                return Err(invalid(format!("{what} are defined twice")));
            }
            let num_ids = id_slot(&compiled, &s.slot, &what)?;
            expect_len(&what, s.weights, Some(u64::from(num_ids)))?;
        }
    }
    if arch.fm {
        let Some(first) = arch.embeddings.first() else {
            return Err(invalid("the FM term needs embedding tables".into()));
        };
        if let Some(e) = arch.embeddings.iter().find(|e| e.dim != first.dim) {
            return Err(invalid(format!(
                "the FM term needs equal embedding dims, but `{}` has {} and `{}` has {}",
                first.slot, first.dim, e.slot, e.dim
            )));
        }
    }
    if !arch.deep.is_empty() {
        let mut width = arch.deep_input_dim();
        for (i, l) in arch.deep.iter().enumerate() {
            if u64::from(l.in_dim) != width {
                return Err(invalid(format!(
                    "deep layer {i} takes {} inputs but receives {width}",
                    l.in_dim
                )));
            }
            if l.out_dim == 0 {
                return Err(invalid(format!("deep layer {i} has no outputs")));
            }
            expect_len(
                &format!("deep layer {i} weight"),
                l.weight,
                u64::from(l.in_dim).checked_mul(u64::from(l.out_dim)),
            )?;
            expect_len(
                &format!("deep layer {i} bias"),
                l.bias,
                Some(u64::from(l.out_dim)),
            )?;
            width = u64::from(l.out_dim);
        }
        let last = arch.deep.last().expect("non-empty");
        if last.out_dim != 1 || last.activation != Activation::None {
            return Err(invalid(
                "the last deep layer must have one output and no activation".into(),
            ));
        }
    }
    if let Some(c) = &arch.cross {
        let d = arch.deep_input_dim();
        if arch.deep.is_empty() {
            return Err(invalid("cross layers without deep layers".into()));
        }
        if c.layers.is_empty() {
            return Err(invalid("a cross network without layers".into()));
        }
        for (i, l) in c.layers.iter().enumerate() {
            if u64::from(l.dim) != d {
                return Err(invalid(format!(
                    "cross layer {i} has width {} but the deep input has {d}",
                    l.dim
                )));
            }
            let name = |what: &str| format!("cross layer {i} {what}");
            if l.rank == 0 {
                let w = l
                    .weight
                    .ok_or_else(|| invalid(format!("full-rank cross layer {i} has no weight")))?;
                expect_len(&name("weight"), w, d.checked_mul(d))?;
                if l.u.is_some() || l.v.is_some() {
                    return Err(invalid(format!("full-rank cross layer {i} has u or v")));
                }
            } else {
                if u64::from(l.rank) >= d {
                    return Err(invalid(format!(
                        "cross layer {i} has rank {} for a width of {d}",
                        l.rank
                    )));
                }
                let (Some(u), Some(v), None) = (l.u, l.v, l.weight) else {
                    return Err(invalid(format!(
                        "low-rank cross layer {i} needs u and v and no weight"
                    )));
                };
                expect_len(&name("u"), u, d.checked_mul(u64::from(l.rank)))?;
                expect_len(&name("v"), v, d.checked_mul(u64::from(l.rank)))?;
            }
            expect_len(&name("bias"), l.bias, Some(d))?;
        }
        match (c.structure, c.output) {
            (crate::spec::CrossStructure::Parallel, Some(o)) => {
                expect_len("cross output", o, Some(d))?;
            }
            (crate::spec::CrossStructure::Parallel, None) => {
                return Err(invalid(
                    "a parallel cross network without output weights".into(),
                ));
            }
            (crate::spec::CrossStructure::Stacked, Some(_)) => {
                return Err(invalid(
                    "a stacked cross network with output weights".into(),
                ));
            }
            (crate::spec::CrossStructure::Stacked, None) => {}
        }
    }
    if let Some(m) = &arch.multitask {
        validate_multitask(arch, m)?;
    }
    if arch.wide.is_none() && arch.deep.is_empty() && !arch.fm && arch.multitask.is_none() {
        return Err(invalid(
            "the model has neither a wide part, a deep part nor an FM term".into(),
        ));
    }
    validate_blobs(&arch.blobs(), blob_end)?;
    Ok(compiled)
}

/// The most experts and heads a multi-task model may have.
pub const MAX_EXPERTS: usize = 64;
/// See [`MAX_EXPERTS`].
pub const MAX_HEADS: usize = 64;

/// Whether `name` may name a head: 1 to 64 ASCII letters, digits, `_` and `-` (it appears in
/// tensor names, metric labels and protocol output names).
pub fn valid_head_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// Checks a chain of dense layers starting at width `width`: each takes the previous one's
/// outputs, has outputs, and its blobs have the lengths of its shape. Returns the last width.
fn chain(
    layers: &[crate::spec::DenseLayer],
    mut width: u64,
    what: &dyn Fn(usize) -> String,
) -> Result<u64> {
    for (i, l) in layers.iter().enumerate() {
        let name = what(i);
        if u64::from(l.in_dim) != width {
            return Err(invalid(format!(
                "{name} takes {} inputs but receives {width}",
                l.in_dim
            )));
        }
        if l.out_dim == 0 {
            return Err(invalid(format!("{name} has no outputs")));
        }
        expect_len(
            &format!("{name} weight"),
            l.weight,
            u64::from(l.in_dim).checked_mul(u64::from(l.out_dim)),
        )?;
        expect_len(&format!("{name} bias"), l.bias, Some(u64::from(l.out_dim)))?;
        width = u64::from(l.out_dim);
    }
    Ok(width)
}

fn validate_multitask(arch: &crate::spec::Architecture, m: &crate::spec::MultiTask) -> Result<()> {
    if !arch.deep.is_empty() || arch.wide.is_some() || arch.fm || arch.cross.is_some() {
        return Err(invalid(
            "a multi-task model has no deep layers outside its experts and towers, and no wide \
             part, FM term or cross network"
                .into(),
        ));
    }
    let k = m.experts.len();
    if k == 0 || k > MAX_EXPERTS {
        return Err(invalid(format!(
            "a multi-task model has {k} experts (1 to {MAX_EXPERTS})"
        )));
    }
    if m.heads.is_empty() || m.heads.len() > MAX_HEADS {
        return Err(invalid(format!(
            "a multi-task model has {} heads (1 to {MAX_HEADS})",
            m.heads.len()
        )));
    }
    let d = arch.deep_input_dim();
    let mut expert_out = None;
    for (e, expert) in m.experts.iter().enumerate() {
        if expert.layers.is_empty() {
            return Err(invalid(format!("expert {e} has no layers")));
        }
        if expert
            .layers
            .iter()
            .any(|l| l.activation != Activation::Relu)
        {
            return Err(invalid(format!("expert {e} has a layer without ReLU")));
        }
        let widths: Vec<u32> = expert.layers.iter().map(|l| l.out_dim).collect();
        let first: Vec<u32> = m.experts[0].layers.iter().map(|l| l.out_dim).collect();
        if widths != first {
            return Err(invalid(format!(
                "expert {e} has layer widths {widths:?}, expert 0 {first:?}"
            )));
        }
        expert_out = Some(chain(&expert.layers, d, &|i| {
            format!("expert {e} layer {i}")
        })?);
    }
    let expert_out = expert_out.expect("at least one expert");
    let mut names = std::collections::HashSet::new();
    for h in &m.heads {
        if !valid_head_name(&h.name) {
            return Err(invalid(format!(
                "head name {:?} is not 1 to 64 ASCII letters, digits, `_` or `-`",
                h.name
            )));
        }
        if !names.insert(h.name.as_str()) {
            return Err(invalid(format!("head `{}` is defined twice", h.name)));
        }
        match (&h.gate, k) {
            (None, 1) => {}
            (Some(_), 1) => {
                return Err(invalid(format!(
                    "head `{}` has a gate but there is one expert",
                    h.name
                )))
            }
            (None, _) => {
                return Err(invalid(format!(
                    "head `{}` has no gate over the {k} experts",
                    h.name
                )))
            }
            (Some(g), _) => {
                if u64::from(g.out_dim) != k as u64 || g.activation != Activation::None {
                    return Err(invalid(format!(
                        "head `{}`'s gate must have {k} outputs (one per expert) and no activation",
                        h.name
                    )));
                }
                chain(std::slice::from_ref(g), d, &|_| {
                    format!("head `{}` gate", h.name)
                })?;
            }
        }
        let Some(last) = h.tower.last() else {
            return Err(invalid(format!("head `{}` has no tower", h.name)));
        };
        chain(&h.tower, expert_out, &|i| {
            format!("head `{}` tower layer {i}", h.name)
        })?;
        let hidden = &h.tower[..h.tower.len() - 1];
        if hidden.iter().any(|l| l.activation != Activation::Relu)
            || last.out_dim != 1
            || last.activation != Activation::None
        {
            return Err(invalid(format!(
                "head `{}`'s tower must be hidden layers with ReLU, then one output without \
                 activation",
                h.name
            )));
        }
    }
    Ok(())
}

fn validate_blobs(blobs: &[(String, BlobRef)], blob_end: u64) -> Result<()> {
    let mut spans = Vec::with_capacity(blobs.len());
    for (what, b) in blobs {
        let end = b
            .byte_len()
            .and_then(|n| b.offset.checked_add(n))
            .ok_or_else(|| invalid(format!("{what}: blob {}+{} overflows", b.offset, b.len)))?;
        if b.offset % BLOB_ALIGN != 0 {
            return Err(invalid(format!(
                "{what}: blob offset {} is not a multiple of {BLOB_ALIGN}",
                b.offset
            )));
        }
        if b.offset < HEADER_LEN as u64 || end > blob_end {
            return Err(invalid(format!(
                "{what}: blob bytes {}..{end} are outside the blob region {HEADER_LEN}..{blob_end}",
                b.offset
            )));
        }
        if b.len > 0 {
            spans.push((b.offset, end, what));
        }
    }
    spans.sort_unstable();
    for w in spans.windows(2) {
        if w[1].0 < w[0].1 {
            return Err(invalid(format!("{} and {} overlap", w[0].2, w[1].2)));
        }
    }
    Ok(())
}
