//! The Kubernetes deployment in `manifests/` (`kubectl apply -k manifests/`):
//! every file parses into its Kubernetes type without losing a field, and
//! the pieces agree with each other and with the agent itself — the RBAC
//! rules with what the agent watches, the probes with where it serves
//! health, the mounts with where its configuration puts files, the init
//! container's arguments with the real `tern install-cni` parser.

// Tests: a failed unwrap or expect is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use clap::Parser;
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{
    ConfigMap, Container, PodSpec, Probe, ServiceAccount, Volume, VolumeMount,
};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::Deserialize;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;
use tern_agent::config::{AgentArgs, AgentConfig, Source};

/// The ConfigMap key holding the agent's configuration file.
const CONFIG_KEY: &str = "config.json";
/// The network configuration list, in `manifests/` and in the ConfigMap.
const CONFLIST: &str = "10-tern.conflist";

/// Host directories the agent pod needs, each as a hostPath volume.
const HOST_PATHS: &[&str] = &[
    "/sys/fs/bpf",
    "/opt/cni/bin",
    "/etc/cni/net.d",
    "/var/run/tern",
    "/var/lib/tern",
    "/proc",
    "/sys/fs/cgroup",
];

fn manifests_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../manifests")
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Kustomization {
    api_version: String,
    kind: String,
    namespace: Option<String>,
    #[serde(default)]
    resources: Vec<String>,
    #[serde(default)]
    images: Vec<KustomizeImage>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct KustomizeImage {
    name: String,
    new_name: Option<String>,
    new_tag: Option<String>,
    digest: Option<String>,
}

struct Deployment {
    kustomization: Kustomization,
    service_accounts: Vec<ServiceAccount>,
    cluster_roles: Vec<ClusterRole>,
    bindings: Vec<ClusterRoleBinding>,
    config_maps: Vec<ConfigMap>,
    daemon_sets: Vec<DaemonSet>,
}

fn deployment() -> &'static Deployment {
    static DEPLOYMENT: OnceLock<Deployment> = OnceLock::new();
    DEPLOYMENT.get_or_init(load)
}

/// Reads kustomization.yaml and every file it lists, all documents of each.
fn load() -> Deployment {
    let dir = manifests_dir();
    let text = std::fs::read_to_string(dir.join("kustomization.yaml"))
        .expect("manifests/kustomization.yaml cannot be read");
    let kustomization: Kustomization = serde_yaml_ng::from_str(&text)
        .unwrap_or_else(|e| panic!("manifests/kustomization.yaml is not valid: {e}"));
    assert_eq!(
        (
            kustomization.api_version.as_str(),
            kustomization.kind.as_str()
        ),
        ("kustomize.config.k8s.io/v1beta1", "Kustomization"),
        "kustomization.yaml has the wrong apiVersion/kind"
    );

    let mut listed = BTreeSet::new();
    for resource in &kustomization.resources {
        assert!(
            listed.insert(resource.clone()),
            "kustomization.yaml lists {resource} twice"
        );
        assert!(
            dir.join(resource).is_file(),
            "kustomization.yaml lists {resource}, which is not a file in manifests/"
        );
    }
    for entry in std::fs::read_dir(&dir).expect("manifests/ cannot be read") {
        let name = entry.unwrap().file_name().into_string().unwrap();
        let yaml = name.ends_with(".yaml") || name.ends_with(".yml");
        if yaml && !name.starts_with("kustomization.") {
            assert!(
                listed.contains(&name),
                "manifests/{name} is not in kustomization.yaml's resources: `kubectl apply -k` would skip it"
            );
        }
    }

    let mut deployment = Deployment {
        kustomization,
        service_accounts: Vec::new(),
        cluster_roles: Vec::new(),
        bindings: Vec::new(),
        config_maps: Vec::new(),
        daemon_sets: Vec::new(),
    };
    for resource in listed {
        let text = std::fs::read_to_string(dir.join(&resource))
            .unwrap_or_else(|e| panic!("manifests/{resource} cannot be read: {e}"));
        for (index, document) in serde_yaml_ng::Deserializer::from_str(&text).enumerate() {
            let origin = format!("manifests/{resource}, document {}", index + 1);
            let value = Value::deserialize(document)
                .unwrap_or_else(|e| panic!("{origin} is not valid YAML: {e}"));
            if value.is_null() {
                continue;
            }
            let kind = value.get("kind").and_then(Value::as_str).unwrap_or("");
            match kind {
                "ServiceAccount" => deployment.service_accounts.push(typed(&value, &origin)),
                "ClusterRole" => deployment.cluster_roles.push(typed(&value, &origin)),
                "ClusterRoleBinding" => deployment.bindings.push(typed(&value, &origin)),
                "ConfigMap" => deployment.config_maps.push(typed(&value, &origin)),
                "DaemonSet" => deployment.daemon_sets.push(typed(&value, &origin)),
                other => panic!(
                    "{origin} has kind {other:?}, which this test does not know: add it here along with checks for it"
                ),
            }
        }
    }
    deployment
}

