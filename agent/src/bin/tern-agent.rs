//! tern-agent: the per-node daemon.

use std::sync::Arc;

use clap::Parser;
use tern_agent::compiler::lb::NodeContext;
use tern_agent::config::{AgentArgs, AgentConfig, RoutingMode};
use tern_agent::datapath::conntrack::CtMap;
use tern_agent::flows::FlowHub;
use tern_agent::flows::names::{NameSources, Names};
use tern_agent::metrics::Metrics;
use tern_agent::policy::PolicyPipeline;
use tern_agent::routing::Routing;
use tern_agent::services::ServicePipeline;
use tern_agent::startup::{self, OverlayDevice};
use tern_agent::status::{NodeFacts, SourceStatus, StatusView};
use tern_agent::{cni_api, health, host, service_health, sync};
use tokio::sync::watch;
use tracing::{error, info};

/// glibc gives each thread that allocates its own arena (up to 8 per CPU):
/// the agent's short-lived threads (blocking syncs, a netlink thread per
/// CNI request) left free memory spread over many arenas, and RSS grew
/// ~107 KiB/min under pod churn with nothing leaked. One arena keeps it
/// flat (churn soak: 20.7 MiB from 46 s to 230 s of a lifetime). The agent
/// allocates little in parallel; two arenas still grew (~125 KiB/min).
/// The control-plane bench hints at a cost: an endpoint change among
/// 10 000 Services through the API watch took ~15 ms p50 with one arena,
/// ~9 ms with 2 or 16 (two noisy runs each; see issue 20's note).
/// `MALLOC_ARENA_MAX` in the environment still wins.
fn one_malloc_arena() {
    #[cfg(target_env = "gnu")]
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        // SAFETY: only tunes malloc; called before any other thread exists.
        unsafe { libc::mallopt(libc::M_ARENA_MAX, 1) };
    }
}

