//! tern-cni invoked exactly as a container runtime invokes it, against a
//! real agent in a lab node namespace. Needs root.

// Tests: a failed unwrap or expect is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::Ipv4Addr;
use std::path::Path;

use anyhow::{Context, Result};
use serde_json::{Value, json};
use tern_lab::lab::{Lab, LabNode, NODES_MANIFEST, nodes_manifest, pod_ip};
use tern_lab::netns::{Netns, unique_name};
use tern_lab::skip::require_root;

const NODE_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 11);

fn lab_node(cidr: &str) -> Result<(Lab, LabNode)> {
    let lab = Lab::new()?;
    let node = lab.node("n1", cidr, NODE_IP)?;
    Ok((lab, node))
}

fn allocated(node: &LabNode) -> u64 {
    let status = node.agent_request(&json!({"op": "status"})).unwrap();
    status["allocated"].as_u64().unwrap()
}

/// Host-side pod veths in the node namespace.
fn host_veths(node: &LabNode) -> Vec<String> {
    node.ns
        .sh("ip -o link show type veth")
        .unwrap()
        .lines()
        .filter_map(|l| l.split(": ").nth(1))
        .map(|name| name.split('@').next().unwrap().to_owned())
        .filter(|name| name.starts_with("tern"))
        .collect()
}

/// The MTU of the pod's eth0.
fn pod_mtu(ns: &Netns) -> Option<u64> {
    let link = ns.sh("ip -o link show dev eth0").ok()?;
    let mut words = link.split_whitespace();
    words.find(|w| *w == "mtu")?;
    words.next()?.parse().ok()
}

fn pod_addrs(ns: &Netns) -> String {
    ns.sh("ip -4 -o addr show dev eth0").unwrap_or_default()
}

#[test]
fn add_check_del_round_trip() -> Result<()> {
    if !require_root("add_check_del_round_trip") {
        return Ok(());
    }
    let (_lab, node) = lab_node("10.244.1.0/24")?;
    let pod = node.add_pod("p")?;
    let r = &pod.result;
    assert_eq!(r["cniVersion"], "1.1.0");
    let interfaces = r["interfaces"].as_array().unwrap();
    assert_eq!(interfaces.len(), 2, "{r}");
    assert!(interfaces[0]["name"].as_str().unwrap().starts_with("tern"));
    assert_eq!(interfaces[1]["name"], "eth0");
    assert_eq!(interfaces[1]["sandbox"], pod.ns.path().to_str().unwrap());
    assert_eq!(r["ips"][0]["interface"], 1);
    assert_eq!(r["ips"][0]["gateway"], "169.254.1.1");
    assert!(r["ips"][0]["address"].as_str().unwrap().ends_with("/32"));
    assert!(
        r["ips"][0].get("version").is_none(),
        "1.x results have no ips[].version"
    );
    assert!(pod_addrs(&pod.ns).contains(&format!("{}/32", pod.ip)));
    assert!(pod.ip.octets()[..3] == [10, 244, 1]);

    // CHECK with the ADD result as prevResult.
    let mut conf = node.netconf("1.1.0");
    conf["prevResult"] = r.clone();
    let env = |cmd: &'static str| {
        vec![
            ("CNI_COMMAND", cmd.to_owned()),
            ("CNI_CONTAINERID", pod.container_id.clone()),
            ("CNI_NETNS", pod.ns.path().display().to_string()),
            ("CNI_IFNAME", "eth0".to_owned()),
        ]
    };
    let invoke = |cmd: &'static str, conf: &Value| {
        let env = env(cmd);
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        node.invoke_cni(&env, conf.to_string().as_bytes()).unwrap()
    };
    let check = invoke("CHECK", &conf);
    assert_eq!(check.code, Some(0), "CHECK: {check:?}");
    assert!(check.stdout.trim().is_empty());

    // CHECK notices a pod whose address was changed behind its back.
    pod.ns.sh(&format!("ip addr del {}/32 dev eth0", pod.ip))?;
    let broken = invoke("CHECK", &conf);
    assert_eq!(broken.error_code()?, 102, "{broken:?}");

    let del = invoke("DEL", &conf);
    assert_eq!(del.code, Some(0), "DEL: {del:?}");
    assert!(
        host_veths(&node).is_empty(),
        "host veth left: {:?}",
        host_veths(&node)
    );
    assert!(pod_addrs(&pod.ns).is_empty());
    assert_eq!(allocated(&node), 0);
    Ok(())
}

