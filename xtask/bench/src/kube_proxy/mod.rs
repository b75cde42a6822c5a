//! kube-proxy's data path, reproduced for the benchmark's baseline (issue 4,
//! scenario 3): rules for N ClusterIP Services in kube-proxy's own layouts,
//! iptables mode (`pkg/proxy/iptables/proxier.go`) and nftables mode
//! (`pkg/proxy/nftables/proxier.go`), installed inside a lab namespace with
//! one `iptables-restore` / `nft -f` call, as kube-proxy does.
//!
//! The rules are those of a kube-proxy with its defaults plus
//! `--cluster-cidr`: the local-traffic detector is the cluster CIDR
//! (`! -s CIDR` / `ip saddr != CIDR`), masquerade bit 14 (mark 0x4000), no
//! masquerade-all, `MASQUERADE --random-fully`, localhost NodePorts on,
//! `nodePortAddresses` unset, `nf_conntrack_tcp_be_liberal` unset (so the
//! INVALID drop rule is there), no nfacct counters, traffic policy Cluster,
//! no session affinity. As in kube-proxy, above 1000 endpoints in total
//! ("large cluster mode") the per-endpoint iptables rules carry no comment.
//! Services without endpoints get kube-proxy's REJECT handling.
//!
//! Chain names are kube-proxy's exactly: base32(sha256(...)) as in its
//! `portProtoHash` / `servicePortEndpointChainName` (iptables) and
//! `hashAndTruncate` (nftables). SHA-256 is implemented (in `names`) because `sha2`
//! is not in the dependency tree.
//!
//! Deliberate differences, none of which changes the rules the kernel ends
//! up with: services come in input order (kube-proxy: Go map order, i.e.
//! random); the jumps from the built-in chains (PREROUTING -> KUBE-SERVICES,
//! ...) are `-I` lines in the same restore input instead of separate
//! `iptables -I` calls; nftables priorities are written as numbers (-110,
//! -100, -90, 100 = dstnat-10, dstnat, dstnat+10, srcnat), because nft 1.0.6
//! rejects `dstnat` on the output hook. Left out: the mangle canary chain
//! (monitoring only), NodePort / LoadBalancer / externalIP entries (the maps
//! and chains for them are there, empty), the nftables drop rule for
//! unallocated ClusterIPs (needs the service CIDRs), IPv6.
//!
//! The iptables backend is `iptables-nft` (called by that name, whatever
//! the alternatives point `iptables` at), which is what kube-proxy's image
//! selects on a modern distribution; `iptables-legacy` is available through
//! [`apply_iptables_with`].
//!
//! Loading time grows faster than linearly with the number of services, as
//! it does for kube-proxy itself on this software (Debian 12: iptables
//! 1.8.9, nft 1.0.6): iptables-nft-restore looks chains up by linear search
//! (userspace), and in nftables mode adding each anonymous map (one per
//! service: the `numgen ... vmap`) costs time in proportion to the maps
//! already in the table (kubernetes/kubernetes#139513, eased upstream by
//! #140723, which drops the map for single-endpoint services). Measured
//! here for 10 000 services x 1 endpoint: iptables-nft 16 s, nftables 21 s,
//! iptables-legacy 0.7 s; for 100 000, iptables-legacy 26 s, the other two
//! an extrapolated half hour or more. Generation alone: 0.15 s for 10 000,
//! 1.4 s per text for 100 000 in the debug build `cargo xtask` runs (0.5 s
//! in release). What a packet meets once the rules are in is not affected.

mod names;

use names::{iptables_endpoint_chain, iptables_service_chain, nft_hash_and_truncate};
use std::collections::HashSet;
use std::fmt::Write as _;
use std::io::Write as _;
use std::net::Ipv4Addr;
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail, ensure};
use tern_lab::netns::Netns;

/// The nftables table kube-proxy's nftables mode owns (family `ip`).
pub const NFT_TABLE: &str = "kube-proxy";

/// kube-proxy's default masquerade mark (`--iptables-masquerade-bit=14`).
const MASQ_MARK: &str = "0x4000";
/// Above this many endpoints kube-proxy drops per-endpoint comments.
const LARGE_CLUSTER_ENDPOINTS_THRESHOLD: usize = 1000;
/// knftables.NameLengthMax (256) minus the longest chain prefix (16).
const NFT_CHAIN_BASE_MAX: usize = 240;

/// A Service's L4 protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Proto {
    Tcp,
    Udp,
}

impl Proto {
    /// kube-proxy's lower-case form, used in rules and in chain-name hashes.
    pub fn as_str(self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        }
    }
}

/// One service port as kube-proxy sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KpService {
    /// The ServicePortName as kube-proxy prints it in comments:
    /// `namespace/name:port-name` (`namespace/name` for an unnamed port).
    pub name: String,
    pub cluster_ip: Ipv4Addr,
    pub port: u16,
    pub protocol: Proto,
    /// Ready endpoints (pod IP, target port), in kube-proxy's order.
    pub endpoints: Vec<(Ipv4Addr, u16)>,
}

/// `n` services `bench/svc-<i>:http`, TCP port 80, with ClusterIPs taken in
/// order from 10.96.0.0/12 starting at 10.96.0.1, each with `m` endpoints
/// picked round-robin from `backends` (service i gets backends i*m .. i*m+m-1,
/// modulo their number), so a few real pods can back thousands of services.
/// Panics if `m > backends.len()` (a service's endpoints must be distinct) or
/// if the /12 runs out (more than 1 048 574 services).
pub fn synthetic_services(n: usize, m: usize, backends: &[(Ipv4Addr, u16)]) -> Vec<KpService> {
    assert!(
        m <= backends.len(),
        "{m} endpoints per service need at least {m} distinct backends, got {}",
        backends.len()
    );
    const SIZE: usize = 1 << 20; // 10.96.0.0/12
    assert!(
        n <= SIZE - 2,
        "10.96.0.0/12 holds {} ClusterIPs, {n} asked",
        SIZE - 2
    );
    let base = u32::from(Ipv4Addr::new(10, 96, 0, 0));
    (0..n)
        .map(|i| KpService {
            name: format!("bench/svc-{i}:http"),
            cluster_ip: Ipv4Addr::from(base + 1 + i as u32),
            port: 80,
            protocol: Proto::Tcp,
            endpoints: (0..m)
                .map(|j| backends[(i * m + j) % backends.len()])
                .collect(),
        })
        .collect()
}

