//! The network configuration the runtime writes on stdin.

use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;

use serde_json::Value;

use super::error::CniError;
use super::json::Obj;
use super::result::CniResult;
use super::version::{is_supported, unsupported};

/// GC's list of attachments to keep; runtimes before the spec's fix (cni
/// issue #1101) sent the second spelling, libcni now sends both.
const ATTACHMENT_KEYS: &[&str] = &["cni.dev/valid-attachments", "cni.dev/attachments"];

/// Smallest MTU IPv4 allows (RFC 791) and the largest the kernel takes.
const MTU_RANGE: std::ops::RangeInclusive<u64> = 68..=65535;

#[derive(Debug, Clone, PartialEq)]
pub struct NetConf {
    pub cni_version: String,
    pub name: String,
    pub plugin_type: String,
    pub mtu: Option<u32>,
    /// Key "agentSocket": where to reach tern-agent instead of the default.
    pub agent_socket: Option<PathBuf>,
    pub ipam: Option<IpamConf>,
    pub prev_result: Option<CniResult>,
    /// GC only: (containerID, ifname) pairs whose resources must be kept.
    pub valid_attachments: Vec<(String, String)>,
    /// `runtimeConfig.portMappings` (the `portMappings` capability), IPv4
    /// ones only: a mapping whose hostIP is IPv6 is another family's.
    pub port_mappings: Vec<PortMapping>,
    /// `runtimeConfig.bandwidth` (the `bandwidth` capability), when it
    /// sets a rate.
    pub bandwidth: Option<Bandwidth>,
    /// The whole document, for delegating to IPAM unchanged.
    pub raw: Value,
}

/// The `bandwidth` capability as the CNI conventions define it: rates in
/// bits per second and bursts in bits; 0 is "no limit" (a rate) or "not
/// given" (a burst). `ingress` is traffic into the pod.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Bandwidth {
    pub ingress_rate: u64,
    pub ingress_burst: u64,
    pub egress_rate: u64,
    pub egress_burst: u64,
}

/// One hostPort as the CNI conventions define `portMappings`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortMapping {
    /// `None`: every address of the node ("hostIP" absent, "" or 0.0.0.0).
    pub host_ip: Option<Ipv4Addr>,
    pub host_port: u16,
    pub container_port: u16,
    pub protocol: PortProtocol,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PortProtocol {
    Tcp,
    Udp,
}

#[derive(Debug, Clone, PartialEq)]
pub struct IpamConf {
    pub plugin_type: String,
    pub raw: Value,
}

impl NetConf {
    /// Invalid JSON is code 6, an unsupported cniVersion code 1, and any
    /// other problem code 7 with msg "invalid network configuration" and
    /// the specific problem in `details`.
    pub fn parse(bytes: &[u8]) -> Result<NetConf, CniError> {
        let raw: Value = serde_json::from_slice(bytes).map_err(|e| {
            CniError::decode_failure("network configuration is not valid JSON")
                .with_details(e.to_string())
        })?;
        if !raw.is_object() {
            return Err(CniError::decode_failure(
                "network configuration must be a JSON object",
            ));
        }
        from_object(&raw).map(|mut conf| {
            conf.raw = raw;
            conf
        })
    }
}

fn from_object(raw: &Value) -> Result<NetConf, CniError> {
    let top = Obj::new(raw, "", CniError::INVALID_CONFIG)?;
    let invalid = |e: CniError| {
        CniError::invalid_config("invalid network configuration").with_details(e.to_string())
    };

    let cni_version = top.req_str("cniVersion").map_err(invalid)?;
    if !is_supported(cni_version) {
        return Err(unsupported(cni_version));
    }
    read_fields(&top, cni_version).map_err(invalid)
}

