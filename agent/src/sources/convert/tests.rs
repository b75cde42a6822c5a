//! Unit tests of the parent module.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;

use super::*;
use crate::model::{
    EndpointPort, EndpointSlice, LbWeights, PodName, Service, ServiceKey, ServicePort, ServiceType,
    TargetPort, TrafficPolicy,
};

fn service_from(yaml: &str) -> Conversion<Service> {
    service(&serde_yaml_ng::from_str(yaml).expect("test YAML parses"))
}

fn slice_from(yaml: &str) -> Conversion<EndpointSlice> {
    endpoint_slice(
        &serde_yaml_ng::from_str(yaml).expect("test YAML parses"),
        &mut NodeNames::default(),
    )
}

/// A ClusterIP Service `web` with the given `spec` body (indented 2).
fn web_with(spec: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: web\n  namespace: shop\nspec:\n{spec}"
    )
}

fn accepted<T: std::fmt::Debug>(c: Conversion<T>) -> (T, Vec<String>) {
    match c {
        Conversion::Accepted(value, warnings) => (value, warnings),
        other => panic!("expected accepted, got {other:?}"),
    }
}

#[test]
fn a_load_balancer_service_converts_field_by_field() {
    let yaml = r#"
apiVersion: v1
kind: Service
metadata:
  name: shop
  namespace: prod
  creationTimestamp: "2024-05-01T10:00:00Z"
  annotations:
    tern.io/lb-algorithm: maglev
spec:
  type: LoadBalancer
  clusterIP: 10.96.12.34
  clusterIPs: [10.96.12.34]
  externalIPs: [198.51.100.9]
  externalTrafficPolicy: Local
  internalTrafficPolicy: Cluster
  publishNotReadyAddresses: true
  sessionAffinity: ClientIP
  sessionAffinityConfig:
    clientIP:
      timeoutSeconds: 300
  selector:
    app: shop
  ports:
  - name: http
    protocol: TCP
    port: 80
    targetPort: http-web
    nodePort: 30080
  - name: metrics
    port: 9100
    targetPort: 9100
    nodePort: 30091
status:
  loadBalancer:
    ingress:
    - ip: 203.0.113.7
    - ip: 203.0.113.8
      ipMode: VIP
    - ip: 203.0.113.9
      ipMode: Proxy
    - hostname: lb.example.com
"#;
    let (svc, warnings) = accepted(service_from(yaml));
    assert!(warnings.is_empty(), "{warnings:?}");
    assert_eq!(svc.key.to_string(), "prod/shop");
    assert_eq!(svc.service_type, ServiceType::LoadBalancer);
    assert_eq!(svc.cluster_ips, [Ipv4Addr::new(10, 96, 12, 34)]);
    assert_eq!(svc.external_ips(), [Ipv4Addr::new(198, 51, 100, 9)]);
    // ipMode VIP (the default) is served, Proxy is the balancer's.
    assert_eq!(
        svc.load_balancer_ips(),
        [Ipv4Addr::new(203, 0, 113, 7), Ipv4Addr::new(203, 0, 113, 8)]
    );
    assert_eq!(svc.session_affinity_timeout, Some(300));
    assert_eq!(svc.external_traffic_policy, TrafficPolicy::Local);
    assert_eq!(svc.internal_traffic_policy, TrafficPolicy::Cluster);
    assert!(svc.publish_not_ready_addresses);
    assert_eq!(svc.lb_algorithm, Some(LbAlgorithm::Maglev));
    assert_eq!(svc.created, Some(1_714_557_600));
    assert_eq!(
        svc.ports,
        [
            ServicePort {
                name: "http".into(),
                protocol: Protocol::Tcp,
                port: 80,
                target_port: TargetPort::Name("http-web".into()),
                node_port: Some(30080),
            },
            ServicePort {
                name: "metrics".into(),
                protocol: Protocol::Tcp,
                port: 9100,
                target_port: TargetPort::Number(9100),
                node_port: Some(30091),
            },
        ]
    );
}

