//! One manifest file -> its objects, converted: every document (JSON, or
//! YAML with several documents), `List`s opened item by item without ever
//! building the whole list, objects of the kinds Tern reads turned into the
//! model, and the rest counted or reported.

use std::path::Path;
use std::sync::Arc;

use k8s_openapi::api::core::v1 as core;
use k8s_openapi::api::discovery::v1 as discovery;
use k8s_openapi::api::networking::v1 as networking;
use serde::Deserializer;
use serde::de::{
    DeserializeOwned, DeserializeSeed, Error as _, IgnoredAny, MapAccess, SeqAccess, Visitor,
};
use serde_json::Value;
use serde_json::value::RawValue;

use crate::model::{EndpointSlice, Namespace, NetworkPolicy, Node, Pod, Service};
use crate::sources::{self, Conversion, NodeNames, RejectReason, Rejection, shortened};

/// What a file's documents hold, converted, each object with where in the
/// file it is.
#[derive(Debug, Default)]
pub struct FileObjects {
    pub services: Vec<(String, Arc<Service>)>,
    pub slices: Vec<(String, Arc<EndpointSlice>)>,
    pub nodes: Vec<(String, Arc<Node>)>,
    pub namespaces: Vec<(String, Arc<Namespace>)>,
    pub pods: Vec<(String, Arc<Pod>)>,
    pub network_policies: Vec<(String, Arc<NetworkPolicy>)>,
    pub errors: Vec<Rejection>,
    pub warnings: Vec<String>,
    pub ignored: usize,
    /// The source's shared node names (`parse_file` lends them in).
    pub node_names: NodeNames,
}

/// A file's objects as kept between reloads (so a change re-reads only the
/// files that changed), each kind sorted by key with one object per key.
/// Where each object was is not kept: a string such as "scale.json: document
/// 1: items[12345]: Service scale/s12345" per object came to ~17 MB with
/// 100 000 Services; duplicates within the file are reported with it as the
/// file is read.
#[derive(Debug, Default)]
pub struct FileContents {
    pub services: Vec<Arc<Service>>,
    pub slices: Vec<Arc<EndpointSlice>>,
    pub nodes: Vec<Arc<Node>>,
    pub namespaces: Vec<Arc<Namespace>>,
    pub pods: Vec<Arc<Pod>>,
    pub network_policies: Vec<Arc<NetworkPolicy>>,
    pub errors: Vec<Rejection>,
    pub warnings: Vec<String>,
    pub ignored: usize,
}

/// Reports an object whose key an earlier one already has.
pub(super) fn duplicate(kind: &'static str, what: &str) -> Rejection {
    Rejection::new(
        kind,
        RejectReason::Duplicate,
        format!("{what}: defined more than once; the first one is used"),
    )
}

/// The first object of each key of `located` (sorted by key, stably); the
/// others are reported.
fn first_of_each<T, K: Ord>(
    mut located: Vec<(String, Arc<T>)>,
    key: impl Fn(&T) -> &K,
    kind: &'static str,
    errors: &mut Vec<Rejection>,
) -> Vec<Arc<T>> {
    located.sort_by(|a, b| key(&a.1).cmp(key(&b.1)));
    let mut kept: Vec<Arc<T>> = Vec::with_capacity(located.len());
    for (what, object) in located {
        match kept.last() {
            Some(last) if key(last) == key(&object) => errors.push(duplicate(kind, &what)),
            _ => kept.push(object),
        }
    }
    kept
}

