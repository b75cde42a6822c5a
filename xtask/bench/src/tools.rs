//! The benchmark tools, typed: iperf3 (throughput), sockperf (request /
//! response latency), nginx + wrk (HTTP connection and request rate).
//!
//! Each wrapper runs a server inside one network namespace and a client
//! inside another, both entered with `setns` only ([`Netns::spawn`]; never
//! `ip netns exec`), optionally pinned to a CPU with `taskset -c N`, and
//! returns the tool's figures parsed into a struct. The rules that keep this
//! safe (docs/lab.md):
//! - every process is started here and stopped by its own pid through a
//!   [`ChildGuard`], also when a step fails;
//! - a server is ready (its own socket listens on the port, read from
//!   `/proc/<pid>/net`) before its client starts, so no probe connection
//!   disturbs a one-off server;
//! - every client runs at most its duration + [`SLACK`]; past that it is
//!   killed and the call fails, so nothing can hang;
//! - nginx gets a private config, pid, log and temp tree in a unique temp dir,
//!   never the system's, removed when its [`NginxGuard`] drops.
//!
//! A server listens on all addresses of its namespace, on the port of the
//! client's target: the target may be the server's own address or a Service
//! VIP whose service port equals that port.
//!
//! Tool output goes to anonymous memory files (memfd), never to a pipe that a
//! stuck reader could block on, and is quoted in the error when a step fails.

use std::collections::HashSet;
use std::fs::{self, File};
use std::net::SocketAddr;
use std::os::unix::fs::{DirBuilderExt, FileExt};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use nix::sys::memfd::{MFdFlags, memfd_create};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::Value;
use tern_lab::netns::{ChildGuard, Netns, unique_name};

use tern_lab::host::display;

/// The Debian packages of the tools (installed with `setup::apt`).
pub const PACKAGES: &[&str] = &["iperf3", "sockperf", "wrk", "nginx-light"];

/// How much longer than its nominal duration a client may run before it is
/// killed and the measurement fails.
pub const SLACK: Duration = Duration::from_secs(15);

/// How long a server may take to listen on its port.
pub const READY_TIMEOUT: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------
// Results

/// iperf3: what the receiver got, and how busy both ends were.
#[derive(Debug, Clone, PartialEq)]
pub struct Throughput {
    pub gbit_per_s: f64,
    /// CPU use of the client (sender) process, % of one CPU.
    pub sender_cpu_pct: f64,
    /// CPU use of the server (receiver) process, % of one CPU.
    pub receiver_cpu_pct: f64,
    pub retransmits: u64,
}

/// sockperf ping-pong: round-trip time percentiles, in microseconds.
#[derive(Debug, Clone, PartialEq)]
pub struct Latency {
    pub p50_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub avg_us: f64,
    /// Round trips measured (after sockperf's warm-up).
    pub observations: u64,
}

/// wrk: completed requests per second and their latency percentiles. wrk
/// times a request from its first write to the end of its response: with
/// `Connection: close` that is on a new connection, after the handshake (a
/// connect that stalls shows in the rate, not here).
#[derive(Debug, Clone, PartialEq)]
pub struct HttpRate {
    pub requests_per_s: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    /// The slowest request (`Max` of the `Latency` thread-stats line).
    pub max_ms: f64,
    /// Non-2xx/3xx responses plus socket errors (connect, read, write, timeout).
    pub errors: u64,
}

// ---------------------------------------------------------------------------
// Wrappers

/// `iperf3 -s -1` in `server` (pinned to `cpus.0`), `iperf3 -J -c target`
/// with `streams` parallel streams for `seconds` in `client` (pinned to
/// `cpus.1`). Gbit/s is what the receiver counted.
pub fn iperf3(
    server: &Netns,
    client: &Netns,
    target: SocketAddr,
    streams: u32,
    seconds: u32,
    cpus: Option<(usize, usize)>,
) -> Result<Throughput> {
    ensure!(streams >= 1, "iperf3: at least one stream");
    ensure!(seconds >= 1, "iperf3: at least one second");
    let port = target.port().to_string();
    let mut srv = Tool::start(
        server,
        cpus.map(|c| c.0),
        &["iperf3", "-s", "-1", "-p", &port],
        "iperf3 server",
    )?;
    srv.wait_listening(target.port(), Proto::Tcp, READY_TIMEOUT)?;
    let cli = Tool::start(
        client,
        cpus.map(|c| c.1),
        &[
            "iperf3",
            "-J",
            "-c",
            &target.ip().to_string(),
            "-p",
            &port,
            "-t",
            &seconds.to_string(),
            "-P",
            &streams.to_string(),
        ],
        "iperf3 client",
    )?;
    let done = cli.finish(Duration::from_secs(seconds.into()) + SLACK)?;
    // The one-off server exits by itself; its guard stops it otherwise.
    drop(srv);
    done.parse(parse_iperf3)
}

