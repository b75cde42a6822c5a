//! `tern`, the operator CLI: asks the agent over its socket, and falls back
//! to the pinned maps when the agent is down (the datapath still runs then).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::bail;
use clap::{Parser, Subcommand, ValueEnum};
use serde_json::json;
use tern_api::{Request, Response};
use tern_podnet::format_mac;

mod observe;

use crate::datapath::{Counters, Endpoints, attached_pods};
use crate::table;

#[derive(Debug, Parser)]
#[command(
    name = "tern",
    version,
    about = "Inspect a node's Tern agent and datapath"
)]
pub struct Cli {
    /// The agent's CNI API socket.
    #[arg(long, global = true, default_value = tern_api::DEFAULT_SOCKET)]
    pub socket: PathBuf,
    /// Where the agent pins its maps (read when the agent is down).
    #[arg(long, global = true, default_value = crate::config::DEFAULT_BPFFS_DIR)]
    pub bpffs_dir: PathBuf,
    /// Output format.
    #[arg(short = 'o', long, global = true, value_enum, default_value_t = Output::Table)]
    pub output: Output,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Table,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// The agent's state: PodCIDR, addresses, endpoints, datapath counters.
    Status,
    /// Pod endpoints on this node.
    Endpoint {
        #[command(subcommand)]
        command: EndpointCommand,
    },
    /// Service frontends in the datapath.
    Service {
        #[command(subcommand)]
        command: ServiceCommand,
    },
    /// Connection tracking of the per-packet Service path (from the pinned map).
    Ct {
        #[command(subcommand)]
        command: CtCommand,
    },
    /// NetworkPolicy as this node enforces it.
    Policy {
        #[command(subcommand)]
        command: PolicyCommand,
    },
    /// Remote PodCIDRs and their nodes: the TUNNEL map (read from its pin).
    Tunnel {
        #[command(subcommand)]
        command: TunnelCommand,
    },
    /// Flows the datapath reported: drops with their reason, policy
    /// verdicts, Service translations (and trace events when enabled).
    Observe(observe::ObserveArgs),
    /// Install tern-cni and the network configuration list on this node
    /// (the DaemonSet's init container runs it).
    InstallCni(crate::install::InstallCniArgs),
}

