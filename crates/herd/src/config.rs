//! Typed shared configuration: loaded from etcd at start, watched, validated, swapped atomically.
//!
//! A [`ConfigModel`] is built from every section under `<prefix>config/` at one etcd revision. A
//! revision that does not parse or validate is rejected whole: the instance keeps its last good
//! snapshot, logs the key and revision, and reports it in [`ConfigStore::status`]. Reading the
//! current snapshot takes no lock. Recent snapshots are kept by revision so that a request pinned to
//! a revision is evaluated at exactly that revision; older ones are read from etcd until compacted.

use std::collections::BTreeMap;
use std::sync::Arc;

use arc_swap::{ArcSwap, ArcSwapOption};
use etcd_client::{Client, EventType, GetOptions};
use tokio::sync::watch;
use tonic::Status;

use crate::keys::Keys;
use crate::watch::{Update, follow};

/// Recent snapshots kept in memory for requests pinned to them.
const WINDOW: usize = 64;

/// A whole configuration built from its raw sections, with every rule checked.
pub trait ConfigModel: Sized + Send + Sync + 'static {
    /// Builds the model from raw section values (section name → bytes); a missing section is absent
    /// from the map. Fails with the first section that breaks a rule.
    fn from_sections(sections: &BTreeMap<String, Vec<u8>>) -> Result<Self, ConfigError>;
}

/// Why a configuration was rejected: the section and the rule it broke.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, serde::Serialize, serde::Deserialize)]
#[error("{section}: {message}")]
pub struct ConfigError {
    /// The section at fault, for example `catalog`.
    pub section: String,
    /// What is wrong, naming the field.
    pub message: String,
}

impl ConfigError {
    /// An error in `section`.
    pub fn new(section: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            section: section.into(),
            message: message.into(),
        }
    }
}

/// One validated configuration and the etcd revision it was read at.
#[derive(Debug)]
pub struct Snapshot<M> {
    /// The revision of the newest section in this configuration.
    pub revision: i64,
    /// The configuration.
    pub model: M,
}

/// A revision that was rejected, and why.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Rejection {
    /// The etcd revision of the rejected write.
    pub revision: i64,
    /// The rule it broke.
    pub error: ConfigError,
}

/// What an instance has applied and what it refused.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ConfigStatus {
    /// Revision of the configuration in use (0 before the first valid one).
    pub applied: i64,
    /// The latest rejected revision, if any since start.
    pub rejected: Option<Rejection>,
}

/// The shared configuration of one instance: current snapshot, recent history, and status.
pub struct ConfigStore<M> {
    inner: Arc<Inner<M>>,
}

impl<M> Clone for ConfigStore<M> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
        }
    }
}

struct Inner<M> {
    current: ArcSwapOption<Snapshot<M>>,
    /// Recent snapshots, oldest first; replaced whole on change so that readers take no lock.
    window: ArcSwap<Vec<Arc<Snapshot<M>>>>,
    status: watch::Sender<ConfigStatus>,
    client: Client,
    keys: Keys,
}

impl<M: ConfigModel> ConfigStore<M> {
    /// Starts loading and watching the configuration under `keys` in the background.
    pub fn start(client: Client, keys: Keys) -> Self {
        let inner = Arc::new(Inner {
            current: ArcSwapOption::empty(),
            window: ArcSwap::from_pointee(Vec::new()),
            status: watch::Sender::new(ConfigStatus::default()),
            client,
            keys,
        });
        tokio::spawn(run(Arc::downgrade(&inner)));
        Self { inner }
    }

    /// The configuration in use, or `None` before the first valid one. Lock-free.
    pub fn current(&self) -> Option<Arc<Snapshot<M>>> {
        self.inner.current.load_full()
    }

    /// Waits until a valid configuration is loaded.
    pub async fn ready(&self) {
        self.applied_at_least(1).await;
    }

    /// Waits until the applied revision is at least `revision`.
    pub async fn applied_at_least(&self, revision: i64) {
        let mut rx = self.inner.status.subscribe();
        let _ = rx.wait_for(|s| s.applied >= revision).await;
    }

    /// What is applied and what was last rejected.
    pub fn status(&self) -> ConfigStatus {
        self.inner.status.borrow().clone()
    }

    /// Follows the status: every applied or rejected revision.
    pub fn subscribe_status(&self) -> watch::Receiver<ConfigStatus> {
        self.inner.status.subscribe()
    }

    /// The configuration to evaluate a request at. `revision` 0 means the current one; any other is
    /// the pinned revision, served from memory when recent and from etcd otherwise. A compacted
    /// revision is `FAILED_PRECONDITION`.
    pub async fn at(&self, revision: i64) -> Result<Arc<Snapshot<M>>, Status> {
        let current = self
            .current()
            .ok_or_else(|| Status::unavailable("configuration not loaded yet"))?;
        if revision == 0 || revision == current.revision {
            return Ok(current);
        }
        if revision < 0 {
            return Err(Status::invalid_argument(format!(
                "context.config_revision: must not be negative, got {revision}"
            )));
        }
        if let Some(found) = self.cached(revision) {
            return Ok(found);
        }
        let snapshot = Arc::new(self.load_revision(revision).await?);
        self.remember(snapshot.clone());
        Ok(snapshot)
    }

