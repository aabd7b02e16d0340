//! A checked, executable feature spec and the buffers it writes into.
//!
//! [`CompiledSpec::compile`] validates a [`FeatureSpec`] once (names, types, boundaries,
//! vocabularies, id counts) and builds the vocabulary tables. [`CompiledSpec::transform_row`] then
//! maps one row of raw values into a [`SlotBatch`], a column per slot that is cleared and reused
//! across requests: in steady state nothing here allocates.

use std::collections::HashMap;

use crate::error::{Error, Result};
use crate::hash::{encode_int, encode_str, hash_encoded, hash_int, hash_str, FastMod, ValueHasher};
use crate::spec::{FeatureSpec, RawFeature, Transform, Vocabulary};
use crate::value::{FeatureType, OneRow, Row, Rows, Value};
use crate::vocab::{IntVocab, StrVocab, StrVocabError};

/// The largest id count a slot may have (ids are `u32`, and crosses must stay indexable).
pub const MAX_NUM_IDS: u64 = 1 << 31;

/// Default for [`CompiledSpec::max_ids_per_row`].
pub const DEFAULT_MAX_IDS_PER_ROW: u64 = 1 << 16;

/// What a slot produces.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SlotKind {
    /// A list of ids, each `< num_ids`.
    Ids {
        /// Number of distinct ids.
        num_ids: u32,
    },
    /// One dense `f32` per row.
    Dense,
}

impl SlotKind {
    /// The id count, for id slots.
    pub fn num_ids(self) -> Option<u32> {
        match self {
            SlotKind::Ids { num_ids } => Some(num_ids),
            SlotKind::Dense => None,
        }
    }
}

/// Facts about one compiled slot.
#[derive(Clone, Debug)]
pub struct SlotInfo {
    /// The slot's name.
    pub name: String,
    /// Ids or dense.
    pub kind: SlotKind,
    /// The raw features it depends on, directly or through crossed slots (sorted, unique).
    pub features: Vec<usize>,
    /// The slots it reads (only `descartes` reads slots), in cross order.
    pub inputs: Vec<usize>,
}

#[derive(Clone, Debug)]
enum Op {
    Piecewise {
        feature: usize,
        boundaries: Box<[f64]>,
    },
    PickcatInt {
        feature: usize,
        vocab: IntVocab,
        /// Vocabulary size `n`: the first out-of-vocabulary id.
        n: u32,
        /// Out-of-vocabulary buckets `m`.
        m: u32,
    },
    PickcatStr {
        feature: usize,
        vocab: StrVocab,
        n: u32,
        m: u32,
    },
    Descartes {
        inputs: Box<[usize]>,
        /// `strides[i]` = product of the id counts of the inputs after `i`.
        strides: Box<[u64]>,
    },
    Combinehash {
        features: Box<[usize]>,
        buckets: FastMod,
    },
    Normalize {
        feature: usize,
        mean: f64,
        std: f64,
        clip: Option<f64>,
        log1p: bool,
    },
    Prefix {
        feature: usize,
        length: usize,
        buckets: FastMod,
    },
}

/// A validated feature spec, ready to transform rows.
#[derive(Clone, Debug)]
pub struct CompiledSpec {
    features: Vec<RawFeature>,
    feature_index: HashMap<String, usize>,
    slots: Vec<SlotInfo>,
    slot_index: HashMap<String, usize>,
    ops: Vec<Op>,
    seed: u64,
    max_ids_per_row: u64,
}

fn param(slot: &str, reason: impl Into<String>) -> Error {
    Error::Parameter {
        slot: slot.to_owned(),
        reason: reason.into(),
    }
}

fn num_ids(slot: &str, n: u128) -> Result<u32> {
    if n > u128::from(MAX_NUM_IDS) {
        return Err(Error::TooManyIds {
            slot: slot.to_owned(),
            num_ids: n,
        });
    }
    Ok(n as u32)
}

