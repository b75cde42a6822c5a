//! The standalone source: a directory of ordinary Kubernetes manifests
//! (*.yaml, *.yml, *.json; several documents per file; `kind: List`), read
//! whole on every change. Tern's mode without an API server.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use k8s_openapi::api::core::v1 as core;
use k8s_openapi::api::discovery::v1 as discovery;
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
use serde::Deserializer;
use serde::de::{DeserializeOwned, DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::Value;
use tokio::sync::mpsc;

use super::{Conversion, LoadReport};
use crate::model::{Cluster, EndpointSlice, Map, Namespace, Node, Service};

pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_millis(500);

/// Loads every manifest file in `dir` (not its subdirectories), in name
/// order so duplicates always resolve the same way: the first one wins.
pub fn load_dir(dir: &Path) -> LoadReport {
    ManifestSource::new(dir).reload().unwrap_or_default()
}

/// What one file holds, converted: kept per file so a change re-reads only
/// the files that changed.
#[derive(Debug, Default)]
struct FileObjects {
    services: Vec<(String, Arc<Service>)>,
    slices: Vec<(String, Arc<EndpointSlice>)>,
    nodes: Vec<(String, Arc<Node>)>,
    namespaces: Vec<(String, Arc<Namespace>)>,
    errors: Vec<String>,
    warnings: Vec<String>,
    ignored: usize,
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
    files: BTreeMap<PathBuf, (Stamp, FileObjects)>,
    /// Why the directory could not be listed last time; `None` before the
    /// first reload too, which always reports.
    list_error: Option<String>,
    loaded: bool,
    /// The last report's objects: each report updates these in place, so
    /// an unchanged object costs a comparison, not a new map entry.
    last: Cluster,
}

impl ManifestSource {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        ManifestSource {
            dir: dir.into(),
            files: BTreeMap::new(),
            list_error: None,
            loaded: false,
            last: Cluster::default(),
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
                let error = format!("{}: cannot list: {e}", self.dir.display());
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
            let objects = parse_file(&path);
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
        merge_sorted(
            self.files.values().map(|(_, f)| &f.services[..]),
            |s| &s.key,
            &mut report.errors,
            &mut self.last.services,
        );
        merge_sorted(
            self.files.values().map(|(_, f)| &f.slices[..]),
            |s| &s.key,
            &mut report.errors,
            &mut self.last.slices,
        );
        merge_sorted(
            self.files.values().map(|(_, f)| &f.nodes[..]),
            |n| &n.name,
            &mut report.errors,
            &mut self.last.nodes,
        );
        merge_sorted(
            self.files.values().map(|(_, f)| &f.namespaces[..]),
            |n| &n.name,
            &mut report.errors,
            &mut self.last.namespaces,
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

/// Merges the files' objects, each file's sorted by key, and brings `map`
/// to them; of objects with the same key the one of the earlier file wins
/// and the rest are reported.
fn merge_sorted<'a, K: Ord + Clone, T>(
    files: impl Iterator<Item = &'a [(String, Arc<T>)]>,
    key: impl Fn(&T) -> &K,
    errors: &mut Vec<String>,
    map: &mut Map<K, Arc<T>>,
) where
    T: 'a,
{
    let mut all: Vec<&(String, Arc<T>)> = files.flatten().collect();
    // Stable, and cheap on runs that are sorted already.
    all.sort_by(|a, b| key(&a.1).cmp(key(&b.1)));
    let mut merged: Vec<(K, Arc<T>)> = Vec::with_capacity(all.len());
    for (what, object) in all {
        match merged.last() {
            Some((last, _)) if last == key(object) => errors.push(format!(
                "{what}: defined more than once; the first one is used"
            )),
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

fn parse_file(path: &Path) -> FileObjects {
    let file = path.file_name().map_or_else(
        || path.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    );
    let json = path.extension().is_some_and(|e| e == "json");
    let mut objects = FileObjects::default();
    let parsed = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read: {e}"))
        .and_then(|text| read_documents(&text, json, &file, &mut objects));
    match parsed {
        Ok(()) => {
            // Sorted once here, so that merging the files is one pass. The
            // sort is stable: of two equal keys the file's first stays first.
            objects.services.sort_by(|a, b| a.1.key.cmp(&b.1.key));
            objects.slices.sort_by(|a, b| a.1.key.cmp(&b.1.key));
            objects.nodes.sort_by(|a, b| a.1.name.cmp(&b.1.name));
            objects
        }
        // A file that does not parse is rejected whole: half a file could
        // drop a slice and silently shrink a Service.
        Err(e) => FileObjects {
            errors: vec![format!("{file}: {e}")],
            ..FileObjects::default()
        },
    }
}

/// Reads every document of the file into `objects`. JSON is YAML too, but
/// serde_json reads it several times faster.
fn read_documents(
    text: &str,
    json: bool,
    file: &str,
    objects: &mut FileObjects,
) -> Result<(), String> {
    let place = |index: usize| format!("{file}: document {index}");
    if json {
        let mut de = serde_json::Deserializer::from_str(text);
        Document(place(1), objects)
            .deserialize(&mut de)
            .and_then(|()| de.end())
            .map_err(|e| format!("not valid JSON: {e}"))?;
        return Ok(());
    }
    for (index, document) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
        Document(place(index + 1), &mut *objects)
            .deserialize(document)
            .map_err(|e| format!("not valid YAML: {e}"))?;
    }
    Ok(())
}

/// One document, read without building it whole: the items of a `List`
/// are converted one at a time, so a List of 100 000 objects never exists
/// as a single tree (that tree is many times the size of the file).
struct Document<'a>(String, &'a mut FileObjects);

impl<'de> DeserializeSeed<'de> for Document<'_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, de: D) -> Result<(), D::Error> {
        de.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Document<'_> {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a Kubernetes object or list")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let Document(place, file) = self;
        let mut fields = serde_json::Map::new();
        // Items are converted as they come, into their own set: only once
        // the document's kind is known (kubectl writes it after the items)
        // is it clear they belong to a List. Items without a kind wait for
        // the List's (a typed list such as ServiceList leaves it out).
        let mut listed = FileObjects::default();
        let mut kindless = Vec::new();
        while let Some(key) = map.next_key::<String>()? {
            if key == "items" {
                map.next_value_seed(Items {
                    place: &place,
                    listed: &mut listed,
                    kindless: &mut kindless,
                })?;
            } else {
                let value = map.next_value::<Value>()?;
                fields.insert(key, value);
            }
        }
        let kind = fields.get("kind").and_then(Value::as_str).unwrap_or("");
        if let Some(item_kind) = kind.strip_suffix("List") {
            let api_version = fields.get("apiVersion").cloned().unwrap_or(Value::Null);
            for (place, mut item) in kindless {
                if let (Value::Object(item), false) = (&mut item, item_kind.is_empty()) {
                    item.insert("kind".into(), item_kind.into());
                    item.entry("apiVersion")
                        .or_insert_with(|| api_version.clone());
                }
                add_listed(item, place, &mut listed);
            }
            file.merge(listed);
        } else {
            // Not a list: an object that happens to have `items` (no kind
            // Tern serves has one); judged by its other fields.
            add_object(Value::Object(fields), &place, file);
        }
        Ok(())
    }

    fn visit_unit<E>(self) -> Result<(), E> {
        Ok(()) // an empty document
    }

    fn visit_none<E>(self) -> Result<(), E> {
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        self.not_an_object();
        Ok(())
    }

    fn visit_str<E>(self, _: &str) -> Result<(), E> {
        self.not_an_object();
        Ok(())
    }

    fn visit_bool<E>(self, _: bool) -> Result<(), E> {
        self.not_an_object();
        Ok(())
    }

    fn visit_i64<E>(self, _: i64) -> Result<(), E> {
        self.not_an_object();
        Ok(())
    }

    fn visit_u64<E>(self, _: u64) -> Result<(), E> {
        self.not_an_object();
        Ok(())
    }

    fn visit_f64<E>(self, _: f64) -> Result<(), E> {
        self.not_an_object();
        Ok(())
    }
}

impl Document<'_> {
    fn not_an_object(self) {
        self.1
            .errors
            .push(format!("{}: not a Kubernetes object", self.0));
    }
}

/// A List's `items`, each converted as soon as it is read.
struct Items<'a> {
    place: &'a str,
    listed: &'a mut FileObjects,
    kindless: &'a mut Vec<(String, Value)>,
}

