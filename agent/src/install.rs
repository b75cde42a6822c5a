//! `tern install-cni`: puts the `tern-cni` binary and Tern's network
//! configuration list where the container runtime looks for them. The
//! DaemonSet's init container runs it at every start of the agent pod.
//!
//! Both files are replaced atomically: the new content goes to a hidden
//! temporary file in the target directory (named `*.tmp`, an extension
//! runtimes do not load), is synced and given its mode, and is then renamed
//! over the target. A runtime executing the plugin or reading the
//! configuration at any moment sees the old file or the new one, never a
//! half-written one; renaming also works while the old binary is running,
//! where writing into it would fail with "text file busy".
//!
//! The binary goes first: runtimes call the network ready as soon as a
//! configuration exists, and the configuration names the binary.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use serde_json::Value;
use tern_cni_spec::NetConf;

/// The plugin's file name in the CNI bin directory: the `type` the
/// configuration's first plugin names.
pub const PLUGIN_TYPE: &str = "tern-cni";

/// File names runtimes (libcni) load from the configuration directory, in
/// name order; the first one wins.
const CONF_EXTENSIONS: &[&str] = &["conf", "conflist", "json"];

const BINARY_MODE: u32 = 0o755;
const CONF_MODE: u32 = 0o644;

#[derive(Debug, clap::Args)]
pub struct InstallCniArgs {
    /// Directory the container runtime runs CNI plugins from.
    #[arg(long, default_value = "/opt/cni/bin")]
    pub cni_bin_dir: PathBuf,
    /// Directory the container runtime reads network configurations from.
    #[arg(long, default_value = "/etc/cni/net.d")]
    pub cni_conf_dir: PathBuf,
    /// The tern-cni binary to install (default: tern-cni next to this
    /// executable).
    #[arg(long)]
    pub plugin: Option<PathBuf>,
    /// The network configuration list to install; it keeps its file name
    /// (e.g. 10-tern.conflist).
    #[arg(long)]
    pub conflist: PathBuf,
}

/// What happened to one target file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Installed,
    /// Already held the same bytes and mode: left alone.
    Unchanged,
}

pub fn run(args: &InstallCniArgs) -> anyhow::Result<String> {
    let plugin = match &args.plugin {
        Some(path) => path.clone(),
        None => default_plugin()?,
    };
    install(
        &plugin,
        &args.conflist,
        &args.cni_bin_dir,
        &args.cni_conf_dir,
    )
}

/// `tern-cni` in the directory of the running executable.
fn default_plugin() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()
        .context("cannot find the running executable to locate tern-cni; pass --plugin")?;
    Ok(exe.with_file_name(PLUGIN_TYPE))
}

/// Installs `plugin` as `<bin_dir>/tern-cni` and `conflist` as
/// `<conf_dir>/<its file name>`. Everything is read and checked before
/// either directory is touched. Returns one line per file, plus a note for
/// each configuration that sorts before Tern's (the runtime would use it).
pub fn install(
    plugin: &Path,
    conflist: &Path,
    bin_dir: &Path,
    conf_dir: &Path,
) -> anyhow::Result<String> {
    let conf_name = conflist_name(conflist)?;
    let conf_bytes = fs::read(conflist)
        .with_context(|| format!("reading network configuration {}", conflist.display()))?;
    validate_conflist(&conf_bytes)
        .with_context(|| format!("network configuration {} is not valid", conflist.display()))?;
    let meta = fs::metadata(plugin)
        .with_context(|| format!("plugin binary {} cannot be read", plugin.display()))?;
    if !meta.is_file() || meta.len() == 0 {
        bail!(
            "plugin binary {} is not a non-empty regular file",
            plugin.display()
        );
    }
    let plugin_bytes =
        fs::read(plugin).with_context(|| format!("reading plugin binary {}", plugin.display()))?;

    let mut report = Vec::new();
    let outcome = replace(bin_dir, PLUGIN_TYPE, &plugin_bytes, BINARY_MODE)?;
    report.push(describe(outcome, &bin_dir.join(PLUGIN_TYPE), Some(plugin)));
    let outcome = replace(conf_dir, conf_name, &conf_bytes, CONF_MODE)?;
    report.push(describe(outcome, &conf_dir.join(conf_name), None));
    for earlier in configs_before(conf_dir, conf_name)? {
        report.push(format!(
            "note: {} sorts before {conf_name}; the runtime uses the first configuration by name, so remove it for Tern's to take effect",
            earlier.display()
        ));
    }
    Ok(report.join("\n"))
}

