//! The CNI spec versions this plugin speaks, and what each one allows.

use serde_json::{Value, json};

use super::error::CniError;

/// Oldest first, as VERSION reports them. 0.1.0/0.2.0 are left out: their
/// result format ("ip4"/"ip6") predates multi-interface results.
pub const SUPPORTED_VERSIONS: &[&str] = &["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];

/// The newest supported version, used when the runtime names none.
pub const LATEST_VERSION: &str = "1.1.0";

pub fn is_supported(v: &str) -> bool {
    SUPPORTED_VERSIONS.contains(&v)
}

/// The VERSION result. The spec has it echo the cniVersion given on stdin.
pub fn version_json(requested: &str) -> Value {
    let echoed = if requested.is_empty() {
        LATEST_VERSION
    } else {
        requested
    };
    json!({"cniVersion": echoed, "supportedVersions": SUPPORTED_VERSIONS})
}

/// CHECK (and prevResult on DEL) arrived in 0.4.0.
pub fn supports_check(v: &str) -> bool {
    at_least(v, (0, 4, 0))
}

/// STATUS and GC arrived in 1.1.0.
pub fn supports_status_gc(v: &str) -> bool {
    at_least(v, (1, 1, 0))
}

/// Code 1, listing what the plugin does support.
pub(crate) fn unsupported(v: &str) -> CniError {
    CniError::incompatible_version(format!(
        "CNI version {v:?} is not supported; this plugin supports {}",
        SUPPORTED_VERSIONS.join(", ")
    ))
}

/// The newest of `theirs` (another plugin's supportedVersions) that is not
/// newer than `ours`: the version to speak to that plugin.
pub fn highest_common<'a>(ours: &str, theirs: &'a [String]) -> Option<&'a str> {
    let ours = parse(ours)?;
    theirs
        .iter()
        .filter_map(|v| parse(v).filter(|t| *t <= ours).map(|t| (t, v.as_str())))
        .max()
        .map(|(_, v)| v)
}

/// Whether `v` parses as MAJOR.MINOR.PATCH and is >= `min`.
pub(crate) fn at_least(v: &str, min: (u64, u64, u64)) -> bool {
    parse(v).is_some_and(|t| t >= min)
}

fn parse(v: &str) -> Option<(u64, u64, u64)> {
    let mut parts = v.split('.').map(|p| p.parse::<u64>().ok());
    match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some(Some(a)), Some(Some(b)), Some(Some(c)), None) => Some((a, b, c)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn highest_common_version_is_the_newest_not_above_ours() {
        let theirs: Vec<String> = ["0.3.1", "0.4.0", "1.0.0"].map(String::from).to_vec();
        assert_eq!(highest_common("1.1.0", &theirs), Some("1.0.0"));
        assert_eq!(highest_common("0.4.0", &theirs), Some("0.4.0"));
        assert_eq!(highest_common("0.3.0", &theirs), None);
        assert_eq!(highest_common("garbage", &theirs), None);
    }

    #[test]
    fn supported_set() {
        for v in ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"] {
            assert!(is_supported(v), "{v}");
        }
        for v in ["0.1.0", "0.2.0", "1.2.0", "", "1.0", "v1.0.0"] {
            assert!(!is_supported(v), "{v}");
        }
    }

    #[test]
    fn version_echoes_the_request() {
        assert_eq!(
            version_json("0.4.0"),
            json!({
                "cniVersion": "0.4.0",
                "supportedVersions": ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]
            })
        );
        assert_eq!(version_json("1.0.0")["cniVersion"], "1.0.0");
        assert_eq!(version_json("")["cniVersion"], "1.1.0");
    }

    #[test]
    fn feature_gates() {
        assert!(!supports_check("0.3.1"));
        assert!(supports_check("0.4.0"));
        assert!(supports_check("1.0.0"));
        assert!(!supports_status_gc("1.0.0"));
        assert!(supports_status_gc("1.1.0"));
        assert!(!supports_check("garbage"));
        assert!(!supports_check("1.0"));
        assert!(!supports_status_gc("1.1.0.0"));
    }
}
