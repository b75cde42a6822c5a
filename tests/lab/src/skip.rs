//! Tests that cannot run say so. A root test starts with
//! `if !skip::require_root("my_test") { return; }`; when it cannot run:
//! - with `CI` set (not empty, not `false` or `0`) the test fails: CI runs as
//!   root, so a skip there is a defect;
//! - else the skip is counted, and when the test binary exits one line per
//!   reason names them, `SKIPPED 3 test(s) of services, shown as ok above
//!   (needs root ...): a, b, c`, right under the harness's summary (stdout);
//! - and when `TERN_SKIPPED` names a file, a line `<binary>: <test>: <reason>`
//!   is appended to it: `cargo xtask test` counts them ([`read_log`]).

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;
use std::sync::{Mutex, Once};

/// The file every skip is appended to, when set.
pub const LOG_ENV: &str = "TERN_SKIPPED";

/// Whether this process is root; records the skip of `test` when not.
pub fn require_root(test: &str) -> bool {
    if crate::host::is_root() {
        return true;
    }
    skip(test, "needs root: network namespaces, veths, eBPF");
    false
}

/// Records that `test` does not run, and why (see the module's doc). Panics
/// under CI.
pub fn skip(test: &str, reason: &str) {
    if in_ci() {
        panic!("{test} cannot run ({reason}), and CI is set: in CI every test must run");
    }
    eprintln!("skipping {test}: {reason}");
    static SUMMARY: Once = Once::new();
    // SAFETY: `summary` is a plain function that only reads a static.
    SUMMARY.call_once(|| unsafe {
        libc::atexit(summary);
    });
    SKIPPED
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push((test.to_owned(), reason.to_owned()));
    if let Some(log) = std::env::var_os(LOG_ENV) {
        let line = format!("{}: {test}: {reason}\n", binary());
        let appended = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .and_then(|mut f| f.write_all(line.as_bytes()));
        if let Err(e) = appended {
            panic!("cannot record the skip of {test} in {log:?}: {e}");
        }
    }
}

/// Whether the environment says this is a CI run.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !matches!(v.as_str(), "" | "false" | "0"))
}

/// The skips recorded in the log file at `path` (none when it is missing):
/// one `<binary>: <test>: <reason>` line each.
pub fn read_log(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

/// (test, reason) of every skip in this process.
static SKIPPED: Mutex<Vec<(String, String)>> = Mutex::new(Vec::new());

/// The test binary's name without cargo's hash: `services`, `tern_lab`.
fn binary() -> String {
    let exe = std::env::current_exe().unwrap_or_default();
    let name = exe.file_stem().unwrap_or_default().to_string_lossy();
    match name.rsplit_once('-') {
        Some((stem, hash)) if hash.len() == 16 && hash.bytes().all(|b| b.is_ascii_hexdigit()) => {
            stem.to_owned()
        }
        _ => name.into_owned(),
    }
}

/// One line per reason, once the harness has printed its own summary.
extern "C" fn summary() {
    let skipped = SKIPPED.lock().unwrap_or_else(|e| e.into_inner());
    // No panic may leave an extern "C" function: write errors are ignored.
    let mut out = std::io::stdout();
    let _ = out.write_all(summary_lines(&binary(), &skipped).as_bytes());
    let _ = out.flush();
}

fn summary_lines(binary: &str, skipped: &[(String, String)]) -> String {
    let mut by_reason: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for (test, reason) in skipped {
        by_reason.entry(reason).or_default().push(test);
    }
    by_reason
        .iter()
        .map(|(reason, tests)| {
            format!(
                "SKIPPED {} test(s) of {binary}, shown as ok above ({reason}): {}\n",
                tests.len(),
                tests.join(", ")
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_names_the_skipped_tests_by_reason() {
        let skipped = [
            ("a".to_owned(), "needs root".to_owned()),
            ("b".to_owned(), "no tool".to_owned()),
            ("c".to_owned(), "needs root".to_owned()),
        ];
        assert_eq!(
            summary_lines("services", &skipped),
            "SKIPPED 2 test(s) of services, shown as ok above (needs root): a, c\n\
             SKIPPED 1 test(s) of services, shown as ok above (no tool): b\n"
        );
        assert_eq!(summary_lines("services", &[]), "");
    }
}