#[test]
fn api_defaults_apply() {
    let (svc, _) = accepted(service_from(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: web\nspec:\n  clusterIP: 10.96.0.5\n  sessionAffinity: ClientIP\n  ports:\n  - port: 8080\n",
    ));
    assert_eq!(svc.key.to_string(), "default/web");
    assert_eq!(svc.service_type, ServiceType::ClusterIp);
    assert_eq!(svc.session_affinity_timeout, Some(10800));
    assert_eq!((svc.lb_algorithm, svc.created), (None, None));
    let port = &svc.ports[0];
    assert_eq!((port.name.as_str(), port.protocol), ("", Protocol::Tcp));
    assert_eq!(port.target_port, TargetPort::Number(8080));
}

#[test]
fn every_bad_service_is_rejected_with_its_reason() {
    let port80 = "  ports:\n  - port: 80\n";
    use RejectReason::*;
    let cases: Vec<(String, &str, RejectReason)> = vec![
            ("apiVersion: v1\nkind: Service\nmetadata:\n  namespace: shop\nspec:\n  clusterIP: 10.96.0.1\n".into(), "metadata.name is missing", MissingName),
            (web_with("  clusterIP: 10.96.0.1\n  ports:\n  - port: 0\n"), "port 0 is out of range 1..=65535", InvalidPort),
            (web_with("  clusterIP: 10.96.0.1\n  ports:\n  - port: 65536\n"), "port 65536 is out of range", InvalidPort),
            (web_with("  clusterIP: 10.96.0.1\n  ports:\n  - name: http\n    port: 80\n  - name: http\n    port: 81\n"), "port \"http\": duplicate port name", DuplicatePort),
            (web_with("  clusterIP: 10.96.0.1\n  ports:\n  - name: http\n    port: 80\n  - port: 81\n"), "several ports must name each", InvalidPort),
            (web_with("  clusterIP: 10.96.0.1\n  ports:\n  - name: a\n    port: 80\n  - name: b\n    port: 80\n"), "port 80/TCP is listed twice", DuplicatePort),
            (web_with("  type: NodePort\n  clusterIP: 10.96.0.1\n  ports:\n  - port: 80\n    nodePort: 0\n"), "nodePort 0 is out of range 1..=65535", InvalidPort),
            (web_with("  type: NodePort\n  clusterIP: 10.96.0.1\n  ports:\n  - port: 80\n    nodePort: 70000\n"), "nodePort 70000 is out of range", InvalidPort),
            (web_with("  clusterIP: 10.96.0.1\n  ports:\n  - port: 80\n    protocol: HTTP\n"), "unknown protocol \"HTTP\"", InvalidField),
            (web_with("  clusterIP: 10.96.0.1\n  ports:\n  - port: 80\n    targetPort: 70000\n"), "targetPort 70000 is out of range", InvalidPort),
            (web_with("  clusterIP: 10.96.0.1\n  ports:\n  - port: 80\n    targetPort: Http_Port\n"), "targetPort \"Http_Port\" is neither", InvalidPort),
            (web_with(&format!("  clusterIP: 10.96.0.300\n{port80}")), "spec.clusterIPs: \"10.96.0.300\" is not an IP address", InvalidAddress),
            (web_with(&format!("  clusterIPs: [fd00::10]\n{port80}")), "only IPv6 cluster IPs (fd00::10)", InvalidAddress),
            (web_with(&format!("  clusterIP: 10.96.0.1\n  externalIPs: [example.com]\n{port80}")), "spec.externalIPs: \"example.com\" is not an IP address", InvalidAddress),
            (web_with(&format!("  type: LoadBalancer\n  clusterIP: 10.96.0.1\n{port80}status:\n  loadBalancer:\n    ingress:\n    - ip: 1.2.3\n")), "status.loadBalancer.ingress.ip: \"1.2.3\"", InvalidAddress),
            (web_with(&format!("  type: Ingress\n  clusterIP: 10.96.0.1\n{port80}")), "unknown spec.type \"Ingress\"", InvalidField),
            (web_with(port80), "spec.clusterIP is missing", MissingClusterIp),
            (web_with(&format!("  clusterIP: 10.96.0.1\n  sessionAffinity: Cookie\n{port80}")), "unknown spec.sessionAffinity \"Cookie\"", InvalidField),
            (web_with(&format!("  clusterIP: 10.96.0.1\n  sessionAffinity: ClientIP\n  sessionAffinityConfig:\n    clientIP:\n      timeoutSeconds: 0\n{port80}")), "timeoutSeconds 0 is out of range 1..=86400", InvalidField),
            (web_with(&format!("  clusterIP: 10.96.0.1\n  externalTrafficPolicy: Global\n{port80}")), "unknown spec.externalTrafficPolicy \"Global\"", InvalidField),
            (web_with(&format!("  clusterIP: 10.96.0.1\n  internalTrafficPolicy: Node\n{port80}")), "unknown spec.internalTrafficPolicy \"Node\"", InvalidField),
            (
                "apiVersion: v1\nkind: Service\nmetadata:\n  name: web\n  annotations:\n    tern.io/lb-algorithm: round-robin\nspec:\n  clusterIP: 10.96.0.1\n".into(),
                "\"round-robin\" is not one of random, maglev, rr, wrr, lc, wlc, sh, dh, sed, nq",
                InvalidAnnotation,
            ),
            (
                "apiVersion: v1\nkind: Service\nmetadata:\n  name: web\n  annotations:\n    tern.io/lb-weights: web-0\nspec:\n  clusterIP: 10.96.0.1\n".into(),
                "tern.io/lb-weights: \"web-0\": expected NAME=WEIGHT",
                InvalidAnnotation,
            ),
            (
                "apiVersion: v1\nkind: Service\nmetadata:\n  name: web\n  annotations:\n    tern.io/lb-weights: web-0=70000\nspec:\n  clusterIP: 10.96.0.1\n".into(),
                "\"web-0=70000\": the weight must be 0..=65535",
                InvalidAnnotation,
            ),
            (
                "apiVersion: v1\nkind: Service\nmetadata:\n  name: web\n  annotations:\n    tern.io/lb-weights: =3\nspec:\n  clusterIP: 10.96.0.1\n".into(),
                "\"=3\": the name is empty",
                InvalidAnnotation,
            ),
        ];
    let long = "a".repeat(MAX_NAME_LEN + 1);
    let cases = cases.into_iter().chain([
        (web_with(&format!("  clusterIP: 127.0.0.1\n{port80}")), "spec.clusterIPs: 127.0.0.1 is not an address a Service can take", InvalidAddress),
        (web_with(&format!("  clusterIP: 0.0.0.0\n{port80}")), "0.0.0.0 is not an address", InvalidAddress),
        (web_with(&format!("  clusterIP: 10.96.0.1\n  externalIPs: [169.254.169.254]\n{port80}")), "spec.externalIPs: 169.254.169.254 is not an address", InvalidAddress),
        (web_with(&format!("  clusterIP: 10.96.0.1\n  externalIPs: [255.255.255.255]\n{port80}")), "255.255.255.255 is not an address", InvalidAddress),
        (web_with(&format!("  type: LoadBalancer\n  clusterIP: 10.96.0.1\n{port80}status:\n  loadBalancer:\n    ingress:\n    - ip: 224.0.0.5\n")), "ingress.ip: 224.0.0.5 is not an address", InvalidAddress),
        (format!("apiVersion: v1\nkind: Service\nmetadata:\n  name: {long}\nspec:\n  clusterIP: 10.96.0.1\n"), "metadata.name is 254 bytes long, more than 253", NameTooLong),
        (format!("apiVersion: v1\nkind: Service\nmetadata:\n  name: web\n  namespace: {long}\nspec:\n  clusterIP: 10.96.0.1\n"), "metadata.namespace is 254 bytes long", NameTooLong),
        (web_with(&format!("  clusterIP: 10.96.0.1\n  ports:\n  - port: 80\n    targetPort: {long}\n")), "...(254 bytes)\" is neither a number nor a port name", InvalidPort),
    ]);
    for (yaml, message, reason) in cases {
        match service_from(&yaml) {
            Conversion::Rejected(e) => {
                assert!(e.message.contains(message), "{e:?} lacks {message:?}");
                assert_eq!(e.reason, reason, "{e:?}");
            }
            other => panic!("{message}: got {other:?}"),
        }
    }
}