/// The input kube-proxy's iptables mode would feed to `iptables-restore
/// --noflush` for `services` (tables filter and nat), plus the jumps from the
/// built-in chains that kube-proxy adds with `iptables -I` beforehand. Meant
/// for a namespace without kube-proxy rules ([`apply_iptables`] flushes
/// first): the `-I` lines would otherwise be added a second time.
pub fn iptables_restore_input(services: &[KpService], cluster_cidr: &str) -> String {
    let endpoints: Vec<Vec<(Ipv4Addr, u16)>> =
        services.iter().map(|s| distinct(&s.endpoints)).collect();
    let total: usize = endpoints.iter().map(Vec::len).sum();
    let large_cluster = total > LARGE_CLUSTER_ENDPOINTS_THRESHOLD;
    let max_endpoints = endpoints.iter().map(Vec::len).max().unwrap_or(0);
    // kube-proxy caches these too: float formatting is the slow part.
    let probability: Vec<String> = (0..=max_endpoints)
        .map(|n| format!("{:.10}", 1.0 / n.max(1) as f64))
        .collect();

    let mut filter_chains = String::new();
    let mut filter_rules = String::new();
    let mut nat_chains = String::with_capacity(40 * (services.len() + total) + 256);
    let mut nat_rules = String::with_capacity(200 * services.len() + 260 * total + 1024);

    for chain in [
        "KUBE-SERVICES",
        "KUBE-EXTERNAL-SERVICES",
        "KUBE-FORWARD",
        "KUBE-NODEPORTS",
        "KUBE-PROXY-FIREWALL",
    ] {
        let _ = writeln!(filter_chains, ":{chain} - [0:0]");
    }
    for chain in [
        "KUBE-SERVICES",
        "KUBE-NODEPORTS",
        "KUBE-POSTROUTING",
        "KUBE-MARK-MASQ",
    ] {
        let _ = writeln!(nat_chains, ":{chain} - [0:0]");
    }
    let _ = writeln!(
        nat_rules,
        "-A KUBE-POSTROUTING -m mark ! --mark {MASQ_MARK}/{MASQ_MARK} -j RETURN\n\
         -A KUBE-POSTROUTING -j MARK --xor-mark {MASQ_MARK}\n\
         -A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully\n\
         -A KUBE-MARK-MASQ -j MARK --or-mark {MASQ_MARK}"
    );
    // localhost NodePorts are on by default: kubelet's anti-martian rule.
    filter_chains.push_str(":KUBE-FIREWALL - [0:0]\n");
    filter_rules.push_str(
        "-A KUBE-FIREWALL -m comment --comment \"block incoming localnet connections\" \
         -d 127.0.0.0/8 ! -s 127.0.0.0/8 -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP\n",
    );

    for (svc, eps) in services.iter().zip(&endpoints) {
        let spn = svc.name.as_str();
        let proto = svc.protocol.as_str();
        let (vip, port) = (svc.cluster_ip, svc.port);
        if eps.is_empty() {
            let _ = writeln!(
                filter_rules,
                "-A KUBE-SERVICES -m comment --comment \"{spn} has no endpoints\" \
                 -m {proto} -p {proto} -d {vip} --dport {port} -j REJECT"
            );
            continue;
        }
        let svc_chain = iptables_service_chain(spn, proto);
        let _ = writeln!(
            nat_rules,
            "-A KUBE-SERVICES -m comment --comment \"{spn} cluster IP\" \
             -m {proto} -p {proto} -d {vip} --dport {port} -j {svc_chain}"
        );
        let _ = writeln!(nat_chains, ":{svc_chain} - [0:0]");
        let _ = writeln!(
            nat_rules,
            "-A {svc_chain} -m comment --comment \"{spn} cluster IP\" \
             -m {proto} -p {proto} -d {vip} --dport {port} ! -s {cluster_cidr} -j KUBE-MARK-MASQ"
        );
        let ep_chains: Vec<String> = eps
            .iter()
            .map(|&(ip, p)| iptables_endpoint_chain(spn, proto, ip, p))
            .collect();
        let n = eps.len();
        for (i, (&(ip, p), ep_chain)) in eps.iter().zip(&ep_chains).enumerate() {
            nat_rules.push_str("-A ");
            nat_rules.push_str(&svc_chain);
            if !large_cluster {
                let _ = write!(nat_rules, " -m comment --comment \"{spn} -> {ip}:{p}\"");
            }
            if i + 1 < n {
                let _ = write!(
                    nat_rules,
                    " -m statistic --mode random --probability {}",
                    probability[n - i]
                );
            }
            let _ = writeln!(nat_rules, " -j {ep_chain}");
        }
        for (&(ip, p), ep_chain) in eps.iter().zip(&ep_chains) {
            let _ = writeln!(nat_chains, ":{ep_chain} - [0:0]");
            let comment = if large_cluster {
                String::new()
            } else {
                format!(" -m comment --comment {spn}")
            };
            let _ = writeln!(
                nat_rules,
                "-A {ep_chain}{comment} -s {ip} -j KUBE-MARK-MASQ\n\
                 -A {ep_chain}{comment} -m {proto} -p {proto} -j DNAT --to-destination {ip}:{p}"
            );
        }
    }

    nat_rules.push_str(
        "-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be \
         the last rule in this chain\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS\n",
    );
    let _ = writeln!(
        filter_rules,
        "-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP\n\
         -A KUBE-FORWARD -m comment --comment \"kubernetes forwarding rules\" \
         -m mark --mark {MASQ_MARK}/{MASQ_MARK} -j ACCEPT\n\
         -A KUBE-FORWARD -m comment --comment \"kubernetes forwarding conntrack rule\" \
         -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT"
    );

    let mut out = String::with_capacity(
        filter_chains.len() + filter_rules.len() + nat_chains.len() + nat_rules.len() + 2048,
    );
    out.push_str("*filter\n");
    out.push_str(&filter_chains);
    out.push_str(&filter_rules);
    push_jumps(&mut out, "filter");
    out.push_str("COMMIT\n*nat\n");
    out.push_str(&nat_chains);
    out.push_str(&nat_rules);
    push_jumps(&mut out, "nat");
    out.push_str("COMMIT\n");
    out
}

/// kube-proxy's `iptablesJumpChains` then `iptablesKubeletJumpChains`:
/// (table, built-in chain, extra match, comment, target). Each is prepended
/// (`-I`) in this order, as kube-proxy's `EnsureRule(Prepend, ...)` does.
const IPTABLES_JUMPS: [(&str, &str, &str, &str, &str); 14] = [
    (
        "filter",
        "INPUT",
        "-m conntrack --ctstate NEW ",
        "kubernetes externally-visible service portals",
        "KUBE-EXTERNAL-SERVICES",
    ),
    (
        "filter",
        "FORWARD",
        "-m conntrack --ctstate NEW ",
        "kubernetes externally-visible service portals",
        "KUBE-EXTERNAL-SERVICES",
    ),
    (
        "filter",
        "INPUT",
        "",
        "kubernetes health check service ports",
        "KUBE-NODEPORTS",
    ),
    (
        "filter",
        "FORWARD",
        "-m conntrack --ctstate NEW ",
        "kubernetes service portals",
        "KUBE-SERVICES",
    ),
    (
        "filter",
        "OUTPUT",
        "-m conntrack --ctstate NEW ",
        "kubernetes service portals",
        "KUBE-SERVICES",
    ),
    (
        "filter",
        "FORWARD",
        "",
        "kubernetes forwarding rules",
        "KUBE-FORWARD",
    ),
    (
        "filter",
        "INPUT",
        "-m conntrack --ctstate NEW ",
        "kubernetes load balancer firewall",
        "KUBE-PROXY-FIREWALL",
    ),
    (
        "filter",
        "OUTPUT",
        "-m conntrack --ctstate NEW ",
        "kubernetes load balancer firewall",
        "KUBE-PROXY-FIREWALL",
    ),
    (
        "filter",
        "FORWARD",
        "-m conntrack --ctstate NEW ",
        "kubernetes load balancer firewall",
        "KUBE-PROXY-FIREWALL",
    ),
    (
        "nat",
        "OUTPUT",
        "",
        "kubernetes service portals",
        "KUBE-SERVICES",
    ),
    (
        "nat",
        "PREROUTING",
        "",
        "kubernetes service portals",
        "KUBE-SERVICES",
    ),
    (
        "nat",
        "POSTROUTING",
        "",
        "kubernetes postrouting rules",
        "KUBE-POSTROUTING",
    ),
    ("filter", "INPUT", "", "", "KUBE-FIREWALL"),
    ("filter", "OUTPUT", "", "", "KUBE-FIREWALL"),
];

fn push_jumps(out: &mut String, table: &str) {
    for (t, chain, extra, comment, target) in IPTABLES_JUMPS {
        if t != table {
            continue;
        }
        let _ = write!(out, "-I {chain} {extra}");
        if !comment.is_empty() {
            let _ = write!(out, "-m comment --comment \"{comment}\" ");
        }
        let _ = writeln!(out, "-j {target}");
    }
}

/// kube-proxy's nftables base chains: (name, type, hook, priority).
const NFT_BASE_CHAINS: [(&str, &str, &str, i32); 8] = [
    ("filter-prerouting", "filter", "prerouting", -110),
    ("filter-input", "filter", "input", -110),
    ("filter-forward", "filter", "forward", -110),
    ("filter-output", "filter", "output", -110),
    ("filter-output-post-dnat", "filter", "output", -90),
    ("nat-prerouting", "nat", "prerouting", -100),
    ("nat-output", "nat", "output", -100),
    ("nat-postrouting", "nat", "postrouting", 100),
];

/// kube-proxy's `nftablesJumpChains`: (chain, jumped to from, extra match).
const NFT_JUMP_CHAINS: [(&str, &str, &str); 11] = [
    ("nodeport-endpoints-check", "filter-input", "ct state new "),
    ("service-endpoints-check", "filter-input", "ct state new "),
    ("service-endpoints-check", "filter-forward", "ct state new "),
    ("service-endpoints-check", "filter-output", "ct state new "),
    ("firewall-check", "filter-prerouting", "ct state new "),
    ("firewall-check", "filter-output", "ct state new "),
    ("services", "nat-output", ""),
    ("services", "nat-prerouting", ""),
    ("masquerading", "nat-postrouting", ""),
    ("cluster-ips-check", "filter-forward", "ct state new "),
    (
        "cluster-ips-check",
        "filter-output-post-dnat",
        "ct state new ",
    ),
];

