//! A stand-in for the Kubernetes API server that speaks the real list and
//! watch protocol for the kinds Tern reads: lists carry the collection's
//! resourceVersion; a watch (`?watch=true&resourceVersion=N`) streams the
//! events after N as newline-separated JSON over a chunked response, with
//! BOOKMARK events when asked for; a watch from a compacted resourceVersion
//! gets an ERROR event with a 410 Gone Status, as the real server sends.
//! Tests drive it: apply and delete objects, send bookmarks, close open
//! watches, compact the history, make requests fail for a while.

// Serves tests only: a broken invariant here is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Bytes, Frame, Incoming};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::sync::mpsc;

/// The collections served: (URL path, kind, apiVersion).
pub const RESOURCES: &[(&str, &str, &str)] = &[
    ("/api/v1/nodes", "Node", "v1"),
    ("/api/v1/namespaces", "Namespace", "v1"),
    ("/api/v1/services", "Service", "v1"),
    ("/api/v1/pods", "Pod", "v1"),
    (
        "/apis/discovery.k8s.io/v1/endpointslices",
        "EndpointSlice",
        "discovery.k8s.io/v1",
    ),
    (
        "/apis/networking.k8s.io/v1/networkpolicies",
        "NetworkPolicy",
        "networking.k8s.io/v1",
    ),
];

/// One request as received: path and query.
#[derive(Debug, Clone)]
pub struct Logged {
    pub path: String,
    pub query: BTreeMap<String, String>,
    pub status: u16,
}

impl Logged {
    pub fn is_watch(&self) -> bool {
        self.query
            .get("watch")
            .is_some_and(|w| w == "true" || w == "1")
    }
}

struct Watch {
    path: String,
    field_selector: Option<String>,
    tx: mpsc::UnboundedSender<Bytes>,
}

#[derive(Default)]
struct State {
    resource_version: u64,
    /// By (path, namespace, name).
    objects: BTreeMap<(String, String, String), Value>,
    /// Every event: (resourceVersion, path, type, object).
    history: Vec<(u64, String, &'static str, Value)>,
    /// Watches from below this resourceVersion get 410 Gone.
    compacted_to: u64,
    watches: Vec<Watch>,
    failing_until: Option<Instant>,
    /// Set by [`ApiServer::down_for`] until the accept loop takes it.
    down_until: Option<Instant>,
    /// Lists still to be cut off halfway (the connection lost mid-list).
    broken_lists: usize,
    log: Vec<Logged>,
}

#[derive(Clone)]
pub struct ApiServer {
    pub address: SocketAddr,
    state: Arc<Mutex<State>>,
    /// Wakes the accept loop to go down for a while ([`ApiServer::down_for`]).
    down: Arc<tokio::sync::Notify>,
}

/// Accepts and serves connections until the runtime stops; goes down (port
/// closed, every connection cut) when told, and comes back on the same
/// address with the same objects, as a restarted server over its etcd.
async fn serve(mut listener: tokio::net::TcpListener, server: ApiServer) {
    let mut connections = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { return };
                while connections.try_join_next().is_some() {}
                // As Go's net/http (the real server): events go out at once,
                // not held back by Nagle's algorithm.
                let _ = stream.set_nodelay(true);
                let state = server.state.clone();
                connections.spawn(async move {
                    let service = hyper::service::service_fn(move |request| {
                        let state = state.clone();
                        async move { Ok::<_, Infallible>(respond(&state, request)) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
            () = server.down.notified() => {
                connections.abort_all();
                drop(listener);
                let until = server.lock().down_until.take();
                if let Some(until) = until {
                    tokio::time::sleep_until(until.into()).await;
                }
                listener = loop {
                    match tokio::net::TcpListener::bind(server.address).await {
                        Ok(listener) => break listener,
                        Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
                    }
                };
            }
        }
    }
}

impl ApiServer {
    /// Serves on 127.0.0.1 (an ephemeral port) of the calling thread's
    /// network namespace, inside the current tokio runtime.
    pub async fn start() -> std::io::Result<ApiServer> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let server = ApiServer {
            address: listener.local_addr()?,
            state: Arc::default(),
            down: Arc::default(),
        };
        tokio::spawn(serve(listener, server.clone()));
        Ok(server)
    }

    /// Serves from a thread of its own with its own runtime, after `enter`
    /// (e.g. setns into a lab namespace) ran on that thread; the server
    /// stops when the returned guard drops.
    pub fn spawn(enter: impl FnOnce() + Send + 'static) -> std::io::Result<(ApiServer, Running)> {
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            enter();
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(runtime) => runtime,
                Err(e) => return drop(ready_tx.send(Err(e))),
            };
            runtime.block_on(async move {
                let started = ApiServer::start().await;
                let ok = started.is_ok();
                let _ = ready_tx.send(started);
                if ok {
                    let _ = stop_rx.await;
                }
            });
        });
        let server = ready_rx
            .recv()
            .map_err(|_| std::io::Error::other("the API server thread died"))??;
        Ok((
            server,
            Running {
                stop: Some(stop_tx),
                thread: Some(thread),
            },
        ))
    }

