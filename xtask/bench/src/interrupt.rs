//! Ctrl-C (SIGINT) and SIGTERM during a run end it like an error does.
//!
//! The handler only sets a flag. The code that waits — a tool running
//! ([`super::tools`]), a server coming up, the agent syncing Services, the
//! loop over repetitions — checks it with [`check`], stops the process it
//! started (by its guard) and returns an error. The stack then unwinds
//! through the same guards as for any failure: tools and agents stopped,
//! namespaces, pins, cgroups and temp dirs removed; then `cargo xtask`
//! exits non-zero.
//!
//! A process that was not started under a guard and ignores the signal
//! (e.g. a long `nft -f` when only this process was signalled; Ctrl-C in a
//! terminal signals the whole foreground process group) is waited for:
//! the run stops at the next check after it.

use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, Result, bail};
use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal, sigaction};

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    // Only async-signal-safe work here: an atomic swap and write(2).
    if !INTERRUPTED.swap(true, Ordering::SeqCst) {
        const MSG: &[u8] = b"\nbench: interrupted, stopping and cleaning up\n";
        // SAFETY: write(2) on stderr with a static buffer.
        let _ = unsafe { libc::write(libc::STDERR_FILENO, MSG.as_ptr().cast(), MSG.len()) };
    }
}

/// Installs the handler for SIGINT and SIGTERM (for the rest of the
/// process; a child gets the default disposition back when it execs).
pub fn install() -> Result<()> {
    let action = SigAction::new(
        SigHandler::Handler(on_signal),
        // Interrupted system calls resume: waits are polled, not woken.
        SaFlags::SA_RESTART,
        SigSet::empty(),
    );
    for signal in [Signal::SIGINT, Signal::SIGTERM] {
        // SAFETY: the handler only touches an atomic and calls write(2).
        unsafe { sigaction(signal, &action) }
            .with_context(|| format!("installing the {signal} handler"))?;
    }
    Ok(())
}

/// Whether SIGINT or SIGTERM has arrived.
pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

/// An error once SIGINT or SIGTERM has arrived.
pub fn check() -> Result<()> {
    if interrupted() {
        bail!("interrupted (SIGINT or SIGTERM)");
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn flag_turns_checks_into_errors() {
        // Other tests of this binary poll the flag: set it only in a child
        // process, which re-runs this test with the variable set.
        if std::env::var_os("TERN_INTERRUPT_CHILD").is_none() {
            let exe = std::env::current_exe().unwrap();
            let status = std::process::Command::new(exe)
                .args([
                    "--exact",
                    "bench::interrupt::tests::flag_turns_checks_into_errors",
                ])
                .env("TERN_INTERRUPT_CHILD", "1")
                .status()
                .unwrap();
            assert!(status.success());
            return;
        }
        install().unwrap();
        assert!(check().is_ok());
        nix::sys::signal::raise(Signal::SIGINT).unwrap();
        // Still running: the handler only set the flag.
        assert!(interrupted());
        let err = check().unwrap_err().to_string();
        assert!(err.contains("interrupted"), "{err}");
    }
}
