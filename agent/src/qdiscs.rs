//! The qdiscs on the pods' host veths, as a source for the endpoint
//! manager. tern-cni's own bandwidth limits sit there, and so does the
//! shaping of a `bandwidth` plugin chained after tern-cni: a root TBF for
//! what the pod receives, an ingress qdisc redirecting to an ifb for what
//! it sends. Tern's datapath would bypass both (it delivers straight into
//! the pod, and its tc program runs before the ingress qdisc), so the
//! endpoint manager makes the pod's traffic follow whatever qdiscs are
//! there. Watched through netlink (RTNLGRP_TC), so a chained plugin's
//! qdiscs take effect as soon as it has made them.

use std::sync::Arc;

use futures::{StreamExt, TryStreamExt};
use rtnetlink::packet_core::NetlinkPayload;
use rtnetlink::packet_route::RouteNetlinkMessage;
use rtnetlink::packet_route::tc::{TcAttribute, TcHandle, TcMessage};
use rtnetlink::{Handle, MulticastGroup};
use tracing::warn;

use crate::endpoints::{EndpointManager, VethQdiscs};

/// Follows qdisc changes on the published pod veths until the netlink
/// socket closes. Veths published before it started are looked at first.
pub async fn watch(endpoints: Arc<EndpointManager>) {
    let (connection, handle, mut events) = match rtnetlink::new_multicast_connection(&[
        MulticastGroup::Tc,
    ]) {
        Ok(c) => c,
        Err(e) => {
            warn!(
                "cannot watch qdiscs (a chained bandwidth plugin's limits would be bypassed): {e}"
            );
            return;
        }
    };
    tokio::spawn(connection);
    for ifindex in endpoints.pod_veths() {
        refresh(&handle, &endpoints, ifindex).await;
    }
    while let Some((message, _)) = events.next().await {
        let ifindex = match message.payload {
            NetlinkPayload::InnerMessage(
                RouteNetlinkMessage::NewQueueDiscipline(m)
                | RouteNetlinkMessage::DelQueueDiscipline(m),
            ) => m.header.index as u32,
            _ => continue,
        };
        // Every new veth and every pod's own filter report here too.
        if endpoints.is_pod_veth(ifindex) {
            refresh(&handle, &endpoints, ifindex).await;
        }
    }
}

async fn refresh(handle: &Handle, endpoints: &EndpointManager, ifindex: u32) {
    let listed: Result<Vec<TcMessage>, _> = handle
        .qdisc()
        .get()
        .index(ifindex as i32)
        .execute()
        .try_collect()
        .await;
    match listed {
        Ok(qdiscs) => endpoints.observe_qdiscs(ifindex, classify(&qdiscs, ifindex)),
        Err(e) => warn!(ifindex, "listing the qdiscs of a pod veth: {e}"),
    }
}

/// What the qdiscs of device `ifindex` (among `qdiscs`) shape.
pub fn classify(qdiscs: &[TcMessage], ifindex: u32) -> VethQdiscs {
    let kind = |q: &TcMessage| {
        q.attributes.iter().find_map(|a| match a {
            TcAttribute::Kind(k) => Some(k.clone()),
            _ => None,
        })
    };
    let mut found = VethQdiscs::default();
    for q in qdiscs.iter().filter(|q| q.header.index == ifindex as i32) {
        match kind(q).as_deref() {
            Some("ingress" | "clsact") => found.ingress = true,
            // A veth's default: nothing is shaped.
            Some("noqueue") | None => {}
            Some(_) if q.header.parent == TcHandle::ROOT => found.root = true,
            Some(_) => {}
        }
    }
    found
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn qdisc(ifindex: i32, kind: &str, parent: TcHandle) -> TcMessage {
        let mut q = TcMessage::default();
        q.header.index = ifindex;
        q.header.parent = parent;
        q.attributes.push(TcAttribute::Kind(kind.into()));
        q
    }

    #[test]
    fn what_a_chained_bandwidth_plugin_leaves_is_recognised() {
        let untouched = [qdisc(7, "noqueue", TcHandle::ROOT)];
        assert_eq!(classify(&untouched, 7), VethQdiscs::default());
        let plugin = [
            qdisc(7, "tbf", TcHandle::ROOT),
            qdisc(7, "ingress", TcHandle::INGRESS),
            qdisc(8, "tbf", TcHandle::ROOT),
        ];
        assert_eq!(
            classify(&plugin, 7),
            VethQdiscs {
                root: true,
                ingress: true
            }
        );
        // Another device's qdiscs are not this one's.
        assert_eq!(classify(&plugin[2..], 7), VethQdiscs::default());
        assert!(classify(&[qdisc(7, "clsact", TcHandle::CLSACT)], 7).ingress);
    }
}
