//! Typed access to the fields of a JSON request body, with errors that name the field.
//!
//! Request bodies are parsed into a `serde_json::Value` first and read field by
//! field rather than deserialized into structs: serde's derived errors describe
//! positions ("invalid type at line 1 column 40"), while API clients need the
//! parameter name and the accepted range. `null` counts as absent everywhere,
//! as the OpenAI API treats it. Unknown fields are ignored (clients send many).

use serde_json::{Map, Value};

use crate::error::ApiError;

/// A JSON object plus the path it was found at (for error messages).
pub struct Fields<'a> {
    map: &'a Map<String, Value>,
    path: String,
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

impl<'a> Fields<'a> {
    /// The top-level body: must be an object.
    pub fn root(v: &'a Value) -> Result<Self, ApiError> {
        match v {
            Value::Object(map) => Ok(Fields {
                map,
                path: String::new(),
            }),
            other => Err(ApiError::bad_request(
                "invalid_body",
                format!(
                    "the request body must be a JSON object, not {}",
                    type_name(other)
                ),
            )),
        }
    }

    /// A nested object at `path` (used for array elements, `messages[0]`).
    pub fn object(v: &'a Value, path: String) -> Result<Self, ApiError> {
        match v {
            Value::Object(map) => Ok(Fields { map, path }),
            other => Err(ApiError::invalid(
                path.clone(),
                format!("must be an object, not {}", type_name(other)),
            )),
        }
    }

    /// Full path of field `k`.
    pub fn path(&self, k: &str) -> String {
        if self.path.is_empty() {
            k.to_string()
        } else {
            format!("{}.{k}", self.path)
        }
    }

