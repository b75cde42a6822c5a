//! Conflists run through libcni, as containerd, CRI-O and podman run them:
//! `tests/libcni` is a small Go program over Debian's libcni sources that
//! `cargo xtask setup` builds into target/tools.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use crate::lab::{CniOutput, LabNode};

/// Where `cargo xtask setup` puts the libcni runner.
pub fn runner_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/tools/tern-libcni")
}

/// One network list on one lab node: its conflist and libcni's result
/// cache live in the node's directory.
pub struct Chain {
    runner: PathBuf,
    conflist: PathBuf,
    cache: PathBuf,
}

impl Chain {
    /// A list named "tern-lab" at `cni_version` whose first plugin is the
    /// node's tern-cni netconf (with `tern_extra` merged in) and then
    /// `chained`, in order.
    pub fn new(
        node: &LabNode,
        cni_version: &str,
        tern_extra: Value,
        chained: &[Value],
    ) -> Result<Chain> {
        let runner = runner_path();
        if !runner.is_file() {
            bail!(
                "{} missing: run `cargo xtask setup` (it builds tests/libcni)",
                runner.display()
            );
        }
        let mut tern = node.netconf(cni_version);
        if let (Some(t), Value::Object(extra)) = (tern.as_object_mut(), tern_extra) {
            t.remove("cniVersion");
            t.remove("name");
            t.extend(extra);
        }
        let mut plugins = vec![tern];
        plugins.extend(chained.iter().cloned());
        let list = json!({"cniVersion": cni_version, "name": "tern-lab", "plugins": plugins});
        let conflist = node.dir.join("tern-lab.conflist");
        std::fs::write(&conflist, serde_json::to_vec_pretty(&list)?)
            .with_context(|| format!("writing {}", conflist.display()))?;
        Ok(Chain {
            runner,
            conflist,
            cache: node.dir.join("libcni-cache"),
        })
    }

    /// libcni's ADD, CHECK or DEL ("add", "check", "del") of the list on
    /// `node` for `container_id`/eth0 in `netns`, with the runtime's
    /// capability arguments (e.g. `{"mac": ..., "portMappings": [...]}`).
    pub fn run(
        &self,
        node: &LabNode,
        command: &str,
        container_id: &str,
        netns: &Path,
        capability_args: &Value,
    ) -> Result<CniOutput> {
        let tern_dir = node
            .bins
            .cni
            .parent()
            .context("tern-cni has no directory")?;
        let mut cmd = Command::new(&self.runner);
        cmd.env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .env("CNI_PATH", format!("{}:/usr/lib/cni", tern_dir.display()))
            .env("TERN_LIBCNI_CACHE", &self.cache)
            .arg(command)
            .arg(&self.conflist)
            .arg(container_id)
            .arg(netns)
            .arg("eth0")
            .arg(capability_args.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let out = node.ns.spawn(cmd)?.wait_with_output()?;
        Ok(CniOutput {
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        })
    }
}
