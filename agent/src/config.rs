//! Agent configuration: an optional JSON file, overridden by flags.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Parser;
use ipnetwork::Ipv4Network;
use serde::Deserialize;

use crate::compiler::maglev::is_prime;
use crate::model::LbAlgorithm;
use tern_common::events::event_flags;

#[derive(Debug, Parser)]
#[command(
    name = "tern-agent",
    version,
    about = "Tern node agent: IPAM, CNI API and the eBPF datapath"
)]
pub struct AgentArgs {
    /// JSON config file; flags given on the command line win over it.
    #[arg(long, env = "TERN_CONFIG")]
    pub config: Option<PathBuf>,
    /// This node's name (default: the host name).
    #[arg(long, env = "TERN_NODE_NAME")]
    pub node_name: Option<String>,
    /// The node's PodCIDR, e.g. 10.244.1.0/24. Without it the agent runs
    /// but refuses to allocate (CNI "try again later").
    #[arg(long)]
    pub pod_cidr: Option<Ipv4Network>,
    /// Pod interface MTU (default: the MTU of the node's default-route device, else 1500).
    #[arg(long)]
    pub mtu: Option<u32>,
    /// Where IPAM and endpoint state are kept.
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// Where maps and links are pinned (must be on bpffs).
    #[arg(long)]
    pub bpffs_dir: Option<PathBuf>,
    /// Unix socket of the CNI API.
    #[arg(long)]
    pub socket: Option<PathBuf>,
    /// Standalone mode: a directory of Service and EndpointSlice manifests,
    /// watched for changes.
    #[arg(long)]
    pub manifests_dir: Option<PathBuf>,
    /// Where Services, EndpointSlices and Nodes come from: kube (the API
    /// server), manifests (--manifests-dir) or none. Default: manifests when
    /// a directory is given, else kube inside a cluster or with
    /// --kubeconfig, else none.
    #[arg(long)]
    pub source: Option<String>,
    /// The kubeconfig file to reach the API server with (default: the pod's
    /// in-cluster service account).
    #[arg(long)]
    pub kubeconfig: Option<PathBuf>,
    /// The API server's URL, e.g. https://192.168.1.10:6443, replacing the
    /// one of the kubeconfig or the in-cluster default (the `kubernetes`
    /// Service's ClusterIP, which needs kube-proxy or Tern already running).
    #[arg(long)]
    pub api_server: Option<String>,
    /// Address of the HTTP endpoint serving /healthz, /readyz and /metrics.
    #[arg(long)]
    pub health_address: Option<SocketAddr>,
    /// Translate Service addresses at the socket (cgroup hooks): true or false.
    #[arg(long)]
    pub socket_lb: Option<bool>,
    /// cgroup v2 directory whose processes (the pods) get socket-LB; mounted
    /// as cgroup2 when it is not inside a cgroup2 hierarchy yet.
    #[arg(long)]
    pub cgroup_root: Option<PathBuf>,
    /// Addresses NodePorts listen on (repeatable; default: the node's IPv4 addresses).
    #[arg(long = "node-ip")]
    pub node_ips: Vec<Ipv4Addr>,
    /// Underlay devices where NodePort/LoadBalancer traffic arrives
    /// (repeatable; default: the devices holding the node IPs).
    #[arg(long = "device")]
    pub devices: Vec<String>,
    /// Capacity of a map, e.g. SERVICES=2000000 (repeatable). A map pinned
    /// with another capacity is replaced at start and its entries rebuilt
    /// (CT and NAT lose their flows).
    #[arg(long = "map-size", value_parser = parse_map_size)]
    pub map_sizes: Vec<(String, u32)>,
    /// Maglev table size, a prime up to 16381.
    #[arg(long)]
    pub maglev_table_size: Option<u32>,
    /// Backend selection for Services without the tern.io/lb-algorithm annotation: random, maglev, rr, wrr, lc, wlc, sh, dh, sed or nq.
    #[arg(long)]
    pub lb_algorithm: Option<String>,
    /// The cluster's Service CIDR: connections to unused addresses in it are refused.
    #[arg(long)]
    pub service_cidr: Option<Ipv4Network>,
    /// How pods reach pods on other nodes: overlay (VXLAN) or native (routes
    /// via the nodes' addresses).
    #[arg(long)]
    pub routing_mode: Option<String>,
    /// The CIDR all nodes' PodCIDRs come from (kube-controller-manager's
    /// --cluster-cidr). Traffic to a part of it no node has fails at once.
    #[arg(long)]
    pub cluster_cidr: Option<Ipv4Network>,
    /// UDP port of the VXLAN overlay (8472, the Linux and Flannel default).
    #[arg(long)]
    pub tunnel_port: Option<u16>,
    /// Pod traffic to destinations outside the cluster leaves with the
    /// node's address: true or false.
    #[arg(long)]
    pub masquerade: Option<bool>,
    /// Destinations pod traffic keeps its own address for, besides the pod
    /// ranges and the nodes (repeatable; ip-masq-agent's nonMasqueradeCIDRs).
    #[arg(long = "non-masquerade-cidr")]
    pub non_masquerade_cidrs: Vec<Ipv4Network>,
    /// Flow events the datapath reports (`tern observe`), comma-separated:
    /// drops, policy, service, trace; or none. Default: drops,policy,service.
    #[arg(long, value_delimiter = ',')]
    pub events: Vec<String>,
    /// Size of the events ring buffer in bytes: a power of two, at least
    /// one page (default 1 MiB: 16 384 events of 64 bytes).
    #[arg(long)]
    pub events_ring_size: Option<u32>,
    /// Drop events each CPU reports per second at most (the rest are
    /// counted as rate-limited).
    #[arg(long)]
    pub drop_events_per_second: Option<u32>,
    /// Flows the agent keeps for `tern observe --last` (bounded memory).
    #[arg(long)]
    pub flows_kept: Option<usize>,
    /// Port of the node's proxy health endpoint on the node addresses
    /// (kube-proxy's /healthz and /livez; 0: off).
    #[arg(long)]
    pub proxy_healthz_port: Option<u16>,
}

