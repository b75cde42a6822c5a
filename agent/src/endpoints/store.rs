//! The endpoints this node serves, persisted in the state dir so a restarted
//! agent knows which pinned datapath state is still wanted.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::Context;
use tern_api::{Attachment, Endpoint};

use crate::ipam::write_atomically;

pub struct EndpointStore {
    path: PathBuf,
    by_attachment: BTreeMap<Attachment, Endpoint>,
}

impl EndpointStore {
    pub fn open(path: &Path) -> anyhow::Result<Self> {
        match std::fs::read(path) {
            Ok(bytes) => EndpointStore::load(path, Some(&bytes)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => EndpointStore::load(path, None),
            Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }

    /// [`EndpointStore::open`] of a state file holding `bytes` (`None`: no
    /// file yet), without reading it; changes are written to `path`.
    pub fn load(path: &Path, bytes: Option<&[u8]>) -> anyhow::Result<Self> {
        let by_attachment = match bytes {
            Some(bytes) => {
                let list: Vec<Endpoint> = serde_json::from_slice(bytes)
                    .with_context(|| format!("endpoint state {} is unreadable", path.display()))?;
                list.into_iter()
                    .map(|e| (e.attachment.clone(), e))
                    .collect()
            }
            None => BTreeMap::new(),
        };
        Ok(EndpointStore {
            path: path.to_owned(),
            by_attachment,
        })
    }

    pub fn get(&self, attachment: &Attachment) -> Option<&Endpoint> {
        self.by_attachment.get(attachment)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Endpoint> {
        self.by_attachment.values()
    }

    pub fn len(&self) -> usize {
        self.by_attachment.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_attachment.is_empty()
    }

    pub fn insert(&mut self, endpoint: Endpoint) -> anyhow::Result<()> {
        self.by_attachment
            .insert(endpoint.attachment.clone(), endpoint);
        self.persist()
    }

    pub fn remove(&mut self, attachment: &Attachment) -> anyhow::Result<Option<Endpoint>> {
        let removed = self.by_attachment.remove(attachment);
        if removed.is_some() {
            self.persist()?;
        }
        Ok(removed)
    }

    fn persist(&self) -> anyhow::Result<()> {
        let list: Vec<&Endpoint> = self.by_attachment.values().collect();
        let bytes = serde_json::to_vec_pretty(&list)?;
        write_atomically(&self.path, &bytes)
            .with_context(|| format!("writing {}", self.path.display()))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn endpoint(id: &str, last: u8) -> Endpoint {
        Endpoint {
            attachment: Attachment {
                container_id: id.into(),
                ifname: "eth0".into(),
            },
            ip: std::net::Ipv4Addr::new(10, 244, 0, last),
            mac: [2, 0, 0, 0, 0, last],
            host_ifname: format!("tern{id}"),
            netns: format!("/run/netns/{id}"),
            host_ports: vec![],
            bandwidth: None,
            pod: None,
            netns_cookie: None,
        }
    }

    #[test]
    fn endpoints_survive_reopening_and_removal_is_persisted() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("endpoints.json");
        let mut store = EndpointStore::open(&path).unwrap();
        store.insert(endpoint("a", 2)).unwrap();
        store.insert(endpoint("b", 3)).unwrap();
        let a = endpoint("a", 2).attachment;
        assert_eq!(store.remove(&a).unwrap(), Some(endpoint("a", 2)));
        assert_eq!(store.remove(&a).unwrap(), None);
        let reopened = EndpointStore::open(&path).unwrap();
        assert_eq!(reopened.len(), 1);
        assert_eq!(reopened.iter().next(), Some(&endpoint("b", 3)));
    }
}