    fn cached(&self, revision: i64) -> Option<Arc<Snapshot<M>>> {
        self.inner
            .window
            .load()
            .iter()
            .rev()
            .find(|s| s.revision == revision)
            .cloned()
    }

    fn remember(&self, snapshot: Arc<Snapshot<M>>) {
        self.inner.remember(snapshot);
    }

    async fn load_revision(&self, revision: i64) -> Result<Snapshot<M>, Status> {
        let mut client = self.inner.client.clone();
        let prefix = self.inner.keys.config_prefix();
        let resp = client
            .get(prefix, Some(GetOptions::new().with_prefix().with_revision(revision)))
            .await
            .map_err(|e| {
                let text = e.to_string();
                if text.contains("compacted") {
                    Status::failed_precondition(format!(
                        "context.config_revision: revision {revision} has been compacted; retry without a pinned revision"
                    ))
                } else if text.contains("future revision") {
                    Status::invalid_argument(format!(
                        "context.config_revision: revision {revision} does not exist yet"
                    ))
                } else {
                    Status::unavailable(format!("reading configuration at revision {revision}: {text}"))
                }
            })?;
        let sections = self.sections_of(resp.kvs().iter().map(|kv| (kv.key(), kv.value())));
        let model = M::from_sections(&sections).map_err(|e| {
            Status::failed_precondition(format!(
                "context.config_revision: configuration at revision {revision} is not valid ({e})"
            ))
        })?;
        Ok(Snapshot { revision, model })
    }

    fn sections_of<'a>(
        &self,
        kvs: impl Iterator<Item = (&'a [u8], &'a [u8])>,
    ) -> BTreeMap<String, Vec<u8>> {
        kvs.filter_map(|(k, v)| {
            let key = std::str::from_utf8(k).ok()?;
            let section = self.inner.keys.section_of(key)?;
            Some((section.to_string(), v.to_vec()))
        })
        .collect()
    }
}

impl<M> Inner<M> {
    fn remember(&self, snapshot: Arc<Snapshot<M>>) {
        self.window.rcu(|window| {
            let mut next: Vec<Arc<Snapshot<M>>> = window
                .iter()
                .filter(|s| s.revision != snapshot.revision)
                .cloned()
                .collect();
            next.push(snapshot.clone());
            next.sort_by_key(|s| s.revision);
            if next.len() > WINDOW {
                next.drain(..next.len() - WINDOW);
            }
            next
        });
    }

    fn apply(&self, revision: i64, result: Result<M, ConfigError>) {
        match result {
            Ok(model) => {
                if self
                    .current
                    .load()
                    .as_ref()
                    .is_some_and(|c| c.revision == revision)
                {
                    return;
                }
                let snapshot = Arc::new(Snapshot { revision, model });
                self.remember(snapshot.clone());
                self.current.store(Some(snapshot));
                self.status.send_modify(|s| s.applied = revision);
                tracing::info!(revision, "configuration applied");
            }
            Err(error) => {
                tracing::warn!(
                    revision,
                    key = %self.keys.config(&error.section),
                    reason = %error.message,
                    "configuration rejected; keeping the last good one"
                );
                self.status
                    .send_modify(|s| s.rejected = Some(Rejection { revision, error }));
            }
        }
    }
}

/// Raw sections with the revision each was last modified at.
type Raw = BTreeMap<String, (Vec<u8>, i64)>;

async fn run<M: ConfigModel>(inner: std::sync::Weak<Inner<M>>) {
    let Some((client, keys)) = inner.upgrade().map(|i| (i.client.clone(), i.keys.clone())) else {
        return;
    };
    let mut raw = Raw::new();
    follow(client, keys.config_prefix(), |update| {
        let Some(inner) = inner.upgrade() else {
            return false;
        };
        let section_of = |key: &[u8]| {
            std::str::from_utf8(key)
                .ok()
                .and_then(|k| keys.section_of(k))
                .map(str::to_string)
        };
        let newest = match update {
            Update::Reset { kvs, .. } => {
                raw = kvs
                    .iter()
                    .filter_map(|kv| {
                        let section = section_of(kv.key())?;
                        Some((section, (kv.value().to_vec(), kv.mod_revision())))
                    })
                    .collect();
                raw.values().map(|(_, rev)| *rev).max().unwrap_or(0)
            }
            Update::Events { events, newest } => {
                for event in events {
                    let Some(kv) = event.kv() else { continue };
                    let Some(section) = section_of(kv.key()) else {
                        continue;
                    };
                    match event.event_type() {
                        EventType::Put => {
                            raw.insert(section, (kv.value().to_vec(), kv.mod_revision()));
                        }
                        EventType::Delete => {
                            raw.remove(&section);
                        }
                    }
                }
                newest
            }
        };
        let sections = raw
            .iter()
            .map(|(k, (v, _))| (k.clone(), v.clone()))
            .collect();
        // A configuration is named by its newest write (a deletion included).
        inner.apply(newest, M::from_sections(&sections));
        true
    })
    .await;
}
