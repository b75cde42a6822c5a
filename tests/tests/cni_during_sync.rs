//! CNI requests are served while the agent writes a large Service snapshot
//! into the maps: the endpoint manager and the Service pipeline own their
//! state separately, so a pod's ADD never waits for a Service sync. Needs
//! root.

use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use serde_json::json;
use tern_lab::lab::{Lab, LabNode};
use tern_lab::netns::{Netns, unique_name};
use tern_lab::skip::require_root;

const NODE_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 11);
const SERVICES: usize = 10_000;
const BACKENDS_PER_SERVICE: usize = 10;

/// `SERVICES` ClusterIP Services, each with a slice of ready backends
/// (addresses no pod has: only the map writes matter here).
fn many_services() -> String {
    let mut yaml = String::new();
    for i in 0..SERVICES {
        let vip = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 96, 0, 0)) + 1 + i as u32);
        yaml.push_str(&format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: s{i}, namespace: default}}\n\
             spec: {{clusterIP: {vip}, ports: [{{name: http, port: 80, targetPort: 8080}}]}}\n---\n\
             apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
             metadata: {{name: s{i}-1, namespace: default, labels: {{kubernetes.io/service-name: s{i}}}}}\n\
             addressType: IPv4\nports: [{{name: http, port: 8080}}]\nendpoints:\n"
        ));
        for b in 0..BACKENDS_PER_SERVICE {
            let ip = Ipv4Addr::from(
                u32::from(Ipv4Addr::new(10, 200, 0, 0)) + (i * BACKENDS_PER_SERVICE + b) as u32,
            );
            yaml.push_str(&format!(
                "- addresses: [\"{ip}\"]\n  conditions: {{ready: true}}\n"
            ));
        }
        yaml.push_str("---\n");
    }
    yaml
}

/// Seconds since the epoch of an RFC 3339 UTC timestamp as the agent logs
/// it ("2026-12-06T01:57:00.123456Z").
fn parse_utc(stamp: &str) -> Option<f64> {
    let (date, time) = stamp.trim_end_matches('Z').split_once('T')?;
    let mut d = date.split('-').map(|p| p.parse::<i64>());
    let (y, m, day) = (d.next()?.ok()?, d.next()?.ok()?, d.next()?.ok()?);
    let mut t = time.split(':');
    let (h, min, s) = (
        t.next()?.parse::<f64>().ok()?,
        t.next()?.parse::<f64>().ok()?,
        t.next()?.parse::<f64>().ok()?,
    );
    // Days from the civil date (proleptic Gregorian), Howard Hinnant's way.
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(days as f64 * 86_400.0 + h * 3600.0 + min * 60.0 + s)
}

fn field(line: &str, key: &str) -> Option<f64> {
    let start = line.find(&format!(" {key}="))? + key.len() + 2;
    line[start..].split_whitespace().next()?.parse().ok()
}

/// When the agent wrote the Service maps for the big snapshot: (start,
/// end) in seconds since the epoch, from its "services synced" log line.
fn map_write_window(node: &LabNode) -> Result<(f64, f64)> {
    let log = std::fs::read_to_string(node.agent_log())?;
    let line = log
        .lines()
        .rev()
        .find(|l| l.contains("services synced") && l.contains(&format!("services={SERVICES}")))
        .context("no 'services synced' line for the big snapshot in the agent log")?;
    let logged_at = line
        .split_whitespace()
        .next()
        .and_then(parse_utc)
        .with_context(|| format!("no timestamp in {line:?}"))?;
    let us = |key| field(line, key).with_context(|| format!("no {key} in {line:?}"));
    let began = logged_at - us("took_us")? / 1e6 + us("compile_us")? / 1e6;
    Ok((began, began + us("apply_us")? / 1e6))
}

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

fn syncs(node: &LabNode) -> Result<u64> {
    let status = node.agent_request(&json!({"op": "status"}))?;
    status["last_sync"]["syncs"]
        .as_u64()
        .context("status without last_sync.syncs")
}

#[test]
fn a_cni_add_completes_while_ten_thousand_services_are_written() -> Result<()> {
    if !require_root("a_cni_add_completes_while_ten_thousand_services_are_written") {
        return Ok(());
    }
    let lab = Lab::new()?;
    let node = lab.node("n1", "10.244.40.0/24", NODE_IP)?;
    let pod_ns = Netns::new("p1")?;
    let before = syncs(&node)?;
    let manifest = many_services();
    let stop = AtomicBool::new(false);
    // ADD and DEL a pod over and over while the snapshot is parsed and
    // written; each ADD's (start, end) is kept.
    let adds = std::thread::scope(|scope| -> Result<Vec<(f64, f64)>> {
        let worker = scope.spawn(|| -> Result<Vec<(f64, f64)>> {
            let mut adds = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let id = unique_name("busy");
                let started = now();
                node.cni("ADD", &id, pod_ns.path(), "1.1.0")?
                    .success_json()
                    .context("ADD during the sync")?;
                adds.push((started, now()));
                node.cni("DEL", &id, pod_ns.path(), "1.1.0")?;
            }
            Ok(adds)
        });
        node.write_manifest("many.yaml", &manifest)?;
        let deadline = Instant::now() + Duration::from_secs(120);
        let synced = loop {
            if syncs(&node)? > before {
                break true;
            }
            if Instant::now() > deadline || worker.is_finished() {
                break false;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        stop.store(true, Ordering::Relaxed);
        let adds = worker
            .join()
            .map_err(|_| anyhow::anyhow!("the ADD loop panicked"))??;
        if !synced {
            bail!(
                "the agent did not sync the {SERVICES} Services within 120 s:\n{}",
                node.agent_log_tail()
            );
        }
        Ok(adds)
    })?;
    let (began, ended) = map_write_window(&node)?;
    let inside: Vec<_> = adds
        .iter()
        .filter(|(start, end)| *start >= began && *end <= ended)
        .collect();
    let longest = adds.iter().map(|(s, e)| e - s).fold(0.0, f64::max);
    eprintln!(
        "map writes took {:.0} ms; {} ADDs in all (longest {:.0} ms), {} of them started and \
         finished while the maps were written",
        (ended - began) * 1e3,
        adds.len(),
        longest * 1e3,
        inside.len()
    );
    assert!(
        !inside.is_empty(),
        "no ADD completed while the {SERVICES} Services were written ({:.0} ms from {began:.3} to \
         {ended:.3}); ADDs: {adds:?}",
        (ended - began) * 1e3
    );
    Ok(())
}