#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// The policies with the pods of this node they select, and each pod's
    /// identity and isolation.
    List,
    /// Whether a new connection SRC -> DST on PORT/PROTO is allowed, and by
    /// which policy and rule (as the compiled datapath state decides).
    Explain {
        /// Source pod address.
        src: std::net::Ipv4Addr,
        /// Destination address (after Service translation: a pod).
        dst: std::net::Ipv4Addr,
        /// e.g. 8080/TCP, 53/UDP (TCP when the protocol is left out).
        port: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum TunnelCommand {
    /// Each remote PodCIDR and the node address its packets are tunnelled to.
    List,
}

#[derive(Debug, Subcommand)]
pub enum CtCommand {
    /// Live entries: each translated flow has an original and a reply entry.
    List,
}

#[derive(Debug, Subcommand)]
pub enum ServiceCommand {
    /// Each frontend (VIP:port/proto), its kind and flags, and its backends.
    List,
}

#[derive(Debug, Subcommand)]
pub enum EndpointCommand {
    /// List the endpoints with their datapath state.
    List,
}

pub fn run(cli: Cli) -> anyhow::Result<String> {
    match cli.command {
        Command::Status => status(&cli),
        Command::Endpoint {
            command: EndpointCommand::List,
        } => endpoint_list(&cli),
        Command::Service {
            command: ServiceCommand::List,
        } => service_list(&cli),
        Command::Ct {
            command: CtCommand::List,
        } => ct_list(&cli),
        Command::Tunnel {
            command: TunnelCommand::List,
        } => tunnel_list(&cli),
        Command::Policy {
            command: PolicyCommand::List,
        } => policy_list(&cli),
        Command::Policy {
            command: PolicyCommand::Explain { src, dst, ref port },
        } => policy_explain(&cli, src, dst, port),
        Command::Observe(ref args) => observe::run(&cli, args),
        Command::InstallCni(args) => crate::install::run(&args),
    }
}

fn ask(cli: &Cli, request: &Request) -> anyhow::Result<Response> {
    Ok(tern_api::call(
        &cli.socket,
        request,
        Duration::from_secs(5),
    )?)
}

fn status(cli: &Cli) -> anyhow::Result<String> {
    let counters = Counters::open_pinned(&cli.bpffs_dir).and_then(|c| c.all());
    let agent = ask(cli, &Request::Status);
    if cli.output == Output::Json {
        let agent = match &agent {
            Ok(Response::Status(s)) => serde_json::to_value(s)?,
            Ok(other) => json!({ "error": format!("{other:?}") }),
            Err(e) => json!({ "error": e.to_string() }),
        };
        let counters: serde_json::Map<String, serde_json::Value> = counters
            .map(|c| {
                c.iter()
                    .map(|(r, n)| (r.name().to_owned(), json!(n)))
                    .collect()
            })
            .unwrap_or_default();
        return Ok(serde_json::to_string_pretty(
            &json!({ "agent": agent, "datapath": counters }),
        )?);
    }
    let mut rows = Vec::new();
    match agent {
        Ok(Response::Status(s)) => {
            let used = format!("{}/{}", s.allocated, s.capacity);
            let source = match (s.synced, s.last_sync_age_s) {
                (true, Some(_)) => format!("{} (synced)", s.source),
                (true, None) => s.source.clone(),
                (false, _) => format!("{} (waiting for the first full sync)", s.source),
            };
            rows.push(vec![
                "agent".into(),
                if s.ready {
                    "ready".into()
                } else {
                    format!("not ready: {}", s.reason.unwrap_or_default())
                },
            ]);
            rows.push(vec!["node".into(), s.node_name]);
            rows.push(vec![
                "podCIDR".into(),
                s.pod_cidr.unwrap_or_else(|| "<none>".into()),
            ]);
            rows.push(vec!["addresses in use".into(), used]);
            rows.push(vec!["endpoints".into(), s.endpoints.to_string()]);
            rows.push(vec!["pod MTU".into(), s.mtu.to_string()]);
            rows.push(vec!["bpffs".into(), s.bpffs_dir]);
            rows.push(vec!["source".into(), source]);
            rows.push(vec!["services".into(), s.services.to_string()]);
            if let (Some(pods), Some(orphans)) = (s.pods, s.endpoints_without_pod) {
                rows.push(vec![
                    "pods (endpoints without a pod)".into(),
                    format!("{pods} ({orphans})"),
                ]);
            }
            rows.push(vec!["services path".into(), s.service_path.clone()]);
            rows.push(vec!["routing mode".into(), s.routing_mode.clone()]);
            rows.push(vec![
                "service frontends / backends".into(),
                format!("{} / {}", s.frontends, s.backends),
            ]);
            rows.push(vec![
                "last service sync".into(),
                match s.last_sync_age_s {
                    Some(age) => format!(
                        "#{} {age} s ago: {} writes, {} deletes, {} errors",
                        s.last_sync.syncs,
                        s.last_sync.writes,
                        s.last_sync.deletes,
                        s.last_sync.errors
                    ),
                    None => "not yet".into(),
                },
            ]);
            for (map, n) in &s.last_sync.refused {
                rows.push(vec![
                    format!("map {map} FULL"),
                    format!(
                        "{n} service entries left out by the last sync (raise --map-size {map}=...)"
                    ),
                ]);
            }
            rows.push(vec![
                "CNI requests (failed)".into(),
                format!("{} ({})", s.requests, s.requests_failed),
            ]);
            let p = &s.policy;
            rows.push(vec![
                "network policies / isolated pods".into(),
                format!(
                    "{} / {} ({} map entries)",
                    p.policies, p.isolated_pods, p.entries
                ),
            ]);
            for failed in &p.failed {
                rows.push(vec!["policy FAILED CLOSED".into(), failed.clone()]);
            }
            for problem in &p.problems {
                rows.push(vec!["policy problem".into(), problem.clone()]);
            }
        }
        Ok(other) => rows.push(vec!["agent".into(), format!("unexpected answer {other:?}")]),
        Err(e) => rows.push(vec!["agent".into(), format!("unreachable: {e}")]),
    }
    match counters {
        Ok(counters) => {
            for (reason, n) in counters {
                rows.push(vec![format!("packets {}", reason.name()), n.to_string()]);
            }
        }
        Err(e) => rows.push(vec!["datapath".into(), format!("{e:#}")]),
    }
    Ok(table::render(&["FIELD", "VALUE"], &rows))
}

fn policy_list(cli: &Cli) -> anyhow::Result<String> {
    let (policies, endpoints) = match ask(cli, &Request::ListPolicies)? {
        Response::Policies {
            policies,
            endpoints,
        } => (policies, endpoints),
        Response::Error { message, .. } => bail!("the agent refused: {message}"),
        other => bail!("unexpected answer from the agent: {other:?}"),
    };
    let mut policies = policies;
    if let Ok(counters) = Counters::open_pinned(&cli.bpffs_dir) {
        for p in &mut policies {
            (p.allowed, p.denied) = counters.policy_verdicts(p.number);
        }
    }
    if cli.output == Output::Json {
        return Ok(serde_json::to_string_pretty(
            &json!({ "policies": policies, "endpoints": endpoints }),
        )?);
    }
    let rows: Vec<Vec<String>> = policies
        .iter()
        .map(|p| {
            let selects: Vec<String> = p.selects.iter().map(ToString::to_string).collect();
            vec![
                p.name.clone(),
                p.number.to_string(),
                if selects.is_empty() {
                    "-".into()
                } else {
                    selects.join(" ")
                },
                p.allowed.to_string(),
                p.denied.to_string(),
                p.error
                    .clone()
                    .map_or_else(|| "-".into(), |e| format!("FAILS CLOSED: {e}")),
            ]
        })
        .collect();
    let mut out = table::render(
        &[
            "POLICY",
            "NUMBER",
            "SELECTS (THIS NODE)",
            "ALLOWED",
            "PROBLEM",
        ],
        &rows,
    );
    out.push('\n');
    out.push_str(&endpoint_policy_table(&endpoints));
    Ok(out)
}

fn endpoint_policy_table(endpoints: &[tern_api::EndpointPolicyListing]) -> String {
    let rows: Vec<Vec<String>> = endpoints
        .iter()
        .map(|e| {
            vec![
                e.ip.to_string(),
                e.pod.clone().unwrap_or_else(|| "-".into()),
                e.identity.map_or_else(|| "-".into(), |i| i.to_string()),
                e.ingress.clone(),
                e.egress.clone(),
                e.entries.to_string(),
            ]
        })
        .collect();
    table::render(
        &["IP", "POD", "IDENTITY", "INGRESS", "EGRESS", "ENTRIES"],
        &rows,
    )
}

fn policy_explain(
    cli: &Cli,
    src: std::net::Ipv4Addr,
    dst: std::net::Ipv4Addr,
    port: &str,
) -> anyhow::Result<String> {
    let (number, protocol) = port.split_once('/').unwrap_or((port, "TCP"));
    let port: u16 = number
        .parse()
        .map_err(|_| anyhow::anyhow!("{number:?} is not a port number"))?;
    let protocol = match protocol.to_ascii_uppercase().as_str() {
        "TCP" => 6,
        "UDP" => 17,
        other => bail!("protocol {other:?}: TCP or UDP"),
    };
    let request = Request::ExplainPolicy {
        from: src,
        to: dst,
        protocol,
        port,
    };
    match ask(cli, &request)? {
        Response::Explained { allowed, lines } => {
            if cli.output == Output::Json {
                return Ok(serde_json::to_string_pretty(
                    &json!({ "allowed": allowed, "lines": lines }),
                )?);
            }
            let verdict = if allowed { "ALLOWED" } else { "DENIED" };
            Ok(format!("{verdict}\n{}\n", lines.join("\n")))
        }
        Response::Error { message, .. } => bail!("the agent refused: {message}"),
        other => bail!("unexpected answer from the agent: {other:?}"),
    }
}

fn endpoint_list(cli: &Cli) -> anyhow::Result<String> {
    let headers = [
        "IP",
        "CONTAINER",
        "IFNAME",
        "HOST-IF",
        "IFINDEX",
        "MAC",
        "DATAPATH",
    ];
    match ask(cli, &Request::ListEndpoints) {
        Ok(Response::Endpoints { endpoints }) => {
            if cli.output == Output::Json {
                return Ok(serde_json::to_string_pretty(&endpoints)?);
            }
            let mut rows: Vec<Vec<String>> = endpoints
                .iter()
                .map(|s| {
                    let e = &s.endpoint;
                    vec![
                        e.ip.to_string(),
                        short_id(&e.attachment.container_id),
                        e.attachment.ifname.clone(),
                        e.host_ifname.clone(),
                        s.host_ifindex.to_string(),
                        format_mac(&e.mac),
                        if s.attached {
                            "attached".into()
                        } else {
                            "NOT ATTACHED".into()
                        },
                    ]
                })
                .collect();
            // Each pod's identity and isolation, from the policy pipeline.
            let policy = match ask(cli, &Request::ListPolicies) {
                Ok(Response::Policies { endpoints, .. }) => endpoints,
                _ => Vec::new(),
            };
            for (row, s) in rows.iter_mut().zip(&endpoints) {
                let p = policy.iter().find(|p| p.ip == s.endpoint.ip);
                row.push(
                    p.and_then(|p| p.identity)
                        .map_or_else(|| "-".into(), |i| i.to_string()),
                );
                row.push(p.map_or_else(
                    || "-".into(),
                    |p| format!("in:{} out:{}", p.ingress, p.egress),
                ));
            }
            let mut headers = headers.to_vec();
            headers.extend(["IDENTITY", "POLICY"]);
            Ok(table::render(&headers, &rows))
        }
        Ok(Response::Error { message, .. }) => bail!("the agent refused: {message}"),
        Ok(other) => bail!("unexpected answer from the agent: {other:?}"),
        Err(agent_error) => {
            // The agent is down; the pinned datapath still shows what it serves.
            let pinned = Endpoints::open_pinned(&cli.bpffs_dir)
                .map_err(|e| anyhow::anyhow!("{agent_error}; and {e:#}"))?;
            let attached = attached_pods(&cli.bpffs_dir).unwrap_or_default();
            let entries = pinned.list()?;
            if cli.output == Output::Json {
                let list: Vec<_> = entries
                    .iter()
                    .map(|(ip, i)| {
                        json!({"ip": ip, "ifindex": i.ifindex, "mac": format_mac(&i.pod_mac)})
                    })
                    .collect();
                return Ok(serde_json::to_string_pretty(
                    &json!({"source": "pinned maps", "endpoints": list}),
                )?);
            }
            let rows: Vec<Vec<String>> = entries
                .iter()
                .map(|(ip, i)| {
                    vec![
                        ip.to_string(),
                        "-".into(),
                        "-".into(),
                        "-".into(),
                        i.ifindex.to_string(),
                        format_mac(&i.pod_mac),
                        format!("pinned ({} links)", attached.len()),
                    ]
                })
                .collect();
            Ok(format!(
                "agent unreachable ({agent_error}); showing the pinned ENDPOINTS map\n{}",
                table::render(&headers, &rows)
            ))
        }
    }
}

fn short_id(id: &str) -> String {
    id.chars().take(12).collect()
}

fn service_list(cli: &Cli) -> anyhow::Result<String> {
    match ask(cli, &Request::ListServices)? {
        Response::Services { mut frontends } => {
            add_connection_counts(&cli.bpffs_dir, &mut frontends);
            if cli.output == Output::Json {
                return Ok(serde_json::to_string_pretty(&frontends)?);
            }
            let rows: Vec<Vec<String>> = frontends
                .iter()
                .map(|f| {
                    vec![
                        f.frontend.clone(),
                        f.kind.clone(),
                        f.scope.clone(),
                        format!(
                            "{} ({})",
                            f.service,
                            if f.port_name.is_empty() {
                                "-"
                            } else {
                                &f.port_name
                            }
                        ),
                        if f.flags.is_empty() {
                            "-".into()
                        } else {
                            f.flags.join(",")
                        },
                        if f.backends.is_empty() {
                            "<none: refused>".into()
                        } else {
                            backends_column(f)
                        },
                    ]
                })
                .collect();
            Ok(table::render(
                &[
                    "FRONTEND",
                    "KIND",
                    "SCOPE",
                    "SERVICE (PORT)",
                    "FLAGS",
                    "BACKENDS",
                ],
                &rows,
            ))
        }
        Response::Error { message, .. } => bail!("the agent refused: {message}"),
        other => bail!("unexpected answer from the agent: {other:?}"),
    }
}

/// Backends as the table shows them: "ip:port", with " w=N" for a weight
/// other than 1 and " conns=N" where the scheduler counts connections.
fn backends_column(f: &tern_api::FrontendStatus) -> String {
    f.backends
        .iter()
        .enumerate()
        .map(|(i, b)| {
            let mut shown = b.clone();
            if let Some(w) = f.weights.get(i).filter(|w| **w != 1) {
                shown.push_str(&format!(" w={w}"));
            }
            if let Some(c) = f.connections.get(i) {
                shown.push_str(&format!(" conns={c}"));
            }
            shown
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Each least-connection frontend's open connections per backend, as the
/// datapath counts them (read from the pinned CONNECTIONS and BACKENDS
/// maps; left empty when they cannot be read).
fn add_connection_counts(bpffs_dir: &std::path::Path, frontends: &mut [tern_api::FrontendStatus]) {
    use crate::datapath::maps::open_pinned;
    let Ok(counts) = crate::datapath::connections::read_pinned(bpffs_dir) else {
        return;
    };
    let Ok(backends) = open_pinned::<aya::maps::HashMap<_, u32, tern_common::Backend>>(
        bpffs_dir,
        tern_common::maps::BACKENDS,
    ) else {
        return;
    };
    // "ip:port/PROTO" -> open connections.
    let by_address: std::collections::BTreeMap<String, u32> = backends
        .iter()
        .filter_map(Result::ok)
        .map(|(id, b)| {
            let ip = crate::datapath::maps::ip_from_key(b.addr);
            let proto = crate::model::Protocol::name_of(b.proto);
            (
                format!("{ip}:{}/{proto}", u16::from_be(b.port)),
                counts.get(&id).copied().unwrap_or(0),
            )
        })
        .collect();
    for f in frontends.iter_mut() {
        let counted = crate::model::LbAlgorithm::from_name(&f.algorithm)
            .is_some_and(|a| tern_common::lb_algorithm::counts_connections(a.code()));
        let Some(proto) = f.frontend.rsplit('/').next().map(str::to_owned) else {
            continue;
        };
        if counted {
            f.connections = f
                .backends
                .iter()
                .map(|b| {
                    by_address
                        .get(&format!("{b}/{proto}"))
                        .copied()
                        .unwrap_or(0)
                })
                .collect();
        }
    }
}

fn ct_list(cli: &Cli) -> anyhow::Result<String> {
    let ct = crate::datapath::conntrack::open_pinned(&cli.bpffs_dir)?;
    let entries = crate::datapath::conntrack::list(&ct)?;
    if cli.output == Output::Json {
        return Ok(serde_json::to_string_pretty(&entries)?);
    }
    let rows: Vec<Vec<String>> = entries
        .iter()
        .map(|e| {
            vec![
                e.proto.into(),
                e.from.clone(),
                e.to.clone(),
                e.becomes.clone(),
                e.direction.into(),
                e.state.into(),
                format!("{}s", e.expires_in),
            ]
        })
        .collect();
    Ok(table::render(
        &[
            "PROTO",
            "SOURCE",
            "DESTINATION",
            "TRANSLATED TO",
            "DIRECTION",
            "STATE",
            "EXPIRES",
        ],
        &rows,
    ))
}

fn tunnel_list(cli: &Cli) -> anyhow::Result<String> {
    let tunnel = crate::datapath::prefixes::PrefixMap::<tern_common::TunnelEndpoint>::open_pinned(
        &cli.bpffs_dir,
        tern_common::maps::TUNNEL,
    )?;
    let entries: std::collections::BTreeMap<_, _> = tunnel
        .entries()?
        .into_iter()
        .map(|(cidr, node)| (cidr, crate::datapath::ip_from_key(node.node_addr)))
        .collect();
    if cli.output == Output::Json {
        let list: Vec<_> = entries
            .iter()
            .map(|(cidr, node)| json!({"podCIDR": cidr.to_string(), "node": node.to_string()}))
            .collect();
        return Ok(serde_json::to_string_pretty(&list)?);
    }
    let rows: Vec<Vec<String>> = entries
        .iter()
        .map(|(cidr, node)| vec![cidr.to_string(), node.to_string()])
        .collect();
    Ok(table::render(&["POD CIDR", "NODE"], &rows))
}