/// `sockperf sr` in `server` (pinned to `cpus.0`), `sockperf pp` against
/// `target` for `seconds` in `client` (pinned to `cpus.1`), over TCP or UDP.
/// sockperf 3.7 speaks IPv4 only. It spends the first 0.4 s warming up.
pub fn sockperf_ping_pong(
    server: &Netns,
    client: &Netns,
    target: SocketAddr,
    tcp: bool,
    seconds: u32,
    cpus: Option<(usize, usize)>,
) -> Result<Latency> {
    ensure!(seconds >= 1, "sockperf: at least one second");
    ensure!(
        target.is_ipv4(),
        "sockperf 3.7 speaks IPv4 only, not {target}"
    );
    let port = target.port().to_string();
    // SO_REUSEADDR, so that connections of an earlier run on the same port
    // (TIME_WAIT) do not keep it from binding.
    let mut server_args = vec![
        "sockperf",
        "sr",
        "-i",
        "0.0.0.0",
        "-p",
        &port,
        "--uc-reuseaddr",
    ];
    if tcp {
        server_args.push("--tcp");
    }
    let mut srv = Tool::start(server, cpus.map(|c| c.0), &server_args, "sockperf server")?;
    let proto = if tcp { Proto::Tcp } else { Proto::Udp };
    srv.wait_listening(target.port(), proto, READY_TIMEOUT)?;
    let ip = target.ip().to_string();
    let secs = seconds.to_string();
    let mut client_args = vec!["sockperf", "pp", "-i", &ip, "-p", &port, "-t", &secs];
    if tcp {
        client_args.push("--tcp");
    }
    let cli = Tool::start(client, cpus.map(|c| c.1), &client_args, "sockperf client")?;
    let done = cli.finish(Duration::from_secs(seconds.into()) + SLACK)?;
    drop(srv);
    done.parse(parse_sockperf)
}

/// A running nginx: stopped by its own pid, its private directory (config,
/// pid file, temp dirs) removed, on drop.
#[derive(Debug)]
pub struct NginxGuard {
    master: Option<Tool>,
    dir: PathBuf,
}

impl Drop for NginxGuard {
    fn drop(&mut self) {
        if let Some(master) = self.master.take() {
            // SIGTERM makes the master stop its workers; should it have to
            // be killed instead, the workers it started are stopped here.
            let workers = children_of(master.guard.id());
            drop(master);
            for (pid, started) in workers {
                stop_if_same(pid, started);
            }
        }
        if let Err(e) = fs::remove_dir_all(&self.dir) {
            eprintln!("warning: removing {}: {e}", self.dir.display());
        }
    }
}

/// nginx in `server`, from a private config in a unique temp dir: one worker,
/// no access log, answering every request on 0.0.0.0:`port` with a small
/// static 200 response. Returns once it listens.
pub fn nginx(server: &Netns, port: u16) -> Result<NginxGuard> {
    let dir = std::env::temp_dir().join(unique_name("nginx"));
    fs::DirBuilder::new()
        .mode(0o755) // the workers (user nobody) must reach their temp dirs
        .create(&dir)
        .with_context(|| format!("creating {}", dir.display()))?;
    // From here on the guard removes the directory, also on error.
    let mut guard = NginxGuard { master: None, dir };
    let conf = guard.dir.join("nginx.conf");
    fs::write(&conf, nginx_conf(&guard.dir, port))
        .with_context(|| format!("writing {}", conf.display()))?;
    let prefix = format!("{}/", guard.dir.display());
    let conf = conf.display().to_string();
    let master = Tool::start(
        server,
        None,
        &["nginx", "-p", &prefix, "-c", &conf, "-e", "stderr"],
        "nginx",
    )?;
    let master = guard.master.insert(master);
    master.wait_listening(port, Proto::Tcp, READY_TIMEOUT)?;
    Ok(guard)
}

fn nginx_conf(dir: &Path, port: u16) -> String {
    let d = dir.display();
    format!(
        r#"# Tern bench: private nginx, nothing of the system's config is used.
daemon off;
master_process on;
worker_processes 1;
worker_rlimit_nofile 65536;
pid "{d}/nginx.pid";
lock_file "{d}/nginx.lock";
error_log stderr warn;
events {{
    worker_connections 16384;
}}
http {{
    access_log off;
    client_body_temp_path "{d}/client_body";
    proxy_temp_path "{d}/proxy";
    fastcgi_temp_path "{d}/fastcgi";
    uwsgi_temp_path "{d}/uwsgi";
    scgi_temp_path "{d}/scgi";
    keepalive_requests 1000000;
    server {{
        listen 0.0.0.0:{port} backlog=4096;
        location / {{
            default_type text/plain;
            return 200 "tern bench\n";
        }}
    }}
}}
"#
    )
}

/// `wrk --latency` against `url` from `client` for `seconds` with
/// `connections` connections (one thread when pinned to `cpu`, else one per
/// CPU), each request with `Connection: close` when `close_connections`
/// (connection rate) or kept alive (request rate).
pub fn wrk(
    client: &Netns,
    url: &str,
    connections: u32,
    seconds: u32,
    close_connections: bool,
    cpu: Option<usize>,
) -> Result<HttpRate> {
    ensure!(connections >= 1, "wrk: at least one connection");
    ensure!(seconds >= 1, "wrk: at least one second");
    let threads = if cpu.is_some() {
        1
    } else {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        u32::try_from(cpus).unwrap_or(1).clamp(1, connections)
    };
    let (threads, connections) = (threads.to_string(), connections.to_string());
    let duration = format!("{seconds}s");
    let mut args = vec![
        "wrk",
        "--latency",
        "-t",
        &threads,
        "-c",
        &connections,
        "-d",
        &duration,
    ];
    if close_connections {
        args.extend(["-H", "Connection: close"]);
    }
    args.push(url);
    let cli = Tool::start(client, cpu, &args, "wrk")?;
    cli.finish(Duration::from_secs(seconds.into()) + SLACK)?
        .parse(parse_wrk)
}

