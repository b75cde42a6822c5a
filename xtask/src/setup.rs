//! `cargo xtask setup`: everything the build and the tests need on a machine,
//! installed only when missing. Prints one line per step: `ok ...` when it was
//! already in place, `did ...` when this run changed something.
//!
//! docs/toolchain.md says why bpf-linker is built against the nightly's own
//! libLLVM.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use tern_lab::host::{apt, exec, need_root, output, probe};

use crate::util::rustup_proxy;

/// Debian packages the lab and the root tests use.
/// containernetworking-plugins provides /usr/lib/cni/host-local & co.
/// The lab and the tests' needs, the benchmark's tools included (xtask's
/// own tests run them: kube-proxy's rule front ends, the chart font).
const APT_PACKAGES: &[&str] = &[
    "iproute2",
    "iperf3",
    "containernetworking-plugins",
    "sockperf",
    "wrk",
    "nginx-light",
    "iptables",
    "nftables",
    "fonts-dejavu-core",
    // libcni (Debian's Go sources of containernetworking/cni) and a Go
    // compiler: tests/libcni, the runtimes' conflist chaining for the tests.
    "golang-go",
    "golang-github-appc-cni-dev",
];

/// Debian's GOPATH with libcni's sources (golang-github-appc-cni-dev).
const GOCODE: &str = "/usr/share/gocode";

const BPFFS: &str = "/sys/fs/bpf";
const BPF_LINKER_VERSION: &str = "0.13.0";
/// `cargo xtask fuzz`'s driver (libFuzzer); run by the nightly.
const CARGO_FUZZ_VERSION: &str = "0.13.2";

pub fn run() -> Result<()> {
    apt_packages()?;
    bpffs()?;
    nightly()?;
    bpf_linker()?;
    cargo_fuzz()?;
    libcni_runner()?;
    Ok(())
}

/// What `cargo xtask fuzz` needs (no root): the nightly, bpf-linker (the
/// agent's build.rs) and cargo-fuzz.
pub fn fuzz_tools() -> Result<()> {
    nightly()?;
    bpf_linker()?;
    cargo_fuzz()
}

/// cargo-fuzz at [`CARGO_FUZZ_VERSION`], from crates.io with its own lock file.
fn cargo_fuzz() -> Result<()> {
    let installed = probe(rustup_proxy("cargo").args(["fuzz", "--version"]));
    if installed
        .as_deref()
        .is_some_and(|v| is_cargo_fuzz_version(v, CARGO_FUZZ_VERSION))
    {
        println!("ok   cargo-fuzz {CARGO_FUZZ_VERSION}");
        return Ok(());
    }
    exec(
        rustup_proxy("cargo")
            .args(["install", "cargo-fuzz", "--locked", "--force"])
            .args(["--version", CARGO_FUZZ_VERSION]),
    )?;
    println!("did  install cargo-fuzz {CARGO_FUZZ_VERSION}");
    Ok(())
}

/// `cargo fuzz --version` prints "cargo-fuzz 0.13.2".
fn is_cargo_fuzz_version(out: &str, want: &str) -> bool {
    out.split_whitespace().nth(1) == Some(want)
}

/// Builds tests/libcni (offline: GOPATH mode against Debian's sources)
/// into target/tools, where `tern_lab::libcni` looks for it.
fn libcni_runner() -> Result<()> {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let out = tern_lab::libcni::runner_path();
    exec(
        Command::new("go")
            .args(["build", "-o"])
            .arg(&out)
            .arg(".")
            .current_dir(workspace.join("tests/libcni"))
            .env("GO111MODULE", "off")
            .env("GOPATH", GOCODE)
            .env("GOFLAGS", ""),
    )?;
    println!("did  build {}", out.display());
    Ok(())
}

fn apt_packages() -> Result<()> {
    apt(APT_PACKAGES)
}

fn bpffs_mounted() -> Result<bool> {
    let mounts = fs::read_to_string("/proc/self/mounts").context("reading /proc/self/mounts")?;
    Ok(is_bpf_mount(&mounts, BPFFS))
}

/// Whether `/proc/self/mounts` text has a bpf filesystem mounted at `dir`.
fn is_bpf_mount(mounts: &str, dir: &str) -> bool {
    mounts.lines().any(|l| {
        let mut f = l.split_whitespace();
        let (_src, d, fstype) = (f.next(), f.next(), f.next());
        d == Some(dir) && fstype == Some("bpf")
    })
}

