//! The commands of `cargo xtask lab`: Kubernetes-like nodes built from
//! network namespaces on one underlay switch, each running the real
//! tern-agent, with pods wired by the real tern-cni.
//!
//! [`up`] leaves the lab running (state in /run/tern-lab/state.json),
//! [`status`] shows it, [`down`] removes every namespace, process, pin and
//! file it made. [`demo`] does up, proves pod networking with real traffic,
//! and down. Every pod runs an echo server: the running binary started again
//! with [`SERVE_COMMAND`], which must call [`serve`].

use std::net::{Ipv4Addr, SocketAddr, TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use crate::lab::{
    Lab, LabNode, OUTSIDE_IP, Outside, Pod, course_policy, list_manifest, pod_object,
};
use crate::netns::{self, ChildGuard, Netns};
use crate::traffic::{EchoServer, tcp_connect, tcp_exchange, tcp_roundtrip, udp_roundtrip};

const STATE_DIR: &str = "/run/tern-lab";
const NODE_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 11);
const POD_CIDR: &str = "10.244.1.0/24";
/// Port of the tiny echo server in every pod.
const PORT: u16 = 8080;

/// The arguments that make the running binary call [`serve`] (followed by
/// `--name <name>`): xtask's hidden `lab serve`.
pub const SERVE_COMMAND: [&str; 2] = ["lab", "serve"];

/// A running lab: the objects that clean up after themselves on drop,
/// in field order (servers inside pods first, the switch last).
struct Running {
    servers: Vec<ChildGuard>,
    /// With the index of their node.
    pods: Vec<(usize, Pod)>,
    nodes: Vec<LabNode>,
    /// The lab's internet (reached through masquerade) and a client
    /// outside the cluster on the underlay; `up` only.
    outside: Option<Outside>,
    external_client: Option<Netns>,
    lab: Lab,
}

/// The client outside the cluster, on the nodes' underlay.
const EXTERNAL_CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 100);

/// The demo's single node with `pods` pods.
fn start(pods: usize) -> Result<Running> {
    let lab = Lab::new()?;
    let node = lab.node("node1", POD_CIDR, NODE_IP)?;
    populate(lab, vec![node], pods)
}

/// `nodes` nodes in `routing_mode`, `pods` pods on each.
fn start_cluster(nodes: u8, pods: usize, routing_mode: &str) -> Result<Running> {
    anyhow::ensure!((1..=8).contains(&nodes), "--nodes must be between 1 and 8");
    anyhow::ensure!(
        matches!(routing_mode, "overlay" | "native"),
        "--routing-mode must be overlay or native"
    );
    let lab = Lab::new()?;
    let nodes = lab.cluster(nodes, routing_mode)?;
    let mut running = populate(lab, nodes, pods)?;
    let outside = running.lab.outside()?;
    running.servers.push(serve_in(&outside.host, "outside")?);
    running.outside = Some(outside);
    running.external_client = Some(running.lab.external_client(EXTERNAL_CLIENT_IP)?);
    Ok(running)
}

/// The lab's echo server (`lab serve`) started in `ns`.
fn serve_in(ns: &Netns, name: &str) -> Result<ChildGuard> {
    let mut cmd = Command::new(std::env::current_exe()?);
    cmd.args(SERVE_COMMAND)
        .args(["--name", name])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    ns.spawn_guarded(cmd)
}

/// `pods` pods on every node, each running the lab's echo server.
fn populate(lab: Lab, nodes: Vec<LabNode>, pods: usize) -> Result<Running> {
    let mut running = Running {
        servers: Vec::new(),
        pods: Vec::new(),
        nodes,
        outside: None,
        external_client: None,
        lab,
    };
    for (n, node) in running.nodes.iter().enumerate() {
        for i in 0..pods {
            let name = format!("pod{i}");
            let pod = node.add_pod(&name)?;
            running
                .servers
                .push(serve_in(&pod.ns, &format!("{}/{name}", node.name))?);
            running.pods.push((n, pod));
        }
    }
    for (_, pod) in &running.pods {
        wait_for_server(pod)?;
    }
    Ok(running)
}