impl CompiledSpec {
    /// Checks every rule of the spec and builds the lookup tables.
    pub fn compile(spec: &FeatureSpec) -> Result<Self> {
        let mut feature_index = HashMap::with_capacity(spec.features.len());
        for (i, f) in spec.features.iter().enumerate() {
            if feature_index.insert(f.name.clone(), i).is_some() {
                return Err(Error::DuplicateFeature(f.name.clone()));
            }
        }
        let mut compiled = CompiledSpec {
            features: spec.features.clone(),
            feature_index,
            slots: Vec::with_capacity(spec.slots.len()),
            slot_index: HashMap::with_capacity(spec.slots.len()),
            ops: Vec::with_capacity(spec.slots.len()),
            seed: spec.hash_seed,
            max_ids_per_row: DEFAULT_MAX_IDS_PER_ROW,
        };
        for slot in &spec.slots {
            if compiled.slot_index.contains_key(&slot.name) {
                return Err(Error::DuplicateSlot(slot.name.clone()));
            }
            let (op, kind, features) = compiled.compile_slot(&slot.name, &slot.transform)?;
            let inputs = match &op {
                Op::Descartes { inputs, .. } => inputs.to_vec(),
                _ => Vec::new(),
            };
            compiled
                .slot_index
                .insert(slot.name.clone(), compiled.slots.len());
            compiled.slots.push(SlotInfo {
                name: slot.name.clone(),
                kind,
                features,
                inputs,
            });
            compiled.ops.push(op);
        }
        Ok(compiled)
    }

    fn input(&self, slot: &str, transform: &Transform, name: &str) -> Result<(usize, FeatureType)> {
        let idx = *self
            .feature_index
            .get(name)
            .ok_or_else(|| Error::UnknownFeature {
                slot: slot.to_owned(),
                feature: name.to_owned(),
            })?;
        let ty = self.features[idx].ty;
        let ok = match transform {
            Transform::Piecewise { .. } | Transform::Normalize { .. } => ty.is_numeric(),
            Transform::Pickcat { .. } | Transform::Combinehash { .. } | Transform::Hash { .. } => {
                ty.is_categorical()
            }
            Transform::Prefix { .. } => matches!(ty, FeatureType::String | FeatureType::StringList),
            Transform::Descartes { .. } => false,
        };
        if !ok {
            return Err(Error::InputType {
                slot: slot.to_owned(),
                transform: transform.name(),
                feature: name.to_owned(),
                ty,
            });
        }
        Ok((idx, ty))
    }

