//! Typed shared configuration: loaded from etcd at start, watched, validated, swapped atomically.
//!
//! A configuration is every section under `<prefix>config/` at one etcd revision, parsed by the
//! [`Registry`] of the runtime's sections and the application's ([`ConfigModel`]). A revision
//! that does not parse or validate is rejected whole: the instance keeps its last good snapshot,
//! logs the key and revision, and reports it in [`ConfigStore::status`]. A key that no section
//! claims is ignored and reported, never a reason to refuse the rest (an instance of an older
//! version must keep applying configuration while a newer one's sections are written).
//!
//! Reading the current snapshot takes no lock. Recent snapshots are kept by revision (at most
//! [`HISTORY_COUNT`], and [`HISTORY_BYTES`] of distinct section values) so that a request pinned to
//! a revision is evaluated at exactly that revision; older ones are read from etcd once each
//! (concurrent requests share the read) until compacted. Sections unchanged between revisions are
//! shared, not parsed or held twice. An instance that starts while the newest revision is invalid
//! starts on the newest valid one etcd still holds.

mod section;

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, PoisonError, Weak};

use arc_swap::{ArcSwap, ArcSwapOption};
use etcd_client::{Client, EventType, GetOptions, KeyValue};
use tokio::sync::{OnceCell, watch};

pub use section::{
    Checked, ConfigModel, Presence, Registry, RuntimeConfig, Section, SectionSpec, Sections,
    parse_section, runtime_sections,
};

use crate::error::RevisionError;
use crate::layout::Layout;
use crate::watch::{Follower, Update};

/// Most recent snapshots kept in memory for requests pinned to them...
pub const HISTORY_COUNT: usize = 64;
/// ...and most bytes (as JSON) of distinct section values they may hold between them: a large
/// catalog rewritten often keeps fewer revisions, not more memory. The current snapshot is always
/// kept.
pub const HISTORY_BYTES: usize = 8 * 1024 * 1024;
/// Older revisions read from etcd for pinned requests, kept by recent use.
const PINNED_COUNT: usize = 8;
/// How far back a starting instance looks for a valid revision when the newest is not.
const WALK_BACK_STEPS: usize = 100;

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
    /// The revision that names this configuration: its newest write, or the revision it was read
    /// at when that is not known to hold the same.
    pub revision: i64,
    /// The application's configuration.
    pub model: M,
    /// The runtime's own settings.
    pub runtime: RuntimeConfig,
    sections: Sections,
}

impl<M: ConfigModel> Snapshot<M> {
    fn build(revision: i64, sections: Sections) -> Result<Self, ConfigError> {
        let checked = section::build::<M>(sections)?;
        Ok(Self {
            revision,
            model: checked.model,
            runtime: checked.runtime,
            sections: checked.sections,
        })
    }
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
    /// Keys under `config/` in the applied revision that no section of this instance claims.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ignored: Vec<String>,
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

/// A pinned revision read from etcd, shared by every request that asked for it meanwhile.
type Pinned<M> = Arc<OnceCell<Result<Arc<Snapshot<M>>, RevisionError>>>;

struct Inner<M> {
    registry: Registry,
    current: ArcSwapOption<Snapshot<M>>,
    /// Recent applied snapshots, oldest first; replaced whole on change so readers take no lock.
    history: ArcSwap<Vec<Arc<Snapshot<M>>>>,
    /// Older revisions read for pinned requests, least recently asked first.
    pinned: Mutex<VecDeque<(i64, Pinned<M>)>>,
    status: watch::Sender<ConfigStatus>,
    runtime: watch::Sender<RuntimeConfig>,
    client: Client,
    layout: Layout,
}

impl<M: ConfigModel> ConfigStore<M> {
    /// Starts loading and watching the configuration under `layout` in the background.
    pub fn start(client: Client, layout: Layout) -> Self {
        let inner = Arc::new(Inner {
            registry: Registry::of::<M>(),
            current: ArcSwapOption::empty(),
            history: ArcSwap::from_pointee(Vec::new()),
            pinned: Mutex::new(VecDeque::new()),
            status: watch::Sender::new(ConfigStatus::default()),
            runtime: watch::Sender::new(RuntimeConfig::default()),
            client,
            layout,
        });
        tokio::spawn(run(Arc::downgrade(&inner)));
        Self { inner }
    }