/// `value` as a `T`, which must give back exactly `value` when serialized:
/// k8s-openapi ignores unknown fields, so this is what catches a misspelt
/// or misplaced one (which the API server would drop or reject).
fn typed<T: DeserializeOwned + Serialize>(value: &Value, origin: &str) -> T {
    let type_name = std::any::type_name::<T>();
    let object: T = serde_path_to_error::deserialize(value.clone())
        .unwrap_or_else(|e| panic!("{origin} is not a valid {type_name}: {e}"));
    let back = serde_json::to_value(&object).expect("k8s-openapi types serialize");
    if let Some(path) = first_difference(value, &back, "") {
        panic!(
            "{origin}: {path} does not survive parsing into {type_name}: a misspelt or misplaced field?"
        );
    }
    object
}

/// The path of the first place `a` and `b` differ.
fn first_difference(a: &Value, b: &Value, path: &str) -> Option<String> {
    match (a, b) {
        (Value::Object(a), Value::Object(b)) => {
            let keys: BTreeSet<&String> = a.keys().chain(b.keys()).collect();
            keys.into_iter().find_map(|key| {
                let here = format!("{path}.{key}");
                match (a.get(key), b.get(key)) {
                    (Some(a), Some(b)) => first_difference(a, b, &here),
                    _ => Some(here),
                }
            })
        }
        (Value::Array(a), Value::Array(b)) if a.len() == b.len() => a
            .iter()
            .zip(b)
            .enumerate()
            .find_map(|(i, (a, b))| first_difference(a, b, &format!("{path}[{i}]"))),
        _ => (a != b).then(|| path.to_owned()),
    }
}

/// The single object of a kind.
fn one<'a, T>(objects: &'a [T], kind: &str) -> &'a T {
    assert_eq!(
        objects.len(),
        1,
        "the deployment must hold exactly one {kind}"
    );
    &objects[0]
}

fn daemon_set() -> &'static DaemonSet {
    one(&deployment().daemon_sets, "DaemonSet")
}

fn config_map() -> &'static ConfigMap {
    one(&deployment().config_maps, "ConfigMap")
}

fn config_data(key: &str) -> &'static str {
    let map = config_map();
    map.data
        .as_ref()
        .and_then(|data| data.get(key))
        .unwrap_or_else(|| {
            panic!(
                "ConfigMap {:?} has no key {key:?}",
                map.metadata.name.as_deref().unwrap_or("")
            )
        })
}

fn pod() -> &'static PodSpec {
    daemon_set()
        .spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .expect("the DaemonSet has no pod template spec")
}

/// The namespace an object ends up in: kustomize's, else its own.
fn namespace_of(own: Option<&str>) -> String {
    deployment()
        .kustomization
        .namespace
        .as_deref()
        .or(own)
        .expect("no namespace for a namespaced object")
        .to_owned()
}

fn command_line(container: &Container) -> Vec<String> {
    let mut line = container.command.clone().unwrap_or_default();
    line.extend(container.args.clone().unwrap_or_default());
    line
}

