//! The Kubernetes API source: one watcher per kind Tern reads (list, then
//! watch from the list's resourceVersion; a re-list after `410 Gone`;
//! bookmarks; a short capped back-off on errors, `backoff`), all
//! folded into one store. A snapshot goes out only once every kind has been
//! listed in full, so the datapath never sees a Service whose slices have
//! not arrived yet; a re-list replaces a kind's objects in one step.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Debug;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use futures::stream::{BoxStream, StreamExt};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client, Resource};
use serde::de::DeserializeOwned;
use tokio::sync::mpsc;
use tracing::{info, warn};

use super::api_errors::ErrorLog;
use super::{Conversion, LoadReport, Refusal, Rejection, shortened};
use crate::model::{
    Cluster, EndpointSlice, Map, Namespace, NetworkPolicy, Node, Pod, Service, ServiceKey, SliceKey,
};

/// Every resource the agent reads from the API, as (API group, resource),
/// each only with `list` and `watch`: the ClusterRole in `manifests/` grants
/// exactly these (a test checks it).
pub const WATCHED_RESOURCES: &[(&str, &str)] = &[
    ("", "nodes"),
    ("", "namespaces"),
    ("", "services"),
    ("", "pods"),
    ("discovery.k8s.io", "endpointslices"),
    ("networking.k8s.io", "networkpolicies"),
];