fn describe(outcome: Outcome, target: &Path, from: Option<&Path>) -> String {
    let from = from
        .map(|f| format!(" (from {})", f.display()))
        .unwrap_or_default();
    match outcome {
        Outcome::Installed => format!("installed {}{from}", target.display()),
        Outcome::Unchanged => format!("unchanged {}", target.display()),
    }
}

/// The file name the configuration is installed under: its own, which must
/// end in `.conflist` (runtimes read other extensions as a single plugin's
/// configuration, not a list).
fn conflist_name(conflist: &Path) -> anyhow::Result<&str> {
    let name = conflist
        .file_name()
        .and_then(|n| n.to_str())
        .with_context(|| {
            format!(
                "network configuration {} has no usable file name",
                conflist.display()
            )
        })?;
    if !name.ends_with(".conflist") || name.starts_with('.') {
        bail!(
            "network configuration {} must be named *.conflist (not hidden): runtimes load lists only from such files",
            conflist.display()
        );
    }
    Ok(name)
}

/// A network configuration list for Tern: valid JSON with `name`,
/// `cniVersion` and a `plugins` array whose first entry is `tern-cni` and is
/// accepted by the plugin's own configuration parser (given the list's name
/// and version, as runtimes pass them).
pub fn validate_conflist(bytes: &[u8]) -> anyhow::Result<()> {
    let list: Value = serde_json::from_slice(bytes).context("not valid JSON")?;
    let Some(top) = list.as_object() else {
        bail!("not a JSON object");
    };
    let string = |key: &str| -> anyhow::Result<&str> {
        match top.get(key) {
            Some(Value::String(s)) if !s.is_empty() => Ok(s),
            Some(other) => bail!("{key:?} must be a non-empty string, not {other}"),
            None => bail!("{key:?} is missing"),
        }
    };
    let name = string("name")?;
    let version = string("cniVersion")?;
    let plugins = match top.get("plugins") {
        Some(Value::Array(plugins)) => plugins,
        Some(other) => bail!("\"plugins\" must be an array, not {other}"),
        None => bail!("\"plugins\" is missing"),
    };
    let Some(first) = plugins.first() else {
        bail!("\"plugins\" is empty");
    };
    let Some(first) = first.as_object() else {
        bail!("plugins[0] is not a JSON object");
    };
    match first.get("type") {
        Some(Value::String(t)) if t == PLUGIN_TYPE => {}
        Some(other) => bail!("plugins[0].type is {other}, not {PLUGIN_TYPE:?}"),
        None => bail!("plugins[0].type is missing (must be {PLUGIN_TYPE:?})"),
    }
    check_capabilities(first.get("capabilities"))?;
    let mut conf = first.clone();
    conf.insert("name".into(), Value::String(name.into()));
    conf.insert("cniVersion".into(), Value::String(version.into()));
    let conf = serde_json::to_vec(&Value::Object(conf))?;
    NetConf::parse(&conf).map_err(|e| anyhow::anyhow!("plugins[0]: {e}"))?;
    Ok(())
}

/// The capabilities tern-cni serves. One it does not serve would be
/// passed to it by the runtime and have no effect.
pub const CAPABILITIES: &[&str] = &["portMappings", "bandwidth"];