#[test]
fn del_is_idempotent_also_when_the_netns_is_gone() -> Result<()> {
    if !require_root("del_is_idempotent") {
        return Ok(());
    }
    let (_lab, node) = lab_node("10.244.2.0/24")?;
    let keep = node.add_pod("keep")?;
    let pod = node.add_pod("gone")?;
    let (id, path) = (pod.container_id.clone(), pod.ns.path().to_owned());
    assert_eq!(allocated(&node), 2);
    drop(pod); // the runtime removed the sandbox first
    for attempt in 0..2 {
        let out = node.cni("DEL", &id, &path, "1.1.0")?;
        assert_eq!(out.code, Some(0), "DEL #{attempt}: {out:?}");
        assert_eq!(allocated(&node), 1, "released exactly once");
    }
    // DEL with an empty CNI_NETNS is allowed too.
    let out = node.invoke_cni(
        &[
            ("CNI_COMMAND", "DEL"),
            ("CNI_CONTAINERID", &id),
            ("CNI_NETNS", ""),
            ("CNI_IFNAME", "eth0"),
        ],
        node.netconf("1.0.0").to_string().as_bytes(),
    )?;
    assert_eq!(out.code, Some(0), "{out:?}");
    assert_eq!(host_veths(&node).len(), 1);
    assert!(pod_addrs(&keep.ns).contains(&keep.ip.to_string()));
    Ok(())
}

#[test]
fn bad_inputs_get_the_right_error_and_leave_nothing_behind() -> Result<()> {
    if !require_root("bad_inputs") {
        return Ok(());
    }
    let (_lab, node) = lab_node("10.244.3.0/24")?;
    let pod_ns = Netns::new("bad")?;
    let netns = pod_ns.path().display().to_string();
    let good = node.netconf("1.1.0").to_string();
    let conf = |extra: Value| {
        let mut c = json!({"cniVersion": "1.1.0", "name": "n", "type": "tern-cni", "agentSocket": node.socket});
        c.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        c.to_string()
    };
    // ADD's environment with some variables replaced (Some) or removed (None).
    let env = |changes: &[(&'static str, Option<&'static str>)]| {
        let mut env: Vec<(&str, String)> = vec![
            ("CNI_COMMAND", "ADD".into()),
            ("CNI_CONTAINERID", "c".into()),
            ("CNI_NETNS", netns.clone()),
            ("CNI_IFNAME", "eth0".into()),
        ];
        for (key, value) in changes {
            env.retain(|(k, _)| k != key);
            if let Some(v) = value {
                env.push((key, v.to_string()));
            }
        }
        env
    };
    let cases = [
        (
            "no CNI_COMMAND",
            env(&[("CNI_COMMAND", None)]),
            good.clone(),
            4,
        ),
        (
            "unknown command",
            env(&[("CNI_COMMAND", Some("FROB"))]),
            good.clone(),
            4,
        ),
        (
            "no CNI_CONTAINERID",
            env(&[("CNI_CONTAINERID", None)]),
            good.clone(),
            4,
        ),
        ("no CNI_NETNS", env(&[("CNI_NETNS", None)]), good.clone(), 4),
        (
            "no CNI_IFNAME",
            env(&[("CNI_IFNAME", None)]),
            good.clone(),
            4,
        ),
        (
            "ifname too long",
            env(&[("CNI_IFNAME", Some("a-very-long-ifname"))]),
            good.clone(),
            4,
        ),
        (
            "netns does not exist",
            env(&[("CNI_NETNS", Some("/run/netns/tern-no-such-ns"))]),
            good.clone(),
            4,
        ),
        ("not JSON", env(&[]), "{nope".into(), 6),
        (
            "no name",
            env(&[]),
            json!({"cniVersion": "1.1.0", "type": "tern-cni"}).to_string(),
            7,
        ),
        ("bad mtu", env(&[]), conf(json!({"mtu": 10})), 7),
        (
            "unsupported version",
            env(&[]),
            conf(json!({"cniVersion": "9.9.9"})),
            1,
        ),
        (
            "agent down",
            env(&[]),
            conf(json!({"agentSocket": "/nonexistent/tern.sock"})),
            11,
        ),
        (
            "ipam plugin missing",
            env(&[("CNI_PATH", Some("/nonexistent"))]),
            conf(json!({"ipam": {"type": "host-local"}})),
            7,
        ),
    ];
    for (what, env, stdin, code) in cases {
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let out = node.invoke_cni(&env, stdin.as_bytes())?;
        assert_eq!(out.error_code()?, code, "{what}: {out:?}");
        let err: Value = serde_json::from_str(&out.stdout)?;
        assert!(
            err["msg"].as_str().is_some_and(|m| !m.is_empty()),
            "{what}: no msg"
        );
        assert!(
            err["cniVersion"].is_string(),
            "{what}: error without cniVersion"
        );
        assert!(!out.stdout.contains("panicked"), "{what}: {out:?}");
        assert_eq!(allocated(&node), 0, "{what}: an address was left allocated");
        assert!(
            host_veths(&node).is_empty(),
            "{what}: veth left: {:?}",
            host_veths(&node)
        );
        assert!(pod_addrs(&pod_ns).is_empty(), "{what}: pod interface left");
    }
    Ok(())
}