/// The container running `tern-agent`.
fn agent() -> &'static Container {
    let agents: Vec<&Container> = pod()
        .containers
        .iter()
        .filter(|c| command_line(c).first().map(String::as_str) == Some("tern-agent"))
        .collect();
    assert_eq!(
        agents.len(),
        1,
        "exactly one container must run tern-agent (an explicit command: the image has no entrypoint)"
    );
    agents[0]
}

/// The init container running `tern install-cni`.
fn installer() -> &'static Container {
    let found: Vec<&Container> = pod()
        .init_containers
        .iter()
        .flatten()
        .filter(|c| command_line(c).iter().any(|a| a == "install-cni"))
        .collect();
    assert_eq!(
        found.len(),
        1,
        "exactly one init container must run `tern install-cni`"
    );
    found[0]
}

fn all_containers() -> impl Iterator<Item = &'static Container> {
    pod()
        .init_containers
        .iter()
        .flatten()
        .chain(&pod().containers)
}

fn privileged(container: &Container) -> bool {
    container
        .security_context
        .as_ref()
        .and_then(|s| s.privileged)
        == Some(true)
}

/// Debian's /var/run is a symlink to /run, in the image and on nodes.
fn normalize(path: &Path) -> PathBuf {
    match path.strip_prefix("/var/run") {
        Ok(rest) => Path::new("/run").join(rest),
        Err(_) => path.to_owned(),
    }
}

/// What a path inside a container is.
#[derive(Debug, PartialEq)]
enum Backing {
    /// This path on the node.
    Host(PathBuf),
    /// This key of this ConfigMap.
    ConfigMapKey { config_map: String, key: String },
    /// Neither: the image's own file system, or another volume type.
    Other,
}

/// The volume mount of `container` that `path` lies in (the deepest one),
/// and what the path is there.
fn resolve(container: &'static Container, path: &Path) -> (Option<&'static VolumeMount>, Backing) {
    let path = normalize(path);
    let mount = container
        .volume_mounts
        .iter()
        .flatten()
        .filter(|m| path.starts_with(normalize(Path::new(&m.mount_path))))
        .max_by_key(|m| normalize(Path::new(&m.mount_path)).components().count());
    let Some(mount) = mount else {
        return (None, Backing::Other);
    };
    let rest = path
        .strip_prefix(normalize(Path::new(&mount.mount_path)))
        .unwrap()
        .to_owned();
    let Some(volume) = volume(&mount.name) else {
        return (Some(mount), Backing::Other);
    };
    let backing = if let Some(host) = &volume.host_path {
        Backing::Host(Path::new(&host.path).join(rest))
    } else if let Some(source) = &volume.config_map {
        let rest = rest.to_string_lossy().into_owned();
        let key = match &source.items {
            Some(items) => items
                .iter()
                .find(|item| item.path == rest)
                .map(|item| item.key.clone())
                .unwrap_or_default(),
            None => rest,
        };
        Backing::ConfigMapKey {
            config_map: source.name.clone(),
            key,
        }
    } else {
        Backing::Other
    };
    (Some(mount), backing)
}

fn volume(name: &str) -> Option<&'static Volume> {
    pod().volumes.iter().flatten().find(|v| v.name == name)
}

/// The agent's configuration as the agent itself reads it: the container's
/// real command line, with --config pointed at the ConfigMap's config.json
/// written to a file.
fn agent_config() -> AgentConfig {
    let line = command_line(agent());
    let mut args = AgentArgs::try_parse_from(&line)
        .unwrap_or_else(|e| panic!("tern-agent rejects its command line {line:?}: {e}"));
    let path = args
        .config
        .clone()
        .unwrap_or_else(|| panic!("the agent's command line {line:?} has no --config"));
    let config_name = config_map().metadata.name.clone().unwrap_or_default();
    assert_eq!(
        resolve(agent(), &path).1,
        Backing::ConfigMapKey {
            config_map: config_name,
            key: CONFIG_KEY.into()
        },
        "the agent's --config {} must be the ConfigMap's {CONFIG_KEY} through a volume mount",
        path.display()
    );
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join(CONFIG_KEY);
    std::fs::write(&file, config_data(CONFIG_KEY)).unwrap();
    args.config = Some(file);
    AgentConfig::from_args(args)
        .unwrap_or_else(|e| panic!("the agent rejects the ConfigMap's {CONFIG_KEY}: {e:#}"))
}

