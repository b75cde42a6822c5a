//! The CNI_* environment variables the runtime passes to every invocation.

use std::fmt;
use std::path::PathBuf;

use super::error::CniError;

/// Every variable the protocol defines.
const VARS: &[&str] = &[
    "CNI_COMMAND",
    "CNI_CONTAINERID",
    "CNI_NETNS",
    "CNI_IFNAME",
    "CNI_ARGS",
    "CNI_PATH",
];

/// Linux IFNAMSIZ is 16 including the NUL.
const MAX_IFNAME_LEN: usize = 15;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Command {
    Add,
    Del,
    Check,
    Version,
    Status,
    Gc,
}

impl Command {
    /// The CNI_COMMAND spelling; the spec's verbs are upper case only.
    pub fn parse(s: &str) -> Option<Command> {
        Some(match s {
            "ADD" => Command::Add,
            "DEL" => Command::Del,
            "CHECK" => Command::Check,
            "VERSION" => Command::Version,
            "STATUS" => Command::Status,
            "GC" => Command::Gc,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Command::Add => "ADD",
            Command::Del => "DEL",
            Command::Check => "CHECK",
            Command::Version => "VERSION",
            Command::Status => "STATUS",
            Command::Gc => "GC",
        }
    }

    /// ADD, DEL and CHECK act on one (container, interface) attachment.
    fn is_attachment(self) -> bool {
        matches!(self, Command::Add | Command::Del | Command::Check)
    }
}

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CniEnv {
    pub command: Command,
    /// Set for ADD, DEL and CHECK only.
    pub container_id: Option<String>,
    /// Set for ADD and CHECK; optional for DEL (the netns may be gone).
    pub netns: Option<PathBuf>,
    /// Set for ADD, DEL and CHECK only.
    pub ifname: Option<String>,
    /// CNI_ARGS pairs in order; read for ADD, DEL and CHECK only.
    pub args: Vec<(String, String)>,
    /// CNI_PATH entries; needed only to find a delegated IPAM plugin.
    pub path: Vec<PathBuf>,
}

impl CniEnv {
    /// Reads and validates the variables through `get`, so tests need no
    /// real environment. Empty values count as unset.
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<CniEnv, CniError> {
        let get = |k: &str| get(k).filter(|v| !v.is_empty());
        let raw =
            get("CNI_COMMAND").ok_or_else(|| CniError::invalid_env("CNI_COMMAND is not set"))?;
        let command = Command::parse(&raw).ok_or_else(|| {
            CniError::invalid_env(format!("CNI_COMMAND {raw:?} is not a known command"))
                .with_details("expected one of ADD, DEL, CHECK, VERSION, STATUS, GC")
        })?;
        let required = |k: &str| {
            get(k).ok_or_else(|| {
                CniError::invalid_env(format!("{k} is not set"))
                    .with_details(format!("{command} needs {k}"))
            })
        };
        let path = get("CNI_PATH")
            .map(|p| {
                p.split(':')
                    .filter(|e| !e.is_empty())
                    .map(PathBuf::from)
                    .collect()
            })
            .unwrap_or_default();
        let mut env = CniEnv {
            command,
            container_id: None,
            netns: None,
            ifname: None,
            args: Vec::new(),
            path,
        };
        if !command.is_attachment() {
            return Ok(env);
        }

        env.container_id = Some(required("CNI_CONTAINERID")?);
        let ifname = required("CNI_IFNAME")?;
        validate_ifname(&ifname)?;
        env.ifname = Some(ifname);
        env.netns = match command {
            Command::Del => get("CNI_NETNS"),
            _ => Some(required("CNI_NETNS")?),
        }
        .map(PathBuf::from);
        env.args = parse_args(&get("CNI_ARGS").unwrap_or_default())?;
        Ok(env)
    }

    /// Reads the real process environment. A value that is not UTF-8 is
    /// reported as such rather than as missing.
    pub fn from_process_env() -> Result<CniEnv, CniError> {
        for var in VARS {
            if let Err(std::env::VarError::NotUnicode(_)) = std::env::var(var) {
                return Err(CniError::invalid_env(format!("{var} is not valid UTF-8")));
            }
        }
        CniEnv::from_lookup(|k| std::env::var(k).ok())
    }