    /// Serves inside the network namespace at `netns` (a lab node's, so
    /// its agent reaches it on the namespace's own loopback).
    pub fn spawn_in(netns: &std::path::Path) -> std::io::Result<(ApiServer, Running)> {
        let netns = std::fs::File::open(netns)?;
        ApiServer::spawn(move || {
            nix::sched::setns(netns, nix::sched::CloneFlags::CLONE_NEWNET)
                .expect("entering the namespace of the API server");
        })
    }

    /// Writes a kubeconfig for this server to `path`.
    pub fn write_kubeconfig(&self, path: &std::path::Path) -> std::io::Result<()> {
        std::fs::write(path, self.kubeconfig())
    }

    /// A kubeconfig file's text that points a client here (plain HTTP).
    pub fn kubeconfig(&self) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: http://{}\n\
             users:\n- name: fake\n  user:\n    token: fake\ncontexts:\n- name: fake\n  context:\n    \
             cluster: fake\n    user: fake\ncurrent-context: fake\n",
            self.address
        )
    }

    /// Creates or replaces an object (ADDED or MODIFIED), as `kubectl apply`.
    pub fn apply(&self, mut object: Value) {
        let mut state = self.lock();
        let path = path_of(&object);
        let key = key_of(&path, &object);
        state.resource_version += 1;
        let rv = state.resource_version;
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        let kind = if state.objects.contains_key(&key) {
            "MODIFIED"
        } else {
            "ADDED"
        };
        state.objects.insert(key, object.clone());
        state.publish(rv, path, kind, object);
    }

    /// Deletes an object (DELETED carries its last state); false if absent.
    pub fn delete(&self, object: &Value) -> bool {
        let mut state = self.lock();
        let path = path_of(object);
        let Some(mut last) = state.objects.remove(&key_of(&path, object)) else {
            return false;
        };
        state.resource_version += 1;
        let rv = state.resource_version;
        last["metadata"]["resourceVersion"] = json!(rv.to_string());
        state.publish(rv, path, "DELETED", last);
        true
    }

    /// Sends every open watch a BOOKMARK at the current resourceVersion;
    /// returns it.
    pub fn bookmark(&self) -> u64 {
        let mut state = self.lock();
        let rv = state.resource_version;
        state.watches.retain(|w| {
            let (_, kind, api_version) = resource(&w.path).expect("watched paths are known");
            let event = json!({"type": "BOOKMARK", "object": {
                "kind": kind, "apiVersion": api_version,
                "metadata": {"resourceVersion": rv.to_string()}}});
            w.tx.send(line(&event)).is_ok()
        });
        rv
    }

    /// Ends every open watch, as the server's watch timeout does; clients
    /// come back from the last resourceVersion they saw.
    pub fn close_watches(&self) {
        self.lock().watches.clear();
    }

    /// Forgets the history up to now: a watch from an older
    /// resourceVersion gets 410 Gone and has to list again.
    pub fn compact(&self) {
        let mut state = self.lock();
        state.compacted_to = state.resource_version + 1;
        state.history.clear();
    }

    /// A write to a kind nobody watches (a Lease, say): the
    /// resourceVersion moves on, so a later compaction expires every watch.
    pub fn write_elsewhere(&self) {
        self.lock().resource_version += 1;
    }

    /// Every request gets 500 for `period` (open watches are closed).
    pub fn fail_for(&self, period: Duration) {
        let mut state = self.lock();
        state.failing_until = Some(Instant::now() + period);
        state.watches.clear();
    }

    /// Gone for `period`: the port refuses connections and every open
    /// connection is cut, as when the server's process is down; then it
    /// serves again on the same address with the same objects.
    pub fn down_for(&self, period: Duration) {
        let mut state = self.lock();
        state.down_until = Some(Instant::now() + period);
        state.watches.clear();
        drop(state);
        self.down.notify_one();
    }

    /// The next `lists` list responses break off halfway through their
    /// body, as when the connection drops in the middle of a list.
    pub fn break_lists(&self, lists: usize) {
        self.lock().broken_lists = lists;
    }

    pub fn requests(&self) -> Vec<Logged> {
        self.lock().log.clone()
    }

    /// Every object now, as a `kind: List`: the final state a test
    /// compares against.
    pub fn objects(&self) -> Value {
        let items: Vec<Value> = self.lock().objects.values().cloned().collect();
        json!({"apiVersion": "v1", "kind": "List", "items": items})
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A server started by `ApiServer::spawn`; dropping it stops the server.
pub struct Running {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Running {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl State {
    fn publish(&mut self, rv: u64, path: String, kind: &'static str, object: Value) {
        let event = json!({"type": kind, "object": object});
        self.watches.retain(|w| {
            w.path != path || !selected(w.field_selector.as_deref(), &object) || {
                w.tx.send(line(&event)).is_ok()
            }
        });
        self.history.push((rv, path, kind, object));
    }
}

fn respond(
    state: &Mutex<State>,
    request: Request<Incoming>,
) -> Response<BoxBody<Bytes, Infallible>> {
    let path = request.uri().path().to_owned();
    let query: BTreeMap<String, String> =
        form_urlencoded::parse(request.uri().query().unwrap_or_default().as_bytes())
            .into_owned()
            .collect();
    let mut state = state.lock().unwrap_or_else(|p| p.into_inner());
    let mut logged = Logged {
        path: path.clone(),
        query: query.clone(),
        status: 200,
    };
    let failing = state
        .failing_until
        .is_some_and(|until| Instant::now() < until);
    let response = match resource(&path) {
        _ if failing => {
            logged.status = 500;
            status(500, "InternalError", "failing on purpose")
        }
        None => {
            logged.status = 404;
            status(
                404,
                "NotFound",
                "the server could not find the requested resource",
            )
        }
        Some((path, kind, api_version)) => {
            let selector = query.get("fieldSelector").cloned();
            if logged.is_watch() {
                let (response, code) =
                    watch(&mut state, path, selector, query.get("resourceVersion"));
                logged.status = code;
                response
            } else {
                let items: Vec<Value> = state
                    .objects
                    .iter()
                    .filter(|((p, _, _), o)| p == path && selected(selector.as_deref(), o))
                    .map(|(_, o)| {
                        // As the real server: list items leave their kind
                        // to the list's.
                        let mut item = o.clone();
                        if let Some(fields) = item.as_object_mut() {
                            fields.remove("kind");
                            fields.remove("apiVersion");
                        }
                        item
                    })
                    .collect();
                let list = json!({"kind": format!("{kind}List"), "apiVersion": api_version,
                    "metadata": {"resourceVersion": state.resource_version.to_string()},
                    "items": items});
                if state.broken_lists > 0 {
                    state.broken_lists -= 1;
                    logged.status = 599; // not an HTTP status: marks the cut
                    let text = list.to_string();
                    let half = Bytes::copy_from_slice(&text.as_bytes()[..text.len() / 2]);
                    Response::new(BodyExt::boxed(Full::new(half)))
                } else {
                    json_response(200, &list)
                }
            }
        }
    };
    state.log.push(logged);
    response
}

fn watch(
    state: &mut State,
    path: &str,
    field_selector: Option<String>,
    from: Option<&String>,
) -> (Response<BoxBody<Bytes, Infallible>>, u16) {
    let from: u64 = from.and_then(|rv| rv.parse().ok()).unwrap_or(0);
    let (tx, rx) = mpsc::unbounded_channel();
    let gone = from < state.compacted_to.saturating_sub(1);
    if gone {
        let gone = json!({"type": "ERROR", "object": {
            "kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Expired",
            "message": format!("too old resource version: {from} ({})", state.compacted_to),
            "code": 410}});
        let _ = tx.send(line(&gone));
        drop(tx); // the stream ends after the error
    } else {
        for (rv, p, kind, object) in &state.history {
            if *rv > from && p == path && selected(field_selector.as_deref(), object) {
                let _ = tx.send(line(&json!({"type": kind, "object": object})));
            }
        }
        state.watches.push(Watch {
            path: path.to_owned(),
            field_selector,
            tx,
        });
    }
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        let chunk = rx.recv().await?;
        Some((Ok::<_, Infallible>(Frame::data(chunk)), rx))
    });
    let mut response = Response::new(BodyExt::boxed(StreamBody::new(stream)));
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    // The HTTP status is 200 either way; the log notes the 410 inside.
    (response, if gone { 410 } else { 200 })
}

fn json_response(code: u16, body: &Value) -> Response<BoxBody<Bytes, Infallible>> {
    let mut response = Response::new(BodyExt::boxed(Full::new(Bytes::from(body.to_string()))));
    *response.status_mut() = StatusCode::from_u16(code).expect("valid status");
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    response
}

fn status(code: u16, reason: &str, message: &str) -> Response<BoxBody<Bytes, Infallible>> {
    json_response(
        code,
        &json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
            "reason": reason, "message": message, "code": code}),
    )
}

