//! The crate's error type: spec errors found at compile time and value errors found per row.

use crate::value::FeatureType;

/// Everything that can go wrong in `feature-ops`.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum Error {
    /// Two raw features share a name.
    #[error("feature spec: raw feature `{0}` is declared twice")]
    DuplicateFeature(String),
    /// Two slots share a name.
    #[error("feature spec: slot `{0}` is defined twice")]
    DuplicateSlot(String),
    /// A slot reads a raw feature that is not declared.
    #[error("feature spec: slot `{slot}` reads raw feature `{feature}`, which is not declared")]
    UnknownFeature {
        /// The slot.
        slot: String,
        /// The missing feature.
        feature: String,
    },
    /// A `descartes` slot names a slot that is not defined before it.
    #[error("feature spec: slot `{slot}` crosses slot `{input}`, which is not an id slot defined before it")]
    UnknownSlot {
        /// The slot.
        slot: String,
        /// The input it names.
        input: String,
    },
    /// A transform reads a feature of a type it cannot take.
    #[error("feature spec: slot `{slot}` ({transform}) cannot read `{feature}` of type {ty}")]
    InputType {
        /// The slot.
        slot: String,
        /// The transform's name.
        transform: &'static str,
        /// The feature.
        feature: String,
        /// Its declared type.
        ty: FeatureType,
    },
    /// Any other invalid parameter; the message says which and why.
    #[error("feature spec: slot `{slot}`: {reason}")]
    Parameter {
        /// The slot.
        slot: String,
        /// What is wrong.
        reason: String,
    },
    /// A slot's id count exceeds 2^31.
    #[error("feature spec: slot `{slot}` would have {num_ids} ids, more than the limit of 2^31")]
    TooManyIds {
        /// The slot.
        slot: String,
        /// Its id count.
        num_ids: u128,
    },
    /// A value does not match its feature's declared type.
    #[error("feature `{feature}` is declared {expected} but the value is {got}")]
    WrongType {
        /// The feature.
        feature: String,
        /// Its declared type.
        expected: FeatureType,
        /// The kind of value received.
        got: &'static str,
    },
    /// A multi-valued cross produced more ids for one row than allowed.
    #[error("slot `{slot}` produced {count} ids for one row, more than the limit of {limit}")]
    RowTooLarge {
        /// The slot.
        slot: String,
        /// Ids it would produce.
        count: u64,
        /// The limit ([`crate::CompiledSpec::max_ids_per_row`]).
        limit: u64,
    },
}

/// Shorthand.
pub type Result<T, E = Error> = std::result::Result<T, E>;