// ---------------------------------------------------------------------------
// Processes

/// A tool started in a namespace, with its stdout and stderr in memfds.
#[derive(Debug)]
struct Tool {
    what: String,
    guard: ChildGuard,
    stdout: File,
    stderr: File,
}

/// A tool that exited by itself.
#[derive(Debug)]
struct Finished {
    what: String,
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Proto {
    Tcp,
    Udp,
}

impl Tool {
    /// Starts `argv` inside `ns`, under `taskset -c <cpu>` when pinned.
    fn start(ns: &Netns, cpu: Option<usize>, argv: &[&str], what: &str) -> Result<Tool> {
        let (program, args) = argv.split_first().context("empty command line")?;
        let mut cmd = match cpu {
            Some(cpu) => {
                let mut c = Command::new("taskset");
                c.arg("-c").arg(cpu.to_string()).arg(program);
                c
            }
            None => Command::new(program),
        };
        cmd.args(args);
        let stdout = memfd(&format!("{what} stdout"))?;
        let stderr = memfd(&format!("{what} stderr"))?;
        cmd.stdin(Stdio::null())
            .stdout(Stdio::from(stdout.try_clone()?))
            .stderr(Stdio::from(stderr.try_clone()?));
        let what = format!("{what} (`{}` in netns {})", display(&cmd), ns.name());
        let guard = ns
            .spawn_guarded(cmd)
            .with_context(|| format!("starting {what}"))?;
        Ok(Tool {
            what,
            guard,
            stdout,
            stderr,
        })
    }

    fn output(&self) -> (String, String) {
        (read_memfd(&self.stdout), read_memfd(&self.stderr))
    }

    fn quote_output(&self) -> String {
        let (out, err) = self.output();
        quote(&out, &err)
    }

