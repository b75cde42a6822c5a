//! The eBPF datapath: loads tern-ebpf, pins its maps and per-pod links under
//! the bpffs dir, hands each map to its one writer (`MapOwners`), and
//! attaches the programs.
//!
//! Everything is pinned, so the datapath keeps forwarding while the agent is
//! down; a starting agent re-adopts the pins and swaps its freshly loaded
//! program into each existing link atomically.

pub mod connections;
pub mod conntrack;
pub mod fdb;
pub mod fill;
mod ids;
pub mod maps;
mod pins;
pub mod policy;
pub mod prefixes;
pub mod routes;
pub mod services;

use std::path::{Path, PathBuf};

use anyhow::{Context, anyhow, bail, ensure};
use aya::programs::links::{CgroupAttachMode, FdLink, PinnedLink};
use aya::programs::tc::{SchedClassifierLink, TcAttachOptions};
use aya::programs::{LinkOrder, Program, SchedClassifier, TcAttachType};
use aya::{Ebpf, EbpfLoader};
pub use maps::{Counters, Endpoints, ip_from_key, ip_to_key};
use tern_common::{TunnelEndpoint, maps as names, programs};

use self::conntrack::CtMap;
use self::maps::{ConfigMap, take};
use self::policy::PolicyMaps;
use self::prefixes::PrefixMap;
use self::services::ServiceMaps;

/// The tc programs: pod veths, underlay devices (both ways), the overlay
/// device.
const TC_PROGRAMS: [&str; 6] = [
    programs::FROM_POD,
    programs::FROM_POD_VIA_QDISC,
    programs::FROM_NETDEV,
    programs::TO_NETDEV,
    programs::FROM_OVERLAY,
    programs::TO_OVERLAY,
];

/// The socket-LB programs, attached to the pods' cgroup v2 subtree.
const SOCK_ADDR_PROGRAMS: [&str; 4] = [
    programs::SOCK_CONNECT4,
    programs::SOCK_SENDMSG4,
    programs::SOCK_RECVMSG4,
    programs::SOCK_GETPEERNAME4,
];

/// The socket-LB programs on whole sockets (cgroup/sock), attached with them.
const SOCK_PROGRAMS: [&str; 2] = [programs::SOCK_POST_BIND4, programs::SOCK_RELEASE];

/// The eBPF object (tern-ebpf), as build.rs built it.
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/tern-ebpf"));

/// The loaded programs and the links they are attached by. Its maps have
/// been handed out (`MapOwners`).
pub struct Datapath {
    ebpf: Ebpf,
    bpffs_dir: PathBuf,
}

/// Every map the agent writes, each taken once from the loaded object for
/// the one pipeline that writes it. SOCK_REVNAT is not here: only the
/// socket-LB programs write and read it.
pub struct MapOwners {
    /// ENDPOINTS: the endpoint manager.
    pub endpoints: Endpoints,
    /// SERVICES, BACKENDS, REVNAT, MAGLEV, AFFINITY: the Service pipeline.
    pub services: ServiceMaps,
    /// TUNNEL and NON_MASQUERADE: node routing.
    pub tunnel: PrefixMap<TunnelEndpoint>,
    pub non_masquerade: PrefixMap<u8>,
    /// CT and NAT: the eBPF programs write them; the agent's garbage
    /// collection removes expired entries.
    pub ct: CtMap,
    pub nat: CtMap,
    /// IDENTITIES, POLICY_ENDPOINTS, POLICY, POLICY_CIDR: the policy
    /// pipeline.
    pub policy: PolicyMaps,
    /// CONFIG: written once, at start.
    pub config: ConfigMap,
    /// METRICS, POLICY_COUNTS, POLICY_DENIALS and DROPS: written by the
    /// eBPF programs, only read by the agent.
    pub counters: Counters,
    /// EVENTS: the eBPF programs write it; the flow reader consumes it.
    pub events: aya::maps::RingBuf<aya::maps::MapData>,
}

