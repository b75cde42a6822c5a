//! A Kubernetes-like cluster made of network namespaces: node namespaces
//! running the real `tern-agent` on a shared underlay switch, pods wired by
//! invoking the real `tern-cni` binary the way a container runtime does.
//!
//! Nothing is ever connected to the machine's root namespace: the node's
//! underlay interface leads to a lab "switch" namespace. Every name is
//! unique, and everything is removed on drop, also when a test fails.

use std::io::{BufRead, BufReader, Write};
use std::net::Ipv4Addr;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use crate::netns::{ChildGuard, Netns, unique_ifname, unique_name};

/// The built binaries under test.
#[derive(Debug, Clone)]
pub struct Binaries {
    pub agent: PathBuf,
    pub cni: PathBuf,
    pub tern: PathBuf,
}

impl Binaries {
    /// `$TERN_BIN_DIR`, else the workspace's target/release, else target/debug.
    pub fn locate() -> Result<Binaries> {
        let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        let candidates: Vec<PathBuf> = match std::env::var_os("TERN_BIN_DIR") {
            Some(dir) => vec![PathBuf::from(dir)],
            None => vec![
                workspace.join("target/release"),
                workspace.join("target/debug"),
            ],
        };
        for dir in &candidates {
            let bins = Binaries {
                agent: dir.join("tern-agent"),
                cni: dir.join("tern-cni"),
                tern: dir.join("tern"),
            };
            if bins.agent.is_file() && bins.cni.is_file() && bins.tern.is_file() {
                return Ok(bins);
            }
        }
        bail!(
            "tern-agent, tern-cni and tern not found in {candidates:?}: run `cargo build --release` (or `cargo xtask build`) first"
        )
    }
}

/// The lab's internet: an address no lab route leads to except through
/// the gateway on the underlay (TEST-NET-3, never routed anywhere real).
pub const OUTSIDE_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
/// The underlay's way to the outside (a lab cluster's default route).
pub const GATEWAY_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 254);

/// The outside host and its router, removed on drop.
pub struct Outside {
    pub host: Netns,
    pub router: Netns,
}

/// The PodCIDRs of a lab cluster's nodes all come from here.
pub const CLUSTER_CIDR: &str = "10.244.0.0/16";
/// The manifest file holding a lab cluster's Node objects.
pub const NODES_MANIFEST: &str = "nodes.yaml";

/// Node objects as the API server shows them: name, InternalIP, PodCIDR.
pub fn nodes_manifest(nodes: &[(String, Ipv4Addr, String)]) -> String {
    nodes
        .iter()
        .map(|(name, ip, cidr)| {
            format!(
                "apiVersion: v1
kind: Node
metadata: {{name: {name}}}
spec: {{podCIDR: {cidr}, podCIDRs: [{cidr}]}}
status:
  addresses:
  - {{type: InternalIP, address: {ip}}}
  - {{type: Hostname, address: {name}}}
"
            )
        })
        .collect::<Vec<_>>()
        .join("---\n")
}

/// Fails clearly when bpffs is not mounted (`cargo xtask setup` mounts it).
pub fn require_bpffs() -> Result<()> {
    let mounts = std::fs::read_to_string("/proc/self/mounts")?;
    if !mounts
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some("/sys/fs/bpf") && l.contains(" bpf "))
    {
        bail!("bpffs is not mounted at /sys/fs/bpf: run `cargo xtask setup`");
    }
    Ok(())
}

/// The switch every node's underlay interface is plugged into.
pub struct Lab {
    pub switch: Netns,
    pub bins: Binaries,
}

impl Lab {
    pub fn new() -> Result<Lab> {
        require_bpffs()?;
        let switch = Netns::new("sw")?;
        switch.sh("ip link add br0 type bridge\nip link set br0 up")?;
        Ok(Lab {
            bins: Binaries::locate()?,
            switch,
        })
    }

    /// A host outside the cluster on the underlay (e.g. 10.0.0.100): the
    /// lab's stand-in for clients on the node's network.
    pub fn external_client(&self, ip: Ipv4Addr) -> Result<Netns> {
        let ns = Netns::new("ext")?;
        self.plug(&ns, ip)?;
        Ok(ns)
    }