fn conflist() -> Value {
    serde_json::from_str(config_data(CONFLIST))
        .unwrap_or_else(|e| panic!("the ConfigMap's {CONFLIST} is not JSON: {e}"))
}

/// Repository and tag of an image reference (`host:port/name:tag@digest`).
fn split_image(image: &str) -> (&str, Option<&str>) {
    let image = image.split('@').next().unwrap_or(image);
    match image.rsplit_once(':') {
        Some((name, tag)) if !tag.contains('/') => (name, Some(tag)),
        _ => (image, None),
    }
}

#[test]
fn files_are_known_kinds_in_the_kustomizations_namespace() {
    let d = deployment();
    assert_eq!(
        d.kustomization.namespace.as_deref(),
        Some("kube-system"),
        "the kustomization must put Tern in kube-system (system-node-critical pods are allowed there)"
    );
    // Each namespaced object also says its namespace, so `kubectl apply -f`
    // on a single file lands in the same place.
    let namespaced = d
        .service_accounts
        .iter()
        .map(|o| ("ServiceAccount", &o.metadata))
        .chain(d.config_maps.iter().map(|o| ("ConfigMap", &o.metadata)))
        .chain(d.daemon_sets.iter().map(|o| ("DaemonSet", &o.metadata)));
    for (kind, meta) in namespaced {
        assert_eq!(
            meta.namespace, d.kustomization.namespace,
            "{kind} {:?} is in another namespace than the kustomization's",
            meta.name
        );
    }
    for (kind, meta) in d
        .cluster_roles
        .iter()
        .map(|o| ("ClusterRole", &o.metadata))
        .chain(
            d.bindings
                .iter()
                .map(|o| ("ClusterRoleBinding", &o.metadata)),
        )
    {
        assert_eq!(
            meta.namespace, None,
            "{kind} {:?} is cluster-scoped",
            meta.name
        );
    }
}

#[test]
fn image_is_this_release_and_overridable() {
    let images: BTreeSet<&str> = all_containers()
        .map(|c| c.image.as_deref().expect("every container names its image"))
        .collect();
    assert_eq!(
        images.len(),
        1,
        "the init container and the agent must run the same image: {images:?}"
    );
    let image = images.into_iter().next().unwrap();
    let (name, tag) = split_image(image);
    let entries: Vec<&KustomizeImage> = deployment()
        .kustomization
        .images
        .iter()
        .filter(|i| i.name == name)
        .collect();
    assert_eq!(
        entries.len(),
        1,
        "kustomization.yaml needs one images: entry named {name:?}, else overriding the image does nothing"
    );
    let entry = entries[0];
    assert!(
        entry.digest.is_none() && entry.new_name.as_deref().is_none_or(|n| n == name),
        "the kustomization must keep the image {name} of this source tree: {entry:?}"
    );
    let effective = entry.new_tag.as_deref().or(tag);
    assert_eq!(
        effective,
        Some(env!("CARGO_PKG_VERSION")),
        "the deployed image tag must be this release's version"
    );
}

