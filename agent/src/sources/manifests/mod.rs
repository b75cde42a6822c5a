//! The standalone source: a directory of ordinary Kubernetes manifests
//! (*.yaml, *.yml, *.json; several documents per file; `kind: List`), read
//! whole on every change. Tern's mode without an API server.

pub mod file;
mod watch;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use file::{FileContents, duplicate, parse_file};
pub use watch::watch;

use super::{LoadReport, NodeNames, RejectReason, Rejection};
use crate::model::{Cluster, Map};

pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_millis(500);

/// Loads every manifest file in `dir` (not its subdirectories), in name
/// order so duplicates always resolve the same way: the first one wins.
pub fn load_dir(dir: &Path) -> LoadReport {
    ManifestSource::new(dir).reload().unwrap_or_default()
}

/// Identifies a file's version: a rename brings a new inode, a rewrite a
/// new mtime or size.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Stamp {
    inode: u64,
    modified: Option<SystemTime>,
    len: u64,
}

fn stamp(path: &Path) -> Option<Stamp> {
    use std::os::unix::fs::MetadataExt;
    // metadata() follows the ConfigMap's symlinks to the real file.
    let meta = path.metadata().ok()?;
    Some(Stamp {
        inode: meta.ino(),
        modified: meta.modified().ok(),
        len: meta.len(),
    })
}

/// The manifest directory as last read, file by file.
pub struct ManifestSource {
    dir: PathBuf,
    files: BTreeMap<PathBuf, (Stamp, FileContents)>,
    /// Why the directory could not be listed last time; `None` before the
    /// first reload too, which always reports.
    list_error: Option<Rejection>,
    loaded: bool,
    /// The last report's objects: each report updates these in place, so
    /// an unchanged object costs a comparison, not a new map entry.
    last: Cluster,
    node_names: NodeNames,
}

impl ManifestSource {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        ManifestSource {
            dir: dir.into(),
            files: BTreeMap::new(),
            list_error: None,
            loaded: false,
            last: Cluster::default(),
            node_names: NodeNames::default(),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Re-reads the files that changed since the last call and returns the
    /// whole directory's report, or `None` when nothing changed. A file
    /// caught mid-write changes again when the write ends, so a later call
    /// reads the finished file.
    pub fn reload(&mut self) -> Option<LoadReport> {
        let first = !self.loaded;
        self.loaded = true;
        let listed = match manifest_files(&self.dir) {
            Ok(files) => files,
            Err(e) => {
                let error = Rejection::new(
                    "File",
                    RejectReason::Unreadable,
                    format!("{}: cannot list: {e}", self.dir.display()),
                );
                let changed = first || self.list_error.as_ref() != Some(&error);
                self.list_error = Some(error);
                self.files.clear();
                return changed.then(|| self.report());
            }
        };
        let mut changed = first || self.list_error.take().is_some();
        let before = self.files.len();
        self.files.retain(|path, _| listed.contains(path));
        changed |= self.files.len() != before;
        for path in listed {
            let Some(now) = stamp(&path) else { continue };
            if self.files.get(&path).is_some_and(|(seen, _)| *seen == now) {
                continue;
            }
            let objects = parse_file(&path, &mut self.node_names);
            self.files.insert(path, (now, objects));
            changed = true;
        }
        changed.then(|| self.report())
    }

