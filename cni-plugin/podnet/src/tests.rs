//! These tests need root. They never touch the machine's own namespace:
//! both the "pod" and the "host" are fresh `ip netns` namespaces, and the
//! functions under test are called from a thread that entered the "host"
//! one (their worker threads inherit it, see
//! `new_thread_inherits_creator_thread_netns`). Names carry the pid so
//! concurrent runs do not collide; a Drop guard deletes the namespaces.

use super::netlink::MAX_IFNAME_LEN;
use super::*;

use std::fs::File;
use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use nix::sched::{CloneFlags, setns};
use tern_lab::skip::require_root;

/// A named netns (`ip netns add`), deleted on drop (also when unwinding).
struct Netns {
    name: String,
}

impl Netns {
    fn new() -> Self {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let name = format!("tern-pn-{}-{n}", std::process::id());
        let out = Command::new("ip")
            .args(["netns", "add", &name])
            .output()
            .expect("running ip netns add");
        assert!(
            out.status.success(),
            "ip netns add {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Netns { name }
    }

    fn path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.name)
    }

    /// `ip -n <self> <cmd>` (cmd split on whitespace); panics on failure.
    fn ip(&self, cmd: &str) -> String {
        let (ok, out) = self.try_ip(cmd);
        assert!(ok, "ip -n {} {cmd} failed: {out}", self.name);
        out
    }

    fn try_ip(&self, cmd: &str) -> (bool, String) {
        let out = Command::new("ip")
            .arg("-n")
            .arg(&self.name)
            .args(cmd.split_whitespace())
            .output()
            .expect("running ip");
        let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.push_str(&String::from_utf8_lossy(&out.stderr));
        (out.status.success(), text)
    }

    /// Runs `f` on a new thread that has entered this netns. Functions
    /// under test called from there treat this netns as "the host".
    fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let file = File::open(self.path()).expect("opening test netns");
        std::thread::scope(|s| {
            s.spawn(move || {
                setns(file.as_fd(), CloneFlags::CLONE_NEWNET).expect("setns into test netns");
                f()
            })
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p))
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

fn netns_inode(path: &Path) -> u64 {
    std::fs::metadata(path).expect("stat netns").ino()
}

fn thread_netns() -> u64 {
    netns_inode(Path::new("/proc/thread-self/ns/net"))
}

fn spec<'a>(pod: &'a Path, ifname: &'a str, host_ifname: &'a str) -> PodInterfaceSpec<'a> {
    PodInterfaceSpec {
        netns: pod,
        ifname,
        host_ifname,
        address: Ipv4Addr::new(10, 77, 3, 4),
        mtu: 1400,
    }
}

#[test]
fn temp_peer_name_fits() {
    assert_eq!(temp_peer_name("tern0123456789a"), "tmpn0123456789a");
    assert_eq!(temp_peer_name("veth1"), "tmpveth1");
    assert!(temp_peer_name("ééééééé").len() <= MAX_IFNAME_LEN);
    assert!(!valid_ifname("abcdefghijklmnop"));
    assert!(!valid_ifname("a/b"));
    assert!(valid_ifname("eth0"));
}

/// The whole module relies on this: a std::thread starts in the netns of
/// the thread that spawned it, not in the process's "main" netns.
#[test]
fn new_thread_inherits_creator_thread_netns() {
    if !require_root("podnet::new_thread_inherits_creator_thread_netns") {
        return;
    }
    let host = Netns::new();
    let host_ino = netns_inode(&host.path());
    let caller_ino = thread_netns();
    assert_ne!(host_ino, caller_ino);
    let (inside, grandchild) = host.run(|| {
        let grandchild = std::thread::spawn(thread_netns).join().unwrap();
        (thread_netns(), grandchild)
    });
    assert_eq!(inside, host_ino);
    assert_eq!(grandchild, host_ino, "spawned thread did not inherit netns");
    // And the caller's thread was never moved.
    assert_eq!(thread_netns(), caller_ino);
}