/// The file form; keys are camelCase like Kubernetes objects.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct FileConfig {
    node_name: Option<String>,
    #[serde(rename = "podCIDR")]
    pod_cidr: Option<Ipv4Network>,
    mtu: Option<u32>,
    state_dir: Option<PathBuf>,
    bpffs_dir: Option<PathBuf>,
    socket: Option<PathBuf>,
    manifests_dir: Option<PathBuf>,
    source: Option<String>,
    kubeconfig: Option<PathBuf>,
    api_server: Option<String>,
    health_address: Option<SocketAddr>,
    #[serde(rename = "socketLB")]
    socket_lb: Option<bool>,
    cgroup_root: Option<PathBuf>,
    #[serde(rename = "nodeIPs")]
    node_ips: Option<Vec<Ipv4Addr>>,
    devices: Option<Vec<String>>,
    map_sizes: Option<std::collections::BTreeMap<String, u32>>,
    maglev_table_size: Option<u32>,
    lb_algorithm: Option<String>,
    #[serde(rename = "serviceCIDR")]
    service_cidr: Option<Ipv4Network>,
    routing_mode: Option<String>,
    #[serde(rename = "clusterCIDR")]
    cluster_cidr: Option<Ipv4Network>,
    tunnel_port: Option<u16>,
    masquerade: Option<bool>,
    #[serde(rename = "nonMasqueradeCIDRs")]
    non_masquerade_cidrs: Option<Vec<Ipv4Network>>,
    events: Option<Vec<String>>,
    events_ring_size: Option<u32>,
    drop_events_per_second: Option<u32>,
    flows_kept: Option<usize>,
    proxy_healthz_port: Option<u16>,
}

