//! The Kubernetes source against a stand-in API server speaking the real
//! list/watch protocol: after a sequence of events (adds, updates, deletes,
//! a bookmark, watches cut, a 410 Gone re-list, a period of errors) the
//! source's snapshot, and the datapath state compiled from it, equal what
//! the final objects give when read directly.

// Tests: a failed unwrap or expect is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::Ipv4Addr;
use std::time::Duration;

use serde_json::{Value, json};
use tern_agent::compiler::lb::{self, NodeContext};
use tern_agent::model::LbAlgorithm;

use tern_agent::sources::{LoadReport, Rejection, kube, manifests};
use tern_lab::apiserver::ApiServer;
use tokio::sync::mpsc;

const NODE: &str = "n1";

fn node(name: &str, cidr: &str, ip: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": name},
        "spec": {"podCIDR": cidr, "podCIDRs": [cidr]},
        "status": {"addresses": [{"type": "InternalIP", "address": ip},
                                 {"type": "Hostname", "address": name}]}})
}

fn namespace(name: &str, lb_algorithm: Option<&str>) -> Value {
    let annotations = match lb_algorithm {
        Some(a) => json!({"tern.io/lb-algorithm": a}),
        None => json!({}),
    };
    json!({"apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": name, "annotations": annotations},
        "status": {"phase": "Active"}})
}

fn service(name: &str, cluster_ip: &str, port: u16, target: u16) -> Value {
    json!({"apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"type": "ClusterIP", "clusterIP": cluster_ip, "clusterIPs": [cluster_ip],
                 "ipFamilies": ["IPv4"], "ipFamilyPolicy": "SingleStack",
                 "sessionAffinity": "None", "internalTrafficPolicy": "Cluster",
                 "selector": {"app": name},
                 "ports": [{"name": "http", "protocol": "TCP", "port": port,
                            "targetPort": target}]},
        "status": {"loadBalancer": {}}})
}

fn slice(service: &str, suffix: &str, port: u16, addresses: &[&str]) -> Value {
    let endpoints: Vec<Value> = addresses
        .iter()
        .map(|a| {
            json!({"addresses": [a], "nodeName": NODE,
                "conditions": {"ready": true, "serving": true, "terminating": false}})
        })
        .collect();
    json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": format!("{service}-{suffix}"), "namespace": "default",
                     "labels": {"kubernetes.io/service-name": service,
                                "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io"}},
        "addressType": "IPv4",
        "endpoints": endpoints,
        "ports": [{"name": "http", "protocol": "TCP", "port": port}]})
}

fn pod(name: &str, node: &str, ip: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"nodeName": node, "containers": [{"name": "c", "image": "nginx"}]},
        "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}})
}

fn policy(name: &str, port: u16) -> Value {
    json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"podSelector": {"matchLabels": {"app": "web"}},
                 "policyTypes": ["Ingress"],
                 "ingress": [{"from": [{"podSelector": {}}],
                              "ports": [{"protocol": "TCP", "port": port}]}]}})
}

fn context() -> NodeContext {
    NodeContext {
        node_name: NODE.into(),
        node_ips: vec![Ipv4Addr::new(10, 0, 0, 1)],
        maglev_table_size: 251,
        default_algorithm: LbAlgorithm::Random,
        service_cidr: None,
    }
}

/// What the final objects give read directly (the manifest source's path).
fn expected(server: &ApiServer) -> LoadReport {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("all.json"), server.objects().to_string()).unwrap();
    let mut report = manifests::load_dir(dir.path());
    report.ignored = 0;
    report
}

/// The source's snapshots, and the latest one.
struct Snapshots {
    rx: mpsc::Receiver<LoadReport>,
    latest: LoadReport,
}

fn matches(report: &LoadReport, want: &LoadReport) -> bool {
    report.cluster == want.cluster && same_errors(&report.errors, &want.errors)
}

/// The manifest source puts the file and place before the same message;
/// the kind and reason are the same either way.
fn same_errors(got: &[Rejection], want: &[Rejection]) -> bool {
    got.len() == want.len()
        && got.iter().zip(want).all(|(g, w)| {
            w.message.ends_with(g.message.as_str()) && (g.kind, g.reason) == (w.kind, w.reason)
        })
}

