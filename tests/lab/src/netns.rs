//! Network namespaces for the root integration tests and the lab.
//!
//! Safety rules (docs/lab.md):
//! - nothing here ever touches the machine's root network namespace: every
//!   command, thread and sysctl runs *inside* a namespace made by [`Netns::new`];
//! - every object gets a unique name ([`unique_name`], [`unique_ifname`]);
//! - everything is cleaned up on `Drop`, also when a test fails or panics.
//!
//! Entering a namespace is done with `setns(CLONE_NEWNET)` only, never with
//! `ip netns exec`: that one also unshares the mount namespace and remounts
//! /sys, which hides /sys/fs/bpf (bpffs pins) from the command.
//!
//! Gotcha: `/proc/net` and `/proc/self/net` show the netns of the process's
//! *main* thread. From a thread inside [`Netns::run`] use
//! `/proc/thread-self/net/...`. `/proc/sys/net/...` does follow the calling
//! thread's netns (checked on kernel 6.18), which [`Netns::sysctl`] relies on.

use std::ffi::OsStr;
use std::fs::{self, File};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use nix::sched::{CloneFlags, setns};

use crate::host::output;

/// Where `ip netns add` puts its namespaces.
pub const NETNS_DIR: &str = "/run/netns";

/// Linux interface names are at most 15 bytes (IFNAMSIZ - 1).
pub const IFNAME_MAX: usize = 15;

static COUNTER: AtomicU32 = AtomicU32::new(0);

fn next_id() -> (u32, u32) {
    (std::process::id(), COUNTER.fetch_add(1, Ordering::Relaxed))
}

/// A name no other object of this or any concurrently running process has:
/// `tern-<prefix>-<pid>-<counter>`. For namespaces, pin paths, cgroups.
pub fn unique_name(prefix: &str) -> String {
    let (pid, n) = next_id();
    format!("tern-{prefix}-{pid}-{n}")
}

fn base36(mut v: u32) -> String {
    const DIGITS: &[u8; 36] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut out = Vec::new();
    loop {
        out.push(char::from(DIGITS[(v % 36) as usize]));
        v /= 36;
        if v == 0 {
            break;
        }
    }
    out.iter().rev().collect()
}

/// A unique interface name of at most 15 bytes: `<prefix>-<pid>-<counter>`
/// with pid and counter in base 36 and the prefix cut to fit. Uniqueness comes
/// from (pid, counter) alone, so a shortened prefix cannot cause a clash.
pub fn unique_ifname(prefix: &str) -> String {
    let (pid, n) = next_id();
    let tail = format!("-{}-{}", base36(pid), base36(n));
    let room = IFNAME_MAX.saturating_sub(tail.len());
    let prefix: String = prefix
        .chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .take(room)
        .collect();
    format!("{prefix}{tail}")
}

/// A named network namespace at /run/netns/<name>, deleted on drop.
#[derive(Debug)]
pub struct Netns {
    name: String,
    path: PathBuf,
    /// Open before any fork, so `pre_exec` only has to call setns().
    file: File,
    /// Made by us (deleted on drop) or only entered (left alone).
    owned: bool,
}

impl Netns {
    /// `ip netns add <unique name>`, then `lo` up inside it.
    pub fn new(prefix: &str) -> Result<Self> {
        // A namespace left over by a killed run of a process with our pid
        // could hold the name: take the next one.
        let name = loop {
            let name = unique_name(prefix);
            if !Path::new(NETNS_DIR).join(&name).exists() {
                break name;
            }
        };
        output(Command::new("ip").args(["netns", "add", &name]))?;
        let path = Path::new(NETNS_DIR).join(&name);
        let file = match File::open(&path) {
            Ok(f) => f,
            Err(e) => {
                let _ = Command::new("ip").args(["netns", "del", &name]).output();
                return Err(e).with_context(|| format!("opening {}", path.display()));
            }
        };
        let ns = Self {
            name,
            path,
            file,
            owned: true,
        };
        ns.sh("ip link set lo up")?;
        Ok(ns)
    }

    /// An existing namespace made by an earlier run (e.g. `lab up`), to
    /// work in; it is not deleted on drop.
    pub fn existing(name: &str) -> Result<Self> {
        let path = Path::new(NETNS_DIR).join(name);
        let file = File::open(&path).with_context(|| format!("opening {}", path.display()))?;
        Ok(Self {
            name: name.to_owned(),
            path,
            file,
            owned: false,
        })
    }

    /// The name `ip netns` knows it by (`ip link ... netns <name>` works).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// /run/netns/<name>.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// An fd of the namespace, e.g. for setns() in code of your own.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }

