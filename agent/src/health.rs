//! The health and metrics endpoint (HTTP/1.1): `/healthz` (the agent
//! serves and its state is not wedged: the liveness probe), `/readyz` (the
//! first sync from the source is in the datapath and the node has a
//! PodCIDR: the readiness probe), `/metrics` (Prometheus).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tracing::{debug, warn};

use crate::metrics::Metrics;
use crate::node::Node;

/// Where the endpoint listens unless configured: loopback on the host
/// network, so only the node (and the kubelet's probes) reach it.
pub const DEFAULT_ADDRESS: &str = "127.0.0.1:9876";

/// How long a probe waits for the agent's state before calling it wedged.
const STATE_TIMEOUT: Duration = Duration::from_secs(5);

/// OpenMetrics, which prometheus-client writes (Prometheus reads it).
const METRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

pub async fn bind(address: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(address)
        .await
        .with_context(|| format!("binding the health endpoint on {address}"))
}

pub async fn serve(listener: TcpListener, node: Arc<Mutex<Node>>, metrics: Arc<Metrics>) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                warn!("accept on the health endpoint failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let node = node.clone();
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request| {
                respond(request, node.clone(), metrics.clone())
            });
            let connection = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service);
            if let Err(e) = connection.await {
                debug!("health endpoint connection: {e}");
            }
        });
    }
}

async fn respond(
    request: Request<Incoming>,
    node: Arc<Mutex<Node>>,
    metrics: Arc<Metrics>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    if request.method() != Method::GET && request.method() != Method::HEAD {
        return Ok(text(StatusCode::METHOD_NOT_ALLOWED, "only GET\n".into()));
    }
    let path = request.uri().path().to_owned();
    let response = match path.as_str() {
        "/healthz" => match with_node(node, |_| ()).await {
            Some(()) => text(StatusCode::OK, "ok\n".into()),
            None => text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("agent state held for over {STATE_TIMEOUT:?}\n"),
            ),
        },
        "/readyz" => match with_node(node, |n| n.status()).await {
            None => text(StatusCode::SERVICE_UNAVAILABLE, "agent state held\n".into()),
            Some(status) if !status.synced => text(
                StatusCode::SERVICE_UNAVAILABLE,
                "waiting for the first full sync from the source\n".into(),
            ),
            Some(status) if !status.ready => text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("{}\n", status.reason.unwrap_or_default()),
            ),
            Some(_) => text(StatusCode::OK, "ok\n".into()),
        },
        "/metrics" => match with_node(node, move |n| metrics.render(n)).await {
            Some(body) => {
                let mut response = text(StatusCode::OK, body);
                response.headers_mut().insert(
                    hyper::header::CONTENT_TYPE,
                    hyper::header::HeaderValue::from_static(METRICS_CONTENT_TYPE),
                );
                response
            }
            None => text(StatusCode::SERVICE_UNAVAILABLE, "agent state held\n".into()),
        },
        _ => text(
            StatusCode::NOT_FOUND,
            "not found: /healthz, /readyz or /metrics\n".into(),
        ),
    };
    Ok(response)
}

/// Runs `read` on the node state off the async workers; `None` when the
/// state stays locked past the timeout (a wedged agent).
async fn with_node<T: Send + 'static>(
    node: Arc<Mutex<Node>>,
    read: impl FnOnce(&Node) -> T + Send + 'static,
) -> Option<T> {
    let task = tokio::task::spawn_blocking(move || {
        let node = node.lock().unwrap_or_else(|p| p.into_inner());
        read(&node)
    });
    tokio::time::timeout(STATE_TIMEOUT, task).await.ok()?.ok()
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response
}