    fn compile_slot(
        &self,
        slot: &str,
        transform: &Transform,
    ) -> Result<(Op, SlotKind, Vec<usize>)> {
        match transform {
            Transform::Piecewise { input, boundaries } => {
                let (feature, _) = self.input(slot, transform, input)?;
                if let Some(b) = boundaries.iter().find(|b| !b.is_finite()) {
                    return Err(param(slot, format!("boundary {b} is not finite")));
                }
                if let Some(w) = boundaries.windows(2).find(|w| w[0] >= w[1]) {
                    return Err(param(
                        slot,
                        format!(
                            "boundaries must be strictly increasing, but {} is followed by {}",
                            w[0], w[1]
                        ),
                    ));
                }
                let n = num_ids(slot, boundaries.len() as u128 + 2)?;
                let op = Op::Piecewise {
                    feature,
                    boundaries: boundaries.clone().into_boxed_slice(),
                };
                Ok((op, SlotKind::Ids { num_ids: n }, vec![feature]))
            }
            Transform::Pickcat {
                input,
                vocabulary,
                oov_buckets,
            } => {
                let (feature, ty) = self.input(slot, transform, input)?;
                if *oov_buckets == 0 {
                    return Err(param(slot, "oov_buckets must be at least 1"));
                }
                let n = num_ids(
                    slot,
                    vocabulary.len() as u128 + u128::from(*oov_buckets) + 1,
                )?;
                let (n_vocab, m) = (vocabulary.len() as u32, *oov_buckets);
                let str_input = matches!(ty, FeatureType::String | FeatureType::StringList);
                let op = match vocabulary {
                    Vocabulary::Str(v) if !str_input && !v.is_empty() => {
                        return Err(param(
                            slot,
                            format!("string vocabulary for `{input}` of type {ty}"),
                        ))
                    }
                    Vocabulary::Int(v) if str_input && !v.is_empty() => {
                        return Err(param(
                            slot,
                            format!("integer vocabulary for `{input}` of type {ty}"),
                        ))
                    }
                    Vocabulary::Int(v) if !str_input => Op::PickcatInt {
                        feature,
                        vocab: IntVocab::new(v).map_err(|i| {
                            param(
                                slot,
                                format!("vocabulary value {} repeats (position {i})", v[i]),
                            )
                        })?,
                        n: n_vocab,
                        m,
                    },
                    Vocabulary::Str(_) if !str_input => Op::PickcatInt {
                        feature,
                        vocab: IntVocab::new(&[]).expect("empty vocabulary has no duplicates"),
                        n: 0,
                        m,
                    },
                    Vocabulary::Int(_) => Op::PickcatStr {
                        feature,
                        vocab: StrVocab::new::<&str>(&[], self.seed)
                            .expect("empty vocabulary has no duplicates"),
                        n: 0,
                        m,
                    },
                    Vocabulary::Str(v) => Op::PickcatStr {
                        feature,
                        vocab: StrVocab::new(v, self.seed).map_err(|e| match e {
                            StrVocabError::Duplicate(i) => param(
                                slot,
                                format!("vocabulary value {:?} repeats (position {i})", v[i]),
                            ),
                            StrVocabError::TooLarge => {
                                param(slot, "vocabulary strings exceed 4 GiB in total")
                            }
                        })?,
                        n: n_vocab,
                        m,
                    },
                };
                Ok((op, SlotKind::Ids { num_ids: n }, vec![feature]))
            }
            Transform::Descartes { inputs } => {
                if inputs.len() < 2 {
                    return Err(param(slot, "descartes needs at least two input slots"));
                }
                let mut idx = Vec::with_capacity(inputs.len());
                let mut counts = Vec::with_capacity(inputs.len());
                let mut features = Vec::new();
                for name in inputs {
                    let i = self
                        .slot_index
                        .get(name)
                        .copied()
                        .filter(|&i| self.slots[i].kind.num_ids().is_some())
                        .ok_or_else(|| Error::UnknownSlot {
                            slot: slot.to_owned(),
                            input: name.clone(),
                        })?;
                    idx.push(i);
                    counts.push(u128::from(self.slots[i].kind.num_ids().unwrap_or(0)));
                    features.extend_from_slice(&self.slots[i].features);
                }
                let total = counts
                    .iter()
                    .try_fold(1u128, |acc, &c| acc.checked_mul(c))
                    .unwrap_or(u128::MAX);
                let n = num_ids(slot, total)?;
                let mut strides = vec![1u64; counts.len()];
                for i in (0..counts.len() - 1).rev() {
                    strides[i] = strides[i + 1] * counts[i + 1] as u64;
                }
                features.sort_unstable();
                features.dedup();
                let op = Op::Descartes {
                    inputs: idx.into_boxed_slice(),
                    strides: strides.into_boxed_slice(),
                };
                Ok((op, SlotKind::Ids { num_ids: n }, features))
            }
            Transform::Combinehash { inputs, buckets } => {
                if inputs.is_empty() {
                    return Err(param(slot, "combinehash needs at least one input"));
                }
                if *buckets == 0 {
                    return Err(param(slot, "buckets must be at least 1"));
                }
                let n = num_ids(slot, u128::from(*buckets) + 1)?;
                let mut features = Vec::with_capacity(inputs.len());
                for name in inputs {
                    features.push(self.input(slot, transform, name)?.0);
                }
                let mut deps = features.clone();
                deps.sort_unstable();
                deps.dedup();
                let op = Op::Combinehash {
                    features: features.into_boxed_slice(),
                    buckets: FastMod::new(*buckets),
                };
                Ok((op, SlotKind::Ids { num_ids: n }, deps))
            }
            Transform::Hash { input, buckets } => {
                // Exactly pickcat with an empty vocabulary: one implementation of the ids.
                if *buckets == 0 {
                    return Err(param(slot, "buckets must be at least 1"));
                }
                let (_, ty) = self.input(slot, transform, input)?;
                let vocabulary = if matches!(ty, FeatureType::String | FeatureType::StringList) {
                    Vocabulary::Str(Vec::new())
                } else {
                    Vocabulary::Int(Vec::new())
                };
                self.compile_slot(
                    slot,
                    &Transform::Pickcat {
                        input: input.clone(),
                        vocabulary,
                        oov_buckets: *buckets,
                    },
                )
            }
            Transform::Prefix {
                input,
                length,
                buckets,
            } => {
                if *buckets == 0 {
                    return Err(param(slot, "buckets must be at least 1"));
                }
                if *length == 0 {
                    return Err(param(slot, "length must be at least 1"));
                }
                let (feature, _) = self.input(slot, transform, input)?;
                let n = num_ids(slot, u128::from(*buckets) + 1)?;
                let op = Op::Prefix {
                    feature,
                    length: *length as usize,
                    buckets: FastMod::new(*buckets),
                };
                Ok((op, SlotKind::Ids { num_ids: n }, vec![feature]))
            }
            Transform::Normalize {
                input,
                mean,
                std,
                clip,
                log1p,
            } => {
                let (feature, _) = self.input(slot, transform, input)?;
                if !mean.is_finite() {
                    return Err(param(slot, format!("mean {mean} is not finite")));
                }
                if !std.is_finite() || *std == 0.0 {
                    return Err(param(
                        slot,
                        format!("std {std} must be finite and non-zero"),
                    ));
                }
                if let Some(c) = clip {
                    if !c.is_finite() || *c <= 0.0 {
                        return Err(param(slot, format!("clip {c} must be finite and positive")));
                    }
                }
                let op = Op::Normalize {
                    feature,
                    mean: *mean,
                    std: *std,
                    clip: *clip,
                    log1p: *log1p,
                };
                Ok((op, SlotKind::Dense, vec![feature]))
            }
        }
    }

