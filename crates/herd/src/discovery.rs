//! A live view of one service's instances: a snapshot of its registrations, then a watch from the
//! next revision. A compacted or broken watch leads to a full resync; events are applied
//! idempotently, since etcd 3.4 can deliver one twice.

use std::collections::BTreeMap;
use std::sync::Arc;

use etcd_client::{Client, EventType};
use tokio::sync::watch;

use crate::instance::InstanceInfo;
use crate::layout::Layout;
use crate::watch::{Follower, Update};

/// The instances of a service, by instance id.
pub type Endpoints = Arc<BTreeMap<String, InstanceInfo>>;

/// What discovery knows: `None` until its first snapshot of etcd, then the instances found.
pub type Discovered = Option<Endpoints>;

/// Watches one service's instances and publishes every change of the set.
#[derive(Debug)]
pub struct Resolver {
    rx: watch::Receiver<Discovered>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Resolver {
    /// Starts watching `service`'s registrations under `layout` in the background.
    pub fn start(client: Client, layout: &Layout, service: &str) -> Self {
        let (tx, rx) = watch::channel(None);
        let prefix = layout.service_prefix(service);
        let task = tokio::spawn(run(client, prefix, tx));
        Self {
            rx,
            task: Some(task),
        }
    }

    /// A fixed set of endpoints, for tests and static deployments.
    pub fn fixed(endpoints: impl IntoIterator<Item = InstanceInfo>) -> Self {
        let map = endpoints
            .into_iter()
            .map(|i| (i.instance_id.clone(), i))
            .collect();
        let (_tx, rx) = watch::channel(Some(Arc::new(map)));
        Self { rx, task: None }
    }

    /// A receiver of the current endpoint set and every later one.
    pub fn subscribe(&self) -> watch::Receiver<Discovered> {
        self.rx.clone()
    }
}

impl Drop for Resolver {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

async fn run(client: Client, prefix: String, tx: watch::Sender<Discovered>) {
    let mut map = BTreeMap::new();
    let mut follower = Follower::new(client, prefix.clone());
    loop {
        let update = tokio::select! {
            update = follower.next() => update,
            _ = tx.closed() => return,
        };
        match update {
            Update::Reset { kvs, .. } => {
                map.clear();
                for kv in &kvs {
                    if let Some(info) = parse(&prefix, kv.key(), kv.value()) {
                        map.insert(info.instance_id.clone(), info);
                    }
                }
            }
            Update::Events { events, .. } => {
                for event in &events {
                    let Some(kv) = event.kv() else { continue };
                    let Some(id) = instance_id(&prefix, kv.key()) else {
                        continue;
                    };
                    match event.event_type() {
                        EventType::Put => {
                            if let Some(info) = parse(&prefix, kv.key(), kv.value()) {
                                map.insert(id.to_string(), info);
                            }
                        }
                        EventType::Delete => {
                            map.remove(id);
                        }
                    }
                }
            }
        }
        publish(&tx, &map);
    }
}

fn publish(tx: &watch::Sender<Discovered>, map: &BTreeMap<String, InstanceInfo>) {
    tx.send_if_modified(|current| {
        if current.as_deref() == Some(map) {
            false
        } else {
            *current = Some(Arc::new(map.clone()));
            true
        }
    });
}

fn instance_id<'k>(prefix: &str, key: &'k [u8]) -> Option<&'k str> {
    std::str::from_utf8(key)
        .ok()?
        .strip_prefix(prefix)
        .filter(|id| !id.is_empty() && !id.contains('/'))
}

fn parse(prefix: &str, key: &[u8], value: &[u8]) -> Option<InstanceInfo> {
    let id = instance_id(prefix, key)?;
    match serde_json::from_slice::<InstanceInfo>(value) {
        Ok(info) if info.instance_id == id => Some(info),
        Ok(_) => {
            tracing::warn!(key = %String::from_utf8_lossy(key), "registration's instance id does not match its key; ignored");
            None
        }
        Err(e) => {
            tracing::warn!(key = %String::from_utf8_lossy(key), error = %e, "unreadable registration; ignored");
            None
        }
    }
}
