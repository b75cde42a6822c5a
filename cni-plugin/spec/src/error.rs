//! The CNI error result: a well-known code, a short message and optional
//! details, printed on stdout when the plugin fails.

use std::fmt;

use serde_json::{Value, json};

use super::version::LATEST_VERSION;

/// An error as the CNI spec reports it to the runtime.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CniError {
    pub code: u32,
    pub msg: String,
    pub details: String,
}

impl CniError {
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    pub const UNSUPPORTED_FIELD: u32 = 2;
    pub const UNKNOWN_CONTAINER: u32 = 3;
    pub const INVALID_ENV: u32 = 4;
    pub const IO_FAILURE: u32 = 5;
    pub const DECODE_FAILURE: u32 = 6;
    pub const INVALID_CONFIG: u32 = 7;
    pub const TRY_AGAIN_LATER: u32 = 11;
    pub const PLUGIN_UNAVAILABLE: u32 = 50;
    pub const PLUGIN_UNAVAILABLE_CONTAINERS_AFFECTED: u32 = 51;

    pub fn new(code: u32, msg: impl Into<String>, details: impl Into<String>) -> Self {
        CniError {
            code,
            msg: msg.into(),
            details: details.into(),
        }
    }

    /// Code 1: the configuration's cniVersion is one this plugin cannot speak.
    pub fn incompatible_version(msg: impl Into<String>) -> Self {
        Self::new(Self::INCOMPATIBLE_VERSION, msg, "")
    }

    /// Code 2: the spec asks that `msg` names the key and value.
    pub fn unsupported_field(msg: impl Into<String>) -> Self {
        Self::new(Self::UNSUPPORTED_FIELD, msg, "")
    }

    /// Code 3: tells the runtime no network cleanup is needed.
    pub fn unknown_container(msg: impl Into<String>) -> Self {
        Self::new(Self::UNKNOWN_CONTAINER, msg, "")
    }

    /// Code 4: the spec asks that `msg` names the offending variables.
    pub fn invalid_env(msg: impl Into<String>) -> Self {
        Self::new(Self::INVALID_ENV, msg, "")
    }

    /// Code 5: e.g. stdin could not be read.
    pub fn io_failure(msg: impl Into<String>) -> Self {
        Self::new(Self::IO_FAILURE, msg, "")
    }

    /// Code 6: bytes that are not the JSON they should be.
    pub fn decode_failure(msg: impl Into<String>) -> Self {
        Self::new(Self::DECODE_FAILURE, msg, "")
    }

    /// Code 7: well-formed JSON whose content fails validation.
    pub fn invalid_config(msg: impl Into<String>) -> Self {
        Self::new(Self::INVALID_CONFIG, msg, "")
    }

    /// Code 11: a transient condition; the runtime should retry.
    pub fn try_again_later(msg: impl Into<String>) -> Self {
        Self::new(Self::TRY_AGAIN_LATER, msg, "")
    }

    /// Code 50 (STATUS): the plugin cannot serve ADD requests now.
    pub fn plugin_unavailable(msg: impl Into<String>) -> Self {
        Self::new(Self::PLUGIN_UNAVAILABLE, msg, "")
    }

    /// Code 51 (STATUS): unavailable, and existing containers may have
    /// limited connectivity.
    pub fn plugin_unavailable_containers_affected(msg: impl Into<String>) -> Self {
        Self::new(Self::PLUGIN_UNAVAILABLE_CONTAINERS_AFFECTED, msg, "")
    }

    pub fn with_details(mut self, details: impl Into<String>) -> Self {
        self.details = details.into();
        self
    }

    /// The error object printed on stdout. An empty `cni_version` (the
    /// config could not be read at all) falls back to the newest version.
    pub fn to_json(&self, cni_version: &str) -> Value {
        let version = if cni_version.is_empty() {
            LATEST_VERSION
        } else {
            cni_version
        };
        let mut v = json!({"cniVersion": version, "code": self.code, "msg": self.msg});
        if !self.details.is_empty() {
            v["details"] = Value::String(self.details.clone());
        }
        v
    }
}

impl fmt::Display for CniError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.details.is_empty() {
            write!(f, "{}", self.msg)
        } else {
            write!(f, "{}: {}", self.msg, self.details)
        }
    }
}

impl std::error::Error for CniError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn well_known_codes() {
        let cases = [
            (CniError::incompatible_version("x"), 1),
            (CniError::unsupported_field("x"), 2),
            (CniError::unknown_container("x"), 3),
            (CniError::invalid_env("x"), 4),
            (CniError::io_failure("x"), 5),
            (CniError::decode_failure("x"), 6),
            (CniError::invalid_config("x"), 7),
            (CniError::try_again_later("x"), 11),
            (CniError::plugin_unavailable("x"), 50),
            (CniError::plugin_unavailable_containers_affected("x"), 51),
        ];
        for (err, code) in cases {
            assert_eq!(err.code, code);
            assert_eq!(err.msg, "x");
            assert!(err.details.is_empty());
        }
    }

    #[test]
    fn json_omits_empty_details() {
        let err = CniError::invalid_env("CNI_IFNAME is not set");
        assert_eq!(
            err.to_json("1.0.0"),
            json!({"cniVersion": "1.0.0", "code": 4, "msg": "CNI_IFNAME is not set"})
        );
    }

    #[test]
    fn json_with_details() {
        let err = CniError::new(7, "invalid network configuration", "mtu 10 is below 68");
        assert_eq!(
            err.to_json("0.4.0"),
            json!({
                "cniVersion": "0.4.0",
                "code": 7,
                "msg": "invalid network configuration",
                "details": "mtu 10 is below 68"
            })
        );
    }

    #[test]
    fn json_without_known_version_uses_latest() {
        assert_eq!(CniError::io_failure("x").to_json("")["cniVersion"], "1.1.0");
    }

    #[test]
    fn display_reads_as_a_sentence() {
        assert_eq!(
            CniError::try_again_later("agent busy").to_string(),
            "agent busy"
        );
        let err = CniError::io_failure("cannot read stdin").with_details("broken pipe");
        assert_eq!(err.to_string(), "cannot read stdin: broken pipe");
        let boxed: Box<dyn std::error::Error> = Box::new(err);
        assert_eq!(boxed.to_string(), "cannot read stdin: broken pipe");
    }
}