/// `node_names`: the source's, shared by every file it reads.
pub(super) fn parse_file(path: &Path, node_names: &mut NodeNames) -> FileContents {
    let file = path.file_name().map_or_else(
        || path.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    );
    let json = path.extension().is_some_and(|e| e == "json");
    let mut objects = FileObjects {
        node_names: std::mem::take(node_names),
        ..FileObjects::default()
    };
    let parsed = std::fs::read_to_string(path)
        .map_err(|e| (RejectReason::Unreadable, format!("cannot read: {e}")))
        .and_then(|text| {
            read_documents(&text, json, &file, &mut objects)
                .map_err(|e| (RejectReason::Malformed, e))
        });
    *node_names = std::mem::take(&mut objects.node_names);
    match parsed {
        Ok(()) => {
            // Sorted once here, so that merging the files is one pass. The
            // sort is stable: of two equal keys the file's first stays first.
            let FileObjects {
                services,
                slices,
                nodes,
                namespaces,
                pods,
                network_policies,
                mut errors,
                warnings,
                ignored,
                node_names: _,
            } = objects;
            FileContents {
                services: first_of_each(services, |s| &s.key, "Service", &mut errors),
                slices: first_of_each(slices, |s| &s.key, "EndpointSlice", &mut errors),
                nodes: first_of_each(nodes, |n| &n.name, "Node", &mut errors),
                namespaces: first_of_each(namespaces, |n| &n.name, "Namespace", &mut errors),
                pods: first_of_each(pods, |p| &p.key, "Pod", &mut errors),
                network_policies: first_of_each(
                    network_policies,
                    |p| &p.key,
                    "NetworkPolicy",
                    &mut errors,
                ),
                errors,
                warnings,
                ignored,
            }
        }
        // A file that does not parse is rejected whole: half a file could
        // drop a slice and silently shrink a Service.
        Err((reason, e)) => FileContents {
            errors: vec![Rejection::new("File", reason, format!("{file}: {e}"))],
            ..FileContents::default()
        },
    }
}

/// Reads every document of the file into `objects`. JSON is YAML too, but
/// serde_json reads it several times faster. Public for the fuzz targets.
pub fn read_documents(
    text: &str,
    json: bool,
    file: &str,
    objects: &mut FileObjects,
) -> Result<(), String> {
    let place = |index: usize| format!("{file}: document {index}");
    if json {
        let mut de = serde_json::Deserializer::from_str(text);
        Document(place(1), objects, true)
            .deserialize(&mut de)
            .and_then(|()| de.end())
            .map_err(|e| format!("not valid JSON: {e}"))?;
        return Ok(());
    }
    for (index, document) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
        Document(place(index + 1), &mut *objects, false)
            .deserialize(document)
            .map_err(|e| format!("not valid YAML: {e}"))?;
    }
    Ok(())
}

/// One document, read without building it whole: the items of a `List`
/// are converted one at a time, so a List of 100 000 objects never exists
/// as a single tree (that tree is many times the size of the file).
/// `true`: the document is JSON, whose items are typed from their text.
struct Document<'a>(String, &'a mut FileObjects, bool);

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
        let Document(place, file, json) = self;
        let mut fields = serde_json::Map::new();
        // Items are converted as they come, into their own set: only once
        // the document's kind is known (kubectl writes it after the items)
        // is it clear they belong to a List. Items without a kind wait for
        // the List's (a typed list such as ServiceList leaves it out).
        let mut listed = FileObjects {
            node_names: std::mem::take(&mut file.node_names),
            ..FileObjects::default()
        };
        let mut kindless = Vec::new();
        let mut read_fields = || {
            while let Some(key) = map.next_key::<String>()? {
                if key == "items" {
                    map.next_value_seed(Items {
                        json,
                        place: &place,
                        listed: &mut listed,
                        kindless: &mut kindless,
                    })?;
                } else {
                    let value = map.next_value::<Value>()?;
                    fields.insert(key, value);
                }
            }
            Ok(())
        };
        let read = read_fields();
        // Given back whatever became of the document.
        file.node_names = std::mem::take(&mut listed.node_names);
        read?;
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
        self.1.errors.push(Rejection::new(
            "File",
            RejectReason::Malformed,
            format!("{}: not a Kubernetes object", self.0),
        ));
    }
}