/// Waits for a snapshot equal to `want`, returning the last one.
async fn settle(snapshots: &mut Snapshots, want: &LoadReport) -> LoadReport {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !matches(&snapshots.latest, want) {
        match tokio::time::timeout_at(deadline, snapshots.rx.recv()).await {
            Ok(Some(report)) => snapshots.latest = report,
            _ => break,
        }
    }
    let last = LoadReport {
        cluster: snapshots.latest.cluster.clone(),
        errors: snapshots.latest.errors.clone(),
        warnings: snapshots.latest.warnings.clone(),
        ignored: snapshots.latest.ignored,
    };
    assert_eq!(
        last.cluster, want.cluster,
        "the source's view never matched the objects"
    );
    assert!(
        same_errors(&last.errors, &want.errors),
        "{:?} vs {:?}",
        last.errors,
        want.errors
    );
    // The datapath state: the same frontends and backends either way.
    assert_eq!(
        lb::compile(&last.cluster, &context()),
        lb::compile(&want.cluster, &context())
    );
    last
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_follows_the_api_through_relists_bookmarks_and_errors() {
    let server = ApiServer::start().await.unwrap();
    for object in [
        node(NODE, "10.244.1.0/24", "10.0.0.1"),
        node("n2", "10.244.2.0/24", "10.0.0.2"),
        namespace("default", None),
        service("web", "10.96.0.10", 80, 8080),
        slice("web", "a", 8080, &["10.244.1.5", "10.244.2.7"]),
        pod("web-1", NODE, "10.244.1.5"),
        pod("web-2", "n2", "10.244.2.7"),
        policy("web-ingress", 8080),
    ] {
        server.apply(object);
    }
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(&kubeconfig, server.kubeconfig()).unwrap();
    let client = kube::client(Some(&kubeconfig), None).await.unwrap();
    let errors = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = errors.clone();
    let (tx, mut rx) = mpsc::channel(1);
    tokio::spawn(kube::watch(client, NODE.into(), tx, move || {
        counted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }));

    // The first snapshot is whole: the Service comes with its slice.
    let first = tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("no first sync")
        .unwrap();
    assert_eq!(first.cluster.services.len(), 1);
    assert_eq!(first.cluster.slices.len(), 1, "{:?}", first.cluster);
    assert_eq!(first.cluster.nodes.len(), 2);
    // Every pod of the cluster (policy needs each peer), and the policies.
    let pods: Vec<_> = first.cluster.pods.keys().map(|(_, n)| n.as_str()).collect();
    assert_eq!(pods, ["web-1", "web-2"]);
    assert_eq!(
        first.cluster.pods[&("default".into(), "web-2".into())]
            .node
            .as_deref(),
        Some("n2")
    );
    assert_eq!(first.cluster.network_policies.len(), 1);
    let mut rx = Snapshots { rx, latest: first };
    settle(&mut rx, &expected(&server)).await;

    // Watch events: a new Service with its slice, a changed slice, a
    // namespace default, a bad Service, a changed and a new policy.
    server.apply(service("api", "10.96.0.11", 443, 8443));
    server.apply(policy("web-ingress", 9090));
    server.apply(policy("api-ingress", 8443));
    server.apply(slice("api", "x", 8443, &["10.244.1.9"]));
    server.apply(slice("web", "a", 8080, &["10.244.2.7"]));
    server.apply(namespace("default", Some("maglev")));
    let mut bad = service("bad", "10.96.0.12", 80, 80);
    bad["spec"]["type"] = json!("Weird");
    server.apply(bad.clone());
    let want = expected(&server);
    assert_eq!(want.errors.len(), 1, "{:?}", want.errors);
    let after_events = settle(&mut rx, &want).await;
    let compiled = lb::compile(&after_events.cluster, &context());
    assert!(
        compiled
            .frontends
            .values()
            .all(|f| f.algorithm == LbAlgorithm::Maglev),
        "the namespace's annotation is every Service's default"
    );

    // A bookmark, then the watches end: each comes back from the
    // bookmark's resourceVersion, with no re-list.
    let lists_before = server.requests().iter().filter(|r| !r.is_watch()).count();
    let bookmark = server.bookmark();
    tokio::time::sleep(Duration::from_millis(200)).await;
    server.close_watches();
    server.apply(pod("web-3", NODE, "10.244.1.10"));
    server.delete(&bad);
    let want = expected(&server);
    let snapshot = settle(&mut rx, &want).await;
    assert!(snapshot.cluster.pods.keys().any(|(_, n)| n == "web-3"));
    let requests = server.requests();
    assert!(
        requests
            .iter()
            .any(|r| r.is_watch() && r.query.get("resourceVersion") == Some(&bookmark.to_string())),
        "no watch resumed from the bookmark {bookmark}: {requests:?}"
    );
    assert_eq!(
        requests.iter().filter(|r| !r.is_watch()).count(),
        lists_before,
        "resuming a watch must not list again"
    );

    // The server fails every request for 2 s, and meanwhile a Service and
    // its slice go, a node comes, and the history is compacted: the
    // watchers back off (no busy loop), count the errors, then resume from
    // expired resourceVersions, get 410 Gone, list every kind again and
    // see all that happened.
    let before = server.requests().len();
    server.fail_for(Duration::from_secs(2));
    server.delete(&service("api", "10.96.0.11", 443, 8443));
    server.delete(&slice("api", "x", 8443, &[]));
    server.apply(node("n3", "10.244.3.0/24", "10.0.0.3"));
    server.write_elsewhere();
    server.compact();
    let want = expected(&server);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let failed = server.requests().len() - before;
    // The back-off doubles from 100 ms to at most 800 ms: a watcher tries
    // at most about 7 times in 2 s (a busy loop would try hundreds).
    assert!(
        failed <= 6 * 8,
        "{failed} requests in 2 s of errors from 6 watchers: no back-off"
    );
    assert!(errors.load(std::sync::atomic::Ordering::Relaxed) > 0);
    settle(&mut rx, &want).await;
    // Lists that found nothing new changed nothing: wait for them too.
    let relisted = |path: &str, requests: &[tern_lab::apiserver::Logged]| {
        let gone = requests
            .iter()
            .position(|r| r.path == path && r.status == 410);
        gone.is_some_and(|gone| {
            requests[gone..]
                .iter()
                .any(|r| r.path == path && !r.is_watch() && r.status == 200)
        })
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        let requests = server.requests().split_off(before);
        let pending: Vec<&str> = tern_lab::apiserver::RESOURCES
            .iter()
            .map(|(path, _, _)| *path)
            .filter(|path| !relisted(path, &requests))
            .collect();
        if pending.is_empty() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no 410 Gone and re-list for {pending:?}: {requests:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // And plain watch events flow again.
    server.apply(slice(
        "web",
        "a",
        8080,
        &["10.244.1.5", "10.244.2.7", "10.244.2.8"],
    ));
    settle(&mut rx, &expected(&server)).await;
}

/// Hostile and broken objects from the API, lists cut off mid-body and
/// objects arriving in every order: each bad object is left out on its own
/// with its kind and reason, a frontend claimed twice goes to the oldest
/// Service, and every other object works, the same as read directly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_objects_and_broken_lists_cost_only_themselves() {
    use tern_agent::compiler::lb::{Frontend, Scope};
    use tern_agent::model::Protocol;
    use tern_agent::sources::RejectReason;

    let server = ApiServer::start().await.unwrap();
    // Every list of the first round breaks off halfway: the watchers retry.
    server.break_lists(6);
    // A slice before its Service, and an FQDN slice and one with IPv6 in
    // an IPv4 slice, a Service with a port twice and one with port 0.
    server.apply(slice("late", "a", 8080, &["10.244.1.20"]));
    let mut fqdn = slice("web", "fqdn", 8080, &["db.example.com"]);
    fqdn["addressType"] = json!("FQDN");
    server.apply(fqdn);
    server.apply(slice("web", "v6", 8080, &["fd00::5"]));
    server.apply(slice("web", "bad", 8080, &["10.244.1.300"]));
    server.apply(node(NODE, "10.244.1.0/24", "10.0.0.1"));
    server.apply(namespace("default", None));
    let mut twice = service("twice", "10.96.0.20", 80, 8080);
    twice["spec"]["ports"] = json!([{"name": "a", "protocol": "TCP", "port": 80},
                                     {"name": "b", "protocol": "TCP", "port": 80}]);
    server.apply(twice);
    let mut zero = service("zero", "10.96.0.21", 80, 8080);
    zero["spec"]["ports"][0]["port"] = json!(0);
    server.apply(zero);
    // Two NodePort Services on 30080: the older (created first) keeps it,
    // though its name sorts last; web itself is fine.
    let node_port = |name: &str, ip: &str, created: &str| {
        let mut s = service(name, ip, 80, 8080);
        s["spec"]["type"] = json!("NodePort");
        s["spec"]["ports"][0]["nodePort"] = json!(30080);
        s["metadata"]["creationTimestamp"] = json!(created);
        s
    };
    server.apply(node_port("zz-old", "10.96.0.30", "2024-01-01T00:00:00Z"));
    server.apply(node_port("aa-new", "10.96.0.31", "2025-01-01T00:00:00Z"));
    server.apply(service("web", "10.96.0.10", 80, 8080));
    server.apply(slice("web", "a", 8080, &["10.244.1.5"]));

    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(&kubeconfig, server.kubeconfig()).unwrap();
    let client = kube::client(Some(&kubeconfig), None).await.unwrap();
    let (tx, rx) = mpsc::channel(1);
    tokio::spawn(kube::watch(client, NODE.into(), tx, || {}));
    let mut rx = Snapshots {
        rx,
        latest: LoadReport::default(),
    };
    let first = settle(&mut rx, &expected(&server)).await;
    assert!(
        server.requests().iter().any(|r| r.status == 599),
        "no list was cut"
    );
    let mut rejected: Vec<(&str, RejectReason)> =
        first.errors.iter().map(|e| (e.kind, e.reason)).collect();
    rejected.sort();
    assert_eq!(
        rejected,
        [
            ("EndpointSlice", RejectReason::InvalidAddress),
            ("EndpointSlice", RejectReason::InvalidAddress),
            ("Service", RejectReason::InvalidPort),
            ("Service", RejectReason::DuplicatePort),
        ],
        "{:#?}",
        first.errors
    );
    assert!(
        first
            .errors
            .iter()
            .any(|e| e.message.contains("Service default/zero"))
    );
    let names: Vec<&str> = first.cluster.services.keys().map(|k| &*k.name).collect();
    assert_eq!(names, ["aa-new", "web", "zz-old"]);
    let state = lb::compile(&first.cluster, &context());
    let frontend = |ip: [u8; 4], port| Frontend {
        ip: Ipv4Addr::from(ip),
        port,
        protocol: Protocol::Tcp,
        scope: Scope::External,
    };
    let web = &state.frontends[&frontend([10, 96, 0, 10], 80)];
    assert_eq!(web.backends.len(), 1, "the bad slices cost web nothing");
    let owner = &state.frontends[&frontend([10, 0, 0, 1], 30080)];
    assert_eq!(&*owner.service.name, "zz-old");
    assert_eq!(state.conflicts.len(), 1, "{:?}", state.conflicts);
    assert_eq!(&*state.conflicts[0].service.name, "aa-new");
    assert!(state.frontends.contains_key(&frontend([10, 96, 0, 31], 80)));

    // The Service of the early slice arrives: it has its backend at once.
    server.apply(service("late", "10.96.0.40", 80, 8080));
    let now = settle(&mut rx, &expected(&server)).await;
    let state = lb::compile(&now.cluster, &context());
    assert_eq!(
        state.frontends[&frontend([10, 96, 0, 40], 80)]
            .backends
            .len(),
        1
    );
    // The older NodePort Service goes: the other takes its port over;
    // web's Service is deleted before its slices, with nothing left behind.
    server.delete(&node_port("zz-old", "10.96.0.30", "2024-01-01T00:00:00Z"));
    server.delete(&service("web", "10.96.0.10", 80, 8080));
    let now = settle(&mut rx, &expected(&server)).await;
    let state = lb::compile(&now.cluster, &context());
    assert_eq!(
        &*state.frontends[&frontend([10, 0, 0, 1], 30080)]
            .service
            .name,
        "aa-new"
    );
    assert!(state.conflicts.is_empty());
    assert!(!state.frontends.contains_key(&frontend([10, 96, 0, 10], 80)));
    // A broken slice fixed: the rejection goes, the backend comes.
    server.apply(slice("web", "bad", 8080, &["10.244.1.30"]));
    server.break_lists(1);
    server.close_watches();
    let now = settle(&mut rx, &expected(&server)).await;
    assert_eq!(now.errors.len(), 3, "{:#?}", now.errors);
}