#[test]
fn cluster_role_grants_list_and_watch_on_exactly_the_watched_resources() {
    let role = one(&deployment().cluster_roles, "ClusterRole");
    assert!(
        role.aggregation_rule.is_none(),
        "the ClusterRole must not aggregate other roles"
    );
    let mut granted = BTreeSet::new();
    for (i, rule) in role.rules.iter().flatten().enumerate() {
        let verbs: BTreeSet<&str> = rule.verbs.iter().map(String::as_str).collect();
        assert_eq!(
            verbs,
            BTreeSet::from(["list", "watch"]),
            "ClusterRole rule {i} must grant exactly list and watch"
        );
        assert!(
            rule.resource_names.as_ref().is_none_or(Vec::is_empty),
            "ClusterRole rule {i} has resourceNames: the agent watches whole collections"
        );
        assert!(
            rule.non_resource_urls.as_ref().is_none_or(Vec::is_empty),
            "ClusterRole rule {i} grants non-resource URLs"
        );
        let groups = rule.api_groups.clone().unwrap_or_default();
        let resources = rule.resources.clone().unwrap_or_default();
        assert!(
            !groups.is_empty() && !resources.is_empty(),
            "ClusterRole rule {i} names no API group or no resource"
        );
        for group in &groups {
            for resource in &resources {
                assert!(
                    !group.contains('*') && !resource.contains('*'),
                    "ClusterRole rule {i} has a wildcard: {group:?}/{resource:?}"
                );
                granted.insert((group.clone(), resource.clone()));
            }
        }
    }
    let watched: BTreeSet<(String, String)> = tern_agent::sources::kube::WATCHED_RESOURCES
        .iter()
        .map(|(g, r)| (g.to_string(), r.to_string()))
        .collect();
    let missing: Vec<_> = watched.difference(&granted).collect();
    let extra: Vec<_> = granted.difference(&watched).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "the ClusterRole must grant exactly WATCHED_RESOURCES (group, resource): missing {missing:?}, not watched {extra:?}"
    );
}

#[test]
fn binding_gives_the_role_to_the_daemon_sets_service_account() {
    let d = deployment();
    let role = one(&d.cluster_roles, "ClusterRole");
    let binding = one(&d.bindings, "ClusterRoleBinding");
    assert_eq!(
        (
            binding.role_ref.api_group.as_str(),
            binding.role_ref.kind.as_str(),
            Some(binding.role_ref.name.as_str())
        ),
        (
            "rbac.authorization.k8s.io",
            "ClusterRole",
            role.metadata.name.as_deref()
        ),
        "the ClusterRoleBinding must refer to the ClusterRole"
    );
    let account_name = pod()
        .service_account_name
        .as_deref()
        .expect("the DaemonSet's pods need serviceAccountName");
    let namespace = namespace_of(daemon_set().metadata.namespace.as_deref());
    let account = one(&d.service_accounts, "ServiceAccount");
    assert_eq!(
        account.metadata.name.as_deref(),
        Some(account_name),
        "the DaemonSet's serviceAccountName must be the ServiceAccount defined"
    );
    let subjects = binding.subjects.as_deref().unwrap_or_default();
    assert_eq!(
        subjects.len(),
        1,
        "the ClusterRoleBinding must have exactly one subject"
    );
    let subject = &subjects[0];
    assert_eq!(
        (
            subject.kind.as_str(),
            subject.name.as_str(),
            subject.namespace.as_deref()
        ),
        ("ServiceAccount", account_name, Some(namespace.as_str())),
        "the ClusterRoleBinding's subject must be the DaemonSet's ServiceAccount in its namespace"
    );
    let automount = pod()
        .automount_service_account_token
        .or(account.automount_service_account_token)
        .unwrap_or(true);
    assert!(
        automount,
        "the agent needs its service account token mounted to reach the API"
    );
}

#[test]
fn config_json_is_accepted_by_the_agent() {
    let config = agent_config();
    assert!(
        matches!(config.source, Source::Kube { .. }),
        "the deployed agent must read the API server (source kube), not {:?}",
        config.source
    );
    let raw: Value = serde_json::from_str(config_data(CONFIG_KEY)).unwrap();
    assert!(
        raw.get("nodeName").is_none() && raw.get("podCIDR").is_none(),
        "one ConfigMap serves every node: nodeName and podCIDR must come from the node, not config.json"
    );
}