    /// Waits for the tool to exit by itself; kills it (by its pid) and fails
    /// when it is still running after `limit`, or at once when the run is
    /// interrupted ([`super::interrupt`]).
    fn finish(mut self, limit: Duration) -> Result<Finished> {
        let deadline = Instant::now() + limit;
        loop {
            if super::interrupt::interrupted() {
                let what = std::mem::take(&mut self.what);
                drop(self); // the guard stops it
                bail!("{what}: stopped, the run was interrupted");
            }
            if let Some(status) = self
                .guard
                .try_wait()
                .with_context(|| format!("waiting for {}", self.what))?
            {
                let (stdout, stderr) = self.output();
                return Ok(Finished {
                    what: std::mem::take(&mut self.what),
                    status,
                    stdout,
                    stderr,
                });
            }
            if Instant::now() >= deadline {
                let output = self.quote_output();
                let what = std::mem::take(&mut self.what);
                drop(self); // the guard stops it
                bail!("{what} still ran after {limit:?}: stopped it{output}");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits until a socket of this very process listens on `port` (TCP) or
    /// is bound to it (UDP) in its namespace.
    fn wait_listening(&mut self, port: u16, proto: Proto, limit: Duration) -> Result<()> {
        let deadline = Instant::now() + limit;
        let pid = self.guard.id();
        loop {
            // The caller's guard stops the server.
            super::interrupt::check()?;
            if let Some(status) = self.guard.try_wait()? {
                bail!(
                    "{} exited ({status}) before listening on port {port}{}",
                    self.what,
                    self.quote_output()
                );
            }
            if listens(pid, port, proto) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "{} did not listen on {proto:?} port {port} within {limit:?}{}",
                    self.what,
                    self.quote_output()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Finished {
    /// The parsed result of a tool that exited with status 0.
    fn parse<T>(self, parse: impl FnOnce(&str) -> Result<T>) -> Result<T> {
        let quoted = || quote(&self.stdout, &self.stderr);
        if !self.status.success() {
            bail!("{} failed ({}){}", self.what, self.status, quoted());
        }
        parse(&self.stdout)
            .with_context(|| format!("reading the output of {}{}", self.what, quoted()))
    }
}

fn memfd(name: &str) -> Result<File> {
    let fd = memfd_create(name, MFdFlags::MFD_CLOEXEC).context("memfd_create")?;
    Ok(File::from(fd))
}

/// Everything written so far. Reads with pread, so the write offset the file
/// shares with the child stays where it is.
fn read_memfd(file: &File) -> String {
    let mut bytes = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        match file.read_at(&mut buf, bytes.len() as u64) {
            Ok(0) | Err(_) => break,
            Ok(n) => bytes.extend_from_slice(&buf[..n]),
        }
    }
    String::from_utf8_lossy(&bytes).into_owned()
}

fn tail(s: &str) -> String {
    const MAX: usize = 4000;
    let s = s.trim();
    match s.char_indices().rev().nth(MAX) {
        Some((i, _)) => format!("...{}", &s[i..]),
        None => s.to_owned(),
    }
}

fn quote(stdout: &str, stderr: &str) -> String {
    format!(
        "\nstdout: {}\nstderr: {}",
        tail(&strip_ansi(stdout)),
        tail(&strip_ansi(stderr))
    )
}

/// Whether process `pid` owns a socket listening on (TCP) or bound to (UDP)
/// `port` in its network namespace.
fn listens(pid: u32, port: u16, proto: Proto) -> bool {
    let tables: &[&str] = match proto {
        Proto::Tcp => &["tcp", "tcp6"],
        Proto::Udp => &["udp", "udp6"],
    };
    let mut inodes = Vec::new();
    for t in tables {
        // /proc/<pid>/net shows the namespace of that process.
        if let Ok(table) = fs::read_to_string(format!("/proc/{pid}/net/{t}")) {
            inodes.extend(listening_inodes(&table, port, proto));
        }
    }
    if inodes.is_empty() {
        return false;
    }
    let own = socket_inodes(pid);
    inodes.iter().any(|i| own.contains(i))
}

/// Inodes of the sockets in a /proc/net/{tcp,udp}[6] table that listen on
/// (TCP state 0A) or are bound to (UDP state 07) `port`.
fn listening_inodes(table: &str, port: u16, proto: Proto) -> Vec<u64> {
    let state = match proto {
        Proto::Tcp => "0A",
        Proto::Udp => "07",
    };
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let local_port = f.get(1)?.rsplit(':').next()?;
            let local_port = u16::from_str_radix(local_port, 16).ok()?;
            (local_port == port && *f.get(3)? == state).then_some(())?;
            f.get(9)?.parse().ok()
        })
        .collect()
}

/// Inodes of the sockets among the open fds of `pid`.
fn socket_inodes(pid: u32) -> HashSet<u64> {
    let Ok(dir) = fs::read_dir(format!("/proc/{pid}/fd")) else {
        return HashSet::new();
    };
    dir.filter_map(|e| {
        let link = fs::read_link(e.ok()?.path()).ok()?;
        let link = link.to_str()?;
        link.strip_prefix("socket:[")?
            .strip_suffix(']')?
            .parse()
            .ok()
    })
    .collect()
}

/// (pid, start time) of every process whose parent is `parent`.
fn children_of(parent: u32) -> Vec<(u32, u64)> {
    let Ok(dir) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| {
        let pid: u32 = e.ok()?.file_name().to_str()?.parse().ok()?;
        let (ppid, started) = stat_of(pid)?;
        (ppid == parent).then_some((pid, started))
    })
    .collect()
}

/// (parent pid, start time) from /proc/<pid>/stat.
fn stat_of(pid: u32) -> Option<(u32, u64)> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may contain spaces: count after its ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // f[0] is field 3 (state): ppid is field 4, starttime field 22.
    Some((f.get(1)?.parse().ok()?, f.get(19)?.parse().ok()?))
}

/// SIGKILLs `pid` if it is still the process that started at `started`
/// (so a reused pid is never hit), and waits briefly for it to go.
fn stop_if_same(pid: u32, started: u64) {
    let same = || stat_of(pid).is_some_and(|(_, s)| s == started);
    if !same() {
        return;
    }
    let Ok(raw) = i32::try_from(pid) else { return };
    let _ = kill(Pid::from_raw(raw), Signal::SIGKILL);
    let deadline = Instant::now() + Duration::from_secs(2);
    while same() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
}

// ---------------------------------------------------------------------------
// Parsers

/// iperf3 -J: `end.sum_received.bits_per_second`, `end.sum_sent.retransmits`,
/// `end.cpu_utilization_percent.host_total` (the client, here the sender)
/// and `remote_total` (the server, the receiver).
pub fn parse_iperf3(json: &str) -> Result<Throughput> {
    let v: Value = serde_json::from_str(json).context("iperf3 -J output is not JSON")?;
    if let Some(e) = v.get("error").and_then(Value::as_str) {
        bail!("iperf3: {e}");
    }
    let end = &v["end"];
    let num = |section: &str, key: &str| {
        end[section][key]
            .as_f64()
            .with_context(|| format!("iperf3 -J: no end.{section}.{key}"))
    };
    Ok(Throughput {
        gbit_per_s: num("sum_received", "bits_per_second")? / 1e9,
        sender_cpu_pct: num("cpu_utilization_percent", "host_total")?,
        receiver_cpu_pct: num("cpu_utilization_percent", "remote_total")?,
        // UDP tests have none.
        retransmits: end["sum_sent"]["retransmits"].as_u64().unwrap_or(0),
    })
}

/// Removes terminal escape sequences (sockperf colours some lines).
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' && chars.peek() == Some(&'[') {
            chars.next();
            for c in chars.by_ref() {
                if ('@'..='~').contains(&c) {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The leading number of `s` (digits, '.', '-').
fn leading_number(s: &str) -> &str {
    let s = s.trim_start();
    let end = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '-'))
        .unwrap_or(s.len());
    &s[..end]
}

/// sockperf ping-pong output: `avg-latency=`, `Total N observations` and the
/// `---> percentile P = V` lines (microseconds).
pub fn parse_sockperf(out: &str) -> Result<Latency> {
    let text = strip_ansi(out);
    if let Some(err) = text.lines().find(|l| l.contains("ERROR")) {
        bail!("sockperf: {}", err.trim());
    }
    let avg_us: f64 = text
        .split_once("avg-latency=")
        .map(|(_, rest)| leading_number(rest))
        .context("sockperf: no avg-latency")?
        .parse()
        .context("sockperf: avg-latency")?;
    let observations: u64 = text
        .lines()
        .find_map(|l| {
            let rest = &l[l.find("Total ")? + "Total ".len()..];
            let n = leading_number(rest);
            rest[n.len()..]
                .trim_start()
                .starts_with("observations")
                .then_some(n)
        })
        .context("sockperf: no `Total N observations`")?
        .parse()
        .context("sockperf: observations")?;
    let mut percentiles = Vec::new();
    for line in text.lines() {
        let Some((_, rest)) = line.split_once("---> percentile ") else {
            continue;
        };
        let (p, v) = rest
            .split_once('=')
            .with_context(|| format!("sockperf: bad line {line:?}"))?;
        let p: f64 = p
            .trim()
            .parse()
            .with_context(|| format!("sockperf: {line:?}"))?;
        let v: f64 = v
            .trim()
            .parse()
            .with_context(|| format!("sockperf: {line:?}"))?;
        percentiles.push((p, v));
    }
    let at = |p: f64| {
        percentiles
            .iter()
            .find(|(q, _)| (q - p).abs() < 1e-6)
            .map(|(_, v)| *v)
            .with_context(|| format!("sockperf: no percentile {p:.3}"))
    };
    Ok(Latency {
        p50_us: at(50.0)?,
        p99_us: at(99.0)?,
        p999_us: at(99.9)?,
        avg_us,
        observations,
    })
}

/// A wrk duration (`104.00us`, `2.51ms`, `1.02s`, `1.50m`, `1.00h`) in ms.
fn wrk_ms(s: &str) -> Result<f64> {
    let s = s.trim();
    let n = leading_number(s);
    let value: f64 = n
        .parse()
        .with_context(|| format!("wrk: bad duration {s:?}"))?;
    let scale = match &s[n.len()..] {
        "us" => 1e-3,
        "ms" => 1.0,
        "s" => 1e3,
        "m" => 60e3,
        "h" => 3600e3,
        unit => bail!("wrk: unknown time unit {unit:?} in {s:?}"),
    };
    Ok(value * scale)
}

/// wrk --latency output: `Requests/sec:`, the `Max` column of the
/// `Latency` thread-stats line, the 50% and 99% lines of the Latency
/// Distribution, `Non-2xx or 3xx responses:` and `Socket errors:`.
pub fn parse_wrk(out: &str) -> Result<HttpRate> {
    let mut requests_per_s = None;
    let (mut p50_ms, mut p99_ms, mut max_ms) = (None, None, None);
    let mut errors = 0u64;
    let mut in_distribution = false;
    for line in out.lines() {
        let line = line.trim();
        if line.starts_with("Latency Distribution") {
            in_distribution = true;
        } else if let Some(stats) = line.strip_prefix("Latency ") {
            // Thread stats: Avg, Stdev, Max, +/- Stdev.
            let max = stats.split_whitespace().nth(2);
            max_ms = Some(wrk_ms(max.with_context(|| format!("wrk: {line:?}"))?)?);
        } else if let Some(v) = line.strip_prefix("Requests/sec:") {
            requests_per_s = Some(v.trim().parse::<f64>().context("wrk: Requests/sec")?);
        } else if let Some(v) = line.strip_prefix("Non-2xx or 3xx responses:") {
            errors += v.trim().parse::<u64>().context("wrk: Non-2xx")?;
        } else if let Some(v) = line.strip_prefix("Socket errors:") {
            // connect 0, read 9, write 845, timeout 0
            for part in v.split(',') {
                let n = part.split_whitespace().last().unwrap_or_default();
                errors += n
                    .parse::<u64>()
                    .with_context(|| format!("wrk: Socket errors {v:?}"))?;
            }
        } else if in_distribution {
            match line.split_once('%') {
                Some(("50", v)) => p50_ms = Some(wrk_ms(v)?),
                Some(("99", v)) => p99_ms = Some(wrk_ms(v)?),
                Some((p, _)) if p.parse::<u32>().is_ok() => {}
                _ => in_distribution = false,
            }
        }
    }
    Ok(HttpRate {
        requests_per_s: requests_per_s.context("wrk: no Requests/sec")?,
        p50_ms: p50_ms.context("wrk: no 50% latency")?,
        p99_ms: p99_ms.context("wrk: no 99% latency")?,
        max_ms: max_ms.context("wrk: no Latency thread stats")?,
        errors,
    })
}

// ---------------------------------------------------------------------------

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, SocketAddrV4};
    use tern_lab::netns::unique_ifname;
    use tern_lab::skip::require_root;