fn line(event: &Value) -> Bytes {
    let mut text = event.to_string();
    text.push('\n');
    Bytes::from(text)
}

fn resource(path: &str) -> Option<(&'static str, &'static str, &'static str)> {
    RESOURCES.iter().copied().find(|(p, _, _)| *p == path)
}

/// Where an object's collection is served.
fn path_of(object: &Value) -> String {
    let kind = object["kind"].as_str().unwrap_or_default();
    let (path, _, _) = RESOURCES
        .iter()
        .find(|(_, k, _)| *k == kind)
        .unwrap_or_else(|| panic!("the fake API server does not serve {kind}"));
    (*path).to_owned()
}

fn key_of(path: &str, object: &Value) -> (String, String, String) {
    let meta = &object["metadata"];
    let text = |v: &Value| v.as_str().unwrap_or_default().to_owned();
    (
        path.to_owned(),
        text(&meta["namespace"]),
        text(&meta["name"]),
    )
}

/// The one field selector Tern uses: `spec.nodeName=<node>`.
fn selected(selector: Option<&str>, object: &Value) -> bool {
    let Some((field, value)) = selector.and_then(|s| s.split_once('=')) else {
        return true;
    };
    let pointer = format!("/{}", field.replace('.', "/"));
    object.pointer(&pointer).and_then(Value::as_str) == Some(value)
}
