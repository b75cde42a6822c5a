//! The agent's state files as a restarted agent finds them: `ipam.json`
//! (the PodCIDR's allocations) and `endpoints.json` (the pods' endpoints).
//!
//! Input: one byte choosing the file (even: ipam.json, odd:
//! endpoints.json); for ipam.json five more bytes give the configured
//! PodCIDR (prefix length, address); the rest is the file.
//!
//! A loaded IPAM must hand a new pod an address of the PodCIDR that is
//! neither reserved nor in use (or say it is exhausted only when it is),
//! keep what it loaded, and write a file that loads to the same state.

#![no_main]

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use ipnetwork::Ipv4Network;
use libfuzzer_sys::fuzz_target;
use tern_agent::endpoints::EndpointStore;
use tern_agent::ipam::{Ipam, IpamError};
use tern_api::Attachment;

/// Where the state files are written (and fsynced) before they count:
/// `TERN_FUZZ_STATE_DIR` (`cargo xtask fuzz` gives one and removes it
/// after the run), else a directory of this process on tmpfs.
fn state_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        if let Some(dir) = std::env::var_os("TERN_FUZZ_STATE_DIR") {
            return PathBuf::from(dir);
        }
        let base = if Path::new("/dev/shm").is_dir() {
            PathBuf::from("/dev/shm")
        } else {
            std::env::temp_dir()
        };
        base.join(format!("tern-fuzz-state-{}", std::process::id()))
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode & 1 == 0 {
        ipam(rest);
    } else {
        endpoints(rest);
    }
});

fn ipam(data: &[u8]) {
    let Some((head, file)) = data.split_first_chunk::<5>() else {
        return;
    };
    let prefix = head[0] % 33;
    let address = Ipv4Addr::new(head[1], head[2], head[3], head[4]);
    let Ok(net) = Ipv4Network::new(address, prefix) else {
        return;
    };
    // A PodCIDR is a network address (the sources refuse others).
    let Ok(cidr) = Ipv4Network::new(net.network(), prefix) else {
        return;
    };
    let path = state_dir().join("ipam.json");
    let mut ipam = match Ipam::load(cidr, &path, Some(file)) {
        Ok(ipam) => ipam,
        Err(IpamError::TooSmall(_)) => {
            assert!(prefix > 30);
            return;
        }
        Err(IpamError::Corrupt { .. }) => return,
        Err(e) => panic!("loading from bytes: {e}"),
    };
    let loaded: Vec<(Attachment, Ipv4Addr)> =
        ipam.allocations().map(|(a, ip)| (a.clone(), ip)).collect();
    assert_eq!(loaded.len(), ipam.allocated());
    for (a, ip) in &loaded {
        assert_eq!(ipam.get(a), Some(*ip));
    }
    let network = u32::from(cidr.network());
    let usable = |ip: Ipv4Addr| {
        cidr.contains(ip)
            && ip != cidr.network()
            && ip != cidr.broadcast()
            && u32::from(ip) != network.wrapping_add(1)
    };
    let in_use: BTreeSet<Ipv4Addr> = loaded.iter().map(|(_, ip)| *ip).collect();
    let usable_in_use = in_use.iter().filter(|ip| usable(**ip)).count();
    assert!(ipam.capacity() >= usable_in_use);

    // A pod the file does not know.
    let fresh = Attachment {
        container_id: "fuzz-fresh-container".into(),
        ifname: "eth0".into(),
    };
    let known = ipam.get(&fresh);
    let _ = std::fs::remove_file(&path);
    match ipam.allocate(&fresh) {
        Ok(ip) => match known {
            Some(had) => assert_eq!(ip, had, "an attachment keeps its address"),
            None => {
                assert!(usable(ip), "{ip} handed out in {cidr}");
                assert!(!in_use.contains(&ip), "{ip} handed out twice");
            }
        },
        Err(IpamError::Exhausted(..)) => {
            assert!(known.is_none());
            assert_eq!(usable_in_use, ipam.capacity(), "exhausted with room left");
            return;
        }
        Err(e) => panic!("allocate: {e}"),
    }
    if known.is_some() {
        return; // nothing changed, nothing written
    }

    // What was written loads back to the same state.
    let written = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) => panic!("reading back {}: {e}", path.display()),
    };
    let reloaded = match Ipam::load(cidr, &path, Some(&written)) {
        Ok(i) => i,
        Err(e) => panic!("the written state does not load: {e}"),
    };
    let before: Vec<_> = ipam.allocations().map(|(a, ip)| (a.clone(), ip)).collect();
    let after: Vec<_> = reloaded
        .allocations()
        .map(|(a, ip)| (a.clone(), ip))
        .collect();
    assert_eq!(before, after);

    // Giving it back leaves what was loaded.
    let released = match ipam.release(&fresh) {
        Ok(r) => r,
        Err(e) => panic!("release: {e}"),
    };
    assert!(released.is_some());
    let now: Vec<(Attachment, Ipv4Addr)> =
        ipam.allocations().map(|(a, ip)| (a.clone(), ip)).collect();
    assert_eq!(now, loaded);
}

fn endpoints(file: &[u8]) {
    let path = state_dir().join("endpoints.json");
    let Ok(mut store) = EndpointStore::load(&path, Some(file)) else {
        return;
    };
    let loaded: Vec<_> = store.iter().cloned().collect();
    assert_eq!(loaded.len(), store.len());
    for e in &loaded {
        assert_eq!(store.get(&e.attachment), Some(e));
    }
    // Written back (a removal persists the rest) and loaded again: the same.
    let Some(first) = loaded.first() else {
        return;
    };
    let _ = std::fs::remove_file(&path);
    match store.remove(&first.attachment) {
        Ok(Some(removed)) => assert_eq!(&removed, first),
        Ok(None) => panic!("a loaded endpoint is not there to remove"),
        Err(e) => panic!("remove: {e:#}"),
    }
    let written = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) => panic!("reading back {}: {e}", path.display()),
    };
    let reloaded = match EndpointStore::load(&path, Some(&written)) {
        Ok(s) => s,
        Err(e) => panic!("the written state does not load: {e:#}"),
    };
    assert!(reloaded.iter().eq(&loaded[1..]));
}
