//! The standalone source: a directory of ordinary Kubernetes manifests
//! (*.yaml, *.yml, *.json; several documents per file; `kind: List`), read
//! whole on every change. Tern's mode without an API server.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use k8s_openapi::api::core::v1 as core;
use k8s_openapi::api::discovery::v1 as discovery;
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::Value;
use tokio::sync::mpsc;

use super::Conversion;
use crate::model::Cluster;

pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_millis(500);

#[derive(Debug, Default, PartialEq)]
pub struct LoadReport {
    pub cluster: Cluster,
    /// One per rejected file or object: where it is and why.
    pub errors: Vec<String>,
    /// Objects used with parts left out (SCTP ports, IPv6 addresses).
    pub warnings: Vec<String>,
    /// Objects of other kinds, and ones that belong to another proxy.
    pub ignored: usize,
}

/// Loads every manifest file in `dir` (not its subdirectories), in name
/// order so duplicates always resolve the same way: the first one wins.
pub fn load_dir(dir: &Path) -> LoadReport {
    let mut report = LoadReport::default();
    match manifest_files(dir) {
        Ok(files) => {
            for file in files {
                load_file(&file, &mut report);
            }
        }
        Err(e) => report
            .errors
            .push(format!("{}: cannot list: {e}", dir.display())),
    }
    report
}