fn check_capabilities(capabilities: Option<&Value>) -> anyhow::Result<()> {
    let Some(capabilities) = capabilities else {
        return Ok(());
    };
    let Some(capabilities) = capabilities.as_object() else {
        bail!("plugins[0].capabilities must be an object, not {capabilities}");
    };
    for (name, on) in capabilities {
        if on.as_bool() != Some(false) && !CAPABILITIES.contains(&name.as_str()) {
            bail!(
                "plugins[0].capabilities.{name}: tern-cni does not serve it (it serves {})",
                CAPABILITIES.join(", ")
            );
        }
    }
    Ok(())
}

/// Atomically makes `<dir>/<name>` hold `contents` with `mode`.
fn replace(dir: &Path, name: &str, contents: &[u8], mode: u32) -> anyhow::Result<Outcome> {
    let target = dir.join(name);
    fs::create_dir_all(dir).with_context(|| format!("creating directory {}", dir.display()))?;
    remove_stale_temps(dir, name)?;
    if holds(&target, contents, mode) {
        return Ok(Outcome::Unchanged);
    }
    let temp = TempFile(dir.join(format!(".{name}.{}.tmp", std::process::id())));
    let write = || -> std::io::Result<()> {
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&temp.0)?;
        file.write_all(contents)?;
        // Explicitly, so the umask cannot narrow it.
        file.set_permissions(fs::Permissions::from_mode(mode))?;
        file.sync_all()
    };
    write().with_context(|| format!("writing {}", temp.0.display()))?;
    fs::rename(&temp.0, &target)
        .with_context(|| format!("renaming {} over {}", temp.0.display(), target.display()))?;
    // The rename itself survives a crash only once the directory is synced.
    File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("syncing directory {}", dir.display()))?;
    Ok(Outcome::Installed)
}

/// `target` is a regular file with exactly these bytes and this mode.
fn holds(target: &Path, contents: &[u8], mode: u32) -> bool {
    let Ok(meta) = fs::symlink_metadata(target) else {
        return false;
    };
    meta.is_file()
        && meta.permissions().mode() & 0o7777 == mode
        && meta.len() == contents.len() as u64
        && fs::read(target).is_ok_and(|existing| existing == contents)
}

/// Temporary files of earlier runs that were killed mid-write.
fn remove_stale_temps(dir: &Path, name: &str) -> anyhow::Result<()> {
    let prefix = format!(".{name}.");
    let entries = fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))?;
    for entry in entries {
        let entry = entry.with_context(|| format!("reading {}", dir.display()))?;
        let file_name = entry.file_name();
        let Some(file_name) = file_name.to_str() else {
            continue;
        };
        if file_name.starts_with(&prefix) && file_name.ends_with(".tmp") {
            let path = entry.path();
            fs::remove_file(&path)
                .with_context(|| format!("removing stale temporary file {}", path.display()))?;
        }
    }
    Ok(())
}

/// Configurations a runtime would load before `name` (libcni sorts the
/// names bytewise and uses the first).
fn configs_before(conf_dir: &Path, name: &str) -> anyhow::Result<Vec<PathBuf>> {
    let entries =
        fs::read_dir(conf_dir).with_context(|| format!("reading {}", conf_dir.display()))?;
    let mut earlier = Vec::new();
    for entry in entries {
        let entry = entry.with_context(|| format!("reading {}", conf_dir.display()))?;
        let file_name = entry.file_name();
        let Some(file_name) = file_name.to_str() else {
            continue;
        };
        let loaded = Path::new(file_name)
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| CONF_EXTENSIONS.contains(&e));
        if loaded && file_name < name {
            earlier.push(entry.path());
        }
    }
    earlier.sort();
    Ok(earlier)
}

