//! Which Services this node answers load balancers' health checks for
//! (`spec.healthCheckNodePort`), and with how many local endpoints: the
//! data behind kube-proxy's service health server.

use std::collections::BTreeMap;

use super::lb::local_ready_endpoints;
use crate::model::{Cluster, EndpointSlice, ServiceKey, ServiceType, TrafficPolicy};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthCheck {
    pub service: ServiceKey,
    /// Ready endpoints on this node (per Service port, as kube-proxy counts).
    pub local_endpoints: usize,
}

/// By healthCheckNodePort. A port two Services claim stays the first's
/// (in key order); the others are returned as problems.
pub fn health_checks(
    cluster: &Cluster,
    node_name: &str,
) -> (BTreeMap<u16, HealthCheck>, Vec<String>) {
    let mut checks = BTreeMap::new();
    let mut problems = Vec::new();
    for service in cluster.services.values() {
        let Some(port) = service.health_check_node_port() else {
            continue;
        };
        // The API sets the field only for these; anything else is ignored.
        if service.service_type != ServiceType::LoadBalancer
            || service.external_traffic_policy != TrafficPolicy::Local
        {
            continue;
        }
        if let Some(owner) = checks.get(&port) {
            let owner: &HealthCheck = owner;
            problems.push(format!(
                "healthCheckNodePort {port} of {} is already {}'s",
                service.key, owner.service
            ));
            continue;
        }
        let slices: Vec<&EndpointSlice> = cluster.slices_of(&service.key).collect();
        checks.insert(
            port,
            HealthCheck {
                service: service.key.clone(),
                local_endpoints: local_ready_endpoints(service, &slices, node_name),
            },
        );
    }
    (checks, problems)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::model::{
        Endpoint, EndpointPort, Protocol, RareServiceFields, Service, ServicePort, TargetPort,
        boxed_if_set,
    };

    fn service(name: &str, etp: TrafficPolicy, port: Option<u16>, ports: usize) -> Service {
        Service {
            key: ServiceKey::new("default", name),
            created: None,
            service_type: ServiceType::LoadBalancer,
            cluster_ips: vec!["10.96.0.10".parse().unwrap()],
            ports: (0..ports)
                .map(|i| ServicePort {
                    name: format!("p{i}"),
                    protocol: Protocol::Tcp,
                    port: 80 + i as u16,
                    target_port: TargetPort::Number(8080 + i as u16),
                    node_port: Some(30080 + i as u16),
                })
                .collect(),
            session_affinity_timeout: None,
            external_traffic_policy: etp,
            internal_traffic_policy: TrafficPolicy::Cluster,
            publish_not_ready_addresses: false,
            lb_algorithm: None,
            rare: boxed_if_set(RareServiceFields {
                health_check_node_port: port,
                ..Default::default()
            }),
        }
    }

    fn endpoint(ip: &str, node: &str, ready: bool) -> Endpoint {
        Endpoint {
            node_name: Some(node.into()),
            ..Endpoint::new(ip.parse().unwrap(), ready, ready, false)
        }
    }

    fn cluster(services: Vec<Service>, endpoints: Vec<Endpoint>, ports: usize) -> Cluster {
        let mut cluster = Cluster::default();
        for service in services {
            let slice = EndpointSlice {
                key: ("default".into(), format!("{}-1", service.key.name).into()),
                service: service.key.clone(),
                ports: Some(
                    (0..ports)
                        .map(|i| EndpointPort {
                            name: format!("p{i}"),
                            port: 8080 + i as u16,
                            protocol: Protocol::Tcp,
                        })
                        .collect(),
                ),
                endpoints: endpoints.clone(),
            };
            cluster.slices.insert(slice.key.clone(), Arc::new(slice));
            cluster
                .services
                .insert(service.key.clone(), Arc::new(service));
        }
        cluster
    }

    #[test]
    fn local_ready_endpoints_are_counted_per_service_port() {
        let endpoints = vec![
            endpoint("10.244.1.2", "n1", true),
            endpoint("10.244.1.3", "n1", false),
            endpoint("10.244.2.2", "n2", true),
        ];
        let c = cluster(
            vec![service("web", TrafficPolicy::Local, Some(32000), 2)],
            endpoints,
            2,
        );
        let (checks, problems) = health_checks(&c, "n1");
        assert!(problems.is_empty());
        assert_eq!(
            checks[&32000].local_endpoints, 2,
            "one ready pod, two ports"
        );
        assert_eq!(checks[&32000].service, ServiceKey::new("default", "web"));
        let (checks, _) = health_checks(&c, "n3");
        assert_eq!(checks[&32000].local_endpoints, 0);
    }

    #[test]
    fn only_local_load_balancers_get_one_and_a_port_is_the_first_services() {
        let c = cluster(
            vec![
                service("a", TrafficPolicy::Local, Some(32000), 1),
                service("b", TrafficPolicy::Local, Some(32000), 1),
                service("cluster", TrafficPolicy::Cluster, Some(32001), 1),
                service("none", TrafficPolicy::Local, None, 1),
            ],
            vec![endpoint("10.244.1.2", "n1", true)],
            1,
        );
        let (checks, problems) = health_checks(&c, "n1");
        assert_eq!(checks.keys().collect::<Vec<_>>(), [&32000]);
        assert_eq!(&*checks[&32000].service.name, "a");
        assert_eq!(problems.len(), 1, "{problems:?}");
    }
}