/// The files a load reads. Hidden entries are skipped: a ConfigMap volume
/// keeps its real files in `..data` directories and links to them.
fn manifest_files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        let wanted = path
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| matches!(e, "yaml" | "yml" | "json"));
        // metadata() follows the ConfigMap's symlinks to the real file.
        if wanted && !name.starts_with('.') && path.metadata().is_ok_and(|m| m.is_file()) {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

fn load_file(path: &Path, report: &mut LoadReport) {
    let file = path.file_name().map_or_else(
        || path.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    );
    let documents = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read: {e}"))
        .and_then(|text| parse_documents(&text));
    let documents = match documents {
        Ok(documents) => documents,
        // A file that does not parse is rejected whole: half a file could
        // drop a slice and silently shrink a Service.
        Err(e) => return report.errors.push(format!("{file}: {e}")),
    };
    for (index, document) in documents.into_iter().enumerate() {
        let mut objects = Vec::new();
        flatten(
            document,
            format!("{file}: document {}", index + 1),
            &mut objects,
        );
        for (place, object) in objects {
            add_object(object, &place, report);
        }
    }
}

/// Every YAML document of the file (JSON is YAML too); empty ones dropped.
fn parse_documents(text: &str) -> Result<Vec<Value>, String> {
    let mut documents = Vec::new();
    for document in serde_yaml_ng::Deserializer::from_str(text) {
        let value = Value::deserialize(document).map_err(|e| format!("not valid YAML: {e}"))?;
        if !value.is_null() {
            documents.push(value);
        }
    }
    Ok(documents)
}

/// Opens `List` documents (`kind: List` from kubectl, or a typed list such
/// as `ServiceList` whose items may leave out their kind).
fn flatten(mut object: Value, place: String, out: &mut Vec<(String, Value)>) {
    let kind = object
        .get("kind")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned();
    let Some(items) = kind
        .strip_suffix("List")
        .and(object.get_mut("items"))
        .map(Value::take)
    else {
        return out.push((place, object));
    };
    let item_kind = kind.trim_end_matches("List");
    let api_version = object.get("apiVersion").cloned().unwrap_or(Value::Null);
    let items = match items {
        Value::Array(items) => items,
        Value::Null => Vec::new(),
        other => return out.push((place, other)),
    };
    for (index, mut item) in items.into_iter().enumerate() {
        if let (Value::Object(fields), false) = (&mut item, item_kind.is_empty()) {
            fields.entry("kind").or_insert_with(|| item_kind.into());
            fields
                .entry("apiVersion")
                .or_insert_with(|| api_version.clone());
        }
        flatten(item, format!("{place}: items[{index}]"), out);
    }
}

fn add_object(object: Value, place: &str, report: &mut LoadReport) {
    let api_version = object
        .get("apiVersion")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let Some(kind) = object.get("kind").and_then(Value::as_str) else {
        return report
            .errors
            .push(format!("{place}: not a Kubernetes object (no kind)"));
    };
    let namespace = object
        .pointer("/metadata/namespace")
        .and_then(Value::as_str)
        .unwrap_or("default");
    let name = object
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or("(unnamed)");
    // Matching the group too keeps look-alikes out (a Knative Service).
    let what = format!("{place}: {kind} {namespace}/{name}");
    match (api_version, kind) {
        ("v1", "Service") => match typed::<core::Service>(object).map(|s| super::service(&s)) {
            Ok(Conversion::Accepted(service, warnings)) => {
                note_warnings(&what, warnings, report);
                let services = &mut report.cluster.services;
                if services.contains_key(&service.key) {
                    return report.errors.push(format!(
                        "{what}: defined more than once; the first one is used"
                    ));
                }
                services.insert(service.key.clone(), service);
            }
            Ok(Conversion::Ignored(_)) => report.ignored += 1,
            Ok(Conversion::Rejected(e)) | Err(e) => report.errors.push(format!("{what}: {e}")),
        },
        ("discovery.k8s.io/v1", "EndpointSlice") => {
            match typed::<discovery::EndpointSlice>(object).map(|s| super::endpoint_slice(&s)) {
                Ok(Conversion::Accepted(slice, warnings)) => {
                    note_warnings(&what, warnings, report);
                    let slices = &mut report.cluster.slices;
                    if slices.contains_key(&slice.key) {
                        return report.errors.push(format!(
                            "{what}: defined more than once; the first one is used"
                        ));
                    }
                    slices.insert(slice.key.clone(), slice);
                }
                Ok(Conversion::Ignored(_)) => report.ignored += 1,
                Ok(Conversion::Rejected(e)) | Err(e) => report.errors.push(format!("{what}: {e}")),
            }
        }
        _ => report.ignored += 1,
    }
}

fn typed<T: DeserializeOwned>(object: Value) -> Result<T, String> {
    serde_path_to_error::deserialize(object)
        .map_err(|e| format!("malformed {}: {}", e.path(), e.inner()))
}

fn note_warnings(what: &str, warnings: Vec<String>, report: &mut LoadReport) {
    report
        .warnings
        .extend(warnings.into_iter().map(|w| format!("{what}: {w}")));
}

/// Notices changes to a manifest directory by polling: names, sizes and
/// mtimes of the files a load would read. Polling needs no inotify and
/// sees ConfigMap volume updates (a symlink swap) like any other write.
pub struct DirWatcher {
    dir: PathBuf,
    last: Snapshot,
}

type Snapshot = Option<BTreeMap<PathBuf, (Option<SystemTime>, u64)>>;

impl DirWatcher {
    /// Starts from the directory as it is now.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        let dir = dir.into();
        let last = snapshot(&dir);
        DirWatcher { dir, last }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// True when the directory differs from the last call (or from `new`).
    /// A file caught mid-write changes again when the write ends, so the
    /// next poll loads the finished file.
    pub fn changed(&mut self) -> bool {
        let now = snapshot(&self.dir);
        let changed = now != self.last;
        self.last = now;
        changed
    }
}

/// `None` when the directory cannot be listed (so it appearing is a change).
fn snapshot(dir: &Path) -> Snapshot {
    let files = manifest_files(dir).ok()?;
    let stat = |path: &Path| {
        let meta = path.metadata().ok()?;
        Some((meta.modified().ok(), meta.len()))
    };
    Some(
        files
            .into_iter()
            .filter_map(|file| stat(&file).map(|s| (file, s)))
            .collect(),
    )
}

/// Loads `dir` now and again after every change, handing each report over
/// (the receiver owns it, so nothing here keeps a large set alive);
/// returns when the receiver is gone.
pub async fn watch(dir: PathBuf, interval: Duration, tx: mpsc::Sender<LoadReport>) {
    let mut watcher = DirWatcher::new(dir.clone());
    if tx.send(load_dir(&dir)).await.is_err() {
        return;
    }
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = tx.closed() => return,
        }
        // File I/O blocks: keep it off the async workers.
        let polled = tokio::task::spawn_blocking(move || {
            let report = watcher.changed().then(|| load_dir(watcher.dir()));
            (watcher, report)
        })
        .await;
        let Ok((returned, report)) = polled else {
            return; // the runtime is shutting down
        };
        watcher = returned;
        if let Some(report) = report
            && tx.send(report).await.is_err()
        {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compiler::lb::{self, NodeContext};
    use crate::model::{LbAlgorithm, ServiceKey};

    const WEB: &str = r#"
apiVersion: v1
kind: Service
metadata:
  name: web
  namespace: shop
spec:
  type: NodePort
  clusterIP: 10.96.0.20
  selector:
    app: web
  ports:
  - name: http
    port: 80
    targetPort: http
    nodePort: 30080
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-7xk2p
  namespace: shop
  labels:
    kubernetes.io/service-name: web
addressType: IPv4
ports:
- name: http
  protocol: TCP
  port: 8080
endpoints:
- addresses: ["10.244.1.5"]
  conditions: {ready: true}
  nodeName: node-a
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
  namespace: shop
spec: {}
---
"#;

    fn write(dir: &Path, name: &str, text: &str) {
        std::fs::write(dir.join(name), text).unwrap();
    }

    #[test]
    fn multi_document_yaml_loads_and_compiles() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "web.yaml", WEB);
        let report = load_dir(dir.path());
        assert!(report.errors.is_empty(), "{:?}", report.errors);
        assert_eq!(report.ignored, 1);
        let key = ServiceKey::new("shop", "web");
        assert!(report.cluster.services.contains_key(&key));
        assert_eq!(report.cluster.slices_of(&key).count(), 1);

        let ctx = NodeContext {
            node_name: "node-a".into(),
            node_ips: vec!["192.168.1.10".parse().unwrap()],
            maglev_table_size: 251,
            default_algorithm: LbAlgorithm::Random,
        };
        let state = lb::compile(&report.cluster, &ctx);
        let frontends: Vec<String> = state
            .frontends
            .iter()
            .map(|(f, e)| format!("{f} -> {}", e.backends[0]))
            .collect();
        assert_eq!(
            frontends,
            [
                "10.96.0.20:80/TCP -> 10.244.1.5:8080/TCP",
                "192.168.1.10:30080/TCP -> 10.244.1.5:8080/TCP"
            ]
        );
    }

    #[test]
    fn lists_json_and_ignored_files() {
        let dir = tempfile::tempdir().unwrap();
        // `kubectl get svc,endpointslices -o json` shape, and a typed list
        // whose items carry no kind.
        let list = r#"{"apiVersion": "v1", "kind": "List", "items": [
            {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "api"},
             "spec": {"clusterIP": "10.96.0.30", "ports": [{"port": 443, "targetPort": 8443}]}},
            {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "settings"}}]}"#;
        write(dir.path(), "api.json", list);
        let typed = "apiVersion: v1\nkind: ServiceList\nitems:\n- metadata:\n    name: db\n  spec:\n    clusterIP: 10.96.0.31\n    ports:\n    - port: 5432\n";
        write(dir.path(), "db.yml", typed);
        write(dir.path(), "notes.txt", "not a manifest");
        write(dir.path(), ".hidden.yaml", "kind: [");
        let report = load_dir(dir.path());
        assert!(report.errors.is_empty(), "{:?}", report.errors);
        let names: Vec<String> = report
            .cluster
            .services
            .keys()
            .map(ToString::to_string)
            .collect();
        assert_eq!(names, ["default/api", "default/db"]);
        assert_eq!(report.ignored, 1);
    }

    #[test]
    fn errors_name_the_file_and_object_and_spare_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        write(
            dir.path(),
            "a-broken.yaml",
            "apiVersion: v1\nkind: Service\nmetadata: [unclosed\n",
        );
        let objects = r#"