fn read_fields(top: &Obj, cni_version: &str) -> Result<NetConf, CniError> {
    let name = top.req_str("name")?;
    if !is_network_name(name) {
        return Err(top.err(
            "name",
            &format!("{name:?} must start with a letter or digit and hold only letters, digits, '_', '.' and '-'"),
        ));
    }
    let plugin_type = exec_type(top)?;
    let mtu = match top.get("mtu") {
        None => None,
        Some(v) => match v.as_u64().filter(|m| MTU_RANGE.contains(m)) {
            Some(m) => Some(m as u32),
            None => {
                return Err(top.err(
                    "mtu",
                    &format!("{v} is not an integer between 68 and 65535"),
                ));
            }
        },
    };
    let agent_socket = top.opt_str("agentSocket")?.map(PathBuf::from);
    let ipam = match top.child("ipam")? {
        Some(ipam) => Some(IpamConf {
            plugin_type: exec_type(&ipam)?,
            raw: top.get("ipam").cloned().unwrap_or_default(),
        }),
        None => None,
    };
    let prev_result = match top.get("prevResult") {
        Some(v) => Some(
            CniResult::from_json(cni_version, v)
                .map_err(|e| CniError::invalid_config(format!("prevResult is invalid: {e}")))?,
        ),
        None => None,
    };
    let mut valid_attachments = Vec::new();
    for key in ATTACHMENT_KEYS {
        for item in top.items(key)? {
            let pair = (
                item.req_str("containerID")?.to_string(),
                item.req_str("ifname")?.to_string(),
            );
            if !valid_attachments.contains(&pair) {
                valid_attachments.push(pair);
            }
        }
    }
    let runtime = top.child("runtimeConfig")?;
    let port_mappings = match &runtime {
        Some(runtime) => port_mappings(runtime)?,
        None => Vec::new(),
    };
    let bandwidth = match runtime.as_ref().map(|r| r.child("bandwidth")).transpose()? {
        Some(Some(bw)) => bandwidth(&bw)?,
        _ => None,
    };
    Ok(NetConf {
        cni_version: cni_version.to_string(),
        name: name.to_string(),
        plugin_type,
        mtu,
        agent_socket,
        ipam,
        prev_result,
        valid_attachments,
        port_mappings,
        bandwidth,
        raw: Value::Null, // parse() moves the document in
    })
}

/// `bandwidth`, or `None` when it sets no rate.
fn bandwidth(bw: &Obj) -> Result<Option<Bandwidth>, CniError> {
    let number = |key: &str| match bw.get(key) {
        None => Ok(0),
        Some(v) => v
            .as_u64()
            .ok_or_else(|| bw.err(key, "must be a non-negative integer")),
    };
    let limits = Bandwidth {
        ingress_rate: number("ingressRate")?,
        ingress_burst: number("ingressBurst")?,
        egress_rate: number("egressRate")?,
        egress_burst: number("egressBurst")?,
    };
    Ok((limits.ingress_rate > 0 || limits.egress_rate > 0).then_some(limits))
}

/// `portMappings`: a bad entry is refused, never skipped, so a pod never
/// starts without a hostPort it asked for. SCTP is refused: the datapath
/// serves TCP and UDP. A missing protocol is TCP, as in a Pod spec.
fn port_mappings(runtime: &Obj) -> Result<Vec<PortMapping>, CniError> {
    let mut out = Vec::new();
    for item in runtime.items("portMappings")? {
        let port = |key: &str| match item.opt_u32(key)? {
            Some(p) if (1..=65535).contains(&p) => Ok(p as u16),
            _ => Err(item.err(key, "must be a port number between 1 and 65535")),
        };
        let protocol = match item.opt_str("protocol")?.map(str::to_ascii_lowercase) {
            None => PortProtocol::Tcp,
            Some(p) if p == "tcp" => PortProtocol::Tcp,
            Some(p) if p == "udp" => PortProtocol::Udp,
            Some(p) => {
                return Err(item.err(
                    "protocol",
                    &format!("{p:?} is not served: Tern's hostPorts are TCP or UDP"),
                ));
            }
        };
        let host_ip = match item.opt_str("hostIP")? {
            None => None,
            Some(ip) => match ip.parse::<IpAddr>() {
                Ok(IpAddr::V4(v4)) if v4.is_unspecified() => None,
                Ok(IpAddr::V4(v4)) => Some(v4),
                Ok(IpAddr::V6(_)) => continue,
                Err(_) => return Err(item.err("hostIP", &format!("{ip:?} is not an IP address"))),
            },
        };
        out.push(PortMapping {
            host_ip,
            host_port: port("hostPort")?,
            container_port: port("containerPort")?,
            protocol,
        });
    }
    Ok(out)
}

