//! EndpointSlices -> the model: which slices a proxy serves, their ports,
//! and each endpoint's addresses, conditions (with the API's nil meanings),
//! node, pod and topology hints.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::sync::Arc;

use k8s_openapi::api::discovery::v1 as discovery;

use super::{
    Conversion, HEADLESS_LABEL, NodeNames, Refusal, RejectReason, SERVICE_NAME_LABEL,
    SERVICE_PROXY_NAME_LABEL, check_name, identity, port_label, port_number, protocol, shortened,
};
use crate::model::{
    Endpoint, EndpointPort, EndpointSlice, PodName, RareEndpointFields, ServiceKey, TopologyHints,
    boxed_if_set,
};

/// `node_names` gives the endpoints of one node one shared name string.
pub fn endpoint_slice(
    object: &discovery::EndpointSlice,
    node_names: &mut NodeNames,
) -> Conversion<EndpointSlice> {
    let labels = object.metadata.labels.as_ref();
    if labels.is_some_and(|l| l.contains_key(SERVICE_PROXY_NAME_LABEL)) {
        return Conversion::Ignored(format!(
            "owned by another proxy ({SERVICE_PROXY_NAME_LABEL})"
        ));
    }
    if labels.is_some_and(|l| l.contains_key(HEADLESS_LABEL)) {
        return Conversion::Ignored(format!("slice of a headless Service ({HEADLESS_LABEL})"));
    }
    if object.address_type != "IPv4" {
        return Conversion::Ignored(format!(
            "addressType {}: only IPv4 is served",
            object.address_type
        ));
    }
    let mut warnings = Vec::new();
    let result = convert_slice(object, node_names, &mut warnings);
    Conversion::from_result(result, warnings)
}

fn convert_slice(
    object: &discovery::EndpointSlice,
    node_names: &mut NodeNames,
    warnings: &mut Vec<String>,
) -> Result<EndpointSlice, Refusal> {
    let (namespace, name) = identity(&object.metadata)?;
    let labels: Option<&BTreeMap<String, String>> = object.metadata.labels.as_ref();
    let service = labels
        .and_then(|l| l.get(SERVICE_NAME_LABEL))
        .filter(|s| !s.is_empty())
        .ok_or_else(|| {
            Refusal::new(
                RejectReason::MissingServiceName,
                format!("label {SERVICE_NAME_LABEL} is missing"),
            )
        })?;
    check_name(&format!("label {SERVICE_NAME_LABEL}"), service)?;
    let ports = match object.ports.as_deref() {
        None | Some([]) => None,
        Some(raw) => Some(slice_ports(raw, warnings)?),
    };
    // Exact capacity: collecting a Result does not know the length and
    // left 16 slots for 10 endpoints (kept for the model's lifetime).
    let mut endpoints = Vec::with_capacity(object.endpoints.len());
    for (index, e) in object.endpoints.iter().enumerate() {
        match endpoint(index, e, node_names)? {
            Some(endpoint) => endpoints.push(endpoint),
            // The API requires one (minItems 1); kube-proxy skips it too.
            None => warnings.push(format!("endpoints[{index}]: no address, skipped")),
        }
    }
    endpoints.shrink_to_fit();
    // One namespace string for the slice and the Service it names.
    let namespace: Arc<str> = namespace.into();
    Ok(EndpointSlice {
        service: ServiceKey::new(namespace.clone(), service.as_str()),
        key: (namespace, name.into()),
        ports,
        endpoints,
    })
}

fn slice_ports(
    raw: &[discovery::EndpointPort],
    warnings: &mut Vec<String>,
) -> Result<Vec<EndpointPort>, Refusal> {
    let mut names = BTreeSet::new();
    // Exact capacity: kept for the slice's lifetime, and a first push
    // would reserve 4.
    let mut ports = Vec::with_capacity(raw.len());
    for (index, p) in raw.iter().enumerate() {
        let name = p.name.clone().unwrap_or_default();
        let label = port_label(index, &name);
        if !names.insert(name.clone()) {
            return Err(Refusal::new(
                RejectReason::DuplicatePort,
                format!("{label}: duplicate port name"),
            ));
        }
        let Some(number) = p.port else {
            // The API's "all ports" entry: nothing a Service port maps to.
            warnings.push(format!("{label}: no port number, skipped"));
            continue;
        };
        let port = port_number(number).ok_or_else(|| {
            Refusal::new(
                RejectReason::InvalidPort,
                format!("{label}: port {number} is out of range 1..=65535"),
            )
        })?;
        let protocol = protocol(p.protocol.as_deref()).map_err(|e| format!("{label}: {e}"))?;
        ports.push(EndpointPort {
            name,
            port,
            protocol,
        });
    }
    Ok(ports)
}

/// `None`: the endpoint has no address.
fn endpoint(
    index: usize,
    raw: &discovery::Endpoint,
    node_names: &mut NodeNames,
) -> Result<Option<Endpoint>, Refusal> {
    let mut addresses = raw.addresses.iter().map(|a| {
        a.parse::<Ipv4Addr>().map_err(|_| {
            Refusal::new(
                RejectReason::InvalidAddress,
                format!(
                    "endpoints[{index}]: {:?} is not an IPv4 address",
                    shortened(a)
                ),
            )
        })
    });
    let Some(address) = addresses.next().transpose()? else {
        return Ok(None);
    };
    let more_addresses = addresses.collect::<Result<Vec<_>, _>>()?;
    let conditions = raw.conditions.clone().unwrap_or_default();
    // The API's nil meanings: unknown readiness counts as ready, serving
    // follows ready, and nothing is terminating unless it says so.
    let ready = conditions.ready.unwrap_or(true);
    let hints = TopologyHints {
        zones: raw
            .hints
            .iter()
            .flat_map(|h| h.for_zones.iter().flatten())
            .map(|z| z.name.clone())
            .collect(),
        nodes: raw
            .hints
            .iter()
            .flat_map(|h| h.for_nodes.iter().flatten())
            .map(|n| n.name.clone())
            .collect(),
    };
    let rare = RareEndpointFields {
        more_addresses,
        hints,
    };
    let serving = conditions.serving.unwrap_or(ready);
    let terminating = conditions.terminating.unwrap_or(false);
    Ok(Some(Endpoint {
        node_name: raw.node_name.as_deref().map(|n| node_names.get(n)),
        pod_name: raw
            .target_ref
            .as_ref()
            .filter(|r| r.kind.as_deref() == Some("Pod"))
            .and_then(|r| r.name.as_deref())
            .map(PodName::from),
        rare: boxed_if_set(rare),
        ..Endpoint::new(address, ready, serving, terminating)
    }))
}