    /// Sets the most ids one slot may produce for one row (guards multi-valued crosses).
    pub fn with_max_ids_per_row(mut self, limit: u64) -> Self {
        self.max_ids_per_row = limit.max(1);
        self
    }

    /// The most ids one slot may produce for one row.
    pub fn max_ids_per_row(&self) -> u64 {
        self.max_ids_per_row
    }

    /// The raw features, in spec order (the indices [`Row::value`] is called with).
    pub fn features(&self) -> &[RawFeature] {
        &self.features
    }

    /// Index of a raw feature by name.
    pub fn feature_index(&self, name: &str) -> Option<usize> {
        self.feature_index.get(name).copied()
    }

    /// The slots, in spec order.
    pub fn slots(&self) -> &[SlotInfo] {
        &self.slots
    }

    /// Index of a slot by name.
    pub fn slot_index(&self, name: &str) -> Option<usize> {
        self.slot_index.get(name).copied()
    }

    /// The hash seed.
    pub fn hash_seed(&self) -> u64 {
        self.seed
    }

    #[inline]
    fn value<'r, R: Rows + ?Sized>(
        &self,
        rows: &'r R,
        row: usize,
        feature: usize,
    ) -> Result<Value<'r>> {
        let v = rows.value(row, feature);
        let ty = self.features[feature].ty;
        if v.fits(ty) {
            Ok(v)
        } else {
            Err(Error::WrongType {
                feature: self.features[feature].name.clone(),
                expected: ty,
                got: v.kind(),
            })
        }
    }

    /// Transforms one row and appends its outputs to `out` (one more row in every column).
    ///
    /// On error `out` is left exactly as it was before the call.
    pub fn transform_row<R: Row + ?Sized>(&self, row: &R, out: &mut SlotBatch) -> Result<()> {
        self.transform_row_masked(row, None, out)
    }

    /// Like [`Self::transform_row`], computing only the slots whose `mask` entry is true; the
    /// others get an empty row (no ids; dense 0). A `descartes` slot in the mask needs its inputs
    /// in the mask too.
    pub fn transform_row_masked<R: Row + ?Sized>(
        &self,
        row: &R,
        mask: Option<&[bool]>,
        out: &mut SlotBatch,
    ) -> Result<()> {
        self.transform_rows_masked(&OneRow(row), mask, out)
            .map_err(|e| e.error)
    }

    /// Transforms every row of `rows` and appends their outputs to `out`, slot by slot (each
    /// slot's loop over the rows runs with its tables and constants at hand). `mask` as in
    /// [`Self::transform_row_masked`].
    ///
    /// On error `out` is left exactly as it was before the call and the error names the row
    /// (the first failing row of the first slot that fails).
    pub fn transform_rows_masked<R: Rows + ?Sized>(
        &self,
        rows: &R,
        mask: Option<&[bool]>,
        out: &mut SlotBatch,
    ) -> std::result::Result<(), RowsError> {
        out.ensure_columns(self.slots.len());
        let rows_before = out.rows;
        match self.transform_rows_inner(rows, mask, out) {
            Ok(()) => {
                out.rows += rows.num_rows();
                Ok(())
            }
            Err((row, error)) => {
                out.cut(rows_before);
                Err(RowsError { row, error })
            }
        }
    }

    fn transform_rows_inner<R: Rows + ?Sized>(
        &self,
        rows: &R,
        mask: Option<&[bool]>,
        out: &mut SlotBatch,
    ) -> std::result::Result<(), (usize, Error)> {
        let count = rows.num_rows();
        let base = out.rows;
        for (s, op) in self.ops.iter().enumerate() {
            let (done, rest) = out.columns.split_at_mut(s);
            let col = &mut rest[0];
            if mask.is_some_and(|m| !m.get(s).copied().unwrap_or(false)) {
                if matches!(op, Op::Normalize { .. }) {
                    col.dense.extend(std::iter::repeat_n(0.0, count));
                } else {
                    let end = col.ids.len() as u32;
                    col.offsets.extend(std::iter::repeat_n(end, count));
                }
                continue;
            }
            // Runs `$body` for every row `$r`, turning its errors into `(row, error)`, then
            // closes the row in the column.
            macro_rules! each_row {
                (|$r:ident| $body:expr) => {
                    for $r in 0..count {
                        #[allow(clippy::redundant_closure_call)]
                        let result: Result<()> = (|| $body)();
                        result.map_err(|e| ($r, e))?;
                        col.offsets.push(col.ids.len() as u32);
                    }
                };
            }
            match op {
                Op::Piecewise {
                    feature,
                    boundaries,
                } => each_row!(|r| {
                    let id = match self.value(rows, r, *feature)?.as_f64() {
                        Some(x) if !x.is_nan() => boundaries.partition_point(|&b| b <= x),
                        _ => boundaries.len() + 1,
                    };
                    col.ids.push(id as u32);
                    Ok(())
                }),
                Op::PickcatInt {
                    feature,
                    vocab,
                    n,
                    m,
                } => {
                    let (n, m) = (*n, *m);
                    let map = |v: i64| match vocab.get(v) {
                        Some(i) => i,
                        None => n + (hash_int(self.seed, v) % u64::from(m)) as u32,
                    };
                    each_row!(|r| {
                        match self.value(rows, r, *feature)? {
                            Value::Int(v) => col.ids.push(map(v)),
                            Value::IntList(l) if !l.is_empty() => {
                                self.check_row_len(s, l.len() as u64)?;
                                col.ids.extend((0..l.len()).map(|i| map(l.get(i))));
                            }
                            _ => col.ids.push(n + m),
                        }
                        Ok(())
                    })
                }
                Op::PickcatStr {
                    feature,
                    vocab,
                    n,
                    m,
                } => {
                    let (n, m) = (*n, *m);
                    let map = |v: &str, h: u64| match vocab.get_hashed(v, h) {
                        Some(i) => i,
                        None => n + (h % u64::from(m)) as u32,
                    };
                    // Rows a group at a time: each row's value read and hashed (see
                    // `each_group`), its table slot asked for, then the lookups, which find most
                    // slots in the cache instead of waiting on each in turn (a vocabulary's table
                    // is read at random, and a large request's other data has pushed it out of
                    // the core's caches since the last request).
                    self.each_group(rows, *feature, |g, group| {
                        let mut hashes = [0u64; LOOKUP_GROUP];
                        for (j, h) in hashes[..group.len()].iter_mut().enumerate() {
                            if let Some(x) = self.group_hash(g, j) {
                                *h = x;
                                vocab.prefetch(x);
                            }
                        }
                        for (j, r) in group.enumerate() {
                            match g.values[j].0 {
                                Value::Str(v) => col.ids.push(map(v, hashes[j])),
                                Value::StrList(l) if !l.is_empty() => {
                                    self.check_row_len(s, l.len() as u64).map_err(|e| (r, e))?;
                                    col.ids.extend((0..l.len()).map(|i| {
                                        let v = l.get(i);
                                        map(v, hash_str(self.seed, v))
                                    }));
                                }
                                _ => col.ids.push(n + m),
                            }
                            col.offsets.push(col.ids.len() as u32);
                        }
                        Ok(())
                    })?;
                }
                Op::Descartes { inputs, strides } => each_row!(|r| {
                    let row_idx = base + r;
                    let mut combos = 1u64;
                    for &i in inputs.iter() {
                        combos = combos.saturating_mul(done[i].row_ids(row_idx).len() as u64);
                    }
                    self.check_row_len(s, combos)?;
                    cross(done, inputs, strides, row_idx, &mut col.ids);
                    Ok(())
                }),
                Op::Combinehash { features, buckets } if features.len() == 1 => {
                    // One scalar input: hash it directly, without the incremental builder.
                    let (feature, buckets) = (features[0], *buckets);
                    let missing = buckets.divisor();
                    // Rows a group at a time, read and hashed as for string lookups above.
                    self.each_group(rows, feature, |g, group| {
                        for j in 0..group.len() {
                            let h = match g.values[j].0 {
                                Value::Missing => None,
                                Value::Int(_) | Value::Str(_) => self.group_hash(g, j),
                                v => Some(self.hash_values(&[v])),
                            };
                            col.ids.push(match h {
                                Some(h) => buckets.rem(h),
                                None => missing,
                            });
                            col.offsets.push(col.ids.len() as u32);
                        }
                        Ok(())
                    })?;
                }
                Op::Combinehash { features, buckets } => each_row!(|r| {
                    let mut hasher = ValueHasher::new(self.seed);
                    let mut missing = false;
                    for &f in features.iter() {
                        match self.value(rows, r, f)? {
                            Value::Missing => missing = true,
                            Value::Int(v) => hasher.int(v),
                            Value::Str(v) => hasher.str(v),
                            Value::IntList(l) => (0..l.len()).for_each(|i| hasher.int(l.get(i))),
                            Value::StrList(l) => (0..l.len()).for_each(|i| hasher.str(l.get(i))),
                            Value::F32(_) | Value::F64(_) => {
                                unreachable!("categorical features never fit a float value")
                            }
                        }
                    }
                    let id = if missing {
                        buckets.divisor()
                    } else {
                        buckets.rem(hasher.finish())
                    };
                    col.ids.push(id);
                    Ok(())
                }),
                Op::Prefix {
                    feature,
                    length,
                    buckets,
                } => {
                    let (length, buckets) = (*length, *buckets);
                    let map = |v: &str| {
                        let end = v.char_indices().nth(length).map_or(v.len(), |(i, _)| i);
                        buckets.rem(hash_str(self.seed, &v[..end]))
                    };
                    each_row!(|r| {
                        match self.value(rows, r, *feature)? {
                            Value::Str(v) => col.ids.push(map(v)),
                            Value::StrList(l) if !l.is_empty() => {
                                self.check_row_len(s, l.len() as u64)?;
                                col.ids.extend((0..l.len()).map(|i| map(l.get(i))));
                            }
                            _ => col.ids.push(buckets.divisor()),
                        }
                        Ok(())
                    })
                }
                Op::Normalize {
                    feature,
                    mean,
                    std,
                    clip,
                    log1p,
                } => {
                    for r in 0..count {
                        let x = self.value(rows, r, *feature).map_err(|e| (r, e))?.as_f64();
                        col.dense.push(normalize(x, *mean, *std, *clip, *log1p));
                    }
                }
            }
        }
        Ok(())
    }

    /// Runs `f` over every row of `rows` a group at a time: at most [`LOOKUP_GROUP`] rows, whose
    /// feature `feature` is read into a [`Group`] (row `r0 + j` of the range `f` is given at
    /// `j`), each integer and string encoded for `H`. The hashes come after the whole group is
    /// encoded ([`Self::group_hash`]): a hash right after its encoding's byte-sized stores would
    /// wait for them to reach the cache (its 8-byte loads cannot take their data from the pending
    /// stores). When a row's value is refused, `f` runs over the rows before it first (an error
    /// of theirs comes first), then that row's error is returned.
    fn each_group<'r, R: Rows + ?Sized>(
        &self,
        rows: &'r R,
        feature: usize,
        mut f: impl FnMut(&Group<'r>, std::ops::Range<usize>) -> std::result::Result<(), (usize, Error)>,
    ) -> std::result::Result<(), (usize, Error)> {
        let count = rows.num_rows();
        let mut g = Group::default();
        let mut r0 = 0;
        while r0 < count {
            let r1 = count.min(r0 + LOOKUP_GROUP);
            let mut failed = None;
            for r in r0..r1 {
                match self.value(rows, r, feature) {
                    Ok(v) => {
                        let enc = &mut g.encoded[r - r0];
                        let len = match v {
                            Value::Int(x) => encode_int(x, enc),
                            Value::Str(x) => encode_str(x, enc).unwrap_or(0),
                            _ => 0,
                        };
                        g.values[r - r0] = (v, len);
                    }
                    Err(e) => {
                        failed = Some((r, e));
                        break;
                    }
                }
            }
            f(&g, r0..failed.as_ref().map_or(r1, |&(r, _)| r))?;
            if let Some(failed) = failed {
                return Err(failed);
            }
            r0 = r1;
        }
        Ok(())
    }

    /// `H` of row `j` of a group read by [`Self::each_group`], for an integer or a string.
    #[inline]
    fn group_hash(&self, g: &Group<'_>, j: usize) -> Option<u64> {
        match g.values[j] {
            (Value::Int(_) | Value::Str(_), len) if len > 0 => {
                Some(hash_encoded(self.seed, &g.encoded[j][..len]))
            }
            (Value::Str(x), _) => Some(hash_str(self.seed, x)),
            _ => None,
        }
    }

    /// `H` over the elements of `values` (scalars and lists), in order.
    fn hash_values(&self, values: &[Value<'_>]) -> u64 {
        let mut hasher = ValueHasher::new(self.seed);
        for v in values {
            match *v {
                Value::Int(v) => hasher.int(v),
                Value::Str(v) => hasher.str(v),
                Value::IntList(l) => (0..l.len()).for_each(|i| hasher.int(l.get(i))),
                Value::StrList(l) => (0..l.len()).for_each(|i| hasher.str(l.get(i))),
                Value::Missing | Value::F32(_) | Value::F64(_) => {}
            }
        }
        hasher.finish()
    }

    fn check_row_len(&self, slot: usize, count: u64) -> Result<()> {
        if count > self.max_ids_per_row {
            return Err(Error::RowTooLarge {
                slot: self.slots[slot].name.clone(),
                count,
                limit: self.max_ids_per_row,
            });
        }
        Ok(())
    }
}