#[test]
fn sctp_ports_and_ipv6_addresses_are_kept_out_with_a_warning() {
    let (svc, warnings) = accepted(service_from(&web_with(
        "  clusterIPs: [10.96.0.7, fd00::7]\n  externalIPs: [2001:db8::1]\n  ports:\n  - name: sig\n    protocol: SCTP\n    port: 3868\n  - name: http\n    port: 80\n",
    )));
    assert_eq!(svc.cluster_ips, [Ipv4Addr::new(10, 96, 0, 7)]);
    assert!(svc.external_ips().is_empty());
    assert_eq!(svc.ports[0].protocol, Protocol::Sctp);
    assert_eq!(warnings.len(), 3, "{warnings:?}");
    assert!(
        warnings
            .iter()
            .any(|w| w.contains("port \"sig\": SCTP is not supported"))
    );
    assert!(
        warnings
            .iter()
            .any(|w| w.contains("IPv6 address fd00::7 skipped"))
    );
}

#[test]
fn headless_external_name_and_foreign_services() {
    let (headless, _) = accepted(service_from(&web_with(
        "  clusterIP: None\n  ports:\n  - port: 80\n",
    )));
    assert!(headless.is_headless());
    let labelled = "apiVersion: v1\nkind: Service\nmetadata:\n  name: web\n  labels:\n    service.kubernetes.io/headless: \"\"\nspec:\n  clusterIP: 10.96.0.1\n";
    assert!(accepted(service_from(labelled)).0.is_headless());
    let (alias, _) = accepted(service_from(&web_with(
        "  type: ExternalName\n  externalName: db.example.com\n",
    )));
    assert_eq!(alias.service_type, ServiceType::ExternalName);
    let foreign = "apiVersion: v1\nkind: Service\nmetadata:\n  name: web\n  labels:\n    service.kubernetes.io/service-proxy-name: other-proxy\nspec:\n  clusterIP: 10.96.0.1\n";
    assert!(matches!(service_from(foreign), Conversion::Ignored(_)));
}