    // Real outputs captured on this machine (iperf3 3.12, sockperf 3.7,
    // wrk 4.1.0), cut to the parts the parsers read.

    const IPERF3_JSON: &str = r#"{"start": {"version": "iperf 3.12"}, "end": {"sum_sent": {"start": 0, "end": 2.000197, "seconds": 2.000197, "bytes": 2364669952, "bits_per_second": 9457748219.80035, "retransmits": 910, "sender": true}, "sum_received": {"start": 0, "end": 2.007107, "seconds": 2.007107, "bytes": 2362834944, "bits_per_second": 9417873363.004564, "sender": true}, "cpu_utilization_percent": {"host_total": 32.64287706020762, "host_user": 1.3529118631943826, "host_system": 31.28951625494522, "remote_total": 33.34698475475022, "remote_user": 0.9265030389359463, "remote_system": 32.420481715814276}, "sender_tcp_congestion": "bbr", "receiver_tcp_congestion": "bbr"}}"#;

    const IPERF3_REFUSED: &str = "{\n\t\"start\":\t{\n\t\t\"connected\":\t[],\n\t\t\"version\":\t\"iperf 3.12\"\n\t},\n\t\"intervals\":\t[],\n\t\"end\":\t{\n\t},\n\t\"error\":\t\"unable to connect to server: Connection refused\"\n}\n";

