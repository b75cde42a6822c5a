//! Kubernetes objects -> model: Nodes, Namespaces and Pods here, Services
//! (`service`), EndpointSlices (`endpoint_slice`), NetworkPolicies
//! (`sources::network_policy`); each validated on its own, so one bad
//! object never costs the others. What they share (names, ports, reasons
//! for refusing) lives here.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr};

use k8s_openapi::api::core::v1 as core;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use ipnetwork::IpNetwork;

use crate::model::{LbAlgorithm, NAMESPACE_NAME_LABEL, NamedPort, Namespace, Node, Pod, Protocol};

/// Per-Service (or per-namespace default) backend selection: `random`,
/// `maglev` or an IPVS scheduler (`rr`, `wrr`, `lc`, `wlc`, `sh`, `dh`,
/// `sed`, `nq`).
pub const LB_ALGORITHM_ANNOTATION: &str = "tern.io/lb-algorithm";
/// Per-endpoint weights for the IPVS schedulers on a Service:
/// `web-0=3,web-1=1,10.244.1.7=0,default=2` (pod name or address = weight).
pub const LB_WEIGHTS_ANNOTATION: &str = "tern.io/lb-weights";
/// Largest weight (IPVS allows any int; wrr sequences grow with them).
pub const LB_WEIGHT_MAX: u32 = 65_535;
/// The older form of `spec.loadBalancerSourceRanges` (comma-separated),
/// read when the field is empty, as kube-proxy does.
pub const SOURCE_RANGES_ANNOTATION: &str = "service.beta.kubernetes.io/load-balancer-source-ranges";
/// Services (and their slices) with this label belong to another proxy.
pub const SERVICE_PROXY_NAME_LABEL: &str = "service.kubernetes.io/service-proxy-name";
/// Set on the slices of headless Services: nothing for a proxy to do.
pub const HEADLESS_LABEL: &str = "service.kubernetes.io/headless";
/// Names the Service an EndpointSlice belongs to.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// What became of one object.
#[derive(Debug, PartialEq)]
pub enum Conversion<T> {
    /// Used; the warnings name the parts that were left out (SCTP ports,
    /// IPv6 addresses) so an operator can see why they do nothing.
    Accepted(T, Vec<String>),
    /// Deliberately not ours (another proxy's, a headless slice, not IPv4).
    Ignored(String),
    Rejected(Refusal),
}

/// Why an object was left out, as a fixed name: the `reason` label of
/// `tern_rejected_objects` and `tern_object_rejections_total` (a closed
/// set, so the metric's series stay few whatever the objects say).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum RejectReason {
    /// No `metadata.name` (or a NetworkPolicy without a namespace).
    MissingName,
    /// A name or namespace longer than any the API server allows (253).
    NameTooLong,
    /// A port, targetPort, nodePort or healthCheckNodePort out of
    /// 1..=65535 (or not a port name), or several unnamed ports.
    InvalidPort,
    /// Two ports with one name, or with one port number and protocol.
    DuplicatePort,
    /// An address that is not an IPv4 address of the kind the field takes
    /// (not an IP at all, IPv6 in an IPv4 slice, 0.0.0.0, loopback,
    /// multicast, broadcast).
    InvalidAddress,
    /// A Service with neither a clusterIP nor `None`.
    MissingClusterIp,
    /// An EndpointSlice without its `kubernetes.io/service-name` label.
    MissingServiceName,
    /// A Tern annotation (`tern.io/lb-algorithm`, `tern.io/lb-weights`)
    /// that does not parse.
    InvalidAnnotation,
    /// Any other field whose value the API would not take (an unknown
    /// type, protocol or policy, a bad CIDR, a timeout out of range).
    InvalidField,
    /// Not readable as the kind it says it is (a manifest's type error, a
    /// file that does not parse, a document that is no object).
    Malformed,
    /// The same kind and name defined twice (manifests): the first wins.
    Duplicate,
    /// A manifest file (or the directory) that cannot be read.
    Unreadable,
}

impl RejectReason {
    pub const ALL: [RejectReason; 12] = [
        RejectReason::MissingName,
        RejectReason::NameTooLong,
        RejectReason::InvalidPort,
        RejectReason::DuplicatePort,
        RejectReason::InvalidAddress,
        RejectReason::MissingClusterIp,
        RejectReason::MissingServiceName,
        RejectReason::InvalidAnnotation,
        RejectReason::InvalidField,
        RejectReason::Malformed,
        RejectReason::Duplicate,
        RejectReason::Unreadable,
    ];

