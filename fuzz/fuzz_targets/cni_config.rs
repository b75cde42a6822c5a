//! tern-cni's input: the CNI_* variables and the network configuration on
//! stdin (prevResult included), and the results and errors it renders.
//!
//! Input: `KEY=VALUE` lines (the environment), a NUL byte, then stdin.
//! Without a NUL the whole input is stdin and the environment is empty.

#![no_main]

use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use tern_cni_spec::{
    CniEnv, CniError, CniResult, Command, LATEST_VERSION, NetConf, SUPPORTED_VERSIONS,
    is_supported, requested_version, version_json,
};

fuzz_target!(|data: &[u8]| {
    let (env_part, stdin) = match data.iter().position(|&b| b == 0) {
        Some(nul) => (&data[..nul], &data[nul + 1..]),
        None => (&[][..], data),
    };
    let env_text = String::from_utf8_lossy(env_part);
    let vars: Vec<(&str, &str)> = env_text
        .lines()
        .filter_map(|line| line.split_once('='))
        .collect();
    // The last assignment wins, as in a shell.
    let lookup = |k: &str| {
        vars.iter()
            .rev()
            .find(|(n, _)| *n == k)
            .map(|(_, v)| v.to_string())
    };

    // What main() echoes in errors and VERSION.
    let version = requested_version(stdin);
    if let Some(v) = &version {
        assert!(!v.is_empty());
    }
    let version = version.unwrap_or_else(|| LATEST_VERSION.to_owned());
    let answer = version_json(&version);
    assert_eq!(answer["cniVersion"], Value::String(version.clone()));

    match CniEnv::from_lookup(lookup) {
        Ok(env) => check_env(&env),
        Err(e) => check_error(&e, &version),
    }

    match NetConf::parse(stdin) {
        Ok(conf) => {
            assert!(is_supported(&conf.cni_version));
            assert_eq!(
                conf.cni_version, version,
                "the echoed version is the one parsed"
            );
            assert!(!conf.name.is_empty() && !conf.plugin_type.is_empty());
            assert!(conf.mtu.is_none_or(|m| (68..=65535).contains(&m)));
            for m in &conf.port_mappings {
                assert!(m.host_port != 0 && m.container_port != 0);
            }
            if let Some(prev) = &conf.prev_result {
                check_result(prev, &conf.cni_version);
            }
        }
        Err(e) => check_error(&e, &version),
    }

    // A delegated IPAM plugin's stdout is parsed as a result too.
    if let Ok(v) = serde_json::from_slice::<Value>(stdin) {
        let at = if is_supported(&version) {
            version.as_str()
        } else {
            LATEST_VERSION
        };
        match CniResult::from_json(at, &v) {
            Ok(result) => check_result(&result, at),
            Err(e) => check_error(&e, at),
        }
    }
});

fn check_env(env: &CniEnv) {
    assert_eq!(Command::parse(env.command.as_str()), Some(env.command));
    let attachment = matches!(env.command, Command::Add | Command::Del | Command::Check);
    assert_eq!(env.container_id.is_some(), attachment);
    assert_eq!(env.ifname.is_some(), attachment);
    if let Some(ifname) = &env.ifname {
        assert!(!ifname.is_empty() && ifname.len() <= 15);
        assert!(!ifname.contains(['/', ':']) && ifname != "." && ifname != "..");
    }
    if matches!(env.command, Command::Add | Command::Check) {
        assert!(env.netns.is_some());
    }
    for (k, _) in &env.args {
        assert!(!k.is_empty());
        assert!(env.arg(k).is_some());
    }
    assert!(env.path.iter().all(|p| !p.as_os_str().is_empty()));
}

/// What a result renders to reads back as the same result, in every
/// version: the newest keeps every field, older ones drop some but
/// render the same again.
fn check_result(result: &CniResult, version: &str) {
    let own = result.to_json(version);
    match CniResult::from_json(version, &own) {
        Ok(back) => assert_eq!(back.to_json(version), own),
        Err(e) => panic!("rendered {own} does not parse at {version}: {e}"),
    }
    for &v in SUPPORTED_VERSIONS {
        let rendered = result.to_json(v);
        match CniResult::from_json(v, &rendered) {
            Ok(back) => {
                assert_eq!(back.to_json(v), rendered, "{v}");
                if v == LATEST_VERSION {
                    assert_eq!(&back, result, "{v}");
                }
            }
            Err(e) => panic!("rendered {rendered} does not parse at {v}: {e}"),
        }
    }
}

fn check_error(e: &CniError, version: &str) {
    assert!(!e.msg.is_empty());
    let json = e.to_json(version);
    assert_eq!(json["code"], Value::from(e.code));
    assert!(json["cniVersion"].is_string());
    // What the runtime reads must be one line of JSON.
    let line = json.to_string();
    assert!(!line.contains('\n'));
    assert_eq!(serde_json::from_str::<Value>(&line).ok(), Some(json));
}