impl<'de> DeserializeSeed<'de> for Items<'_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, de: D) -> Result<(), D::Error> {
        de.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Items<'_> {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a list of objects")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let mut index = 0;
        while let Some(item) = seq.next_element::<Value>()? {
            let place = format!("{}: items[{index}]", self.place);
            index += 1;
            if item.get("kind").is_some() {
                add_listed(item, place, self.listed);
            } else {
                self.kindless.push((place, item));
            }
        }
        Ok(())
    }

    fn visit_unit<E>(self) -> Result<(), E> {
        Ok(()) // `items: null`
    }

    fn visit_none<E>(self) -> Result<(), E> {
        Ok(())
    }
}

/// One List item, which may itself be a List.
fn add_listed(item: Value, place: String, file: &mut FileObjects) {
    let mut found = Vec::new();
    flatten(item, place, &mut found);
    for (place, object) in found {
        add_object(object, &place, file);
    }
}

impl FileObjects {
    fn merge(&mut self, other: FileObjects) {
        // Taken apart whole, so a new kind cannot be forgotten here.
        let FileObjects {
            services,
            slices,
            nodes,
            namespaces,
            errors,
            warnings,
            ignored,
        } = other;
        self.services.extend(services);
        self.slices.extend(slices);
        self.nodes.extend(nodes);
        self.namespaces.extend(namespaces);
        self.errors.extend(errors);
        self.warnings.extend(warnings);
        self.ignored += ignored;
    }
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

fn add_object(object: Value, place: &str, file: &mut FileObjects) {
    let api_version = object
        .get("apiVersion")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let Some(kind) = object.get("kind").and_then(Value::as_str) else {
        return file
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
    let what = if kind == "Node" || kind == "Namespace" {
        format!("{place}: {kind} {name}") // cluster-scoped
    } else {
        format!("{place}: {kind} {namespace}/{name}")
    };
    // Matching the group too keeps look-alikes out (a Knative Service).
    match (api_version, kind) {
        ("v1", "Service") => {
            let converted = typed::<core::Service>(object).map(|s| super::service(&s));
            if let Some(service) = accept(converted, &what, file) {
                file.services.push((what, Arc::new(service)));
            }
        }
        ("discovery.k8s.io/v1", "EndpointSlice") => {
            let converted =
                typed::<discovery::EndpointSlice>(object).map(|s| super::endpoint_slice(&s));
            if let Some(slice) = accept(converted, &what, file) {
                file.slices.push((what, Arc::new(slice)));
            }
        }
        ("v1", "Node") => {
            let converted = typed::<core::Node>(object).map(|n| super::node(&n));
            if let Some(node) = accept(converted, &what, file) {
                file.nodes.push((what, Arc::new(node)));
            }
        }
        ("v1", "Namespace") => {
            let converted = typed::<core::Namespace>(object).map(|n| super::namespace(&n));
            if let Some(namespace) = accept(converted, &what, file) {
                file.namespaces.push((what, Arc::new(namespace)));
            }
        }
        _ => file.ignored += 1,
    }
}

/// Files a conversion's errors, warnings or ignoring; the object if used.
fn accept<T>(
    converted: Result<Conversion<T>, String>,
    what: &str,
    file: &mut FileObjects,
) -> Option<T> {
    match converted {
        Ok(Conversion::Accepted(object, warnings)) => {
            file.warnings
                .extend(warnings.into_iter().map(|w| format!("{what}: {w}")));
            Some(object)
        }
        Ok(Conversion::Ignored(_)) => {
            file.ignored += 1;
            None
        }
        Ok(Conversion::Rejected(e)) | Err(e) => {
            file.errors.push(format!("{what}: {e}"));
            None
        }
    }
}

fn typed<T: DeserializeOwned>(object: Value) -> Result<T, String> {
    serde_path_to_error::deserialize(object)
        .map_err(|e| format!("malformed {}: {}", e.path(), e.inner()))
}

/// Loads `dir` now and again after every change, handing each report over
/// (the receiver owns it, so nothing here keeps a large set alive);
/// returns when the receiver is gone. inotify wakes it as soon as a file
/// is written, renamed or removed; the `interval` poll catches what inotify
/// cannot see (the directory appearing later, a watch that failed).
pub async fn watch(dir: PathBuf, interval: Duration, tx: mpsc::Sender<LoadReport>) {
    let mut source = ManifestSource::new(dir);
    let mut events = DirEvents::new(source.dir());
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        // File I/O blocks: keep it off the async workers.
        let reloaded = tokio::task::spawn_blocking(move || {
            let report = source.reload();
            (source, report)
        })
        .await;
        let Ok((returned, report)) = reloaded else {
            return; // the runtime is shutting down
        };
        source = returned;
        if let Some(report) = report
            && tx.send(report).await.is_err()
        {
            return;
        }
        if events.is_none() {
            events = DirEvents::new(source.dir());
        }
        tokio::select! {
            _ = ticker.tick() => {}
            _ = DirEvents::next(&mut events) => {}
            _ = tx.closed() => return,
        }
    }
}

/// inotify on the manifest directory: file writes finished, renames in and
/// out, removals. A ConfigMap update is a rename of its `..data` link.
struct DirEvents(tokio::io::unix::AsyncFd<InotifyFd>);

/// tokio registers raw descriptors; nix's Inotify only lends a borrowed one.
struct InotifyFd(Inotify);

impl std::os::fd::AsRawFd for InotifyFd {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        use std::os::fd::AsFd;
        self.0.as_fd().as_raw_fd()
    }
}

