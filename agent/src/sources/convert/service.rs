//! Services -> the model: type, addresses (cluster, external, load
//! balancer), ports, traffic policies, session affinity, source ranges and
//! Tern's load-balancing annotations.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use k8s_openapi::api::core::v1 as core;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use ipnetwork::{IpNetwork, Ipv4Network};

use super::*;
use crate::model::{
    LbWeights, RareServiceFields, Service, ServiceKey, ServicePort, ServiceType, TargetPort,
    TrafficPolicy, boxed_if_set,
};

pub fn service(object: &core::Service) -> Conversion<Service> {
    let labels = object.metadata.labels.as_ref();
    if labels.is_some_and(|l| l.contains_key(SERVICE_PROXY_NAME_LABEL)) {
        return Conversion::Ignored(format!(
            "owned by another proxy ({SERVICE_PROXY_NAME_LABEL})"
        ));
    }
    let mut warnings = Vec::new();
    let result = convert_service(object, &mut warnings);
    Conversion::from_result(result, warnings)
}

fn convert_service(object: &core::Service, warnings: &mut Vec<String>) -> Result<Service, Refusal> {
    let (namespace, name) = identity(&object.metadata)?;
    let spec = object.spec.clone().unwrap_or_default();
    let service_type = match spec.type_.as_deref() {
        None | Some("ClusterIP") => ServiceType::ClusterIp,
        Some("NodePort") => ServiceType::NodePort,
        Some("LoadBalancer") => ServiceType::LoadBalancer,
        Some("ExternalName") => ServiceType::ExternalName,
        Some(other) => return Err(format!("unknown spec.type {:?}", shortened(other)).into()),
    };
    let headless_label = object
        .metadata
        .labels
        .as_ref()
        .is_some_and(|l| l.contains_key(HEADLESS_LABEL));
    let cluster_ips = if service_type == ServiceType::ExternalName || headless_label {
        Vec::new()
    } else {
        cluster_ips(&spec, warnings)?
    };
    let ingress_ips: Vec<String> = object
        .status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_ref())
        .into_iter()
        .flatten()
        // ipMode Proxy (1.30+): the load balancer proxies and sends to the
        // nodes itself, so its address is not served here, and pods
        // reaching it go through the load balancer (as kube-proxy does).
        .filter(|ingress| ingress.ip_mode.as_deref() != Some("Proxy"))
        .filter_map(|ingress| ingress.ip.clone())
        .collect();
    let lb_algorithm = lb_algorithm(&object.metadata)?;
    let lb_weights = lb_weights(&object.metadata)?;
    let external_ips = service_ips(
        "spec.externalIPs",
        spec.external_ips.as_deref().unwrap_or_default(),
        warnings,
    )?;
    let load_balancer_ips = service_ips("status.loadBalancer.ingress.ip", &ingress_ips, warnings)?;
    Ok(Service {
        key: ServiceKey::new(namespace, name),
        service_type,
        cluster_ips,
        ports: service_ports(&spec, service_type, warnings)?,
        session_affinity_timeout: session_affinity(&spec)?,
        external_traffic_policy: traffic_policy(
            "spec.externalTrafficPolicy",
            spec.external_traffic_policy.as_deref(),
        )?,
        internal_traffic_policy: traffic_policy(
            "spec.internalTrafficPolicy",
            spec.internal_traffic_policy.as_deref(),
        )?,
        publish_not_ready_addresses: spec.publish_not_ready_addresses.unwrap_or(false),
        lb_algorithm,
        created: object
            .metadata
            .creation_timestamp
            .as_ref()
            .map(|t| t.0.as_second()),
        rare: boxed_if_set(RareServiceFields {
            external_ips,
            load_balancer_ips,
            health_check_node_port: match spec.health_check_node_port {
                None | Some(0) => None,
                Some(port) => Some(u16::try_from(port).map_err(|_| {
                    Refusal::new(
                        RejectReason::InvalidPort,
                        format!("spec.healthCheckNodePort {port} is not a port"),
                    )
                })?),
            },
            load_balancer_source_ranges: source_ranges(object, &spec, warnings)?,
            lb_weights,
        }),
    })
}