/// The transaction kube-proxy's nftables mode runs (`nft -f -`) on a full
/// sync for `services`: table `ip kube-proxy`, its base and jump chains,
/// sets and verdict maps, and the per-service and per-endpoint chains. It
/// starts with add/delete/add of the table, so it replaces an earlier
/// ruleset in the same transaction.
pub fn nftables_ruleset(services: &[KpService], cluster_cidr: &str) -> String {
    let t = format!("ip {NFT_TABLE}");
    let total: usize = services.iter().map(|s| s.endpoints.len()).sum();
    let mut out = String::with_capacity(400 * services.len() + 350 * total + 8192);
    let table_line = format!("add table {t} {{ comment \"rules for kube-proxy\" ; }}\n");
    out.push_str(&table_line);
    let _ = writeln!(out, "delete table {t}");
    out.push_str(&table_line);
    for (name, kind, hook, priority) in NFT_BASE_CHAINS {
        let _ = writeln!(
            out,
            "add chain {t} {name} {{ type {kind} hook {hook} priority {priority} ; }}"
        );
    }
    let mut created: Vec<&str> = Vec::new();
    for (chain, from, extra) in NFT_JUMP_CHAINS {
        if !created.contains(&chain) {
            let _ = writeln!(out, "add chain {t} {chain}");
            created.push(chain);
        }
        let _ = writeln!(out, "add rule {t} {from} {extra}jump {chain}");
    }
    if !created.contains(&"mark-for-masquerade") {
        let _ = writeln!(out, "add chain {t} mark-for-masquerade");
    }
    let _ = writeln!(
        out,
        "add rule {t} mark-for-masquerade mark set mark or {MASQ_MARK}\n\
         add rule {t} masquerading mark and {MASQ_MARK} == 0 return\n\
         add rule {t} masquerading mark set mark xor {MASQ_MARK}\n\
         add rule {t} masquerading masquerade fully-random\n\
         add set {t} cluster-ips {{ type ipv4_addr ; comment \"Active ClusterIPs\" ; }}\n\
         add rule {t} cluster-ips-check ip daddr @cluster-ips reject \
         comment \"Reject traffic to invalid ports of ClusterIPs\"\n\
         add map {t} no-endpoint-services {{ type ipv4_addr . inet_proto . inet_service : verdict ; \
         comment \"vmap to drop or reject packets to services with no endpoints\" ; }}\n\
         add map {t} no-endpoint-nodeports {{ type inet_proto . inet_service : verdict ; \
         comment \"vmap to drop or reject packets to service nodeports with no endpoints\" ; }}\n\
         add chain {t} reject-chain {{ comment \"helper for @no-endpoint-services / @no-endpoint-nodeports\" ; }}\n\
         add rule {t} reject-chain reject\n\
         add rule {t} service-endpoints-check ip daddr . meta l4proto . th dport vmap @no-endpoint-services\n\
         add rule {t} nodeport-endpoints-check ip daddr != 127.0.0.0/8 meta l4proto . th dport \
         vmap @no-endpoint-nodeports\n\
         add map {t} firewall-ips {{ type ipv4_addr . inet_proto . inet_service : verdict ; \
         comment \"destinations that are subject to LoadBalancerSourceRanges\" ; }}\n\
         add rule {t} firewall-check ip daddr . meta l4proto . th dport vmap @firewall-ips\n\
         add map {t} service-ips {{ type ipv4_addr . inet_proto . inet_service : verdict ; \
         comment \"ClusterIP, ExternalIP and LoadBalancer IP traffic\" ; }}\n\
         add map {t} service-nodeports {{ type inet_proto . inet_service : verdict ; \
         comment \"NodePort traffic\" ; }}\n\
         add rule {t} services ip daddr . meta l4proto . th dport vmap @service-ips\n\
         add rule {t} services fib daddr type local ip daddr != 127.0.0.0/8 \
         meta l4proto . th dport vmap @service-nodeports"
    );

    for svc in services {
        let eps = distinct(&svc.endpoints);
        let proto = svc.protocol.as_str();
        let (vip, port) = (svc.cluster_ip, svc.port);
        let (namespace, name, port_name) = split_name(&svc.name);
        let svc_chain = format!(
            "service-{}",
            nft_hash_and_truncate(&format!("{namespace}/{name}/{proto}/{port_name}"))
        );
        let ep_chains: Vec<String> = eps
            .iter()
            .map(|(ip, p)| {
                format!(
                    "endpoint-{}",
                    nft_hash_and_truncate(&format!(
                        "{namespace}/{name}/{proto}/{port_name}__{ip}/{p}"
                    ))
                )
            })
            .collect();
        for chain in &ep_chains {
            let _ = writeln!(out, "add chain {t} {chain}");
        }
        if !eps.is_empty() {
            let _ = writeln!(out, "add chain {t} {svc_chain}");
        }
        let _ = writeln!(out, "add element {t} cluster-ips {{ {vip} }}");
        if eps.is_empty() {
            let _ = writeln!(
                out,
                "add element {t} no-endpoint-services {{ {vip} . {proto} . {port} \
                 comment \"{}\" : goto reject-chain }}",
                svc.name
            );
            continue;
        }
        let _ = writeln!(
            out,
            "add element {t} service-ips {{ {vip} . {proto} . {port} : goto {svc_chain} }}\n\
             add rule {t} {svc_chain} ip daddr {vip} {proto} dport {port} \
             ip saddr != {cluster_cidr} jump mark-for-masquerade"
        );
        let _ = write!(
            out,
            "add rule {t} {svc_chain} numgen random mod {} vmap {{ ",
            eps.len()
        );
        for (i, chain) in ep_chains.iter().enumerate() {
            if i > 0 {
                out.push_str(" , ");
            }
            let _ = write!(out, "{i} : goto {chain}");
        }
        out.push_str(" }\n");
        for ((ip, p), chain) in eps.iter().zip(&ep_chains) {
            let _ = writeln!(
                out,
                "add rule {t} {chain} ip saddr {ip} jump mark-for-masquerade\n\
                 add rule {t} {chain} meta l4proto {proto} dnat to {ip}:{p}"
            );
        }
    }
    out
}

/// Which `iptables` front end (and kernel back end) carries the rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IptablesBackend {
    /// `iptables-nft`: the rules become nf_tables rules (tables `ip nat`,
    /// `ip filter`). What kube-proxy uses on current distributions.
    Nft,
    /// `iptables-legacy`: x_tables. Loads large rule sets much faster
    /// (iptables-nft 1.8.9 looks chains up by linear search).
    Legacy,
}

impl IptablesBackend {
    pub fn restore(self) -> &'static str {
        match self {
            IptablesBackend::Nft => "iptables-nft-restore",
            IptablesBackend::Legacy => "iptables-legacy-restore",
        }
    }

    pub fn save(self) -> &'static str {
        match self {
            IptablesBackend::Nft => "iptables-nft-save",
            IptablesBackend::Legacy => "iptables-legacy-save",
        }
    }
}

/// Installs kube-proxy's iptables-mode rules for `services` in `ns` (after
/// [`flush`], so it replaces what an earlier `apply_*` installed): one
/// `iptables-nft-restore -w --noflush` fed through stdin. (The benchmark
/// picks its backend; the tests check the nft one.)
#[cfg(test)]
pub fn apply_iptables(ns: &Netns, services: &[KpService], cluster_cidr: &str) -> Result<()> {
    apply_iptables_with(ns, services, cluster_cidr, IptablesBackend::Nft)
}

/// [`apply_iptables`] with a chosen backend.
pub fn apply_iptables_with(
    ns: &Netns,
    services: &[KpService],
    cluster_cidr: &str,
    backend: IptablesBackend,
) -> Result<()> {
    check_input(services, cluster_cidr)?;
    flush(ns)?;
    let input = iptables_restore_input(services, cluster_cidr);
    run_in(ns, &[backend.restore(), "-w", "--noflush"], Some(&input))
        .with_context(|| format!("loading kube-proxy iptables rules into netns {}", ns.name()))?;
    Ok(())
}

/// Installs kube-proxy's nftables-mode ruleset for `services` in `ns`
/// (after [`flush`], which also removes iptables-mode rules): one `nft -f -`.
pub fn apply_nftables(ns: &Netns, services: &[KpService], cluster_cidr: &str) -> Result<()> {
    check_input(services, cluster_cidr)?;
    flush(ns)?;
    let input = nftables_ruleset(services, cluster_cidr);
    run_in(ns, &["nft", "-f", "-"], Some(&input))
        .with_context(|| format!("loading kube-proxy nftables rules into netns {}", ns.name()))?;
    Ok(())
}

/// Removes what `apply_*` installed in `ns`: the `ip kube-proxy` nftables
/// table, and in the iptables filter and nat tables (both backends) every
/// `KUBE-*` chain and every jump to one from a built-in chain. An
/// iptables-nft table that holds nothing else (no other rules or chains,
/// ACCEPT policies) is deleted as a whole, which is also much faster, so
/// that its hooks cost nothing to what is measured next. Idempotent.
pub fn flush(ns: &Netns) -> Result<()> {
    run_in(
        ns,
        &["nft", "-f", "-"],
        Some(&format!(
            "add table ip {NFT_TABLE}\ndelete table ip {NFT_TABLE}\n"
        )),
    )
    .context("removing the kube-proxy nftables table")?;
    flush_iptables(ns, IptablesBackend::Nft)?;
    // Listing a legacy table would create it: only look at existing ones.
    let legacy = run_in(ns, &["cat", "/proc/net/ip_tables_names"], None)?;
    if legacy.lines().any(|t| t == "filter" || t == "nat") {
        flush_iptables(ns, IptablesBackend::Legacy)?;
    }
    Ok(())
}