    /// The metric label's value.
    pub fn name(self) -> &'static str {
        match self {
            RejectReason::MissingName => "missing_name",
            RejectReason::NameTooLong => "name_too_long",
            RejectReason::InvalidPort => "invalid_port",
            RejectReason::DuplicatePort => "duplicate_port",
            RejectReason::InvalidAddress => "invalid_address",
            RejectReason::MissingClusterIp => "missing_cluster_ip",
            RejectReason::MissingServiceName => "missing_service_name",
            RejectReason::InvalidAnnotation => "invalid_annotation",
            RejectReason::InvalidField => "invalid_field",
            RejectReason::Malformed => "malformed",
            RejectReason::Duplicate => "duplicate",
            RejectReason::Unreadable => "unreadable",
        }
    }
}

impl std::fmt::Display for RejectReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// One object refused: the reason's class and the message naming the field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub reason: RejectReason,
    pub message: String,
}

impl Refusal {
    pub fn new(reason: RejectReason, message: impl Into<String>) -> Self {
        Refusal {
            reason,
            message: message.into(),
        }
    }
}

/// A field that failed with no finer class: `invalid_field`.
impl From<String> for Refusal {
    fn from(message: String) -> Self {
        Refusal::new(RejectReason::InvalidField, message)
    }
}

impl From<&str> for Refusal {
    fn from(message: &str) -> Self {
        Refusal::new(RejectReason::InvalidField, message)
    }
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

/// An object the source left out of its snapshot: of which kind, why (the
/// metric's labels) and the line the log gets (kind, namespace/name, place
/// in a manifest file, field and value).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Rejection {
    pub kind: &'static str,
    pub reason: RejectReason,
    pub message: String,
}

impl Rejection {
    pub fn new(kind: &'static str, reason: RejectReason, message: impl Into<String>) -> Self {
        Rejection {
            kind,
            reason,
            message: message.into(),
        }
    }
}

impl std::fmt::Display for Rejection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

/// Longest name or namespace taken (the API server's longest, a DNS
/// subdomain's 253; Services and namespaces are held to 63 there).
pub const MAX_NAME_LEN: usize = 253;

/// `text` for a log line: cut to 100 characters, with its full length,
/// so a hostile name cannot make every line of the log a megabyte.
pub fn shortened(text: &str) -> std::borrow::Cow<'_, str> {
    const SHOWN: usize = 100;
    match text.char_indices().nth(SHOWN) {
        None => text.into(),
        Some((cut, _)) => format!("{}...({} bytes)", &text[..cut], text.len()).into(),
    }
}

impl<T> Conversion<T> {
    fn from_result(result: Result<T, Refusal>, warnings: Vec<String>) -> Self {
        match result {
            Ok(value) => Conversion::Accepted(value, warnings),
            Err(reason) => Conversion::Rejected(reason),
        }
    }
}

/// A Node: its PodCIDRs and underlay address. A node without either is
/// kept (it may get them later) but cannot be routed to.
/// The Node label naming its zone (`v1.LabelTopologyZone`).
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";
/// The cluster autoscaler's taint on a node it is about to delete.
pub const TO_BE_DELETED_TAINT: &str = "ToBeDeletedByClusterAutoscaler";

pub fn node(object: &core::Node) -> Conversion<Node> {
    let mut warnings = Vec::new();
    let result = convert_node(object, &mut warnings);
    Conversion::from_result(result, warnings)
}

