//! A live view of one service's instances: a snapshot of its registrations, then a watch from the
//! next revision. A compacted or broken watch leads to a full resync; events are applied
//! idempotently, since etcd 3.4 can deliver one twice.

use std::collections::BTreeMap;
use std::sync::Arc;

use etcd_client::{Client, EventType};
use tokio::sync::watch;

use crate::instance::InstanceInfo;
use crate::layout::Layout;
use crate::watch::{Follower, Update, Watches};

/// The instances of a service, by instance id: an immutable map whose copies share all but what
/// changed. Its entries are spread over [`SHARDS`] shards by a hash of the id, each shared until
/// written: discovery applies an event by copying one shard (about N/64 entries) and the list of
/// shards (64 pointers), and publishes the result by reference. Copying the whole map on every
/// event would cost each caller O(N) per registration — a million entry copies per caller while
/// a thousand instances start.
#[derive(Clone, Default)]
pub struct Endpoints {
    shards: Arc<Vec<Arc<BTreeMap<String, InstanceInfo>>>>,
    len: usize,
}

/// How many shards an [`Endpoints`] map is spread over.
pub const SHARDS: usize = 64;

impl PartialEq for Endpoints {
    fn eq(&self, other: &Self) -> bool {
        self.len == other.len && self.iter().all(|(id, info)| other.get(id) == Some(info))
    }
}

impl Eq for Endpoints {}

impl std::fmt::Debug for Endpoints {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

impl Endpoints {
    fn shard(id: &str) -> usize {
        (crate::balance::subset::position(id) % SHARDS as u64) as usize
    }

    /// The number of instances.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether there is none.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The instance `id`, if there is one.
    pub fn get(&self, id: &str) -> Option<&InstanceInfo> {
        self.shards.get(Self::shard(id))?.get(id)
    }

    /// Whether the instance `id` is there.
    pub fn contains_key(&self, id: &str) -> bool {
        self.get(id).is_some()
    }

    /// Every instance with its id, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = (&String, &InstanceInfo)> {
        self.shards.iter().flat_map(|shard| shard.iter())
    }

    /// Every instance id, in no particular order.
    pub fn keys(&self) -> impl Iterator<Item = &String> {
        self.iter().map(|(id, _)| id)
    }

    /// Adds or replaces `info` under its id; says whether anything changed. Copies one shard.
    pub fn insert(&mut self, info: InstanceInfo) -> bool {
        let shard = Self::shard(&info.instance_id);
        if self
            .shards
            .get(shard)
            .and_then(|s| s.get(&info.instance_id))
            == Some(&info)
        {
            return false;
        }
        let map = Arc::make_mut(&mut self.shards_mut()[shard]);
        if map.insert(info.instance_id.clone(), info).is_none() {
            self.len += 1;
        }
        true
    }

    /// Removes the instance `id`; says whether it was there. Copies one shard.
    pub fn remove(&mut self, id: &str) -> bool {
        let shard = Self::shard(id);
        if !self.shards.get(shard).is_some_and(|s| s.contains_key(id)) {
            return false;
        }
        Arc::make_mut(&mut self.shards_mut()[shard]).remove(id);
        self.len -= 1;
        true
    }

    fn shards_mut(&mut self) -> &mut Vec<Arc<BTreeMap<String, InstanceInfo>>> {
        if self.shards.is_empty() {
            self.shards = Arc::new(vec![Arc::default(); SHARDS]);
        }
        Arc::make_mut(&mut self.shards)
    }
}

impl FromIterator<InstanceInfo> for Endpoints {
    fn from_iter<I: IntoIterator<Item = InstanceInfo>>(iter: I) -> Self {
        let mut endpoints = Self::default();
        for info in iter {
            endpoints.insert(info);
        }
        endpoints
    }
}

/// What discovery knows: `None` until its first snapshot of etcd, then the instances found.
pub type Discovered = Option<Endpoints>;