#[test]
fn add_for_an_existing_attachment_is_refused_and_harms_nothing() -> Result<()> {
    if !require_root("add_existing") {
        return Ok(());
    }
    let (_lab, node) = lab_node("10.244.4.0/24")?;
    let pod = node.add_pod("p")?;
    let again = node.cni("ADD", &pod.container_id, pod.ns.path(), "1.1.0")?;
    assert_eq!(again.error_code()?, 101, "{again:?}");
    assert_eq!(allocated(&node), 1);
    assert!(pod_addrs(&pod.ns).contains(&format!("{}/32", pod.ip)));

    // Another container whose sandbox already has an eth0 (made by someone else).
    let other = Netns::new("o")?;
    other.sh("ip link add eth0 type veth peer name eth0p")?;
    let out = node.cni("ADD", &unique_name("o"), other.path(), "1.1.0")?;
    assert_eq!(out.error_code()?, 101, "{out:?}");
    assert_eq!(allocated(&node), 1, "the refused ADD released its address");
    assert_eq!(host_veths(&node).len(), 1);
    Ok(())
}

#[test]
fn fifty_concurrent_adds_get_fifty_distinct_addresses() -> Result<()> {
    if !require_root("fifty_concurrent_adds") {
        return Ok(());
    }
    let (_lab, node) = lab_node("10.244.5.0/24")?;
    let pods: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..50)
            .map(|i| {
                s.spawn({
                    let node = &node;
                    move || node.add_pod(&format!("c{i}"))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap())
            .collect::<Result<Vec<_>>>()
    })?;
    let mut ips: Vec<Ipv4Addr> = pods.iter().map(|p| p.ip).collect();
    ips.sort();
    ips.dedup();
    assert_eq!(ips.len(), 50, "duplicate addresses handed out");
    assert_eq!(allocated(&node), 50);
    assert_eq!(host_veths(&node).len(), 50);
    std::thread::scope(|s| {
        for pod in &pods {
            let node = &node;
            s.spawn(move || assert_eq!(node.del_pod(pod).unwrap().code, Some(0)));
        }
    });
    assert_eq!(allocated(&node), 0);
    assert!(host_veths(&node).is_empty());
    Ok(())
}