fn convert_node(object: &core::Node, warnings: &mut Vec<String>) -> Result<Node, Refusal> {
    let name = object.metadata.name.clone().unwrap_or_default();
    check_name("metadata.name", &name)?;
    let spec = object.spec.clone().unwrap_or_default();
    // podCIDRs wins over podCIDR; the API keeps podCIDR = podCIDRs[0].
    let raw: Vec<String> = match spec.pod_cidrs {
        Some(cidrs) if !cidrs.is_empty() => cidrs,
        _ => spec.pod_cidr.into_iter().collect(),
    };
    let mut pod_cidrs = Vec::new();
    for text in &raw {
        match text.parse::<IpNetwork>() {
            Ok(IpNetwork::V4(cidr)) if cidr.network() == cidr.ip() => pod_cidrs.push(cidr),
            Ok(IpNetwork::V4(cidr)) => {
                return Err(format!(
                    "spec.podCIDRs: {cidr} has host bits set (network is {}/{})",
                    cidr.network(),
                    cidr.prefix()
                )
                .into());
            }
            Ok(IpNetwork::V6(cidr)) => {
                warnings.push(format!("spec.podCIDRs: IPv6 {cidr} skipped (IPv4 only)"))
            }
            Err(_) => return Err(format!("spec.podCIDRs: {text:?} is not a CIDR").into()),
        }
    }
    let addresses = object
        .status
        .as_ref()
        .and_then(|s| s.addresses.as_deref())
        .unwrap_or_default();
    // InternalIP is what nodes reach each other on; ExternalIP stands in
    // on clusters whose nodes only have that.
    let mut internal_ip = None;
    for wanted in ["InternalIP", "ExternalIP"] {
        for address in addresses.iter().filter(|a| a.type_ == wanted) {
            match address.address.parse::<IpAddr>() {
                Ok(IpAddr::V4(ip)) => {
                    internal_ip.get_or_insert(ip);
                }
                Ok(IpAddr::V6(_)) => {}
                Err(_) => {
                    return Err(Refusal::new(
                        RejectReason::InvalidAddress,
                        format!(
                            "status.addresses: {wanted} {:?} is not an IP address",
                            address.address
                        ),
                    ));
                }
            }
        }
    }
    let zone = object
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(ZONE_LABEL))
        .cloned();
    let to_be_deleted = object.metadata.deletion_timestamp.is_some()
        || spec
            .taints
            .iter()
            .flatten()
            .any(|t| t.key == TO_BE_DELETED_TAINT);
    Ok(Node {
        name,
        internal_ip,
        pod_cidrs,
        zone,
        to_be_deleted,
    })
}

/// (namespace, name); a missing namespace is "default", as kubectl does.
fn identity(meta: &ObjectMeta) -> Result<(String, String), Refusal> {
    let name = meta.name.as_deref().unwrap_or_default();
    check_name("metadata.name", name)?;
    let namespace = meta
        .namespace
        .as_deref()
        .filter(|ns| !ns.is_empty())
        .unwrap_or("default");
    check_name("metadata.namespace", namespace)?;
    Ok((namespace.to_owned(), name.to_owned()))
}

/// A name is there, and no longer than the API server allows any: longer
/// ones only come from manifests, and would make every log line and
/// `tern` listing naming them that long.
pub(super) fn check_name(field: &str, name: &str) -> Result<(), Refusal> {
    if name.is_empty() {
        return Err(Refusal::new(
            RejectReason::MissingName,
            format!("{field} is missing"),
        ));
    }
    if name.len() > MAX_NAME_LEN {
        return Err(Refusal::new(
            RejectReason::NameTooLong,
            format!(
                "{field} is {} bytes long, more than {MAX_NAME_LEN}",
                name.len()
            ),
        ));
    }
    Ok(())
}

/// A Namespace: its default LB algorithm, and its labels for policy's
/// namespaceSelectors.
pub fn namespace(object: &core::Namespace) -> Conversion<Namespace> {
    let name = object.metadata.name.as_deref().unwrap_or_default();
    let result = match check_name("metadata.name", name) {
        Err(refusal) => Err(refusal),
        Ok(()) => lb_algorithm(&object.metadata).map(|lb_algorithm| {
            let mut labels = object.metadata.labels.clone().unwrap_or_default();
            // The API server sets it on every namespace; manifests may not.
            labels.insert(NAMESPACE_NAME_LABEL.to_owned(), name.to_owned());
            Namespace {
                name: name.to_owned(),
                lb_algorithm,
                labels,
            }
        }),
    };
    Conversion::from_result(result, Vec::new())
}

/// A pod of the cluster: its node, addresses (for matching endpoints to
/// pods and policy peers to addresses), labels (for policy's selectors)
/// and named ports (for policy's named ports).
pub fn pod(object: &core::Pod) -> Conversion<Pod> {
    let mut warnings = Vec::new();
    let result = identity(&object.metadata).and_then(|key| {
        let raw: Vec<String> = object
            .status
            .as_ref()
            .and_then(|s| s.pod_ips.as_ref())
            .into_iter()
            .flatten()
            .map(|ip| ip.ip.clone())
            .collect();
        let spec = object.spec.as_ref();
        Ok(Pod {
            key,
            node: spec
                .and_then(|s| s.node_name.clone())
                .filter(|n| !n.is_empty()),
            ips: ipv4s("status.podIPs", &raw, &mut warnings)?,
            host_network: spec.and_then(|s| s.host_network).unwrap_or(false),
            finished: matches!(
                object.status.as_ref().and_then(|s| s.phase.as_deref()),
                Some("Succeeded" | "Failed")
            ),
            labels: object.metadata.labels.clone().unwrap_or_default(),
            named_ports: spec
                .map(|s| named_ports(s, &mut warnings))
                .unwrap_or_default(),
        })
    });
    Conversion::from_result(result, warnings)
}