    /// The value of a CNI_ARGS key, e.g. `K8S_POD_NAME`.
    pub fn arg(&self, key: &str) -> Option<&str> {
        self.args
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// The kernel's rules for interface names (dev_valid_name), as the spec
/// restates them.
fn validate_ifname(name: &str) -> Result<(), CniError> {
    let problem = if name.len() > MAX_IFNAME_LEN {
        Some(format!("is longer than {MAX_IFNAME_LEN} bytes"))
    } else if name == "." || name == ".." {
        Some("must not be \".\" or \"..\"".to_string())
    } else if name.contains(['/', ':']) {
        Some("must not contain '/' or ':'".to_string())
    } else if name.chars().any(char::is_whitespace) {
        Some("must not contain whitespace".to_string())
    } else {
        None
    };
    match problem {
        Some(p) => Err(CniError::invalid_env(format!("CNI_IFNAME {name:?} {p}"))),
        None => Ok(()),
    }
}

/// "K1=V1;K2=V2". Empty entries (a trailing ';') are tolerated; the value
/// may itself contain '='.
fn parse_args(raw: &str) -> Result<Vec<(String, String)>, CniError> {
    raw.split(';')
        .filter(|entry| !entry.is_empty())
        .map(|entry| match entry.split_once('=') {
            Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
            _ => Err(CniError::invalid_env(format!(
                "CNI_ARGS entry {entry:?} is not of the form KEY=VALUE"
            ))),
        })
        .collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn env(vars: &[(&str, &str)]) -> Result<CniEnv, CniError> {
        let vars: Vec<(String, String)> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        CniEnv::from_lookup(|k| vars.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone()))
    }

    const ADD: &[(&str, &str)] = &[
        ("CNI_COMMAND", "ADD"),
        ("CNI_CONTAINERID", "abc123"),
        ("CNI_NETNS", "/var/run/netns/blue"),
        ("CNI_IFNAME", "eth0"),
        (
            "CNI_ARGS",
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-0",
        ),
        ("CNI_PATH", "/opt/cni/bin::/usr/libexec/cni"),
    ];

    fn with(
        base: &[(&'static str, &'static str)],
        key: &'static str,
        value: &'static str,
    ) -> Vec<(&'static str, &'static str)> {
        let mut v: Vec<_> = base.iter().copied().filter(|(k, _)| *k != key).collect();
        v.push((key, value));
        v
    }

    fn without(
        base: &[(&'static str, &'static str)],
        key: &str,
    ) -> Vec<(&'static str, &'static str)> {
        base.iter().copied().filter(|(k, _)| *k != key).collect()
    }

    fn err_code_4(vars: &[(&str, &str)], names: &str) {
        let err = env(vars).expect_err("should be rejected");
        assert_eq!(err.code, 4, "{err}");
        assert!(err.msg.contains(names), "{err} should name {names}");
    }

    #[test]
    fn full_add() {
        let e = env(ADD).unwrap();
        assert_eq!(e.command, Command::Add);
        assert_eq!(e.container_id.as_deref(), Some("abc123"));
        assert_eq!(e.netns, Some(PathBuf::from("/var/run/netns/blue")));
        assert_eq!(e.ifname.as_deref(), Some("eth0"));
        assert_eq!(e.args.len(), 3);
        assert_eq!(e.arg("K8S_POD_NAME"), Some("web-0"));
        assert_eq!(e.arg("K8S_POD_NAMESPACE"), Some("default"));
        assert_eq!(e.arg("missing"), None);
        assert_eq!(
            e.path,
            vec![
                PathBuf::from("/opt/cni/bin"),
                PathBuf::from("/usr/libexec/cni")
            ]
        );
    }

    #[test]
    fn check_needs_what_add_needs() {
        let check = with(ADD, "CNI_COMMAND", "CHECK");
        assert_eq!(env(&check).unwrap().command, Command::Check);
        err_code_4(&without(&check, "CNI_NETNS"), "CNI_NETNS");
    }

    #[test]
    fn add_requires_each_variable() {
        for var in ["CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"] {
            err_code_4(&without(ADD, var), var);
            err_code_4(&with(ADD, var, ""), var);
        }
    }

    #[test]
    fn del_without_netns() {
        let del = with(&without(ADD, "CNI_NETNS"), "CNI_COMMAND", "DEL");
        let e = env(&del).unwrap();
        assert_eq!(e.command, Command::Del);
        assert_eq!(e.netns, None);
        assert_eq!(env(&with(&del, "CNI_NETNS", "")).unwrap().netns, None);
        err_code_4(&without(&del, "CNI_CONTAINERID"), "CNI_CONTAINERID");
        err_code_4(&without(&del, "CNI_IFNAME"), "CNI_IFNAME");
    }

    #[test]
    fn commands_without_attachment_need_only_the_command() {
        for (raw, cmd) in [
            ("VERSION", Command::Version),
            ("STATUS", Command::Status),
            ("GC", Command::Gc),
        ] {
            let e = env(&[("CNI_COMMAND", raw), ("CNI_ARGS", "broken")]).unwrap();
            assert_eq!(e.command, cmd);
            assert_eq!(cmd.to_string(), raw);
            assert_eq!((e.container_id, e.netns, e.ifname), (None, None, None));
            assert!(e.args.is_empty() && e.path.is_empty());
        }
        let gc = env(&[("CNI_COMMAND", "GC"), ("CNI_PATH", "/opt/cni/bin")]).unwrap();
        assert_eq!(gc.path, vec![PathBuf::from("/opt/cni/bin")]);
    }

    #[test]
    fn bad_command() {
        err_code_4(&[], "CNI_COMMAND");
        err_code_4(&[("CNI_COMMAND", "add")], "CNI_COMMAND");
        err_code_4(&[("CNI_COMMAND", "DELETE")], "CNI_COMMAND");
    }

    #[test]
    fn bad_ifnames() {
        for name in [
            "averyveryverylong",
            ".",
            "..",
            "eth/0",
            "eth:0",
            "eth 0",
            "eth\t0",
        ] {
            err_code_4(&with(ADD, "CNI_IFNAME", name), "CNI_IFNAME");
        }
        // 15 bytes is the longest the kernel accepts.
        assert!(env(&with(ADD, "CNI_IFNAME", "abcdefghijklmno")).is_ok());
    }

    #[test]
    fn cni_args_forms() {
        let e = env(&with(ADD, "CNI_ARGS", "A=1;B=x=y;C=;")).unwrap();
        assert_eq!(
            e.args,
            vec![
                ("A".into(), "1".into()),
                ("B".into(), "x=y".into()),
                ("C".into(), "".into())
            ]
        );
        assert!(env(&without(ADD, "CNI_ARGS")).unwrap().args.is_empty());
        for bad in ["A=1;novalue", "=1"] {
            err_code_4(&with(ADD, "CNI_ARGS", bad), "CNI_ARGS");
        }
    }
}