    /// The directory's objects in file-name order; the first of duplicates
    /// wins.
    fn report(&mut self) -> LoadReport {
        let mut report = LoadReport::default();
        report.errors.extend(self.list_error.clone());
        for (_, file) in self.files.values() {
            report.errors.extend(file.errors.iter().cloned());
            report.warnings.extend(file.warnings.iter().cloned());
            report.ignored += file.ignored;
        }
        let files = || self.files.iter().map(|(path, (_, f))| (path.as_path(), f));
        let last = &mut self.last;
        let errors = &mut report.errors;
        merge_sorted(
            files().map(|(p, f)| (p, &f.services[..])),
            |s| &s.key,
            "Service",
            |s| s.key.to_string(),
            errors,
            &mut last.services,
        );
        merge_sorted(
            files().map(|(p, f)| (p, &f.slices[..])),
            |s| &s.key,
            "EndpointSlice",
            |s| format!("{}/{}", s.key.0, s.key.1),
            errors,
            &mut last.slices,
        );
        merge_sorted(
            files().map(|(p, f)| (p, &f.nodes[..])),
            |n| &n.name,
            "Node",
            |n| n.name.clone(),
            errors,
            &mut last.nodes,
        );
        merge_sorted(
            files().map(|(p, f)| (p, &f.namespaces[..])),
            |n| &n.name,
            "Namespace",
            |n| n.name.clone(),
            errors,
            &mut last.namespaces,
        );
        merge_sorted(
            files().map(|(p, f)| (p, &f.pods[..])),
            |p| &p.key,
            "Pod",
            |p| format!("{}/{}", p.key.0, p.key.1),
            errors,
            &mut last.pods,
        );
        merge_sorted(
            files().map(|(p, f)| (p, &f.network_policies[..])),
            |p| &p.key,
            "NetworkPolicy",
            |p| format!("{}/{}", p.key.0, p.key.1),
            errors,
            &mut last.network_policies,
        );
        report.cluster = self.last.clone();
        report
    }
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
        if wanted && !name.starts_with('.') && path.metadata().is_ok_and(|m| m.is_file()) {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

/// Merges the files' objects, each file's sorted by key with one object per
/// key, and brings `map` to them; of objects with the same key the one of
/// the earlier file wins and the rest are reported.
fn merge_sorted<'a, K: Ord + Clone, T>(
    files: impl Iterator<Item = (&'a Path, &'a [Arc<T>])>,
    key: impl Fn(&T) -> &K,
    kind: &'static str,
    name: impl Fn(&T) -> String,
    errors: &mut Vec<Rejection>,
    map: &mut Map<K, Arc<T>>,
) where
    T: 'a,
{
    let mut all: Vec<(&Path, &Arc<T>)> = files
        .flat_map(|(path, objects)| objects.iter().map(move |o| (path, o)))
        .collect();
    // Stable, and cheap on runs that are sorted already.
    all.sort_by(|a, b| key(a.1).cmp(key(b.1)));
    let mut merged: Vec<(K, Arc<T>)> = Vec::with_capacity(all.len());
    for (path, object) in all {
        match merged.last() {
            Some((last, _)) if last == key(object) => {
                let file = path.file_name().unwrap_or_default().to_string_lossy();
                let what = format!("{file}: {kind} {}", name(object));
                errors.push(duplicate(kind, &what));
            }
            _ => merged.push((key(object).clone(), object.clone())),
        }
    }
    // One ordered walk finds what differs from the map; only that changes.
    let mut changes: Vec<(K, Option<Arc<T>>)> = Vec::new();
    let mut have = map.iter().peekable();
    for (key, object) in merged {
        while let Some((gone, _)) = have.next_if(|(k, _)| **k < key) {
            changes.push((gone.clone(), None));
        }
        match have.next_if(|(k, _)| **k == key) {
            Some((_, kept)) if Arc::ptr_eq(kept, &object) => {}
            _ => changes.push((key, Some(object))),
        }
    }
    changes.extend(have.map(|(gone, _)| (gone.clone(), None)));
    for (key, object) in changes {
        match object {
            Some(object) => map.insert(key, object),
            None => map.remove(&key),
        };
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::compiler::lb::{self, NodeContext};
    use crate::model::{LbAlgorithm, ServiceKey};
    use tokio::sync::mpsc;

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
    fn nodes_give_their_pod_cidrs_and_underlay_address() {
        let dir = tempfile::tempdir().unwrap();
        write(
            dir.path(),
            "nodes.yaml",
            r#"
apiVersion: v1
kind: Node
metadata: {name: n1}
spec: {podCIDR: 10.244.1.0/24, podCIDRs: [10.244.1.0/24, "fd00:1::/64"]}
status:
  addresses:
  - {type: Hostname, address: n1}
  - {type: InternalIP, address: "fd00::1"}
  - {type: InternalIP, address: 10.0.0.1}
---
apiVersion: v1
kind: Node
metadata: {name: n2, labels: {topology.kubernetes.io/zone: zone-b}}
spec: {podCIDR: 10.244.2.0/24}
status: {addresses: [{type: ExternalIP, address: 192.0.2.2}]}
---
apiVersion: v1
kind: Node
metadata: {name: n3}
spec: {taints: [{key: ToBeDeletedByClusterAutoscaler, effect: NoSchedule}]}
---
apiVersion: v1
kind: Node
metadata: {name: bad-cidr}
spec: {podCIDR: 10.244.3.1/24}
---
apiVersion: v1
kind: Node
metadata: {name: bad-address}
status: {addresses: [{type: InternalIP, address: ten.zero}]}
"#,
        );
        let report = load_dir(dir.path());
        let names: Vec<&str> = report.cluster.nodes.keys().map(String::as_str).collect();
        assert_eq!(names, ["n1", "n2", "n3"]);
        let n1 = &report.cluster.nodes["n1"];
        assert_eq!(n1.internal_ip, Some("10.0.0.1".parse().unwrap()));
        assert_eq!(n1.pod_cidrs, ["10.244.1.0/24".parse().unwrap()]);
        let n2 = &report.cluster.nodes["n2"];
        assert_eq!(n2.internal_ip, Some("192.0.2.2".parse().unwrap()));
        assert_eq!(n2.pod_cidrs, ["10.244.2.0/24".parse().unwrap()]);
        assert_eq!(
            (n1.zone.as_deref(), n2.zone.as_deref()),
            (None, Some("zone-b"))
        );
        let n3 = &report.cluster.nodes["n3"];
        assert_eq!((n3.internal_ip, n3.pod_cidrs.len()), (None, 0));
        assert!(n3.to_be_deleted && !n1.to_be_deleted);
        assert_eq!(report.errors.len(), 2, "{:?}", report.errors);
        assert!(
            report.errors[0]
                .message
                .contains("Node bad-cidr: spec.podCIDRs: 10.244.3.1/24 has host bits set"),
            "{:?}",
            report.errors
        );
        assert!(
            report.errors[1]
                .message
                .contains("Node bad-address: status.addresses: InternalIP \"ten.zero\""),
            "{:?}",
            report.errors
        );
        assert_eq!(report.warnings.len(), 1, "{:?}", report.warnings);
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
            service_cidr: None,
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
    fn pods_and_network_policies_load() {
        let dir = tempfile::tempdir().unwrap();
        write(
            dir.path(),
            "policy.yaml",
            r#"
apiVersion: v1
kind: Pod
metadata: {name: backend-1, namespace: default, labels: {app: backend}}
spec:
  nodeName: node-a
  containers: [{name: app, ports: [{name: http, containerPort: 8080}]}]
status: {podIPs: [{ip: 10.244.1.7}]}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: backend-netpol, namespace: default}
spec:
  podSelector: {matchLabels: {app: backend}}
  ingress:
  - from: [{podSelector: {matchLabels: {app: frontend}}}]
    ports: [{port: http}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: broken, namespace: default}
spec:
  podSelector: {}
  ingress: [{from: [{}]}]
"#,
        );
        let report = load_dir(dir.path());
        assert!(report.errors.is_empty(), "{:?}", report.errors);
        assert_eq!(report.ignored, 0);
        let key = ("default".to_owned(), "backend-1".to_owned());
        let pod = &report.cluster.pods[&key];
        assert_eq!(pod.node.as_deref(), Some("node-a"));
        assert_eq!(
            pod.ips,
            ["10.244.1.7".parse::<std::net::Ipv4Addr>().unwrap()]
        );
        assert_eq!(pod.labels["app"], "backend");
        assert_eq!(pod.named_ports[0].port, 8080);
        let names: Vec<&str> = report
            .cluster
            .network_policies
            .keys()
            .map(|(_, n)| n.as_str())
            .collect();
        assert_eq!(names, ["backend-netpol", "broken"]);
        let policy =
            &report.cluster.network_policies[&("default".to_owned(), "backend-netpol".to_owned())];
        assert_eq!(policy.error, None);
        assert_eq!(policy.ingress.as_ref().map(Vec::len), Some(1));
        assert_eq!(policy.egress, None);
        // The invalid one is in force, failing closed, and reported.
        let broken = &report.cluster.network_policies[&("default".to_owned(), "broken".to_owned())];
        assert!(broken.error.is_some());
        assert_eq!(broken.ingress, Some(vec![]));
        assert_eq!(report.warnings.len(), 1, "{:?}", report.warnings);
        assert!(
            report.warnings[0].contains("NetworkPolicy default/broken: spec.ingress[0].from[0]"),
            "{:?}",
            report.warnings
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
    fn endpoints_of_one_node_share_its_name_across_files_and_reloads() {
        let dir = tempfile::tempdir().unwrap();
        let slice = |name: &str| {
            format!(
                r#"{{"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                "metadata": {{"name": "{name}", "labels": {{"kubernetes.io/service-name": "web"}}}},
                "addressType": "IPv4", "endpoints": [
                {{"addresses": ["10.244.1.5"], "nodeName": "node-a"}},
                {{"addresses": ["10.244.1.6"], "nodeName": "node-a"}}]}}"#
            )
        };
        write(
            dir.path(),
            "a.json",
            &format!(r#"{{"kind": "List", "items": [{}]}}"#, slice("a")),
        );
        write(dir.path(), "b.yaml", &slice("b"));
        let mut source = ManifestSource::new(dir.path());
        let first = source.reload().expect("first load reports");
        write(dir.path(), "c.yaml", &slice("c"));
        let second = source.reload().expect("a new file reports");
        let mut names = Vec::new();
        for cluster in [&first.cluster, &second.cluster] {
            for slice in cluster.slices.values() {
                names.extend(slice.endpoints.iter().map(|e| e.node_name.clone().unwrap()));
            }
        }
        assert_eq!(names.len(), 4 + 6);
        assert!(names.iter().all(|n| Arc::ptr_eq(n, &names[0])), "{names:?}");
    }

    #[test]
    fn json_items_typed_from_text_equal_the_tree_reading() {
        // JSON is YAML too: read as YAML, every item goes through a Value
        // tree; read as JSON, items of a kind are typed from their text.
        // Both must give the same objects, errors and warnings.
        let text = r#"{"apiVersion": "v1", "kind": "List", "items": [
            {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "api", "namespace": "shop"},
             "spec": {"clusterIP": "10.96.0.30", "ports": [{"port": 443, "targetPort": 8443}]}},
            {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "typo"},
             "spec": {"clusterIP": "10.96.0.31", "ports": [{"port": "eighty"}]}},
            {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "zero"},
             "spec": {"clusterIP": "10.96.0.32", "ports": [{"port": 0}]}},
            {"apiVersion": "v1", "kind": "Service", "metadata": {"namespace": 7},
             "spec": {"clusterIP": "10.96.0.33", "ports": [{"port": 80}]}},
            {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
             "metadata": {"name": "api-1", "namespace": "shop", "labels": {"kubernetes.io/service-name": "api"}},
             "addressType": "IPv4", "ports": [{"port": 8443}],
             "endpoints": [{"addresses": ["10.244.1.5"], "conditions": {"ready": true}},
                           {"addresses": ["not-an-ip"]}]},
            {"apiVersion": "v1", "kind": "ServiceList", "items": [
                {"metadata": {"name": "nested"}, "spec": {"clusterIP": "10.96.0.34", "ports": [{"port": 81}]}}]},
            {"metadata": {"name": "kindless"}, "spec": {"clusterIP": "10.96.0.35", "ports": [{"port": 82}]}},
            {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "settings"}},
            "a string",
            ["v1", "Service"],
            {"apiVersion": "v1", "kind": "Service", "metadata": ["ns", "n"],
             "spec": {"clusterIP": "10.96.0.36", "ports": [{"port": 83}]}},
            {"apiVersion": "v1", "kind": "Service", "metadata": {"name": 5},
             "spec": {"clusterIP": "10.96.0.37", "ports": [{"port": 84}]}},
            {"kind": "Service", "metadata": null}]}"#;
        let read = |json| {
            let mut objects = file::FileObjects::default();
            file::read_documents(text, json, "f", &mut objects).unwrap();
            format!("{objects:?}")
        };
        let typed = read(true);
        assert_eq!(typed, read(false));
        for expected in [
            "shop/api",
            "eighty",
            "nested",
            "items[6]: not a",
            "not-an-ip",
        ] {
            assert!(typed.contains(expected), "{expected} missing: {typed}");
        }
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
        write(
            dir.path(),
            "c-again.yaml",
            "apiVersion: v1\nkind: Service\nmetadata: {name: fine, namespace: shop}\n\
             spec: {clusterIP: 10.96.0.43, ports: [{port: 80}]}\n",
        );
        let report = load_dir(dir.path());
        assert_eq!(report.errors.len(), 6, "{:#?}", report.errors);
        use RejectReason::*;
        let expect = [
            ("File", Malformed, "a-broken.yaml: not valid YAML: "),
            (
                "Service",
                InvalidPort,
                "b-objects.yaml: document 1: Service shop/bad-port: ports[0]: port 0 is out of range",
            ),
            (
                "Service",
                Malformed,
                "b-objects.yaml: document 2: Service shop/typo: malformed spec.ports[0].port: invalid type: string \"eighty\"",
            ),
            (
                "File",
                Malformed,
                "b-objects.yaml: document 5: not a Kubernetes object (no kind)",
            ),
            // Within a file, where it is; across files, which file.
            (
                "Service",
                Duplicate,
                "b-objects.yaml: document 4: Service shop/fine: defined more than once",
            ),
            (
                "Service",
                Duplicate,
                "c-again.yaml: Service shop/fine: defined more than once; the first one is used",
            ),
        ];
        for (error, (kind, reason, expected)) in report.errors.iter().zip(expect) {
            assert!(
                error.message.starts_with(expected),
                "{error:?} should start with {expected:?}"
            );
            assert_eq!((error.kind, error.reason), (kind, reason), "{error:?}");
        }
        assert_eq!(report.cluster.services.len(), 1);
        assert_eq!(
            report.cluster.services.values().next().unwrap().cluster_ips[0].to_string(),
            "10.96.0.42"
        );
        assert_eq!(report.ignored, 1);

        let missing = load_dir(&dir.path().join("nope"));
        assert!(
            missing.errors[0].message.contains("cannot list"),
            "{:?}",
            missing.errors
        );
    }

    #[test]
    fn reload_rereads_only_on_writes_renames_and_removals() {
        let dir = tempfile::tempdir().unwrap();
        let mut source = ManifestSource::new(dir.path());
        assert!(source.reload().unwrap().cluster.services.is_empty());
        assert!(source.reload().is_none());
        write(dir.path(), "web.yaml", WEB);
        assert_eq!(source.reload().unwrap().cluster.services.len(), 1);
        assert!(source.reload().is_none());
        write(
            dir.path(),
            "web.yaml",
            &WEB.replace("10.96.0.20", "10.96.0.200"),
        );
        let rewritten = source.reload().unwrap();
        assert_eq!(
            rewritten
                .cluster
                .services
                .values()
                .next()
                .unwrap()
                .cluster_ips,
            vec!["10.96.0.200".parse::<std::net::Ipv4Addr>().unwrap()]
        );
        write(dir.path(), "README.md", "ignored");
        assert!(source.reload().is_none());
        // A rename over the file (how editors and kubectl cp write) is seen.
        write(dir.path(), ".next", WEB);
        std::fs::rename(dir.path().join(".next"), dir.path().join("web.yaml")).unwrap();
        assert_eq!(source.reload().unwrap().cluster.services.len(), 1);
        std::fs::remove_file(dir.path().join("web.yaml")).unwrap();
        assert!(source.reload().unwrap().cluster.services.is_empty());
        assert!(source.reload().is_none());
    }

    #[tokio::test]
    async fn watch_publishes_a_new_report_on_change() {
        let dir = tempfile::tempdir().unwrap();
        let (tx, mut rx) = mpsc::channel(1);
        // An hour between polls: every change below is seen through inotify.
        let task = tokio::spawn(watch(dir.path().to_owned(), Duration::from_secs(3600), tx));
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