    /// The sections this store reads: the runtime's and the model's.
    pub fn registry(&self) -> &Registry {
        &self.inner.registry
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

    /// Follows the runtime's own settings as revisions are applied.
    pub fn subscribe_runtime(&self) -> watch::Receiver<RuntimeConfig> {
        self.inner.runtime.subscribe()
    }

    /// The revisions held in memory, oldest first (the current one last).
    pub fn history(&self) -> Vec<i64> {
        self.inner
            .history
            .load()
            .iter()
            .map(|s| s.revision)
            .collect()
    }

    /// The configuration to evaluate a request at. `revision` 0 means the current one; any other is
    /// the pinned revision, served from memory when recent and read from etcd otherwise (once,
    /// however many requests ask for it meanwhile). A compacted revision is `FAILED_PRECONDITION`.
    pub async fn at(&self, revision: i64) -> Result<Arc<Snapshot<M>>, RevisionError> {
        let current = self.current().ok_or(RevisionError::NotLoaded)?;
        if revision == 0 || revision == current.revision {
            return Ok(current);
        }
        if revision < 0 {
            return Err(RevisionError::Negative(revision));
        }
        if let Some(found) = self.inner.recent(revision) {
            return Ok(found);
        }
        self.inner.pinned(revision).await
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl<M: ConfigModel> Inner<M> {
    fn recent(&self, revision: i64) -> Option<Arc<Snapshot<M>>> {
        self.history
            .load()
            .iter()
            .rev()
            .find(|s| s.revision == revision)
            .cloned()
    }

    /// An older revision, read from etcd by the first request that asks and shared with the rest.
    /// A failure that may pass (etcd unreachable) is not kept: the next request reads again.
    async fn pinned(&self, revision: i64) -> Result<Arc<Snapshot<M>>, RevisionError> {
        let cell = {
            let mut pinned = lock(&self.pinned);
            let found = pinned
                .iter()
                .position(|(r, _)| *r == revision)
                .and_then(|i| pinned.remove(i));
            let entry = found.unwrap_or_else(|| (revision, Arc::new(OnceCell::new())));
            let cell = entry.1.clone();
            pinned.push_back(entry);
            while pinned.len() > PINNED_COUNT {
                pinned.pop_front();
            }
            cell
        };
        let result = cell
            .get_or_init(|| self.load_revision(revision))
            .await
            .clone();
        if matches!(&result, Err(RevisionError::Unreadable { .. })) {
            lock(&self.pinned).retain(|(r, c)| !(*r == revision && Arc::ptr_eq(c, &cell)));
        }
        result
    }

    /// The configuration as etcd held it at `revision`.
    async fn load_revision(&self, revision: i64) -> Result<Arc<Snapshot<M>>, RevisionError> {
        let mut client = self.client.clone();
        let resp = client
            .get(
                self.layout.config_prefix(),
                Some(GetOptions::new().with_prefix().with_revision(revision)),
            )
            .await
            .map_err(|e| RevisionError::reading(revision, e))?;
        let snapshot = self
            .snapshot_of(resp.kvs(), revision)
            .map_err(|error| RevisionError::Invalid { revision, error })?;
        Ok(Arc::new(snapshot))
    }

    /// Builds the configuration of `kvs` (read at one revision), sharing every section value a
    /// snapshot in memory already holds.
    fn snapshot_of(&self, kvs: &[KeyValue], revision: i64) -> Result<Snapshot<M>, ConfigError> {
        let history = self.history.load();
        let raw = kvs.iter().filter_map(|kv| {
            let key = std::str::from_utf8(kv.key()).ok()?;
            Some((self.layout.section_of(key)?, kv.value(), kv.mod_revision()))
        });
        let sections = self.registry.parse(raw, |name, mod_revision| {
            history
                .iter()
                .rev()
                .find_map(|s| s.sections.entry(name, mod_revision))
        })?;
        Snapshot::build(revision, sections)
    }

    /// The configuration of the sections the watcher holds, sharing unchanged sections with the
    /// current snapshot.
    fn snapshot_of_raw(&self, raw: &Raw, revision: i64) -> Result<Snapshot<M>, ConfigError> {
        let current = self.current.load();
        let sections = self.registry.parse(
            raw.iter()
                .map(|(name, (value, rev))| (name.as_str(), value.as_slice(), *rev)),
            |name, mod_revision| current.as_ref()?.sections.entry(name, mod_revision),
        )?;
        Snapshot::build(revision, sections)
    }

    fn remember(&self, snapshot: Arc<Snapshot<M>>) {
        self.history.rcu(|history| {
            let mut next: Vec<Arc<Snapshot<M>>> = history
                .iter()
                .filter(|s| s.revision != snapshot.revision)
                .cloned()
                .collect();
            next.push(snapshot.clone());
            next.sort_by_key(|s| s.revision);
            while next.len() > 1
                && (next.len() > HISTORY_COUNT || held_bytes(&next) > HISTORY_BYTES)
            {
                next.remove(0);
            }
            next
        });
    }

    fn apply(&self, revision: i64, result: Result<Snapshot<M>, ConfigError>) {
        match result {
            Ok(snapshot) => {
                if self
                    .current
                    .load()
                    .as_ref()
                    .is_some_and(|c| c.revision == revision)
                {
                    return;
                }
                let snapshot = Arc::new(snapshot);
                let ignored = snapshot.sections.ignored().to_vec();
                if !ignored.is_empty() && ignored != self.status.borrow().ignored {
                    tracing::warn!(
                        revision,
                        ignored = %ignored.join(", "),
                        known = %self.registry.names().join(", "),
                        "configuration keys that no section claims are ignored"
                    );
                }
                self.remember(snapshot.clone());
                self.runtime.send_replace(snapshot.runtime.clone());
                self.current.store(Some(snapshot));
                self.status.send_modify(|s| {
                    s.applied = revision;
                    s.ignored = ignored;
                });
                tracing::info!(revision, "configuration applied");
            }
            Err(error) => {
                tracing::warn!(
                    revision,
                    key = %self.layout.config(&error.section),
                    reason = %error.message,
                    "configuration rejected; keeping the last good one"
                );
                self.status
                    .send_modify(|s| s.rejected = Some(Rejection { revision, error }));
            }
        }
    }

    /// The name of a configuration of `keys` keys read whole at `read_at`, whose newest write is
    /// `newest`: the write's revision when etcd held as many keys then (so none was deleted
    /// since, and the two revisions hold the same), otherwise the revision it was read at.
    async fn name_of_reset(&self, newest: i64, read_at: i64, keys: usize) -> i64 {
        if newest == 0 {
            return read_at;
        }
        let mut client = self.client.clone();
        let options = GetOptions::new()
            .with_prefix()
            .with_count_only()
            .with_revision(newest);
        match client.get(self.layout.config_prefix(), Some(options)).await {
            Ok(resp) if usize::try_from(resp.count()).ok() == Some(keys) => newest,
            _ => read_at,
        }
    }

    /// Looks back from the invalid revision `rejected` for the newest valid configuration etcd
    /// still holds, so that an instance starting during a bad rollout can serve.
    async fn walk_back(&self, rejected: i64) -> Option<Snapshot<M>> {
        let mut client = self.client.clone();
        let prefix = self.layout.config_prefix();
        let mut at = rejected - 1;
        for _ in 0..WALK_BACK_STEPS {
            if at <= 0 {
                break;
            }
            let options = GetOptions::new().with_prefix().with_revision(at);
            let resp = match client.get(prefix.as_str(), Some(options)).await {
                Ok(resp) => resp,
                Err(e) => {
                    tracing::warn!(revision = at, error = %e, "no older configuration to start on");
                    return None;
                }
            };
            let newest = resp.kvs().iter().map(|kv| kv.mod_revision()).max()?;
            // Named as instances that applied it when it was written name it, when it is the same.
            let name = self.name_of_reset(newest, at, resp.kvs().len()).await;
            match self.snapshot_of(resp.kvs(), name) {
                Ok(snapshot) => return Some(snapshot),
                Err(e) => {
                    tracing::debug!(revision = at, reason = %e, "older configuration not valid either");
                    at = newest - 1;
                }
            }
        }
        tracing::warn!(
            rejected,
            "no valid configuration found in etcd's history; waiting for a valid write"
        );
        None
    }
}

/// Bytes of distinct section values (each write counted once) held by `snapshots`.
fn held_bytes<M>(snapshots: &[Arc<Snapshot<M>>]) -> usize {
    let mut seen = HashSet::new();
    snapshots
        .iter()
        .flat_map(|s| s.sections.sizes())
        .filter(|(name, rev, _)| seen.insert((*name, *rev)))
        .map(|(_, _, bytes)| bytes)
        .sum()
}

/// Raw sections with the revision each was last written at.
type Raw = BTreeMap<String, (Vec<u8>, i64)>;

async fn run<M: ConfigModel>(inner: Weak<Inner<M>>) {
    let Some((client, layout)) = inner
        .upgrade()
        .map(|i| (i.client.clone(), i.layout.clone()))
    else {
        return;
    };
    let section_of = |key: &[u8]| {
        std::str::from_utf8(key)
            .ok()
            .and_then(|k| layout.section_of(k))
            .map(str::to_string)
    };
    let mut follower = Follower::new(client, layout.config_prefix());
    let mut raw = Raw::new();
    loop {
        let update = follower.next().await;
        let Some(inner) = inner.upgrade() else {
            return;
        };
        let revision = match update {
            Update::Reset { revision, kvs } => {
                raw = kvs
                    .iter()
                    .filter_map(|kv| {
                        let section = section_of(kv.key())?;
                        Some((section, (kv.value().to_vec(), kv.mod_revision())))
                    })
                    .collect();
                let newest = raw.values().map(|(_, rev)| *rev).max().unwrap_or(0);
                inner.name_of_reset(newest, revision, kvs.len()).await
            }
            Update::Events { events, newest } => {
                for event in &events {
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
                // A configuration is named by its newest write (a deletion included).
                newest
            }
        };
        let result = inner.snapshot_of_raw(&raw, revision);
        let invalid = result.is_err();
        inner.apply(revision, result);
        if invalid
            && inner.current.load().is_none()
            && let Some(older) = inner.walk_back(revision).await
        {
            let at = older.revision;
            inner.apply(at, Ok(older));
            tracing::info!(
                applied = at,
                rejected = revision,
                "started on the newest valid configuration etcd holds; the newest one is rejected"
            );
        }
    }
}