impl Datapath {
    /// Loads the programs; maps already pinned in `bpffs_dir` are reused
    /// with their content when their shape still fits, the others (and
    /// missing ones) are created and pinned.
    pub fn load(
        bpffs_dir: &Path,
        map_sizes: &[(&'static str, u32)],
    ) -> anyhow::Result<(Self, MapOwners)> {
        ensure_bpffs(bpffs_dir)?;
        std::fs::create_dir_all(bpffs_dir.join("links"))
            .with_context(|| format!("cannot create {}", bpffs_dir.display()))?;
        pins::retire_incompatible(bpffs_dir, OBJECT, map_sizes)?;
        let mut loader = EbpfLoader::new();
        loader.default_map_pin_directory(bpffs_dir);
        for (name, size) in map_sizes {
            loader.map_max_entries(name, *size);
        }
        let mut ebpf = loader.load(OBJECT).context("loading the eBPF object")?;
        load_programs(&mut ebpf)?;
        let maps = MapOwners {
            endpoints: Endpoints::new(take(&mut ebpf, names::ENDPOINTS)?),
            services: ServiceMaps::take(&mut ebpf)?,
            tunnel: PrefixMap::take(&mut ebpf, names::TUNNEL)?,
            non_masquerade: PrefixMap::take(&mut ebpf, names::NON_MASQUERADE)?,
            policy: PolicyMaps::take(&mut ebpf)?,
            ct: take(&mut ebpf, names::CT)?,
            nat: take(&mut ebpf, names::NAT)?,
            config: take(&mut ebpf, names::CONFIG)?,
            counters: Counters::new(
                take(&mut ebpf, names::METRICS)?,
                take(&mut ebpf, names::POLICY_COUNTS)?,
                take(&mut ebpf, names::POLICY_DENIALS)?,
                take(&mut ebpf, names::DROPS)?,
            ),
            events: take(&mut ebpf, names::EVENTS)?,
        };
        let datapath = Datapath {
            ebpf,
            bpffs_dir: bpffs_dir.to_owned(),
        };
        Ok((datapath, maps))
    }

    pub fn bpffs_dir(&self) -> &Path {
        &self.bpffs_dir
    }

    /// Attaches `from_pod` at tc ingress of a pod's host veth.
    /// `via_qdisc`: the veth has an ingress qdisc of its own that the
    /// pod's traffic must reach (`from_pod_via_qdisc`). Either program
    /// sits in the same pinned link, so switching is one atomic update.
    pub fn attach_pod(&mut self, host_ifname: &str, via_qdisc: bool) -> anyhow::Result<()> {
        let program = if via_qdisc {
            programs::FROM_POD_VIA_QDISC
        } else {
            programs::FROM_POD
        };
        self.attach_classifier_at(
            programs::FROM_POD,
            program,
            host_ifname,
            TcAttachType::Ingress,
        )
    }

    /// Attaches `from_netdev` at tc ingress and `to_netdev` at tc egress of
    /// an underlay device.
    pub fn attach_netdev(&mut self, ifname: &str) -> anyhow::Result<()> {
        self.attach_classifier(programs::FROM_NETDEV, ifname, TcAttachType::Ingress)?;
        self.attach_classifier(programs::TO_NETDEV, ifname, TcAttachType::Egress)
    }

    /// Attaches `from_overlay` at tc ingress and `to_overlay` at tc egress
    /// of the VXLAN device.
    pub fn attach_overlay(&mut self, ifname: &str) -> anyhow::Result<()> {
        self.attach_classifier(programs::FROM_OVERLAY, ifname, TcAttachType::Ingress)?;
        self.attach_classifier(programs::TO_OVERLAY, ifname, TcAttachType::Egress)
    }

    /// Attaches `program` at tc `direction` of `ifname`, replacing the
    /// program in an existing pinned link atomically (agent restart or
    /// upgrade) instead of adding a second one.
    fn attach_classifier(
        &mut self,
        program: &str,
        ifname: &str,
        direction: TcAttachType,
    ) -> anyhow::Result<()> {
        self.attach_classifier_at(program, program, ifname, direction)
    }

    /// The same, with the link pinned under `pin_name`'s name.
    fn attach_classifier_at(
        &mut self,
        pin_name: &str,
        program: &str,
        ifname: &str,
        direction: TcAttachType,
    ) -> anyhow::Result<()> {
        let pin = link_pin(&self.bpffs_dir, pin_name, ifname);
        let classifier: &mut SchedClassifier = self
            .ebpf
            .program_mut(program)
            .with_context(|| format!("program {program} missing"))?
            .try_into()?;
        let replaced = match PinnedLink::from_pin(&pin) {
            Ok(old) => {
                let fd_link: FdLink = old.unpin().context("unpinning the old link")?;
                let link = SchedClassifierLink::try_from(fd_link)?;
                // A link whose device is gone cannot be updated: drop it and
                // attach afresh below.
                classifier.attach_to_link(link).ok()
            }
            Err(_) => None,
        };
        let link_id = match replaced {
            Some(id) => id,
            None => classifier
                .attach_with_options(
                    ifname,
                    direction,
                    TcAttachOptions::TcxOrder(LinkOrder::default()),
                )
                .with_context(|| format!("attaching {program} to {ifname}"))?,
        };
        let link: FdLink = classifier.take_link(link_id)?.try_into()?;
        link.pin(&pin)
            .with_context(|| format!("pinning the link at {}", pin.display()))?;
        Ok(())
    }

    /// Detaches from `host_ifname`; nothing attached is not an error.
    pub fn detach_pod(&mut self, host_ifname: &str) -> anyhow::Result<()> {
        let pin = link_pin(&self.bpffs_dir, programs::FROM_POD, host_ifname);
        match PinnedLink::from_pin(&pin) {
            // Dropping the last reference to the link detaches it.
            Ok(link) => drop(link.unpin()?),
            Err(_) if !pin.exists() => {}
            Err(e) => bail!("cannot open pinned link {}: {e}", pin.display()),
        }
        Ok(())
    }

    /// Attaches socket-LB to the cgroup v2 directory `cgroup` (every pod's
    /// processes live below it). A link pinned by an earlier agent is
    /// replaced only after the new program is attached, so no connect is
    /// ever left untranslated.
    pub fn attach_socket_lb(&mut self, cgroup: &Path) -> anyhow::Result<()> {
        let dir = std::fs::File::open(cgroup)
            .with_context(|| format!("opening cgroup {}", cgroup.display()))?;
        for name in SOCK_ADDR_PROGRAMS.into_iter().chain(SOCK_PROGRAMS) {
            // bpf_link_create takes no flags for cgroups: links always
            // coexist, so old and new overlap during a replacement.
            let program = self
                .ebpf
                .program_mut(name)
                .with_context(|| format!("program {name}"))?;
            let link: FdLink = match program {
                aya::programs::Program::CgroupSockAddr(p) => {
                    let id = p.attach(&dir, CgroupAttachMode::Single)?;
                    p.take_link(id)?.try_into()?
                }
                aya::programs::Program::CgroupSock(p) => {
                    let id = p.attach(&dir, CgroupAttachMode::Single)?;
                    p.take_link(id)?.try_into()?
                }
                _ => bail!("program {name} is not a cgroup program"),
            };
            let pin = self.bpffs_dir.join("links").join(name);
            let old = PinnedLink::from_pin(&pin)
                .ok()
                .map(PinnedLink::unpin)
                .transpose()?;
            link.pin(&pin)
                .with_context(|| format!("pinning {}", pin.display()))?;
            drop(old);
        }
        Ok(())
    }

    /// Removes socket-LB (e.g. when the per-packet path is configured).
    pub fn detach_socket_lb(&mut self) -> anyhow::Result<()> {
        for name in SOCK_ADDR_PROGRAMS.into_iter().chain(SOCK_PROGRAMS) {
            let pin = self.bpffs_dir.join("links").join(name);
            if let Ok(link) = PinnedLink::from_pin(&pin) {
                drop(link.unpin()?);
            }
        }
        Ok(())
    }

    /// Host interfaces that have a pinned link.
    pub fn attached_pods(&self) -> anyhow::Result<Vec<String>> {
        attached_pods(&self.bpffs_dir)
    }
}

/// Loads every program of the object: the kernel verifies each, which is
/// most of an agent's start (from_pod, from_pod_via_qdisc and from_netdev
/// take ~1-2 s each on a 2-vCPU VM), so they are loaded on as many threads
/// as there are CPUs, the costliest first.
fn load_programs(ebpf: &mut Ebpf) -> anyhow::Result<()> {
    let order: Vec<&str> = TC_PROGRAMS
        .into_iter()
        .chain(SOCK_ADDR_PROGRAMS)
        .chain(SOCK_PROGRAMS)
        .collect();
    let mut programs: Vec<(&str, &mut Program)> = ebpf.programs_mut().collect();
    for name in &order {
        ensure!(
            programs.iter().any(|(n, _)| n == name),
            "program {name} missing from the object"
        );
    }
    programs.retain(|(name, _)| order.contains(name));
    // Popped from the end: the costliest (first in `order`) go last in the Vec.
    programs.sort_by_key(|(name, _)| std::cmp::Reverse(order.iter().position(|n| n == name)));
    let queue = std::sync::Mutex::new(programs);
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                scope.spawn(|| -> anyhow::Result<()> {
                    loop {
                        let next = queue
                            .lock()
                            .map_err(|_| anyhow!("a loader thread panicked"))?
                            .pop();
                        let Some((name, program)) = next else {
                            return Ok(());
                        };
                        let loaded = match program {
                            Program::SchedClassifier(p) => p.load(),
                            Program::CgroupSockAddr(p) => p.load(),
                            Program::CgroupSock(p) => p.load(),
                            other => bail!(
                                "program {name} has an unexpected type {:?}",
                                other.prog_type()
                            ),
                        };
                        loaded.with_context(|| format!("the verifier refused {name}"))?;
                    }
                })
            })
            .collect();
        workers.into_iter().try_for_each(|worker| {
            worker
                .join()
                .map_err(|_| anyhow!("a program loader thread panicked"))?
        })
    })
}

