//! Requests as JSON lines, the format of `rankd-tool score` and of `rankd-load` replay files:
//! `{"user": {...}, "items": [{...}, ...]}`, each value a number, a string, an array of integers
//! or of strings, or null/absent for missing. Names the model does not know are ignored.

use rankd_feature_ops::{CompiledSpec, FeatureType, OwnedValue, Value};
use serde_json::Value as Json;

use super::{FeatureSet, Request};

/// JSON to an owned value, guided by the declared type for empty lists.
fn from_json(v: Json, name: &str, declared: FeatureType) -> Result<OwnedValue, String> {
    Ok(match v {
        Json::Null => OwnedValue::Missing,
        Json::Number(n) => match (n.as_i64(), n.as_f64()) {
            (Some(i), _) => OwnedValue::Int(i),
            (None, Some(f)) if n.is_f64() => OwnedValue::Float(f),
            _ => {
                return Err(format!(
                    "feature `{name}`: integer {n} is out of the i64 range"
                ))
            }
        },
        Json::String(s) => OwnedValue::Str(s),
        Json::Array(a) if a.is_empty() => match declared {
            FeatureType::StringList => OwnedValue::StrList(Vec::new()),
            _ => OwnedValue::IntList(Vec::new()),
        },
        Json::Array(a) => {
            if a.iter().all(|x| x.as_i64().is_some()) {
                OwnedValue::IntList(a.iter().filter_map(Json::as_i64).collect())
            } else if a.iter().all(Json::is_string) {
                OwnedValue::StrList(
                    a.into_iter()
                        .filter_map(|x| match x {
                            Json::String(s) => Some(s),
                            _ => None,
                        })
                        .collect(),
                )
            } else {
                return Err(format!(
                    "feature `{name}`: a list must hold only integers or only strings"
                ));
            }
        }
        Json::Bool(_) => return Err(format!("feature `{name}`: booleans are not a feature type")),
        Json::Object(_) => return Err(format!("feature `{name}`: objects are not a feature type")),
    })
}

/// One parsed JSON request, values stored by model feature index.
#[derive(Debug, Clone)]
pub struct JsonRequest {
    user: Vec<OwnedValue>,
    items: Vec<Vec<OwnedValue>>,
}

fn features_of(
    spec: &CompiledSpec,
    obj: serde_json::Map<String, Json>,
    into: &mut [OwnedValue],
) -> Result<(), String> {
    for (name, v) in obj {
        if let Some(f) = spec.feature_index(&name) {
            into[f] = from_json(v, &name, spec.features()[f].ty)?;
        }
    }
    Ok(())
}

impl JsonRequest {
    /// Parses one line against a model's feature spec.
    pub fn parse(spec: &CompiledSpec, line: &str) -> Result<JsonRequest, String> {
        let v: Json = serde_json::from_str(line).map_err(|e| format!("invalid JSON: {e}"))?;
        let Json::Object(mut obj) = v else {
            return Err("a request must be a JSON object".into());
        };
        let n = spec.features().len();
        let mut user = vec![OwnedValue::Missing; n];
        match obj.remove("user") {
            None | Some(Json::Null) => {}
            Some(Json::Object(u)) => features_of(spec, u, &mut user)?,
            Some(_) => return Err("`user` must be an object".into()),
        }
        let items = match obj.remove("items") {
            Some(Json::Array(items)) => items,
            Some(_) => return Err("`items` must be an array".into()),
            None => return Err("the request has no `items`".into()),
        };
        let mut out = Vec::with_capacity(items.len());
        for (i, item) in items.into_iter().enumerate() {
            let Json::Object(fields) = item else {
                return Err(format!("item {i} is not an object"));
            };
            let mut cells = vec![OwnedValue::Missing; n];
            features_of(spec, fields, &mut cells).map_err(|e| format!("item {i}: {e}"))?;
            out.push(cells);
        }
        Ok(JsonRequest { user, items: out })
    }
}

impl Request for JsonRequest {
    fn user_value(&self, feature: usize) -> Value<'_> {
        self.user[feature].value()
    }

    fn num_items(&self) -> usize {
        self.items.len()
    }

    fn item_value(&self, item: usize, feature: usize) -> Value<'_> {
        self.items[item][feature].value()
    }

    fn item_features(&self, set: &mut FeatureSet) {
        for item in &self.items {
            for (f, c) in item.iter().enumerate() {
                if !matches!(c, OwnedValue::Missing) {
                    set.insert(f);
                }
            }
        }
    }
}