const SLICE: &str = r#"
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-abc12
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
  nodeName: node-a
- addresses: ["10.244.2.9"]
  conditions:
    ready: false
    serving: true
    terminating: true
  nodeName: node-b
- addresses: ["10.244.2.10"]
  conditions:
    ready: false
- addresses: ["10.244.3.1"]
  hints:
    forZones: [{name: zone-a}, {name: zone-b}]
    forNodes: [{name: node-c}]
"#;

#[test]
fn slice_conditions_take_the_apis_nil_meanings() {
    let (slice, warnings) = accepted(slice_from(SLICE));
    assert!(warnings.is_empty());
    assert_eq!(slice.key, ("shop".into(), "web-abc12".into()));
    assert_eq!(slice.service, ServiceKey::new("shop", "web"));
    let port = EndpointPort {
        name: "http".into(),
        port: 8080,
        protocol: Protocol::Tcp,
    };
    assert_eq!(slice.ports, Some(vec![port]));
    let conditions: Vec<(bool, bool, bool)> = slice
        .endpoints
        .iter()
        .map(|e| (e.ready, e.serving, e.terminating))
        .collect();
    assert_eq!(
        conditions,
        [
            (true, true, false),
            (false, true, true),
            (false, false, false),
            (true, true, false)
        ]
    );
    assert_eq!(slice.endpoints[0].node_name.as_deref(), Some("node-a"));
    assert!(slice.endpoints[0].zone_hints().is_empty());
    assert_eq!(slice.endpoints[3].zone_hints(), ["zone-a", "zone-b"]);
    assert_eq!(slice.endpoints[3].node_hints(), ["node-c"]);

    let bare = SLICE.replace(
        "ports:\n- name: http\n  protocol: TCP\n  port: 8080\n",
        "ports: []\n",
    );
    assert_eq!(accepted(slice_from(&bare)).0.ports, None);
}