fn link_pin(bpffs_dir: &Path, program: &str, ifname: &str) -> PathBuf {
    bpffs_dir.join("links").join(format!("{program}_{ifname}"))
}

pub fn attached_pods(bpffs_dir: &Path) -> anyhow::Result<Vec<String>> {
    let dir = bpffs_dir.join("links");
    let mut names = Vec::new();
    for entry in std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
        let name = entry?.file_name().to_string_lossy().into_owned();
        if let Some(ifname) = name.strip_prefix("from_pod_") {
            names.push(ifname.to_owned());
        }
    }
    names.sort();
    Ok(names)
}

/// The bpffs dir must live on a bpf filesystem, or pins would fail (or,
/// worse, vanish with a tmpfs).
fn ensure_bpffs(dir: &Path) -> anyhow::Result<()> {
    let mut probe = dir.to_owned();
    while !probe.exists() {
        if !probe.pop() {
            break;
        }
    }
    let stat =
        nix::sys::statfs::statfs(&probe).with_context(|| format!("statfs {}", probe.display()))?;
    if stat.filesystem_type() != nix::sys::statfs::BPF_FS_MAGIC {
        bail!(
            "{} is not on a bpf filesystem; mount one with `mount -t bpf bpf /sys/fs/bpf`",
            dir.display()
        );
    }
    Ok(())
}