    /// The lab's internet: a host at OUTSIDE_IP behind a router that sits
    /// on the underlay at GATEWAY_IP. The router knows nothing of pod
    /// addresses, so only masqueraded pod traffic gets answers.
    pub fn outside(&self) -> Result<Outside> {
        let router = Netns::new("gw")?;
        let host = Netns::new("out")?;
        self.plug(&router, GATEWAY_IP)?;
        router.sysctl("net.ipv4.ip_forward", "1")?;
        router.sh(&format!(
            "ip link add up0 type veth peer name eth0 netns {host}
             ip addr add 203.0.113.1/24 dev up0
             ip link set up0 up",
            host = host.name()
        ))?;
        host.sh(&format!(
            "ip addr add {OUTSIDE_IP}/24 dev eth0
             ip link set eth0 up
             ip route add default via 203.0.113.1"
        ))?;
        Ok(Outside { host, router })
    }

    /// Gives `ns` an `eth0` with `ip`/24 on the switch's bridge.
    pub fn plug(&self, ns: &Netns, ip: Ipv4Addr) -> Result<()> {
        let port = unique_ifname("p");
        ns.sh(&format!(
            "ip link add eth0 type veth peer name {port} netns {sw}
             ip addr add {ip}/24 dev eth0
             ip link set eth0 up",
            sw = self.switch.name()
        ))?;
        self.switch
            .sh(&format!("ip link set {port} master br0 up"))?;
        Ok(())
    }

    /// `count` nodes that know each other, agents running in
    /// `routing_mode` ("overlay" or "native"): node i is `n{i}` with
    /// underlay address 10.0.0.i and PodCIDR 10.244.i.0/24, and every
    /// node's manifest directory holds all Node objects (nodes.yaml).
    pub fn cluster(&self, count: u8, routing_mode: &str) -> Result<Vec<LabNode>> {
        let specs: Vec<(String, Ipv4Addr, String)> = (1..=count)
            .map(|i| {
                (
                    format!("n{i}"),
                    Ipv4Addr::new(10, 0, 0, i),
                    format!("10.244.{i}.0/24"),
                )
            })
            .collect();
        let nodes_yaml = nodes_manifest(&specs);
        let mut nodes = Vec::new();
        for (name, ip, cidr) in &specs {
            let mut node = LabNode::create(self, name, Some(cidr), *ip)?;
            // What is not the cluster's goes to the lab's internet gateway.
            node.ns
                .sh(&format!("ip route add default via {GATEWAY_IP}"))?;
            node.routing_mode = routing_mode.to_owned();
            node.cluster_cidr = Some(CLUSTER_CIDR.to_owned());
            node.write_manifest(NODES_MANIFEST, &nodes_yaml)?;
            node.start_agent()?;
            nodes.push(node);
        }
        Ok(nodes)
    }

    /// A node with `pod_cidr` and underlay address `node_ip`/24, agent running.
    pub fn node(&self, name: &str, pod_cidr: &str, node_ip: Ipv4Addr) -> Result<LabNode> {
        self.node_with(name, pod_cidr, node_ip, true)
    }

    /// The same, choosing the Service path: socket-LB or per-packet only.
    pub fn node_with(
        &self,
        name: &str,
        pod_cidr: &str,
        node_ip: Ipv4Addr,
        socket_lb: bool,
    ) -> Result<LabNode> {
        let mut node = LabNode::create(self, name, Some(pod_cidr), node_ip)?;
        node.socket_lb = socket_lb;
        node.start_agent()?;
        Ok(node)
    }
}