fn main() -> std::process::ExitCode {
    one_malloc_arena();
    tracing_subscriber::fmt()
        .with_env_filter(
            // kube's own crates log every failed request (an API server
            // restart: ~400 lines); each failure also reaches the agent's
            // watcher, which logs it once per kind (sources::api_errors).
            // TERN_LOG=info,kube_client=debug brings them back.
            tracing_subscriber::EnvFilter::try_from_env("TERN_LOG")
                .unwrap_or_else(|_| "info,kube_client=off,kube_runtime=off".into()),
        )
        .with_writer(std::io::stderr)
        // Colour codes only for a person at a terminal, not in log files.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match run(AgentArgs::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            error!("{e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(args: AgentArgs) -> anyhow::Result<()> {
    let config = AgentConfig::from_args(args)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let mut node_ips = config.node_ips.clone();
    if node_ips.is_empty() {
        node_ips = runtime.block_on(host::node_ipv4_addresses())?;
    }
    let mut devices = config.devices.clone();
    if devices.is_empty() {
        devices = runtime.block_on(host::devices_with(&node_ips))?;
    }
    // What the node's own path out carries: the underlay device's MTU.
    let underlay_mtu = match devices.first() {
        Some(device) => runtime.block_on(host::link_mtu(device))?,
        None => None,
    };
    let underlay_mtu = match underlay_mtu {
        Some(mtu) => mtu,
        None => runtime
            .block_on(host::default_route_mtu())?
            .unwrap_or(host::FALLBACK_MTU),
    };
    host::enable_ip_forwarding()?;
    let overlay = match config.routing_mode {
        RoutingMode::Overlay => {
            let mtu = underlay_mtu - host::VXLAN_OVERHEAD;
            let node_ip = *node_ips.first().ok_or_else(|| {
                anyhow::anyhow!("overlay mode needs an IPv4 address of the node's own")
            })?;
            let ifindex = runtime.block_on(host::ensure_vxlan(
                host::OVERLAY_DEVICE,
                config.tunnel_port,
                mtu,
                node_ip,
            ))?;
            Some(OverlayDevice {
                name: host::OVERLAY_DEVICE.into(),
                ifindex,
                mtu,
            })
        }
        RoutingMode::Native => None,
    };
    // Pods fit inside the overlay's packets, unless configured.
    let mtu = config
        .mtu
        .unwrap_or(overlay.as_ref().map_or(underlay_mtu, |o| o.mtu));
    let started = startup::start(&config, mtu, &node_ips, &devices, overlay.as_ref())?;
    let routing = Routing::new(
        &config,
        &node_ips,
        overlay.as_ref().map(|o| o.ifindex),
        started.tunnel,
        started.non_masquerade,
    );
    // 0.0.0.0 stands for "any local address": the NodePort entry that
    // local binds are checked against.
    let underlay_ips = node_ips.clone();
    node_ips.insert(0, std::net::Ipv4Addr::UNSPECIFIED);
    let context = NodeContext {
        node_name: config.node_name.clone(),
        node_ips,
        maglev_table_size: config.maglev_table_size,
        default_algorithm: config.lb_algorithm,
        service_cidr: Some(config.service_cidr),
    };
    info!(
        node = %config.node_name,
        pod_cidr = ?config.pod_cidr.map(|c| c.to_string()),
        routing_mode = config.routing_mode.name(),
        mtu,
        socket = %config.socket.display(),
        source = %config.source.describe(),
        health = %config.health_address,
        bpffs = %config.bpffs_dir.display(),
        "tern-agent ready"
    );
    let metrics = Arc::new(Metrics::default());
    let services = ServicePipeline::adopt(context, started.service_maps)?.counted(metrics.clone());
    let policy = PolicyPipeline::adopt(started.policy_maps)?;
    let endpoints = Arc::new(started.endpoints);
    let source_status = watch::Sender::new(SourceStatus::default());
    let cluster = watch::Sender::new(tern_agent::model::Cluster::default());
    let counters = Arc::new(started.counters);
    let (flow_writer, flows) = FlowHub::new(config.events.flows_kept, counters.clone());
    let names = Names::new(
        &config.node_name,
        NameSources {
            cluster: cluster.subscribe(),
            endpoints: endpoints.subscribe(),
            services: services.subscribe(),
            policies: policy.subscribe_numbers(),
        },
    );
    let status = StatusView {
        facts: Arc::new(NodeFacts {
            node_name: config.node_name.clone(),
            routing_mode: config.routing_mode.name(),
            mtu,
            bpffs_dir: config.bpffs_dir.clone(),
            socket_lb: config.socket_lb,
            source: config.source.describe(),
            source_syncs: config.source.syncs(),
        }),
        endpoints: endpoints.subscribe(),
        services: services.subscribe(),
        policy: policy.subscribe(),
        source: source_status.subscribe(),
        metrics: metrics.clone(),
    };
    let handlers = cni_api::Handlers {
        endpoints: endpoints.clone(),
        status: status.clone(),
        flows,
    };
    let tables = vec![
        (tern_common::maps::CT, started.ct),
        (tern_common::maps::NAT, started.nat),
    ];
    runtime.block_on(async {
        let health = health::bind(config.health_address).await?;
        let source =
            sync::start_source(&config.source, &config.node_name, metrics.clone()).await?;
        tokio::spawn(health::serve(health, status.clone(), counters));
        tokio::spawn(conntrack_gc(tables, metrics.clone(), config.bpffs_dir.clone()));
        tokio::spawn(service_health::run(
            cluster.subscribe(),
            config.node_name.clone(),
            underlay_ips.clone(),
            status.clone(),
        ));
        if config.proxy_healthz_port != 0 {
            let addresses = underlay_ips
                .iter()
                .map(|ip| std::net::SocketAddr::from((*ip, config.proxy_healthz_port)))
                .collect();
            service_health::serve_proxy_health(
                addresses,
                config.node_name.clone(),
                cluster.subscribe(),
                status.clone(),
            )
            .await;
        }
        tokio::spawn(tern_agent::flows::run(
            started.events,
            names,
            flow_writer,
            metrics.clone(),
            config.node_name.clone(),
        ));
        tokio::spawn(tern_agent::qdiscs::watch(endpoints.clone()));
        let pipelines = sync::Pipelines {
            endpoints,
            routing,
            services,
            policy,
            source_status,
            cluster,
        };
        tokio::spawn(sync::run(
            source,
            pipelines,
            metrics.clone(),
            config.source.lists_pods(),
        ));
        let listener = cni_api::bind(&config.socket)?;
        let mut terminate =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            _ = cni_api::serve(listener, handlers) => {}
            _ = terminate.recv() => info!("SIGTERM: stopping; the pinned datapath keeps forwarding"),
            _ = tokio::signal::ctrl_c() => info!("interrupted: stopping; the pinned datapath keeps forwarding"),
        }
        let _ = std::fs::remove_file(&config.socket);
        anyhow::Ok(())
    })?;
    runtime.shutdown_background();
    Ok(())
}