    /// The raw value of `k`; `None` when missing or null.
    pub fn get(&self, k: &str) -> Option<&'a Value> {
        self.map.get(k).filter(|v| !v.is_null())
    }

    fn wrong(&self, k: &str, want: &str, v: &Value) -> ApiError {
        ApiError::invalid(
            self.path(k),
            format!("must be {want}, not {}", type_name(v)),
        )
    }

    pub fn require<T>(&self, k: &str, v: Option<T>) -> Result<T, ApiError> {
        v.ok_or_else(|| ApiError::invalid(self.path(k), "is required"))
    }

    pub fn str(&self, k: &str) -> Result<Option<&'a str>, ApiError> {
        match self.get(k) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(v) => Err(self.wrong(k, "a string", v)),
        }
    }

    pub fn bool(&self, k: &str) -> Result<Option<bool>, ApiError> {
        match self.get(k) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(v) => Err(self.wrong(k, "a boolean", v)),
        }
    }

    pub fn array(&self, k: &str) -> Result<Option<&'a Vec<Value>>, ApiError> {
        match self.get(k) {
            None => Ok(None),
            Some(Value::Array(a)) => Ok(Some(a)),
            Some(v) => Err(self.wrong(k, "an array", v)),
        }
    }

    /// A number in `[lo, hi]`.
    pub fn number(&self, k: &str, lo: f64, hi: f64) -> Result<Option<f32>, ApiError> {
        match self.get(k) {
            None => Ok(None),
            Some(Value::Number(n)) => {
                let x = n.as_f64().unwrap_or(f64::NAN);
                if !(lo..=hi).contains(&x) {
                    return Err(ApiError::invalid(
                        self.path(k),
                        format!("{x} is outside [{lo}, {hi}]"),
                    ));
                }
                Ok(Some(x as f32))
            }
            Some(v) => Err(self.wrong(k, "a number", v)),
        }
    }

    /// An integer in `[lo, hi]` (a float with no fractional part is accepted, as
    /// JavaScript clients may send `16.0`).
    pub fn int(&self, k: &str, lo: i64, hi: i64) -> Result<Option<i64>, ApiError> {
        match self.get(k) {
            None => Ok(None),
            Some(Value::Number(n)) => {
                let x = if let Some(i) = n.as_i64() {
                    i
                } else if let Some(f) = n.as_f64().filter(|f| f.fract() == 0.0 && f.abs() < 9e15) {
                    f as i64
                } else {
                    return Err(ApiError::invalid(
                        self.path(k),
                        format!("{n} is not an integer in [{lo}, {hi}]"),
                    ));
                };
                if !(lo..=hi).contains(&x) {
                    return Err(ApiError::invalid(
                        self.path(k),
                        format!("{x} is outside [{lo}, {hi}]"),
                    ));
                }
                Ok(Some(x))
            }
            Some(v) => Err(self.wrong(k, "an integer", v)),
        }
    }

    /// Any integer as a sampling seed (negative seeds wrap, as some clients send them).
    pub fn seed(&self, k: &str) -> Result<Option<u64>, ApiError> {
        match self.get(k) {
            None => Ok(None),
            Some(Value::Number(n)) => match (n.as_u64(), n.as_i64()) {
                (Some(u), _) => Ok(Some(u)),
                (None, Some(i)) => Ok(Some(i as u64)),
                _ => Err(ApiError::invalid(
                    self.path(k),
                    format!("{n} is not an integer"),
                )),
            },
            Some(v) => Err(self.wrong(k, "an integer", v)),
        }
    }

    /// A string or an array of strings (OpenAI `stop`), each non-empty, at most `max`.
    pub fn strings(&self, k: &str, max: usize) -> Result<Vec<String>, ApiError> {
        let list: Vec<&Value> = match self.get(k) {
            None => return Ok(Vec::new()),
            Some(Value::String(s)) => {
                if s.is_empty() {
                    return Err(ApiError::invalid(self.path(k), "must not be empty"));
                }
                return Ok(vec![s.clone()]);
            }
            Some(Value::Array(a)) => a.iter().collect(),
            Some(v) => return Err(self.wrong(k, "a string or an array of strings", v)),
        };
        if list.len() > max {
            return Err(ApiError::invalid(
                self.path(k),
                format!("at most {max} entries are allowed, got {}", list.len()),
            ));
        }
        list.iter()
            .enumerate()
            .map(|(i, v)| match v {
                Value::String(s) if !s.is_empty() => Ok(s.clone()),
                Value::String(_) => Err(ApiError::invalid(
                    format!("{}[{i}]", self.path(k)),
                    "must not be empty",
                )),
                other => Err(ApiError::invalid(
                    format!("{}[{i}]", self.path(k)),
                    format!("must be a string, not {}", type_name(other)),
                )),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn types_and_ranges_name_the_field() {
        let v = json!({"t": "hot", "n": 3.5, "i": -2, "s": ["a", ""], "z": null});
        let f = Fields::root(&v).unwrap();
        assert_eq!(
            f.number("t", 0.0, 2.0).unwrap_err().param.as_deref(),
            Some("t")
        );
        assert!(f.number("n", 0.0, 2.0).is_err());
        assert_eq!(f.int("n", 0, 10).unwrap_err().param.as_deref(), Some("n"));
        assert!(f.int("i", 0, 10).is_err());
        assert_eq!(f.int("i", -5, 10).unwrap(), Some(-2));
        assert_eq!(
            f.strings("s", 4).unwrap_err().param.as_deref(),
            Some("s[1]")
        );
        assert_eq!(f.str("z").unwrap(), None);
        assert_eq!(
            f.require("z", f.str("z").unwrap())
                .unwrap_err()
                .param
                .as_deref(),
            Some("z")
        );
        assert!(Fields::root(&json!([1])).is_err());
        let inner = json!({"role": 1});
        let g = Fields::object(&inner, "messages[3]".into()).unwrap();
        assert_eq!(
            g.str("role").unwrap_err().param.as_deref(),
            Some("messages[3].role")
        );
    }

    #[test]
    fn integral_floats_are_integers() {
        let v = json!({"a": 16.0, "b": 1e300});
        let f = Fields::root(&v).unwrap();
        assert_eq!(f.int("a", 0, 100).unwrap(), Some(16));
        assert!(f.int("b", 0, i64::MAX).is_err());
    }
}