impl DirEvents {
    fn new(dir: &Path) -> Option<DirEvents> {
        let inotify = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC).ok()?;
        let mask = AddWatchFlags::IN_CLOSE_WRITE
            | AddWatchFlags::IN_MOVED_TO
            | AddWatchFlags::IN_MOVED_FROM
            | AddWatchFlags::IN_CREATE
            | AddWatchFlags::IN_DELETE
            | AddWatchFlags::IN_ATTRIB;
        inotify.add_watch(dir, mask).ok()?;
        // SAFETY: InotifyFd owns the descriptor and always returns the same
        // one; it is closed only when the AsyncFd (its owner) is dropped.
        unsafe { tokio::io::unix::AsyncFd::register(InotifyFd(inotify)) }
            .ok()
            .map(DirEvents)
    }

    /// Waits for events and drains them all: one reload covers a burst.
    /// Without a watch (or once it failed) it never returns and leaves the
    /// work to the poll.
    async fn next(events: &mut Option<DirEvents>) {
        let Some(DirEvents(fd)) = events else {
            return std::future::pending().await;
        };
        loop {
            let Ok(mut ready) = fd.readable().await else {
                *events = None;
                return std::future::pending().await;
            };
            match fd.get_ref().0.read_events() {
                Ok(read) => {
                    // The directory itself went away: watch it again later.
                    if read.iter().any(|e| {
                        e.mask
                            .intersects(AddWatchFlags::IN_IGNORED | AddWatchFlags::IN_DELETE_SELF)
                    }) {
                        *events = None;
                    }
                    return;
                }
                Err(nix::errno::Errno::EAGAIN) => ready.clear_ready(),
                Err(_) => {
                    *events = None;
                    return;
                }
            }
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
metadata: {name: n2}
spec: {podCIDR: 10.244.2.0/24}
status: {addresses: [{type: ExternalIP, address: 192.0.2.2}]}
---
apiVersion: v1
kind: Node
metadata: {name: n3}
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
        let n3 = &report.cluster.nodes["n3"];
        assert_eq!((n3.internal_ip, n3.pod_cidrs.len()), (None, 0));
        assert_eq!(report.errors.len(), 2, "{:?}", report.errors);
        assert!(
            report.errors[0]
                .contains("Node bad-cidr: spec.podCIDRs: 10.244.3.1/24 has host bits set"),
            "{:?}",
            report.errors
        );
        assert!(
            report.errors[1]
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
            "b-objects.yaml: document 5: not a Kubernetes object (no kind)",
            // Duplicates are found when the files are put together.
            "b-objects.yaml: document 4: Service shop/fine: defined more than once",
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