#[test]
fn every_address_of_an_endpoint_is_kept_and_one_without_any_is_skipped() {
    let text = SLICE.replace(
        "- addresses: [\"10.244.1.5\"]\n",
        "- addresses: [\"10.244.1.5\", \"10.244.1.6\"]\n- addresses: []\n",
    );
    let (slice, warnings) = accepted(slice_from(&text));
    assert_eq!(warnings, ["endpoints[1]: no address, skipped"]);
    assert_eq!(slice.endpoints.len(), 4);
    let first: Vec<String> = slice.endpoints[0]
        .addresses()
        .map(|a| a.to_string())
        .collect();
    assert_eq!(first, ["10.244.1.5", "10.244.1.6"]);
    assert_eq!(slice.endpoints[1].addresses().count(), 1);
}

#[test]
fn slices_that_are_not_ours_are_ignored() {
    let ipv6 = SLICE.replace("addressType: IPv4", "addressType: IPv6");
    let headless = SLICE.replace(
        "    kubernetes.io/service-name: web",
        "    kubernetes.io/service-name: web\n    service.kubernetes.io/headless: \"\"",
    );
    let foreign = SLICE.replace(
        "    kubernetes.io/service-name: web",
        "    kubernetes.io/service-name: web\n    service.kubernetes.io/service-proxy-name: other",
    );
    for yaml in [ipv6, headless, foreign] {
        assert!(
            matches!(slice_from(&yaml), Conversion::Ignored(_)),
            "{yaml}"
        );
    }
}

#[test]
fn every_bad_slice_is_rejected_with_its_reason() {
    let cases = [
        (
            SLICE.replace("  name: web-abc12\n", ""),
            "metadata.name is missing",
            RejectReason::MissingName,
        ),
        (
            SLICE.replace("    kubernetes.io/service-name: web\n", "    app: web\n"),
            "label kubernetes.io/service-name is missing",
            RejectReason::MissingServiceName,
        ),
        (
            SLICE.replace("10.244.1.5", "10.244.1.500"),
            "endpoints[0]: \"10.244.1.500\" is not an IPv4 address",
            RejectReason::InvalidAddress,
        ),
        (
            SLICE.replace("10.244.1.5", "fd00::5"),
            "\"fd00::5\" is not an IPv4 address",
            RejectReason::InvalidAddress,
        ),
        (
            SLICE.replace("port: 8080", "port: 0"),
            "port \"http\": port 0 is out of range",
            RejectReason::InvalidPort,
        ),
        (
            SLICE.replace("protocol: TCP", "protocol: QUIC"),
            "unknown protocol \"QUIC\"",
            RejectReason::InvalidField,
        ),
        (
            SLICE.replace("- name: http\n", "- name: http\n  port: 1\n- name: http\n"),
            "duplicate port name",
            RejectReason::DuplicatePort,
        ),
    ];
    let long = "a".repeat(MAX_NAME_LEN + 1);
    let cases = cases.into_iter().chain([
        (
            SLICE.replace("service-name: web", &format!("service-name: {long}")),
            "label kubernetes.io/service-name is 254 bytes long",
            RejectReason::NameTooLong,
        ),
        (
            SLICE.replace("\"10.244.1.5\"", "\"\""),
            "endpoints[0]: \"\" is not an IPv4 address",
            RejectReason::InvalidAddress,
        ),
    ]);
    for (yaml, message, reason) in cases {
        match slice_from(&yaml) {
            Conversion::Rejected(e) => {
                assert!(e.message.contains(message), "{e:?} lacks {message:?}");
                assert_eq!(e.reason, reason, "{e:?}");
            }
            other => panic!("{message}: got {other:?}"),
        }
    }
}