pub struct LabNode {
    pub name: String,
    pub ns: Netns,
    pub node_ip: Ipv4Addr,
    pub pod_cidr: Option<String>,
    pub dir: PathBuf,
    pub bpffs_dir: PathBuf,
    pub socket: PathBuf,
    /// Service and EndpointSlice manifests the agent watches.
    pub manifests_dir: PathBuf,
    /// When set, the agent reads the API server this names instead.
    pub kubeconfig: Option<PathBuf>,
    /// More agent flags, after the lab's own.
    pub extra_args: Vec<String>,
    /// The node's pods cgroup (v2): socket-LB applies to processes in it.
    pub cgroup: PathBuf,
    /// The cgroup the lab process was in when the node was made: agents
    /// run there, never in a pods cgroup the test process entered (which
    /// would also keep that cgroup from being removed).
    home_cgroup: PathBuf,
    /// Service translation at the socket (true) or per packet (false).
    pub socket_lb: bool,
    /// "overlay" (the agent's default) or "native".
    pub routing_mode: String,
    /// The agent's --cluster-cidr, if any.
    pub cluster_cidr: Option<String>,
    pub bins: Binaries,
    agent: Option<ChildGuard>,
}

impl LabNode {
    /// The node namespace and its underlay link; the agent is not started.
    pub fn create(
        lab: &Lab,
        name: &str,
        pod_cidr: Option<&str>,
        node_ip: Ipv4Addr,
    ) -> Result<LabNode> {
        let ns = Netns::new(name)?;
        let unique = unique_name(name);
        let dir = std::env::temp_dir().join(&unique);
        std::fs::create_dir_all(&dir)?;
        let manifests_dir = dir.join("manifests");
        std::fs::create_dir_all(&manifests_dir)?;
        let cgroup = cgroup2_root()?.join(&unique);
        std::fs::create_dir_all(&cgroup)
            .with_context(|| format!("creating cgroup {}", cgroup.display()))?;
        let node = LabNode {
            name: name.to_owned(),
            node_ip,
            pod_cidr: pod_cidr.map(str::to_owned),
            bpffs_dir: Path::new("/sys/fs/bpf").join(&unique),
            socket: dir.join("tern.sock"),
            manifests_dir,
            kubeconfig: None,
            extra_args: Vec::new(),
            cgroup,
            home_cgroup: own_cgroup()?,
            socket_lb: true,
            routing_mode: "overlay".into(),
            cluster_cidr: None,
            dir,
            bins: lab.bins.clone(),
            agent: None,
            ns,
        };
        lab.plug(&node.ns, node_ip)?;
        Ok(node)
    }

    pub fn agent_log(&self) -> PathBuf {
        self.dir.join("agent.log")
    }