/// `tern.io/lb-weights`: comma-separated `KEY=WEIGHT`, KEY a pod name, an
/// IPv4 address or `default`; WEIGHT 0..=65535.
fn lb_weights(meta: &ObjectMeta) -> Result<LbWeights, Refusal> {
    let mut weights = LbWeights::default();
    let Some(raw) = annotation(meta, LB_WEIGHTS_ANNOTATION) else {
        return Ok(weights);
    };
    for item in raw.split(',').map(str::trim).filter(|i| !i.is_empty()) {
        let bad = |why: &str| {
            Refusal::new(
                RejectReason::InvalidAnnotation,
                format!(
                    "annotation {LB_WEIGHTS_ANNOTATION}: {:?}: {why}",
                    shortened(item)
                ),
            )
        };
        let (key, weight) = item
            .split_once('=')
            .ok_or_else(|| bad("expected NAME=WEIGHT"))?;
        let (key, weight) = (key.trim(), weight.trim());
        let weight: u32 = weight
            .parse()
            .ok()
            .filter(|w| *w <= LB_WEIGHT_MAX)
            .ok_or_else(|| bad(&format!("the weight must be 0..={LB_WEIGHT_MAX}")))?;
        if key.is_empty() {
            return Err(bad("the name is empty"));
        } else if key == "default" {
            weights.default = weight;
        } else if let Ok(address) = key.parse::<Ipv4Addr>() {
            weights.by_address.insert(address, weight);
        } else {
            weights.by_pod.insert(key.into(), weight);
        }
    }
    Ok(weights)
}

/// `clusterIPs` wins over `clusterIP` (the API keeps them in step; `[0]` is
/// the primary). Empty result = headless.
fn cluster_ips(
    spec: &core::ServiceSpec,
    warnings: &mut Vec<String>,
) -> Result<Vec<Ipv4Addr>, Refusal> {
    let raw: Vec<String> = match &spec.cluster_ips {
        Some(ips) if !ips.is_empty() => ips.clone(),
        _ => spec
            .cluster_ip
            .iter()
            .filter(|ip| !ip.is_empty())
            .cloned()
            .collect(),
    };
    if raw.iter().any(|ip| ip == "None") {
        return Ok(Vec::new());
    }
    if raw.is_empty() {
        // Without an API server nobody allocates one; headless must be explicit.
        return Err(Refusal::new(
            RejectReason::MissingClusterIp,
            "spec.clusterIP is missing: give an address, or None for a headless Service",
        ));
    }
    let ips = service_ips("spec.clusterIPs", &raw, warnings)?;
    if ips.is_empty() {
        return Err(Refusal::new(
            RejectReason::InvalidAddress,
            format!(
                "only IPv6 cluster IPs ({}): Tern serves IPv4 only",
                raw.join(", ")
            ),
        ));
    }
    Ok(ips)
}

/// Parses every address; IPv6 ones are skipped with a warning.
/// `spec.loadBalancerSourceRanges`, else the annotation; `None`: neither.
fn source_ranges(
    object: &core::Service,
    spec: &core::ServiceSpec,
    warnings: &mut Vec<String>,
) -> Result<Option<Vec<Ipv4Network>>, Refusal> {
    let (field, raw): (&str, Vec<String>) = match spec.load_balancer_source_ranges.as_deref() {
        Some(ranges) if !ranges.is_empty() => ("spec.loadBalancerSourceRanges", ranges.to_vec()),
        _ => match object
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(SOURCE_RANGES_ANNOTATION))
            .filter(|v| !v.trim().is_empty())
        {
            Some(value) => (
                SOURCE_RANGES_ANNOTATION,
                value.split(',').map(|r| r.trim().to_owned()).collect(),
            ),
            None => return Ok(None),
        },
    };
    let mut ranges = Vec::new();
    for text in &raw {
        match text.parse::<IpNetwork>() {
            // The API accepts host bits; the range is the network.
            Ok(IpNetwork::V4(cidr)) => ranges
                .push(Ipv4Network::new(cidr.network(), cidr.prefix()).map_err(|e| e.to_string())?),
            Ok(IpNetwork::V6(cidr)) => {
                warnings.push(format!("{field}: IPv6 range {cidr} skipped (IPv4 only)"))
            }
            Err(_) => {
                return Err(format!("{field}: {:?} is not a CIDR", shortened(text)).into());
            }
        }
    }
    Ok(Some(ranges))
}

/// Addresses a Service cannot take as its own: 0.0.0.0, loopback and
/// link-local (the API server refuses them too; a loopback one would
/// capture the node's own traffic), multicast and broadcast (no
/// connection goes there).
fn service_ips(
    field: &str,
    raw: &[String],
    warnings: &mut Vec<String>,
) -> Result<Vec<Ipv4Addr>, Refusal> {
    let ips = ipv4s(field, raw, warnings)?;
    if let Some(ip) = ips.iter().find(|ip| {
        ip.is_unspecified()
            || ip.is_loopback()
            || ip.is_link_local()
            || ip.is_multicast()
            || ip.is_broadcast()
    }) {
        return Err(Refusal::new(
            RejectReason::InvalidAddress,
            format!("{field}: {ip} is not an address a Service can take"),
        ));
    }
    Ok(ips)
}

