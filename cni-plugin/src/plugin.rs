//! The CNI commands: what ADD, DEL, CHECK, STATUS and GC do, on top of the
//! spec layer (parsing, results, errors), the pod wiring and the agent.

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnetwork::{IpNetwork, Ipv4Network};
use serde_json::Value;
use tern_api::{
    Attachment, BandwidthLimits, CallError, Endpoint, HostPort, HostPortProtocol, PodRef, Request,
    Response,
};
use tern_cni_spec::{
    CniEnv, CniError, CniResult, Command, Interface, IpConfig, NetConf, PortProtocol, Route,
};
use tern_podnet::{self as podnet, GATEWAY, PodInterfaceSpec, PodNetError};

use crate::delegate::Delegate;

/// 0.0.0.0/0, checked when compiled.
const DEFAULT_ROUTE: Ipv4Network = match Ipv4Network::new_checked(Ipv4Addr::UNSPECIFIED, 0) {
    Some(net) => net,
    None => panic!("0.0.0.0/0 is a valid network"),
};

/// Plugin-specific error codes (the spec leaves 100 and up to plugins).
pub mod codes {
    /// The agent answered but refused (e.g. PodCIDR exhausted).
    pub const AGENT_REFUSED: u32 = 100;
    /// CNI_IFNAME (or its host veth) already exists.
    pub const INTERFACE_EXISTS: u32 = 101;
    /// CHECK found the pod's networking differs from what ADD set up.
    pub const CHECK_FAILED: u32 = 102;
    /// A netlink operation failed.
    pub const NETLINK: u32 = 103;
    /// The pod already has a Tern interface under another CNI_IFNAME.
    pub const SECOND_INTERFACE: u32 = 104;
}

const AGENT_TIMEOUT: Duration = Duration::from_secs(10);

/// Runs one CNI command; `Ok(Some(json))` is printed on stdout.
pub fn run(env: &CniEnv, stdin: &[u8]) -> Result<Option<Value>, CniError> {
    if env.command == Command::Version {
        let requested = tern_cni_spec::requested_version(stdin)
            .unwrap_or_else(|| tern_cni_spec::LATEST_VERSION.to_owned());
        return Ok(Some(tern_cni_spec::version_json(&requested)));
    }
    let conf = NetConf::parse(stdin)?;
    let ctx = Context::new(env, &conf, stdin);
    match env.command {
        Command::Add => ctx.add().map(Some),
        Command::Del => ctx.del().map(|_| None),
        Command::Check => ctx.check().map(|_| None),
        Command::Status => ctx.status().map(|_| None),
        Command::Gc => ctx.gc().map(|_| None),
        Command::Version => unreachable!("handled above"),
    }
}

struct Context<'a> {
    env: &'a CniEnv,
    conf: &'a NetConf,
    stdin: &'a [u8],
    socket: PathBuf,
}

impl<'a> Context<'a> {
    fn new(env: &'a CniEnv, conf: &'a NetConf, stdin: &'a [u8]) -> Self {
        let socket = conf
            .agent_socket
            .clone()
            .unwrap_or_else(|| tern_api::DEFAULT_SOCKET.into());
        Context {
            env,
            conf,
            stdin,
            socket,
        }
    }

    fn attachment(&self) -> Attachment {
        Attachment {
            container_id: self.env.container_id.clone().unwrap_or_default(),
            ifname: self.env.ifname.clone().unwrap_or_default(),
        }
    }

    fn host_ifname(&self) -> String {
        host_ifname(&self.attachment())
    }