fn flush_iptables(ns: &Netns, backend: IptablesBackend) -> Result<()> {
    let saved = run_in(ns, &[backend.save()], None)
        .with_context(|| format!("listing iptables rules in netns {}", ns.name()))?;
    let mut restore = String::new();
    let mut delete = String::new();
    for (table, section) in save_sections(&saved) {
        if table != "filter" && table != "nat" {
            continue;
        }
        let cleanup = iptables_cleanup(section, table);
        if backend == IptablesBackend::Nft && cleanup.table_left_empty {
            let _ = writeln!(delete, "delete table ip {table}");
        } else if let Some(input) = cleanup.restore_input {
            restore.push_str(&input);
        }
    }
    if !restore.is_empty() {
        run_in(ns, &[backend.restore(), "-w", "--noflush"], Some(&restore)).with_context(|| {
            format!(
                "removing kube-proxy iptables rules ({}) in netns {}",
                backend.save(),
                ns.name()
            )
        })?;
    }
    if !delete.is_empty() {
        run_in(ns, &["nft", "-f", "-"], Some(&delete))
            .with_context(|| format!("deleting iptables-nft tables in netns {}", ns.name()))?;
    }
    Ok(())
}

/// `iptables-save` output cut into (table, `*table` .. `COMMIT`) sections.
fn save_sections(saved: &str) -> Vec<(&str, &str)> {
    let mut out = Vec::new();
    let mut rest = saved;
    loop {
        let start = if rest.starts_with('*') {
            0
        } else if let Some(i) = rest.find("\n*") {
            i + 1
        } else {
            break;
        };
        let section = &rest[start..];
        let table = section[1..].lines().next().unwrap_or_default().trim();
        let end = section
            .find("\nCOMMIT")
            .map(|i| i + "\nCOMMIT".len())
            .unwrap_or(section.len());
        out.push((table, &section[..end]));
        rest = &section[end..];
    }
    out
}

/// What [`flush`] does to one iptables table, from its `iptables-save`.
#[derive(Debug, PartialEq, Eq)]
struct IptablesCleanup {
    /// `iptables-restore --noflush` input removing our chains and jumps.
    restore_input: Option<String>,
    /// The table exists and holds nothing but our rules and ACCEPT policies.
    table_left_empty: bool,
}

fn iptables_cleanup(saved: &str, table: &str) -> IptablesCleanup {
    let mut exists = false;
    let mut foreign = false;
    let mut kube_chains = Vec::new();
    let mut jumps = Vec::new();
    for line in saved.lines() {
        if line.starts_with('*') {
            exists = true;
        } else if line.starts_with('#') && line.contains("incompatible") {
            foreign = true;
        } else if let Some(decl) = line.strip_prefix(':') {
            let mut words = decl.split_whitespace();
            let chain = words.next().unwrap_or_default();
            if chain.starts_with("KUBE-") {
                kube_chains.push(chain.to_owned());
            } else if words.next() != Some("ACCEPT") {
                // A user chain ("-") or a built-in with a DROP policy.
                foreign = true;
            }
        } else if let Some(rule) = line.strip_prefix("-A ") {
            let chain = rule.split_whitespace().next().unwrap_or_default();
            if chain.starts_with("KUBE-") {
                continue;
            }
            if rule.contains(" -j KUBE-") {
                jumps.push(format!("-D {rule}"));
            } else {
                foreign = true;
            }
        }
    }
    let restore_input = (!kube_chains.is_empty() || !jumps.is_empty()).then(|| {
        let mut input = format!("*{table}\n");
        for jump in &jumps {
            let _ = writeln!(input, "{jump}");
        }
        for chain in &kube_chains {
            let _ = writeln!(input, ":{chain} - [0:0]");
        }
        for chain in &kube_chains {
            let _ = writeln!(input, "-X {chain}");
        }
        input.push_str("COMMIT\n");
        input
    });
    IptablesCleanup {
        restore_input,
        table_left_empty: exists && !foreign,
    }
}

/// Checks what the generators assume: names in kube-proxy's form, no two
/// services with the same name or the same VIP:port/protocol, ports not 0,
/// a valid IPv4 CIDR.
fn check_input(services: &[KpService], cluster_cidr: &str) -> Result<()> {
    parse_cidr(cluster_cidr)?;
    let mut names = HashSet::with_capacity(services.len());
    let mut frontends = HashSet::with_capacity(services.len());
    for svc in services {
        let (namespace, name, port) = split_name(&svc.name);
        let ok = |s: &str| {
            s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_')
        };
        ensure!(
            svc.name.contains('/')
                && !namespace.is_empty()
                && !name.is_empty()
                && ok(namespace)
                && ok(name)
                && ok(port),
            "service name {:?}: expected namespace/name[:port-name] of [A-Za-z0-9._-]",
            svc.name
        );
        ensure!(svc.port != 0, "service {}: port 0", svc.name);
        ensure!(
            svc.endpoints.iter().all(|&(_, p)| p != 0),
            "service {}: an endpoint with port 0",
            svc.name
        );
        ensure!(
            names.insert((svc.name.as_str(), svc.protocol)),
            "service {} ({}) given twice",
            svc.name,
            svc.protocol.as_str()
        );
        ensure!(
            frontends.insert((svc.cluster_ip, svc.port, svc.protocol)),
            "two services on {}:{}/{}",
            svc.cluster_ip,
            svc.port,
            svc.protocol.as_str()
        );
    }
    Ok(())
}

fn parse_cidr(cidr: &str) -> Result<(Ipv4Addr, u8)> {
    let parsed = cidr.split_once('/').and_then(|(ip, len)| {
        let ip: Ipv4Addr = ip.parse().ok()?;
        let len: u8 = len.parse().ok().filter(|l| *l <= 32)?;
        Some((ip, len))
    });
    match parsed {
        Some(v) => Ok(v),
        None => bail!("cluster CIDR {cidr:?}: expected a.b.c.d/len"),
    }
}

/// `namespace/name:port` -> (namespace, name, port); "default" namespace
/// and empty port name when absent.
fn split_name(full: &str) -> (&str, &str, &str) {
    let (ns_name, port) = full.split_once(':').unwrap_or((full, ""));
    let (namespace, name) = ns_name.split_once('/').unwrap_or(("default", ns_name));
    (namespace, name, port)
}

/// Endpoints without repeats, order kept (kube-proxy's endpoints map is a
/// set; a repeat would also repeat a chain name).
fn distinct(endpoints: &[(Ipv4Addr, u16)]) -> Vec<(Ipv4Addr, u16)> {
    let mut out: Vec<(Ipv4Addr, u16)> = Vec::with_capacity(endpoints.len());
    if endpoints.len() <= 16 {
        for ep in endpoints {
            if !out.contains(ep) {
                out.push(*ep);
            }
        }
    } else {
        let mut seen = HashSet::with_capacity(endpoints.len());
        out.extend(endpoints.iter().filter(|ep| seen.insert(**ep)));
    }
    out
}