/// The spec's rule: ^[a-zA-Z0-9][a-zA-Z0-9_.\-]*$
fn is_network_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    bytes.next().is_some_and(|b| b.is_ascii_alphanumeric())
        && bytes.all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
}

/// "type" names an executable, so it cannot hold a path separator.
fn exec_type(o: &Obj) -> Result<String, CniError> {
    let t = o.req_str("type")?;
    if t.contains(['/', '\\']) {
        return Err(o.err("type", &format!("{t:?} must be a file name, not a path")));
    }
    Ok(t.to_string())
}

/// The cniVersion of `bytes` even when the rest is unusable, so VERSION
/// and error objects can echo it. Falls back to scanning the text when it
/// is not valid JSON.
pub fn requested_version(bytes: &[u8]) -> Option<String> {
    let found = match serde_json::from_slice::<Value>(bytes) {
        Ok(v) => v.get("cniVersion")?.as_str()?.to_string(),
        Err(_) => scan_version(&String::from_utf8_lossy(bytes))?,
    };
    Some(found).filter(|v| !v.is_empty())
}

fn scan_version(text: &str) -> Option<String> {
    let rest = &text[text.find("\"cniVersion\"")? + "\"cniVersion\"".len()..];
    let rest = rest
        .trim_start()
        .strip_prefix(':')?
        .trim_start()
        .strip_prefix('"')?;
    let value = &rest[..rest.find('"')?];
    // A version is short and plain; anything else is not worth echoing.
    let plain = value.len() <= 32
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || ".-+".contains(c));
    plain.then(|| value.to_string())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(v: Value) -> Result<NetConf, CniError> {
        NetConf::parse(v.to_string().as_bytes())
    }

    fn minimal() -> Value {
        json!({"cniVersion": "1.0.0", "name": "tern", "type": "tern-cni"})
    }

    fn with(key: &str, value: Value) -> Value {
        let mut v = minimal();
        v[key] = value;
        v
    }

    #[test]
    fn full_config() {
        let conf = parse(json!({
            "cniVersion": "1.1.0",
            "name": "tern-net_1.a",
            "type": "tern-cni",
            "mtu": 1450,
            "agentSocket": "/run/tern/agent.sock",
            "ipam": {"type": "host-local", "subnet": "10.1.0.0/16"},
            "args": {"labels": {"appVersion": "1.0"}}
        }))
        .unwrap();
        assert_eq!(conf.cni_version, "1.1.0");
        assert_eq!(conf.name, "tern-net_1.a");
        assert_eq!(conf.plugin_type, "tern-cni");
        assert_eq!(conf.mtu, Some(1450));
        assert_eq!(
            conf.agent_socket,
            Some(PathBuf::from("/run/tern/agent.sock"))
        );
        let ipam = conf.ipam.unwrap();
        assert_eq!(ipam.plugin_type, "host-local");
        assert_eq!(ipam.raw["subnet"], "10.1.0.0/16");
        assert_eq!(conf.raw["args"]["labels"]["appVersion"], "1.0");
        assert!(conf.prev_result.is_none() && conf.valid_attachments.is_empty());
    }

    #[test]
    fn port_mappings_from_runtime_config() {
        let conf = parse(with(
            "runtimeConfig",
            json!({"portMappings": [
                {"hostPort": 8080, "containerPort": 80, "protocol": "tcp"},
                {"hostPort": 5353, "containerPort": 53, "protocol": "UDP", "hostIP": "10.0.0.11"},
                {"hostPort": 9000, "containerPort": 9000, "hostIP": "0.0.0.0"},
                {"hostPort": 9000, "containerPort": 9000, "hostIP": "::"}
            ]}),
        ))
        .unwrap();
        let m = |host_ip, host_port, container_port, protocol| PortMapping {
            host_ip,
            host_port,
            container_port,
            protocol,
        };
        assert_eq!(
            conf.port_mappings,
            vec![
                m(None, 8080, 80, PortProtocol::Tcp),
                m(
                    Some(Ipv4Addr::new(10, 0, 0, 11)),
                    5353,
                    53,
                    PortProtocol::Udp
                ),
                m(None, 9000, 9000, PortProtocol::Tcp),
            ]
        );
        assert!(parse(minimal()).unwrap().port_mappings.is_empty());
    }

    #[test]
    fn bandwidth_from_runtime_config() {
        let limit = |bw: Value| {
            parse(with("runtimeConfig", json!({ "bandwidth": bw })))
                .map(|c| c.bandwidth)
                .map_err(|e| e.details)
        };
        assert_eq!(
            limit(json!({"ingressRate": 10000000, "ingressBurst": 100000})),
            Ok(Some(Bandwidth {
                ingress_rate: 10_000_000,
                ingress_burst: 100_000,
                ..Bandwidth::default()
            }))
        );
        assert_eq!(
            limit(json!({"egressRate": 1}))
                .unwrap()
                .unwrap()
                .egress_rate,
            1
        );
        assert_eq!(limit(json!({"ingressRate": 0, "egressRate": 0})), Ok(None));
        assert!(
            limit(json!({"ingressRate": -1}))
                .unwrap_err()
                .contains("ingressRate")
        );
        assert_eq!(parse(minimal()).unwrap().bandwidth, None);
    }

    #[test]
    fn bad_port_mappings_are_refused_with_code_7() {
        for (mapping, detail) in [
            (
                json!({"hostPort": 80, "containerPort": 80, "protocol": "sctp"}),
                "protocol",
            ),
            (json!({"hostPort": 0, "containerPort": 80}), "hostPort"),
            (
                json!({"hostPort": 80, "containerPort": 70000}),
                "containerPort",
            ),
            (json!({"hostPort": 80}), "containerPort"),
            (
                json!({"hostPort": 80, "containerPort": 80, "hostIP": "x"}),
                "hostIP",
            ),
        ] {
            let e = parse(with("runtimeConfig", json!({"portMappings": [mapping]}))).unwrap_err();
            assert_eq!(e.code, 7, "{e}");
            assert!(
                e.details
                    .contains(&format!("runtimeConfig.portMappings[0].{detail}")),
                "{detail}: {e:?}"
            );
        }
    }

    #[test]
    fn minimal_config() {
        let conf = parse(minimal()).unwrap();
        assert_eq!((conf.mtu, conf.agent_socket, conf.ipam), (None, None, None));
        assert_eq!(conf.raw, minimal());
    }

    #[test]
    fn decode_errors_are_code_6() {
        for bytes in [&b"{not json"[..], b"", b"[1,2]", b"\"str\"", b"null"] {
            let e = NetConf::parse(bytes).unwrap_err();
            assert_eq!(e.code, 6, "{:?}: {e}", String::from_utf8_lossy(bytes));
        }
    }

    fn assert_invalid(v: Value, needle: &str) {
        let e = parse(v.clone()).expect_err("should be rejected");
        assert_eq!(e.code, 7, "{v}: {e}");
        assert_eq!(e.msg, "invalid network configuration");
        assert!(
            e.details.contains(needle),
            "{v}: {e:?} should mention {needle}"
        );
    }

    #[test]
    fn required_fields() {
        for key in ["cniVersion", "name", "type"] {
            let mut v = minimal();
            v.as_object_mut().unwrap().remove(key);
            assert_invalid(v, &format!("{key} is missing"));
            assert_invalid(with(key, json!(1)), &format!("{key} must be a string"));
            assert_invalid(with(key, json!("")), key);
        }
        assert_invalid(with("type", json!("../bin/x")), "type");
    }

    #[test]
    fn unsupported_version_is_code_1() {
        for v in ["0.2.0", "1.2.0", "one"] {
            let e = parse(with("cniVersion", json!(v))).unwrap_err();
            assert_eq!(e.code, 1);
            assert!(e.msg.contains(v), "{e}");
            assert!(e.msg.contains("0.3.0, 0.3.1, 0.4.0, 1.0.0, 1.1.0"), "{e}");
        }
    }

    #[test]
    fn network_names() {
        for good in ["a", "0net", "my-net.v2_x"] {
            assert!(parse(with("name", json!(good))).is_ok(), "{good}");
        }
        for bad in ["-net", "_net", ".net", "my net", "net/1", "nét"] {
            assert_invalid(with("name", json!(bad)), "name");
        }
    }

    #[test]
    fn mtu_bounds() {
        assert_eq!(parse(with("mtu", json!(68))).unwrap().mtu, Some(68));
        assert_eq!(parse(with("mtu", json!(65535))).unwrap().mtu, Some(65535));
        for bad in [
            json!(67),
            json!(65536),
            json!(-1),
            json!(1500.5),
            json!("1500"),
        ] {
            assert_invalid(with("mtu", bad), "mtu");
        }
    }

    #[test]
    fn ipam_and_agent_socket_shapes() {
        assert_invalid(with("ipam", json!("host-local")), "ipam must be an object");
        assert_invalid(with("ipam", json!({})), "ipam.type is missing");
        assert_invalid(
            with("ipam", json!({"type": 1})),
            "ipam.type must be a string",
        );
        assert_invalid(with("agentSocket", json!(5)), "agentSocket");
    }

    #[test]
    fn prev_result_in_every_version() {
        let prev = |version: &str| {
            let mut ip = json!({"address": "10.1.0.5/16", "gateway": "10.1.0.1", "interface": 0});
            if version.starts_with("0.") {
                ip["version"] = json!("4");
            }
            json!({
                "cniVersion": version,
                "interfaces": [{"name": "eth0", "mac": "99:88:77:66:55:44", "sandbox": "/var/run/netns/blue"}],
                "ips": [ip],
                "routes": [{"dst": "0.0.0.0/0"}],
                "dns": {"nameservers": ["10.1.0.1"]}
            })
        };
        for &version in crate::SUPPORTED_VERSIONS {
            let mut v = with("prevResult", prev(version));
            v["cniVersion"] = json!(version);
            let conf = parse(v).unwrap();
            let result = conf.prev_result.expect("prevResult parsed");
            assert_eq!(result.ips[0].address.to_string(), "10.1.0.5/16");
            assert_eq!(result.to_json(version), prev(version), "{version}");
        }
    }

    #[test]
    fn bad_prev_result_is_code_7() {
        assert_invalid(with("prevResult", json!([])), "prevResult");
        assert_invalid(
            with("prevResult", json!({"ips": [{"address": "10.1.0.5"}]})),
            "ips[0].address",
        );
        assert_invalid(with("prevResult", json!({"cniVersion": "0.2.0"})), "0.2.0");
    }

    #[test]
    fn gc_attachments_from_both_keys() {
        let mut v = minimal();
        v["cni.dev/valid-attachments"] = json!([
            {"containerID": "c1", "ifname": "eth0"},
            {"containerID": "c2", "ifname": "eth0"}
        ]);
        v["cni.dev/attachments"] = json!([
            {"containerID": "c2", "ifname": "eth0"},
            {"containerID": "c3", "ifname": "net1"}
        ]);
        let conf = parse(v).unwrap();
        let pairs: Vec<(&str, &str)> = conf
            .valid_attachments
            .iter()
            .map(|(c, i)| (c.as_str(), i.as_str()))
            .collect();
        assert_eq!(pairs, [("c1", "eth0"), ("c2", "eth0"), ("c3", "net1")]);

        let old_only = with(
            "cni.dev/attachments",
            json!([{"containerID": "c9", "ifname": "eth1"}]),
        );
        assert_eq!(
            parse(old_only).unwrap().valid_attachments,
            [("c9".into(), "eth1".into())]
        );
        assert_invalid(
            with("cni.dev/valid-attachments", json!({})),
            "must be a list",
        );
        assert_invalid(
            with("cni.dev/valid-attachments", json!([{"containerID": "c1"}])),
            "cni.dev/valid-attachments[0].ifname is missing",
        );
    }

    #[test]
    fn requested_version_is_lenient() {
        let cases: [(&[u8], Option<&str>); 7] = [
            (br#"{"cniVersion":"1.0.0"}"#, Some("1.0.0")),
            (br#"{"cniVersion":"0.2.0","name":"-bad"}"#, Some("0.2.0")),
            (br#"{"cniVersion" : "0.4.0", "name": broken"#, Some("0.4.0")),
            (br#"{"name":"x"}"#, None),
            (br#"{"cniVersion":1}"#, None),
            (b"", None),
            (br#"{"cniVersion": "1.0.0 ; rm -rf", "x": "#, None),
        ];
        for (bytes, want) in cases {
            assert_eq!(
                requested_version(bytes).as_deref(),
                want,
                "{}",
                String::from_utf8_lossy(bytes)
            );
        }
    }
}