    const SOCKPERF_TCP: &str = "\
sockperf: \x1b[2;35m== version #3.7-no.git == \x1b[0m
sockperf[CLIENT] send on:sockperf: using recvfrom() to block on socket(s)

[ 0] IP = 10.250.0.1      PORT = 15202 # TCP
sockperf: [Valid Duration] RunTime=1.549 sec; SentMessages=122437; ReceivedMessages=122437
sockperf: \x1b[2;35m====> avg-latency=6.298 (std-dev=53.566)\x1b[0m
sockperf: # dropped messages = 0; # duplicated messages = 0; # out-of-order messages = 0
sockperf: Summary: Latency is 6.298 usec
sockperf: \x1b[2;35mTotal 122437 observations\x1b[0m; each percentile contains 1224.37 observations
sockperf: ---> <MAX> observation = 2667.578
sockperf: ---> percentile 99.999 = 2612.644
sockperf: ---> percentile 99.990 = 2321.132
sockperf: ---> percentile 99.900 =  738.674
sockperf: ---> percentile 99.000 =   11.583
sockperf: ---> percentile 90.000 =    5.327
sockperf: ---> percentile 75.000 =    5.078
sockperf: ---> percentile 50.000 =    4.792
sockperf: ---> percentile 25.000 =    3.408
sockperf: ---> <MIN> observation =    3.173
";

    const SOCKPERF_REFUSED: &str = "\
sockperf: \x1b[2;35m== version #3.7-no.git == \x1b[0m
sockperf: ERROR: Can`t connect socket (errno=111 Connection refused)
";

    const WRK_KEEPALIVE: &str = "\
Running 2s test @ http://10.250.0.1:18080/
  1 threads and 16 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   166.55us  396.53us   5.89ms   97.77%
    Req/Sec   104.75k    17.98k  128.85k    70.00%
  Latency Distribution
     50%  104.00us
     75%  138.00us
     90%  171.00us
     99%    2.51ms
  208140 requests in 2.00s, 30.17MB read
Requests/sec: 103922.79
Transfer/sec:     15.06MB
";

    const WRK_ERRORS: &str = "\
Running 2s test @ http://10.250.0.1:18082/
  1 threads and 8 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   311.14us  573.29us   6.20ms   95.48%
    Req/Sec    19.92k     4.80k   29.08k    70.00%
  Latency Distribution
     50%  200.00us
     75%  270.00us
     90%  346.00us
     99%    3.68ms
  19794 requests in 2.01s, 2.77MB read
  Non-2xx or 3xx responses: 12
  Socket errors: connect 0, read 9, write 845, timeout 0
Requests/sec:   9859.43
Transfer/sec:      1.38MB
";

    // One connection per request (`-c1 -H 'Connection: close'`).
    const WRK_CLOSE_C1: &str = "\
Running 5s test @ http://10.231.9.1:18080/
  1 threads and 1 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   382.45us    0.89ms   8.37ms   88.50%
    Req/Sec     7.76k     2.70k   12.14k    60.00%
  Latency Distribution
     50%   41.00us
     75%   55.00us
     90%    1.55ms
     99%    3.98ms
  38703 requests in 5.01s, 5.32MB read
Requests/sec:   7719.98
Transfer/sec:      1.06MB
";

    const PROC_NET_TCP: &str = "\
  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000:3B62 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 247354 1 000000008c8665e2 100 0 0 10 0
   1: 0100FA0A:3B61 0200FA0A:E7A2 06 00000000:00000000 03:000014F8 00000000     0        0 0 3 00000000ae2efa89
";

    #[test]
    fn parses_iperf3() {
        let t = parse_iperf3(IPERF3_JSON).unwrap();
        assert!((t.gbit_per_s - 9.417873363).abs() < 1e-6, "{t:?}");
        assert!((t.sender_cpu_pct - 32.642877).abs() < 1e-4);
        assert!((t.receiver_cpu_pct - 33.346984).abs() < 1e-4);
        assert_eq!(t.retransmits, 910);
        let err = parse_iperf3(IPERF3_REFUSED).unwrap_err().to_string();
        assert!(err.contains("Connection refused"), "{err}");
        assert!(parse_iperf3("not json").is_err());
        assert!(parse_iperf3(r#"{"end": {}}"#).is_err());
    }

    #[test]
    fn parses_sockperf() {
        let l = parse_sockperf(SOCKPERF_TCP).unwrap();
        assert_eq!(
            l,
            Latency {
                p50_us: 4.792,
                p99_us: 11.583,
                p999_us: 738.674,
                avg_us: 6.298,
                observations: 122437,
            }
        );
        let err = parse_sockperf(SOCKPERF_REFUSED).unwrap_err().to_string();
        assert!(err.contains("Connection refused"), "{err}");
        let cut = SOCKPERF_TCP.replace("percentile 99.900", "percentile 99.901");
        assert!(parse_sockperf(&cut).is_err());
    }

    #[test]
    fn parses_wrk() {
        let r = parse_wrk(WRK_KEEPALIVE).unwrap();
        assert_eq!(r.requests_per_s, 103922.79);
        assert!((r.p50_ms - 0.104).abs() < 1e-9, "{r:?}");
        assert!((r.p99_ms - 2.51).abs() < 1e-9);
        assert!((r.max_ms - 5.89).abs() < 1e-9);
        assert_eq!(r.errors, 0);
        let r = parse_wrk(WRK_ERRORS).unwrap();
        assert_eq!(r.requests_per_s, 9859.43);
        assert!((r.max_ms - 6.2).abs() < 1e-9);
        assert_eq!(r.errors, 12 + 9 + 845);
        let r = parse_wrk(WRK_CLOSE_C1).unwrap();
        assert_eq!(r.requests_per_s, 7719.98);
        assert!((r.p50_ms - 0.041).abs() < 1e-9, "{r:?}");
        assert!((r.p99_ms - 3.98).abs() < 1e-9);
        assert!((r.max_ms - 8.37).abs() < 1e-9);
        // A stalled request: Max in seconds, the Req/Sec line untouched.
        let stalled = WRK_CLOSE_C1.replace("8.37ms   88.50%", "1.03s   99.90%");
        assert!((parse_wrk(&stalled).unwrap().max_ms - 1030.0).abs() < 1e-9);
        let no_max =
            WRK_CLOSE_C1.replace("    Latency   382.45us    0.89ms   8.37ms   88.50%\n", "");
        let err = format!("{:#}", parse_wrk(&no_max).unwrap_err());
        assert!(err.contains("thread stats"), "{err}");
        assert!(parse_wrk("unable to connect to 10.250.0.1:18099 Connection refused").is_err());
        assert_eq!(wrk_ms("1.50s").unwrap(), 1500.0);
        assert_eq!(wrk_ms("2m").unwrap(), 120e3);
        assert!(wrk_ms("3parsecs").is_err());
    }

    #[test]
    fn parses_proc_net_tables() {
        assert_eq!(
            listening_inodes(PROC_NET_TCP, 15202, Proto::Tcp),
            vec![247354]
        );
        // 15201 has only an established connection; nothing is UDP-bound.
        assert!(listening_inodes(PROC_NET_TCP, 15201, Proto::Tcp).is_empty());
        assert!(listening_inodes(PROC_NET_TCP, 15202, Proto::Udp).is_empty());
        assert_eq!(strip_ansi("a\x1b[2;35mb\x1b[0mc"), "abc");
    }

    #[test]
    fn nginx_conf_stays_in_its_dir() {
        let conf = nginx_conf(Path::new("/tmp/tern-nginx-1-2"), 8080);
        // Every path it names is quoted and inside the private dir.
        let paths: Vec<&str> = conf.lines().filter(|l| l.contains("\"/")).collect();
        assert_eq!(paths.len(), 7, "{conf}");
        for line in paths {
            assert!(line.contains("\"/tmp/tern-nginx-1-2/"), "{line}");
        }
        assert!(conf.contains("listen 0.0.0.0:8080"));
        assert!(conf.contains("access_log off;"));
        assert!(conf.contains("worker_processes 1;"));
    }

    // ---- root tests: two namespaces joined by a veth ----

    const A_IP: Ipv4Addr = Ipv4Addr::new(10, 231, 0, 1);
    const B_IP: Ipv4Addr = Ipv4Addr::new(10, 231, 0, 2);

    /// Namespaces a (server side, 10.231.0.1) and b (client side,
    /// 10.231.0.2) joined by a veth made inside them: nothing touches the
    /// machine's own namespace.
    fn veth_pair() -> Result<(Netns, Netns)> {
        let a = Netns::new("bench-a")?;
        let b = Netns::new("bench-b")?;
        let (va, vb) = (unique_ifname("bva"), unique_ifname("bvb"));
        a.sh(&format!(
            "ip link add {va} type veth peer name {vb} netns {}",
            b.name()
        ))?;
        a.sh(&format!(
            "ip addr add {A_IP}/24 dev {va}; ip link set {va} up"
        ))?;
        b.sh(&format!(
            "ip addr add {B_IP}/24 dev {vb}; ip link set {vb} up"
        ))?;
        Ok((a, b))
    }

    fn two_cpus() -> Option<(usize, usize)> {
        let n = std::thread::available_parallelism().map_or(1, |n| n.get());
        Some((0, if n > 1 { 1 } else { 0 }))
    }

    fn gone(pid: u32) -> bool {
        !Path::new(&format!("/proc/{pid}")).exists()
    }

    fn root_with_tools(test: &str) -> bool {
        if !require_root(test) {
            return false;
        }
        tern_lab::host::apt(PACKAGES).expect("installing the benchmark tools");
        true
    }

    #[test]
    fn iperf3_over_veth() -> Result<()> {
        if !root_with_tools("iperf3_over_veth") {
            return Ok(());
        }
        let (a, b) = veth_pair()?;
        let target = SocketAddr::V4(SocketAddrV4::new(A_IP, 15201));
        for (streams, cpus) in [(1, None), (4, two_cpus())] {
            let t = iperf3(&a, &b, target, streams, 1, cpus)?;
            eprintln!("iperf3 {streams} stream(s), cpus {cpus:?}: {t:?}");
            assert!(t.gbit_per_s > 0.0 && t.gbit_per_s.is_finite(), "{t:?}");
            assert!(t.sender_cpu_pct > 0.0 && t.receiver_cpu_pct > 0.0, "{t:?}");
        }
        Ok(())
    }

    #[test]
    fn sockperf_over_veth() -> Result<()> {
        if !root_with_tools("sockperf_over_veth") {
            return Ok(());
        }
        let (a, b) = veth_pair()?;
        let target = SocketAddr::V4(SocketAddrV4::new(A_IP, 15202));
        // An earlier measurement on the same port leaves TIME_WAIT sockets
        // behind in the server's namespace; the server must bind anyway.
        iperf3(&a, &b, target, 1, 1, None)?;
        for tcp in [true, false] {
            let l = sockperf_ping_pong(&a, &b, target, tcp, 1, two_cpus())?;
            eprintln!("sockperf tcp={tcp}: {l:?}");
            assert!(l.observations > 0, "{l:?}");
            assert!(l.avg_us > 0.0, "{l:?}");
            assert!(
                0.0 < l.p50_us && l.p50_us <= l.p99_us && l.p99_us <= l.p999_us,
                "{l:?}"
            );
        }
        Ok(())
    }

    #[test]
    fn nginx_and_wrk_over_veth() -> Result<()> {
        if !root_with_tools("nginx_and_wrk_over_veth") {
            return Ok(());
        }
        let (a, b) = veth_pair()?;
        let server = nginx(&a, 18080)?;
        let pid = server.master.as_ref().expect("running").guard.id();
        let dir = server.dir.clone();
        let workers = children_of(pid);
        assert_eq!(workers.len(), 1, "one worker: {workers:?}");
        let url = format!("http://{A_IP}:18080/");
        for close in [false, true] {
            let r = wrk(&b, &url, 8, 1, close, Some(1))?;
            eprintln!("wrk close={close}: {r:?}");
            assert!(r.requests_per_s > 0.0, "{r:?}");
            assert!(
                0.0 < r.p50_ms && r.p50_ms <= r.p99_ms && r.p99_ms <= r.max_ms,
                "{r:?}"
            );
            assert_eq!(r.errors, 0, "{r:?}");
        }
        drop(server);
        assert!(gone(pid), "nginx master {pid} still there");
        assert!(workers.iter().all(|(w, _)| gone(*w)), "{workers:?}");
        assert!(!dir.exists(), "{} still there", dir.display());
        // Nothing listens any more: wrk fails, and says why.
        let err = wrk(&b, &url, 1, 1, false, None).unwrap_err();
        assert!(format!("{err:#}").contains("unable to connect"), "{err:#}");
        Ok(())
    }

    #[test]
    fn failures_are_reported_and_cleaned_up() -> Result<()> {
        if !root_with_tools("failures_are_reported_and_cleaned_up") {
            return Ok(());
        }
        let (a, b) = veth_pair()?;
        // A tool past its time is killed by pid and reported.
        let slow = Tool::start(&b, None, &["sleep", "30"], "sleep")?;
        let pid = slow.guard.id();
        let started = Instant::now();
        let err = slow.finish(Duration::from_millis(300)).unwrap_err();
        assert!(err.to_string().contains("still ran after"), "{err:#}");
        assert!(started.elapsed() < Duration::from_secs(5));
        assert!(gone(pid));
        // A server that cannot start: its error reaches the caller.
        let target = SocketAddr::V4(SocketAddrV4::new(A_IP, 15203));
        let err = iperf3(&a, &b, target, 1, 1, Some((4096, 0))).unwrap_err();
        assert!(
            format!("{err:#}").contains("exited"),
            "server pinned to a CPU that does not exist: {err:#}"
        );
        // A client that cannot start either.
        let err = sockperf_ping_pong(&a, &b, target, true, 1, Some((0, 4096))).unwrap_err();
        assert!(format!("{err:#}").contains("sockperf client"), "{err:#}");
        Ok(())
    }
}
