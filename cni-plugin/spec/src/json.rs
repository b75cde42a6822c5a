//! Typed reads of JSON objects whose errors name the offending key path,
//! e.g. "ips[0].address must be a string". Netconf and result parsing
//! share it with different error codes (7 and 6).

use serde_json::{Map, Value};

use super::error::CniError;

pub(super) struct Obj<'a> {
    map: &'a Map<String, Value>,
    path: String,
    code: u32,
}

impl<'a> Obj<'a> {
    /// `path` is where `v` sits ("" for the document itself).
    pub fn new(v: &'a Value, path: &str, code: u32) -> Result<Obj<'a>, CniError> {
        match v.as_object() {
            Some(map) => Ok(Obj {
                map,
                path: path.to_string(),
                code,
            }),
            None if path.is_empty() => Err(CniError::new(code, "expected a JSON object", "")),
            None => Err(CniError::new(code, format!("{path} must be an object"), "")),
        }
    }

    pub fn path(&self, key: &str) -> String {
        if self.path.is_empty() {
            key.to_string()
        } else {
            format!("{}.{key}", self.path)
        }
    }

    pub fn err(&self, key: &str, problem: &str) -> CniError {
        CniError::new(self.code, format!("{} {problem}", self.path(key)), "")
    }

    /// JSON null counts as absent, as it does for Go's encoding/json.
    pub fn get(&self, key: &str) -> Option<&'a Value> {
        self.map.get(key).filter(|v| !v.is_null())
    }

    /// An empty string counts as absent: the reference types omit empty strings.
    pub fn opt_str(&self, key: &str) -> Result<Option<&'a str>, CniError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.as_str()).filter(|s| !s.is_empty())),
            Some(_) => Err(self.err(key, "must be a string")),
        }
    }

    pub fn req_str(&self, key: &str) -> Result<&'a str, CniError> {
        match self.get(key) {
            None => Err(self.err(key, "is missing")),
            Some(Value::String(s)) if s.is_empty() => Err(self.err(key, "must not be empty")),
            Some(Value::String(s)) => Ok(s),
            Some(_) => Err(self.err(key, "must be a string")),
        }
    }

    pub fn opt_u32(&self, key: &str) -> Result<Option<u32>, CniError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .map(Some)
                .ok_or_else(|| self.err(key, "must be a non-negative 32-bit integer")),
        }
    }

    /// Absent is an empty list.
    pub fn list(&self, key: &str) -> Result<&'a [Value], CniError> {
        match self.get(key) {
            None => Ok(&[]),
            Some(Value::Array(a)) => Ok(a),
            Some(_) => Err(self.err(key, "must be a list")),
        }
    }

    pub fn str_list(&self, key: &str) -> Result<Vec<String>, CniError> {
        self.list(key)?
            .iter()
            .map(|v| v.as_str().map(str::to_string))
            .collect::<Option<_>>()
            .ok_or_else(|| self.err(key, "must be a list of strings"))
    }

    pub fn child(&self, key: &str) -> Result<Option<Obj<'a>>, CniError> {
        self.get(key)
            .map(|v| Obj::new(v, &self.path(key), self.code))
            .transpose()
    }

    /// The objects of list `key`, each knowing its "key[i]" path.
    pub fn items(&self, key: &str) -> Result<Vec<Obj<'a>>, CniError> {
        self.list(key)?
            .iter()
            .enumerate()
            .map(|(i, v)| Obj::new(v, &format!("{}[{i}]", self.path(key)), self.code))
            .collect()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn errors_name_the_path() {
        let v = json!({"a": {"b": [{"c": 1}]}, "n": -1, "s": "", "l": [1]});
        let top = Obj::new(&v, "", 6).unwrap();
        let a = top.child("a").unwrap().unwrap();
        let items = a.items("b").unwrap();
        let err = items[0].req_str("c").unwrap_err();
        assert_eq!(
            (err.code, err.msg.as_str()),
            (6, "a.b[0].c must be a string")
        );
        assert_eq!(top.req_str("zz").unwrap_err().msg, "zz is missing");
        assert_eq!(top.req_str("s").unwrap_err().msg, "s must not be empty");
        assert_eq!(top.opt_str("s").unwrap(), None);
        assert!(top.opt_u32("n").is_err());
        assert!(top.str_list("l").is_err());
        assert_eq!(
            Obj::new(&json!([1]), "", 7).err().map(|e| (e.code, e.msg)),
            Some((7, "expected a JSON object".to_string()))
        );
        assert_eq!(
            top.child("n").err().map(|e| e.msg),
            Some("n must be an object".to_string())
        );
    }

    #[test]
    fn null_is_absent() {
        let v = json!({"x": null});
        let o = Obj::new(&v, "", 7).unwrap();
        assert_eq!(o.opt_str("x").unwrap(), None);
        assert_eq!(o.opt_u32("x").unwrap(), None);
        assert!(o.list("x").unwrap().is_empty());
        assert!(o.child("x").unwrap().is_none());
    }
}