/// Rows whose string vocabulary slots are asked for before any of them is looked up.
const LOOKUP_GROUP: usize = 16;

/// Bytes per row for a group's encoded values (strings of up to 27 bytes; a longer one is
/// hashed on its own): small, since a call zeroes a group's worth even for one row.
const ENCODED: usize = 32;

/// A group of rows read for hashing: each row's value and, for an integer or a string that
/// fits, the length of its encoding for `H` in `encoded` (0: not encoded).
struct Group<'r> {
    values: [(Value<'r>, usize); LOOKUP_GROUP],
    encoded: [[u8; ENCODED]; LOOKUP_GROUP],
}

impl Default for Group<'_> {
    fn default() -> Self {
        Group {
            values: [(Value::Missing, 0); LOOKUP_GROUP],
            encoded: [[0; ENCODED]; LOOKUP_GROUP],
        }
    }
}

/// `normalize`: computed in f64, rounded to f32 once at the end.
#[inline]
fn normalize(x: Option<f64>, mean: f64, std: f64, clip: Option<f64>, log1p: bool) -> f32 {
    let Some(mut x) = x.filter(|x| !x.is_nan()) else {
        return 0.0;
    };
    if log1p {
        x = x.ln_1p();
    }
    let mut y = (x - mean) / std;
    if let Some(c) = clip {
        y = y.clamp(-c, c);
    }
    if y.is_nan() {
        // log1p of a value below -1.
        return 0.0;
    }
    y as f32
}