#[test]
fn gc_releases_everything_not_in_valid_attachments() -> Result<()> {
    if !require_root("gc") {
        return Ok(());
    }
    let (_lab, node) = lab_node("10.244.6.0/24")?;
    let pods: Vec<_> = (0..3)
        .map(|i| node.add_pod(&format!("g{i}")))
        .collect::<Result<_>>()?;
    let mut conf = node.netconf("1.1.0");
    // The newer key for the first pod, the older one for nothing else.
    conf["cni.dev/valid-attachments"] =
        json!([{"containerID": pods[0].container_id, "ifname": "eth0"}]);
    conf["cni.dev/attachments"] = json!([]);
    let out = node.invoke_cni(&[("CNI_COMMAND", "GC")], conf.to_string().as_bytes())?;
    assert_eq!(out.code, Some(0), "{out:?}");
    assert_eq!(allocated(&node), 1);
    assert_eq!(host_veths(&node).len(), 1);
    assert!(pod_addrs(&pods[0].ns).contains(&pods[0].ip.to_string()));
    assert!(pod_addrs(&pods[1].ns).is_empty());
    // The older key alone is honoured as well.
    let mut old = node.netconf("1.1.0");
    old["cni.dev/attachments"] = json!([{"containerID": pods[0].container_id, "ifname": "eth0"}]);
    let out = node.invoke_cni(&[("CNI_COMMAND", "GC")], old.to_string().as_bytes())?;
    assert_eq!(out.code, Some(0), "{out:?}");
    assert_eq!(allocated(&node), 1);
    Ok(())
}

#[test]
fn version_and_result_formats_follow_the_requested_cni_version() -> Result<()> {
    if !require_root("versions") {
        return Ok(());
    }
    let (_lab, node) = lab_node("10.244.7.0/24")?;
    for version in ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"] {
        let out = node.invoke_cni(
            &[("CNI_COMMAND", "VERSION")],
            json!({"cniVersion": version}).to_string().as_bytes(),
        )?;
        let v = out.success_json()?;
        assert_eq!(v["cniVersion"], version);
        assert_eq!(
            v["supportedVersions"],
            json!(["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"])
        );

        let ns = Netns::new("v")?;
        let id = unique_name("v");
        let out = node.cni("ADD", &id, ns.path(), version)?;
        let r = out.success_json()?;
        assert_eq!(r["cniVersion"], version);
        let ip = &r["ips"][0];
        if version.starts_with('0') {
            assert_eq!(ip["version"], "4", "{version}: {r}");
        } else {
            assert!(ip.get("version").is_none(), "{version}: {r}");
        }
        let has_mtu = r["interfaces"][1].get("mtu").is_some();
        assert_eq!(
            has_mtu,
            version == "1.1.0",
            "{version}: interface mtu is a 1.1.0 field: {r}"
        );
        assert!(pod_ip(&r).is_ok());
        if version < "0.4.0" {
            let mut conf = node.netconf(version);
            conf["prevResult"] = r.clone();
            let check = node.invoke_cni(
                &[
                    ("CNI_COMMAND", "CHECK"),
                    ("CNI_CONTAINERID", &id),
                    ("CNI_NETNS", ns.path().to_str().unwrap()),
                    ("CNI_IFNAME", "eth0"),
                ],
                conf.to_string().as_bytes(),
            )?;
            assert_eq!(check.error_code()?, 1, "CHECK is not defined before 0.4.0");
        }
        assert_eq!(node.cni("DEL", &id, ns.path(), version)?.code, Some(0));
    }
    Ok(())
}

