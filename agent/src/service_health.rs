//! kube-proxy's health endpoints, for load balancers in front of the
//! nodes. For every LoadBalancer Service with externalTrafficPolicy Local
//! and a `healthCheckNodePort`, an HTTP server on each node address
//! answers 200 with the count of this node's ready endpoints (503 with
//! none), so a cloud load balancer sends traffic only to nodes that have
//! one; and the node's proxy health (`/healthz`, `/livez`, kube-proxy's
//! port 10256). Both answer from snapshots: the source's last cluster and
//! the agent's status.

use std::collections::{BTreeMap, BTreeSet};
use std::convert::Infallible;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use crate::compiler::health::{HealthCheck, health_checks};
use crate::model::Cluster;
use crate::status::StatusView;

/// kube-proxy's default `--healthz-bind-address` port.
pub const PROXY_HEALTHZ_PORT: u16 = 10256;

type Checks = Arc<BTreeMap<u16, HealthCheck>>;

/// Keeps one server per healthCheckNodePort on every node address, in
/// step with the source's snapshots, until the snapshots end.
pub async fn run(
    mut cluster: watch::Receiver<Cluster>,
    node_name: String,
    node_ips: Vec<Ipv4Addr>,
    status: StatusView,
) {
    let checks = watch::Sender::new(Checks::default());
    let mut servers: BTreeMap<u16, Vec<JoinHandle<()>>> = BTreeMap::new();
    let mut reported = BTreeSet::new();
    loop {
        // A copy (O(1)): the sender is not held up while this computes.
        let snapshot = cluster.borrow_and_update().clone();
        let (now, problems) = health_checks(&snapshot, &node_name);
        // Each problem logged when it appears; only the current ones are
        // kept, so Services that come and go do not pile up here.
        let problems: BTreeSet<String> = problems.into_iter().collect();
        for problem in problems.difference(&reported) {
            warn!("{problem}");
        }
        reported = problems;
        servers.retain(|port, tasks| {
            let keep = now.contains_key(port);
            if !keep {
                info!(port, "health check node port closed");
                tasks.iter().for_each(JoinHandle::abort);
            }
            keep
        });
        for (port, check) in &now {
            if servers.contains_key(port) {
                continue;
            }
            let mut tasks = Vec::new();
            for ip in &node_ips {
                let address = SocketAddr::from((*ip, *port));
                match TcpListener::bind(address).await {
                    Ok(listener) => {
                        let checks = checks.subscribe();
                        let status = status.clone();
                        let port = *port;
                        tasks.push(tokio::spawn(serve(listener, move |_| {
                            service_answer(&checks.borrow(), port, &status)
                        })));
                    }
                    Err(e) => warn!(
                        service = %check.service,
                        %address,
                        "cannot serve the health check node port: {e}"
                    ),
                }
            }
            info!(service = %check.service, port, "health check node port open");
            servers.insert(*port, tasks);
        }
        checks.send_replace(Arc::new(now));
        if cluster.changed().await.is_err() {
            return;
        }
    }
}

/// kube-proxy's answer on a healthCheckNodePort.
fn service_answer(checks: &Checks, port: u16, status: &StatusView) -> Response<Full<Bytes>> {
    let Some(check) = checks.get(&port) else {
        return json_response(StatusCode::SERVICE_UNAVAILABLE, json!({}));
    };
    let healthy = proxy_healthy(status);
    let code = if check.local_endpoints > 0 && healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    json_response(
        code,
        json!({
            "service": {"namespace": check.service.namespace, "name": check.service.name},
            "localEndpoints": check.local_endpoints,
            "serviceProxyHealthy": healthy,
        }),
    )
}

/// The datapath serves what the source says: its first full snapshot is
/// in (always true without a source).
fn proxy_healthy(status: &StatusView) -> bool {
    !status.facts.source_syncs || status.services.borrow().last_sync_at.is_some()
}

/// The node's proxy health on `addresses` (kube-proxy's `/healthz` and
/// `/livez`): healthy once synced; `/healthz` also says whether the node
/// is eligible for load-balanced traffic (not being deleted).
pub async fn serve_proxy_health(
    addresses: Vec<SocketAddr>,
    node_name: String,
    cluster: watch::Receiver<Cluster>,
    status: StatusView,
) {
    for address in addresses {
        let listener = match TcpListener::bind(address).await {
            Ok(listener) => listener,
            Err(e) => {
                warn!(%address, "cannot serve the proxy health endpoint: {e}");
                continue;
            }
        };
        let (cluster, status, node_name) = (cluster.clone(), status.clone(), node_name.clone());
        tokio::spawn(serve(listener, move |path| {
            let eligible = !cluster
                .borrow()
                .nodes
                .get(&node_name)
                .is_some_and(|node| node.to_be_deleted);
            proxy_answer(path, proxy_healthy(&status), eligible)
        }));
    }
}

fn proxy_answer(path: &str, healthy: bool, eligible: bool) -> Response<Full<Bytes>> {
    let now = jiff::Timestamp::now().to_string();
    match path {
        "/healthz" => {
            let ok = healthy && eligible;
            json_response(
                if ok {
                    StatusCode::OK
                } else {
                    StatusCode::SERVICE_UNAVAILABLE
                },
                json!({"lastUpdated": now, "currentTime": now, "nodeEligible": eligible}),
            )
        }
        "/livez" => json_response(
            if healthy {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            },
            json!({"lastUpdated": now, "currentTime": now}),
        ),
        _ => {
            let mut response = Response::new(Full::new(Bytes::from("404 page not found\n")));
            *response.status_mut() = StatusCode::NOT_FOUND;
            response
        }
    }
}

fn json_response(code: StatusCode, body: serde_json::Value) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body.to_string())));
    *response.status_mut() = code;
    let headers = response.headers_mut();
    headers.insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    headers.insert(
        "x-content-type-options",
        hyper::header::HeaderValue::from_static("nosniff"),
    );
    response
}

/// HTTP/1.1 on `listener`, every request answered by `answer(path)`.
async fn serve<F>(listener: TcpListener, answer: F)
where
    F: Fn(&str) -> Response<Full<Bytes>> + Clone + Send + Sync + 'static,
{
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                warn!("accept on a health endpoint failed: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let answer = answer.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                let response = answer(request.uri().path());
                async move { Ok::<_, Infallible>(response) }
            });
            let connection = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service);
            if let Err(e) = connection.await {
                debug!("health endpoint connection: {e}");
            }
        });
    }
}