/// Appends the mixed-radix index of every combination of the inputs' ids for `row`, the first
/// input varying slowest.
fn cross(done: &[Column], inputs: &[usize], strides: &[u64], row: usize, out: &mut Vec<u32>) {
    fn rec(
        done: &[Column],
        inputs: &[usize],
        strides: &[u64],
        row: usize,
        acc: u64,
        out: &mut Vec<u32>,
    ) {
        let Some((&first, rest)) = inputs.split_first() else {
            out.push(acc as u32);
            return;
        };
        for &id in done[first].row_ids(row) {
            rec(
                done,
                rest,
                &strides[1..],
                row,
                acc + u64::from(id) * strides[0],
                out,
            );
        }
    }
    rec(done, inputs, strides, row, 0, out);
}

/// A transform error in one row of a batch.
#[derive(Debug)]
pub struct RowsError {
    /// The row (0-based within the batch).
    pub row: usize,
    /// What went wrong.
    pub error: Error,
}

/// One slot's outputs over a batch of rows.
#[derive(Clone, Debug, Default)]
pub struct Column {
    /// All ids of an id slot, row after row.
    pub ids: Vec<u32>,
    /// `ids[offsets[r]..offsets[r + 1]]` are row `r`'s ids; starts with 0.
    pub offsets: Vec<u32>,
    /// One value per row for a dense slot.
    pub dense: Vec<f32>,
}