/// Runs `argv` inside `ns` (setns only), feeding `stdin` if given, and
/// returns its stdout; fails with its stderr (and, for "line N" errors, the
/// offending input line).
fn run_in(ns: &Netns, argv: &[&str], stdin: Option<&str>) -> Result<String> {
    let (program, args) = argv.split_first().context("empty argv")?;
    let mut cmd = Command::new(program);
    cmd.args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    ns.prepare(&mut cmd);
    let mut child = cmd
        .spawn()
        .with_context(|| format!("starting {program} in netns {}", ns.name()))?;
    let pipe = child.stdin.take();
    // Write on a thread while the output is read: a large input and a
    // chatty error must not wait on each other.
    let (written, output) = std::thread::scope(|s| {
        let writer = s.spawn(move || -> std::io::Result<()> {
            if let (Some(mut pipe), Some(text)) = (pipe, stdin) {
                pipe.write_all(text.as_bytes())?;
            }
            Ok(())
        });
        let output = child.wait_with_output();
        (writer.join(), output)
    });
    let output = output.with_context(|| format!("waiting for {program}"))?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let culprit = stdin
            .and_then(|text| offending_line(&stderr, text))
            .map(|l| format!("\ninput line: {l}"))
            .unwrap_or_default();
        bail!(
            "`{}` in netns {} failed ({}): {}{culprit}",
            argv.join(" "),
            ns.name(),
            output.status,
            stderr.trim()
        );
    }
    match written {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(e).with_context(|| format!("writing the input of {program}")),
        Err(_) => bail!("the thread writing the input of {program} panicked"),
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// The input line an error message points at: iptables-restore says
/// "line N", nft "/dev/stdin:N:...".
fn offending_line<'a>(stderr: &str, input: &'a str) -> Option<&'a str> {
    let number_after = |marker: &str| -> Option<usize> {
        let rest = &stderr[stderr.find(marker)? + marker.len()..];
        let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
        digits.parse().ok()
    };
    let n = number_after("line ").or_else(|| number_after("stdin:"))?;
    input.lines().nth(n.checked_sub(1)?)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::names::{base32_prefix, sha256};
    use super::*;
    use std::io;
    use std::net::{SocketAddr, TcpListener, UdpSocket};
    use std::time::{Duration, Instant};
    use tern_lab::netns::unique_ifname;
    use tern_lab::skip::require_root;
    use tern_lab::traffic::{EchoServer, tcp_roundtrip, udp_roundtrip};

    fn svc(
        name: &str,
        vip: [u8; 4],
        port: u16,
        protocol: Proto,
        eps: &[([u8; 4], u16)],
    ) -> KpService {
        KpService {
            name: name.into(),
            cluster_ip: vip.into(),
            port,
            protocol,
            endpoints: eps.iter().map(|&(ip, p)| (ip.into(), p)).collect(),
        }
    }

    /// kube-proxy's own test fixtures: ns1/svc1:p80 with 10.180.0.x.
    fn two_services() -> Vec<KpService> {
        vec![
            svc(
                "ns1/svc1:p80",
                [172, 30, 0, 41],
                80,
                Proto::Tcp,
                &[
                    ([10, 180, 0, 1], 80),
                    ([10, 180, 0, 2], 80),
                    ([10, 180, 0, 3], 80),
                ],
            ),
            svc(
                "ns2/svc2:p53",
                [172, 30, 0, 42],
                53,
                Proto::Udp,
                &[([10, 180, 0, 4], 5353)],
            ),
        ]
    }

    #[test]
    fn sha256_and_base32_match_the_references() {
        let hex = |d: [u8; 32]| d.iter().map(|b| format!("{b:02x}")).collect::<String>();
        assert_eq!(
            hex(sha256(b"")),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert_eq!(
            hex(sha256(b"abc")),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(
            hex(sha256(
                b"abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq"
            )),
            "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1"
        );
        // RFC 4648 test vectors.
        assert_eq!(base32_prefix(b"foobar", 16), "MZXW6YTBOI");
        assert_eq!(base32_prefix(b"fooba", 16), "MZXW6YTB");
        assert_eq!(base32_prefix(b"f", 16), "MY");
        // Names that appear in kube-proxy's own unit tests.
        assert_eq!(
            iptables_service_chain("ns1/svc1:p80", "tcp"),
            "KUBE-SVC-XPGD46QRK7WJZT7O"
        );
        assert_eq!(
            iptables_endpoint_chain("ns1/svc1:p80", "tcp", Ipv4Addr::new(10, 180, 0, 1), 80),
            "KUBE-SEP-SXIVWICOYRO3J4NJ"
        );
        assert_eq!(
            nft_hash_and_truncate("ns1/svc1/tcp/p80"),
            "ULMVA6XW-ns1/svc1/tcp/p80"
        );
        assert_eq!(
            nft_hash_and_truncate("ns1/svc1/tcp/p80__10.180.0.1/80"),
            "5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80"
        );
        let long = "x".repeat(300);
        let cut = nft_hash_and_truncate(&long);
        assert_eq!(cut.len(), NFT_CHAIN_BASE_MAX);
        assert!(cut.ends_with("..."));
    }

    #[test]
    fn iptables_layout_for_two_services() {
        let got = iptables_restore_input(&two_services(), "10.244.0.0/16");
        let want = r#"*filter
:KUBE-SERVICES - [0:0]
:KUBE-EXTERNAL-SERVICES - [0:0]
:KUBE-FORWARD - [0:0]
:KUBE-NODEPORTS - [0:0]
:KUBE-PROXY-FIREWALL - [0:0]
:KUBE-FIREWALL - [0:0]
-A KUBE-FIREWALL -m comment --comment "block incoming localnet connections" -d 127.0.0.0/8 ! -s 127.0.0.0/8 -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP
-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP
-A KUBE-FORWARD -m comment --comment "kubernetes forwarding rules" -m mark --mark 0x4000/0x4000 -j ACCEPT
-A KUBE-FORWARD -m comment --comment "kubernetes forwarding conntrack rule" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
-I INPUT -m conntrack --ctstate NEW -m comment --comment "kubernetes externally-visible service portals" -j KUBE-EXTERNAL-SERVICES
-I FORWARD -m conntrack --ctstate NEW -m comment --comment "kubernetes externally-visible service portals" -j KUBE-EXTERNAL-SERVICES
-I INPUT -m comment --comment "kubernetes health check service ports" -j KUBE-NODEPORTS
-I FORWARD -m conntrack --ctstate NEW -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-I OUTPUT -m conntrack --ctstate NEW -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-I FORWARD -m comment --comment "kubernetes forwarding rules" -j KUBE-FORWARD
-I INPUT -m conntrack --ctstate NEW -m comment --comment "kubernetes load balancer firewall" -j KUBE-PROXY-FIREWALL
-I OUTPUT -m conntrack --ctstate NEW -m comment --comment "kubernetes load balancer firewall" -j KUBE-PROXY-FIREWALL
-I FORWARD -m conntrack --ctstate NEW -m comment --comment "kubernetes load balancer firewall" -j KUBE-PROXY-FIREWALL
-I INPUT -j KUBE-FIREWALL
-I OUTPUT -j KUBE-FIREWALL
COMMIT
*nat
:KUBE-SERVICES - [0:0]
:KUBE-NODEPORTS - [0:0]
:KUBE-POSTROUTING - [0:0]
:KUBE-MARK-MASQ - [0:0]
:KUBE-SVC-XPGD46QRK7WJZT7O - [0:0]
:KUBE-SEP-SXIVWICOYRO3J4NJ - [0:0]
:KUBE-SEP-LXVODXWDISEETFEF - [0:0]
:KUBE-SEP-ICDUIKC33SFI6ZPR - [0:0]
:KUBE-SVC-IBUBGP27PW3R7ONJ - [0:0]
:KUBE-SEP-6GKG4HMYRZK4SQAO - [0:0]
-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN
-A KUBE-POSTROUTING -j MARK --xor-mark 0x4000
-A KUBE-POSTROUTING -m comment --comment "kubernetes service traffic requiring SNAT" -j MASQUERADE --random-fully
-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000
-A KUBE-SERVICES -m comment --comment "ns1/svc1:p80 cluster IP" -m tcp -p tcp -d 172.30.0.41 --dport 80 -j KUBE-SVC-XPGD46QRK7WJZT7O
-A KUBE-SVC-XPGD46QRK7WJZT7O -m comment --comment "ns1/svc1:p80 cluster IP" -m tcp -p tcp -d 172.30.0.41 --dport 80 ! -s 10.244.0.0/16 -j KUBE-MARK-MASQ
-A KUBE-SVC-XPGD46QRK7WJZT7O -m comment --comment "ns1/svc1:p80 -> 10.180.0.1:80" -m statistic --mode random --probability 0.3333333333 -j KUBE-SEP-SXIVWICOYRO3J4NJ
-A KUBE-SVC-XPGD46QRK7WJZT7O -m comment --comment "ns1/svc1:p80 -> 10.180.0.2:80" -m statistic --mode random --probability 0.5000000000 -j KUBE-SEP-LXVODXWDISEETFEF
-A KUBE-SVC-XPGD46QRK7WJZT7O -m comment --comment "ns1/svc1:p80 -> 10.180.0.3:80" -j KUBE-SEP-ICDUIKC33SFI6ZPR
-A KUBE-SEP-SXIVWICOYRO3J4NJ -m comment --comment ns1/svc1:p80 -s 10.180.0.1 -j KUBE-MARK-MASQ
-A KUBE-SEP-SXIVWICOYRO3J4NJ -m comment --comment ns1/svc1:p80 -m tcp -p tcp -j DNAT --to-destination 10.180.0.1:80
-A KUBE-SEP-LXVODXWDISEETFEF -m comment --comment ns1/svc1:p80 -s 10.180.0.2 -j KUBE-MARK-MASQ
-A KUBE-SEP-LXVODXWDISEETFEF -m comment --comment ns1/svc1:p80 -m tcp -p tcp -j DNAT --to-destination 10.180.0.2:80
-A KUBE-SEP-ICDUIKC33SFI6ZPR -m comment --comment ns1/svc1:p80 -s 10.180.0.3 -j KUBE-MARK-MASQ
-A KUBE-SEP-ICDUIKC33SFI6ZPR -m comment --comment ns1/svc1:p80 -m tcp -p tcp -j DNAT --to-destination 10.180.0.3:80
-A KUBE-SERVICES -m comment --comment "ns2/svc2:p53 cluster IP" -m udp -p udp -d 172.30.0.42 --dport 53 -j KUBE-SVC-IBUBGP27PW3R7ONJ
-A KUBE-SVC-IBUBGP27PW3R7ONJ -m comment --comment "ns2/svc2:p53 cluster IP" -m udp -p udp -d 172.30.0.42 --dport 53 ! -s 10.244.0.0/16 -j KUBE-MARK-MASQ
-A KUBE-SVC-IBUBGP27PW3R7ONJ -m comment --comment "ns2/svc2:p53 -> 10.180.0.4:5353" -j KUBE-SEP-6GKG4HMYRZK4SQAO
-A KUBE-SEP-6GKG4HMYRZK4SQAO -m comment --comment ns2/svc2:p53 -s 10.180.0.4 -j KUBE-MARK-MASQ
-A KUBE-SEP-6GKG4HMYRZK4SQAO -m comment --comment ns2/svc2:p53 -m udp -p udp -j DNAT --to-destination 10.180.0.4:5353
-A KUBE-SERVICES -m comment --comment "kubernetes service nodeports; NOTE: this must be the last rule in this chain" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS
-I OUTPUT -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-I PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-I POSTROUTING -m comment --comment "kubernetes postrouting rules" -j KUBE-POSTROUTING
COMMIT
"#;
        assert_eq!(got, want, "\n--- got ---\n{got}");
    }

    #[test]
    fn nftables_layout_for_two_services() {
        let got = nftables_ruleset(&two_services(), "10.244.0.0/16");
        let want = r#"add table ip kube-proxy { comment "rules for kube-proxy" ; }
delete table ip kube-proxy
add table ip kube-proxy { comment "rules for kube-proxy" ; }
add chain ip kube-proxy filter-prerouting { type filter hook prerouting priority -110 ; }
add chain ip kube-proxy filter-input { type filter hook input priority -110 ; }
add chain ip kube-proxy filter-forward { type filter hook forward priority -110 ; }
add chain ip kube-proxy filter-output { type filter hook output priority -110 ; }
add chain ip kube-proxy filter-output-post-dnat { type filter hook output priority -90 ; }
add chain ip kube-proxy nat-prerouting { type nat hook prerouting priority -100 ; }
add chain ip kube-proxy nat-output { type nat hook output priority -100 ; }
add chain ip kube-proxy nat-postrouting { type nat hook postrouting priority 100 ; }
add chain ip kube-proxy nodeport-endpoints-check
add rule ip kube-proxy filter-input ct state new jump nodeport-endpoints-check
add chain ip kube-proxy service-endpoints-check
add rule ip kube-proxy filter-input ct state new jump service-endpoints-check
add rule ip kube-proxy filter-forward ct state new jump service-endpoints-check
add rule ip kube-proxy filter-output ct state new jump service-endpoints-check
add chain ip kube-proxy firewall-check
add rule ip kube-proxy filter-prerouting ct state new jump firewall-check
add rule ip kube-proxy filter-output ct state new jump firewall-check
add chain ip kube-proxy services
add rule ip kube-proxy nat-output jump services
add rule ip kube-proxy nat-prerouting jump services
add chain ip kube-proxy masquerading
add rule ip kube-proxy nat-postrouting jump masquerading
add chain ip kube-proxy cluster-ips-check
add rule ip kube-proxy filter-forward ct state new jump cluster-ips-check
add rule ip kube-proxy filter-output-post-dnat ct state new jump cluster-ips-check
add chain ip kube-proxy mark-for-masquerade
add rule ip kube-proxy mark-for-masquerade mark set mark or 0x4000
add rule ip kube-proxy masquerading mark and 0x4000 == 0 return
add rule ip kube-proxy masquerading mark set mark xor 0x4000
add rule ip kube-proxy masquerading masquerade fully-random
add set ip kube-proxy cluster-ips { type ipv4_addr ; comment "Active ClusterIPs" ; }
add rule ip kube-proxy cluster-ips-check ip daddr @cluster-ips reject comment "Reject traffic to invalid ports of ClusterIPs"
add map ip kube-proxy no-endpoint-services { type ipv4_addr . inet_proto . inet_service : verdict ; comment "vmap to drop or reject packets to services with no endpoints" ; }
add map ip kube-proxy no-endpoint-nodeports { type inet_proto . inet_service : verdict ; comment "vmap to drop or reject packets to service nodeports with no endpoints" ; }
add chain ip kube-proxy reject-chain { comment "helper for @no-endpoint-services / @no-endpoint-nodeports" ; }
add rule ip kube-proxy reject-chain reject
add rule ip kube-proxy service-endpoints-check ip daddr . meta l4proto . th dport vmap @no-endpoint-services
add rule ip kube-proxy nodeport-endpoints-check ip daddr != 127.0.0.0/8 meta l4proto . th dport vmap @no-endpoint-nodeports
add map ip kube-proxy firewall-ips { type ipv4_addr . inet_proto . inet_service : verdict ; comment "destinations that are subject to LoadBalancerSourceRanges" ; }
add rule ip kube-proxy firewall-check ip daddr . meta l4proto . th dport vmap @firewall-ips
add map ip kube-proxy service-ips { type ipv4_addr . inet_proto . inet_service : verdict ; comment "ClusterIP, ExternalIP and LoadBalancer IP traffic" ; }
add map ip kube-proxy service-nodeports { type inet_proto . inet_service : verdict ; comment "NodePort traffic" ; }
add rule ip kube-proxy services ip daddr . meta l4proto . th dport vmap @service-ips
add rule ip kube-proxy services fib daddr type local ip daddr != 127.0.0.0/8 meta l4proto . th dport vmap @service-nodeports
add chain ip kube-proxy endpoint-5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80
add chain ip kube-proxy endpoint-2ZNDXFAB-ns1/svc1/tcp/p80__10.180.0.2/80
add chain ip kube-proxy endpoint-WUHIZN2H-ns1/svc1/tcp/p80__10.180.0.3/80
add chain ip kube-proxy service-ULMVA6XW-ns1/svc1/tcp/p80
add element ip kube-proxy cluster-ips { 172.30.0.41 }
add element ip kube-proxy service-ips { 172.30.0.41 . tcp . 80 : goto service-ULMVA6XW-ns1/svc1/tcp/p80 }
add rule ip kube-proxy service-ULMVA6XW-ns1/svc1/tcp/p80 ip daddr 172.30.0.41 tcp dport 80 ip saddr != 10.244.0.0/16 jump mark-for-masquerade
add rule ip kube-proxy service-ULMVA6XW-ns1/svc1/tcp/p80 numgen random mod 3 vmap { 0 : goto endpoint-5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80 , 1 : goto endpoint-2ZNDXFAB-ns1/svc1/tcp/p80__10.180.0.2/80 , 2 : goto endpoint-WUHIZN2H-ns1/svc1/tcp/p80__10.180.0.3/80 }
add rule ip kube-proxy endpoint-5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80 ip saddr 10.180.0.1 jump mark-for-masquerade
add rule ip kube-proxy endpoint-5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80 meta l4proto tcp dnat to 10.180.0.1:80
add rule ip kube-proxy endpoint-2ZNDXFAB-ns1/svc1/tcp/p80__10.180.0.2/80 ip saddr 10.180.0.2 jump mark-for-masquerade
add rule ip kube-proxy endpoint-2ZNDXFAB-ns1/svc1/tcp/p80__10.180.0.2/80 meta l4proto tcp dnat to 10.180.0.2:80
add rule ip kube-proxy endpoint-WUHIZN2H-ns1/svc1/tcp/p80__10.180.0.3/80 ip saddr 10.180.0.3 jump mark-for-masquerade
add rule ip kube-proxy endpoint-WUHIZN2H-ns1/svc1/tcp/p80__10.180.0.3/80 meta l4proto tcp dnat to 10.180.0.3:80
add chain ip kube-proxy endpoint-NFHPQ7II-ns2/svc2/udp/p53__10.180.0.4/5353
add chain ip kube-proxy service-VITOD6J3-ns2/svc2/udp/p53
add element ip kube-proxy cluster-ips { 172.30.0.42 }
add element ip kube-proxy service-ips { 172.30.0.42 . udp . 53 : goto service-VITOD6J3-ns2/svc2/udp/p53 }
add rule ip kube-proxy service-VITOD6J3-ns2/svc2/udp/p53 ip daddr 172.30.0.42 udp dport 53 ip saddr != 10.244.0.0/16 jump mark-for-masquerade
add rule ip kube-proxy service-VITOD6J3-ns2/svc2/udp/p53 numgen random mod 1 vmap { 0 : goto endpoint-NFHPQ7II-ns2/svc2/udp/p53__10.180.0.4/5353 }
add rule ip kube-proxy endpoint-NFHPQ7II-ns2/svc2/udp/p53__10.180.0.4/5353 ip saddr 10.180.0.4 jump mark-for-masquerade
add rule ip kube-proxy endpoint-NFHPQ7II-ns2/svc2/udp/p53__10.180.0.4/5353 meta l4proto udp dnat to 10.180.0.4:5353
"#;
        assert_eq!(got, want, "\n--- got ---\n{got}");
    }

    #[test]
    fn no_endpoints_and_large_clusters_follow_kube_proxy() {
        let empty = [svc("ns/none:http", [10, 96, 0, 9], 80, Proto::Tcp, &[])];
        let ipt = iptables_restore_input(&empty, "10.244.0.0/16");
        assert!(ipt.contains(
            "-A KUBE-SERVICES -m comment --comment \"ns/none:http has no endpoints\" \
             -m tcp -p tcp -d 10.96.0.9 --dport 80 -j REJECT\n"
        ));
        assert!(!ipt.contains("KUBE-SVC-"), "{ipt}");
        let nft = nftables_ruleset(&empty, "10.244.0.0/16");
        assert!(nft.contains(
            "add element ip kube-proxy no-endpoint-services { 10.96.0.9 . tcp . 80 \
             comment \"ns/none:http\" : goto reject-chain }\n"
        ));
        assert!(
            !nft.contains("add element ip kube-proxy service-ips"),
            "{nft}"
        );

        // 1001 endpoints: per-endpoint comments go, the ClusterIP ones stay.
        let backends: Vec<_> = (1..=7).map(|i| (Ipv4Addr::new(10, 1, 0, i), 80)).collect();
        let many = synthetic_services(143, 7, &backends);
        let ipt = iptables_restore_input(&many, "10.244.0.0/16");
        assert!(
            !ipt.contains(" -> "),
            "endpoint comments in large-cluster mode"
        );
        assert!(ipt.contains("\"bench/svc-0:http cluster IP\""));
        assert!(ipt.contains(" --probability 0.1428571429 "));
        let few = synthetic_services(142, 7, &backends);
        assert!(iptables_restore_input(&few, "10.244.0.0/16").contains(" -> "));
    }

    #[test]
    fn synthetic_services_spread_endpoints_round_robin() {
        let backends: Vec<_> = (1..=3)
            .map(|i| (Ipv4Addr::new(10, 1, 0, i), 8080))
            .collect();
        let s = synthetic_services(300, 2, &backends);
        assert_eq!(s.len(), 300);
        assert_eq!(s[0].cluster_ip, Ipv4Addr::new(10, 96, 0, 1));
        assert_eq!(s[299].cluster_ip, Ipv4Addr::new(10, 96, 1, 44));
        assert_eq!(s[0].endpoints, vec![backends[0], backends[1]]);
        assert_eq!(s[1].endpoints, vec![backends[2], backends[0]]);
        assert_eq!(s[7].name, "bench/svc-7:http");
        let vips: HashSet<_> = s.iter().map(|s| s.cluster_ip).collect();
        assert_eq!(vips.len(), 300);
        check_input(&s, "10.244.0.0/16").unwrap();
    }

    #[test]
    fn input_checks_and_flush_parsing() {
        let ok = two_services();
        check_input(&ok, "10.244.0.0/16").unwrap();
        assert!(check_input(&ok, "10.244.0.0").is_err());
        assert!(check_input(&ok, "10.244.0.0/33").is_err());
        let mut bad = ok.clone();
        bad[0].name = "no-namespace".into();
        assert!(check_input(&bad, "10.244.0.0/16").is_err());
        let mut bad = ok.clone();
        bad[0].name = "ns/with space".into();
        assert!(check_input(&bad, "10.244.0.0/16").is_err());
        let mut bad = ok.clone();
        bad[1].cluster_ip = bad[0].cluster_ip;
        bad[1].port = bad[0].port;
        bad[1].protocol = bad[0].protocol;
        assert!(check_input(&bad, "10.244.0.0/16").is_err());
        let dup = [ok[0].clone(), ok[0].clone()];
        assert!(check_input(&dup, "10.244.0.0/16").is_err());
        assert_eq!(
            distinct(&[(Ipv4Addr::LOCALHOST, 1), (Ipv4Addr::LOCALHOST, 1)]).len(),
            1
        );

        let saved = "# Generated by iptables-nft-save\n*nat\n:PREROUTING ACCEPT [0:0]\n\
                     :POSTROUTING ACCEPT [0:0]\n:KUBE-SERVICES - [0:0]\n:KUBE-SVC-X - [0:0]\n\
                     -A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
                     -A KUBE-SERVICES -d 10.96.0.1/32 -j KUBE-SVC-X\nCOMMIT\n";
        let cleanup = iptables_cleanup(saved, "nat");
        assert_eq!(
            cleanup.restore_input.as_deref(),
            Some(
                "*nat\n-D PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
                 :KUBE-SERVICES - [0:0]\n:KUBE-SVC-X - [0:0]\n-X KUBE-SERVICES\n-X KUBE-SVC-X\nCOMMIT\n"
            )
        );
        assert!(cleanup.table_left_empty);
        let theirs = format!("{saved}-A POSTROUTING -o eth0 -j MASQUERADE\n");
        assert!(!iptables_cleanup(&theirs, "nat").table_left_empty);
        let drop_policy = saved.replace(":POSTROUTING ACCEPT", ":POSTROUTING DROP");
        assert!(!iptables_cleanup(&drop_policy, "nat").table_left_empty);
        assert_eq!(
            iptables_cleanup("", "nat"),
            IptablesCleanup {
                restore_input: None,
                table_left_empty: false
            }
        );
        let both = "# Generated\n*filter\n:INPUT ACCEPT [0:0]\nCOMMIT\n# Completed\n\
                    *nat\n:PREROUTING ACCEPT [0:0]\nCOMMIT\n";
        assert_eq!(
            save_sections(both),
            vec![
                ("filter", "*filter\n:INPUT ACCEPT [0:0]\nCOMMIT"),
                ("nat", "*nat\n:PREROUTING ACCEPT [0:0]\nCOMMIT")
            ]
        );
        assert_eq!(save_sections(&both[12..])[0].0, "filter");
        assert!(save_sections("").is_empty());
        assert_eq!(
            offending_line("iptables-restore: line 2 failed", "a\nb\nc"),
            Some("b")
        );
        assert_eq!(
            offending_line("/dev/stdin:3:5-9: Error: syntax error", "a\nb\nc"),
            Some("c")
        );
    }

    // ---- root tests: real traffic through the rules ----

    const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 2);
    const NODE_BACKEND_SIDE: Ipv4Addr = Ipv4Addr::new(10, 244, 2, 1);
    const BACKEND_A: (Ipv4Addr, u16) = (Ipv4Addr::new(10, 244, 2, 2), 8080);
    const BACKEND_B: (Ipv4Addr, u16) = (Ipv4Addr::new(10, 244, 2, 3), 8081);
    const CLUSTER_CIDR: &str = "10.244.0.0/16";

    /// client (10.244.1.2) -- node (router, the rules) -- backend (10.244.2.2
    /// and .3, echo servers on 8080 "a" and 8081 "b"). All three namespaces
    /// are fresh; nothing touches the root namespace.
    struct Lab {
        _servers: Vec<EchoServer>,
        node: Netns,
        client: Netns,
        _backend: Netns,
    }

    impl Lab {
        fn new() -> Result<Lab> {
            let node = Netns::new("kp-node")?;
            let client = Netns::new("kp-client")?;
            let backend = Netns::new("kp-backend")?;
            let (nc, cn) = (unique_ifname("kpnc"), unique_ifname("kpcn"));
            let (nb, bn) = (unique_ifname("kpnb"), unique_ifname("kpbn"));
            // Like a real node's uplink, minus the outside world: service
            // traffic that is not translated is routed to a veth whose peer
            // stays down (and is discarded there) instead of failing routing
            // before the filter rules could reject it.
            let (sink, sink_peer) = (unique_ifname("kpsink"), unique_ifname("kpsinp"));
            node.sh(&format!(
                "ip link add {nc} type veth peer name {cn} netns {client}
                 ip link add {nb} type veth peer name {bn} netns {backend}
                 ip addr add 10.244.1.1/24 dev {nc}
                 ip addr add {NODE_BACKEND_SIDE}/24 dev {nb}
                 ip link set {nc} up
                 ip link set {nb} up
                 ip link add {sink} type veth peer name {sink_peer}
                 ip link set {sink} up
                 ip route add 10.96.0.0/12 dev {sink}",
                client = client.name(),
                backend = backend.name(),
            ))?;
            client.sh(&format!(
                "ip addr add {CLIENT_IP}/24 dev {cn}
                 ip link set {cn} up
                 ip route add default via 10.244.1.1"
            ))?;
            backend.sh(&format!(
                "ip addr add {}/24 dev {bn}
                 ip addr add {}/24 dev {bn}
                 ip link set {bn} up
                 ip route add default via {NODE_BACKEND_SIDE}",
                BACKEND_A.0, BACKEND_B.0
            ))?;
            node.sysctl("net.ipv4.ip_forward", "1")?;
            // Each server on its own address: a UDP socket on 0.0.0.0 would
            // answer from the primary address, which conntrack cannot
            // match to the DNATed flow.
            let mut servers = Vec::new();
            for (ep, name) in [(BACKEND_A, "a"), (BACKEND_B, "b")] {
                let (tcp, udp) = backend.run(|| -> io::Result<_> {
                    Ok((TcpListener::bind(ep)?, UdpSocket::bind(ep)?))
                })?;
                servers.push(EchoServer::serve(tcp, udp, name));
            }
            Ok(Lab {
                _servers: servers,
                node,
                client,
                _backend: backend,
            })
        }
    }

    fn lab_services() -> Vec<KpService> {
        let (a, b) = (BACKEND_A, BACKEND_B);
        vec![
            svc(
                "lab/web:http",
                [10, 96, 0, 10],
                80,
                Proto::Tcp,
                &[(a.0.octets(), a.1)],
            ),
            svc(
                "lab/spread:http",
                [10, 96, 0, 11],
                80,
                Proto::Tcp,
                &[(a.0.octets(), a.1), (b.0.octets(), b.1)],
            ),
            svc(
                "lab/dns:dns",
                [10, 96, 0, 12],
                53,
                Proto::Udp,
                &[(b.0.octets(), b.1)],
            ),
            svc("lab/empty:http", [10, 96, 0, 13], 80, Proto::Tcp, &[]),
        ]
    }

    fn addr(ip: [u8; 4], port: u16) -> SocketAddr {
        SocketAddr::from((ip, port))
    }

    type Apply = fn(&Netns, &[KpService], &str) -> Result<()>;

    /// The checks shared by both modes; `inspect` looks at the installed
    /// rules (in the node namespace) while they are in place.
    fn services_carry_real_traffic(apply: Apply, inspect: impl Fn(&Netns)) -> Result<()> {
        let lab = Lab::new()?;
        let services = lab_services();
        let web = addr([10, 96, 0, 10], 80);
        apply(&lab.node, &services, CLUSTER_CIDR)?;
        inspect(&lab.node);
        // From inside the cluster CIDR: DNAT only, the client IP is kept.
        assert_eq!(
            tcp_roundtrip(&lab.client, web, "peer?")?,
            format!("a:{CLIENT_IP}")
        );
        let dns = addr([10, 96, 0, 12], 53);
        let (reply, from) = udp_roundtrip(&lab.client, dns, "hello")?;
        assert_eq!(reply, "b:hello");
        assert_eq!(from, dns, "the UDP answer comes back from the VIP");
        let spread = addr([10, 96, 0, 11], 80);
        let (mut on_a, mut on_b) = (0, 0);
        for i in 0..40 {
            let reply = tcp_roundtrip(&lab.client, spread, &format!("n{i}"))?;
            match reply.split_once(':') {
                Some(("a", _)) => on_a += 1,
                Some(("b", _)) => on_b += 1,
                _ => panic!("unexpected answer {reply:?}"),
            }
        }
        assert!(
            on_a > 0 && on_b > 0,
            "40 connections: {on_a} on a, {on_b} on b"
        );
        // No endpoints: rejected at once, not dropped.
        let started = Instant::now();
        let err = tcp_roundtrip(&lab.client, addr([10, 96, 0, 13], 80), "x").unwrap_err();
        let kind = err
            .root_cause()
            .downcast_ref::<io::Error>()
            .map(io::Error::kind);
        assert_eq!(kind, Some(io::ErrorKind::ConnectionRefused), "{err:#}");
        assert!(started.elapsed() < Duration::from_secs(3));

        // A client outside the cluster CIDR is masqueraded to the node.
        apply(&lab.node, &services, "10.244.2.0/24")?;
        assert_eq!(
            tcp_roundtrip(&lab.client, web, "peer?")?,
            format!("a:{NODE_BACKEND_SIDE}")
        );

        flush(&lab.node)?;
        // Untranslated, the SYN goes to the dummy device: a timeout.
        assert!(
            tcp_roundtrip(&lab.client, web, "x").is_err(),
            "VIP answers after flush"
        );
        let left = run_in(&lab.node, &["nft", "list", "ruleset"], None)?;
        assert!(left.trim().is_empty(), "left behind:\n{left}");
        // The backends themselves are still there.
        let direct = SocketAddr::from(BACKEND_A);
        assert_eq!(tcp_roundtrip(&lab.client, direct, "x")?, "a:x");
        flush(&lab.node)?; // idempotent
        Ok(())
    }

    #[test]
    fn iptables_rules_carry_real_traffic() -> Result<()> {
        if !require_root("iptables_rules_carry_real_traffic") {
            return Ok(());
        }
        services_carry_real_traffic(apply_iptables, |node| {
            let saved = run_in(node, &[IptablesBackend::Nft.save()], None).unwrap();
            let svc_chain = iptables_service_chain("lab/spread:http", "tcp");
            assert!(
                saved.contains(&format!(
                    "-A {svc_chain} -m comment --comment \"lab/spread:http -> 10.244.2.2:8080\" \
                     -m statistic --mode random --probability 0.50000000000 -j KUBE-SEP-"
                )),
                "{saved}"
            );
            assert!(saved.contains(
                "-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES"
            ));
            assert!(saved.contains("-j MASQUERADE --random-fully"));
        })
    }

    #[test]
    fn nftables_rules_carry_real_traffic() -> Result<()> {
        if !require_root("nftables_rules_carry_real_traffic") {
            return Ok(());
        }
        services_carry_real_traffic(apply_nftables, |node| {
            let listed = run_in(node, &["nft", "list", "table", "ip", NFT_TABLE], None).unwrap();
            assert!(
                listed.contains("10.96.0.11 . tcp . 80 : goto service-"),
                "{listed}"
            );
            assert!(listed.contains("numgen random mod 2 vmap { 0 : goto endpoint-"));
            // nftables mode alone: nothing in the iptables tables.
            let ipt = run_in(node, &[IptablesBackend::Nft.save()], None).unwrap();
            assert!(!ipt.contains("KUBE-"), "{ipt}");
        })
    }

    #[test]
    fn switching_modes_replaces_the_rules() -> Result<()> {
        if !require_root("switching_modes_replaces_the_rules") {
            return Ok(());
        }
        let ns = Netns::new("kp-switch")?;
        let services = lab_services();
        apply_iptables(&ns, &services, CLUSTER_CIDR)?;
        apply_iptables(&ns, &services, CLUSTER_CIDR)?;
        let saved = run_in(&ns, &[IptablesBackend::Nft.save(), "-t", "nat"], None)?;
        assert_eq!(
            saved.matches("-A PREROUTING").count(),
            1,
            "jumps doubled:\n{saved}"
        );
        apply_nftables(&ns, &services, CLUSTER_CIDR)?;
        apply_nftables(&ns, &services, CLUSTER_CIDR)?;
        let ruleset = run_in(&ns, &["nft", "list", "ruleset"], None)?;
        assert!(!ruleset.contains("table ip nat"), "{ruleset}");
        assert_eq!(ruleset.matches("table ip kube-proxy").count(), 1);
        apply_iptables(&ns, &services, CLUSTER_CIDR)?;
        assert!(!run_in(&ns, &["nft", "list", "tables"], None)?.contains("kube-proxy"));
        flush(&ns)?;
        let left = run_in(&ns, &["nft", "list", "ruleset"], None)?;
        assert!(left.trim().is_empty(), "{left}");
        Ok(())
    }

    #[test]
    fn time_generation_and_apply_for_10k_services() -> Result<()> {
        if !require_root("time_generation_and_apply_for_10k_services") {
            return Ok(());
        }
        let ns = Netns::new("kp-scale")?;
        let backends = [(Ipv4Addr::new(10, 244, 2, 2), 8080)];
        let services = synthetic_services(10_000, 1, &backends);
        let timed = |what: &str, f: &dyn Fn() -> Result<()>| -> Result<()> {
            let started = Instant::now();
            f()?;
            println!(
                "10000 services x 1 endpoint, {what}: {:?}",
                started.elapsed()
            );
            Ok(())
        };
        timed("iptables generation", &|| {
            iptables_restore_input(&services, CLUSTER_CIDR);
            Ok(())
        })?;
        timed("nftables generation", &|| {
            nftables_ruleset(&services, CLUSTER_CIDR);
            Ok(())
        })?;
        for backend in [IptablesBackend::Nft, IptablesBackend::Legacy] {
            timed(
                &format!("generation + apply, iptables {backend:?}"),
                &|| apply_iptables_with(&ns, &services, CLUSTER_CIDR, backend),
            )?;
            timed(&format!("flush, iptables {backend:?}"), &|| flush(&ns))?;
        }
        timed("generation + apply, nftables", &|| {
            apply_nftables(&ns, &services, CLUSTER_CIDR)
        })?;
        timed("flush, nftables", &|| flush(&ns))?;
        Ok(())
    }
}
