//! Builds the eBPF object (crate tern-ebpf) with the nightly toolchain and
//! bpf-linker, so the agent can embed it. `cargo xtask setup` installs both.

use std::path::{Path, PathBuf};

fn main() -> anyhow::Result<()> {
    let has_linker = std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|dir| dir.join("bpf-linker").is_file()))
        .unwrap_or(false);
    if !has_linker {
        anyhow::bail!(
            "bpf-linker is not on PATH: run `cargo xtask setup` once (it builds bpf-linker against the nightly's LLVM)"
        );
    }
    let manifest_dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?);
    let ebpf_dir = manifest_dir.join("..").join("ebpf-programs");
    let ebpf_dir = ebpf_dir.canonicalize().unwrap_or(ebpf_dir);
    let root = ebpf_dir.to_str().unwrap_or("../ebpf-programs");
    println!(
        "cargo:rerun-if-changed={}",
        Path::new(root).join("common").display()
    );
    let features: &[&str] = if std::env::var_os("CARGO_FEATURE_EBPF_UPGRADE_PROBE").is_some() {
        &["upgrade-probe"]
    } else {
        &[]
    };
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "tern-ebpf",
            root_dir: root,
            features,
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )
}