impl Column {
    /// The ids of row `r` (empty for dense slots).
    #[inline]
    pub fn row_ids(&self, r: usize) -> &[u32] {
        match (self.offsets.get(r), self.offsets.get(r + 1)) {
            (Some(&a), Some(&b)) => &self.ids[a as usize..b as usize],
            _ => &[],
        }
    }
}

/// Outputs of every slot over a batch of rows. Reuse one across requests: [`SlotBatch::clear`]
/// keeps the capacity.
#[derive(Clone, Debug, Default)]
pub struct SlotBatch {
    columns: Vec<Column>,
    rows: usize,
}

impl SlotBatch {
    /// An empty batch.
    pub fn new() -> Self {
        Self::default()
    }

    fn ensure_columns(&mut self, n: usize) {
        if self.columns.len() != n {
            self.columns = vec![Column::default(); n];
            self.rows = 0;
        }
        if self.rows == 0 {
            for c in &mut self.columns {
                if c.offsets.is_empty() {
                    c.offsets.push(0);
                }
            }
        }
    }

    /// Drops every row from `rows` on (keeps the first `rows`).
    pub fn truncate(&mut self, rows: usize) {
        if rows < self.rows {
            self.cut(rows);
        }
    }

    /// Cuts every column back to `rows` rows, including a partly written row `rows`.
    fn cut(&mut self, rows: usize) {
        for c in &mut self.columns {
            c.offsets.truncate(rows + 1);
            let end = c.offsets.get(rows).copied().unwrap_or(0) as usize;
            c.ids.truncate(end);
            c.dense.truncate(rows);
        }
        self.rows = rows;
    }

    /// Forgets all rows, keeping the allocations.
    pub fn clear(&mut self) {
        for c in &mut self.columns {
            c.ids.clear();
            c.offsets.clear();
            c.offsets.push(0);
            c.dense.clear();
        }
        self.rows = 0;
    }

    /// Number of rows transformed so far.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// The column of slot `slot`.
    pub fn column(&self, slot: usize) -> &Column {
        &self.columns[slot]
    }

    /// The ids slot `slot` produced for row `row`.
    pub fn ids(&self, slot: usize, row: usize) -> &[u32] {
        self.columns[slot].row_ids(row)
    }

    /// Every id of slot `slot`, row after row, to rewrite in place (a training worker maps them
    /// to the rows it pulled).
    pub fn ids_mut(&mut self, slot: usize) -> &mut [u32] {
        &mut self.columns[slot].ids
    }

    /// The dense value slot `slot` produced for row `row`.
    pub fn dense(&self, slot: usize, row: usize) -> f32 {
        self.columns[slot].dense[row]
    }
}