#[test]
fn conflist_in_the_config_map_is_the_one_in_manifests() {
    let file = std::fs::read_to_string(manifests_dir().join(CONFLIST)).unwrap();
    let file: Value = serde_json::from_str(&file)
        .unwrap_or_else(|e| panic!("manifests/{CONFLIST} is not JSON: {e}"));
    assert_eq!(
        conflist(),
        file,
        "the ConfigMap's {CONFLIST} differs from manifests/{CONFLIST}"
    );
    // Every capability tern-cni serves is declared, so runtimes pass it.
    for capability in tern_agent::install::CAPABILITIES {
        assert_eq!(
            conflist()["plugins"][0]["capabilities"][capability],
            true,
            "{CONFLIST} does not declare {capability}"
        );
    }
    tern_agent::install::validate_conflist(config_data(CONFLIST).as_bytes()).unwrap_or_else(|e| {
        panic!("tern install-cni would refuse the ConfigMap's {CONFLIST}: {e:#}")
    });
}

fn check_probe(probe: Option<&Probe>, which: &str, path: &str, config: &AgentConfig) {
    let address = config.health_address;
    let get = probe
        .and_then(|p| p.http_get.as_ref())
        .unwrap_or_else(|| panic!("the agent needs an httpGet {which} probe"));
    assert_eq!(
        get.path.as_deref(),
        Some(path),
        "the {which} probe must ask {path}"
    );
    assert!(
        get.scheme.as_deref().is_none_or(|s| s == "HTTP"),
        "the health endpoint speaks plain HTTP"
    );
    let port = match &get.port {
        IntOrString::Int(port) => *port,
        IntOrString::String(name) => agent()
            .ports
            .iter()
            .flatten()
            .find(|p| p.name.as_deref() == Some(name))
            .map(|p| p.container_port)
            .unwrap_or_else(|| panic!("the {which} probe's port {name:?} is not a container port")),
    };
    assert_eq!(
        port,
        i32::from(address.port()),
        "the {which} probe must use the port of healthAddress {address}"
    );
    if !address.ip().is_unspecified() {
        assert_eq!(
            get.host.as_deref(),
            Some(address.ip().to_string().as_str()),
            "the agent listens on {address} only: the {which} probe must set host to its address"
        );
    }
}

#[test]
fn probes_ask_the_health_endpoint_the_agent_serves() {
    let config = agent_config();
    let raw: Value = serde_json::from_str(config_data(CONFIG_KEY)).unwrap();
    if raw.get("healthAddress").is_none() {
        assert_eq!(
            config.health_address.to_string(),
            tern_agent::health::DEFAULT_ADDRESS
        );
    }
    check_probe(
        agent().liveness_probe.as_ref(),
        "liveness",
        "/healthz",
        &config,
    );
    check_probe(
        agent().readiness_probe.as_ref(),
        "readiness",
        "/readyz",
        &config,
    );
}