    /// Starts tern-agent in the node namespace and waits until it answers.
    pub fn start_agent(&mut self) -> Result<()> {
        let mut cmd = Command::new(&self.bins.agent);
        cmd.arg("--node-name")
            .arg(&self.name)
            .arg("--state-dir")
            .arg(self.dir.join("state"))
            .arg("--bpffs-dir")
            .arg(&self.bpffs_dir)
            .arg("--socket")
            .arg(&self.socket)
            .arg("--cgroup-root")
            .arg(&self.cgroup)
            .arg("--socket-lb")
            .arg(self.socket_lb.to_string())
            .arg("--node-ip")
            .arg(self.node_ip.to_string())
            .arg("--device")
            .arg("eth0")
            .arg("--routing-mode")
            .arg(&self.routing_mode)
            .env("TERN_LOG", "info");
        match &self.kubeconfig {
            Some(path) => cmd.arg("--kubeconfig").arg(path),
            None => cmd.arg("--manifests-dir").arg(&self.manifests_dir),
        };
        if let Some(cidr) = &self.pod_cidr {
            cmd.arg("--pod-cidr").arg(cidr);
        }
        if let Some(cidr) = &self.cluster_cidr {
            cmd.arg("--cluster-cidr").arg(cidr);
        }
        cmd.args(&self.extra_args);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.agent_log())?;
        cmd.stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let agent = self.ns.spawn_guarded(cmd)?;
        std::fs::write(
            self.home_cgroup.join("cgroup.procs"),
            agent.0.id().to_string(),
        )
        .with_context(|| format!("moving the agent to {}", self.home_cgroup.display()))?;
        self.agent = Some(agent);
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if self.agent_request(&json!({"op": "status"})).is_ok() {
                return Ok(());
            }
            if let Some(agent) = self.agent.as_mut()
                && let Some(status) = agent.0.try_wait()?
            {
                bail!(
                    "tern-agent exited ({status}) at start:\n{}",
                    self.agent_log_tail()
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "tern-agent did not answer within 15 s:\n{}",
                    self.agent_log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Kills the agent with SIGKILL (no clean-up chance at all) and waits.
    pub fn kill_agent(&mut self) -> Result<()> {
        if let Some(mut agent) = self.agent.take() {
            agent.0.kill()?;
            agent.0.wait()?;
        }
        Ok(())
    }

    /// Stops the agent with SIGTERM, as a DaemonSet rollout does, and
    /// waits up to 10 s for it to exit (then kills it and fails).
    pub fn terminate_agent(&mut self) -> Result<()> {
        let Some(mut agent) = self.agent.take() else {
            return Ok(());
        };
        let pid = nix::unistd::Pid::from_raw(agent.0.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM)?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while agent.0.try_wait()?.is_none() {
            if Instant::now() > deadline {
                agent.0.kill()?;
                agent.0.wait()?;
                bail!("tern-agent did not exit within 10 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(())
    }

    pub fn agent_pid(&self) -> Option<u32> {
        self.agent.as_ref().map(|a| a.0.id())
    }

    pub fn agent_log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.agent_log()).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// One raw request on the agent's socket (the protocol tern-cni speaks).
    pub fn agent_request(&self, request: &Value) -> Result<Value> {
        let mut stream = UnixStream::connect(&self.socket)?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        stream.write_all(format!("{request}\n").as_bytes())?;
        let mut line = String::new();
        BufReader::new(stream).read_line(&mut line)?;
        Ok(serde_json::from_str(&line)?)
    }

    /// The network configuration a runtime would read from /etc/cni/net.d.
    pub fn netconf(&self, cni_version: &str) -> Value {
        json!({
            "cniVersion": cni_version,
            "name": "tern-lab",
            "type": "tern-cni",
            "agentSocket": self.socket,
        })
    }

    /// Runs tern-cni exactly as a runtime does: in the node's namespace,
    /// a clean environment holding only the CNI_* variables, config on stdin.
    pub fn invoke_cni(&self, env: &[(&str, &str)], stdin: &[u8]) -> Result<CniOutput> {
        self.invoke_plugin(&self.bins.cni, env, stdin)
    }

    /// Any CNI plugin binary invoked the same way (e.g. the reference
    /// `bridge` plugin, as a baseline).
    pub fn invoke_plugin(
        &self,
        binary: impl AsRef<Path>,
        env: &[(&str, &str)],
        stdin: &[u8],
    ) -> Result<CniOutput> {
        let mut cmd = Command::new(binary.as_ref());
        cmd.env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .envs(env.iter().copied())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = self.ns.spawn(cmd)?;
        child
            .stdin
            .take()
            .context("stdin")?
            .write_all(stdin)
            .context("writing the netconf")?;
        let out = child.wait_with_output()?;
        Ok(CniOutput {
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        })
    }

    /// CNI call for `container_id`/eth0 in `netns` with this node's netconf.
    pub fn cni(
        &self,
        command: &str,
        container_id: &str,
        netns: &Path,
        cni_version: &str,
    ) -> Result<CniOutput> {
        let netns = netns.to_string_lossy();
        self.invoke_cni(
            &[
                ("CNI_COMMAND", command),
                ("CNI_CONTAINERID", container_id),
                ("CNI_NETNS", &netns),
                ("CNI_IFNAME", "eth0"),
                ("CNI_PATH", "/usr/lib/cni"),
            ],
            self.netconf(cni_version).to_string().as_bytes(),
        )
    }

    /// A pod: its namespace made as a runtime makes it, then CNI ADD.
    /// `n` pods "b0", "b1"... each echoing on `port` as "b<i>:<line>"
    /// (servers stop when dropped).
    pub fn add_echo_pods(
        &self,
        n: usize,
        port: u16,
    ) -> Result<(Vec<Pod>, Vec<crate::traffic::EchoServer>)> {
        let mut pods = Vec::new();
        let mut servers = Vec::new();
        for i in 0..n {
            let pod = self.add_pod(&format!("b{i}"))?;
            servers.push(crate::traffic::EchoServer::start(
                &pod.ns,
                port,
                &format!("b{i}"),
            )?);
            pods.push(pod);
        }
        Ok((pods, servers))
    }

    pub fn add_pod(&self, name: &str) -> Result<Pod> {
        self.add_pod_with_args(name, |_| None)
    }

    /// A pod of Kubernetes namespace `namespace`: CNI ADD with the
    /// CNI_ARGS a Kubernetes runtime passes (K8S_POD_NAMESPACE,
    /// K8S_POD_NAME), by which the agent finds the pod's object.
    pub fn add_k8s_pod(&self, namespace: &str, name: &str) -> Result<Pod> {
        self.add_pod_with_args(name, |container_id| {
            Some(format!(
                "IgnoreUnknown=1;K8S_POD_NAMESPACE={namespace};K8S_POD_NAME={name};K8S_POD_INFRA_CONTAINER_ID={container_id}"
            ))
        })
    }

    /// CNI ADD of a new pod namespace, with the CNI_ARGS `args` makes of
    /// the container id (none: no CNI_ARGS).
    fn add_pod_with_args(
        &self,
        name: &str,
        args: impl FnOnce(&str) -> Option<String>,
    ) -> Result<Pod> {
        let ns = Netns::new(name)?;
        let container_id = unique_name(name);
        let netns = ns.path().to_string_lossy().into_owned();
        let args = args(&container_id);
        let mut env = vec![
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", container_id.as_str()),
            ("CNI_NETNS", netns.as_str()),
            ("CNI_IFNAME", "eth0"),
            ("CNI_PATH", "/usr/lib/cni"),
        ];
        if let Some(args) = &args {
            env.push(("CNI_ARGS", args));
        }
        let out = self.invoke_cni(&env, self.netconf("1.1.0").to_string().as_bytes())?;
        let result = out
            .success_json()
            .with_context(|| format!("ADD of pod {name}"))?;
        let ip = pod_ip(&result)?;
        Ok(Pod {
            ns,
            container_id,
            ip,
            result,
        })
    }

    pub fn del_pod(&self, pod: &Pod) -> Result<CniOutput> {
        self.cni("DEL", &pod.container_id, pod.ns.path(), "1.1.0")
    }

    /// Turns the node's own forwarding off: pod traffic then moves only if
    /// the eBPF datapath carries it.
    pub fn forward_only_through_ebpf(&self) -> Result<()> {
        self.ns.sysctl("net.ipv4.ip_forward", "0")
    }

    /// The `tern` CLI against this node's agent and pins.
    pub fn tern(&self, args: &[&str]) -> Result<String> {
        let out = Command::new(&self.bins.tern)
            .arg("--socket")
            .arg(&self.socket)
            .arg("--bpffs-dir")
            .arg(&self.bpffs_dir)
            .args(args)
            .output()?;
        if !out.status.success() {
            bail!(
                "tern {args:?} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// A datapath packet counter (e.g. "redirect_local_pod"), read from the
    /// pinned METRICS map through `tern status -o json`.
    pub fn counter(&self, reason: &str) -> Result<u64> {
        let status: Value = serde_json::from_str(&self.tern(&["status", "-o", "json"])?)?;
        status["datapath"][reason]
            .as_u64()
            .with_context(|| format!("no datapath counter {reason} in {status}"))
    }
}

impl LabNode {
    /// Writes (or replaces) a manifest file atomically, as a ConfigMap
    /// update or an editor would, so the agent never reads half a file.
    pub fn write_manifest(&self, file: &str, yaml: &str) -> Result<()> {
        let tmp = self.manifests_dir.join(format!(".{file}.tmp"));
        std::fs::write(&tmp, yaml)?;
        std::fs::rename(&tmp, self.manifests_dir.join(file))?;
        Ok(())
    }

    pub fn remove_manifest(&self, file: &str) -> Result<()> {
        std::fs::remove_file(self.manifests_dir.join(file))?;
        Ok(())
    }

    /// Service frontends as `tern service list -o json` shows them.
    pub fn frontends(&self) -> Result<Vec<Value>> {
        let list: Value = serde_json::from_str(&self.tern(&["service", "list", "-o", "json"])?)?;
        Ok(list.as_array().cloned().unwrap_or_default())
    }

    /// Waits until `frontend` ("ip:port/PROTO", external scope) is in the
    /// datapath with exactly `backends` (any order); `None` = absent.
    pub fn wait_for_frontend(&self, frontend: &str, backends: Option<&[&str]>) -> Result<()> {
        let mut want: Option<Vec<String>> =
            backends.map(|b| b.iter().map(|s| s.to_string()).collect());
        if let Some(w) = want.as_mut() {
            w.sort();
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let frontends = self.frontends()?;
            let found = frontends
                .iter()
                .find(|f| f["frontend"] == frontend && f["scope"] == "external");
            let have: Option<Vec<String>> = found.map(|f| {
                let mut b: Vec<String> = f["backends"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|b| b.as_str().map(str::to_owned))
                    .collect();
                b.sort();
                b
            });
            if have == want {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "frontend {frontend}: wanted backends {want:?}, the agent has {have:?}\n{}",
                    self.agent_log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Puts this process into the node's pods cgroup until the guard drops:
    /// sockets created meanwhile belong to "pods" and get socket-LB.
    pub fn enter_pods_cgroup(&self) -> Result<CgroupGuard> {
        CgroupGuard::enter(&self.cgroup)
    }
}

/// Membership of this process in a cgroup v2 directory; back to the
/// cgroup it came from on drop.
pub struct CgroupGuard {
    previous: PathBuf,
}

impl CgroupGuard {
    pub fn enter(cgroup: &Path) -> Result<CgroupGuard> {
        let previous = own_cgroup()?;
        std::fs::write(cgroup.join("cgroup.procs"), std::process::id().to_string())
            .with_context(|| format!("joining cgroup {}", cgroup.display()))?;
        Ok(CgroupGuard { previous })
    }
}

impl Drop for CgroupGuard {
    fn drop(&mut self) {
        if let Err(e) = std::fs::write(
            self.previous.join("cgroup.procs"),
            std::process::id().to_string(),
        ) {
            eprintln!("warning: leaving the lab cgroup: {e}");
        }
    }
}

/// The cgroup (v2) this process is in.
fn own_cgroup() -> Result<PathBuf> {
    let own = std::fs::read_to_string("/proc/self/cgroup")?;
    let relative = own
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .unwrap_or("/")
        .trim_start_matches('/')
        .to_owned();
    Ok(cgroup2_root()?.join(relative))
}

/// Where the cgroup v2 hierarchy is mounted; mounted (lab-owned) at
/// /run/tern-lab-cgroup2 when the machine has none.
pub fn cgroup2_root() -> Result<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/self/mounts")?;
    if let Some(dir) = mounts.lines().find_map(|l| {
        let mut f = l.split_whitespace();
        let (_, dir, fs) = (f.next()?, f.next()?, f.next()?);
        (fs == "cgroup2").then(|| PathBuf::from(dir))
    }) {
        return Ok(dir);
    }
    let dir = PathBuf::from("/run/tern-lab-cgroup2");
    std::fs::create_dir_all(&dir)?;
    let status = Command::new("mount")
        .args(["-t", "cgroup2", "none"])
        .arg(&dir)
        .status()?;
    if !status.success() {
        bail!("mounting cgroup2 at {} failed", dir.display());
    }
    Ok(dir)
}

impl Drop for LabNode {
    fn drop(&mut self) {
        drop(self.agent.take());
        let _ = std::fs::remove_dir_all(&self.bpffs_dir);
        let _ = std::fs::remove_dir_all(&self.dir);
        // Empty by now (processes left it); rmdir is how cgroups go away.
        let _ = std::fs::remove_dir(&self.cgroup);
    }
}

pub struct Pod {
    pub ns: Netns,
    pub container_id: String,
    pub ip: Ipv4Addr,
    pub result: Value,
}

/// A Pod object as the API server would show it once running: namespace,
/// name, node, labels, named container ports (name, port, protocol) and
/// its address.
pub fn pod_object(
    namespace: &str,
    name: &str,
    node: &str,
    ip: Ipv4Addr,
    labels: &[(&str, &str)],
    named_ports: &[(&str, u16, &str)],
) -> Value {
    let labels: serde_json::Map<String, Value> = labels
        .iter()
        .map(|(k, v)| (k.to_string(), json!(v)))
        .collect();
    let ports: Vec<Value> = named_ports
        .iter()
        .map(|(name, port, protocol)| json!({"name": name, "containerPort": port, "protocol": protocol}))
        .collect();
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"namespace": namespace, "name": name, "labels": labels},
        "spec": {"nodeName": node, "containers": [{"name": "main", "image": "none", "ports": ports}]},
        "status": {"podIP": ip.to_string(), "podIPs": [{"ip": ip.to_string()}]},
    })
}

/// The NetworkPolicy new users try first (the course example), in
/// `namespace`: backends take TCP 8080 from frontends only, and reach
/// databases on TCP 5432 and anything on port 53.
pub fn course_policy(namespace: &str) -> String {
    format!(
        "apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {{name: backend-netpol, namespace: {namespace}}}
spec:
  podSelector: {{matchLabels: {{app: backend}}}}
  policyTypes: [Ingress, Egress]
  ingress:
  - from: [{{podSelector: {{matchLabels: {{app: frontend}}}}}}]
    ports: [{{protocol: TCP, port: 8080}}]
  egress:
  - to: [{{podSelector: {{matchLabels: {{app: database}}}}}}]
    ports: [{{protocol: TCP, port: 5432}}]
  - to: []
    ports: [{{protocol: TCP, port: 53}}, {{protocol: UDP, port: 53}}]
"
    )
}

/// A Namespace object with its labels.
pub fn namespace_object(name: &str, labels: &[(&str, &str)]) -> Value {
    let mut map: serde_json::Map<String, Value> = labels
        .iter()
        .map(|(k, v)| (k.to_string(), json!(v)))
        .collect();
    map.insert("kubernetes.io/metadata.name".into(), json!(name));
    json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": map}})
}

/// Objects as one `kind: List` manifest (JSON, which the agent reads as
/// YAML's subset).
pub fn list_manifest(items: Vec<Value>) -> String {
    json!({"apiVersion": "v1", "kind": "List", "items": items}).to_string()
}

/// The first IPv4 address of a CNI result, without its prefix.
pub fn pod_ip(result: &Value) -> Result<Ipv4Addr> {
    let address = result["ips"][0]["address"]
        .as_str()
        .with_context(|| format!("no ips[0].address in {result}"))?;
    let ip = address.split('/').next().unwrap_or_default();
    ip.parse().with_context(|| format!("bad address {address}"))
}

#[derive(Debug)]
pub struct CniOutput {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl CniOutput {
    pub fn success_json(&self) -> Result<Value> {
        if self.code != Some(0) {
            bail!(
                "tern-cni failed ({:?}): stdout {} stderr {}",
                self.code,
                self.stdout,
                self.stderr
            );
        }
        serde_json::from_str(&self.stdout)
            .with_context(|| format!("stdout is not JSON: {}", self.stdout))
    }

    /// The `code` of the CNI error object on stdout (the process must fail).
    pub fn error_code(&self) -> Result<u64> {
        if self.code == Some(0) {
            bail!("expected a CNI error, tern-cni succeeded: {}", self.stdout);
        }
        let err: Value = serde_json::from_str(&self.stdout).with_context(|| {
            format!(
                "error is not JSON on stdout: {:?} / {}",
                self.stdout, self.stderr
            )
        })?;
        err["code"]
            .as_u64()
            .with_context(|| format!("no code in {err}"))
    }
}