#[test]
fn create_check_delete_lifecycle() {
    if !require_root("podnet::create_check_delete_lifecycle") {
        return;
    }
    let host = Netns::new();
    let pod = Netns::new();
    let pod_path = pod.path();
    let s = spec(&pod_path, "eth0", "ternpn0");
    let caller_ino = thread_netns();

    let pi = host.run(|| create(&s)).expect("create");
    assert_eq!(thread_netns(), caller_ino);
    // CHECK does not read the namespace cookie; ADD does, and it is the
    // pod's namespace's, not the caller's.
    let pod_cookie = pi.netns_cookie.expect("ADD reads the pod netns cookie");
    assert_ne!(Some(pod_cookie), host.run(current_netns_cookie));
    let pi = PodInterface {
        netns_cookie: None,
        ..pi
    };
    assert_eq!(host.run(|| check(&s)).expect("check"), pi);
    assert_eq!(
        host.run(|| host_link("ternpn0")).unwrap(),
        Some((pi.host_ifindex, pi.host_mac))
    );
    // The test thread's own netns has no such link (read-only look-up).
    assert!(!host_link_exists("ternpn0").unwrap());

    // Pod side, as `ip` sees it.
    let link = pod.ip("-o link show eth0");
    assert!(link.contains("mtu 1400"), "{link}");
    assert!(link.contains(",UP"), "{link}");
    assert!(
        link.contains(&format!("link/ether {}", format_mac(&pi.pod_mac))),
        "{link}"
    );
    assert!(
        link.contains(&format!("eth0@if{}", pi.host_ifindex)),
        "{link}"
    );
    assert!(link.starts_with(&format!("{}: ", pi.pod_ifindex)), "{link}");
    let lo = pod.ip("-o link show lo");
    assert!(lo.contains(",UP"), "{lo}");
    let addr = pod.ip("-o -4 addr show dev eth0");
    assert!(addr.contains("inet 10.77.3.4/32"), "{addr}");
    let routes = pod.ip("-4 route show");
    assert!(
        routes.contains("default via 169.254.1.1 dev eth0"),
        "{routes}"
    );
    let gw = pod.ip("-4 route show 169.254.1.1/32");
    assert!(
        gw.contains("169.254.1.1 dev eth0") && gw.contains("scope link"),
        "{gw}"
    );
    let neigh = pod.ip("neigh show dev eth0");
    assert!(
        neigh.contains(&format!(
            "169.254.1.1 lladdr {} PERMANENT",
            format_mac(&pi.host_mac)
        )),
        "{neigh}"
    );
    // Only lo and eth0 in the pod: the temporary name is gone.
    assert_eq!(pod.ip("-o link show").lines().count(), 2);
    // Host side.
    let hlink = host.ip("-o link show ternpn0");
    assert!(
        hlink.contains("mtu 1400") && hlink.contains(",UP"),
        "{hlink}"
    );
    assert!(
        hlink.contains(&format!("link/ether {}", format_mac(&pi.host_mac))),
        "{hlink}"
    );
    let hroute = host.ip("-4 route show 10.77.3.4/32");
    assert!(hroute.contains("10.77.3.4 dev ternpn0"), "{hroute}");
    assert!(hroute.contains("scope link"), "{hroute}");

    // Creating again fails before touching anything.
    let err = host.run(|| create(&s)).unwrap_err();
    assert!(
        matches!(&err, PodNetError::InterfaceExists(n) if n == "eth0"),
        "{err:?}"
    );
    let other_host = spec(&pod_path, "eth0", "ternpn1");
    let err = host.run(|| create(&other_host)).unwrap_err();
    assert!(
        matches!(&err, PodNetError::InterfaceExists(n) if n == "eth0"),
        "{err:?}"
    );
    assert!(!host.run(|| host_link_exists("ternpn1")).unwrap());
    // A taken host name, for another pod.
    let other_pod = Netns::new();
    let other_pod_path = other_pod.path();
    let taken_host = spec(&other_pod_path, "eth0", "ternpn0");
    let err = host.run(|| create(&taken_host)).unwrap_err();
    assert!(
        matches!(&err, PodNetError::InterfaceExists(n) if n == "ternpn0"),
        "{err:?}"
    );
    assert!(!other_pod.try_ip("link show eth0").0);
    // A second interface in a pod Tern already wired: refused, nothing made.
    let other_pod_if = spec(&pod_path, "eth1", "ternpn2");
    let err = host.run(|| create(&other_pod_if)).unwrap_err();
    assert!(
        matches!(&err, PodNetError::SecondInterface(n) if n == "eth0"),
        "{err:?}"
    );
    assert!(!pod.try_ip("link show eth1").0);
    assert!(!host.run(|| host_link_exists("ternpn2")).unwrap());
    assert_eq!(host.run(|| check(&s)).expect("check still ok"), pi);

    // Delete, twice.
    host.run(|| delete(Some(&pod_path), "eth0", "ternpn0"))
        .expect("delete");
    assert!(!host.run(|| host_link_exists("ternpn0")).unwrap());
    assert!(!pod.try_ip("link show eth0").0);
    assert!(host.ip("-4 route show 10.77.3.4/32").trim().is_empty());
    host.run(|| delete(Some(&pod_path), "eth0", "ternpn0"))
        .expect("second delete");
    host.run(|| delete(None, "eth0", "ternpn0"))
        .expect("delete without netns");
    let err = host.run(|| check(&s)).unwrap_err();
    assert!(matches!(err, PodNetError::Check(_)), "{err:?}");

    // Recreate, then delete after the pod netns is gone.
    host.run(|| create(&s)).expect("recreate");
    drop(pod);
    host.run(|| delete(Some(&pod_path), "eth0", "ternpn0"))
        .expect("delete, netns gone");
    assert!(!host.run(|| host_link_exists("ternpn0")).unwrap());
    host.run(|| delete(Some(&pod_path), "eth0", "ternpn0"))
        .expect("delete again");
    assert_eq!(host.ip("-o link show").lines().count(), 1);
}

