//! Running a delegated IPAM plugin (e.g. host-local) from CNI_PATH, the way
//! every CNI plugin does: same environment, the network config on stdin.
//! It is spoken to at the newest version both understand (its VERSION
//! answer), and asked only for the commands that version defines.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use serde_json::Value;
use tern_cni_spec::{CniError, CniResult, supports_check, supports_status_gc};

pub struct Delegate<'a> {
    pub plugin_type: &'a str,
    pub cni_path: &'a [PathBuf],
    pub netconf: &'a [u8],
    pub cni_version: &'a str,
}

impl Delegate<'_> {
    fn find(&self) -> Result<PathBuf, CniError> {
        if self.cni_path.is_empty() {
            return Err(CniError::invalid_env(format!(
                "CNI_PATH is not set, but the ipam plugin {:?} must be found through it",
                self.plugin_type
            )));
        }
        if self.plugin_type.contains('/') {
            return Err(CniError::invalid_config(format!(
                "ipam type {:?} must be a plugin name, not a path",
                self.plugin_type
            )));
        }
        self.cni_path
            .iter()
            .map(|dir| dir.join(self.plugin_type))
            .find(|p| p.is_file())
            .ok_or_else(|| {
                CniError::invalid_config(format!(
                    "ipam plugin {:?} not found in CNI_PATH ({})",
                    self.plugin_type,
                    join(self.cni_path)
                ))
            })
    }

    /// The version to speak to the plugin: the newest it supports that is
    /// not newer than the network configuration's.
    fn negotiate(&self) -> Result<String, CniError> {
        let request = serde_json::json!({"cniVersion": self.cni_version}).to_string();
        let stdout = self.exec("VERSION", request.as_bytes())?;
        let supported: Vec<String> = serde_json::from_slice::<Value>(&stdout)
            .ok()
            .and_then(|v| serde_json::from_value(v.get("supportedVersions")?.clone()).ok())
            .ok_or_else(|| {
                CniError::decode_failure(format!(
                    "ipam plugin {} gave no supportedVersions to VERSION",
                    self.plugin_type
                ))
            })?;
        match tern_cni_spec::highest_common(self.cni_version, &supported) {
            Some(version) => Ok(version.to_owned()),
            None => Err(CniError::incompatible_version(format!(
                "ipam plugin {} supports cniVersion {}, none of them at or below this network configuration's {}",
                self.plugin_type,
                supported.join(", "),
                self.cni_version
            ))),
        }
    }

    /// Runs `command` at `version` (the network configuration's cniVersion
    /// rewritten to it when they differ).
    fn run_at(&self, command: &str, version: &str) -> Result<Vec<u8>, CniError> {
        if version == self.cni_version {
            return self.exec(command, self.netconf);
        }
        let mut conf: Value = serde_json::from_slice(self.netconf)
            .map_err(|e| CniError::decode_failure(format!("network configuration: {e}")))?;
        conf["cniVersion"] = Value::from(version);
        self.exec(command, conf.to_string().as_bytes())
    }

    /// Runs the plugin with `command` and `stdin`; returns its stdout on
    /// success and its own error object (code and message kept) on failure.
    fn exec(&self, command: &str, stdin: &[u8]) -> Result<Vec<u8>, CniError> {
        let binary = self.find()?;
        let mut child = Command::new(&binary)
            .env("CNI_COMMAND", command)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| CniError::io_failure(format!("cannot run {}: {e}", binary.display())))?;
        if let Some(mut pipe) = child.stdin.take() {
            // A plugin that exits without reading stdin is not our error.
            let _ = pipe.write_all(stdin);
        }
        let output = child
            .wait_with_output()
            .map_err(|e| CniError::io_failure(format!("waiting for {}: {e}", binary.display())))?;
        if output.status.success() {
            return Ok(output.stdout);
        }
        Err(delegate_error(self.plugin_type, &output.stdout))
    }

    pub fn add(&self) -> Result<CniResult, CniError> {
        let version = self.negotiate()?;
        let stdout = self.run_at("ADD", &version)?;
        let value: Value = serde_json::from_slice(&stdout).map_err(|e| {
            CniError::decode_failure(format!(
                "ipam plugin {} printed no valid result",
                self.plugin_type
            ))
            .with_details(e.to_string())
        })?;
        let version = value
            .get("cniVersion")
            .and_then(Value::as_str)
            .unwrap_or(&version)
            .to_owned();
        CniResult::from_json(&version, &value)
    }

    pub fn del(&self) -> Result<(), CniError> {
        let version = self.negotiate()?;
        self.run_at("DEL", &version).map(drop)
    }

    /// CHECK, when the version spoken has it (0.4.0 on).
    pub fn check(&self) -> Result<(), CniError> {
        self.run_if("CHECK", supports_check)
    }

    /// STATUS, when the version spoken has it (1.1.0 on).
    pub fn status(&self) -> Result<(), CniError> {
        self.run_if("STATUS", supports_status_gc)
    }

    /// GC, when the version spoken has it (1.1.0 on).
    pub fn gc(&self) -> Result<(), CniError> {
        self.run_if("GC", supports_status_gc)
    }

    fn run_if(&self, command: &str, defined_at: fn(&str) -> bool) -> Result<(), CniError> {
        let version = self.negotiate()?;
        if !defined_at(&version) {
            return Ok(());
        }
        self.run_at(command, &version).map(drop)
    }
}

/// The delegate's own error object, or a generic one when it printed none.
fn delegate_error(plugin: &str, stdout: &[u8]) -> CniError {
    let parsed: Option<Value> = serde_json::from_slice(stdout).ok();
    let code = parsed
        .as_ref()
        .and_then(|v| v.get("code"))
        .and_then(Value::as_u64)
        .and_then(|c| u32::try_from(c).ok());
    let msg = parsed
        .as_ref()
        .and_then(|v| v.get("msg"))
        .and_then(Value::as_str)
        .map(str::to_owned);
    match (code, msg) {
        (Some(code), Some(msg)) => CniError::new(code, format!("ipam plugin {plugin}: {msg}"), ""),
        _ => CniError::io_failure(format!(
            "ipam plugin {plugin} failed: {}",
            String::from_utf8_lossy(stdout).trim()
        )),
    }
}

fn join(paths: &[PathBuf]) -> String {
    paths
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(":")
}
