//! Raw feature values as the hot path sees them: borrowed, never owned.
//!
//! A [`Value`] borrows from whatever holds the request (a FlatBuffers body, a parsed JSON line, a
//! CSV record), so mapping a value to ids allocates nothing. Lists are behind the small
//! [`IntList`] and [`StrList`] traits so that a FlatBuffers vector, a `Vec<String>` or a slice can
//! all be read in place.

use serde::{Deserialize, Serialize};

/// The declared type of a raw feature, part of a model's feature spec.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FeatureType {
    /// A number (f32 or f64 on the wire; integers are accepted and converted).
    Float,
    /// A 64-bit signed integer.
    Int,
    /// A UTF-8 string.
    String,
    /// A list of 64-bit signed integers.
    IntList,
    /// A list of UTF-8 strings.
    StringList,
}

impl FeatureType {
    /// The name used in configs, error messages and `rankd-tool inspect`.
    pub fn as_str(self) -> &'static str {
        match self {
            FeatureType::Float => "float",
            FeatureType::Int => "int",
            FeatureType::String => "string",
            FeatureType::IntList => "int_list",
            FeatureType::StringList => "string_list",
        }
    }

    /// True for the types whose values are numbers (`piecewise` and `normalize` inputs).
    pub fn is_numeric(self) -> bool {
        matches!(self, FeatureType::Float | FeatureType::Int)
    }

    /// True for the types that `pickcat` and `combinehash` accept.
    pub fn is_categorical(self) -> bool {
        !matches!(self, FeatureType::Float)
    }
}

impl std::fmt::Display for FeatureType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A list of integers read in place.
pub trait IntList {
    /// Number of elements.
    fn len(&self) -> usize;
    /// Element `i`; `i < len()`.
    fn get(&self, i: usize) -> i64;
    /// True when the list has no elements.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A list of strings read in place.
pub trait StrList {
    /// Number of elements.
    fn len(&self) -> usize;
    /// Element `i`; `i < len()`.
    fn get(&self, i: usize) -> &str;
    /// True when the list has no elements.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl IntList for [i64] {
    fn len(&self) -> usize {
        <[i64]>::len(self)
    }
    fn get(&self, i: usize) -> i64 {
        self[i]
    }
}

impl IntList for Vec<i64> {
    fn len(&self) -> usize {
        <[i64]>::len(self)
    }
    fn get(&self, i: usize) -> i64 {
        self[i]
    }
}

impl<S: AsRef<str>> StrList for [S] {
    fn len(&self) -> usize {
        <[S]>::len(self)
    }
    fn get(&self, i: usize) -> &str {
        self[i].as_ref()
    }
}

impl<S: AsRef<str>> StrList for Vec<S> {
    fn len(&self) -> usize {
        <[S]>::len(self)
    }
    fn get(&self, i: usize) -> &str {
        self[i].as_ref()
    }
}

/// One raw value, borrowed from the request that carries it.
#[derive(Clone, Copy, Default)]
pub enum Value<'a> {
    /// The feature is absent (or explicitly null).
    #[default]
    Missing,
    /// A 32-bit float.
    F32(f32),
    /// A 64-bit float.
    F64(f64),
    /// A 64-bit signed integer.
    Int(i64),
    /// A UTF-8 string.
    Str(&'a str),
    /// A list of integers.
    IntList(&'a dyn IntList),
    /// A list of strings.
    StrList(&'a dyn StrList),
}

impl std::fmt::Debug for Value<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Value::Missing => f.write_str("Missing"),
            Value::F32(v) => write!(f, "F32({v})"),
            Value::F64(v) => write!(f, "F64({v})"),
            Value::Int(v) => write!(f, "Int({v})"),
            Value::Str(v) => write!(f, "Str({v:?})"),
            Value::IntList(l) => {
                f.write_str("IntList")?;
                f.debug_list()
                    .entries((0..l.len()).map(|i| l.get(i)))
                    .finish()
            }
            Value::StrList(l) => {
                f.write_str("StrList")?;
                f.debug_list()
                    .entries((0..l.len()).map(|i| l.get(i)))
                    .finish()
            }
        }
    }
}

