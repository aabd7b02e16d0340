//! Raw features to model inputs: the one definition shared by `rankd-train` and `rankd`.
//!
//! A [`FeatureSpec`] names the raw features (with declared [`FeatureType`]s) and the transforms
//! that turn them into *slots*: lists of ids for embedding tables and wide weights, or dense
//! values. [`CompiledSpec`] checks a spec and runs it over [`Row`]s of borrowed [`Value`]s,
//! writing into a reusable [`SlotBatch`]. The exact rules, precise enough to reimplement in
//! another language, are in `docs/feature-ops.md`; [`hash`] holds the hash `H` they rely on.
//!
//! This crate depends on nothing else of rankd.
// Unsafe code only in `prefetch` (a cache hint, which reads nothing into the program).
#![deny(unsafe_code)]

mod compile;
mod error;
pub mod hash;
mod prefetch;
mod spec;
mod value;
mod vocab;

pub use compile::{
    Column, CompiledSpec, RowsError, SlotBatch, SlotInfo, SlotKind, DEFAULT_MAX_IDS_PER_ROW,
    MAX_NUM_IDS,
};
pub use error::{Error, Result};
pub use spec::{FeatureSpec, RawFeature, SlotSpec, Transform, Vocabulary};
pub use value::{FeatureType, IntList, OwnedValue, Row, Rows, StrList, Value};
pub use vocab::{IntVocab, StrVocab};
