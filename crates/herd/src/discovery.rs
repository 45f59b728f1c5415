//! A live view of one service's instances: a snapshot of its registrations, then a watch from the
//! next revision. A compacted or broken watch leads to a full resync; events are applied
//! idempotently, since etcd 3.4 can deliver one twice.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{Client, EventType, GetOptions, WatchOptions};
use tokio::sync::watch;

use crate::keys::{InstanceInfo, Keys};

/// The instances of a service, by instance id.
pub type Endpoints = Arc<BTreeMap<String, InstanceInfo>>;

/// Pause before resyncing after a failure, so a down etcd is not hammered.
const RESYNC_BACKOFF: Duration = Duration::from_millis(200);

/// Watches one service's instances and publishes every change of the set.
#[derive(Debug)]
pub struct Resolver {
    rx: watch::Receiver<Endpoints>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Resolver {
    /// Starts watching `service`'s registrations under `keys` in the background.
    pub fn start(client: Client, keys: &Keys, service: &str) -> Self {
        let (tx, rx) = watch::channel(Endpoints::default());
        let prefix = keys.service_prefix(service);
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
        let (_tx, rx) = watch::channel(Arc::new(map));
        Self { rx, task: None }
    }

    /// A receiver of the current endpoint set and every later one.
    pub fn subscribe(&self) -> watch::Receiver<Endpoints> {
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

async fn run(client: Client, prefix: String, tx: watch::Sender<Endpoints>) {
    loop {
        if let Err(e) = sync_and_watch(client.clone(), &prefix, &tx).await {
            tracing::warn!(%prefix, error = %e, "discovery watch interrupted; resyncing");
        }
        tokio::time::sleep(RESYNC_BACKOFF).await;
    }
}

/// One snapshot and the watch that follows it, until the watch can no longer be trusted.
async fn sync_and_watch(
    mut client: Client,
    prefix: &str,
    tx: &watch::Sender<Endpoints>,
) -> anyhow::Result<()> {
    let resp = client
        .get(prefix, Some(GetOptions::new().with_prefix()))
        .await?;
    let revision = resp.header().map(|h| h.revision()).unwrap_or(0);
    let mut map = BTreeMap::new();
    for kv in resp.kvs() {
        if let Some(info) = parse(prefix, kv.key(), kv.value()) {
            map.insert(info.instance_id.clone(), info);
        }
    }
    publish(tx, &map);
    let mut applied = revision;
    let mut stream = client
        .watch(
            prefix,
            Some(
                WatchOptions::new()
                    .with_prefix()
                    .with_start_revision(revision + 1),
            ),
        )
        .await?;
    while let Some(resp) = stream.message().await? {
        if resp.canceled() || resp.compact_revision() > 0 {
            anyhow::bail!(
                "watch cancelled (compact revision {}, reason {:?})",
                resp.compact_revision(),
                resp.cancel_reason()
            );
        }
        let mut changed = false;
        for event in resp.events() {
            let Some(kv) = event.kv() else { continue };
            // etcd 3.4 can repeat events: anything at or below what is applied is old news.
            if kv.mod_revision() <= applied {
                continue;
            }
            let Some(id) = instance_id(prefix, kv.key()) else {
                continue;
            };
            match event.event_type() {
                EventType::Put => {
                    if let Some(info) = parse(prefix, kv.key(), kv.value()) {
                        changed |= map.get(id) != Some(&info);
                        map.insert(id.to_string(), info);
                    }
                }
                EventType::Delete => changed |= map.remove(id).is_some(),
            }
        }
        if let Some(last) = resp
            .events()
            .iter()
            .filter_map(|e| e.kv())
            .map(|kv| kv.mod_revision())
            .max()
        {
            applied = applied.max(last);
        }
        if changed {
            publish(tx, &map);
        }
    }
    anyhow::bail!("watch stream ended")
}

fn publish(tx: &watch::Sender<Endpoints>, map: &BTreeMap<String, InstanceInfo>) {
    tx.send_if_modified(|current| {
        if **current == *map {
            false
        } else {
            *current = Arc::new(map.clone());
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