#[test]
fn a_pod_gives_node_labels_addresses_and_named_ports() {
    let yaml = r#"
apiVersion: v1
kind: Pod
metadata:
  name: web-1
  namespace: shop
  labels: {app: web, tier: front}
spec:
  nodeName: node-a
  containers:
  - name: app
    image: web
    ports:
    - {name: http, containerPort: 8080}
    - {name: dns, containerPort: 53, protocol: UDP}
    - {name: sig, containerPort: 3868, protocol: SCTP}
    - {containerPort: 9000}
  - name: sidecar
    image: proxy
    ports:
    - {name: admin, containerPort: 9901, protocol: TCP}
    - {name: http, containerPort: 8080}
  initContainers:
  - name: init
    image: init
    ports: [{name: setup, containerPort: 7000}]
status:
  podIPs: [{ip: 10.244.1.5}, {ip: "fd00::5"}]
"#;
    let object: core::Pod = serde_yaml_ng::from_str(yaml).unwrap();
    let (web, warnings) = accepted(pod(&object));
    assert_eq!(warnings.len(), 1, "{warnings:?}"); // the IPv6 address
    let named = |name: &str, protocol, port| NamedPort {
        name: name.into(),
        protocol,
        port,
    };
    assert_eq!(
        web,
        Pod {
            key: ("shop".into(), "web-1".into()),
            node: Some("node-a".into()),
            ips: vec![Ipv4Addr::new(10, 244, 1, 5)],
            host_network: false,
            finished: false,
            labels: [("app", "web"), ("tier", "front")]
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            named_ports: vec![
                named("admin", Protocol::Tcp, 9901),
                named("dns", Protocol::Udp, 53),
                named("http", Protocol::Tcp, 8080),
            ],
        }
    );
    // Not scheduled yet: no node, no addresses, no labels.
    let pending: core::Pod = serde_yaml_ng::from_str(
            "apiVersion: v1\nkind: Pod\nmetadata: {name: p, namespace: shop}\nspec: {containers: [{name: c}]}\n",
        )
        .unwrap();
    let (pending, _) = accepted(pod(&pending));
    assert_eq!(pending.node, None);
    assert!(pending.ips.is_empty() && pending.labels.is_empty());
    assert!(pending.named_ports.is_empty());
}

#[test]
fn a_namespace_always_carries_its_name_label() {
    let object: core::Namespace = serde_yaml_ng::from_str(
            "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: shop\n  labels: {team: a, kubernetes.io/metadata.name: wrong}\n",
        )
        .unwrap();
    let (ns, _) = accepted(namespace(&object));
    let labels: Vec<(&str, &str)> = ns
        .labels
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    assert_eq!(labels, [(NAMESPACE_NAME_LABEL, "shop"), ("team", "a")]);
    let bare: core::Namespace =
        serde_yaml_ng::from_str("apiVersion: v1\nkind: Namespace\nmetadata: {name: dev}\n")
            .unwrap();
    let (bare, _) = accepted(namespace(&bare));
    assert_eq!(
        bare.labels,
        crate::model::Labels::from([(NAMESPACE_NAME_LABEL.to_owned(), "dev".to_owned())])
    );
}

