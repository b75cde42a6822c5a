//! The CNI API: a unix socket where `tern-cni` (and the `tern` CLI) send one
//! JSON request per connection. Connections are served concurrently:
//! endpoint requests go to the endpoint manager (requests for different
//! pods do not wait on each other), status and listings are read from
//! snapshots.

use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use tern_api::{Request, Response};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tracing::{debug, warn};

use crate::endpoints::EndpointManager;
use crate::flows::FlowHub;
use crate::metrics::Metrics;
use crate::status::StatusView;

/// Largest request accepted; a GC list of thousands of pods fits easily.
const MAX_REQUEST_BYTES: u64 = 4 << 20;

pub fn bind(path: &Path) -> anyhow::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    // A socket file left by a previous run would make bind fail.
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("removing stale {}", path.display())),
    }
    let listener =
        UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?;
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    Ok(listener)
}

/// Who answers the requests.
#[derive(Clone)]
pub struct Handlers {
    pub endpoints: Arc<EndpointManager>,
    pub status: StatusView,
    pub flows: FlowHub,
}

impl Handlers {
    fn handle(&self, request: Request) -> Response {
        let result = match request {
            Request::Allocate { attachment } => self.endpoints.allocate(&attachment),
            Request::Release { attachment } => self.endpoints.release(&attachment),
            Request::EndpointCreate { endpoint } => self.endpoints.create(endpoint),
            Request::EndpointDelete { attachment } => self.endpoints.delete(&attachment),
            Request::Gc { valid } => self.endpoints.gc(&valid),
            Request::ListEndpoints => self.endpoints.list(),
            Request::Status => Ok(Response::Status(Box::new(self.status.agent_status()))),
            Request::ListServices => Ok(self.status.services()),
            Request::ListPolicies => Ok(self.status.policies()),
            Request::ExplainPolicy {
                from,
                to,
                protocol,
                port,
            } => Ok(self.status.explain_policy(from, to, protocol, port)),
            // Streamed by `serve_one`, never answered here.
            Request::Observe { .. } => Ok(Response::Error {
                message: "observe is a stream".into(),
                try_again: false,
            }),
        };
        result.unwrap_or_else(|e| Response::Error {
            message: format!("{e:#}"),
            try_again: false,
        })
    }
}

pub async fn serve(listener: UnixListener, handlers: Handlers) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                tokio::spawn(serve_one(stream, handlers.clone()));
            }
            Err(e) => {
                warn!("accept on the CNI socket failed: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}

async fn serve_one(stream: UnixStream, handlers: Handlers) {
    let metrics: Arc<Metrics> = handlers.status.metrics.clone();
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    let mut reader = BufReader::new(read.take(MAX_REQUEST_BYTES));
    let response = match reader.read_line(&mut line).await {
        Ok(0) => return,
        Ok(_) => match serde_json::from_str::<Request>(&line) {
            Ok(Request::Observe {
                filter,
                last,
                follow,
            }) => {
                let flows = handlers.flows.clone();
                return crate::flows::observe::serve(reader, write, flows, filter, last, follow)
                    .await;
            }
            Ok(request) => {
                debug!(?request, "request");
                let op = request.op();
                let started = std::time::Instant::now();
                // Handlers do netlink and map syscalls: off the async workers.
                let handled = tokio::task::spawn_blocking(move || handlers.handle(request)).await;
                let response = handled.unwrap_or_else(|e| Response::Error {
                    message: format!("internal error: {e}"),
                    try_again: true,
                });
                let ok = !matches!(response, Response::Error { .. });
                metrics.record_cni_request(op, ok, started.elapsed());
                response
            }
            Err(e) => Response::Error {
                message: format!("request not understood: {e}"),
                try_again: false,
            },
        },
        Err(e) => {
            warn!("reading a request failed: {e}");
            return;
        }
    };
    if let Response::Error { message, .. } = &response {
        warn!("request failed: {message}");
    }
    let mut bytes = match serde_json::to_vec(&response) {
        Ok(bytes) => bytes,
        Err(e) => {
            // The client sees the connection close without an answer.
            warn!("encoding a response failed: {e}");
            return;
        }
    };
    bytes.push(b'\n');
    if let Err(e) = write.write_all(&bytes).await {
        warn!("writing a response failed: {e}");
    }
}
