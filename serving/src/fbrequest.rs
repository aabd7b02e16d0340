//! A verified `ScoreRequest` FlatBuffer seen as an engine [`Request`]: feature names are
//! resolved to model feature indices once per request, values are read in place from the
//! request bytes.

use rankd_feature_ops::{CompiledSpec, IntList, StrList, Value};

use crate::engine::{FeatureSet, Request};
use crate::gen::rankd::rpc as fb;

/// A list of integers inside a FlatBuffers vector.
#[derive(Clone, Copy)]
struct FbInts<'a> {
    v: flatbuffers::Vector<'a, i64>,
    start: usize,
    end: usize,
}

impl IntList for FbInts<'_> {
    fn len(&self) -> usize {
        self.end - self.start
    }
    fn get(&self, i: usize) -> i64 {
        self.v.get(self.start + i)
    }
}

/// A list of strings inside a FlatBuffers vector.
#[derive(Clone, Copy)]
struct FbStrs<'a> {
    v: flatbuffers::Vector<'a, flatbuffers::ForwardsUOffset<&'a str>>,
    start: usize,
    end: usize,
}

impl StrList for FbStrs<'_> {
    fn len(&self) -> usize {
        self.end - self.start
    }
    fn get(&self, i: usize) -> &str {
        self.v.get(self.start + i)
    }
}

enum Slot<'a> {
    None,
    Scalar(Value<'a>),
    Ints(FbInts<'a>),
    Strs(FbStrs<'a>),
}

enum Column<'a> {
    F64(flatbuffers::Vector<'a, f64>),
    I64(flatbuffers::Vector<'a, i64>),
    Str(flatbuffers::Vector<'a, flatbuffers::ForwardsUOffset<&'a str>>),
    /// One view per item.
    Ints(Vec<FbInts<'a>>),
    Strs(Vec<FbStrs<'a>>),
}

struct ItemCol<'a> {
    missing: Option<flatbuffers::Vector<'a, u8>>,
    values: Column<'a>,
}

/// Why a request body cannot be scored (before the engine sees it).
#[derive(Debug, PartialEq, Eq)]
pub struct DecodeError(pub String);

/// The request view.
pub struct FbRequest<'a> {
    user: Vec<Slot<'a>>,
    items: Vec<Option<ItemCol<'a>>>,
    num_items: usize,
}

impl std::fmt::Debug for FbRequest<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FbRequest")
            .field("num_items", &self.num_items)
            .finish_non_exhaustive()
    }
}

fn bad(msg: String) -> DecodeError {
    DecodeError(msg)
}

fn list_views<'a, T, V: Copy>(
    name: &str,
    n: usize,
    offsets: Option<flatbuffers::Vector<'a, u32>>,
    values_len: usize,
    make: impl Fn(usize, usize) -> V,
) -> Result<Vec<V>, DecodeError> {
    let _ = std::marker::PhantomData::<T>;
    let offsets = offsets.ok_or_else(|| {
        bad(format!(
            "item column `{name}`: a list column needs `offsets`"
        ))
    })?;
    if offsets.len() != n + 1 {
        return Err(bad(format!(
            "item column `{name}`: {} offsets for {n} items (need {})",
            offsets.len(),
            n + 1
        )));
    }
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let (a, b) = (offsets.get(i) as usize, offsets.get(i + 1) as usize);
        if a > b || b > values_len {
            return Err(bad(format!(
                "item column `{name}`: offsets {a}..{b} of item {i} are out of order or past the {values_len} values"
            )));
        }
        out.push(make(a, b));
    }
    Ok(out)
}

