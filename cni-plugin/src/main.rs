//! tern-cni: invoked by the container runtime with CNI_* variables and the
//! network configuration on stdin (CNI spec 1.1.0).
//!
//! Results and errors go to stdout as the spec's JSON (that is what runtimes
//! read); errors are also written to stderr, which runtimes keep in their log.

use std::io::{Read, Write};
use std::process::ExitCode;

use tern_cni::plugin;
use tern_cni_spec::{CniEnv, LATEST_VERSION, requested_version};

fn main() -> ExitCode {
    let mut stdin = Vec::new();
    let read = std::io::stdin().read_to_end(&mut stdin);
    let version = requested_version(&stdin).unwrap_or_else(|| LATEST_VERSION.to_owned());
    let outcome = match read {
        Err(e) => Err(tern_cni_spec::CniError::io_failure(format!(
            "reading stdin: {e}"
        ))),
        Ok(_) => CniEnv::from_process_env().and_then(|env| plugin::run(&env, &stdin)),
    };
    let mut stdout = std::io::stdout().lock();
    match outcome {
        Ok(output) => {
            if let Some(json) = output {
                let _ = writeln!(stdout, "{json}");
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            let json = e.to_json(&version);
            let _ = writeln!(stdout, "{json}");
            eprintln!("tern-cni: {}", json);
            ExitCode::FAILURE
        }
    }
}