/// A List's `items`, each converted as soon as it is read.
struct Items<'a> {
    /// Read from JSON: each item is typed straight from its text.
    json: bool,
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

    fn visit_seq<A: SeqAccess<'de>>(mut self, mut seq: A) -> Result<(), A::Error> {
        let mut index = 0;
        if self.json {
            // Typing an object from its text allocates only what the typed
            // object keeps; a `Value` tree first costs as much again (it
            // was half of the time to read 100 000 Services).
            while let Some(item) = seq.next_element::<&RawValue>()? {
                let place = format!("{}: items[{index}]", self.place);
                index += 1;
                // Only an object: serde would read a struct from an array too.
                let object = item.get().starts_with('{');
                match serde_json::from_str::<TextHead>(item.get()).map(Head::from) {
                    Ok(head)
                        if object && head.kind.as_ref().is_some_and(|k| !k.ends_with("List")) =>
                    {
                        add_typed(head, Object::Json(item.get()), &place, self.listed);
                    }
                    // Kindless, a List or oddly shaped: as a tree.
                    _ => self.tree_item(
                        serde_json::from_str(item.get()).map_err(A::Error::custom)?,
                        place,
                    ),
                }
            }
            return Ok(());
        }
        while let Some(item) = seq.next_element::<Value>()? {
            let place = format!("{}: items[{index}]", self.place);
            index += 1;
            self.tree_item(item, place);
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

impl Items<'_> {
    /// An item read as a tree: converted now, or kept for the List's kind.
    fn tree_item(&mut self, item: Value, place: String) {
        if item.get("kind").is_some() {
            add_listed(item, place, self.listed);
        } else {
            self.kindless.push((place, item));
        }
    }
}

/// What an object is, known before it is typed.
struct Head {
    api_version: Option<String>,
    kind: Option<String>,
    metadata: HeadMetadata,
}

struct HeadMetadata {
    namespace: Option<String>,
    name: Option<String>,
}

/// The head as read from an object's text; its metadata as a (small) tree,
/// read as the tree path reads it: a name that is not a string is none.
#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct TextHead {
    api_version: Option<String>,
    kind: Option<String>,
    metadata: Option<Value>,
}

impl From<TextHead> for Head {
    fn from(head: TextHead) -> Self {
        let text = |field: &str| {
            let value = head.metadata.as_ref()?.get(field)?;
            value.as_str().map(str::to_owned)
        };
        Head {
            metadata: HeadMetadata {
                namespace: text("namespace"),
                name: text("name"),
            },
            api_version: head.api_version,
            kind: head.kind,
        }
    }
}

/// An object as a tree or as JSON text, typed on demand.
enum Object<'a> {
    Tree(Value),
    Json(&'a str),
}

impl Object<'_> {
    fn typed<T: DeserializeOwned>(self) -> Result<T, String> {
        // Tracking the path costs on every field (15% of reading a large
        // List); only an object that fails is read again to say where.
        let fast = match &self {
            Object::Tree(value) => T::deserialize(value).ok(),
            Object::Json(text) => serde_json::from_str(text).ok(),
        };
        if let Some(typed) = fast {
            return Ok(typed);
        }
        match self {
            Object::Tree(value) => serde_path_to_error::deserialize(value),
            Object::Json(text) => {
                serde_path_to_error::deserialize(&mut serde_json::Deserializer::from_str(text))
            }
        }
        .map_err(|e| {
            // Read from text, serde_json adds where in the item's text it
            // failed; the path says it better, as it does for a tree.
            let inner = e.inner().to_string();
            let inner = match e.inner().line() {
                0 => inner.as_str(),
                _ => inner.rsplit_once(" at line ").map_or(&*inner, |(m, _)| m),
            };
            format!("malformed {}: {inner}", e.path())
        })
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
            pods,
            network_policies,
            errors,
            warnings,
            ignored,
            node_names: _, // given back by the document that lent them
        } = other;
        self.services.extend(services);
        self.slices.extend(slices);
        self.nodes.extend(nodes);
        self.namespaces.extend(namespaces);
        self.pods.extend(pods);
        self.network_policies.extend(network_policies);
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
    let text = |pointer: &str| {
        object
            .pointer(pointer)
            .and_then(Value::as_str)
            .map(str::to_owned)
    };
    let head = Head {
        api_version: text("/apiVersion"),
        kind: text("/kind"),
        metadata: HeadMetadata {
            namespace: text("/metadata/namespace"),
            name: text("/metadata/name"),
        },
    };
    add_typed(head, Object::Tree(object), place, file);
}