fn bpffs() -> Result<()> {
    if bpffs_mounted()? {
        println!("ok   bpffs mounted at {BPFFS}");
        return Ok(());
    }
    need_root(&format!("mount bpffs at {BPFFS}"))?;
    fs::create_dir_all(BPFFS).with_context(|| format!("creating {BPFFS}"))?;
    exec(Command::new("mount").args(["-t", "bpf", "bpf", BPFFS]))?;
    if !bpffs_mounted()? {
        bail!("mounted bpffs at {BPFFS} but /proc/self/mounts does not show it");
    }
    println!("did  mount bpffs at {BPFFS}");
    Ok(())
}

/// Whether rustup has the `nightly` channel toolchain (not a dated one).
fn has_nightly() -> bool {
    probe(rustup_proxy("rustup").args(["toolchain", "list"]))
        .is_some_and(|list| lists_nightly(&list))
}

/// Whether `rustup toolchain list` output has the `nightly` channel.
fn lists_nightly(list: &str) -> bool {
    list.lines()
        .filter_map(|l| l.split_whitespace().next())
        .any(|t| {
            t == "nightly"
                || t.strip_prefix("nightly-")
                    .is_some_and(|rest| !rest.starts_with(|c: char| c.is_ascii_digit()))
        })
}

fn nightly_sysroot() -> Result<PathBuf> {
    let out = output(rustup_proxy("rustc").args(["+nightly", "--print", "sysroot"]))?;
    Ok(PathBuf::from(out.trim()))
}

fn nightly() -> Result<()> {
    if has_nightly() {
        println!("ok   nightly toolchain");
    } else {
        exec(rustup_proxy("rustup").args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
        ]))?;
        println!("did  install nightly toolchain");
    }
    let src = nightly_sysroot()?.join("lib/rustlib/src/rust/library");
    if src.is_dir() {
        println!("ok   rust-src (nightly)");
    } else {
        exec(rustup_proxy("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "nightly",
        ]))?;
        println!("did  add rust-src to nightly");
    }
    Ok(())
}

/// Where `cargo install` puts binaries.
fn cargo_bin_dir() -> Option<PathBuf> {
    if let Some(h) = std::env::var_os("CARGO_HOME") {
        return Some(PathBuf::from(h).join("bin"));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo/bin"))
}

/// `Some(path)` of a bpf-linker that runs and reports the wanted version.
fn working_bpf_linker() -> Option<PathBuf> {
    let mut candidates = vec![PathBuf::from("bpf-linker")];
    if let Some(dir) = cargo_bin_dir() {
        candidates.push(dir.join("bpf-linker"));
    }
    candidates.into_iter().find(|c| {
        probe(Command::new(c).arg("--version"))
            .is_some_and(|v| v.split_whitespace().nth(1) == Some(BPF_LINKER_VERSION))
    })
}

/// The major LLVM version of the nightly rustc ("LLVM version: 22.1.4" -> 22).
fn nightly_llvm_major() -> Result<String> {
    let vv = output(rustup_proxy("rustc").args(["+nightly", "-vV"]))?;
    llvm_major(&vv)
}

/// "LLVM version: 22.1.4" in `rustc -vV` output -> "22".
fn llvm_major(vv: &str) -> Result<String> {
    let version = vv
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version:"))
        .context("`rustc +nightly -vV` prints no `LLVM version:` line")?;
    let major = version.trim().split('.').next().unwrap_or_default();
    if major.is_empty() || !major.chars().all(|c| c.is_ascii_digit()) {
        bail!("cannot parse LLVM version {version:?}");
    }
    Ok(major.to_owned())
}

/// The nightly's shared libLLVM (`lib/libLLVM.so.<ver>-rust-<ver>-nightly`).
fn nightly_libllvm(sysroot_lib: &Path) -> Result<PathBuf> {
    let mut found: Vec<PathBuf> = fs::read_dir(sysroot_lib)
        .with_context(|| format!("reading {}", sysroot_lib.display()))?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("libLLVM.so."))
        })
        .collect();
    found.sort();
    match found.pop() {
        Some(p) => Ok(p),
        None => bail!(
            "no libLLVM.so.* in {}: the nightly toolchain ships no shared LLVM",
            sysroot_lib.display()
        ),
    }
}