    fn delegate(&self) -> Option<Delegate<'_>> {
        self.conf.ipam.as_ref().map(|ipam| Delegate {
            plugin_type: &ipam.plugin_type,
            cni_path: &self.env.path,
            netconf: self.stdin,
            cni_version: &self.conf.cni_version,
        })
    }

    fn agent(&self, request: &Request) -> Result<Response, CniError> {
        match tern_api::call(&self.socket, request, AGENT_TIMEOUT) {
            Ok(Response::Error { message, try_again }) => Err(if try_again {
                CniError::try_again_later(format!("tern-agent: {message}"))
            } else {
                CniError::new(
                    codes::AGENT_REFUSED,
                    format!("tern-agent refused: {message}"),
                    "",
                )
            }),
            Ok(response) => Ok(response),
            Err(e @ CallError::Unreachable { .. }) => Err(CniError::try_again_later(format!(
                "{e}; is tern-agent running on this node?"
            ))),
            Err(e) => Err(CniError::io_failure(e.to_string())),
        }
    }

    fn add(&self) -> Result<Value, CniError> {
        let attachment = self.attachment();
        let host_ifname = self.host_ifname();
        // An existing interface means ADD already ran: refuse before
        // touching anything, so the working pod keeps its address.
        if podnet::host_link_exists(&host_ifname).map_err(netlink_error)? {
            return Err(CniError::new(
                codes::INTERFACE_EXISTS,
                format!(
                    "container {} already has interface {} (host side {host_ifname}); DEL it first",
                    attachment.container_id, attachment.ifname
                ),
                "",
            ));
        }
        let (address, ipam_result, node_mtu) = self.add_address(&attachment)?;
        let mtu = self.conf.mtu.unwrap_or(node_mtu);
        let netns = self.env.netns.clone().unwrap_or_default();
        let spec = PodInterfaceSpec {
            netns: &netns,
            ifname: &attachment.ifname,
            host_ifname: &host_ifname,
            address,
            mtu,
        };
        let wired = podnet::create(&spec).map_err(pod_error);
        let wired = match wired {
            Ok(w) => w,
            Err(e) => {
                self.release_address(&attachment);
                return Err(e);
            }
        };
        // From here on a failure undoes the wiring and the address.
        let undo = |e: CniError| {
            let _ = podnet::delete(Some(&netns), &attachment.ifname, &host_ifname);
            self.release_address(&attachment);
            e
        };
        let (ingress, egress) = self.limits();
        podnet::shape(&netns, &attachment.ifname, &host_ifname, ingress, egress)
            .map_err(|e| undo(pod_error(e)))?;
        let endpoint = Endpoint {
            attachment: attachment.clone(),
            ip: address,
            mac: wired.pod_mac,
            host_ifname: host_ifname.clone(),
            netns: netns.display().to_string(),
            host_ports: self.host_ports(),
            bandwidth: self.conf.bandwidth.map(|b| BandwidthLimits {
                ingress_rate: b.ingress_rate,
                egress_rate: b.egress_rate,
            }),
            pod: self.pod(),
            netns_cookie: wired.netns_cookie,
        };
        self.agent(&Request::EndpointCreate { endpoint })
            .map_err(undo)?;
        let result = self.result(ipam_result, address, &wired, &host_ifname, &netns, mtu);
        Ok(result.to_json(&self.conf.cni_version))
    }

    /// The `bandwidth` capability: (into the pod, out of it).
    fn limits(&self) -> (Option<podnet::Limit>, Option<podnet::Limit>) {
        let Some(b) = self.conf.bandwidth else {
            return (None, None);
        };
        let limit = |rate_bits, burst_bits| {
            (rate_bits > 0).then_some(podnet::Limit {
                rate_bits,
                burst_bits,
            })
        };
        (
            limit(b.ingress_rate, b.ingress_burst),
            limit(b.egress_rate, b.egress_burst),
        )
    }

    /// The pod, when the runtime names it (Kubernetes runtimes do).
    fn pod(&self) -> Option<PodRef> {
        Some(PodRef {
            namespace: self.env.arg("K8S_POD_NAMESPACE")?.to_owned(),
            name: self.env.arg("K8S_POD_NAME")?.to_owned(),
        })
    }

    /// The `portMappings` capability, as the agent serves it.
    fn host_ports(&self) -> Vec<HostPort> {
        let mut ports: Vec<HostPort> = self
            .conf
            .port_mappings
            .iter()
            .map(|m| HostPort {
                host_ip: m.host_ip,
                host_port: m.host_port,
                container_port: m.container_port,
                protocol: match m.protocol {
                    PortProtocol::Tcp => HostPortProtocol::Tcp,
                    PortProtocol::Udp => HostPortProtocol::Udp,
                },
            })
            .collect();
        ports.sort();
        ports.dedup();
        ports
    }

    /// The pod's address from the agent, or from the delegated IPAM plugin.
    fn add_address(
        &self,
        attachment: &Attachment,
    ) -> Result<(Ipv4Addr, Option<CniResult>, u32), CniError> {
        match self.delegate() {
            Some(delegate) => {
                // The pod's MTU is the node's whichever IPAM gives the
                // address (asked first, so a failure leaks no lease).
                let mtu = self.node_mtu()?;
                let result = delegate.add()?;
                let ip = result.ips.iter().find_map(|ip| match ip.address {
                    IpNetwork::V4(net) => Some(net.ip()),
                    IpNetwork::V6(_) => None,
                });
                match ip {
                    Some(ip) => Ok((ip, Some(result), mtu)),
                    None => {
                        let _ = delegate.del();
                        Err(CniError::invalid_config(format!(
                            "ipam plugin {} returned no IPv4 address",
                            delegate.plugin_type
                        )))
                    }
                }
            }
            None => match self.agent(&Request::Allocate {
                attachment: attachment.clone(),
            })? {
                Response::Allocated { ip, mtu, .. } => Ok((ip, None, mtu)),
                other => Err(unexpected(other)),
            },
        }
    }

    /// Best effort, on the error path of ADD: the error already reported
    /// matters more than a failed clean-up (which DEL retries).
    fn release_address(&self, attachment: &Attachment) {
        let released = match self.delegate() {
            Some(delegate) => delegate.del(),
            None => self
                .agent(&Request::Release {
                    attachment: attachment.clone(),
                })
                .map(drop),
        };
        if let Err(e) = released {
            eprintln!("tern-cni: releasing the address of {attachment:?} failed: {e}");
        }
    }

    fn result(
        &self,
        ipam_result: Option<CniResult>,
        address: Ipv4Addr,
        wired: &podnet::PodInterface,
        host_ifname: &str,
        netns: &Path,
        mtu: u32,
    ) -> CniResult {
        // Extend what earlier plugins in the chain reported.
        let mut result = self.conf.prev_result.clone().unwrap_or_default();
        if let Some(ipam) = &ipam_result {
            result.dns = ipam.dns.clone();
        }
        result.interfaces.push(Interface {
            name: host_ifname.to_owned(),
            mac: Some(podnet::format_mac(&wired.host_mac)),
            mtu: Some(mtu),
            ..Default::default()
        });
        result.interfaces.push(Interface {
            name: self.env.ifname.clone().unwrap_or_default(),
            mac: Some(podnet::format_mac(&wired.pod_mac)),
            sandbox: Some(netns.display().to_string()),
            mtu: Some(mtu),
            ..Default::default()
        });
        let pod_if = result.interfaces.len() - 1;
        result.ips.push(IpConfig {
            address: IpNetwork::V4(Ipv4Network::from(address)),
            gateway: Some(IpAddr::V4(GATEWAY)),
            interface: Some(pod_if),
        });
        let mut default = Route::new(IpNetwork::V4(DEFAULT_ROUTE));
        default.gw = Some(IpAddr::V4(GATEWAY));
        result.routes.push(default);
        result
    }

    /// DEL succeeds when things are already gone; it releases the address
    /// once (the allocator ignores a second release).
    fn del(&self) -> Result<(), CniError> {
        let attachment = self.attachment();
        let host_ifname = self.host_ifname();
        let netns = self
            .env
            .netns
            .as_deref()
            .filter(|p| !p.as_os_str().is_empty());
        podnet::delete(netns, &attachment.ifname, &host_ifname).map_err(pod_error)?;
        self.agent(&Request::EndpointDelete {
            attachment: attachment.clone(),
        })?;
        match self.delegate() {
            Some(delegate) => delegate.del(),
            None => self.agent(&Request::Release { attachment }).map(drop),
        }
    }

    fn check(&self) -> Result<(), CniError> {
        if !tern_cni_spec::supports_check(&self.conf.cni_version) {
            return Err(CniError::incompatible_version(format!(
                "CHECK needs cniVersion 0.4.0 or later, got {}",
                self.conf.cni_version
            )));
        }
        let attachment = self.attachment();
        let prev = self.conf.prev_result.as_ref().ok_or_else(|| {
            CniError::invalid_config("CHECK needs prevResult (the result of ADD)")
        })?;
        let address = prev
            .ips
            .iter()
            .find_map(|ip| match ip.address {
                IpNetwork::V4(net) if net.prefix() == 32 => Some(net.ip()),
                _ => None,
            })
            .ok_or_else(|| CniError::invalid_config("prevResult holds no IPv4 /32 address"))?;
        let netns = self.env.netns.clone().unwrap_or_default();
        let mtu = prev
            .interfaces
            .iter()
            .find(|i| Some(&i.name) == self.env.ifname.as_ref())
            .and_then(|i| i.mtu);
        let host_ifname = self.host_ifname();
        // What ADD configured: the netconf's MTU, else the node's. Only
        // 1.1.0 results carry it in prevResult.
        let expected_mtu = match self.conf.mtu.or(mtu) {
            Some(mtu) => mtu,
            None => self.node_mtu()?,
        };
        let spec = PodInterfaceSpec {
            netns: &netns,
            ifname: &attachment.ifname,
            host_ifname: &host_ifname,
            address,
            mtu: expected_mtu,
        };
        podnet::check(&spec).map_err(pod_error)?;
        let (ingress, egress) = self.limits();
        podnet::check_shape(&netns, &attachment.ifname, &host_ifname, ingress, egress)
            .map_err(pod_error)?;
        self.check_endpoint(&attachment, address, &host_ifname)?;
        // The spec has a plugin that delegates IPAM delegate CHECK too.
        match self.delegate() {
            Some(delegate) => delegate.check(),
            None => Ok(()),
        }
    }

    /// The agent holds the pod at `address` with the datapath attached.
    fn check_endpoint(
        &self,
        attachment: &Attachment,
        address: Ipv4Addr,
        host_ifname: &str,
    ) -> Result<(), CniError> {
        match self.agent(&Request::ListEndpoints)? {
            Response::Endpoints { endpoints } => {
                let found = endpoints
                    .iter()
                    .find(|s| s.endpoint.attachment == *attachment);
                let host_ports = self.host_ports();
                match found {
                    Some(s) if s.attached && s.endpoint.ip == address => {
                        if s.endpoint.host_ports == host_ports {
                            Ok(())
                        } else {
                            Err(check_failed(format!(
                                "the agent serves hostPorts [{}] for this pod, portMappings ask for [{}]",
                                list(&s.endpoint.host_ports),
                                list(&host_ports)
                            )))
                        }
                    }
                    Some(s) if !s.attached => Err(check_failed(format!(
                        "the datapath is not attached to {host_ifname}"
                    ))),
                    Some(s) => Err(check_failed(format!(
                        "the agent has {} for this pod, prevResult says {address}",
                        s.endpoint.ip
                    ))),
                    None => Err(check_failed("the agent does not know this pod".into())),
                }
            }
            other => Err(unexpected(other)),
        }
    }

    /// The MTU the agent gives this node's pods.
    fn node_mtu(&self) -> Result<u32, CniError> {
        match self.agent(&Request::Status)? {
            Response::Status(status) => Ok(status.mtu),
            other => Err(unexpected(other)),
        }
    }

    /// STATUS and GC exist from cniVersion 1.1.0 on.
    fn require_status_gc(&self, command: &str) -> Result<(), CniError> {
        if tern_cni_spec::supports_status_gc(&self.conf.cni_version) {
            return Ok(());
        }
        Err(CniError::incompatible_version(format!(
            "{command} needs cniVersion 1.1.0 or later, got {}",
            self.conf.cni_version
        )))
    }

    fn status(&self) -> Result<(), CniError> {
        self.require_status_gc("STATUS")?;
        match self.agent(&Request::Status) {
            // The delegated IPAM plugin must be able to serve too.
            Ok(Response::Status(status)) if status.ready => match self.delegate() {
                Some(delegate) => delegate.status(),
                None => Ok(()),
            },
            Ok(Response::Status(status)) => Err(CniError::plugin_unavailable(format!(
                "tern-agent cannot serve pods yet: {}",
                status.reason.unwrap_or_else(|| "not ready".into())
            ))),
            Ok(other) => Err(unexpected(other)),
            Err(e) => Err(CniError::plugin_unavailable(e.msg)),
        }
    }

    fn gc(&self) -> Result<(), CniError> {
        self.require_status_gc("GC")?;
        let valid: Vec<Attachment> = self
            .conf
            .valid_attachments
            .iter()
            .map(|(container_id, ifname)| Attachment {
                container_id: container_id.clone(),
                ifname: ifname.clone(),
            })
            .collect();
        self.agent(&Request::Gc { valid })?;
        if let Some(delegate) = self.delegate() {
            delegate.gc()?;
        }
        Ok(())
    }
}