/// Converts an object of a kind Tern reads into the model.
fn add_typed(head: Head, object: Object, place: &str, file: &mut FileObjects) {
    let api_version = head.api_version.as_deref().unwrap_or_default();
    let Some(kind) = head.kind.as_deref() else {
        return file.errors.push(Rejection::new(
            "File",
            RejectReason::Malformed,
            format!("{place}: not a Kubernetes object (no kind)"),
        ));
    };
    let namespace = head.metadata.namespace.as_deref().unwrap_or("default");
    let name = head.metadata.name.as_deref().unwrap_or("(unnamed)");
    let (namespace, name) = (shortened(namespace), shortened(name));
    let mut what = if kind == "Node" || kind == "Namespace" {
        format!("{place}: {kind} {name}") // cluster-scoped
    } else {
        format!("{place}: {kind} {namespace}/{name}")
    };
    // Kept with the object (duplicate reports): format! leaves spare
    // capacity, ~30 B of 75 here.
    what.shrink_to_fit();
    // Matching the group too keeps look-alikes out (a Knative Service).
    match (api_version, kind) {
        ("v1", "Service") => {
            let converted = object
                .typed::<core::Service>()
                .map(|s| sources::service(&s));
            if let Some(service) = accept(converted, "Service", &what, file) {
                file.services.push((what, Arc::new(service)));
            }
        }
        ("discovery.k8s.io/v1", "EndpointSlice") => {
            let converted = object
                .typed::<discovery::EndpointSlice>()
                .map(|s| sources::endpoint_slice(&s, &mut file.node_names));
            if let Some(slice) = accept(converted, "EndpointSlice", &what, file) {
                file.slices.push((what, Arc::new(slice)));
            }
        }
        ("v1", "Node") => {
            let converted = object.typed::<core::Node>().map(|n| sources::node(&n));
            if let Some(node) = accept(converted, "Node", &what, file) {
                file.nodes.push((what, Arc::new(node)));
            }
        }
        ("v1", "Namespace") => {
            let converted = object
                .typed::<core::Namespace>()
                .map(|n| sources::namespace(&n));
            if let Some(namespace) = accept(converted, "Namespace", &what, file) {
                file.namespaces.push((what, Arc::new(namespace)));
            }
        }
        ("v1", "Pod") => {
            let converted = object.typed::<core::Pod>().map(|p| sources::pod(&p));
            if let Some(pod) = accept(converted, "Pod", &what, file) {
                file.pods.push((what, Arc::new(pod)));
            }
        }
        ("networking.k8s.io/v1", "NetworkPolicy") => {
            let converted = object
                .typed::<networking::NetworkPolicy>()
                .map(|p| sources::network_policy(&p));
            if let Some(policy) = accept(converted, "NetworkPolicy", &what, file) {
                file.network_policies.push((what, Arc::new(policy)));
            }
        }
        _ => file.ignored += 1,
    }
}

/// Files a conversion's errors, warnings or ignoring; the object if used.
fn accept<T>(
    converted: Result<Conversion<T>, String>,
    kind: &'static str,
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
        Ok(Conversion::Rejected(refusal)) => {
            file.errors.push(Rejection::new(
                kind,
                refusal.reason,
                format!("{what}: {refusal}"),
            ));
            None
        }
        Err(e) => {
            let message = format!("{what}: {e}");
            file.errors
                .push(Rejection::new(kind, RejectReason::Malformed, message));
            None
        }
    }
}