#[test]
fn delete_removes_pod_end_when_host_end_is_gone() {
    if !require_root("podnet::delete_removes_pod_end_when_host_end_is_gone") {
        return;
    }
    let host = Netns::new();
    let pod = Netns::new();
    let pod_path = pod.path();
    // A stray interface called like CNI_IFNAME, with no host veth. (No
    // dummy driver in this kernel: a veth pair inside the pod instead.)
    pod.ip("link add eth0 type veth peer name stray0");
    host.run(|| delete(Some(&pod_path), "eth0", "ternpn0"))
        .expect("delete");
    assert!(!pod.try_ip("link show eth0").0);
    assert!(!pod.try_ip("link show stray0").0);
}

#[test]
fn check_reports_differences() {
    if !require_root("podnet::check_reports_differences") {
        return;
    }
    let host = Netns::new();
    let pod = Netns::new();
    let pod_path = pod.path();
    let s = spec(&pod_path, "eth0", "ternpn0");
    let pi = host.run(|| create(&s)).expect("create");
    let host_mac = format_mac(&pi.host_mac);

    let expect_check = |needle: &str| {
        let err = host.run(|| check(&s)).unwrap_err();
        match &err {
            PodNetError::Check(msg) => assert!(msg.contains(needle), "{msg}"),
            other => panic!("expected Check(..{needle}..), got {other:?}"),
        }
    };
    let expect_ok = |what: &str| {
        if let Err(e) = host.run(|| check(&s)) {
            panic!("check after {what}: {e:?}");
        }
    };

    pod.ip("link set eth0 mtu 1300");
    expect_check("MTU");
    pod.ip("link set eth0 mtu 1400");
    expect_ok("restoring MTU");

    pod.ip("route del default");
    expect_check("default route");
    pod.ip("route add default via 169.254.1.1 dev eth0");
    expect_ok("restoring default route");

    pod.ip("neigh replace 169.254.1.1 lladdr 02:00:00:00:00:01 dev eth0 nud permanent");
    expect_check("(the host veth)");
    pod.ip(&format!(
        "neigh replace 169.254.1.1 lladdr {host_mac} dev eth0 nud permanent"
    ));
    expect_ok("restoring neighbour");

    pod.ip("addr del 10.77.3.4/32 dev eth0");
    expect_check("10.77.3.4/32");
    // Removing the last IPv4 address of a device flushes its routes and
    // its neighbour entries (permanent ones included) as well.
    pod.ip("addr add 10.77.3.4/32 dev eth0");
    expect_check("route 169.254.1.1/32");
    // A pod without the entry resolves the gateway by ARP (the datapath
    // answers); what it learned that way is fine too.
    pod.ip("route add 169.254.1.1/32 dev eth0 scope link");
    pod.ip("route add default via 169.254.1.1 dev eth0");
    expect_ok("restoring address and routes, no gateway neighbour");
    pod.ip(&format!(
        "neigh add 169.254.1.1 lladdr {host_mac} dev eth0 nud reachable"
    ));
    expect_ok("a learned gateway neighbour");
    // A MAC change (the tuning plugin) flushes the permanent entry.
    pod.ip(&format!(
        "neigh replace 169.254.1.1 lladdr {host_mac} dev eth0 nud permanent"
    ));
    pod.ip("link set eth0 address 02:00:00:00:00:42");
    assert!(
        !pod.ip("neigh show dev eth0").contains("PERMANENT"),
        "the MAC change left the permanent entry"
    );
    expect_ok("a MAC change");

    host.ip("route del 10.77.3.4/32");
    expect_check("host route");
    host.ip("route add 10.77.3.4/32 dev ternpn0 scope link");
    expect_ok("restoring host route");

    host.ip("link set ternpn0 down");
    expect_check("not up");
    host.ip("link set ternpn0 up");
    // Setting a device down flushes the routes through it.
    expect_check("host route");
    host.ip("route add 10.77.3.4/32 dev ternpn0 scope link");
    expect_ok("setting host veth up and restoring its route");

    let wrong = spec(&pod_path, "eth0", "ternpnX");
    let err = host.run(|| check(&wrong)).unwrap_err();
    assert!(matches!(err, PodNetError::Check(_)), "{err:?}");

    host.run(|| delete(Some(&pod_path), "eth0", "ternpn0"))
        .expect("delete");
}

