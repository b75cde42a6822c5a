//! Address management for the node's PodCIDR.
//!
//! Every change is written to the state dir (write to a temporary file, then
//! rename) before it is acknowledged, so a restarted agent never hands out an
//! address that is still in use.

use std::collections::BTreeMap;
use std::io::Write;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use ipnetwork::Ipv4Network;
use serde::{Deserialize, Serialize};
use tern_api::Attachment;

#[derive(Debug, thiserror::Error)]
pub enum IpamError {
    #[error("no free address left in PodCIDR {0} ({1} in use)")]
    Exhausted(Ipv4Network, usize),
    #[error("cannot persist IPAM state to {path}: {source}")]
    Persist {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("IPAM state file {path} is unreadable: {reason}")]
    Corrupt { path: PathBuf, reason: String },
    #[error("PodCIDR {0} is too small: it needs room for pods besides the reserved addresses")]
    TooSmall(Ipv4Network),
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct StateFile {
    #[serde(rename = "podCIDR")]
    pod_cidr: Ipv4Network,
    last: Option<Ipv4Addr>,
    allocations: Vec<Allocation>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Allocation {
    #[serde(rename = "containerID")]
    container_id: String,
    ifname: String,
    ip: Ipv4Addr,
}

pub struct Ipam {
    cidr: Ipv4Network,
    path: PathBuf,
    by_attachment: BTreeMap<Attachment, Ipv4Addr>,
    /// Last address handed out: the search continues after it, so a
    /// released address is not reused at once (as host-local does).
    last: Option<Ipv4Addr>,
}

impl Ipam {
    /// Opens the allocator, loading what `path` holds. Allocations outside a
    /// changed PodCIDR are kept (their pods still run) but never handed out.
    pub fn open(cidr: Ipv4Network, path: &Path) -> Result<Self, IpamError> {
        if cidr.prefix() > 30 {
            return Err(IpamError::TooSmall(cidr));
        }
        match std::fs::read(path) {
            Ok(bytes) => Ipam::load(cidr, path, Some(&bytes)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ipam::load(cidr, path, None),
            Err(source) => Err(IpamError::Persist {
                path: path.to_owned(),
                source,
            }),
        }
    }

    /// [`Ipam::open`] of a state file holding `bytes` (`None`: no file
    /// yet), without reading it; changes are written to `path`.
    pub fn load(cidr: Ipv4Network, path: &Path, bytes: Option<&[u8]>) -> Result<Self, IpamError> {
        if cidr.prefix() > 30 {
            return Err(IpamError::TooSmall(cidr));
        }
        let mut ipam = Ipam {
            cidr,
            path: path.to_owned(),
            by_attachment: BTreeMap::new(),
            last: None,
        };
        if let Some(bytes) = bytes {
            let state: StateFile =
                serde_json::from_slice(bytes).map_err(|e| IpamError::Corrupt {
                    path: path.to_owned(),
                    reason: e.to_string(),
                })?;
            ipam.last = state.last.filter(|ip| cidr.contains(*ip));
            for a in state.allocations {
                let attachment = Attachment {
                    container_id: a.container_id,
                    ifname: a.ifname,
                };
                ipam.by_attachment.insert(attachment, a.ip);
            }
        }
        Ok(ipam)
    }

    pub fn cidr(&self) -> Ipv4Network {
        self.cidr
    }

    /// Addresses pods can get: all but network, router (first) and broadcast.
    pub fn capacity(&self) -> usize {
        usize::try_from(self.size())
            .unwrap_or(usize::MAX)
            .saturating_sub(3)
    }

    /// Addresses in the PodCIDR: 2^32 for a /0, which
    /// `Ipv4Network::size` (a u32) reports as 2^32 - 1.
    fn size(&self) -> u64 {
        1u64 << (32 - u32::from(self.cidr.prefix()))
    }

    pub fn allocated(&self) -> usize {
        self.by_attachment.len()
    }

    pub fn get(&self, attachment: &Attachment) -> Option<Ipv4Addr> {
        self.by_attachment.get(attachment).copied()
    }

    pub fn allocations(&self) -> impl Iterator<Item = (&Attachment, Ipv4Addr)> {
        self.by_attachment.iter().map(|(a, ip)| (a, *ip))
    }

    /// The address of `attachment`, allocating one if it has none yet.
    pub fn allocate(&mut self, attachment: &Attachment) -> Result<Ipv4Addr, IpamError> {
        if let Some(ip) = self.get(attachment) {
            return Ok(ip);
        }
        let ip = self
            .next_free()
            .ok_or(IpamError::Exhausted(self.cidr, self.allocated()))?;
        self.by_attachment.insert(attachment.clone(), ip);
        let previous_last = self.last.replace(ip);
        if let Err(e) = self.persist() {
            self.by_attachment.remove(attachment);
            self.last = previous_last;
            return Err(e);
        }
        Ok(ip)
    }

    /// Gives the address back; `None` when the attachment had none.
    pub fn release(&mut self, attachment: &Attachment) -> Result<Option<Ipv4Addr>, IpamError> {
        let Some(ip) = self.by_attachment.remove(attachment) else {
            return Ok(None);
        };
        if let Err(e) = self.persist() {
            self.by_attachment.insert(attachment.clone(), ip);
            return Err(e);
        }
        Ok(Some(ip))
    }

    /// Releases every allocation whose attachment `keep` rejects.
    pub fn release_all_except(
        &mut self,
        keep: impl Fn(&Attachment) -> bool,
    ) -> Result<Vec<(Attachment, Ipv4Addr)>, IpamError> {
        let stale: Vec<_> = self
            .by_attachment
            .iter()
            .filter(|(a, _)| !keep(a))
            .map(|(a, ip)| (a.clone(), *ip))
            .collect();
        if stale.is_empty() {
            return Ok(stale);
        }
        for (a, _) in &stale {
            self.by_attachment.remove(a);
        }
        if let Err(e) = self.persist() {
            self.by_attachment.extend(stale.iter().cloned());
            return Err(e);
        }
        Ok(stale)
    }

    fn is_reserved(&self, ip: Ipv4Addr) -> bool {
        let network = self.cidr.network();
        ip == network || ip == self.cidr.broadcast() || u32::from(ip) == u32::from(network) + 1
    }

    fn next_free(&self) -> Option<Ipv4Addr> {
        let in_use: std::collections::HashSet<Ipv4Addr> =
            self.by_attachment.values().copied().collect();
        // In u64: the search starts after `last`, which is 2^32 for the
        // last address of a /0 (it overflowed u32 there).
        let base = u64::from(u32::from(self.cidr.network()));
        let size = self.size();
        let start = self
            .last
            .map(|ip| u64::from(u32::from(ip)) - base + 1)
            .unwrap_or(0);
        (0..size)
            .filter_map(|i| u32::try_from(base + (start + i) % size).ok())
            .map(Ipv4Addr::from)
            .find(|ip| !self.is_reserved(*ip) && !in_use.contains(ip))
    }

    fn persist(&self) -> Result<(), IpamError> {
        let state = StateFile {
            pod_cidr: self.cidr,
            last: self.last,
            allocations: self
                .by_attachment
                .iter()
                .map(|(a, ip)| Allocation {
                    container_id: a.container_id.clone(),
                    ifname: a.ifname.clone(),
                    ip: *ip,
                })
                .collect(),
        };
        let bytes = serde_json::to_vec_pretty(&state).map_err(std::io::Error::other);
        bytes
            .and_then(|bytes| write_atomically(&self.path, &bytes))
            .map_err(|source| IpamError::Persist {
                path: self.path.clone(),
                source,
            })
    }
}

/// Writes `bytes` to `path` so a crash leaves either the old or the new
/// content, never a torn file. Root-only (0600): the state names every
/// pod, its address and network namespace.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(dir) = path.parent() {
        create_private_dir(dir)?;
    }
    let tmp = path.with_extension("tmp");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    // A leftover temporary file of an older agent keeps its mode otherwise.
    file.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    file.write_all(bytes)?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)
}