#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub node_name: String,
    pub pod_cidr: Option<Ipv4Network>,
    /// `None`: detect from the node at start.
    pub mtu: Option<u32>,
    pub state_dir: PathBuf,
    pub bpffs_dir: PathBuf,
    pub socket: PathBuf,
    pub source: Source,
    pub health_address: SocketAddr,
    pub socket_lb: bool,
    pub cgroup_root: PathBuf,
    /// Empty: detect at start.
    pub node_ips: Vec<Ipv4Addr>,
    /// Empty: detect at start.
    pub devices: Vec<String>,
    /// Map name -> max entries, overriding the compiled-in capacity.
    pub map_sizes: Vec<(&'static str, u32)>,
    pub maglev_table_size: u32,
    pub lb_algorithm: LbAlgorithm,
    pub service_cidr: Ipv4Network,
    pub routing_mode: RoutingMode,
    pub cluster_cidr: Option<Ipv4Network>,
    pub tunnel_port: u16,
    pub masquerade: bool,
    pub non_masquerade_cidrs: Vec<Ipv4Network>,
    pub events: EventsConfig,
    /// 0: no proxy health endpoint.
    pub proxy_healthz_port: u16,
}

/// Flow observability settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventsConfig {
    /// `tern_common::events::event_flags`.
    pub flags: u32,
    pub ring_bytes: u32,
    pub drop_events_per_second: u32,
    pub flows_kept: usize,
}

impl Default for EventsConfig {
    fn default() -> Self {
        EventsConfig {
            flags: event_flags::DEFAULT,
            ring_bytes: tern_common::events::EVENTS_RING_BYTES,
            drop_events_per_second: tern_common::events::DROP_EVENTS_PER_SECOND,
            flows_kept: DEFAULT_FLOWS_KEPT,
        }
    }
}

/// As many as Hubble keeps by default.
pub const DEFAULT_FLOWS_KEPT: usize = 4095;

/// `--events`: the names of event kinds, or "none".
fn parse_event_flags(names: &[String]) -> anyhow::Result<u32> {
    let mut flags = 0;
    for name in names {
        flags |= match name.trim() {
            "drops" => event_flags::DROPS,
            "policy" => event_flags::POLICY,
            "service" => event_flags::SERVICE,
            "trace" => event_flags::TRACE,
            "none" => 0,
            other => anyhow::bail!(
                "unknown event kind {other:?}: choose from drops, policy, service, trace, none"
            ),
        };
    }
    Ok(flags)
}

fn events_config(args: &AgentArgs, file: &FileConfig) -> anyhow::Result<EventsConfig> {
    let defaults = EventsConfig::default();
    let names = if args.events.is_empty() {
        file.events.clone()
    } else {
        Some(args.events.clone())
    };
    let flags = match names {
        Some(names) => parse_event_flags(&names)?,
        None => defaults.flags,
    };
    let ring_bytes = args
        .events_ring_size
        .or(file.events_ring_size)
        .unwrap_or(defaults.ring_bytes);
    // The kernel's rule for ring buffers (BPF_MAP_TYPE_RINGBUF): a power
    // of two, and a whole number of pages.
    let page = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
        .ok()
        .flatten()
        .unwrap_or(4096) as u32;
    if !ring_bytes.is_power_of_two() || ring_bytes < page {
        anyhow::bail!(
            "events ring size {ring_bytes} is not a power of two of at least one page ({page} bytes)"
        );
    }
    let flows_kept = args
        .flows_kept
        .or(file.flows_kept)
        .unwrap_or(defaults.flows_kept);
    if flows_kept == 0 {
        anyhow::bail!("flows kept must be at least 1");
    }
    Ok(EventsConfig {
        flags,
        ring_bytes,
        drop_events_per_second: args
            .drop_events_per_second
            .or(file.drop_events_per_second)
            .unwrap_or(defaults.drop_events_per_second),
        flows_kept,
    })
}

/// Where the cluster's objects come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// The API server: in-cluster credentials, or this kubeconfig; at
    /// `api_server` when given.
    Kube {
        kubeconfig: Option<PathBuf>,
        api_server: Option<String>,
    },
    /// Standalone: a directory of manifests.
    Manifests(PathBuf),
    /// No Services; the agent only wires pods.
    None,
}