impl<'a> FbRequest<'a> {
    /// Resolves `req`'s features against `spec`. Unknown names are ignored; a name given twice
    /// or a column whose shape does not match `num_items` is an error.
    pub fn new(
        spec: &CompiledSpec,
        req: fb::ScoreRequest<'a>,
    ) -> Result<FbRequest<'a>, DecodeError> {
        let n_features = spec.features().len();
        let n = req.num_items() as usize;
        let mut user: Vec<Slot<'a>> = (0..n_features).map(|_| Slot::None).collect();
        for f in req.user().iter().flatten() {
            let name = f.name();
            let Some(idx) = spec.feature_index(name) else {
                continue;
            };
            if !matches!(user[idx], Slot::None) {
                return Err(bad(format!("feature `{name}` is given twice")));
            }
            let missing = || bad(format!("feature `{name}`: the field of its kind is absent"));
            user[idx] = match f.kind() {
                fb::Kind::Missing => Slot::None,
                fb::Kind::F64 => Slot::Scalar(Value::F64(f.f64_())),
                fb::Kind::I64 => Slot::Scalar(Value::Int(f.i64_())),
                fb::Kind::Str => Slot::Scalar(Value::Str(f.str().ok_or_else(missing)?)),
                fb::Kind::I64List => {
                    let v = f.i64s().ok_or_else(missing)?;
                    Slot::Ints(FbInts {
                        v,
                        start: 0,
                        end: v.len(),
                    })
                }
                fb::Kind::StrList => {
                    let v = f.strs().ok_or_else(missing)?;
                    Slot::Strs(FbStrs {
                        v,
                        start: 0,
                        end: v.len(),
                    })
                }
                other => return Err(bad(format!("feature `{name}`: unknown kind {}", other.0))),
            };
        }
        let mut items: Vec<Option<ItemCol<'a>>> = (0..n_features).map(|_| None).collect();
        for c in req.items().iter().flatten() {
            let name = c.name();
            let Some(idx) = spec.feature_index(name) else {
                continue;
            };
            if items[idx].is_some() {
                return Err(bad(format!("item column `{name}` is given twice")));
            }
            let absent = || {
                bad(format!(
                    "item column `{name}`: the vector of its kind is absent"
                ))
            };
            let scalar_len = |len: usize| {
                if len == n {
                    Ok(())
                } else {
                    Err(bad(format!(
                        "item column `{name}` has {len} values for {n} items"
                    )))
                }
            };
            let values = match c.kind() {
                fb::Kind::Missing => continue,
                fb::Kind::F64 => {
                    let v = c.f64s().ok_or_else(absent)?;
                    scalar_len(v.len())?;
                    Column::F64(v)
                }
                fb::Kind::I64 => {
                    let v = c.i64s().ok_or_else(absent)?;
                    scalar_len(v.len())?;
                    Column::I64(v)
                }
                fb::Kind::Str => {
                    let v = c.strs().ok_or_else(absent)?;
                    scalar_len(v.len())?;
                    Column::Str(v)
                }
                fb::Kind::I64List => {
                    let v = c.i64s().ok_or_else(absent)?;
                    Column::Ints(list_views::<i64, _>(
                        name,
                        n,
                        c.offsets(),
                        v.len(),
                        |start, end| FbInts { v, start, end },
                    )?)
                }
                fb::Kind::StrList => {
                    let v = c.strs().ok_or_else(absent)?;
                    Column::Strs(list_views::<&str, _>(
                        name,
                        n,
                        c.offsets(),
                        v.len(),
                        |start, end| FbStrs { v, start, end },
                    )?)
                }
                other => {
                    return Err(bad(format!(
                        "item column `{name}`: unknown kind {}",
                        other.0
                    )))
                }
            };
            let missing = c.missing();
            if let Some(m) = missing {
                if m.len() != n.div_ceil(8) {
                    return Err(bad(format!(
                        "item column `{name}`: the missing bitmap has {} bytes for {n} items \
                         (exactly {} expected)",
                        m.len(),
                        n.div_ceil(8)
                    )));
                }
            }
            items[idx] = Some(ItemCol { missing, values });
        }
        Ok(FbRequest {
            user,
            items,
            num_items: n,
        })
    }
}

impl Request for FbRequest<'_> {
    fn user_value(&self, feature: usize) -> Value<'_> {
        match &self.user[feature] {
            Slot::None => Value::Missing,
            Slot::Scalar(v) => *v,
            Slot::Ints(l) => Value::IntList(l),
            Slot::Strs(l) => Value::StrList(l),
        }
    }

    fn num_items(&self) -> usize {
        self.num_items
    }

    #[inline]
    fn item_value(&self, item: usize, feature: usize) -> Value<'_> {
        let Some(col) = &self.items[feature] else {
            return Value::Missing;
        };
        if let Some(m) = col.missing {
            if m.get(item / 8) & (1 << (item % 8)) != 0 {
                return Value::Missing;
            }
        }
        match &col.values {
            Column::F64(v) => Value::F64(v.get(item)),
            Column::I64(v) => Value::Int(v.get(item)),
            Column::Str(v) => Value::Str(v.get(item)),
            Column::Ints(l) => Value::IntList(&l[item]),
            Column::Strs(l) => Value::StrList(&l[item]),
        }
    }

    fn item_features(&self, set: &mut FeatureSet) {
        for (f, c) in self.items.iter().enumerate() {
            if c.is_some() {
                set.insert(f);
            }
        }
    }
}

/// The FlatBuffers verifier limits for request bodies.
pub fn verifier_options() -> flatbuffers::VerifierOptions {
    flatbuffers::VerifierOptions {
        max_depth: 64,
        max_tables: 10_000_000,
        max_apparent_size: 1 << 31,
        ignore_missing_null_terminator: false,
    }
}
