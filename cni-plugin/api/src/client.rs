//! The blocking client: one request, one response, on a fresh connection.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use crate::protocol::{Request, Response};

/// Why a call to the agent failed; the plugin maps these to CNI codes.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// The agent is not there (socket missing, refused, timed out).
    #[error("cannot reach the tern agent at {path}: {source}")]
    Unreachable {
        path: String,
        source: std::io::Error,
    },
    /// The agent answered with something that is not a response.
    #[error("the tern agent sent an answer that is not understood: {0}")]
    Protocol(String),
}

/// Sends one request and waits for its response.
pub fn call(socket: &Path, request: &Request, timeout: Duration) -> Result<Response, CallError> {
    let unreachable = |source| CallError::Unreachable {
        path: socket.display().to_string(),
        source,
    };
    let mut stream = UnixStream::connect(socket).map_err(unreachable)?;
    stream
        .set_read_timeout(Some(timeout))
        .map_err(unreachable)?;
    stream
        .set_write_timeout(Some(timeout))
        .map_err(unreachable)?;
    let mut line = serde_json::to_vec(request).map_err(|e| CallError::Protocol(e.to_string()))?;
    line.push(b'\n');
    stream.write_all(&line).map_err(unreachable)?;
    let mut answer = String::new();
    BufReader::new(&stream)
        .read_line(&mut answer)
        .map_err(unreachable)?;
    if answer.is_empty() {
        return Err(CallError::Protocol(
            "connection closed without an answer".into(),
        ));
    }
    serde_json::from_str(&answer).map_err(|e| CallError::Protocol(e.to_string()))
}

/// Sends one request whose answer is many responses, one per line, and
/// hands each to `each` until the agent closes the stream or `each`
/// breaks. `idle`: how long a line may take (`None`: forever, for
/// streams that wait on events).
pub fn stream(
    socket: &Path,
    request: &Request,
    idle: Option<Duration>,
    mut each: impl FnMut(Response) -> std::ops::ControlFlow<()>,
) -> Result<(), CallError> {
    let unreachable = |source| CallError::Unreachable {
        path: socket.display().to_string(),
        source,
    };
    let mut stream = UnixStream::connect(socket).map_err(unreachable)?;
    stream.set_read_timeout(idle).map_err(unreachable)?;
    let mut line = serde_json::to_vec(request).map_err(|e| CallError::Protocol(e.to_string()))?;
    line.push(b'\n');
    stream.write_all(&line).map_err(unreachable)?;
    for answer in BufReader::new(&stream).lines() {
        let answer = answer.map_err(unreachable)?;
        let response =
            serde_json::from_str(&answer).map_err(|e| CallError::Protocol(e.to_string()))?;
        if each(response).is_break() {
            break;
        }
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn unreachable_socket_is_reported_as_such() {
        let err = call(
            Path::new("/nonexistent/tern-test.sock"),
            &Request::Status,
            Duration::from_millis(100),
        )
        .unwrap_err();
        assert!(matches!(err, CallError::Unreachable { .. }), "{err}");
    }
}