#[test]
fn missing_netns_fails_and_leaves_nothing() {
    if !require_root("podnet::missing_netns_fails_and_leaves_nothing") {
        return;
    }
    let host = Netns::new();
    let missing = PathBuf::from(format!("/run/netns/tern-pn-{}-missing", std::process::id()));
    let s = spec(&missing, "eth0", "ternpn0");
    let err = host.run(|| create(&s)).unwrap_err();
    assert!(
        matches!(&err, PodNetError::NetnsMissing(p) if *p == missing),
        "{err:?}"
    );
    assert!(!host.run(|| host_link_exists("ternpn0")).unwrap());
    let err = host.run(|| check(&s)).unwrap_err();
    assert!(matches!(err, PodNetError::NetnsMissing(_)), "{err:?}");
    host.run(|| delete(Some(&missing), "eth0", "ternpn0"))
        .expect("delete");

    // Paths that exist but are not network namespaces.
    let not_ns = std::env::temp_dir().join(format!("tern-pn-{}-file", std::process::id()));
    std::fs::write(&not_ns, b"").unwrap();
    for path in [not_ns.as_path(), Path::new("/proc/self/ns/mnt")] {
        let s = spec(path, "eth0", "ternpn0");
        let err = host.run(|| create(&s)).unwrap_err();
        assert!(
            matches!(err, PodNetError::NetnsMissing(_)),
            "{path:?}: {err:?}"
        );
        host.run(|| delete(Some(path), "eth0", "ternpn0"))
            .expect("delete");
    }
    let _ = std::fs::remove_file(&not_ns);

    let links = host.ip("-o link show");
    assert_eq!(links.lines().count(), 1, "only lo expected: {links}");
}