impl Value<'_> {
    /// The short name of the value's kind, for error messages.
    pub fn kind(&self) -> &'static str {
        match self {
            Value::Missing => "missing",
            Value::F32(_) => "f32",
            Value::F64(_) => "f64",
            Value::Int(_) => "int",
            Value::Str(_) => "string",
            Value::IntList(_) => "int_list",
            Value::StrList(_) => "string_list",
        }
    }

    /// Whether a value of this kind may stand for a feature declared as `ty`.
    ///
    /// Missing fits every type. A numeric feature takes any number (an integer is read as a
    /// float), but an integer feature does not take a float: that would silently truncate.
    pub fn fits(&self, ty: FeatureType) -> bool {
        matches!(
            (self, ty),
            (Value::Missing, _)
                | (
                    Value::F32(_) | Value::F64(_) | Value::Int(_),
                    FeatureType::Float
                )
                | (Value::Int(_), FeatureType::Int)
                | (Value::Str(_), FeatureType::String)
                | (Value::IntList(_), FeatureType::IntList)
                | (Value::StrList(_), FeatureType::StringList)
        )
    }

    /// The value as an `f64`, for numeric transforms. `None` for missing and non-numbers.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(f64::from(v)),
            Value::F64(v) => Some(v),
            Value::Int(v) => Some(v as f64),
            _ => None,
        }
    }
}

/// An owned raw value: what parsed text formats (JSON lines, CSV) hold so that [`Value`]s can
/// borrow from it.
#[derive(Clone, Debug, Default, PartialEq)]
pub enum OwnedValue {
    /// Absent.
    #[default]
    Missing,
    /// A number.
    Float(f64),
    /// An integer.
    Int(i64),
    /// A string.
    Str(String),
    /// A list of integers.
    IntList(Vec<i64>),
    /// A list of strings.
    StrList(Vec<String>),
}

impl OwnedValue {
    /// The borrowed value.
    pub fn value(&self) -> Value<'_> {
        match self {
            OwnedValue::Missing => Value::Missing,
            OwnedValue::Float(v) => Value::F64(*v),
            OwnedValue::Int(v) => Value::Int(*v),
            OwnedValue::Str(s) => Value::Str(s),
            OwnedValue::IntList(v) => Value::IntList(v),
            OwnedValue::StrList(v) => Value::StrList(v),
        }
    }
}

/// Random access to one row's raw values by feature index (the order of the spec's features).
///
/// Implemented by the serving layer over request bytes, by the trainer over parsed CSV records and
/// by tests over plain slices.
pub trait Row {
    /// The value of feature `feature` (an index into [`crate::FeatureSpec::features`]).
    fn value(&self, feature: usize) -> Value<'_>;
}

/// Many rows of raw values, for transforming a batch slot by slot
/// ([`crate::CompiledSpec::transform_rows_masked`]).
pub trait Rows {
    /// Number of rows.
    fn num_rows(&self) -> usize;
    /// The value of feature `feature` in row `row`.
    fn value(&self, row: usize, feature: usize) -> Value<'_>;
}

/// One [`Row`] seen as a batch of one.
pub(crate) struct OneRow<'a, R: ?Sized>(pub &'a R);

impl<R: Row + ?Sized> Rows for OneRow<'_, R> {
    #[inline]
    fn num_rows(&self) -> usize {
        1
    }

    #[inline]
    fn value(&self, _row: usize, feature: usize) -> Value<'_> {
        self.0.value(feature)
    }
}

impl Row for [Value<'_>] {
    fn value(&self, feature: usize) -> Value<'_> {
        self.get(feature).copied().unwrap_or(Value::Missing)
    }
}

impl Row for Vec<Value<'_>> {
    fn value(&self, feature: usize) -> Value<'_> {
        self.get(feature).copied().unwrap_or(Value::Missing)
    }
}