/// The containers' ports that have a name, sorted and without duplicates.
/// SCTP ones are left out: policy refuses SCTP, so nothing resolves to them.
fn named_ports(spec: &core::PodSpec, warnings: &mut Vec<String>) -> Vec<NamedPort> {
    let mut out = BTreeSet::new();
    for (c, container) in spec.containers.iter().enumerate() {
        for (i, p) in container.ports.iter().flatten().enumerate() {
            let Some(name) = p.name.as_ref().filter(|n| !n.is_empty()) else {
                continue;
            };
            let field = format!("spec.containers[{c}].ports[{i}]");
            let protocol = match protocol(p.protocol.as_deref()) {
                Ok(Protocol::Sctp) => continue,
                Ok(protocol) => protocol,
                Err(e) => {
                    warnings.push(format!("{field}: {e}; named port {name:?} skipped"));
                    continue;
                }
            };
            let Some(port) = port_number(p.container_port) else {
                warnings.push(format!(
                    "{field}: containerPort {} is out of range 1..=65535; named port {name:?} skipped",
                    p.container_port
                ));
                continue;
            };
            out.insert(NamedPort {
                name: name.clone(),
                protocol,
                port,
            });
        }
    }
    out.into_iter().collect()
}

fn ipv4s(
    field: &str,
    raw: &[String],
    warnings: &mut Vec<String>,
) -> Result<Vec<Ipv4Addr>, Refusal> {
    // Exact capacity: kept for the Service's lifetime.
    let mut out = Vec::with_capacity(raw.len());
    for text in raw {
        match text.parse::<IpAddr>() {
            Ok(IpAddr::V4(ip)) => out.push(ip),
            Ok(IpAddr::V6(ip)) => {
                warnings.push(format!("{field}: IPv6 address {ip} skipped (IPv4 only)"))
            }
            Err(_) => {
                return Err(Refusal::new(
                    RejectReason::InvalidAddress,
                    format!("{field}: {:?} is not an IP address", shortened(text)),
                ));
            }
        }
    }
    Ok(out)
}

/// How messages name a port: by its name, or by its place when unnamed.
pub(super) fn port_label(index: usize, name: &str) -> String {
    if name.is_empty() {
        format!("ports[{index}]")
    } else {
        format!("port {name:?}")
    }
}

pub(super) fn port_number(n: i32) -> Option<u16> {
    u16::try_from(n).ok().filter(|&p| p != 0)
}

/// An IANA service name as the API requires for named ports: at most 15
/// lowercase letters, digits and '-', with at least one letter.
pub(super) fn is_port_name(s: &str) -> bool {
    s.len() <= 15
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && s.bytes().any(|b| b.is_ascii_lowercase())
        && !s.starts_with('-')
        && !s.ends_with('-')
}

pub(super) fn protocol(raw: Option<&str>) -> Result<Protocol, String> {
    match raw {
        None | Some("TCP") => Ok(Protocol::Tcp),
        Some("UDP") => Ok(Protocol::Udp),
        Some("SCTP") => Ok(Protocol::Sctp),
        Some(other) => Err(format!("unknown protocol {other:?} (TCP, UDP or SCTP)")),
    }
}

pub(super) fn annotation<'a>(meta: &'a ObjectMeta, name: &str) -> Option<&'a str> {
    meta.annotations
        .as_ref()
        .and_then(|a| a.get(name))
        .map(String::as_str)
}

fn lb_algorithm(meta: &ObjectMeta) -> Result<Option<LbAlgorithm>, Refusal> {
    let Some(raw) = annotation(meta, LB_ALGORITHM_ANNOTATION) else {
        return Ok(None);
    };
    LbAlgorithm::from_name(raw.trim()).map(Some).ok_or_else(|| {
        let known: Vec<&str> = LbAlgorithm::ALL.iter().map(|a| a.name()).collect();
        Refusal::new(
            RejectReason::InvalidAnnotation,
            format!(
                "annotation {LB_ALGORITHM_ANNOTATION}: {:?} is not one of {}",
                shortened(raw),
                known.join(", ")
            ),
        )
    })
}

mod endpoint_slice;
mod node_names;
mod service;
pub use endpoint_slice::endpoint_slice;
pub use node_names::NodeNames;
pub use service::service;

#[cfg(test)]
mod tests;