apiVersion: v1
kind: Service
metadata: {name: bad-port, namespace: shop}
spec: {clusterIP: 10.96.0.40, ports: [{port: 0}]}
---
apiVersion: v1
kind: Service
metadata: {name: typo, namespace: shop}
spec: {clusterIP: 10.96.0.41, ports: [{port: "eighty"}]}
---
apiVersion: v1
kind: Service
metadata: {name: fine, namespace: shop}
spec: {clusterIP: 10.96.0.42, ports: [{port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: fine, namespace: shop}
spec: {clusterIP: 10.96.0.43, ports: [{port: 80}]}
---
just: a map
---
apiVersion: serving.knative.dev/v1
kind: Service
metadata: {name: knative}
"#;
        write(dir.path(), "b-objects.yaml", objects);
        let report = load_dir(dir.path());
        assert_eq!(report.errors.len(), 5, "{:#?}", report.errors);
        let expect = [
            "a-broken.yaml: not valid YAML: ",
            "b-objects.yaml: document 1: Service shop/bad-port: ports[0]: port 0 is out of range",
            "b-objects.yaml: document 2: Service shop/typo: malformed spec.ports[0].port: invalid type: string \"eighty\"",
            "b-objects.yaml: document 4: Service shop/fine: defined more than once",
            "b-objects.yaml: document 5: not a Kubernetes object (no kind)",
        ];
        for (error, expected) in report.errors.iter().zip(expect) {
            assert!(
                error.starts_with(expected),
                "{error:?} should start with {expected:?}"
            );
        }
        assert_eq!(report.cluster.services.len(), 1);
        assert_eq!(
            report.cluster.services.values().next().unwrap().cluster_ips[0].to_string(),
            "10.96.0.42"
        );
        assert_eq!(report.ignored, 1);

        let missing = load_dir(&dir.path().join("nope"));
        assert!(
            missing.errors[0].contains("cannot list"),
            "{:?}",
            missing.errors
        );
    }

    #[test]
    fn the_watcher_sees_writes_rewrites_and_deletions() {
        let dir = tempfile::tempdir().unwrap();
        let mut watcher = DirWatcher::new(dir.path());
        assert!(!watcher.changed());
        write(dir.path(), "web.yaml", WEB);
        assert!(watcher.changed());
        assert!(!watcher.changed());
        write(
            dir.path(),
            "web.yaml",
            &WEB.replace("10.96.0.20", "10.96.0.200"),
        );
        assert!(watcher.changed());
        write(dir.path(), "README.md", "ignored");
        assert!(!watcher.changed());
        std::fs::remove_file(dir.path().join("web.yaml")).unwrap();
        assert!(watcher.changed());
        assert!(!watcher.changed());
    }

    #[tokio::test]
    async fn watch_publishes_a_new_report_on_change() {
        let dir = tempfile::tempdir().unwrap();
        let (tx, mut rx) = mpsc::channel(1);
        let task = tokio::spawn(watch(dir.path().to_owned(), Duration::from_millis(20), tx));
        let deadline = Duration::from_secs(10);
        let first = tokio::time::timeout(deadline, rx.recv())
            .await
            .unwrap()
            .unwrap();
        assert!(first.cluster.services.is_empty());

        write(dir.path(), "web.yaml", WEB);
        let next = tokio::time::timeout(deadline, rx.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(next.cluster.services.len(), 1);

        std::fs::remove_file(dir.path().join("web.yaml")).unwrap();
        let last = tokio::time::timeout(deadline, rx.recv())
            .await
            .unwrap()
            .unwrap();
        assert!(last.cluster.services.is_empty());

        drop(rx);
        tokio::time::timeout(deadline, task).await.unwrap().unwrap();
    }
}