#[test]
fn load_balancer_source_ranges_come_from_the_field_or_the_annotation() {
    let lb = |extra: &str| {
        web_with(&format!(
            "  type: LoadBalancer\n  clusterIP: 10.96.0.1\n  ports: [{{port: 80}}]\n{extra}"
        ))
    };
    assert_eq!(
        accepted(service_from(&lb("")))
            .0
            .load_balancer_source_ranges(),
        None
    );
    let (svc, warnings) = accepted(service_from(&lb(
        "  loadBalancerSourceRanges: [10.0.0.100/32, 192.0.2.7/24, \"2001:db8::/32\"]\n",
    )));
    assert_eq!(
        svc.load_balancer_source_ranges(),
        Some(
            &[
                "10.0.0.100/32".parse().unwrap(),
                "192.0.2.0/24".parse().unwrap()
            ][..]
        )
    );
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    // Only IPv6 ranges: no IPv4 client is allowed (not "every client").
    let (svc, _) = accepted(service_from(&lb(
        "  loadBalancerSourceRanges: [\"2001:db8::/32\"]\n",
    )));
    assert_eq!(svc.load_balancer_source_ranges(), Some(&[][..]));
    let annotated = lb("").replace(
            "  namespace: shop\n",
            "  namespace: shop\n  annotations:\n    service.beta.kubernetes.io/load-balancer-source-ranges: \"10.1.0.0/16, 10.2.0.0/16\"\n",
        );
    assert_eq!(
        accepted(service_from(&annotated))
            .0
            .load_balancer_source_ranges(),
        Some(
            &[
                "10.1.0.0/16".parse().unwrap(),
                "10.2.0.0/16".parse().unwrap()
            ][..]
        )
    );
    let bad = lb("  loadBalancerSourceRanges: [not-a-cidr]\n");
    assert!(
        matches!(service_from(&bad), Conversion::Rejected(_)),
        "a bad range fails closed"
    );
}

#[test]
fn every_ipvs_scheduler_and_endpoint_weights_convert() {
    for algorithm in LbAlgorithm::ALL {
        let yaml = format!(
            "apiVersion: v1\nkind: Service\nmetadata:\n  name: web\n  annotations:\n    tern.io/lb-algorithm: {algorithm}\n    tern.io/lb-weights: \"web-0=3, 10.244.1.7=0,default=2,web-1=1\"\nspec:\n  clusterIP: 10.96.0.1\n"
        );
        let (svc, _) = accepted(service_from(&yaml));
        assert_eq!(svc.lb_algorithm, Some(algorithm));
        let weights = &svc.lb_weights();
        assert_eq!(weights.default, 2);
        assert_eq!(
            weights.of(Ipv4Addr::new(10, 244, 1, 7), Some("web-0".into())),
            0
        );
        assert_eq!(
            weights.of(Ipv4Addr::new(10, 244, 1, 8), Some("web-0".into())),
            3
        );
        assert_eq!(
            weights.of(Ipv4Addr::new(10, 244, 1, 9), Some("web-1".into())),
            1
        );
        assert_eq!(weights.of(Ipv4Addr::new(10, 244, 1, 9), None), 2);
    }
    // No annotation: every endpoint weighs 1.
    let (svc, _) = accepted(service_from(&web_with("  clusterIP: 10.96.0.1\n")));
    assert_eq!(*svc.lb_weights(), LbWeights::default());
    assert_eq!(svc.rare, None, "nothing rare set, nothing boxed");
    assert_eq!(
        svc.lb_weights()
            .of(Ipv4Addr::new(10, 0, 0, 1), Some("x".into())),
        1
    );
}