/// Expired entries of the flow tables (CT: per-packet Services; NAT:
/// masquerade) are removed every 10 s; then the backends' open-connection
/// counts are recounted, and the fill of every map that refuses or evicts
/// when full is counted.
async fn conntrack_gc(
    mut tables: Vec<(&'static str, CtMap)>,
    metrics: Arc<Metrics>,
    bpffs_dir: std::path::PathBuf,
) {
    use tern_agent::datapath::{connections::Recount, conntrack, fill};
    let mut ticker = tokio::time::interval(std::time::Duration::from_secs(10));
    let mut recount = None;
    loop {
        ticker.tick().await;
        let bpffs_dir = bpffs_dir.clone();
        let (returned, returned_recount, corrected, removed, fills) =
            match tokio::task::spawn_blocking(move || {
                let removed: Vec<(&'static str, (usize, usize))> = tables
                    .iter_mut()
                    .map(|(name, table)| (*name, conntrack::collect_garbage(table)))
                    .collect();
                if recount.is_none() {
                    recount = Recount::open(&bpffs_dir)
                        .inspect_err(|e| {
                            tracing::warn!("cannot recount backend connections: {e:#}")
                        })
                        .ok();
                }
                let mut corrected = 0;
                if let (Some(recount), Some((_, ct))) = (
                    recount.as_mut(),
                    tables
                        .iter()
                        .find(|(name, _)| *name == tern_common::maps::CT),
                ) {
                    let stats = recount.run(ct);
                    if stats.corrected > 0 {
                        tracing::info!(?stats, "backend connection counts corrected");
                    }
                    corrected = stats.corrected;
                }
                let fills: Vec<(&'static str, anyhow::Result<(usize, u32)>)> = fill::WATCHED
                    .iter()
                    .map(
                        |name| match removed.iter().find(|(table, _)| table == name) {
                            // Just counted by the collection.
                            Some((_, (_, left))) => {
                                (*name, fill::capacity(&bpffs_dir, name).map(|c| (*left, c)))
                            }
                            None => (*name, fill::fill(&bpffs_dir, name)),
                        },
                    )
                    .collect();
                (tables, recount, corrected, removed, fills)
            })
            .await
            {
                Ok(done) => done,
                Err(_) => return,
            };
        tables = returned;
        recount = returned_recount;
        metrics.record_connection_corrections(corrected);
        for (table, (removed, left)) in removed {
            metrics.set_table_entries(table, left);
            if removed > 0 {
                tracing::debug!(table, removed, left, "expired entries removed");
            }
        }
        for (map, fill) in fills {
            match fill {
                Ok((entries, capacity)) => metrics.set_map_fill(map, entries, capacity),
                Err(e) => tracing::debug!(map, "cannot count the map's entries: {e:#}"),
            }
        }
    }
}