impl Source {
    /// Whether it hands over snapshots the datapath waits for.
    pub fn syncs(&self) -> bool {
        !matches!(self, Source::None)
    }

    /// Whether its snapshots list this node's pods.
    pub fn lists_pods(&self) -> bool {
        matches!(self, Source::Kube { .. })
    }

    /// How `tern status` names it.
    pub fn describe(&self) -> String {
        match self {
            Source::Kube { kubeconfig, .. } => match kubeconfig {
                None => "kube (in-cluster)".into(),
                Some(path) => format!("kube ({})", path.display()),
            },
            Source::Manifests(dir) => format!("manifests {}", dir.display()),
            Source::None => "none".into(),
        }
    }
}

/// Set in every pod by the kubelet: the agent runs inside a cluster.
const IN_CLUSTER_ENV: &str = "KUBERNETES_SERVICE_HOST";

/// How traffic between pods of different nodes travels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RoutingMode {
    /// VXLAN between the nodes: the underlay needs to know nothing of pods.
    Overlay,
    /// Plain routes via the nodes' addresses: the underlay carries pod
    /// addresses (nodes on one L2 segment, or routers that know them).
    Native,
}

impl RoutingMode {
    pub fn name(self) -> &'static str {
        match self {
            RoutingMode::Overlay => "overlay",
            RoutingMode::Native => "native",
        }
    }
}

/// VXLAN's port in Linux and Flannel (IANA's 4789 is often taken by others).
pub const DEFAULT_TUNNEL_PORT: u16 = 8472;

/// kubeadm's default Service CIDR.
pub const DEFAULT_SERVICE_CIDR: &str = "10.96.0.0/12";
pub const DEFAULT_CGROUP_ROOT: &str = "/run/tern/cgroupv2";
pub const DEFAULT_MAGLEV_TABLE_SIZE: u32 = 16381;

pub const DEFAULT_STATE_DIR: &str = "/var/lib/tern";
pub const DEFAULT_BPFFS_DIR: &str = "/sys/fs/bpf/tern";