#[test]
fn volumes_and_mounts_agree() {
    let volumes: Vec<&Volume> = pod().volumes.iter().flatten().collect();
    let names: BTreeSet<&str> = volumes.iter().map(|v| v.name.as_str()).collect();
    assert_eq!(names.len(), volumes.len(), "two volumes share a name");
    let mut used = BTreeSet::new();
    for container in all_containers() {
        let mounts: Vec<&VolumeMount> = container.volume_mounts.iter().flatten().collect();
        for mount in &mounts {
            assert!(
                names.contains(mount.name.as_str()),
                "container {} mounts volume {:?}, which the pod does not declare",
                container.name,
                mount.name
            );
            used.insert(mount.name.as_str());
            if mount.mount_propagation.as_deref() == Some("Bidirectional") {
                assert!(
                    privileged(container),
                    "container {}: Bidirectional propagation ({}) needs a privileged container",
                    container.name,
                    mount.mount_path
                );
            }
            // Runtimes order mounts only by depth: one nested in another
            // at the same depth may end up hidden under it.
            for other in &mounts {
                let (a, b) = (
                    normalize(Path::new(&mount.mount_path)),
                    normalize(Path::new(&other.mount_path)),
                );
                assert!(
                    std::ptr::eq(*mount, *other) || !a.starts_with(&b),
                    "container {}: mount {} lies inside mount {}",
                    container.name,
                    mount.mount_path,
                    other.mount_path
                );
            }
        }
    }
    let unused: Vec<&&str> = names.difference(&used).collect();
    assert!(unused.is_empty(), "volumes mounted nowhere: {unused:?}");

    let host_paths: BTreeSet<&str> = volumes
        .iter()
        .filter_map(|v| v.host_path.as_ref())
        .map(|h| h.path.as_str())
        .collect();
    for path in HOST_PATHS {
        assert!(host_paths.contains(path), "no hostPath volume for {path}");
    }
    let config_name = config_map().metadata.name.as_deref().unwrap_or("");
    for volume in &volumes {
        if let Some(source) = &volume.config_map {
            assert_eq!(
                source.name, config_name,
                "volume {} refers to ConfigMap {:?}, which the deployment does not define",
                volume.name, source.name
            );
        }
    }

    // Pods' namespaces appear after the agent starts: they must propagate in.
    let (mount, backing) = resolve(agent(), Path::new("/run/netns/x"));
    assert_eq!(
        backing,
        Backing::Host("/run/netns/x".into()),
        "the agent must see the host's /run/netns at /run/netns"
    );
    assert!(
        matches!(
            mount.and_then(|m| m.mount_propagation.as_deref()),
            Some("HostToContainer" | "Bidirectional")
        ),
        "/run/netns must be mounted with HostToContainer propagation"
    );
}

#[test]
fn agent_files_land_in_the_right_host_directories() {
    let config = agent_config();
    let socket_dir = config
        .socket
        .parent()
        .expect("the socket path has a directory");
    let cases = [
        (
            "stateDir",
            config.state_dir.as_path(),
            "/var/lib/tern",
            true,
        ),
        ("bpffsDir", config.bpffs_dir.as_path(), "/sys/fs/bpf", true),
        ("socket's directory", socket_dir, "/var/run/tern", true),
        (
            "cgroupRoot",
            config.cgroup_root.as_path(),
            "/sys/fs/cgroup",
            false,
        ),
    ];
    for (key, path, host_dir, written) in cases {
        let (mount, backing) = resolve(agent(), path);
        let Backing::Host(host) = backing else {
            panic!(
                "{key} {} is not on a hostPath mount of the agent: it would not outlive the pod or reach the node",
                path.display()
            );
        };
        assert!(
            normalize(&host).starts_with(normalize(Path::new(host_dir))),
            "{key} {} is the node's {}, not under {host_dir}",
            path.display(),
            host.display()
        );
        if written {
            assert!(
                mount.and_then(|m| m.read_only) != Some(true),
                "{key} {} is on a read-only mount",
                path.display()
            );
        }
    }
    // Socket-LB must see every pod: attach at the root of the hierarchy.
    assert_eq!(
        resolve(agent(), &config.cgroup_root).1,
        Backing::Host("/sys/fs/cgroup".into()),
        "cgroupRoot must be the node's cgroup v2 root, else pods outside it bypass socket-LB"
    );
    // tern-cni runs on the node and connects to the agentSocket of the
    // conflist: that must be where the agent's socket appears on the node.
    let (_, backing) = resolve(agent(), &config.socket);
    let plugin_socket = conflist()["plugins"][0]["agentSocket"]
        .as_str()
        .unwrap_or(tern_api::DEFAULT_SOCKET)
        .to_owned();
    let Backing::Host(host_socket) = backing else {
        unreachable!("checked above")
    };
    assert_eq!(
        normalize(&host_socket),
        normalize(Path::new(&plugin_socket)),
        "the agent's socket {} is the node's {}, but tern-cni connects to {plugin_socket}",
        config.socket.display(),
        host_socket.display()
    );
}