#[test]
fn chained_add_keeps_and_extends_prev_result() -> Result<()> {
    if !require_root("chained_add") {
        return Ok(());
    }
    let (_lab, node) = lab_node("10.244.8.0/24")?;
    let ns = Netns::new("ch")?;
    let id = unique_name("ch");
    let mut conf = node.netconf("1.0.0");
    conf["prevResult"] = json!({
        "cniVersion": "1.0.0",
        "interfaces": [{"name": "earlier0", "mac": "02:00:00:00:00:01"}],
        "ips": [],
        "dns": {"nameservers": ["10.96.0.10"]}
    });
    let out = node.invoke_cni(
        &[
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", &id),
            ("CNI_NETNS", ns.path().to_str().unwrap()),
            ("CNI_IFNAME", "eth0"),
        ],
        conf.to_string().as_bytes(),
    )?;
    let r = out.success_json()?;
    assert_eq!(r["interfaces"][0]["name"], "earlier0");
    assert_eq!(r["interfaces"][2]["name"], "eth0");
    assert_eq!(r["ips"][0]["interface"], 2);
    assert_eq!(r["dns"]["nameservers"], json!(["10.96.0.10"]));
    Ok(())
}

#[test]
fn delegated_host_local_ipam() -> Result<()> {
    if !require_root("delegated_host_local_ipam") {
        return Ok(());
    }
    if !Path::new("/usr/lib/cni/host-local").is_file() {
        panic!(
            "/usr/lib/cni/host-local missing: run `cargo xtask setup` (containernetworking-plugins)"
        );
    }
    let (_lab, node) = lab_node("10.244.9.0/24")?;
    let data_dir = std::env::temp_dir().join(unique_name("hl"));
    let mut conf = node.netconf("1.0.0");
    conf["ipam"] = json!({"type": "host-local", "subnet": "10.250.0.0/24", "dataDir": data_dir});
    let ns = Netns::new("hl")?;
    let id = unique_name("hl");
    let env = |cmd| {
        vec![
            ("CNI_COMMAND", cmd),
            ("CNI_CONTAINERID", id.as_str()),
            ("CNI_NETNS", ns.path().to_str().unwrap()),
            ("CNI_IFNAME", "eth0"),
            ("CNI_PATH", "/usr/lib/cni"),
        ]
    };
    let r = node
        .invoke_cni(&env("ADD"), conf.to_string().as_bytes())?
        .success_json()?;
    let ip = pod_ip(&r)?;
    assert_eq!(ip.octets()[..3], [10, 250, 0], "{r}");
    assert!(pod_addrs(&ns).contains(&format!("{ip}/32")));
    assert_eq!(allocated(&node), 0, "the agent's IPAM was not used");
    // The node's MTU (the overlay's in the lab), whichever IPAM is used.
    let node_mtu = node.agent_request(&json!({"op": "status"}))?["mtu"].clone();
    assert_eq!(
        pod_mtu(&ns),
        node_mtu.as_u64(),
        "pod MTU with delegated IPAM"
    );
    let lease = data_dir.join("tern-lab").join(ip.to_string());
    assert!(lease.exists(), "host-local lease {lease:?} missing");
    let out = node.invoke_cni(&env("DEL"), conf.to_string().as_bytes())?;
    assert_eq!(out.code, Some(0), "{out:?}");
    assert!(!lease.exists(), "host-local lease not released");
    let _ = std::fs::remove_dir_all(&data_dir);
    Ok(())
}

