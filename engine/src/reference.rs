//! A deliberately plain implementation of the model math in f64: one item at a time, no
//! request-level split, no batching, weights read from the file's own description. Tests compare
//! the engines against it; it is far too slow to serve.

use rankd_feature_ops::SlotBatch;
use rankd_formats::{Activation, Pooling, WeightType};

use super::{EngineError, ItemRow, Model, Request, UserRow};

/// The value of an IEEE 754 binary16 bit pattern, from its definition: sign, 5 exponent bits
/// (bias 15; 0 for subnormals, 31 for infinities and NaN), 10 fraction bits.
fn f16_value(bits: u16) -> f64 {
    let sign = if bits >> 15 == 1 { -1.0 } else { 1.0 };
    let exp = i32::from((bits >> 10) & 0x1f);
    let frac = f64::from(bits & 0x3ff);
    sign * match exp {
        0 => frac / 1024.0 * 2f64.powi(-14),
        31 if frac == 0.0 => f64::INFINITY,
        31 => f64::NAN,
        e => (1.0 + frac / 1024.0) * 2f64.powi(e - 15),
    }
}

/// Scores every item of `req` in f64 (a multi-task model: its default head).
pub fn score(model: &Model, req: &dyn Request) -> Result<Vec<f64>, EngineError> {
    Ok(score_heads(model, req)?.swap_remove(0))
}

/// Every head's scores of every item of `req` in f64: one vector per head, the default head
/// first (one vector for a single-task model).
pub fn score_heads(model: &Model, req: &dyn Request) -> Result<Vec<Vec<f64>>, EngineError> {
    let spec = model.file().spec();
    let compiled = model.features();
    let arch = &spec.architecture;
    let slot = |name: &str| compiled.slot_index(name).expect("validated slot");
    // Request-level values must be valid even when every item overrides them.
    compiled
        .transform_row(&UserRow(req), &mut SlotBatch::new())
        .map_err(EngineError::User)?;
    let heads = arch.multitask.as_ref().map_or(1, |m| m.heads.len());
    let mut scores = vec![Vec::with_capacity(req.num_items()); heads];
    for item in 0..req.num_items() {
        let mut b = SlotBatch::new();
        compiled
            .transform_row(&ItemRow { request: req, item }, &mut b)
            .map_err(|source| EngineError::Item { item, source })?;
        let mut x: Vec<f64> = Vec::new();
        let mut fields: Vec<Vec<f64>> = Vec::new();
        for (ei, e) in arch.embeddings.iter().enumerate() {
            let dim = e.dim as usize;
            // A row changed by an online update is read from the version's overlay.
            let overlay = model.emb_overlay(ei);
            let value = |i: usize| match e.weight_type {
                _ if overlay.is_some_and(|o| o.get((i / dim) as u32).is_some()) => f64::from(
                    overlay
                        .and_then(|o| o.get((i / dim) as u32))
                        .expect("checked")[i % dim],
                ),
                WeightType::F32 => f64::from(model.file().weights(e.weights)[i]),
                WeightType::F16 => f16_value(model.file().weights_f16(e.weights)[i]),
                WeightType::I8 => {
                    let scales = model
                        .file()
                        .weights(e.scales.expect("validated: an int8 table has scales"));
                    f64::from(model.file().weights_i8(e.weights)[i]) * f64::from(scales[i / dim])
                }
            };
            let ids = b.ids(slot(&e.slot), 0);
            let mut v = vec![0f64; dim];
            for &id in ids {
                for (d, x) in v.iter_mut().enumerate() {
                    *x += value(id as usize * dim + d);
                }
            }
            if e.pooling == Pooling::Mean {
                for d in v.iter_mut() {
                    *d /= ids.len() as f64;
                }
            }
            x.extend_from_slice(&v);
            fields.push(v);
        }
        for d in &arch.dense_inputs {
            x.push(f64::from(b.dense(slot(d), 0)));
        }
        if let Some(m) = &arch.multitask {
            for (h, logit) in multitask_logits(model, m, &x).into_iter().enumerate() {
                scores[h].push(1.0 / (1.0 + (-logit).exp()));
            }
            continue;
        }
        let mut logit = 0f64;
        // DCN-v2 cross layers: x_{l+1} = x0 * (W x_l + b) + x_l.
        if let Some(c) = &arch.cross {
            let d = x.len();
            let x0 = x.clone();
            let mut xl = x.clone();
            for l in &c.layers {
                let r = l.rank as usize;
                let bias = model.file().weights(l.bias);
                let mut t: Vec<f64> = bias.iter().map(|&b| f64::from(b)).collect();
                if r == 0 {
                    let w = model.file().weights(l.weight.expect("validated"));
                    for (o, t) in t.iter_mut().enumerate() {
                        *t += (0..d).map(|i| f64::from(w[o * d + i]) * xl[i]).sum::<f64>();
                    }
                } else {
                    let u = model.file().weights(l.u.expect("validated"));
                    let v = model.file().weights(l.v.expect("validated"));
                    let p: Vec<f64> = (0..r)
                        .map(|j| (0..d).map(|i| f64::from(v[i * r + j]) * xl[i]).sum())
                        .collect();
                    for (o, t) in t.iter_mut().enumerate() {
                        *t += (0..r).map(|j| f64::from(u[o * r + j]) * p[j]).sum::<f64>();
                    }
                }
                for i in 0..d {
                    xl[i] += x0[i] * t[i];
                }
            }
            match c.output {
                // Parallel: the deep layers take x0, the cross output joins the logit.
                Some(out) => {
                    let w = model.file().weights(out);
                    logit += (0..d).map(|i| f64::from(w[i]) * xl[i]).sum::<f64>();
                }
                // Stacked: the deep layers take the cross output.
                None => x = xl,
            }
        }
        if !arch.deep.is_empty() {
            let mut h = x;
            for (li, l) in arch.deep.iter().enumerate() {
                let w = model.layer_weight(li);
                let bias = model.layer_bias(li);
                let (i_n, o_n) = (l.in_dim as usize, l.out_dim as usize);
                let mut next = vec![0f64; o_n];
                for o in 0..o_n {
                    let mut acc = f64::from(bias[o]);
                    for i in 0..i_n {
                        acc += f64::from(w[o * i_n + i]) * h[i];
                    }
                    next[o] = match l.activation {
                        Activation::Relu => acc.max(0.0),
                        Activation::None => acc,
                    };
                }
                h = next;
            }
            logit += h[0];
        }
        if let Some(wide) = &arch.wide {
            logit += f64::from(model.wide_bias.unwrap_or(wide.bias));
            for (wi, s) in wide.slots.iter().enumerate() {
                for &id in b.ids(slot(&s.slot), 0) {
                    logit += f64::from(model.wide_weight(wi, id));
                }
            }
        }
        if arch.fm {
            let dim = fields[0].len();
            let mut fm = 0f64;
            for d in 0..dim {
                let sum: f64 = fields.iter().map(|f| f[d]).sum();
                let sq: f64 = fields.iter().map(|f| f[d] * f[d]).sum();
                fm += sum * sum - sq;
            }
            logit += 0.5 * fm;
        }
        scores[0].push(1.0 / (1.0 + (-logit).exp()));
    }
    Ok(scores)
}