/// Host-side veth name: stable for the attachment, so DEL finds it even
/// when the agent has lost its state; "tern" + 11 hex digits = 15 bytes.
pub fn host_ifname(attachment: &Attachment) -> String {
    // FNV-1a: tiny, stable across releases and platforms.
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in attachment
        .container_id
        .bytes()
        .chain(std::iter::once(b'/'))
        .chain(attachment.ifname.bytes())
    {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    format!("tern{:011x}", hash >> 20)
}

fn list(ports: &[HostPort]) -> String {
    ports
        .iter()
        .map(HostPort::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

fn check_failed(msg: String) -> CniError {
    CniError::new(codes::CHECK_FAILED, format!("CHECK failed: {msg}"), "")
}

fn unexpected(response: Response) -> CniError {
    CniError::io_failure(format!("unexpected answer from tern-agent: {response:?}"))
}

fn netlink_error(e: PodNetError) -> CniError {
    CniError::new(codes::NETLINK, e.to_string(), "")
}

fn pod_error(e: PodNetError) -> CniError {
    match e {
        PodNetError::NetnsMissing(path) => CniError::invalid_env(format!(
            "CNI_NETNS {} is not a network namespace",
            path.display()
        )),
        PodNetError::InterfaceExists(name) => CniError::new(
            codes::INTERFACE_EXISTS,
            format!("interface {name} already exists"),
            "",
        ),
        PodNetError::Check(msg) => check_failed(msg),
        e @ PodNetError::SecondInterface(_) => {
            CniError::new(codes::SECOND_INTERFACE, e.to_string(), "")
        }
        other => netlink_error(other),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn host_ifname_is_stable_short_and_distinct() {
        let a = Attachment {
            container_id: "abc".into(),
            ifname: "eth0".into(),
        };
        let b = Attachment {
            container_id: "abc".into(),
            ifname: "eth1".into(),
        };
        assert_eq!(host_ifname(&a), host_ifname(&a.clone()));
        assert_eq!(host_ifname(&a).len(), 15);
        assert!(host_ifname(&a).starts_with("tern"));
        assert_ne!(host_ifname(&a), host_ifname(&b));
    }
}
