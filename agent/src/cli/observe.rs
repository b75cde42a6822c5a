//! `tern observe`: the flows the agent keeps, then (with --follow) new
//! ones as the datapath reports them. One aligned line per flow for a
//! person, or one JSON object per line (-o json) for a program.

use std::io::Write;
use std::net::Ipv4Addr;
use std::ops::ControlFlow;
use std::time::Duration;

use clap::{Args, ValueEnum};
use tern_api::flows::{Endpoint, Flow, FlowFilter, FlowType, FlowVerdict};
use tern_api::{Request, Response};

use super::{Cli, Output};

#[derive(Debug, Clone, Args)]
pub struct ObserveArgs {
    /// Keep printing new flows as they come (until interrupted).
    #[arg(short, long)]
    pub follow: bool,
    /// Print at most this many of the kept flows first (default: 20, or
    /// none with --follow).
    #[arg(long)]
    pub last: Option<usize>,
    /// Flows of this pod (either side): NAMESPACE/NAME, or NAME in any namespace.
    #[arg(long)]
    pub pod: Option<String>,
    /// Flows of pods (either side) or Services in this namespace.
    #[arg(short, long)]
    pub namespace: Option<String>,
    #[arg(long)]
    pub from_ip: Option<Ipv4Addr>,
    /// The destination's address, or the Service frontend's.
    #[arg(long)]
    pub to_ip: Option<Ipv4Addr>,
    /// Either side's port, or the Service frontend's.
    #[arg(long)]
    pub port: Option<u16>,
    /// TCP, UDP or ICMP.
    #[arg(long)]
    pub protocol: Option<String>,
    /// Only these verdicts (repeatable, or comma-separated).
    #[arg(long, value_enum, value_delimiter = ',')]
    pub verdict: Vec<VerdictArg>,
    /// Only these event types (repeatable, or comma-separated).
    #[arg(long = "type", value_enum, value_delimiter = ',')]
    pub types: Vec<TypeArg>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum VerdictArg {
    Forwarded,
    Dropped,
    Translated,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum TypeArg {
    Drop,
    Policy,
    Service,
    Trace,
}

impl ObserveArgs {
    pub fn filter(&self) -> FlowFilter {
        FlowFilter {
            pod: self.pod.clone(),
            namespace: self.namespace.clone(),
            from_ip: self.from_ip,
            to_ip: self.to_ip,
            port: self.port,
            protocol: self.protocol.clone(),
            verdicts: self
                .verdict
                .iter()
                .map(|v| match v {
                    VerdictArg::Forwarded => FlowVerdict::Forwarded,
                    VerdictArg::Dropped => FlowVerdict::Dropped,
                    VerdictArg::Translated => FlowVerdict::Translated,
                })
                .collect(),
            types: self
                .types
                .iter()
                .map(|t| match t {
                    TypeArg::Drop => FlowType::Drop,
                    TypeArg::Policy => FlowType::Policy,
                    TypeArg::Service => FlowType::Service,
                    TypeArg::Trace => FlowType::Trace,
                })
                .collect(),
        }
    }
}

/// Prints as the flows come; a closed stdout (`| head`) ends it cleanly.
pub fn run(cli: &Cli, args: &ObserveArgs) -> anyhow::Result<String> {
    let request = Request::Observe {
        filter: args.filter(),
        last: args.last.unwrap_or(if args.follow { 0 } else { 20 }),
        follow: args.follow,
    };
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let json = cli.output == Output::Json;
    if !json && write_line(&mut out, &header()).is_break() {
        return Ok(String::new());
    }
    let mut failure = None;
    // Not following: the agent answers at once; following: flows may be
    // minutes apart.
    let idle = (!args.follow).then_some(Duration::from_secs(10));
    tern_api::stream(&cli.socket, &request, idle, |response| match response {
        Response::Flow(flow) => {
            let line = if json {
                serde_json::to_string(&flow).unwrap_or_default()
            } else {
                line(&flow)
            };
            write_line(&mut out, &line)
        }
        Response::FlowsLost {
            ring,
            rate_limited,
            stream,
        } => {
            if ring + rate_limited + stream > 0 {
                // A closed stderr is no reason to stop.
                let _ = writeln!(
                    std::io::stderr(),
                    "tern: events lost: {ring} (ring buffer full) and {rate_limited} drop events over the rate limit since the datapath's maps were created, {stream} skipped by this stream"
                );
            }
            ControlFlow::Continue(())
        }
        Response::FlowsEnd => ControlFlow::Break(()),
        Response::Error { message, .. } => {
            failure = Some(message);
            ControlFlow::Break(())
        }
        other => {
            failure = Some(format!("unexpected answer: {other:?}"));
            ControlFlow::Break(())
        }
    })?;
    match failure {
        Some(message) => anyhow::bail!("the agent refused: {message}"),
        None => Ok(String::new()),
    }
}

/// Break when the reader has gone (broken pipe): not an error.
fn write_line(out: &mut impl Write, line: &str) -> ControlFlow<()> {
    match writeln!(out, "{line}").and_then(|()| out.flush()) {
        Ok(()) => ControlFlow::Continue(()),
        Err(_) => ControlFlow::Break(()),
    }
}

const WIDTHS: [usize; 6] = [12, 10, 7, 40, 52, 10];

fn header() -> String {
    columns([
        "TIME",
        "NODE",
        "TYPE",
        "SOURCE",
        "DESTINATION",
        "VERDICT",
        "REASON",
    ])
}

fn columns(cells: [&str; 7]) -> String {
    let mut line = String::new();
    for (cell, width) in cells.iter().zip(WIDTHS) {
        line.push_str(&format!("{cell:<width$} "));
    }
    line.push_str(cells[6]);
    line.trim_end().to_owned()
}

/// One flow as a person reads it.
pub fn line(flow: &Flow) -> String {
    let destination = match &flow.service {
        Some(service) if flow.kind == FlowType::Service => format!(
            "{} {}:{}/{} => {}",
            service.name.as_deref().unwrap_or("service"),
            service.ip,
            service.port,
            flow.protocol,
            side(&flow.destination, None)
        ),
        _ => side(&flow.destination, Some(&flow.protocol)),
    };
    let mut details = vec![];
    if let Some(reason) = &flow.reason {
        details.push(reason.to_string());
    }
    if let Some(service) = flow
        .service
        .as_ref()
        .filter(|_| flow.kind != FlowType::Service)
    {
        details.push(format!(
            "service {}",
            service.name.as_deref().unwrap_or("(none)")
        ));
    }
    if let Some(policy) = &flow.policy {
        details.push(format!("policy {policy}"));
    }
    details.push(format!("{} {}", flow.direction, flow.point));
    if let Some(interface) = &flow.interface {
        details.push(interface.to_string());
    }
    if let Some(flags) = &flow.tcp_flags {
        details.push(flags.to_string());
    }
    columns([
        &clock(flow.time_ns),
        &flow.node,
        flow.kind.name(),
        &side(&flow.source, None),
        &format!("-> {destination}"),
        flow.verdict.name(),
        &details.join(", "),
    ])
}

/// "namespace/pod (ip:port)", or "ip:port" for what is not a pod.
fn side(end: &Endpoint, protocol: Option<&str>) -> String {
    let mut address = match end.ip {
        Some(ip) => ip.to_string(),
        None => "?".to_owned(),
    };
    if let Some(port) = end.port {
        address.push_str(&format!(":{port}"));
    }
    if let Some(protocol) = protocol.filter(|p| *p != "-") {
        address.push_str(&format!("/{protocol}"));
    }
    match (&end.pod, &end.node) {
        (Some(pod), _) => format!("{pod} ({address})"),
        (None, Some(node)) => format!("node {node} ({address})"),
        (None, None) => address,
    }
}

/// UTC time of day with milliseconds.
fn clock(time_ns: u64) -> String {
    let secs = time_ns / 1_000_000_000;
    let millis = (time_ns / 1_000_000) % 1000;
    let day = secs % 86_400;
    format!(
        "{:02}:{:02}:{:02}.{millis:03}",
        day / 3600,
        (day / 60) % 60,
        day % 60
    )
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_translation_reads_client_service_and_backend() {
        let flow = Flow::example();
        let text = line(&flow);
        assert!(text.starts_with("10:06:02.123 node-a"), "{text}");
        assert!(text.contains(" shop/frontend (10.244.1.5) "), "{text}");
        assert!(
            text.contains(
                " -> shop/backend 10.96.0.10:80/TCP => shop/backend-1 (10.244.2.7:8080) "
            ),
            "{text}"
        );
        assert!(
            text.ends_with("translated socket, egress sock_connect"),
            "{text}"
        );
    }
}
