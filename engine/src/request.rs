//! What the engines read a request through: request-level (user) values and per-item values,
//! by model feature index. Adapters over FlatBuffers bodies and JSON lines resolve feature names
//! to indices once per request.

use rankd_feature_ops::{Row, Rows, Value};

/// One scoring request: one user, many items.
pub trait Request {
    /// Request-level value of model feature `feature`.
    fn user_value(&self, feature: usize) -> Value<'_>;
    /// Number of items.
    fn num_items(&self) -> usize;
    /// Value of model feature `feature` on item `item` (missing if the item does not carry it).
    fn item_value(&self, item: usize, feature: usize) -> Value<'_>;
    /// Adds to `set` every model feature that at least one item carries.
    fn item_features(&self, set: &mut FeatureSet);
    /// The value item `item` sees for `feature`: its own, else the request-level one. Through a
    /// `dyn Request` this is one virtual call instead of two on the engines' hottest path (the
    /// default body calls the implementor's methods directly).
    #[inline]
    fn resolved_value(&self, item: usize, feature: usize) -> Value<'_> {
        match self.item_value(item, feature) {
            Value::Missing => self.user_value(feature),
            v => v,
        }
    }
}

/// A set of feature indices (a bitset); the key of the engines' plan caches.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct FeatureSet {
    words: Vec<u64>,
}

impl FeatureSet {
    /// An empty set sized for `n` features.
    pub fn with_capacity(n: usize) -> Self {
        FeatureSet {
            words: vec![0; n.div_ceil(64)],
        }
    }

    /// Empties the set and sizes it for `n` features, keeping the allocation.
    pub fn reset(&mut self, n: usize) {
        self.words.clear();
        self.words.resize(n.div_ceil(64), 0);
    }

    /// Adds feature `i`.
    #[inline]
    pub fn insert(&mut self, i: usize) {
        let w = i / 64;
        if w >= self.words.len() {
            self.words.resize(w + 1, 0);
        }
        self.words[w] |= 1 << (i % 64);
    }

    /// Whether feature `i` is in the set.
    #[inline]
    pub fn contains(&self, i: usize) -> bool {
        self.words
            .get(i / 64)
            .is_some_and(|w| w & (1 << (i % 64)) != 0)
    }

    /// Adds features `0..n`.
    pub fn insert_all(&mut self, n: usize) {
        for i in 0..n {
            self.insert(i);
        }
    }
}

/// The row of item `item`: its own value where it has one, else the request-level value.
#[allow(missing_debug_implementations)] // holds only a `dyn Request`
#[derive(Clone, Copy)]
pub struct ItemRow<'a> {
    /// The request.
    pub request: &'a dyn Request,
    /// The item.
    pub item: usize,
}

impl Row for ItemRow<'_> {
    #[inline]
    fn value(&self, feature: usize) -> Value<'_> {
        self.request.resolved_value(self.item, feature)
    }
}

/// All items of a request as a batch: each item's own value where it has one, else the
/// request-level value.
#[allow(missing_debug_implementations)] // holds only a `dyn Request`
#[derive(Clone, Copy)]
pub struct ItemRows<'a>(pub &'a dyn Request);

impl Rows for ItemRows<'_> {
    #[inline]
    fn num_rows(&self) -> usize {
        self.0.num_items()
    }

    #[inline]
    fn value(&self, item: usize, feature: usize) -> Value<'_> {
        self.0.resolved_value(item, feature)
    }
}

/// The request-level row.
#[allow(missing_debug_implementations)] // holds only a `dyn Request`
#[derive(Clone, Copy)]
pub struct UserRow<'a>(pub &'a dyn Request);

impl Row for UserRow<'_> {
    #[inline]
    fn value(&self, feature: usize) -> Value<'_> {
        self.0.user_value(feature)
    }
}

/// A request held as plain vectors indexed by model feature: for tests, benchmarks and callers
/// that already have values in model order.
#[derive(Debug, Default, Clone)]
pub struct DenseRequest<'a> {
    /// Request-level values, by model feature index.
    pub user: Vec<Value<'a>>,
    /// Per item, values by model feature index.
    pub items: Vec<Vec<Value<'a>>>,
}

/// The synthetic feed model's requests (tests and benchmarks), with each value borrowed.
impl<'a> From<&'a rankd_formats::synth::feed::Values> for DenseRequest<'a> {
    fn from(v: &'a rankd_formats::synth::feed::Values) -> Self {
        use rankd_formats::synth::feed::Cell;
        DenseRequest {
            user: v.user.iter().map(Cell::value).collect(),
            items: v
                .items
                .iter()
                .map(|i| i.iter().map(Cell::value).collect())
                .collect(),
        }
    }
}

impl Request for DenseRequest<'_> {
    fn user_value(&self, feature: usize) -> Value<'_> {
        self.user.get(feature).copied().unwrap_or_default()
    }

    fn num_items(&self) -> usize {
        self.items.len()
    }

    fn item_value(&self, item: usize, feature: usize) -> Value<'_> {
        self.items[item].get(feature).copied().unwrap_or_default()
    }

    fn item_features(&self, set: &mut FeatureSet) {
        // Feature by feature, stopping at the first item that carries it: a feature every item
        // carries costs one look, and only the request-level ones are looked up on every item
        // (a third of the reads of the item-by-item scan on the feed model).
        let width = self.items.iter().map(Vec::len).max().unwrap_or(0);
        for f in 0..width {
            if self
                .items
                .iter()
                .any(|item| !matches!(item.get(f), None | Some(Value::Missing)))
            {
                set.insert(f);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dense_request_item_features_are_those_some_item_carries() {
        // Ragged items: feature 1 only on the last item, feature 3 only past the first item's
        // end, feature 2 nowhere, feature 0 on every item.
        let req = DenseRequest {
            user: vec![Value::Int(1); 5],
            items: vec![
                vec![Value::Int(0), Value::Missing],
                vec![
                    Value::Int(0),
                    Value::Missing,
                    Value::Missing,
                    Value::F64(1.0),
                ],
                vec![Value::Int(0), Value::Str("x")],
            ],
        };
        let mut set = FeatureSet::default();
        req.item_features(&mut set);
        let got: Vec<usize> = (0..6).filter(|&f| set.contains(f)).collect();
        assert_eq!(got, [0, 1, 3]);
        let mut none = FeatureSet::default();
        DenseRequest::default().item_features(&mut none);
        assert!((0..6).all(|f| !none.contains(f)));
    }
}