/// A client for the API server: from `kubeconfig`, or the pod's service
/// account. `api_server` replaces the address either names: inside the
/// cluster the default is the `kubernetes` Service's ClusterIP, which only
/// works once a proxy (Tern itself) serves it.
pub async fn client(kubeconfig: Option<&Path>, api_server: Option<&str>) -> anyhow::Result<Client> {
    let mut config = match kubeconfig {
        Some(path) => {
            let file = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("reading kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(file, &Default::default())
                .await
                .with_context(|| format!("kubeconfig {}", path.display()))?
        }
        None => kube::Config::incluster()
            .context("no in-cluster service account (outside a pod, pass --kubeconfig)")?,
    };
    if let Some(url) = api_server {
        config.cluster_url = url
            .parse()
            .with_context(|| format!("api server {url:?} is not a URL"))?;
    }
    Client::try_from(config).context("building the API client")
}

/// Watches the API and hands over a snapshot after the first full sync and
/// after every change, until the receiver is gone. Changes that arrive
/// while the receiver is busy are folded into one snapshot. Every pod of
/// the cluster is watched, not only this node's: policy needs the address
/// and labels of every peer, so the node's name is no longer used.
pub async fn watch(
    client: Client,
    _node_name: String,
    tx: mpsc::Sender<LoadReport>,
    on_error: impl Fn(),
) {
    let all = watcher::Config::default();
    let mut updates = futures::stream::select_all([
        kind(
            Api::all(client.clone()),
            all.clone(),
            super::service,
            Update::Services,
        ),
        kind(
            Api::all(client.clone()),
            all.clone(),
            {
                let mut node_names = super::NodeNames::default();
                move |slice| super::endpoint_slice(slice, &mut node_names)
            },
            Update::Slices,
        ),
        kind(
            Api::all(client.clone()),
            all.clone(),
            super::node,
            Update::Nodes,
        ),
        kind(
            Api::all(client.clone()),
            all.clone(),
            super::namespace,
            Update::Namespaces,
        ),
        kind(
            Api::all(client.clone()),
            all.clone(),
            super::pod,
            Update::Pods,
        ),
        kind(
            Api::all(client),
            all,
            super::network_policy,
            Update::NetworkPolicies,
        ),
    ]);
    let mut store = ApiStore::default();
    let mut changed = false;
    let mut announced = false;
    let mut errors = ErrorLog::default();
    loop {
        tokio::select! {
            update = updates.next() => match update {
                Some(Update::Error(error)) => {
                    on_error();
                    let message = error.to_string();
                    if errors.error(&message, Instant::now()) {
                        warn!("API watch: {message} (retrying with back-off; the same error again within {}s is only counted)", super::api_errors::REPEAT.as_secs());
                    }
                }
                Some(update) => {
                    if update.is_answer()
                        && let Some(spell) = errors.answered(Instant::now())
                    {
                        info!(
                            errors = spell.errors,
                            not_logged = spell.not_logged,
                            "API: events again after {:.1?} of failed requests",
                            spell.lasted
                        );
                    }
                    changed |= store.apply(update);
                }
                None => return,
            },
            permit = tx.reserve(), if changed && store.synced() => {
                let Ok(permit) = permit else { return };
                if !announced {
                    announced = true;
                    info!("API: first full sync");
                }
                permit.send(store.snapshot());
                changed = false;
            }
            _ = tx.closed() => return,
        }
    }
}

/// One watched object as kept: used (with warnings), rejected, or not ours.
#[derive(Debug, PartialEq)]
enum Entry<T> {
    Used(Arc<T>, Vec<String>),
    Rejected(Refusal),
    Ignored,
}

// Not derived: that would ask for `T: Clone`; sharing needs only the `Arc`.
impl<T> Clone for Entry<T> {
    fn clone(&self) -> Self {
        match self {
            Entry::Used(object, warnings) => Entry::Used(object.clone(), warnings.clone()),
            Entry::Rejected(reason) => Entry::Rejected(reason.clone()),
            Entry::Ignored => Entry::Ignored,
        }
    }
}

impl<T> Entry<T> {
    /// Something a snapshot reports: warnings, a rejection, not ours.
    fn is_notable(&self) -> bool {
        !matches!(self, Entry::Used(_, warnings) if warnings.is_empty())
    }
}

impl<T> From<Conversion<T>> for Entry<T> {
    fn from(conversion: Conversion<T>) -> Self {
        match conversion {
            Conversion::Accepted(object, warnings) => Entry::Used(Arc::new(object), warnings),
            Conversion::Rejected(reason) => Entry::Rejected(reason),
            Conversion::Ignored(_) => Entry::Ignored,
        }
    }
}

/// An object's "namespace/name" (or "name" when cluster-scoped) and entry.
type Keyed<T> = (String, Entry<T>);

enum Update {
    Services(Event<Keyed<Service>>),
    Slices(Event<Keyed<EndpointSlice>>),
    Nodes(Event<Keyed<Node>>),
    Namespaces(Event<Keyed<Namespace>>),
    Pods(Event<Keyed<Pod>>),
    NetworkPolicies(Event<Keyed<NetworkPolicy>>),
    Error(watcher::Error),
}

impl Update {
    /// An event the API server sent: not an error, nor the `Init` a
    /// watcher reports before it even tries to list.
    fn is_answer(&self) -> bool {
        !matches!(
            self,
            Update::Error(_)
                | Update::Services(Event::Init)
                | Update::Slices(Event::Init)
                | Update::Nodes(Event::Init)
                | Update::Namespaces(Event::Init)
                | Update::Pods(Event::Init)
                | Update::NetworkPolicies(Event::Init)
        )
    }
}

/// The watcher of one kind, its objects converted as they arrive (the API
/// types are dropped at once).
fn kind<K, T>(
    api: Api<K>,
    config: watcher::Config,
    mut convert: impl FnMut(&K) -> Conversion<T> + Send + 'static,
    wrap: fn(Event<Keyed<T>>) -> Update,
) -> BoxStream<'static, Update>
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + 'static,
    T: Send + 'static,
{
    let mut keyed = move |object: K| {
        let meta = object.meta();
        let name = meta.name.clone().unwrap_or_default();
        let key = match &meta.namespace {
            Some(namespace) => format!("{namespace}/{name}"),
            None => name,
        };
        (key, Entry::from(convert(&object)))
    };
    watcher::watcher(api, config)
        .backoff(super::backoff::ApiBackoff::default())
        .map(move |item| match item {
            Ok(event) => wrap(match event {
                Event::Apply(object) => Event::Apply(keyed(object)),
                Event::Delete(object) => Event::Delete(keyed(object)),
                Event::Init => Event::Init,
                Event::InitApply(object) => Event::InitApply(keyed(object)),
                Event::InitDone => Event::InitDone,
            }),
            Err(error) => Update::Error(error),
        })
        .boxed()
}

/// One kind's objects: those in force (by API key, and the used ones by
/// the model's key, ready to be handed over), and those of a list in
/// progress.
struct Objects<K, T> {
    live: BTreeMap<String, Entry<T>>,
    /// The keys of `live` with something to report (warnings, a
    /// rejection, ignored): a snapshot walks these, not every object.
    notable: BTreeSet<String>,
    used: Map<K, Arc<T>>,
    model_key: fn(&T) -> K,
    /// Filled between `Init` and `InitDone`, then swapped in whole.
    listing: Option<BTreeMap<String, Entry<T>>>,
    synced: bool,
}

impl<K: Ord + Clone, T: PartialEq> Objects<K, T> {
    fn new(model_key: fn(&T) -> K) -> Self {
        Objects {
            live: BTreeMap::new(),
            notable: BTreeSet::new(),
            used: Map::new(),
            model_key,
            listing: None,
            synced: false,
        }
    }

    /// Whether the objects in force changed.
    fn apply(&mut self, event: Event<Keyed<T>>) -> bool {
        match event {
            Event::Init => {
                self.listing = Some(BTreeMap::new());
                false
            }
            Event::InitApply((key, entry)) => {
                self.listing.get_or_insert_default().insert(key, entry);
                false
            }
            Event::InitDone => {
                let mut listed = self.listing.take().unwrap_or_default();
                // Objects that did not change keep their `Arc`: the
                // compilers see them as the very same and skip them.
                for (key, entry) in listed.iter_mut() {
                    if let Some(old) = self.live.get(key)
                        && old == entry
                    {
                        *entry = old.clone();
                    }
                }
                let changed = !self.synced || listed != self.live;
                self.live = listed;
                self.notable = self
                    .live
                    .iter()
                    .filter(|(_, entry)| entry.is_notable())
                    .map(|(key, _)| key.clone())
                    .collect();
                self.used = self
                    .live
                    .values()
                    .filter_map(|entry| match entry {
                        Entry::Used(object, _) => Some(((self.model_key)(object), object.clone())),
                        _ => None,
                    })
                    .collect();
                self.synced = true;
                changed
            }
            Event::Apply((key, entry)) => {
                if self.live.get(&key) == Some(&entry) {
                    return false; // e.g. a Pod's status moved on, not its IPs
                }
                if let Some(Entry::Used(old, _)) = self.live.get(&key) {
                    self.used.remove(&(self.model_key)(old));
                }
                if let Entry::Used(object, _) = &entry {
                    self.used.insert((self.model_key)(object), object.clone());
                }
                if entry.is_notable() {
                    self.notable.insert(key.clone());
                } else {
                    self.notable.remove(&key);
                }
                self.live.insert(key, entry);
                true
            }
            Event::Delete((key, _)) => {
                self.notable.remove(&key);
                match self.live.remove(&key) {
                    Some(Entry::Used(old, _)) => {
                        self.used.remove(&(self.model_key)(&old));
                        true
                    }
                    Some(_) => true,
                    None => false,
                }
            }
        }
    }

    /// The used objects (a structure-sharing copy); rejections and warnings
    /// named by `kind` and key go into `report`.
    fn collect(&self, kind: &'static str, report: &mut LoadReport) -> Map<K, Arc<T>> {
        let notable = self
            .notable
            .iter()
            .filter_map(|key| Some((key, self.live.get(key)?)));
        for (key, entry) in notable {
            match entry {
                Entry::Used(_, warnings) if !warnings.is_empty() => {
                    let key = shortened(key);
                    report
                        .warnings
                        .extend(warnings.iter().map(|w| format!("{kind} {key}: {w}")))
                }
                Entry::Used(..) => {}
                Entry::Rejected(refusal) => report.errors.push(Rejection::new(
                    kind,
                    refusal.reason,
                    format!("{kind} {}: {refusal}", shortened(key)),
                )),
                Entry::Ignored => report.ignored += 1,
            }
        }
        self.used.clone()
    }
}

struct ApiStore {
    services: Objects<ServiceKey, Service>,
    slices: Objects<SliceKey, EndpointSlice>,
    nodes: Objects<String, Node>,
    namespaces: Objects<String, Namespace>,
    pods: Objects<(String, String), Pod>,
    network_policies: Objects<(String, String), NetworkPolicy>,
}

impl Default for ApiStore {
    fn default() -> Self {
        ApiStore {
            services: Objects::new(|s| s.key.clone()),
            slices: Objects::new(|s| s.key.clone()),
            nodes: Objects::new(|n| n.name.clone()),
            namespaces: Objects::new(|n| n.name.clone()),
            pods: Objects::new(|p| p.key.clone()),
            network_policies: Objects::new(|p| p.key.clone()),
        }
    }
}

impl ApiStore {
    fn apply(&mut self, update: Update) -> bool {
        match update {
            Update::Services(event) => self.services.apply(event),
            Update::Slices(event) => self.slices.apply(event),
            Update::Nodes(event) => self.nodes.apply(event),
            Update::Namespaces(event) => self.namespaces.apply(event),
            Update::Pods(event) => self.pods.apply(event),
            Update::NetworkPolicies(event) => self.network_policies.apply(event),
            Update::Error(_) => false,
        }
    }

    /// Every kind listed in full at least once.
    fn synced(&self) -> bool {
        self.services.synced
            && self.slices.synced
            && self.nodes.synced
            && self.namespaces.synced
            && self.pods.synced
            && self.network_policies.synced
    }

    fn snapshot(&self) -> LoadReport {
        let mut report = LoadReport::default();
        report.cluster = Cluster {
            services: self.services.collect("Service", &mut report),
            slices: self.slices.collect("EndpointSlice", &mut report),
            nodes: self.nodes.collect("Node", &mut report),
            namespaces: self.namespaces.collect("Namespace", &mut report),
            pods: self.pods.collect("Pod", &mut report),
            network_policies: self.network_policies.collect("NetworkPolicy", &mut report),
        };
        report
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ns(name: &str, maglev: bool) -> Keyed<Namespace> {
        let lb_algorithm = maglev.then_some(crate::model::LbAlgorithm::Maglev);
        let namespace = Namespace {
            name: name.into(),
            lb_algorithm,
            labels: Default::default(),
        };
        (name.into(), Entry::Used(Arc::new(namespace), vec![]))
    }

    fn namespaces() -> Objects<String, Namespace> {
        Objects::new(|n| n.name.clone())
    }

    fn used(objects: &Objects<String, Namespace>, key: &str) -> Arc<Namespace> {
        match &objects.live[key] {
            Entry::Used(object, _) => object.clone(),
            other => panic!("{key}: {other:?}"),
        }
    }

    #[test]
    fn a_relist_takes_effect_whole_at_its_end() {
        let mut objects = namespaces();
        assert!(!objects.apply(Event::Init));
        assert!(!objects.apply(Event::InitApply(ns("a", false))));
        assert!(!objects.synced && objects.live.is_empty());
        assert!(objects.apply(Event::InitDone));
        assert!(objects.synced);
        let a = used(&objects, "a");

        // A re-list (after 410 Gone): nothing changes until InitDone; then
        // b is gone, c is new, and the unchanged a keeps its object.
        assert!(objects.apply(Event::Apply(ns("b", false))));
        assert!(!objects.apply(Event::Init));
        assert!(!objects.apply(Event::InitApply(ns("a", false))));
        assert!(!objects.apply(Event::InitApply(ns("c", true))));
        assert_eq!(objects.live.len(), 2);
        assert!(objects.apply(Event::InitDone));
        assert_eq!(objects.live.keys().collect::<Vec<_>>(), ["a", "c"]);
        assert_eq!(objects.used.keys().collect::<Vec<_>>(), ["a", "c"]);
        assert!(Arc::ptr_eq(&a, &used(&objects, "a")));

        // The same list again changes nothing.
        objects.apply(Event::Init);
        objects.apply(Event::InitApply(ns("a", false)));
        objects.apply(Event::InitApply(ns("c", true)));
        assert!(!objects.apply(Event::InitDone));
    }

    #[test]
    fn a_list_cut_off_midway_is_dropped_whole_and_listed_again() {
        let mut objects = namespaces();
        objects.apply(Event::Init);
        objects.apply(Event::InitApply(ns("a", false)));
        assert!(objects.apply(Event::InitDone));
        // A re-list breaks after one item; the watcher starts it again
        // (a new Init): what the broken one brought is never used, and the
        // objects in force stay until the new list is whole.
        objects.apply(Event::Init);
        objects.apply(Event::InitApply(ns("half", false)));
        objects.apply(Event::Init);
        objects.apply(Event::InitApply(ns("b", false)));
        assert_eq!(objects.used.keys().collect::<Vec<_>>(), ["a"]);
        assert!(objects.apply(Event::InitDone));
        assert_eq!(objects.live.keys().collect::<Vec<_>>(), ["b"]);
        assert_eq!(objects.used.keys().collect::<Vec<_>>(), ["b"]);
    }

    #[test]
    fn an_update_that_converts_the_same_is_no_change() {
        let mut objects = namespaces();
        objects.apply(Event::InitDone);
        assert!(objects.apply(Event::Apply(ns("a", false))));
        assert!(!objects.apply(Event::Apply(ns("a", false))));
        assert!(objects.apply(Event::Apply(ns("a", true))));
        assert_eq!(
            objects.used["a"].lb_algorithm,
            Some(crate::model::LbAlgorithm::Maglev)
        );
        // Rejected now: out of the used ones, into the errors.
        let rejected = Entry::Rejected(Refusal::from("bad annotation"));
        assert!(objects.apply(Event::Apply(("a".into(), rejected))));
        assert!(objects.used.is_empty());
        assert!(objects.apply(Event::Apply(ns("a", true))));
        assert!(objects.apply(Event::Delete(ns("a", true))));
        assert!(!objects.apply(Event::Delete(ns("a", true))));
        assert!(objects.used.is_empty() && objects.live.is_empty());
    }

    #[test]
    fn a_snapshot_reports_what_is_notable_now() {
        let mut objects = namespaces();
        let report = |objects: &Objects<String, Namespace>| {
            let mut report = LoadReport::default();
            objects.collect("Namespace", &mut report);
            (report.errors.len(), report.warnings, report.ignored)
        };
        let warned = |name: &str| {
            let (key, entry) = ns(name, false);
            match entry {
                Entry::Used(object, _) => (key, Entry::Used(object, vec!["odd".into()])),
                other => (key, other),
            }
        };
        objects.apply(Event::Init);
        objects.apply(Event::InitApply(ns("plain", false)));
        objects.apply(Event::InitApply(warned("warned")));
        objects.apply(Event::InitApply((
            "bad".into(),
            Entry::Rejected(Refusal::from("no")),
        )));
        objects.apply(Event::InitApply(("other".into(), Entry::Ignored)));
        objects.apply(Event::InitDone);
        assert_eq!(
            report(&objects),
            (1, vec!["Namespace warned: odd".to_owned()], 1)
        );
        // Fixed, replaced, deleted: the report follows each event.
        objects.apply(Event::Apply(ns("bad", false)));
        objects.apply(Event::Apply(warned("plain")));
        objects.apply(Event::Delete(ns("warned", false)));
        objects.apply(Event::Delete(("other".into(), Entry::Ignored)));
        assert_eq!(
            report(&objects),
            (0, vec!["Namespace plain: odd".to_owned()], 0)
        );
    }

    #[test]
    fn a_snapshot_waits_for_every_kind_and_names_rejections() {
        let mut store = ApiStore::default();
        store.apply(Update::Namespaces(Event::InitDone));
        store.apply(Update::Services(Event::InitApply((
            "default/bad".into(),
            Entry::Rejected(Refusal::from("unknown spec.type \"X\"")),
        ))));
        store.apply(Update::Services(Event::InitDone));
        store.apply(Update::Slices(Event::InitDone));
        store.apply(Update::Nodes(Event::InitDone));
        assert!(!store.synced());
        store.apply(Update::Pods(Event::InitDone));
        assert!(!store.synced());
        // An invalid policy is used all the same (failing closed), and
        // its warning names it.
        let policy = NetworkPolicy {
            key: ("default".into(), "deny".into()),
            pod_selector: Default::default(),
            ingress: Some(vec![]),
            egress: None,
            error: Some("spec.ingress[0].from[0]: names no peer".into()),
        };
        store.apply(Update::NetworkPolicies(Event::InitApply((
            "default/deny".into(),
            Entry::Used(Arc::new(policy), vec!["fails closed".into()]),
        ))));
        store.apply(Update::NetworkPolicies(Event::InitDone));
        assert!(store.synced());
        let report = store.snapshot();
        assert_eq!(
            report.errors,
            [Rejection::new(
                "Service",
                super::super::RejectReason::InvalidField,
                "Service default/bad: unknown spec.type \"X\""
            )]
        );
        assert!(report.cluster.services.is_empty());
        assert_eq!(
            report.warnings,
            ["NetworkPolicy default/deny: fails closed"]
        );
        let policies: Vec<_> = report.cluster.network_policies.keys().collect();
        assert_eq!(policies, [&("default".to_owned(), "deny".to_owned())]);
    }
}