    /// Makes `cmd` run inside this namespace (network only; mount namespace,
    /// cgroup, pid etc. stay the caller's). The command must be spawned while
    /// `self` is alive.
    pub fn prepare<'c>(&self, cmd: &'c mut Command) -> &'c mut Command {
        let raw = self.file.as_raw_fd();
        // SAFETY: the closure runs in the forked child before exec and only
        // makes the setns() syscall (async-signal-safe, no allocation). The fd
        // is open for as long as `self` lives, and the caller spawns while it
        // does; it is O_CLOEXEC, so the exec'd program does not inherit it.
        unsafe {
            cmd.pre_exec(move || {
                let fd = BorrowedFd::borrow_raw(raw);
                setns(fd, CloneFlags::CLONE_NEWNET).map_err(io::Error::from)
            });
        }
        cmd
    }

    /// Runs `argv` inside the namespace and waits for it, capturing its
    /// output (stdin is /dev/null). Does not check the exit status.
    pub fn exec<I, S>(&self, argv: I) -> Result<Output>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut argv = argv.into_iter();
        let program = argv.next().context("exec: empty argv")?;
        let mut cmd = Command::new(program.as_ref());
        cmd.args(argv).stdin(Stdio::null());
        let out = self
            .prepare(&mut cmd)
            .output()
            .with_context(|| format!("running {cmd:?} in netns {}", self.name))?;
        Ok(out)
    }

    /// Starts a long-running `cmd` inside the namespace. Wrap the child in a
    /// [`ChildGuard`] so that it is killed when the test ends.
    pub fn spawn(&self, mut cmd: Command) -> Result<Child> {
        self.prepare(&mut cmd)
            .spawn()
            .with_context(|| format!("starting {cmd:?} in netns {}", self.name))
    }

    /// [`Netns::spawn`] wrapped in a [`ChildGuard`].
    pub fn spawn_guarded(&self, cmd: Command) -> Result<ChildGuard> {
        self.spawn(cmd).map(ChildGuard)
    }

    /// Runs `f` on a fresh thread that has entered the namespace, and returns
    /// its result. Sockets created there stay in this namespace wherever they
    /// are used later. A panic in `f` is re-raised here.
    pub fn run<F, T>(&self, f: F) -> T
    where
        F: FnOnce() -> T + Send,
        T: Send,
    {
        let fd = self.fd();
        std::thread::scope(|s| {
            let handle = s.spawn(move || {
                if let Err(e) = setns(fd, CloneFlags::CLONE_NEWNET) {
                    panic!("setns into netns {}: {e}", self.name);
                }
                f()
            });
            match handle.join() {
                Ok(v) => v,
                Err(payload) => std::panic::resume_unwind(payload),
            }
        })
    }

    /// Runs a shell script (`sh -ec`) inside the namespace, typically `ip ...`
    /// lines. Returns stdout; fails with stdout and stderr in the message.
    pub fn sh(&self, script: &str) -> Result<String> {
        let mut cmd = Command::new("sh");
        cmd.arg("-ec").arg(script).stdin(Stdio::null());
        self.prepare(&mut cmd);
        let out = cmd
            .output()
            .with_context(|| format!("running sh in netns {}", self.name))?;
        if !out.status.success() {
            bail!(
                "in netns {}: `{}` failed ({})\nstdout: {}\nstderr: {}",
                self.name,
                script.trim(),
                out.status,
                String::from_utf8_lossy(&out.stdout).trim(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Sets a per-namespace sysctl, e.g. `("net.ipv4.ip_forward", "1")` or a
    /// path form `net/ipv4/conf/eth0.100/forwarding` (use `/` when a part
    /// contains a dot). Only `net.*` keys are accepted: other sysctls are
    /// global and would change the machine itself.
    pub fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        let path = sysctl_path(key)?;
        self.run(|| fs::write(&path, value)).with_context(|| {
            format!(
                "netns {}: writing {value:?} to {}",
                self.name,
                path.display()
            )
        })
    }

    /// Reads a per-namespace sysctl (see [`Netns::sysctl`] for the key).
    pub fn sysctl_get(&self, key: &str) -> Result<String> {
        let path = sysctl_path(key)?;
        let v = self
            .run(|| fs::read_to_string(&path))
            .with_context(|| format!("netns {}: reading {}", self.name, path.display()))?;
        Ok(v.trim().to_owned())
    }
}

fn sysctl_path(key: &str) -> Result<PathBuf> {
    let rel = if key.contains('/') {
        key.trim_start_matches('/').to_owned()
    } else {
        key.replace('.', "/")
    };
    if !rel.starts_with("net/") || rel.split('/').any(|p| p.is_empty() || p == "..") {
        bail!("refusing sysctl {key:?}: only per-namespace net.* keys may be set from a netns");
    }
    Ok(Path::new("/proc/sys").join(rel))
}

impl Drop for Netns {
    fn drop(&mut self) {
        if !self.owned {
            return;
        }
        // Processes still inside (e.g. a leaked agent) keep the namespace
        // alive after this; that is the ChildGuard's job.
        match Command::new("ip")
            .args(["netns", "del", &self.name])
            .stdin(Stdio::null())
            .output()
        {
            Ok(out) if out.status.success() => {}
            Ok(out) => eprintln!(
                "warning: ip netns del {} failed: {}",
                self.name,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
            Err(e) => eprintln!("warning: ip netns del {}: {e}", self.name),
        }
    }
}

/// A child process that is stopped when the guard drops: SIGTERM, up to
/// [`ChildGuard::GRACE`] to exit, then SIGKILL; always reaped. Signals go to
/// the child's own pid only (it is not reaped before, so the pid cannot have
/// been reused).
#[derive(Debug)]
pub struct ChildGuard(pub Child);

impl ChildGuard {
    pub const GRACE: Duration = Duration::from_secs(2);

    pub fn new(child: Child) -> Self {
        Self(child)
    }
}

impl From<Child> for ChildGuard {
    fn from(child: Child) -> Self {
        Self(child)
    }
}

impl std::ops::Deref for ChildGuard {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for ChildGuard {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Ok(Some(_)) = self.0.try_wait() {
            return;
        }
        if let Ok(pid) = i32::try_from(self.0.id()) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGTERM,
            );
            let deadline = Instant::now() + Self::GRACE;
            while Instant::now() < deadline {
                match self.0.try_wait() {
                    Ok(Some(_)) | Err(_) => return,
                    Ok(None) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::skip::require_root;
    use std::collections::HashSet;
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};

    #[test]
    fn names_are_unique_and_ifnames_fit() {
        let mut seen = HashSet::new();
        for p in ["a", "veth-host-side-long", "", "x.y"] {
            for _ in 0..200 {
                let n = unique_ifname(p);
                assert!(n.len() <= IFNAME_MAX, "{n} too long");
                assert!(!n.contains(['/', ' ', ':']), "{n}");
                assert!(seen.insert(n.clone()), "{n} repeated");
                let m = unique_name(p);
                assert!(m.starts_with("tern-"));
                assert!(seen.insert(m.clone()), "{m} repeated");
            }
        }
    }

    #[test]
    fn sysctl_keys_are_limited_to_net() {
        assert_eq!(
            sysctl_path("net.ipv4.ip_forward").unwrap(),
            Path::new("/proc/sys/net/ipv4/ip_forward")
        );
        assert_eq!(
            sysctl_path("net/ipv4/conf/eth0.100/rp_filter").unwrap(),
            Path::new("/proc/sys/net/ipv4/conf/eth0.100/rp_filter")
        );
        assert!(sysctl_path("kernel.pid_max").is_err());
        assert!(sysctl_path("net/../kernel/pid_max").is_err());
    }

    #[test]
    fn netns_is_gone_after_drop() -> Result<()> {
        if !require_root("netns_is_gone_after_drop") {
            return Ok(());
        }
        let ns = Netns::new("drop")?;
        let (name, path) = (ns.name().to_owned(), ns.path().to_owned());
        assert!(path.exists());
        let links = ns.sh("ip -o link show")?;
        assert_eq!(links.lines().count(), 1, "fresh netns has only lo: {links}");
        assert!(links.contains("lo:") && links.contains("UP"), "{links}");
        drop(ns);
        assert!(!path.exists(), "{} still exists", path.display());
        let list = output(Command::new("ip").args(["netns", "list"]))?;
        assert!(
            !list
                .lines()
                .any(|l| l.split_whitespace().next() == Some(&name)),
            "{name} still listed: {list}"
        );
        Ok(())
    }

    #[test]
    fn netns_is_gone_after_panic() {
        if !require_root("netns_is_gone_after_panic") {
            return;
        }
        let path = std::panic::catch_unwind(|| {
            let ns = Netns::new("panic").unwrap();
            let path = ns.path().to_owned();
            std::panic::panic_any(path);
        })
        .expect_err("closure panics");
        let path = path.downcast::<PathBuf>().expect("payload is the path");
        assert!(!path.exists(), "{} left behind", path.display());
    }

    #[test]
    fn tcp_across_a_veth_between_two_netns() -> Result<()> {
        if !require_root("tcp_across_a_veth_between_two_netns") {
            return Ok(());
        }
        let a = Netns::new("a")?;
        let b = Netns::new("b")?;
        let (va, vb) = (unique_ifname("va"), unique_ifname("vb"));
        // Created inside `a`, the peer goes straight to `b`: the root
        // namespace never sees either end.
        a.sh(&format!(
            "ip link add {va} type veth peer name {vb} netns {}
             ip addr add 10.251.0.1/30 dev {va}
             ip link set {va} up",
            b.name()
        ))?;
        b.sh(&format!(
            "ip addr add 10.251.0.2/30 dev {vb}
             ip link set {vb} up"
        ))?;
        let root_sees = Command::new("ip")
            .args(["link", "show", "dev", &va])
            .stderr(Stdio::null())
            .stdout(Stdio::null())
            .status()?;
        assert!(!root_sees.success(), "{va} is visible in the root netns");

        let listener = b.run(|| TcpListener::bind("10.251.0.2:0"))?;
        let addr = listener.local_addr()?;
        let server = std::thread::spawn(move || -> io::Result<(String, std::net::SocketAddr)> {
            let (mut conn, peer) = listener.accept()?;
            let mut msg = String::new();
            conn.read_to_string(&mut msg)?;
            conn.write_all(b"pong")?;
            Ok((msg, peer))
        });
        let mut client = a.run(|| TcpStream::connect_timeout(&addr, Duration::from_secs(5)))?;
        client.set_read_timeout(Some(Duration::from_secs(5)))?;
        client.write_all(b"hello from a")?;
        client.shutdown(std::net::Shutdown::Write)?;
        let mut reply = String::new();
        client.read_to_string(&mut reply)?;
        let (msg, peer) = server.join().expect("server thread")?;
        assert_eq!(msg, "hello from a");
        assert_eq!(reply, "pong");
        assert_eq!(peer.ip().to_string(), "10.251.0.1");

        // /proc/thread-self/net follows the thread's netns; /proc/self/net
        // (the main thread's) does not.
        let (thread_view, self_view) = b.run(|| {
            (
                fs::read_to_string("/proc/thread-self/net/dev").unwrap(),
                fs::read_to_string("/proc/self/net/dev").unwrap(),
            )
        });
        assert!(thread_view.contains(&vb));
        assert!(!self_view.contains(&vb));
        Ok(())
    }

    #[test]
    fn exec_and_sysctl_stay_inside() -> Result<()> {
        if !require_root("exec_and_sysctl_stay_inside") {
            return Ok(());
        }
        let ns = Netns::new("sysctl")?;
        let root_before = fs::read_to_string("/proc/sys/net/ipv4/ip_forward")?;
        let want = if root_before.trim() == "1" { "0" } else { "1" };
        ns.sysctl("net.ipv4.ip_forward", want)?;
        assert_eq!(ns.sysctl_get("net.ipv4.ip_forward")?, want);
        // A separate process inside the netns sees the same value.
        let out = ns.exec(["cat", "/proc/sys/net/ipv4/ip_forward"])?;
        assert!(out.status.success());
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), want);
        // The machine's own value is untouched.
        assert_eq!(
            fs::read_to_string("/proc/sys/net/ipv4/ip_forward")?,
            root_before
        );
        assert!(ns.sysctl("kernel.pid_max", "1").is_err());
        // exec keeps the mount namespace (unlike `ip netns exec`), so /sys
        // and bpffs stay the machine's; the network namespace is the netns'.
        let ns_links = ns.exec(["readlink", "/proc/self/ns/mnt", "/proc/self/ns/net"])?;
        let ns_links = String::from_utf8_lossy(&ns_links.stdout).into_owned();
        let mut ns_links = ns_links.lines();
        let own_mnt = fs::read_link("/proc/self/ns/mnt")?;
        let own_net = fs::read_link("/proc/self/ns/net")?;
        assert_eq!(ns_links.next(), own_mnt.to_str());
        assert_ne!(ns_links.next(), own_net.to_str());
        let err = ns
            .sh("echo out; echo err >&2; exit 3")
            .unwrap_err()
            .to_string();
        assert!(err.contains("out") && err.contains("err"), "{err}");
        Ok(())
    }

    #[test]
    fn child_guard_kills_on_drop() -> Result<()> {
        if !require_root("child_guard_kills_on_drop") {
            return Ok(());
        }
        let ns = Netns::new("child")?;
        let mut cmd = Command::new("sleep");
        cmd.arg("600");
        let guard = ns.spawn_guarded(cmd)?;
        let pid = guard.id();
        let netns_of = |pid: &str| fs::read_link(format!("/proc/{pid}/ns/net")).unwrap();
        let inside = ns.run(|| netns_of("thread-self"));
        assert_eq!(netns_of(&pid.to_string()), inside);
        assert_ne!(inside, netns_of("thread-self"));
        let started = Instant::now();
        drop(guard);
        assert!(
            started.elapsed() < ChildGuard::GRACE,
            "sleep ignored SIGTERM?"
        );
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "{pid} still there"
        );
        Ok(())
    }
}