/// `act(W x + b)` of a multi-task model's layer `l` (flat index `i`) in f64, weights from the
/// file or, when online updates replaced it, from the version's updates.
fn layer(model: &Model, i: usize, l: &rankd_formats::DenseLayer, x: &[f64]) -> Vec<f64> {
    let (w, b) = model.mt_layer(i);
    let i_n = l.in_dim as usize;
    (0..l.out_dim as usize)
        .map(|o| {
            let acc = f64::from(b[o])
                + (0..i_n)
                    .map(|i| f64::from(w[o * i_n + i]) * x[i])
                    .sum::<f64>();
            match l.activation {
                Activation::Relu => acc.max(0.0),
                Activation::None => acc,
            }
        })
        .collect()
}

/// Each head's logit for the deep input `x`: the experts on `x`, each head's softmax gate over
/// them (with one expert, its output as is), the head's tower.
fn multitask_logits(model: &Model, m: &rankd_formats::MultiTask, x: &[f64]) -> Vec<f64> {
    // Flat layer indices, in the order the file lists the layers.
    let mut next = 0;
    let mut index = || {
        next += 1;
        next - 1
    };
    let experts: Vec<Vec<f64>> = m
        .experts
        .iter()
        .map(|e| {
            e.layers
                .iter()
                .fold(x.to_vec(), |h, l| layer(model, index(), l, &h))
        })
        .collect();
    m.heads
        .iter()
        .map(|head| {
            let input = match &head.gate {
                None => experts[0].clone(),
                Some(g) => {
                    let z = layer(model, index(), g, x);
                    let max = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let e: Vec<f64> = z.iter().map(|v| (v - max).exp()).collect();
                    let sum: f64 = e.iter().sum();
                    let mut mixed = vec![0f64; experts[0].len()];
                    for (p, out) in e.iter().zip(&experts) {
                        for (m, v) in mixed.iter_mut().zip(out) {
                            *m += p / sum * v;
                        }
                    }
                    mixed
                }
            };
            head.tower
                .iter()
                .fold(input, |h, l| layer(model, index(), l, &h))[0]
        })
        .collect()
}