/// Creates `dir` (and its parents) if missing, and makes it root-only
/// (0700) either way: the agent's state directory.
pub fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn state_files_and_their_directory_are_root_only() {
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o7777;
        let base = std::env::temp_dir().join(format!("tern-state-mode-{}", std::process::id()));
        let dir = base.join("state");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        let file = dir.join("ipam.json");
        // A leftover temporary file, world-readable.
        std::fs::write(dir.join("ipam.tmp"), b"old").unwrap();
        std::fs::set_permissions(dir.join("ipam.tmp"), std::fs::Permissions::from_mode(0o644))
            .unwrap();
        write_atomically(&file, b"{}").unwrap();
        assert_eq!((mode(&dir), mode(&file)), (0o700, 0o600));
        std::fs::remove_dir_all(&base).unwrap();
    }

    fn att(id: &str) -> Attachment {
        Attachment {
            container_id: id.into(),
            ifname: "eth0".into(),
        }
    }

    fn open(dir: &tempfile::TempDir, cidr: &str) -> Ipam {
        Ipam::open(cidr.parse().unwrap(), &dir.path().join("ipam.json")).unwrap()
    }

    #[test]
    fn allocates_distinct_addresses_skipping_reserved_ones() {
        let dir = tempfile::tempdir().unwrap();
        let mut ipam = open(&dir, "10.244.1.0/29");
        assert_eq!(ipam.capacity(), 5);
        let ips: Vec<_> = (0..5)
            .map(|i| ipam.allocate(&att(&format!("c{i}"))).unwrap())
            .collect();
        let expected: Vec<Ipv4Addr> = (2..=6).map(|d| Ipv4Addr::new(10, 244, 1, d)).collect();
        assert_eq!(ips, expected);
    }

    #[test]
    fn allocate_is_idempotent_per_attachment() {
        let dir = tempfile::tempdir().unwrap();
        let mut ipam = open(&dir, "10.244.1.0/24");
        let a = ipam.allocate(&att("c1")).unwrap();
        assert_eq!(ipam.allocate(&att("c1")).unwrap(), a);
        assert_eq!(ipam.allocated(), 1);
        let other_if = Attachment {
            container_id: "c1".into(),
            ifname: "net1".into(),
        };
        assert_ne!(ipam.allocate(&other_if).unwrap(), a);
    }

    #[test]
    fn exhaustion_is_an_error_and_release_frees_an_address() {
        let dir = tempfile::tempdir().unwrap();
        let mut ipam = open(&dir, "10.244.1.0/30");
        assert_eq!(ipam.capacity(), 1);
        let ip = ipam.allocate(&att("c1")).unwrap();
        assert_eq!(ip, Ipv4Addr::new(10, 244, 1, 2));
        let err = ipam.allocate(&att("c2")).unwrap_err();
        assert!(matches!(err, IpamError::Exhausted(_, 1)), "{err}");
        assert_eq!(ipam.release(&att("c1")).unwrap(), Some(ip));
        assert_eq!(
            ipam.release(&att("c1")).unwrap(),
            None,
            "released exactly once"
        );
        assert_eq!(ipam.allocate(&att("c2")).unwrap(), ip);
    }

    #[test]
    fn released_address_is_not_reused_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let mut ipam = open(&dir, "10.244.1.0/24");
        let first = ipam.allocate(&att("c1")).unwrap();
        ipam.release(&att("c1")).unwrap();
        assert_ne!(ipam.allocate(&att("c2")).unwrap(), first);
    }

    /// Found with the state_files fuzz target (fuzz/): a /0 PodCIDR whose
    /// state file's `last` is 255.255.255.255 overflowed u32 in the search
    /// for a free address (a panic with overflow checks), and its capacity
    /// was one short. The crashing input's state file, as it was.
    #[test]
    fn a_slash_0_pod_cidr_continues_after_its_last_address() {
        let dir = tempfile::tempdir().unwrap();
        let state = br#"{"podCIDR":"0.0.0.0/0","last":"255.255.255.255","allocations":[]}"#;
        let path = dir.path().join("ipam.json");
        let mut ipam = Ipam::load("0.0.0.0/0".parse().unwrap(), &path, Some(state)).unwrap();
        assert_eq!(ipam.capacity() as u64, (1u64 << 32) - 3);
        // After the last address comes the first; network and router are reserved.
        assert_eq!(
            ipam.allocate(&att("c1")).unwrap(),
            Ipv4Addr::new(0, 0, 0, 2)
        );
        assert_eq!(
            ipam.allocate(&att("c2")).unwrap(),
            Ipv4Addr::new(0, 0, 0, 3)
        );
    }

    #[test]
    fn state_survives_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = {
            let mut ipam = open(&dir, "10.244.1.0/24");
            (
                ipam.allocate(&att("c1")).unwrap(),
                ipam.allocate(&att("c2")).unwrap(),
            )
        };
        let mut reopened = open(&dir, "10.244.1.0/24");
        assert_eq!(reopened.get(&att("c1")), Some(a));
        assert_eq!(reopened.get(&att("c2")), Some(b));
        let c = reopened.allocate(&att("c3")).unwrap();
        assert!(c != a && c != b);
    }

    #[test]
    fn release_all_except_keeps_the_valid_ones() {
        let dir = tempfile::tempdir().unwrap();
        let mut ipam = open(&dir, "10.244.1.0/24");
        for id in ["c1", "c2", "c3"] {
            ipam.allocate(&att(id)).unwrap();
        }
        let released = ipam.release_all_except(|a| a.container_id == "c2").unwrap();
        let ids: Vec<_> = released
            .iter()
            .map(|(a, _)| a.container_id.as_str())
            .collect();
        assert_eq!(ids, ["c1", "c3"]);
        assert_eq!(open(&dir, "10.244.1.0/24").allocated(), 1);
    }

    #[test]
    fn corrupt_state_is_reported_not_discarded() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ipam.json");
        std::fs::write(&path, b"{not json").unwrap();
        let err = Ipam::open("10.244.1.0/24".parse().unwrap(), &path)
            .err()
            .unwrap();
        assert!(matches!(err, IpamError::Corrupt { .. }), "{err}");
        assert_eq!(std::fs::read(&path).unwrap(), b"{not json");
    }

    #[test]
    fn tiny_cidr_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let err = Ipam::open("10.244.1.0/31".parse().unwrap(), &dir.path().join("x")).err();
        assert!(matches!(err, Some(IpamError::TooSmall(_))));
    }
}