fn wait_for_server(pod: &Pod) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(5);
    let at = SocketAddr::from((pod.ip, PORT));
    while pod
        .ns
        .run(|| std::net::TcpStream::connect_timeout(&at, Duration::from_millis(200)))
        .is_err()
    {
        if Instant::now() > deadline {
            bail!("the echo server in {} did not start", pod.ns.name());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// The echo server of a pod (and of the outside host): TCP and UDP on
/// [`PORT`], until killed.
pub fn serve(name: &str) -> Result<()> {
    let tcp = TcpListener::bind(("0.0.0.0", PORT))?;
    let udp = UdpSocket::bind(("0.0.0.0", PORT))?;
    let _server = EchoServer::serve(tcp, udp, name);
    loop {
        std::thread::park();
    }
}

fn state_file() -> PathBuf {
    Path::new(STATE_DIR).join("state.json")
}

/// Builds `nodes` nodes with `pods` pods each and leaves them running,
/// recorded in the state file for [`status`] and [`down`].
pub fn up(nodes: u8, pods: usize, routing_mode: &str) -> Result<()> {
    if state_file().exists() {
        bail!(
            "a lab is already up ({}); run `cargo xtask lab down` first",
            state_file().display()
        );
    }
    let running = start_cluster(nodes, pods, routing_mode)?;
    let mut netns = vec![running.lab.switch.name().to_owned()];
    netns.extend(running.nodes.iter().map(|n| n.ns.name().to_owned()));
    if let Some(outside) = &running.outside {
        netns.push(outside.router.name().to_owned());
        netns.push(outside.host.name().to_owned());
    }
    netns.extend(running.external_client.iter().map(|c| c.name().to_owned()));
    netns.extend(running.pods.iter().map(|(_, p)| p.ns.name().to_owned()));
    let mut pids: Vec<u32> = running
        .nodes
        .iter()
        .filter_map(LabNode::agent_pid)
        .collect();
    pids.extend(running.servers.iter().map(|s| s.id()));
    let state = json!({
        "netns": netns,
        "pids": pids,
        "routingMode": routing_mode,
        "nodes": running.nodes.iter().map(|node| json!({
            "name": node.name,
            "netns": node.ns.name(),
            "ip": node.node_ip,
            "podCIDR": node.pod_cidr,
            "dir": node.dir,
            "bpffsDir": node.bpffs_dir,
            "socket": node.socket,
            "cgroup": node.cgroup,
            "agentLog": node.agent_log(),
        })).collect::<Vec<_>>(),
        "pods": running.pods.iter().map(|(n, p)| json!({
            "node": running.nodes[*n].name,
            "netns": p.ns.name(),
            "ip": p.ip,
            "containerID": p.container_id,
        })).collect::<Vec<_>>(),
        "tern": running.lab.bins.tern,
        "outside": OUTSIDE_IP,
        "externalClient": running.external_client.as_ref().map(|c| json!({"netns": c.name(), "ip": EXTERNAL_CLIENT_IP})),
    });
    std::fs::create_dir_all(STATE_DIR)?;
    std::fs::write(state_file(), serde_json::to_vec_pretty(&state)?)?;
    println!("lab up: {nodes} node(s), routing mode {routing_mode}, {pods} pod(s) each");
    for (n, node) in running.nodes.iter().enumerate() {
        println!(
            "  node {} ({}, PodCIDR {}), netns {}, agent log {}",
            node.name,
            node.node_ip,
            node.pod_cidr.as_deref().unwrap_or("-"),
            node.ns.name(),
            node.agent_log().display()
        );
        for (_, pod) in running.pods.iter().filter(|(i, _)| *i == n) {
            println!(
                "    pod {} ip {} (echo server on :{PORT})",
                pod.ns.name(),
                pod.ip
            );
        }
    }
    println!(
        "  outside (the lab's internet, reached through masquerade): {OUTSIDE_IP}, echo server on :{PORT}"
    );
    if let Some(client) = &running.external_client {
        println!(
            "  external client on the underlay: {EXTERNAL_CLIENT_IP}, netns {}",
            client.name()
        );
    }
    println!("next: `cargo xtask lab status`, then `cargo xtask lab down`");
    // Leave it all running: `down` removes it from the state file.
    std::mem::forget(running);
    Ok(())
}

fn read_state() -> Result<Value> {
    let bytes = std::fs::read(state_file())
        .with_context(|| format!("no lab is up ({} missing)", state_file().display()))?;
    Ok(serde_json::from_slice(&bytes)?)
}

fn str_of(v: &Value) -> Result<&str> {
    v.as_str()
        .with_context(|| format!("lab state: expected a string, got {v}"))
}

fn tern_cli(state: &Value, node: &Value, args: &[&str]) -> Result<String> {
    let out = Command::new(str_of(&state["tern"])?)
        .arg("--socket")
        .arg(str_of(&node["socket"])?)
        .arg("--bpffs-dir")
        .arg(str_of(&node["bpffsDir"])?)
        .args(args)
        .output()?;
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    Ok(text)
}

/// The running lab: each agent's status, endpoints and tunnel entries, and
/// a probe from every pod to every other.
pub fn status() -> Result<()> {
    let state = read_state()?;
    let nodes = state["nodes"].as_array().cloned().unwrap_or_default();
    for node in &nodes {
        println!("== node {} ==", str_of(&node["name"])?);
        println!("{}", tern_cli(&state, node, &["status"])?);
        println!("{}", tern_cli(&state, node, &["endpoint", "list"])?);
        if nodes.len() > 1 {
            println!("{}", tern_cli(&state, node, &["tunnel", "list"])?);
        }
    }
    let pods: Vec<(String, Netns, Ipv4Addr)> = state["pods"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| {
            Ok((
                str_of(&p["node"])?.to_owned(),
                Netns::existing(str_of(&p["netns"])?)?,
                str_of(&p["ip"])?.parse()?,
            ))
        })
        .collect::<Result<_>>()?;
    println!(
        "pod-to-pod probes (TCP echo on :{PORT}; the answer names the pod and the address it saw), routing mode {}:",
        state["routingMode"].as_str().unwrap_or("overlay")
    );
    for (from_node, from_ns, from_ip) in &pods {
        for (to_node, _, to_ip) in pods.iter().filter(|(_, _, ip)| ip != from_ip) {
            let result = tcp_roundtrip(from_ns, SocketAddr::from((*to_ip, PORT)), "peer?");
            let shown = match result {
                Ok(answer) => format!("ok ({answer})"),
                Err(e) => format!("FAILED: {e:#}"),
            };
            let across = if from_node == to_node {
                "same node"
            } else {
                "cross-node"
            };
            println!("  {from_ip} ({from_node}) -> {to_ip} ({to_node}) [{across}]: {shown}");
        }
    }
    if let Some(outside) = state["outside"].as_str() {
        println!("pod -> outside {outside} (masqueraded: the outside sees the node's address):");
        for (node, ns, ip) in &pods {
            let to = SocketAddr::from((outside.parse::<Ipv4Addr>()?, PORT));
            let shown = match tcp_roundtrip(ns, to, "peer?") {
                Ok(answer) => format!("ok ({answer})"),
                Err(e) => format!("FAILED: {e:#}"),
            };
            println!("  {ip} ({node}): {shown}");
        }
    }
    Ok(())
}

/// Removes everything the state file names: processes, namespaces, pins,
/// directories, cgroups, then the state file.
pub fn down() -> Result<()> {
    let state = match read_state() {
        Ok(state) => state,
        Err(_) => {
            println!("no lab is up");
            return Ok(());
        }
    };
    for pid in state["pids"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_u64)
    {
        stop_own_process(pid as i32);
    }
    for ns in state["netns"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
    {
        let _ = Command::new("ip").args(["netns", "del", ns]).status();
    }
    for node in state["nodes"].as_array().into_iter().flatten() {
        for key in ["dir", "bpffsDir"] {
            if let Some(dir) = node[key].as_str() {
                let _ = std::fs::remove_dir_all(dir);
            }
        }
        // The pods cgroup: empty once its processes are gone, and rmdir is
        // how a cgroup goes away.
        if let Some(cgroup) = node["cgroup"].as_str() {
            let _ = std::fs::remove_dir(cgroup);
        }
    }
    std::fs::remove_file(state_file())?;
    println!("lab down: namespaces, processes, pins, cgroups and state removed");
    Ok(())
}

/// Stops a process the lab started, by PID, after checking that the PID
/// still belongs to one of our binaries (it may have exited and been reused):
/// an agent, or an echo server (this binary, see [`SERVE_COMMAND`]).
fn stop_own_process(pid: i32) {
    let name = std::fs::read_link(format!("/proc/{pid}/exe"))
        .ok()
        .and_then(|exe| binary_name(&exe));
    let own = std::env::current_exe()
        .ok()
        .and_then(|exe| binary_name(&exe));
    let ours = name.is_some() && (name.as_deref() == Some("tern-agent") || name == own);
    if !ours {
        return;
    }
    let pid = nix::unistd::Pid::from_raw(pid);
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
    let deadline = Instant::now() + Duration::from_secs(3);
    while Path::new(&format!("/proc/{pid}")).exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
}

/// The file name of a process's binary as `/proc/<pid>/exe` shows it; one
/// rebuilt since the process started reads `<path> (deleted)`, and is still
/// that binary.
fn binary_name(exe: &Path) -> Option<String> {
    let name = exe.file_name()?.to_str()?;
    Some(name.strip_suffix(" (deleted)").unwrap_or(name).to_owned())
}

/// Every check the demo makes, printed as it is proved.
pub fn demo(pods: usize) -> Result<()> {
    anyhow::ensure!(pods >= 2, "the demo needs at least 2 pods");
    let mut running = start(pods)?;
    let pods: Vec<&Pod> = running.pods.iter().map(|(_, p)| p).collect();
    let node = &mut running.nodes[0];
    node.forward_only_through_ebpf()?;
    println!(
        "lab: node {} ({NODE_IP}, PodCIDR {POD_CIDR}), agent pid {:?}",
        node.ns.name(),
        node.agent_pid()
    );
    for pod in &pods {
        println!("  pod {} got {} from tern-cni ADD", pod.ns.name(), pod.ip);
    }
    println!(
        "node forwarding is OFF (net.ipv4.ip_forward=0): only the eBPF redirect can carry pod-to-pod traffic\n"
    );

    let before = node.counter("redirect_local_pod")?;
    let mut pairs = 0;
    for a in &pods {
        for b in pods.iter().filter(|b| b.ip != a.ip) {
            let to = SocketAddr::from((b.ip, PORT));
            let answer = tcp_roundtrip(&a.ns, to, "hello")?;
            let (udp_answer, from) = udp_roundtrip(&a.ns, to, "ping")?;
            anyhow::ensure!(from == to, "UDP answer came from {from}, not {to}");
            println!(
                "  proved: {} -> {} TCP echo {answer:?}, UDP echo {udp_answer:?} from {from}",
                a.ip, b.ip
            );
            pairs += 1;
        }
    }
    let redirected = node.counter("redirect_local_pod")? - before;
    println!(
        "  proved: {pairs} pod pairs talk over TCP and UDP; from_pod redirected {redirected} packets\n"
    );

    let node_server = EchoServer::start(&node.ns, PORT, "node")?;
    let answer = tcp_roundtrip(&pods[0].ns, SocketAddr::from((NODE_IP, PORT)), "to node")?;
    println!("  proved: pod {} -> node {NODE_IP}: {answer:?}", pods[0].ip);
    let answer = tcp_roundtrip(&node.ns, SocketAddr::from((pods[0].ip, PORT)), "to pod")?;
    println!("  proved: node -> pod {}: {answer:?}\n", pods[0].ip);
    drop(node_server);

    let (a, b) = (pods[0], pods[1]);
    let mut conn = tcp_connect(&a.ns, SocketAddr::from((b.ip, PORT)))?;
    tcp_exchange(&mut conn, "before restart")?;
    node.kill_agent()?;
    let answer = tcp_exchange(&mut conn, "agent killed")?;
    println!(
        "  proved: agent killed (SIGKILL); the open TCP connection {} -> {} still answers {answer:?}",
        a.ip, b.ip
    );
    node.start_agent()?;
    let answer = tcp_exchange(&mut conn, "agent back")?;
    println!(
        "  proved: agent restarted, re-adopted the pinned datapath; same connection answers {answer:?}\n"
    );

    services_demo(&running)?;
    policy_demo(&running)?;
    observe_demo(&running)?;
    let node = &running.nodes[0];
    println!("{}", node.tern(&["status"])?);
    println!("{}", node.tern(&["endpoint", "list"])?);
    for (_, pod) in &running.pods {
        let out = node.del_pod(pod)?;
        anyhow::ensure!(out.code == Some(0), "DEL failed: {out:?}");
    }
    println!(
        "  proved: CNI DEL of every pod; {}",
        node.tern(&["status"])?
            .lines()
            .find(|l| l.starts_with("addresses"))
            .unwrap_or_default()
    );
    drop(running);
    println!("lab removed. Demo passed.");
    Ok(())
}

/// ADD and DEL of the real binary against the real agent, one pod at a time.
pub fn cni_latency(pods: usize) -> Result<()> {
    let lab = Lab::new()?;
    let node = lab.node("node1", "10.244.0.0/16", NODE_IP)?;
    let mut add = Vec::new();
    let mut del = Vec::new();
    for i in 0..pods {
        let ns = Netns::new(&format!("l{i}"))?;
        let id = netns::unique_name("lat");
        let t = Instant::now();
        let out = node.cni("ADD", &id, ns.path(), "1.1.0")?;
        add.push(t.elapsed());
        out.success_json()?;
        let t = Instant::now();
        let out = node.cni("DEL", &id, ns.path(), "1.1.0")?;
        del.push(t.elapsed());
        anyhow::ensure!(out.code == Some(0), "DEL failed: {out:?}");
    }
    let report = |name: &str, v: &mut Vec<Duration>| {
        v.sort();
        let pct = |p: f64| v[((v.len() as f64 * p).ceil() as usize).clamp(1, v.len()) - 1];
        println!(
            "{name}: p50 {:.2} ms, p99 {:.2} ms, min {:.2} ms, max {:.2} ms (n={})",
            pct(0.50).as_secs_f64() * 1e3,
            pct(0.99).as_secs_f64() * 1e3,
            v[0].as_secs_f64() * 1e3,
            v[v.len() - 1].as_secs_f64() * 1e3,
            v.len()
        );
    };
    report("CNI ADD", &mut add);
    report("CNI DEL", &mut del);
    Ok(())
}

/// A ClusterIP, a NodePort (from a client outside the cluster) and a
/// session-affinity Service over the demo pods, with real connections.
fn services_demo(running: &Running) -> Result<()> {
    let node = &running.nodes[0];
    let client = &running.pods[0].1;
    let backends: Vec<&Pod> = running.pods[1..].iter().map(|(_, p)| p).collect();
    let mut endpoints = String::new();
    for pod in &backends {
        endpoints.push_str(&format!(
            "- addresses: [\"{}\"]\n  nodeName: node1\n  conditions: {{ready: true}}\n",
            pod.ip
        ));
    }
    let service = |name: &str, ip: &str, extra: &str| {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: demo}}\nspec:\n  clusterIP: {ip}\n{extra}  ports: [{{name: http, port: 80, targetPort: 8080, nodePort: 30080}}]\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}-1\n  namespace: demo\n  labels: {{kubernetes.io/service-name: {name}}}\naddressType: IPv4\nports: [{{name: http, port: 8080, protocol: TCP}}]\nendpoints:\n{endpoints}"
        )
    };
    node.write_manifest(
        "web.yaml",
        &service("web", "10.96.0.10", "  type: NodePort\n"),
    )?;
    node.write_manifest(
        "sticky.yaml",
        &service("sticky", "10.96.0.11", "  sessionAffinity: ClientIP\n").replace(
            "  ports: [{name: http, port: 80, targetPort: 8080, nodePort: 30080}]",
            "  ports: [{name: http, port: 80, targetPort: 8080}]",
        ),
    )?;
    let want: Vec<String> = backends
        .iter()
        .map(|p| format!("{}:{PORT}", p.ip))
        .collect();
    let want: Vec<&str> = want.iter().map(String::as_str).collect();
    node.wait_for_frontend("10.96.0.10:80/TCP", Some(&want))?;
    node.wait_for_frontend("10.96.0.11:80/TCP", Some(&want))?;
    println!(
        "services from manifests in {}:\n{}",
        node.manifests_dir.display(),
        node.tern(&["service", "list"])?
    );

    let vip = SocketAddr::from(([10, 96, 0, 10], 80));
    let sticky = SocketAddr::from(([10, 96, 0, 11], 80));
    let spread = |to: SocketAddr| -> Result<std::collections::BTreeMap<String, usize>> {
        let mut seen = std::collections::BTreeMap::new();
        for _ in 0..30 {
            let answer = tcp_roundtrip(&client.ns, to, "hi")?;
            *seen
                .entry(answer.trim_end_matches(":hi").to_owned())
                .or_insert(0) += 1;
        }
        Ok(seen)
    };
    {
        let _pods = node.enter_pods_cgroup()?;
        let conn = tcp_connect(&client.ns, vip)?;
        println!(
            "  proved: ClusterIP {vip} from pod {}: peer shown as {} (socket-LB)",
            client.ip,
            conn.peer_addr()?
        );
        println!(
            "  proved: 30 connections to ClusterIP {vip} spread over backends: {:?}",
            spread(vip)?
        );
        let stuck = spread(sticky)?;
        anyhow::ensure!(stuck.len() == 1, "affinity did not stick: {stuck:?}");
        println!(
            "  proved: sessionAffinity ClientIP {sticky}: all 30 connections on one backend: {stuck:?}"
        );
    }
    let outside = running.lab.external_client(Ipv4Addr::new(10, 0, 0, 100))?;
    let answer = tcp_roundtrip(&outside, SocketAddr::from((NODE_IP, 30080)), "peer?")?;
    println!(
        "  proved: NodePort {NODE_IP}:30080 from outside client 10.0.0.100 answered by {answer:?} (backend saw the node address: SNAT)\n"
    );
    Ok(())
}