#[test]
fn status_and_try_again_later_follow_the_agent() -> Result<()> {
    if !require_root("status") {
        return Ok(());
    }
    let lab = Lab::new()?;
    // A node whose PodCIDR is not known yet.
    let mut node = LabNode::create(&lab, "n1", None, NODE_IP)?;
    node.start_agent()?;
    let status = |node: &LabNode| {
        node.invoke_cni(
            &[("CNI_COMMAND", "STATUS")],
            node.netconf("1.1.0").to_string().as_bytes(),
        )
        .unwrap()
    };
    assert_eq!(status(&node).error_code()?, 50);
    let ns = Netns::new("s")?;
    let out = node.cni("ADD", &unique_name("s"), ns.path(), "1.1.0")?;
    assert_eq!(out.error_code()?, 11, "{out:?}");
    assert!(out.stdout.contains("PodCIDR"), "{out:?}");
    assert!(host_veths(&node).is_empty());

    let (_lab2, ready) = lab_node("10.244.10.0/24")?;
    let ok = status(&ready);
    assert_eq!(ok.code, Some(0), "{ok:?}");
    assert!(ok.stdout.trim().is_empty());

    node.kill_agent()?;
    assert_eq!(status(&node).error_code()?, 50, "agent down");
    let out = node.cni("ADD", &unique_name("s"), ns.path(), "1.1.0")?;
    assert_eq!(out.error_code()?, 11, "agent down: {out:?}");
    Ok(())
}