/// Removed on drop: cleans up after a failed write (a no-op once renamed).
struct TempFile(PathBuf);

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.0);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    /// The configuration the DaemonSet installs.
    const CONFLIST: &str = include_str!("../../manifests/10-tern.conflist");

    struct Node {
        _root: tempfile::TempDir,
        src: PathBuf,
        bin: PathBuf,
        conf: PathBuf,
    }

    impl Node {
        fn new() -> Node {
            let root = tempfile::tempdir().unwrap();
            let src = root.path().join("src");
            fs::create_dir(&src).unwrap();
            let bin = root.path().join("opt/cni/bin");
            let conf = root.path().join("etc/cni/net.d");
            Node {
                src,
                bin,
                conf,
                _root: root,
            }
        }

        fn source(&self, name: &str, contents: &str) -> PathBuf {
            let path = self.src.join(name);
            fs::write(&path, contents).unwrap();
            path
        }

        fn install(&self, plugin: &Path, conflist: &Path) -> anyhow::Result<String> {
            install(plugin, conflist, &self.bin, &self.conf)
        }
    }

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o7777
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn installs_the_binary_and_the_conflist() {
        let node = Node::new();
        let plugin = node.source("tern-cni", "#!/bin/sh\necho new\n");
        let conflist = node.source("10-tern.conflist", CONFLIST);
        let report = node.install(&plugin, &conflist).unwrap();
        assert!(report.contains("installed"), "{report}");

        let binary = node.bin.join("tern-cni");
        assert_eq!(
            fs::read_to_string(&binary).unwrap(),
            "#!/bin/sh\necho new\n"
        );
        assert_eq!(mode(&binary), 0o755);
        let conf = node.conf.join("10-tern.conflist");
        assert_eq!(fs::read_to_string(&conf).unwrap(), CONFLIST);
        assert_eq!(mode(&conf), 0o644);
        assert_eq!(names(&node.bin), ["tern-cni"]);
        assert_eq!(names(&node.conf), ["10-tern.conflist"]);

        // Run again: nothing to do, nothing rewritten.
        let report = node.install(&plugin, &conflist).unwrap();
        assert_eq!(report.matches("unchanged").count(), 2, "{report}");
    }

    #[test]
    fn overwrites_an_older_copy() {
        let node = Node::new();
        fs::create_dir_all(&node.bin).unwrap();
        fs::create_dir_all(&node.conf).unwrap();
        let binary = node.bin.join("tern-cni");
        fs::write(&binary, "old binary").unwrap();
        fs::set_permissions(&binary, fs::Permissions::from_mode(0o600)).unwrap();
        let conf = node.conf.join("10-tern.conflist");
        fs::write(&conf, r#"{"old": true}"#).unwrap();
        // Left by an earlier run killed mid-write.
        fs::write(node.bin.join(".tern-cni.99999.tmp"), "partial").unwrap();
        let other = node.bin.join("bridge");
        fs::write(&other, "another plugin").unwrap();

        let plugin = node.source("tern-cni", "new binary");
        let conflist = node.source("10-tern.conflist", CONFLIST);
        node.install(&plugin, &conflist).unwrap();

        assert_eq!(fs::read_to_string(&binary).unwrap(), "new binary");
        assert_eq!(mode(&binary), 0o755);
        assert_eq!(fs::read_to_string(&conf).unwrap(), CONFLIST);
        assert_eq!(names(&node.bin), ["bridge", "tern-cni"]);
        assert_eq!(fs::read_to_string(&other).unwrap(), "another plugin");
        assert_eq!(names(&node.conf), ["10-tern.conflist"]);
    }

    #[test]
    fn rejects_a_bad_conflist_and_keeps_the_old_files() {
        let node = Node::new();
        let plugin = node.source("tern-cni", "v1");
        let good = node.source("10-tern.conflist", CONFLIST);
        node.install(&plugin, &good).unwrap();
        let newer = node.source("tern-cni", "v2");

        let bad = [
            ("not valid JSON", "{"),
            ("plugins", r#"{"cniVersion":"1.1.0","name":"tern"}"#),
            (
                "is empty",
                r#"{"cniVersion":"1.1.0","name":"tern","plugins":[]}"#,
            ),
            (
                "not \"tern-cni\"",
                r#"{"cniVersion":"1.1.0","name":"tern","plugins":[{"type":"bridge"}]}"#,
            ),
            (
                "\"name\" is missing",
                r#"{"cniVersion":"1.1.0","plugins":[{"type":"tern-cni"}]}"#,
            ),
            (
                "\"cniVersion\" is missing",
                r#"{"name":"tern","plugins":[{"type":"tern-cni"}]}"#,
            ),
            (
                "9.9.9",
                r#"{"cniVersion":"9.9.9","name":"tern","plugins":[{"type":"tern-cni"}]}"#,
            ),
            (
                "mtu",
                r#"{"cniVersion":"1.1.0","name":"tern","plugins":[{"type":"tern-cni","mtu":1}]}"#,
            ),
            (
                "capabilities.mac: tern-cni does not serve it",
                r#"{"cniVersion":"1.1.0","name":"tern","plugins":[{"type":"tern-cni","capabilities":{"portMappings":true,"mac":true}}]}"#,
            ),
        ];
        for (expected, text) in bad {
            let conflist = node.source("10-tern.conflist", text);
            let err = node.install(&newer, &conflist).unwrap_err();
            let message = format!("{err:#}");
            assert!(message.contains(expected), "{text}: {message}");
            assert!(
                message.contains(&conflist.display().to_string()),
                "the error names the file: {message}"
            );
            assert_eq!(
                fs::read_to_string(node.conf.join("10-tern.conflist")).unwrap(),
                CONFLIST
            );
            // Checked before anything is written: the binary stays too.
            assert_eq!(fs::read_to_string(node.bin.join("tern-cni")).unwrap(), "v1");
        }
        let wrong_name = node.source("tern.json", CONFLIST);
        let err = node.install(&newer, &wrong_name).unwrap_err();
        assert!(format!("{err:#}").contains("*.conflist"), "{err:#}");
        assert_eq!(names(&node.bin), ["tern-cni"]);
        assert_eq!(names(&node.conf), ["10-tern.conflist"]);
    }

    #[test]
    fn a_missing_plugin_is_named_and_nothing_is_written() {
        let node = Node::new();
        let conflist = node.source("10-tern.conflist", CONFLIST);
        let missing = node.src.join("no-such-tern-cni");
        let err = node.install(&missing, &conflist).unwrap_err();
        assert!(
            format!("{err:#}").contains(&missing.display().to_string()),
            "{err:#}"
        );
        assert!(!node.bin.exists() && !node.conf.exists());
    }

    #[test]
    fn notes_configurations_that_sort_first() {
        let node = Node::new();
        fs::create_dir_all(&node.conf).unwrap();
        fs::write(node.conf.join("05-other.conf"), "{}").unwrap();
        fs::write(node.conf.join("99-later.conflist"), "{}").unwrap();
        fs::write(node.conf.join("00-readme.txt"), "").unwrap();
        let plugin = node.source("tern-cni", "bin");
        let conflist = node.source("10-tern.conflist", CONFLIST);
        let report = node.install(&plugin, &conflist).unwrap();
        assert!(report.contains("05-other.conf sorts before"), "{report}");
        assert!(!report.contains("99-later"), "{report}");
        assert!(!report.contains("00-readme"), "{report}");
    }

    #[test]
    fn cli_defaults() {
        use clap::Parser;
        let cli = crate::cli::Cli::try_parse_from([
            "tern",
            "install-cni",
            "--conflist",
            "/etc/tern/10-tern.conflist",
        ])
        .unwrap();
        let crate::cli::Command::InstallCni(args) = cli.command else {
            panic!("not install-cni: {:?}", cli.command);
        };
        assert_eq!(args.cni_bin_dir, Path::new("/opt/cni/bin"));
        assert_eq!(args.cni_conf_dir, Path::new("/etc/cni/net.d"));
        assert_eq!(args.plugin, None);
        assert!(
            crate::cli::Cli::try_parse_from(["tern", "install-cni"]).is_err(),
            "--conflist is required"
        );
    }
}