/// What the datapath reported while the demo ran, as an operator reads it.
fn observe_demo(running: &Running) -> Result<()> {
    let node = &running.nodes[0];
    println!(
        "$ tern observe --last 12\n{}",
        node.tern(&["observe", "--last", "12"])?
    );
    let flows: Vec<Value> = node
        .tern(&["observe", "-o", "json", "--last", "100000"])?
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?;
    let count = |kind: &str, verdict: &str| {
        flows
            .iter()
            .filter(|f| f["type"] == kind && f["verdict"] == verdict)
            .count()
    };
    let (translated, allowed, denied) = (
        count("service", "translated"),
        count("policy", "forwarded"),
        count("policy", "dropped"),
    );
    anyhow::ensure!(
        translated > 0 && allowed > 0 && denied > 0,
        "tern observe misses the demo's flows: {translated} translations, {allowed} allowed, {denied} denied"
    );
    println!(
        "  proved: tern observe shows the demo's {translated} Service translations, {allowed} connections allowed and {denied} denied by policy\n"
    );
    Ok(())
}

/// The NetworkPolicy most people try first, exactly as written: pods
/// named and labelled as a runtime and the API would have them, the
/// policy from the manifest directory, real connections allowed and
/// denied, and what the agent says of it.
fn policy_demo(running: &Running) -> Result<()> {
    let node = &running.nodes[0];
    let mut pods = Vec::new();
    let mut servers = Vec::new();
    let mut objects = Vec::new();
    for (name, ports) in [
        ("frontend", &[8080u16] as &[u16]),
        ("backend", &[8080, 9090]),
        ("database", &[5432, 8080]),
        ("other", &[8080]),
    ] {
        let pod = node.add_k8s_pod("shop", name)?;
        for port in ports {
            servers.push(EchoServer::start(&pod.ns, *port, name)?);
        }
        objects.push(pod_object(
            "shop",
            name,
            &node.name,
            pod.ip,
            &[("app", name)],
            &[],
        ));
        pods.push((name, pod));
    }
    node.write_manifest("shop-pods.json", &list_manifest(objects))?;
    node.write_manifest("shop-policy.yaml", &course_policy("shop"))?;
    let pod = |name: &str| pods.iter().find(|(n, _)| *n == name).map(|(_, p)| p);
    let ip = |name: &str| pod(name).map_or(Ipv4Addr::UNSPECIFIED, |p| p.ip);
    // The policy is in force once the agent explains it so.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let explained = node.tern(&[
            "policy",
            "explain",
            &ip("other").to_string(),
            &ip("backend").to_string(),
            "8080/TCP",
        ])?;
        if explained.starts_with("DENIED") {
            break;
        }
        if Instant::now() > deadline {
            bail!("the policy never took effect: {explained}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    println!("NetworkPolicy shop/backend-netpol (the course example):");
    for (from, to, port, allowed) in [
        ("frontend", "backend", 8080, true),
        ("other", "backend", 8080, false),
        ("frontend", "backend", 9090, false),
        ("backend", "database", 5432, true),
        ("backend", "database", 8080, false),
        ("backend", "other", 8080, false),
    ] {
        let Some(client) = pod(from) else { continue };
        let at = SocketAddr::from((ip(to), port));
        let reached = client
            .ns
            .run(|| std::net::TcpStream::connect_timeout(&at, Duration::from_secs(1)))
            .is_ok();
        anyhow::ensure!(
            reached == allowed,
            "{from} -> {to}:{port}: expected {}",
            if allowed { "allowed" } else { "denied" }
        );
        println!(
            "  proved: {from} -> {to}:{port} {}",
            if allowed {
                "ALLOWED"
            } else {
                "DENIED (dropped)"
            }
        );
    }
    println!("{}", node.tern(&["policy", "list"])?);
    println!(
        "$ tern policy explain {} {} 8080/TCP\n{}",
        ip("frontend"),
        ip("backend"),
        node.tern(&[
            "policy",
            "explain",
            &ip("frontend").to_string(),
            &ip("backend").to_string(),
            "8080/TCP",
        ])?
    );
    drop(servers);
    for (_, pod) in &pods {
        let out = node.del_pod(pod)?;
        anyhow::ensure!(out.code == Some(0), "DEL failed: {out:?}");
    }
    node.remove_manifest("shop-policy.yaml")?;
    node.remove_manifest("shop-pods.json")?;
    Ok(())
}

/// Loads `services` Services of `backends` backends into one agent and
/// reports the sync time, the agent's memory and the maps' memory.
pub fn scale(services: usize, backends: usize) -> Result<()> {
    anyhow::ensure!(
        services <= 1 << 20 && backends <= 255,
        "at most 2^20 services of 255 backends"
    );
    let lab = Lab::new()?;
    let node = lab.node("node1", POD_CIDR, NODE_IP)?;
    let pid = node.agent_pid().context("agent pid")?;
    let rss_before = rss_kib(pid)?;
    let maps_before = map_memlock_kib(pid)?;
    let list = scale_manifest(services, backends)?;
    println!(
        "manifest: {services} services x {backends} backends, {:.1} MiB of JSON",
        list.len() as f64 / (1 << 20) as f64
    );
    let tmp = node.manifests_dir.join(".scale.json.tmp");
    std::fs::write(&tmp, &list)?;
    let started = Instant::now();
    std::fs::rename(&tmp, node.manifests_dir.join("scale.json"))?;
    loop {
        // The agent answers once the sync that holds its state is done.
        let Ok(status) = node.agent_request(&json!({"op": "status"})) else {
            continue;
        };
        if status["frontends"].as_u64() == Some(services as u64) {
            let sync = &status["last_sync"];
            println!(
                "synced in {:.2} s (file written -> datapath updated): {} frontends, {} backends, {} map writes, {} errors",
                started.elapsed().as_secs_f64(),
                status["frontends"],
                status["backends"],
                sync["writes"],
                sync["errors"]
            );
            break;
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(600),
            "not synced after 10 minutes:\n{}",
            node.agent_log_tail()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // The sync hands parsing's memory back right after it reports.
    std::thread::sleep(Duration::from_secs(2));
    let rss = rss_kib(pid)?;
    let maps = map_memlock_kib(pid)?;
    println!(
        "agent RSS: {:.1} MiB before, {:.1} MiB after",
        rss_before as f64 / 1024.0,
        rss as f64 / 1024.0
    );
    println!(
        "map memory (memlock of the agent's maps): {:.1} MiB before, {:.1} MiB after",
        maps_before as f64 / 1024.0,
        maps as f64 / 1024.0
    );
    Ok(())
}

/// Nodes the scale manifest's pods run on.
const SCALE_NODES: usize = 100;

/// One JSON List: Services in 10.96.0.0/12 (from 10.100.0.0), each with
/// one EndpointSlice of distinct backends in 10.128.0.0/9. Endpoints are
/// as the EndpointSlice controller writes them (conditions, node, zone, a
/// reference to the Pod), so that the agent keeps and parses what it
/// would in a cluster.
pub fn scale_manifest(services: usize, backends: usize) -> Result<Vec<u8>> {
    let mut items = Vec::with_capacity(services * 2);
    for i in 0..services {
        let vip = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 100, 0, 0)) + i as u32);
        let name = format!("s{i}");
        items.push(json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": "scale"},
            "spec": {"clusterIP": vip.to_string(), "ports": [{"name": "http", "port": 80, "targetPort": 8080}]}}));
        let endpoints: Vec<Value> = (0..backends)
            .map(|j| {
                let ip = Ipv4Addr::from(
                    u32::from(Ipv4Addr::new(10, 128, 0, 0)) + (i * backends + j) as u32,
                );
                let pod = i * backends + j;
                let node = pod % SCALE_NODES;
                json!({"addresses": [ip.to_string()],
                    "conditions": {"ready": true, "serving": true, "terminating": false},
                    "nodeName": format!("worker-{node:03}"), "zone": format!("zone-{}", node % 3),
                    "targetRef": {"kind": "Pod", "namespace": "scale", "name": format!("{name}-7d9f8c6b5-{pod:05x}"),
                        "uid": format!("6f1c2a4e-0000-4000-8000-{pod:012x}")}})
            })
            .collect();
        items.push(json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": format!("{name}-1"), "namespace": "scale", "labels": {"kubernetes.io/service-name": name}},
            "addressType": "IPv4", "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}], "endpoints": endpoints}));
    }
    Ok(serde_json::to_vec(
        &json!({"apiVersion": "v1", "kind": "List", "items": items}),
    )?)
}

pub fn rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .context("no VmRSS")
}

/// Sum of the `memlock` the kernel charges for each map the process holds.
pub fn map_memlock_kib(pid: u32) -> Result<u64> {
    let mut seen = std::collections::BTreeSet::new();
    let mut total = 0;
    for entry in std::fs::read_dir(format!("/proc/{pid}/fdinfo"))? {
        let info = std::fs::read_to_string(entry?.path()).unwrap_or_default();
        let field = |name: &str| {
            info.lines()
                .find_map(|l| l.strip_prefix(name))
                .map(|v| v.trim().to_owned())
        };
        if let (Some(id), Some(memlock)) = (field("map_id:"), field("memlock:"))
            && seen.insert(id)
        {
            total += memlock.parse::<u64>().unwrap_or(0);
        }
    }
    Ok(total / 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rebuilt_binary_keeps_its_name() {
        let name = |path: &str| binary_name(Path::new(path));
        assert_eq!(
            name("/w/target/release/tern-agent").as_deref(),
            Some("tern-agent")
        );
        assert_eq!(
            name("/w/target/release/tern-agent (deleted)").as_deref(),
            Some("tern-agent")
        );
        assert_eq!(name("/usr/bin/nginx").as_deref(), Some("nginx"));
    }
}