impl AgentConfig {
    pub fn from_args(args: AgentArgs) -> anyhow::Result<Self> {
        let file = match &args.config {
            Some(path) => read_file(path)?,
            None => FileConfig::default(),
        };
        let events = events_config(&args, &file)?;
        let node_name = match args.node_name.or(file.node_name) {
            Some(name) => name,
            None => nix::unistd::gethostname()?.to_string_lossy().into_owned(),
        };
        let mtu = args.mtu.or(file.mtu);
        if let Some(mtu) = mtu
            && !(576..=65535).contains(&mtu)
        {
            anyhow::bail!("mtu {mtu} is out of range (576..=65535)");
        }
        let maglev_table_size = args
            .maglev_table_size
            .or(file.maglev_table_size)
            .unwrap_or(DEFAULT_MAGLEV_TABLE_SIZE);
        if !is_prime(maglev_table_size) || maglev_table_size as usize > tern_common::LB_TABLE_MAX {
            anyhow::bail!(
                "maglev table size {maglev_table_size} must be a prime no larger than {}",
                tern_common::LB_TABLE_MAX
            );
        }
        let lb_algorithm = match args.lb_algorithm.or(file.lb_algorithm).as_deref() {
            None => LbAlgorithm::Random,
            Some(name) => LbAlgorithm::from_name(name).with_context(|| {
                let known: Vec<&str> = LbAlgorithm::ALL.iter().map(|a| a.name()).collect();
                format!("lb algorithm {name:?} is not one of {}", known.join(", "))
            })?,
        };
        let routing_mode = match args.routing_mode.or(file.routing_mode).as_deref() {
            None | Some("overlay") => RoutingMode::Overlay,
            Some("native") => RoutingMode::Native,
            Some(other) => {
                anyhow::bail!("routing mode {other:?} is not one of overlay, native")
            }
        };
        let tunnel_port = args
            .tunnel_port
            .or(file.tunnel_port)
            .unwrap_or(DEFAULT_TUNNEL_PORT);
        if tunnel_port == 0 {
            anyhow::bail!("tunnel port 0 is not a port");
        }
        let node_ips = if args.node_ips.is_empty() {
            file.node_ips.unwrap_or_default()
        } else {
            args.node_ips
        };
        let devices = if args.devices.is_empty() {
            file.devices.unwrap_or_default()
        } else {
            args.devices
        };
        let mut map_sizes = Vec::new();
        let requested = file
            .map_sizes
            .unwrap_or_default()
            .into_iter()
            .chain(args.map_sizes);
        for (name, size) in requested {
            let Some(known) = tern_common::maps::spec(&name).filter(|m| m.resizable) else {
                anyhow::bail!(
                    "map {name:?} cannot be resized; choose one of {:?}",
                    tern_common::maps::resizable().collect::<Vec<_>>()
                );
            };
            if size == 0 {
                anyhow::bail!("map {name} needs at least one entry");
            }
            map_sizes.retain(|(n, _)| *n != known.name);
            map_sizes.push((known.name, size));
        }
        let non_masquerade_cidrs = if args.non_masquerade_cidrs.is_empty() {
            file.non_masquerade_cidrs.unwrap_or_default()
        } else {
            args.non_masquerade_cidrs
        };
        Ok(AgentConfig {
            proxy_healthz_port: args
                .proxy_healthz_port
                .or(file.proxy_healthz_port)
                .unwrap_or(crate::service_health::PROXY_HEALTHZ_PORT),
            events,
            masquerade: args.masquerade.or(file.masquerade).unwrap_or(true),
            non_masquerade_cidrs,
            routing_mode,
            cluster_cidr: args.cluster_cidr.or(file.cluster_cidr),
            tunnel_port,
            map_sizes,
            devices,
            source: source(
                args.source.or(file.source),
                args.manifests_dir.or(file.manifests_dir),
                args.kubeconfig.or(file.kubeconfig),
                args.api_server.or(file.api_server),
            )?,
            health_address: match args.health_address.or(file.health_address) {
                Some(address) => address,
                None => crate::health::DEFAULT_ADDRESS.parse()?,
            },
            service_cidr: match args.service_cidr.or(file.service_cidr) {
                Some(cidr) => cidr,
                None => DEFAULT_SERVICE_CIDR.parse()?,
            },
            socket_lb: args.socket_lb.or(file.socket_lb).unwrap_or(true),
            cgroup_root: args
                .cgroup_root
                .or(file.cgroup_root)
                .unwrap_or_else(|| DEFAULT_CGROUP_ROOT.into()),
            node_ips,
            maglev_table_size,
            lb_algorithm,
            node_name,
            pod_cidr: args.pod_cidr.or(file.pod_cidr),
            mtu,
            state_dir: args
                .state_dir
                .or(file.state_dir)
                .unwrap_or_else(|| DEFAULT_STATE_DIR.into()),
            bpffs_dir: args
                .bpffs_dir
                .or(file.bpffs_dir)
                .unwrap_or_else(|| DEFAULT_BPFFS_DIR.into()),
            socket: args
                .socket
                .or(file.socket)
                .unwrap_or_else(|| tern_api::DEFAULT_SOCKET.into()),
        })
    }
}

fn source(
    kind: Option<String>,
    manifests_dir: Option<PathBuf>,
    kubeconfig: Option<PathBuf>,
    api_server: Option<String>,
) -> anyhow::Result<Source> {
    let kind = kind.unwrap_or_else(|| {
        if manifests_dir.is_some() {
            "manifests".into()
        } else if kubeconfig.is_some()
            || api_server.is_some()
            || std::env::var_os(IN_CLUSTER_ENV).is_some()
        {
            "kube".into()
        } else {
            "none".into()
        }
    });
    Ok(match kind.as_str() {
        "kube" => Source::Kube {
            kubeconfig,
            api_server,
        },
        "manifests" => Source::Manifests(
            manifests_dir.context("source manifests needs a manifests directory (manifestsDir)")?,
        ),
        "none" => Source::None,
        other => anyhow::bail!("source {other:?} is not one of kube, manifests, none"),
    })
}

