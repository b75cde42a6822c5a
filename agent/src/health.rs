//! The health and metrics endpoint (HTTP/1.1): `/healthz` (the agent
//! serves: the liveness probe), `/readyz` (the first sync from the source
//! is in the datapath and the node has a PodCIDR: the readiness probe),
//! `/metrics` (Prometheus). Answers come from the owners' snapshots and
//! the datapath's counters, never from a pipeline's lock.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tracing::{debug, warn};

use crate::datapath::Counters;
use crate::status::StatusView;

/// Where the endpoint listens unless configured: loopback on the host
/// network, so only the node (and the kubelet's probes) reach it.
pub const DEFAULT_ADDRESS: &str = "127.0.0.1:9876";

/// OpenMetrics, which prometheus-client writes (Prometheus reads it).
const METRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

pub async fn bind(address: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(address)
        .await
        .with_context(|| format!("binding the health endpoint on {address}"))
}

pub async fn serve(listener: TcpListener, status: StatusView, counters: Arc<Counters>) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                warn!("accept on the health endpoint failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let status = status.clone();
        let counters = counters.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request| {
                respond(request, status.clone(), counters.clone())
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
    status: StatusView,
    counters: Arc<Counters>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    if request.method() != Method::GET && request.method() != Method::HEAD {
        return Ok(text(StatusCode::METHOD_NOT_ALLOWED, "only GET\n".into()));
    }
    let response = match request.uri().path() {
        "/healthz" => text(StatusCode::OK, "ok\n".into()),
        "/readyz" => {
            let status = status.agent_status();
            if !status.synced {
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "waiting for the first full sync from the source\n".into(),
                )
            } else if !status.ready {
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("{}\n", status.reason.unwrap_or_default()),
                )
            } else {
                text(StatusCode::OK, "ok\n".into())
            }
        }
        "/metrics" => {
            let policies = status.policy.borrow().state.clone();
            let body = status.metrics.render(
                &status.agent_status(),
                counters.as_ref(),
                &policies.policies,
            );
            let mut response = text(StatusCode::OK, body);
            response.headers_mut().insert(
                hyper::header::CONTENT_TYPE,
                hyper::header::HeaderValue::from_static(METRICS_CONTENT_TYPE),
            );
            response
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "not found: /healthz, /readyz or /metrics\n".into(),
        ),
    };
    Ok(response)
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response
}