fn bpf_linker() -> Result<()> {
    if let Some(path) = working_bpf_linker() {
        let place = if path == Path::new("bpf-linker") {
            "on PATH".to_owned()
        } else {
            path.display().to_string()
        };
        println!("ok   bpf-linker {BPF_LINKER_VERSION} ({place})");
        warn_if_not_on_path(&path);
        return Ok(());
    }
    let sysroot_lib = nightly_sysroot()?.join("lib");
    let libllvm = nightly_libllvm(&sysroot_lib)?;
    let major = nightly_llvm_major()?;
    let home = std::env::var_os("HOME").context("HOME is not set")?;
    let prefix = PathBuf::from(home).join(".local/share/tern-llvm");
    let prefix_lib = prefix.join("lib");
    fs::create_dir_all(&prefix_lib)
        .with_context(|| format!("creating {}", prefix_lib.display()))?;
    let link = prefix_lib.join("libLLVM.so");
    if fs::symlink_metadata(&link).is_ok() {
        fs::remove_file(&link).with_context(|| format!("removing {}", link.display()))?;
    }
    std::os::unix::fs::symlink(&libllvm, &link)
        .with_context(|| format!("linking {} -> {}", link.display(), libllvm.display()))?;
    // The rpath lets the installed binary find the nightly's libLLVM from
    // anywhere, not only under `cargo +nightly` (which puts it on the loader path).
    let rustflags = format!("-C link-arg=-Wl,-rpath,{}", sysroot_lib.display());
    exec(
        rustup_proxy("cargo")
            .env("LLVM_PREFIX", &prefix)
            .env("RUSTFLAGS", rustflags)
            .args(["+nightly", "install", "bpf-linker", "--force"])
            .args(["--version", BPF_LINKER_VERSION])
            .args(["--no-default-features", "--features"])
            .arg(format!("llvm-{major}")),
    )?;
    let Some(path) = working_bpf_linker() else {
        bail!("installed bpf-linker {BPF_LINKER_VERSION}, but `bpf-linker --version` does not run");
    };
    warn_if_not_on_path(&path);
    println!(
        "did  install bpf-linker {BPF_LINKER_VERSION} (LLVM {major}, {})",
        libllvm.display()
    );
    Ok(())
}

fn warn_if_not_on_path(path: &Path) {
    if path != Path::new("bpf-linker") {
        eprintln!(
            "warning: {} is not on PATH; add {} to PATH",
            path.display(),
            path.parent().unwrap_or(Path::new("")).display()
        );
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn parses_llvm_major() {
        let vv = "rustc 1.97.0-nightly (e50aa6fba 2026-05-19)\nbinary: rustc\n\
                  host: x86_64-unknown-linux-gnu\nLLVM version: 22.1.4\n";
        assert_eq!(llvm_major(vv).unwrap(), "22");
        assert!(llvm_major("rustc 1.0\n").is_err());
        assert!(llvm_major("LLVM version: x.1\n").is_err());
    }

    #[test]
    fn finds_nightly_channel_only() {
        let list = "stable-x86_64-unknown-linux-gnu (active, default)\n\
                    nightly-x86_64-unknown-linux-gnu\n1.95.0-x86_64-unknown-linux-gnu\n";
        assert!(lists_nightly(list));
        assert!(!lists_nightly(
            "stable-x86_64-unknown-linux-gnu (default)\n"
        ));
        assert!(!lists_nightly(
            "nightly-2026-05-19-x86_64-unknown-linux-gnu\n"
        ));
    }

    #[test]
    fn reads_cargo_fuzz_version() {
        assert!(is_cargo_fuzz_version("cargo-fuzz 0.13.2\n", "0.13.2"));
        assert!(!is_cargo_fuzz_version("cargo-fuzz 0.12.0\n", "0.13.2"));
        assert!(!is_cargo_fuzz_version("", "0.13.2"));
    }

    #[test]
    fn detects_bpffs() {
        let mounts = "sysfs /sys sysfs rw,nosuid 0 0\nbpf /sys/fs/bpf bpf rw,relatime 0 0\n";
        assert!(is_bpf_mount(mounts, "/sys/fs/bpf"));
        assert!(!is_bpf_mount("sysfs /sys sysfs rw 0 0\n", "/sys/fs/bpf"));
        assert!(!is_bpf_mount(
            "tmpfs /sys/fs/bpf tmpfs rw 0 0\n",
            "/sys/fs/bpf"
        ));
    }
}