#[test]
fn install_cni_writes_where_the_runtime_reads() {
    let container = installer();
    let line = command_line(container);
    let cli = tern_agent::cli::Cli::try_parse_from(&line)
        .unwrap_or_else(|e| panic!("tern rejects the init container's command line {line:?}: {e}"));
    let tern_agent::cli::Command::InstallCni(args) = cli.command else {
        panic!("the init container's command {line:?} is not `tern install-cni`");
    };
    for (flag, dir, host_dir) in [
        ("--cni-bin-dir", &args.cni_bin_dir, "/opt/cni/bin"),
        ("--cni-conf-dir", &args.cni_conf_dir, "/etc/cni/net.d"),
    ] {
        let (mount, backing) = resolve(container, dir);
        assert_eq!(
            backing,
            Backing::Host(host_dir.into()),
            "install-cni {flag} {} must be the node's {host_dir} mounted",
            dir.display()
        );
        assert!(
            mount.and_then(|m| m.read_only) != Some(true),
            "install-cni {flag} {} is mounted read-only",
            dir.display()
        );
    }
    let config_name = config_map().metadata.name.clone().unwrap_or_default();
    assert_eq!(
        resolve(container, &args.conflist).1,
        Backing::ConfigMapKey {
            config_map: config_name,
            key: CONFLIST.into()
        },
        "install-cni --conflist {} must be the ConfigMap's {CONFLIST} (installed under its file name)",
        args.conflist.display()
    );
    assert_eq!(
        args.conflist.file_name().and_then(|n| n.to_str()),
        Some(CONFLIST),
        "the conflist keeps its file name when installed"
    );
    // Present in the ConfigMap (panics otherwise).
    config_data(CONFLIST);
}

#[test]
fn daemon_set_runs_privileged_on_the_host_network_of_every_node() {
    let ds = daemon_set();
    let spec = ds.spec.as_ref().expect("the DaemonSet has a spec");
    let pod = pod();
    assert_eq!(pod.host_network, Some(true), "hostNetwork must be true");
    assert_eq!(
        pod.dns_policy.as_deref(),
        Some("Default"),
        "the agent resolves names with the node's resolver (dnsPolicy Default): cluster DNS is a Service, which needs Tern running first"
    );
    assert!(
        privileged(agent()),
        "the agent container must be privileged"
    );
    assert!(
        pod.tolerations.iter().flatten().any(|t| {
            t.operator.as_deref() == Some("Exists")
                && t.key.as_deref().unwrap_or("").is_empty()
                && t.effect.as_deref().unwrap_or("").is_empty()
        }),
        "the pods must tolerate every taint (operator: Exists without key or effect)"
    );
    assert_eq!(
        pod.priority_class_name.as_deref(),
        Some("system-node-critical"),
        "priorityClassName must be system-node-critical"
    );
    assert_eq!(
        spec.update_strategy
            .as_ref()
            .and_then(|s| s.type_.as_deref()),
        Some("RollingUpdate"),
        "updateStrategy must be RollingUpdate"
    );
    assert!(
        spec.selector.match_expressions.is_none(),
        "use matchLabels only (checked against the template)"
    );
    let selector = spec.selector.match_labels.clone().unwrap_or_default();
    assert!(!selector.is_empty(), "the selector selects nothing");
    let labels: BTreeMap<String, String> = spec
        .template
        .metadata
        .as_ref()
        .and_then(|m| m.labels.clone())
        .unwrap_or_default();
    for (key, value) in &selector {
        assert_eq!(
            labels.get(key),
            Some(value),
            "the selector's {key}={value} is not a label of the pod template"
        );
    }
    let node_name = agent()
        .env
        .iter()
        .flatten()
        .find(|e| e.name == "TERN_NODE_NAME")
        .expect("the agent needs TERN_NODE_NAME");
    let field = node_name
        .value_from
        .as_ref()
        .and_then(|v| v.field_ref.as_ref())
        .map(|f| f.field_path.as_str());
    assert!(
        node_name.value.is_none() && field == Some("spec.nodeName"),
        "TERN_NODE_NAME must come from the pod's spec.nodeName"
    );
    assert_eq!(
        installer().image,
        agent().image,
        "the init container must install the plugin of the agent's own image"
    );
}