fn service_ports(
    spec: &core::ServiceSpec,
    service_type: ServiceType,
    warnings: &mut Vec<String>,
) -> Result<Vec<ServicePort>, Refusal> {
    use RejectReason::{DuplicatePort, InvalidPort};
    let raw = spec.ports.as_deref().unwrap_or_default();
    let mut names = BTreeSet::new();
    let mut numbers = BTreeSet::new();
    // Exact capacity: kept for the Service's lifetime, and a first push
    // would reserve 4.
    let mut ports = Vec::with_capacity(raw.len());
    for (index, p) in raw.iter().enumerate() {
        let name = p.name.clone().unwrap_or_default();
        let label = port_label(index, &name);
        if name.is_empty() && raw.len() > 1 {
            return Err(Refusal::new(
                InvalidPort,
                format!("{label}: a Service with several ports must name each of them"),
            ));
        }
        if !names.insert(name.clone()) {
            return Err(Refusal::new(
                DuplicatePort,
                format!("{label}: duplicate port name"),
            ));
        }
        let port = port_number(p.port).ok_or_else(|| {
            Refusal::new(
                InvalidPort,
                format!("{label}: port {} is out of range 1..=65535", p.port),
            )
        })?;
        let protocol = protocol(p.protocol.as_deref()).map_err(|e| format!("{label}: {e}"))?;
        if protocol == Protocol::Sctp {
            warnings.push(format!(
                "{label}: SCTP is not supported; this port gets no datapath state"
            ));
        }
        if !numbers.insert((port, protocol)) {
            return Err(Refusal::new(
                DuplicatePort,
                format!("{label}: port {port}/{protocol} is listed twice"),
            ));
        }
        let target_port = match &p.target_port {
            // The API defaults an absent (or zero) targetPort to the port.
            None | Some(IntOrString::Int(0)) => TargetPort::Number(port),
            Some(IntOrString::String(s)) if s.is_empty() => TargetPort::Number(port),
            Some(IntOrString::Int(n)) => TargetPort::Number(port_number(*n).ok_or_else(|| {
                Refusal::new(
                    InvalidPort,
                    format!("{label}: targetPort {n} is out of range 1..=65535"),
                )
            })?),
            Some(IntOrString::String(s)) if is_port_name(s) => TargetPort::Name(s.clone()),
            Some(IntOrString::String(s)) => {
                return Err(Refusal::new(
                    InvalidPort,
                    format!(
                        "{label}: targetPort {:?} is neither a number nor a port name",
                        shortened(s)
                    ),
                ));
            }
        };
        let node_port = match p.node_port {
            None => None,
            Some(n) => {
                let n = port_number(n).ok_or_else(|| {
                    Refusal::new(
                        InvalidPort,
                        format!("{label}: nodePort {n} is out of range 1..=65535"),
                    )
                })?;
                if matches!(
                    service_type,
                    ServiceType::NodePort | ServiceType::LoadBalancer
                ) {
                    Some(n)
                } else {
                    warnings.push(format!(
                        "{label}: nodePort {n} ignored: the Service type has no node ports"
                    ));
                    None
                }
            }
        };
        ports.push(ServicePort {
            name,
            protocol,
            port,
            target_port,
            node_port,
        });
    }
    Ok(ports)
}

fn session_affinity(spec: &core::ServiceSpec) -> Result<Option<u32>, Refusal> {
    match spec.session_affinity.as_deref() {
        None | Some("None") => Ok(None),
        Some("ClientIP") => {
            let timeout = spec
                .session_affinity_config
                .as_ref()
                .and_then(|c| c.client_ip.as_ref())
                .and_then(|c| c.timeout_seconds);
            match timeout {
                None => Ok(Some(Service::DEFAULT_AFFINITY_TIMEOUT)),
                Some(t @ 1..=86400) => Ok(Some(t as u32)),
                Some(t) => Err(format!(
                    "sessionAffinityConfig.clientIP.timeoutSeconds {t} is out of range 1..=86400"
                )
                .into()),
            }
        }
        Some(other) => Err(format!("unknown spec.sessionAffinity {:?}", shortened(other)).into()),
    }
}

fn traffic_policy(field: &str, raw: Option<&str>) -> Result<TrafficPolicy, Refusal> {
    match raw {
        None | Some("Cluster") => Ok(TrafficPolicy::Cluster),
        Some("Local") => Ok(TrafficPolicy::Local),
        Some(other) => Err(format!("unknown {field} {:?}", shortened(other)).into()),
    }
}