fn parse_map_size(text: &str) -> Result<(String, u32), String> {
    let (name, size) = text
        .split_once('=')
        .ok_or_else(|| format!("{text:?} is not NAME=ENTRIES"))?;
    let size = size
        .parse()
        .map_err(|e| format!("{size:?} is not a number of entries: {e}"))?;
    Ok((name.to_owned(), size))
}

fn read_file(path: &Path) -> anyhow::Result<FileConfig> {
    let bytes =
        std::fs::read(path).with_context(|| format!("reading config {}", path.display()))?;
    serde_json::from_slice(&bytes)
        .with_context(|| format!("config {} is not valid", path.display()))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn args(extra: &[&str]) -> AgentArgs {
        AgentArgs::parse_from(std::iter::once("tern-agent").chain(extra.iter().copied()))
    }

    #[test]
    fn flags_override_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.json");
        std::fs::write(
            &path,
            r#"{"nodeName":"n1","podCIDR":"10.244.1.0/24","mtu":1400}"#,
        )
        .unwrap();
        let config =
            AgentConfig::from_args(args(&["--config", path.to_str().unwrap(), "--mtu", "1450"]))
                .unwrap();
        assert_eq!(config.node_name, "n1");
        assert_eq!(config.pod_cidr, Some("10.244.1.0/24".parse().unwrap()));
        assert_eq!(config.mtu, Some(1450));
        assert_eq!(config.bpffs_dir, PathBuf::from(DEFAULT_BPFFS_DIR));
    }

    #[test]
    fn unknown_file_keys_and_bad_values_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.json");
        std::fs::write(&path, r#"{"podCidr":"10.244.1.0/24"}"#).unwrap();
        let err = AgentConfig::from_args(args(&["--config", path.to_str().unwrap()])).unwrap_err();
        assert!(format!("{err:#}").contains("podCidr"), "{err:#}");
        assert!(AgentConfig::from_args(args(&["--mtu", "10"])).is_err());
        assert!(AgentConfig::from_args(args(&["--map-size", "NOPE=5"])).is_err());
        assert!(AgentConfig::from_args(args(&["--map-size", "METRICS=5"])).is_err());
        assert!(AgentArgs::try_parse_from(["tern-agent", "--map-size", "SERVICES"]).is_err());
        let sized = AgentConfig::from_args(args(&[
            "--map-size",
            "SERVICES=10",
            "--map-size",
            "SERVICES=20",
        ]))
        .unwrap();
        assert_eq!(sized.map_sizes, vec![("SERVICES", 20)]);
        assert!(AgentArgs::try_parse_from(["tern-agent", "--pod-cidr", "10.244.1.0/33"]).is_err());
        assert!(AgentConfig::from_args(args(&["--routing-mode", "tunnel"])).is_err());
        assert!(AgentConfig::from_args(args(&["--tunnel-port", "0"])).is_err());
        assert!(AgentConfig::from_args(args(&["--source", "api"])).is_err());
        assert!(AgentConfig::from_args(args(&["--source", "manifests"])).is_err());
        let kube = AgentConfig::from_args(args(&["--kubeconfig", "/k"])).unwrap();
        assert_eq!(
            kube.source,
            Source::Kube {
                kubeconfig: Some("/k".into()),
                api_server: None,
            }
        );
        assert_eq!(
            kube.health_address.to_string(),
            crate::health::DEFAULT_ADDRESS
        );
        let native = AgentConfig::from_args(args(&["--routing-mode", "native"])).unwrap();
        assert_eq!(native.routing_mode, RoutingMode::Native);
        assert_eq!(
            AgentConfig::from_args(args(&[])).unwrap().routing_mode,
            RoutingMode::Overlay
        );
    }
}