#[test]
fn an_endpoint_knows_its_pod_by_target_ref() {
    let yaml = r#"
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-abc
  namespace: shop
  labels:
    kubernetes.io/service-name: web
addressType: IPv4
endpoints:
- addresses: [10.244.1.5]
  targetRef: {kind: Pod, name: web-0, namespace: shop}
- addresses: [10.244.1.6]
  targetRef: {kind: Node, name: node-a}
- addresses: [10.244.1.7]
ports:
- name: http
  port: 8080
  protocol: TCP
"#;
    let (slice, _) = accepted(slice_from(yaml));
    let pods: Vec<Option<PodName>> = slice.endpoints.iter().map(|e| e.pod_name).collect();
    assert_eq!(pods, [Some("web-0".into()), None, None]);
    assert_ne!(PodName::from("web-0"), PodName::from("web-1"));
}

#[test]
fn huge_label_sets_annotations_and_longest_names_are_taken() {
    // The API server caps names at 253 (63 for Services) and annotations at
    // 256 KiB in all; manifests have no cap. Labels and unread annotations
    // are carried (Pods', Namespaces' labels feed policy) or ignored, in
    // time linear in their size; a bad Tern annotation is named shortened.
    let name = "a".repeat(MAX_NAME_LEN);
    let labels: BTreeMap<String, String> = (0..20_000)
        .map(|i| (format!("label-{i}"), "v".repeat(63)))
        .collect();
    let mut annotations: BTreeMap<String, String> =
        BTreeMap::from([("huge".to_owned(), "x".repeat(1 << 20))]);
    let weights: Vec<String> = (0..50_000).map(|i| format!("pod-{i}=2")).collect();
    annotations.insert(LB_WEIGHTS_ANNOTATION.into(), weights.join(","));
    let mut object: core::Service = serde_yaml_ng::from_str(&web_with(
        "  clusterIP: 10.96.0.1\n  ports:\n  - port: 80\n",
    ))
    .unwrap();
    object.metadata.name = Some(name.clone());
    object.metadata.labels = Some(labels.clone());
    object.metadata.annotations = Some(annotations.clone());
    let started = std::time::Instant::now();
    let (svc, warnings) = accepted(service(&object));
    assert!(started.elapsed() < std::time::Duration::from_secs(2));
    assert!(warnings.is_empty());
    assert_eq!(*svc.key.name, *name);
    assert_eq!(svc.lb_weights().by_pod.len(), 50_000);

    // A megabyte of a bad lb-algorithm: refused, and the message is short.
    annotations.insert(LB_ALGORITHM_ANNOTATION.into(), "z".repeat(1 << 20));
    object.metadata.annotations = Some(annotations);
    match service(&object) {
        Conversion::Rejected(refusal) => {
            assert_eq!(refusal.reason, RejectReason::InvalidAnnotation);
            assert!(refusal.message.len() < 300, "{}", refusal.message.len());
            assert!(refusal.message.contains("(1048576 bytes)"));
        }
        other => panic!("{other:?}"),
    }

    let mut pod: core::Pod = serde_yaml_ng::from_str(
        "apiVersion: v1\nkind: Pod\nmetadata: {name: p, namespace: shop}\nspec: {containers: []}\n",
    )
    .unwrap();
    pod.metadata.labels = Some(labels.clone());
    let (pod, _) = accepted(super::pod(&pod));
    assert_eq!(pod.labels.len(), 20_000);
    let mut ns: core::Namespace =
        serde_yaml_ng::from_str("apiVersion: v1\nkind: Namespace\nmetadata: {name: shop}\n")
            .unwrap();
    ns.metadata.labels = Some(labels);
    let (ns, _) = accepted(namespace(&ns));
    assert_eq!(ns.labels.len(), 20_001); // with its name label
}

#[test]
fn shortened_keeps_short_text_and_cuts_long_text_on_a_char_boundary() {
    assert_eq!(shortened("web"), "web");
    let long = "é".repeat(200);
    let cut = shortened(&long);
    assert!(cut.starts_with(&"é".repeat(100)));
    assert!(cut.ends_with("...(400 bytes)"), "{cut}");
}