/// Socket-LB needs a cgroup v2 directory: `dir` itself may be inside an
/// existing cgroup2 hierarchy (then it is created), else cgroup2 is
/// mounted there.
pub fn ensure_cgroup2(dir: &Path) -> anyhow::Result<()> {
    const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;
    let is_cgroup2 = |p: &Path| {
        nix::sys::statfs::statfs(p)
            .map(|s| s.filesystem_type().0 == CGROUP2_SUPER_MAGIC)
            .unwrap_or(false)
    };
    if dir.exists() && is_cgroup2(dir) {
        return Ok(());
    }
    if let Some(parent) = dir.parent()
        && parent.exists()
        && is_cgroup2(parent)
    {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating cgroup {}", dir.display()))?;
        return Ok(());
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    nix::mount::mount(
        Some("none"),
        dir,
        Some("cgroup2"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .with_context(|| format!("mounting cgroup2 at {}", dir.display()))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use aya_obj::generated::bpf_map_type;
    use tern_common::maps::{self, MapKind};

    use super::OBJECT;

    fn bpf_type(kind: MapKind) -> u32 {
        (match kind {
            MapKind::Hash => bpf_map_type::BPF_MAP_TYPE_HASH,
            MapKind::LruHash => bpf_map_type::BPF_MAP_TYPE_LRU_HASH,
            MapKind::Array => bpf_map_type::BPF_MAP_TYPE_ARRAY,
            MapKind::PerCpuArray => bpf_map_type::BPF_MAP_TYPE_PERCPU_ARRAY,
            MapKind::LpmTrie => bpf_map_type::BPF_MAP_TYPE_LPM_TRIE,
            MapKind::RingBuf => bpf_map_type::BPF_MAP_TYPE_RINGBUF,
        }) as u32
    }

    /// The object's maps are exactly `tern_common::maps::ALL`: same names,
    /// types and key/value sizes (what the agent opens and writes by them).
    #[test]
    fn object_maps_match_the_map_list() {
        let object = aya_obj::Object::parse(OBJECT).expect("parsing the eBPF object");
        let mut problems = Vec::new();
        for (name, map) in &object.maps {
            let Some(spec) = maps::spec(name) else {
                problems.push(format!(
                    "{name}: in the object, not in tern_common::maps::ALL"
                ));
                continue;
            };
            let object_shape = (map.map_type(), map.key_size(), map.value_size());
            let listed_shape = (bpf_type(spec.kind), spec.key_size, spec.value_size);
            if object_shape != listed_shape {
                problems.push(format!(
                    "{name}: (type, key size, value size) is {object_shape:?} in the object, \
                     {listed_shape:?} ({:?}) in the list",
                    spec.kind
                ));
            }
        }
        for spec in &maps::ALL {
            if !object.maps.contains_key(spec.name) {
                problems.push(format!("{}: in the list, not in the object", spec.name));
            }
        }
        assert!(problems.is_empty(), "{}", problems.join("\n"));
    }
}
