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
        // An integer literal within i64 is an integer; every other number (a fraction, an
        // exponent, an integer literal beyond i64 either way) is a float: the nearest f64 to the
        // decimal text (serde_json's `float_roundtrip`). A float feature takes both; for an int
        // feature a number that is not an i64 is an error, never rounded or wrapped.
        Json::Number(n) => match (n.as_i64(), n.as_f64()) {
            (Some(i), _) => OwnedValue::Int(i),
            (None, Some(_)) if matches!(declared, FeatureType::Int | FeatureType::IntList) => {
                return Err(format!(
                    "feature `{name}`: {n} is not a 64-bit signed integer"
                ))
            }
            (None, f) => OwnedValue::Float(f.unwrap_or(f64::NAN)),
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

#[cfg(test)]
mod tests {
    use super::*;
    use rankd_feature_ops::{FeatureSpec, SlotBatch};

    fn spec(boundaries: &[f64]) -> CompiledSpec {
        let bounds: Vec<String> = boundaries.iter().map(|b| format!("{b:?}")).collect();
        let toml = format!(
            "[[features]]\nname = \"x\"\ntype = \"float\"\n[[features]]\nname = \"n\"\ntype = \"int\"\n\
             [[slots]]\nname = \"x_bucket\"\ntransform = \"piecewise\"\ninput = \"x\"\nboundaries = [{}]\n",
            bounds.join(", ")
        );
        let spec: FeatureSpec = toml::from_str(&toml).unwrap();
        CompiledSpec::compile(&spec).unwrap()
    }

    /// The float the JSON path read for item 0's `x`.
    fn read_x(spec: &CompiledSpec, text: &str) -> f64 {
        let r = JsonRequest::parse(spec, &format!(r#"{{"items": [{{"x": {text}}}]}}"#)).unwrap();
        match r.item_value(0, 0) {
            Value::F64(v) => v,
            Value::Int(i) => i as f64,
            other => panic!("{text}: read as {other:?}"),
        }
    }

    struct One<'a>(&'a JsonRequest);
    impl rankd_feature_ops::Row for One<'_> {
        fn value(&self, feature: usize) -> Value<'_> {
            self.0.item_value(0, feature)
        }
    }

    fn bucket(spec: &CompiledSpec, text: &str) -> u32 {
        let r = JsonRequest::parse(spec, &format!(r#"{{"items": [{{"x": {text}}}]}}"#)).unwrap();
        let mut batch = SlotBatch::new();
        spec.transform_row(&One(&r), &mut batch).unwrap();
        batch.ids(0, 0)[0]
    }

    #[test]
    fn floats_are_read_exactly_on_and_beside_boundaries() {
        let b = [-91.0, 3.1377761363983154];
        let s = spec(&b);
        for (i, &v) in b.iter().enumerate() {
            let below = f64::from_bits(if v > 0.0 {
                v.to_bits() - 1
            } else {
                v.to_bits() + 1
            });
            let above = f64::from_bits(if v > 0.0 {
                v.to_bits() + 1
            } else {
                v.to_bits() - 1
            });
            for (x, want) in [(below, i as u32), (v, i as u32 + 1), (above, i as u32 + 1)] {
                let text = format!("{x:?}");
                assert_eq!(read_x(&s, &text).to_bits(), x.to_bits(), "{text}");
                assert_eq!(bucket(&s, &text), want, "{text}");
            }
        }
        assert_eq!(bucket(&s, "-91.00000000000001"), 0);
        assert_eq!(bucket(&s, "3.1377761363983154"), 2);
    }

    #[test]
    fn random_doubles_round_trip() {
        let s = spec(&[]);
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut checked = 0;
        while checked < 20_000 {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let x = f64::from_bits(state ^ (state >> 29));
            if !x.is_finite() {
                continue;
            }
            // Shortest round-trip text, then the same in exponent form and with 17 digits.
            for text in [format!("{x:?}"), format!("{x:e}"), format!("{x:.16e}")] {
                assert_eq!(read_x(&s, &text).to_bits(), x.to_bits(), "{text}");
            }
            checked += 1;
        }
    }

    #[test]
    fn integers_beyond_i64() {
        let s = spec(&[]);
        // For a float feature every integer literal is a number, beyond i64 in either direction.
        for text in [
            "9223372036854775807",
            "9223372036854775808",
            "18446744073709551615",
            "18446744073709551616",
            "-9223372036854775808",
            "-9223372036854775809",
            "1e300",
        ] {
            let want: f64 = text.parse().unwrap();
            assert_eq!(read_x(&s, text), want, "{text}");
        }
        // For an int feature, anything that is not an i64 is refused, whichever side it is on.
        for text in [
            "9223372036854775808",
            "18446744073709551616",
            "-9223372036854775809",
            "1.5",
        ] {
            let line = format!(r#"{{"items": [{{"n": {text}}}]}}"#);
            let e = JsonRequest::parse(&s, &line).err();
            assert!(
                e.as_deref()
                    .is_some_and(|m| m.contains("not a 64-bit signed integer")),
                "{text}: {e:?}"
            );
        }
        let ok = JsonRequest::parse(&s, r#"{"items": [{"n": -9223372036854775808}]}"#).unwrap();
        assert!(matches!(ok.item_value(0, 1), Value::Int(i64::MIN)));
    }
}