/// Watches one service's instances and publishes every change of the set.
#[derive(Debug)]
pub struct Resolver {
    rx: watch::Receiver<Discovered>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Resolver {
    /// Starts watching `service`'s registrations under `layout` in the background, on a watch
    /// stream of its own.
    pub fn start(client: Client, layout: &Layout, service: &str) -> Self {
        Self::start_on(&Watches::new(client), layout, service)
    }

    /// As [`Resolver::start`], watching on `watches`' stream (the instance's own).
    pub fn start_on(watches: &Watches, layout: &Layout, service: &str) -> Self {
        let (tx, rx) = watch::channel(None);
        let prefix = layout.service_prefix(service);
        let task = tokio::spawn(run(watches.clone(), prefix, tx));
        Self {
            rx,
            task: Some(task),
        }
    }

    /// A fixed set of endpoints, for tests and static deployments.
    pub fn fixed(endpoints: impl IntoIterator<Item = InstanceInfo>) -> Self {
        let (_tx, rx) = watch::channel(Some(endpoints.into_iter().collect()));
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

async fn run(watches: Watches, prefix: String, tx: watch::Sender<Discovered>) {
    let mut endpoints = Endpoints::default();
    let mut follower = Follower::new(watches, prefix.clone());
    loop {
        let update = tokio::select! {
            update = follower.next() => update,
            _ = tx.closed() => return,
        };
        let changed = match update {
            Update::Reset { kvs, .. } => {
                let fresh: Endpoints = kvs
                    .iter()
                    .filter_map(|kv| parse(&prefix, kv.key(), kv.value()))
                    .collect();
                let changed = fresh != endpoints;
                endpoints = fresh;
                changed
            }
            Update::Events { events, .. } => {
                let mut changed = false;
                for event in &events {
                    let Some(kv) = event.kv() else { continue };
                    let Some(id) = instance_id(&prefix, kv.key()) else {
                        continue;
                    };
                    changed |= match event.event_type() {
                        EventType::Put => parse(&prefix, kv.key(), kv.value())
                            .is_some_and(|info| endpoints.insert(info)),
                        EventType::Delete => endpoints.remove(id),
                    };
                }
                changed
            }
        };
        // Published by reference: receivers share every shard this change did not touch.
        if changed || tx.borrow().is_none() {
            tx.send_replace(Some(endpoints.clone()));
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn info(id: &str, address: &str) -> InstanceInfo {
        InstanceInfo {
            service: "pricing".into(),
            instance_id: id.into(),
            address: address.into(),
            pid: 1,
            version: "0".into(),
        }
    }

    #[test]
    fn a_change_copies_one_shard_and_earlier_copies_keep_what_they_saw() {
        let mut endpoints: Endpoints = (0..1000)
            .map(|i| info(&format!("p{i}"), "127.0.0.1:1"))
            .collect();
        assert_eq!(endpoints.len(), 1000);
        let before = endpoints.clone();
        assert!(endpoints.insert(info("p1000", "127.0.0.1:2")));
        assert!(endpoints.remove("p7"));
        assert!(!endpoints.remove("p7"), "removed twice");
        assert!(
            !endpoints.insert(info("p8", "127.0.0.1:1")),
            "the same again"
        );
        assert!(endpoints.insert(info("p8", "127.0.0.1:3")), "a new address");
        assert_eq!(endpoints.len(), 1000);
        assert_eq!(before.len(), 1000);
        assert!(before.contains_key("p7") && !before.contains_key("p1000"));
        assert_eq!(
            before.get("p8").map(|i| i.address.as_str()),
            Some("127.0.0.1:1")
        );
        assert_eq!(
            endpoints.get("p8").map(|i| i.address.as_str()),
            Some("127.0.0.1:3")
        );
        // Three changes touched at most three shards; every other is shared with the copy.
        let shared = before
            .shards
            .iter()
            .zip(endpoints.shards.iter())
            .filter(|(a, b)| Arc::ptr_eq(a, b))
            .count();
        assert!(shared >= SHARDS - 3, "{shared} of {SHARDS} shared");
        assert_eq!(endpoints.keys().count(), 1000);
    }

    #[test]
    fn equal_sets_compare_equal_however_they_were_made() {
        let mut a: Endpoints = [info("x", "1"), info("y", "2")].into_iter().collect();
        let b: Endpoints = [info("y", "2"), info("x", "1")].into_iter().collect();
        assert_eq!(a, b);
        a.remove("x");
        a.remove("y");
        assert_eq!(a, Endpoints::default());
        assert!(a.is_empty());
    }
}
