//! The success result, modelled once and rendered in the exact format of
//! each supported spec version.

use std::net::IpAddr;
use std::str::FromStr;

use ipnetwork::IpNetwork;
use serde_json::{Map, Value, json};

use super::error::CniError;
use super::json::Obj;
use super::version::{at_least, is_supported, unsupported};

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CniResult {
    pub interfaces: Vec<Interface>,
    pub ips: Vec<IpConfig>,
    pub routes: Vec<Route>,
    pub dns: Dns,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Interface {
    pub name: String,
    pub mac: Option<String>,
    /// Netns path for container-side interfaces; None for host interfaces.
    pub sandbox: Option<String>,
    /// 1.1.0 only, like `socket_path` and `pci_id`.
    pub mtu: Option<u32>,
    pub socket_path: Option<String>,
    pub pci_id: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IpConfig {
    /// Host address with the subnet's prefix, e.g. 10.1.0.5/16.
    pub address: IpNetwork,
    pub gateway: Option<IpAddr>,
    /// Index into `interfaces`; IPAM plugins leave it out.
    pub interface: Option<usize>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub dst: IpNetwork,
    pub gw: Option<IpAddr>,
    /// `mtu` .. `scope` are 1.1.0 only.
    pub mtu: Option<u32>,
    pub advmss: Option<u32>,
    pub priority: Option<u32>,
    pub table: Option<u32>,
    pub scope: Option<u32>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Dns {
    pub nameservers: Vec<String>,
    pub domain: Option<String>,
    pub search: Vec<String>,
    pub options: Vec<String>,
}

impl Route {
    /// A route via the default gateway, with no 1.1.0 attributes.
    pub fn new(dst: IpNetwork) -> Route {
        Route {
            dst,
            gw: None,
            mtu: None,
            advmss: None,
            priority: None,
            table: None,
            scope: None,
        }
    }
}

impl Dns {
    pub fn is_empty(&self) -> bool {
        self == &Dns::default()
    }
}

impl CniResult {
    /// Parses a result (or prevResult) of `version`. Both ip layouts are
    /// accepted: the "version" key of 0.3.x/0.4.0 is checked when present
    /// and otherwise ignored. Bad content is code 6.
    pub fn from_json(version: &str, v: &Value) -> Result<CniResult, CniError> {
        if !is_supported(version) {
            return Err(unsupported(version));
        }
        let top = Obj::new(v, "", CniError::DECODE_FAILURE)?;
        if let Some(own) = top.opt_str("cniVersion")?
            && !is_supported(own)
        {
            return Err(unsupported(own));
        }
        let interfaces = top
            .items("interfaces")?
            .iter()
            .map(parse_interface)
            .collect::<Result<Vec<_>, _>>()?;
        let ips = top
            .items("ips")?
            .iter()
            .map(|o| parse_ip(o, interfaces.len()))
            .collect::<Result<_, _>>()?;
        let routes = top
            .items("routes")?
            .iter()
            .map(parse_route)
            .collect::<Result<_, _>>()?;
        let dns = match top.child("dns")? {
            Some(d) => Dns {
                nameservers: d.str_list("nameservers")?,
                domain: d.opt_str("domain")?.map(str::to_string),
                search: d.str_list("search")?,
                options: d.str_list("options")?,
            },
            None => Dns::default(),
        };
        Ok(CniResult {
            interfaces,
            ips,
            routes,
            dns,
        })
    }

    /// Renders the result exactly as `version` defines it; fields a version
    /// does not know are dropped and empty ones omitted.
    pub fn to_json(&self, version: &str) -> Value {
        let ip_version_key = !at_least(version, (1, 0, 0));
        let v1_1 = at_least(version, (1, 1, 0));
        let mut out = Map::new();
        out.insert("cniVersion".into(), json!(version));
        if !self.interfaces.is_empty() {
            let list = self.interfaces.iter().map(|i| {
                let mut o = Map::new();
                o.insert("name".into(), json!(i.name));
                put(&mut o, "mac", &i.mac);
                put(&mut o, "sandbox", &i.sandbox);
                if v1_1 {
                    put(&mut o, "mtu", &i.mtu);
                    put(&mut o, "socketPath", &i.socket_path);
                    put(&mut o, "pciID", &i.pci_id);
                }
                Value::Object(o)
            });
            out.insert("interfaces".into(), list.collect());
        }
        if !self.ips.is_empty() {
            let list = self.ips.iter().map(|ip| {
                let mut o = Map::new();
                if ip_version_key {
                    let family = if ip.address.is_ipv4() { "4" } else { "6" };
                    o.insert("version".into(), json!(family));
                }
                o.insert("address".into(), json!(ip.address.to_string()));
                put(&mut o, "gateway", &ip.gateway.map(|g| g.to_string()));
                put(&mut o, "interface", &ip.interface);
                Value::Object(o)
            });
            out.insert("ips".into(), list.collect());
        }
        if !self.routes.is_empty() {
            let list = self.routes.iter().map(|r| {
                let mut o = Map::new();
                o.insert("dst".into(), json!(r.dst.to_string()));
                put(&mut o, "gw", &r.gw.map(|g| g.to_string()));
                if v1_1 {
                    put(&mut o, "mtu", &r.mtu);
                    put(&mut o, "advmss", &r.advmss);
                    put(&mut o, "priority", &r.priority);
                    put(&mut o, "table", &r.table);
                    put(&mut o, "scope", &r.scope);
                }
                Value::Object(o)
            });
            out.insert("routes".into(), list.collect());
        }
        if !self.dns.is_empty() {
            let d = &self.dns;
            let mut o = Map::new();
            put_list(&mut o, "nameservers", &d.nameservers);
            put(&mut o, "domain", &d.domain);
            put_list(&mut o, "search", &d.search);
            put_list(&mut o, "options", &d.options);
            out.insert("dns".into(), Value::Object(o));
        }
        Value::Object(out)
    }
}

fn put<T: serde::Serialize>(o: &mut Map<String, Value>, key: &str, v: &Option<T>) {
    if let Some(v) = v {
        o.insert(key.into(), json!(v));
    }
}

fn put_list(o: &mut Map<String, Value>, key: &str, v: &[String]) {
    if !v.is_empty() {
        o.insert(key.into(), json!(v));
    }
}

fn parse_interface(o: &Obj) -> Result<Interface, CniError> {
    let s = |k| o.opt_str(k).map(|v| v.map(str::to_string));
    Ok(Interface {
        name: o.req_str("name")?.to_string(),
        mac: s("mac")?,
        sandbox: s("sandbox")?,
        mtu: o.opt_u32("mtu")?,
        socket_path: s("socketPath")?,
        pci_id: s("pciID")?,
    })
}

fn parse_ip(o: &Obj, n_interfaces: usize) -> Result<IpConfig, CniError> {
    let address = cidr(o, "address")?;
    let gateway = ip_of_family(o, "gateway", address.is_ipv4())?;
    if let Some(v) = o.opt_str("version")? {
        let expected = if address.is_ipv4() { "4" } else { "6" };
        if v != expected {
            return Err(o.err(
                "version",
                &format!("is {v:?} but the address is IPv{expected}"),
            ));
        }
    }
    let interface = match o.get("interface") {
        None => None,
        Some(v) => match v.as_u64().and_then(|i| usize::try_from(i).ok()) {
            Some(i) if i < n_interfaces => Some(i),
            _ if n_interfaces == 0 => {
                return Err(o.err("interface", "is set but the result lists no interfaces"));
            }
            _ => {
                let problem = format!("must be an index below {n_interfaces}");
                return Err(o.err("interface", &problem));
            }
        },
    };
    Ok(IpConfig {
        address,
        gateway,
        interface,
    })
}

fn parse_route(o: &Obj) -> Result<Route, CniError> {
    let dst = cidr(o, "dst")?;
    Ok(Route {
        dst,
        gw: ip_of_family(o, "gw", dst.is_ipv4())?,
        mtu: o.opt_u32("mtu")?,
        advmss: o.opt_u32("advmss")?,
        priority: o.opt_u32("priority")?,
        table: o.opt_u32("table")?,
        scope: o.opt_u32("scope")?,
    })
}

/// Strict CIDR: a decimal prefix is required (ipnetwork would also take a
/// bare address or a netmask, which the spec does not allow).
fn cidr(o: &Obj, key: &str) -> Result<IpNetwork, CniError> {
    let s = o.req_str(key)?;
    let has_prefix = s
        .split_once('/')
        .is_some_and(|(_, p)| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()));
    match IpNetwork::from_str(s) {
        Ok(net) if has_prefix => Ok(net),
        _ => Err(o.err(key, &format!("{s:?} is not an address in CIDR notation"))),
    }
}

fn ip_of_family(o: &Obj, key: &str, v4: bool) -> Result<Option<IpAddr>, CniError> {
    let Some(s) = o.opt_str(key)? else {
        return Ok(None);
    };
    match IpAddr::from_str(s) {
        Ok(ip) if ip.is_ipv4() == v4 => Ok(Some(ip)),
        Ok(_) => Err(o.err(key, &format!("{s:?} is not of the same IP family"))),
        Err(_) => Err(o.err(key, &format!("{s:?} is not an IP address"))),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::version::SUPPORTED_VERSIONS;

    fn net(s: &str) -> IpNetwork {
        s.parse().unwrap()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn iface(name: &str, mac: &str, sandbox: Option<&str>) -> Interface {
        Interface {
            name: name.into(),
            mac: Some(mac.into()),
            sandbox: sandbox.map(Into::into),
            ..Interface::default()
        }
    }

    /// The bridge plugin's result in the spec's "Add example" (1.0.0 spec,
    /// appendix), reused by every version.
    fn bridge_result() -> CniResult {
        CniResult {
            interfaces: vec![
                iface("cni0", "00:11:22:33:44:55", None),
                iface("veth3243", "55:44:33:22:11:11", None),
                iface("eth0", "99:88:77:66:55:44", Some("/var/run/netns/blue")),
            ],
            ips: vec![IpConfig {
                address: net("10.1.0.5/16"),
                gateway: Some(ip("10.1.0.1")),
                interface: Some(2),
            }],
            routes: vec![Route::new(net("0.0.0.0/0"))],
            dns: Dns {
                nameservers: vec!["10.1.0.1".into()],
                ..Dns::default()
            },
        }
    }

    fn bridge_json(version: &str) -> Value {
        let mut v = json!({
            "cniVersion": version,
            "ips": [{"address": "10.1.0.5/16", "gateway": "10.1.0.1", "interface": 2}],
            "routes": [{"dst": "0.0.0.0/0"}],
            "interfaces": [
                {"name": "cni0", "mac": "00:11:22:33:44:55"},
                {"name": "veth3243", "mac": "55:44:33:22:11:11"},
                {"name": "eth0", "mac": "99:88:77:66:55:44", "sandbox": "/var/run/netns/blue"}
            ],
            "dns": {"nameservers": ["10.1.0.1"]}
        });
        if !at_least(version, (1, 0, 0)) {
            // 0.3.x/0.4.0 tag each ip with its family.
            v["ips"][0]["version"] = json!("4");
        }
        v
    }

    #[test]
    fn bridge_example_in_every_version() {
        for &version in SUPPORTED_VERSIONS {
            let rendered = bridge_result().to_json(version);
            let expected = bridge_json(version);
            assert_eq!(rendered, expected, "{version}");
            assert_eq!(rendered["cniVersion"], version);
            let has_version_key = rendered["ips"][0].get("version").is_some();
            assert_eq!(has_version_key, version.starts_with("0."), "{version}");
            assert_eq!(rendered["interfaces"][0].get("sandbox"), None);
            assert_eq!(rendered["interfaces"][2]["sandbox"], "/var/run/netns/blue");
        }
    }

    #[test]
    fn spec_0_4_0_prev_result_round_trips() {
        // The prevResult of the 0.4.0 spec's chaining example.
        let prev = json!({
            "cniVersion": "0.4.0",
            "ips": [{"version": "4", "address": "10.0.0.5/32", "interface": 2}],
            "interfaces": [
                {"name": "cni0", "mac": "00:11:22:33:44:55"},
                {"name": "veth3243", "mac": "55:44:33:22:11:11"},
                {"name": "eth0", "mac": "99:88:77:66:55:44", "sandbox": "/var/run/netns/blue"}
            ],
            "dns": {"nameservers": ["10.1.0.1"]}
        });
        let r = CniResult::from_json("0.4.0", &prev).unwrap();
        assert_eq!(r.ips[0].address, net("10.0.0.5/32"));
        assert_eq!(r.ips[0].gateway, None);
        assert!(r.routes.is_empty());
        assert_eq!(r.to_json("0.4.0"), prev);
    }

    #[test]
    fn every_version_round_trips() {
        for &version in SUPPORTED_VERSIONS {
            let parsed = CniResult::from_json(version, &bridge_json(version)).unwrap();
            assert_eq!(parsed, bridge_result(), "{version}");
            assert_eq!(parsed.to_json(version), bridge_json(version), "{version}");
        }
    }

    /// Dual-stack with every optional field set.
    fn rich_result() -> CniResult {
        let mut r = bridge_result();
        r.interfaces[2].mtu = Some(1450);
        r.interfaces[2].socket_path = Some("/run/vhost/eth0.sock".into());
        r.interfaces[2].pci_id = Some("0000:00:1f.6".into());
        r.ips.push(IpConfig {
            address: net("fd00::5/64"),
            gateway: Some(ip("fd00::1")),
            interface: Some(2),
        });
        r.routes[0].gw = Some(ip("10.1.0.1"));
        r.routes.push(Route {
            mtu: Some(1400),
            advmss: Some(1360),
            priority: Some(100),
            table: Some(254),
            scope: Some(0),
            ..Route::new(net("::/0"))
        });
        r.dns = Dns {
            nameservers: vec!["10.1.0.1".into(), "fd00::1".into()],
            domain: Some("cluster.local".into()),
            search: vec!["default.svc.cluster.local".into()],
            options: vec!["ndots:5".into()],
        };
        r
    }

    #[test]
    fn rich_result_per_version() {
        let v1_1 = rich_result().to_json("1.1.0");
        assert_eq!(
            v1_1["interfaces"][2],
            json!({
                "name": "eth0", "mac": "99:88:77:66:55:44", "sandbox": "/var/run/netns/blue",
                "mtu": 1450, "socketPath": "/run/vhost/eth0.sock", "pciID": "0000:00:1f.6"
            })
        );
        assert_eq!(
            v1_1["ips"][1],
            json!({"address": "fd00::5/64", "gateway": "fd00::1", "interface": 2})
        );
        assert_eq!(
            v1_1["routes"],
            json!([
                {"dst": "0.0.0.0/0", "gw": "10.1.0.1"},
                {"dst": "::/0", "mtu": 1400, "advmss": 1360, "priority": 100, "table": 254, "scope": 0}
            ])
        );
        assert_eq!(
            v1_1["dns"],
            json!({
                "nameservers": ["10.1.0.1", "fd00::1"],
                "domain": "cluster.local",
                "search": ["default.svc.cluster.local"],
                "options": ["ndots:5"]
            })
        );
        assert_eq!(CniResult::from_json("1.1.0", &v1_1).unwrap(), rich_result());

        // 1.0.0 drops the 1.1.0 fields; 0.x also tags ip families.
        for version in ["1.0.0", "0.4.0", "0.3.1", "0.3.0"] {
            let v = rich_result().to_json(version);
            assert_eq!(v["interfaces"][2], bridge_json(version)["interfaces"][2]);
            assert_eq!(
                v["routes"],
                json!([{"dst": "0.0.0.0/0", "gw": "10.1.0.1"}, {"dst": "::/0"}])
            );
            assert_eq!(v["dns"], v1_1["dns"]);
            let families: Vec<_> = v["ips"]
                .as_array()
                .unwrap()
                .iter()
                .map(|i| i.get("version"))
                .collect();
            if version == "1.0.0" {
                assert_eq!(families, vec![None, None]);
            } else {
                assert_eq!(families, vec![Some(&json!("4")), Some(&json!("6"))]);
            }
        }
    }

    #[test]
    fn empty_result_has_only_the_version() {
        let empty = CniResult::default();
        assert_eq!(empty.to_json("1.0.0"), json!({"cniVersion": "1.0.0"}));
        assert_eq!(CniResult::from_json("1.0.0", &json!({})).unwrap(), empty);
    }

    #[test]
    fn ip_layouts_are_accepted_across_versions() {
        // A 0.4.0-style entry read under 1.0.0, and a 1.0.0 one under 0.4.0.
        let with_key = json!({"ips": [{"version": "6", "address": "fd00::5/64"}]});
        let without = json!({"ips": [{"address": "fd00::5/64"}]});
        let a = CniResult::from_json("1.0.0", &with_key).unwrap();
        let b = CniResult::from_json("0.4.0", &without).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.to_json("1.0.0")["ips"], without["ips"]);
        assert_eq!(b.to_json("0.4.0")["ips"], with_key["ips"]);
    }

    fn err(version: &str, v: Value) -> CniError {
        CniResult::from_json(version, &v).expect_err("should be rejected")
    }

    #[test]
    fn version_errors() {
        let e = err("0.2.0", json!({}));
        assert_eq!(e.code, 1);
        assert!(e.msg.contains("0.2.0") && e.msg.contains("1.1.0"), "{e}");
        assert_eq!(err("1.0.0", json!({"cniVersion": "9.9.9"})).code, 1);
        assert_eq!(err("1.0.0", json!({"cniVersion": 1})).code, 6);
    }

    #[test]
    fn decode_errors_name_the_field() {
        let iface = json!([{"name": "eth0"}]);
        let cases = [
            (json!([]), "expected a JSON object"),
            (json!({"ips": {}}), "ips must be a list"),
            (
                json!({"interfaces": [{"mac": "x"}]}),
                "interfaces[0].name is missing",
            ),
            (
                json!({"interfaces": [{"name": "a", "mtu": -1}]}),
                "interfaces[0].mtu",
            ),
            (json!({"ips": [{}]}), "ips[0].address is missing"),
            (json!({"ips": [{"address": "10.1.0.5"}]}), "ips[0].address"),
            (
                json!({"ips": [{"address": "10.1.0.5/255.255.0.0"}]}),
                "ips[0].address",
            ),
            (
                json!({"ips": [{"address": "10.1.0.5/33"}]}),
                "ips[0].address",
            ),
            (
                json!({"ips": [{"address": "10.1.0.5/16", "gateway": "fd00::1"}]}),
                "ips[0].gateway",
            ),
            (
                json!({"ips": [{"address": "10.1.0.5/16", "gateway": "nope"}]}),
                "ips[0].gateway",
            ),
            (
                json!({"ips": [{"address": "10.1.0.5/16", "version": "6"}]}),
                "ips[0].version",
            ),
            (
                json!({"ips": [{"address": "10.1.0.5/16", "interface": 0}]}),
                "ips[0].interface",
            ),
            (
                json!({"interfaces": iface, "ips": [{"address": "10.1.0.5/16", "interface": 1}]}),
                "ips[0].interface",
            ),
            (
                json!({"interfaces": iface, "ips": [{"address": "10.1.0.5/16", "interface": -1}]}),
                "ips[0].interface",
            ),
            (
                json!({"routes": [{"gw": "10.1.0.1"}]}),
                "routes[0].dst is missing",
            ),
            (
                json!({"routes": [{"dst": "::/0", "gw": "10.1.0.1"}]}),
                "routes[0].gw",
            ),
            (
                json!({"routes": [{"dst": "::/0", "table": "main"}]}),
                "routes[0].table",
            ),
            (json!({"dns": []}), "dns must be an object"),
            (json!({"dns": {"nameservers": [1]}}), "dns.nameservers"),
        ];
        for (input, needle) in cases {
            let e = err("1.1.0", input.clone());
            assert_eq!(e.code, 6, "{input}: {e}");
            assert!(
                e.msg.contains(needle),
                "{input}: {e:?} should mention {needle}"
            );
        }
    }
}