#[test]
fn failure_after_veth_creation_rolls_back() {
    if !require_root("podnet::failure_after_veth_creation_rolls_back") {
        return;
    }
    let host = Netns::new();
    let pod = Netns::new();
    let pod_path = pod.path();
    // A default route already in the pod makes step (4) fail late.
    pod.ip("link add d0 type veth peer name d1");
    pod.ip("link set d0 up");
    pod.ip("route add default dev d0");

    let s = spec(&pod_path, "eth0", "ternpn0");
    let err = host.run(|| create(&s)).unwrap_err();
    match &err {
        PodNetError::Netlink(msg) => assert!(msg.contains("default route"), "{msg}"),
        other => panic!("expected Netlink error, got {other:?}"),
    }
    assert!(!host.run(|| host_link_exists("ternpn0")).unwrap());
    let links = host.ip("-o link show");
    assert_eq!(links.lines().count(), 1, "only lo expected: {links}");
    let pod_links = pod.ip("-o link show");
    assert_eq!(
        pod_links.lines().count(),
        3,
        "only lo, d0, d1 expected: {pod_links}"
    );
    assert!(host.ip("-4 route show").trim().is_empty());

    // An MTU the veth driver refuses fails at creation; nothing left.
    pod.ip("route del default");
    let big = PodInterfaceSpec { mtu: 1 << 20, ..s };
    let err = host.run(|| create(&big)).unwrap_err();
    assert!(matches!(err, PodNetError::Netlink(_)), "{err:?}");
    assert!(!host.run(|| host_link_exists("ternpn0")).unwrap());
    assert_eq!(pod.ip("-o link show").lines().count(), 3);

    // With the obstacle gone the same spec works.
    host.run(|| create(&s)).expect("create");
    host.run(|| check(&s)).expect("check");
}

#[test]
fn shape_and_check_shape() {
    if !require_root("podnet::shape_and_check_shape") {
        return;
    }
    let host = Netns::new();
    let pod = Netns::new();
    let pod_path = pod.path();
    let s = spec(&pod_path, "eth0", "ternpn5");
    host.run(|| create(&s)).expect("create");
    let ingress = Some(Limit {
        rate_bits: 20_000_000,
        burst_bits: 0,
    });
    let egress = Some(Limit {
        rate_bits: 10_000_000,
        burst_bits: 80_000,
    });
    host.run(|| shape(&pod_path, "eth0", "ternpn5", ingress, egress))
        .expect("shape");
    let qdisc = |ns: &Netns, dev: &str| {
        let out = Command::new("tc")
            .args(["-n", &ns.name, "qdisc", "show", "dev", dev])
            .output()
            .expect("tc");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let host_side = qdisc(&host, "ternpn5");
    assert!(
        host_side.contains("tbf") && host_side.contains("rate 20Mbit"),
        "{host_side}"
    );
    let pod_side = qdisc(&pod, "eth0");
    assert!(
        pod_side.contains("tbf") && pod_side.contains("rate 10Mbit"),
        "{pod_side}"
    );
    host.run(|| check_shape(&pod_path, "eth0", "ternpn5", ingress, egress))
        .expect("check_shape");
    let other = Some(Limit {
        rate_bits: 30_000_000,
        burst_bits: 0,
    });
    let err = host
        .run(|| check_shape(&pod_path, "eth0", "ternpn5", other, None))
        .unwrap_err();
    assert!(matches!(err, PodNetError::Check(_)), "{err:?}");
    host.run(|| delete(Some(&pod_path), "eth0", "ternpn5"))
        .expect("delete");
}