#[test]
fn pod_cidr_comes_from_the_node_object() -> Result<()> {
    if !require_root("pod_cidr_from_node") {
        return Ok(());
    }
    let lab = Lab::new()?;
    // No --pod-cidr: ADDs wait (try again later) for the Node object.
    let mut node = LabNode::create(&lab, "n1", None, NODE_IP)?;
    node.start_agent()?;
    let ns = Netns::new("pc")?;
    let out = node.cni("ADD", &unique_name("pc"), ns.path(), "1.1.0")?;
    assert_eq!(out.error_code()?, 11, "{out:?}");
    node.write_manifest(
        NODES_MANIFEST,
        &nodes_manifest(&[("n1".into(), NODE_IP, "10.244.77.0/24".into())]),
    )?;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while node.agent_request(&serde_json::json!({"op": "status"}))?["ready"] != true {
        assert!(
            std::time::Instant::now() < deadline,
            "agent never took the PodCIDR:\n{}",
            node.agent_log_tail()
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let pod = node.add_pod("p")?;
    assert_eq!(pod.ip.octets()[..3], [10, 244, 77], "{}", pod.ip);
    // A new PodCIDR in the Node object: new pods come from it.
    node.write_manifest(
        NODES_MANIFEST,
        &nodes_manifest(&[("n1".into(), NODE_IP, "10.244.78.0/24".into())]),
    )?;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let status = node.agent_request(&serde_json::json!({"op": "status"}))?;
        if status["pod_cidr"] == "10.244.78.0/24" {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{status}");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let second = node.add_pod("q")?;
    assert_eq!(second.ip.octets()[..3], [10, 244, 78], "{}", second.ip);
    // tern status names the source and how long ago it last synced.
    let status = node.agent_request(&serde_json::json!({"op": "status"}))?;
    let source = status["source"].as_str().unwrap_or_default();
    assert_eq!(
        source,
        format!("manifests {}", node.manifests_dir.display())
    );
    assert!(status["last_sync_age_s"].as_u64().is_some(), "{status}");
    assert!(node.tern(&["status"])?.contains("manifests "));
    Ok(())
}

/// CHECK compares against what ADD configured at every version that has
/// CHECK, also when the netconf names no MTU and prevResult (before 1.1.0)
/// carries none.
#[test]
fn check_passes_after_add_at_every_version_without_an_mtu_in_the_netconf() -> Result<()> {
    if !require_root("check_passes_after_add_at_every_version") {
        return Ok(());
    }
    let (_lab, node) = lab_node("10.244.41.0/24")?;
    for version in ["0.4.0", "1.0.0", "1.1.0"] {
        let ns = Netns::new("cv")?;
        let id = unique_name("cv");
        let added = node.cni("ADD", &id, ns.path(), version)?.success_json()?;
        let mut conf = node.netconf(version);
        assert!(conf.get("mtu").is_none());
        conf["prevResult"] = added;
        let netns = ns.path().display().to_string();
        let env = |cmd| {
            [
                ("CNI_COMMAND", cmd),
                ("CNI_CONTAINERID", id.as_str()),
                ("CNI_NETNS", netns.as_str()),
                ("CNI_IFNAME", "eth0"),
            ]
        };
        let check = node.invoke_cni(&env("CHECK"), conf.to_string().as_bytes())?;
        assert_eq!(check.code, Some(0), "CHECK at {version}: {check:?}");
        let del = node.invoke_cni(&env("DEL"), conf.to_string().as_bytes())?;
        assert_eq!(del.code, Some(0), "DEL at {version}: {del:?}");
    }
    Ok(())
}

/// STATUS and GC arrived in 1.1.0: an older netconf gets the spec's
/// incompatible-version error, and a refused GC releases nothing.
#[test]
fn status_and_gc_are_refused_before_cni_version_1_1_0() -> Result<()> {
    if !require_root("status_and_gc_are_refused_before_1_1_0") {
        return Ok(());
    }
    let (_lab, node) = lab_node("10.244.42.0/24")?;
    let pod = node.add_pod("g")?;
    for version in ["0.4.0", "1.0.0"] {
        let status = node.invoke_cni(
            &[("CNI_COMMAND", "STATUS")],
            node.netconf(version).to_string().as_bytes(),
        )?;
        assert_eq!(status.error_code()?, 1, "STATUS at {version}: {status:?}");
        let mut conf = node.netconf(version);
        conf["cni.dev/valid-attachments"] = json!([]);
        let gc = node.invoke_cni(&[("CNI_COMMAND", "GC")], conf.to_string().as_bytes())?;
        assert_eq!(gc.error_code()?, 1, "GC at {version}: {gc:?}");
        assert_eq!(allocated(&node), 1, "a refused GC released {:?}", pod.ip);
    }
    let status = node.invoke_cni(
        &[("CNI_COMMAND", "STATUS")],
        node.netconf("1.1.0").to_string().as_bytes(),
    )?;
    assert_eq!(status.code, Some(0), "STATUS at 1.1.0: {status:?}");
    Ok(())
}

/// A netconf at 1.1.0 with host-local (which speaks up to 1.0.0): the
/// plugin speaks 1.0.0 to it, and delegates CHECK (so a lost lease fails
/// CHECK).
#[test]
fn delegated_ipam_is_spoken_to_at_a_common_version_and_asked_to_check() -> Result<()> {
    if !require_root("delegated_ipam_common_version_and_check") {
        return Ok(());
    }
    assert!(
        Path::new("/usr/lib/cni/host-local").is_file(),
        "/usr/lib/cni/host-local missing: run `cargo xtask setup` (containernetworking-plugins)"
    );
    let (_lab, node) = lab_node("10.244.43.0/24")?;
    let data_dir = std::env::temp_dir().join(unique_name("hl11"));
    let mut conf = node.netconf("1.1.0");
    conf["ipam"] = json!({"type": "host-local", "subnet": "10.251.0.0/24", "dataDir": data_dir});
    let ns = Netns::new("hl11")?;
    let id = unique_name("hl11");
    let netns = ns.path().display().to_string();
    let env = |cmd| {
        [
            ("CNI_COMMAND", cmd),
            ("CNI_CONTAINERID", id.as_str()),
            ("CNI_NETNS", netns.as_str()),
            ("CNI_IFNAME", "eth0"),
            ("CNI_PATH", "/usr/lib/cni"),
        ]
    };
    let added = node
        .invoke_cni(&env("ADD"), conf.to_string().as_bytes())?
        .success_json()
        .context("ADD at 1.1.0 with host-local")?;
    assert_eq!(added["cniVersion"], "1.1.0", "{added}");
    let ip = pod_ip(&added)?;
    assert_eq!(ip.octets()[..3], [10, 251, 0], "{added}");
    conf["prevResult"] = added;
    let check = node.invoke_cni(&env("CHECK"), conf.to_string().as_bytes())?;
    assert_eq!(check.code, Some(0), "CHECK: {check:?}");
    // host-local forgets the lease: its CHECK fails, so ours must.
    let lease = data_dir.join("tern-lab").join(ip.to_string());
    std::fs::remove_file(&lease).with_context(|| format!("removing {lease:?}"))?;
    let check = node.invoke_cni(&env("CHECK"), conf.to_string().as_bytes())?;
    assert!(
        check.code != Some(0),
        "CHECK passed without the lease: {check:?}"
    );
    assert!(check.stdout.contains("host-local"), "{check:?}");
    let del = node.invoke_cni(&env("DEL"), conf.to_string().as_bytes())?;
    assert_eq!(del.code, Some(0), "DEL: {del:?}");
    let _ = std::fs::remove_dir_all(&data_dir);
    Ok(())
}

/// STATUS asks a delegated IPAM plugin that speaks 1.1.0 too, and fails
/// with its error. (No installed IPAM plugin speaks 1.1.0, so this one is a
/// script that answers VERSION and STATUS as the spec defines them.)
#[test]
fn status_is_delegated_to_an_ipam_plugin_that_has_it() -> Result<()> {
    if !require_root("status_is_delegated") {
        return Ok(());
    }
    let (_lab, node) = lab_node("10.244.44.0/24")?;
    let dir = std::env::temp_dir().join(unique_name("ipam"));
    std::fs::create_dir_all(&dir)?;
    let plugin = dir.join("offline-ipam");
    std::fs::write(
        &plugin,
        "#!/bin/sh\ncat >/dev/null\ncase \"$CNI_COMMAND\" in\n\
         VERSION) echo '{\"cniVersion\":\"1.1.0\",\"supportedVersions\":[\"1.0.0\",\"1.1.0\"]}' ;;\n\
         STATUS) echo '{\"cniVersion\":\"1.1.0\",\"code\":50,\"msg\":\"address pool offline\"}'; exit 1 ;;\n\
         *) echo '{\"cniVersion\":\"1.1.0\",\"code\":4,\"msg\":\"not in this test\"}'; exit 1 ;;\n\
         esac\n",
    )?;
    std::fs::set_permissions(&plugin, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    let mut conf = node.netconf("1.1.0");
    conf["ipam"] = json!({"type": "offline-ipam"});
    let path = dir.display().to_string();
    let status = node.invoke_cni(
        &[("CNI_COMMAND", "STATUS"), ("CNI_PATH", path.as_str())],
        conf.to_string().as_bytes(),
    )?;
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(status.error_code()?, 50, "{status:?}");
    assert!(status.stdout.contains("address pool offline"), "{status:?}");
    Ok(())
}

/// A second CNI_IFNAME for a pod Tern already wired (as multi-network
/// runtimes ask) is refused with a clear error before anything is made;
/// the first interface and the address count are untouched.
#[test]
fn a_second_interface_in_the_same_pod_is_refused_clearly() -> Result<()> {
    if !require_root("a_second_interface_is_refused") {
        return Ok(());
    }
    let (_lab, node) = lab_node("10.244.45.0/24")?;
    let pod = node.add_pod("two")?;
    let conf = node.netconf("1.1.0");
    let netns = pod.ns.path().display().to_string();
    let second = node.invoke_cni(
        &[
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", pod.container_id.as_str()),
            ("CNI_NETNS", netns.as_str()),
            ("CNI_IFNAME", "net1"),
            ("CNI_PATH", "/usr/lib/cni"),
        ],
        conf.to_string().as_bytes(),
    )?;
    assert_eq!(second.error_code()?, 104, "{second:?}");
    assert!(
        second.stdout.contains("one interface per pod") && second.stdout.contains("eth0"),
        "{second:?}"
    );
    assert_eq!(allocated(&node), 1, "the refused ADD kept an address");
    assert_eq!(host_veths(&node).len(), 1, "{:?}", host_veths(&node));
    assert!(pod_addrs(&pod.ns).contains(&format!("{}/32", pod.ip)));
    assert!(
        pod.ns.sh("ip -o link show dev net1").is_err(),
        "net1 was made"
    );
    Ok(())
}
