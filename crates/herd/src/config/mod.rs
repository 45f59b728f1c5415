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

mod follow;
mod history;
mod section;

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, PoisonError};

use arc_swap::{ArcSwap, ArcSwapOption};
use etcd_client::Client;
use tokio::sync::{OnceCell, watch};

pub use section::{
    Checked, ConfigModel, Presence, Registry, RuntimeConfig, Section, SectionSpec, Sections,
    parse_section, runtime_sections,
};

use crate::error::{EtcdError, RevisionError};
use crate::layout::Layout;

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
    /// etcd, where the configuration comes from (`None` for a fixed one).
    client: Option<Client>,
    layout: Layout,
}

impl<M: ConfigModel> ConfigStore<M> {
    /// Starts loading and watching the configuration under `layout` in the background, on a
    /// watch stream of its own.
    pub fn start(client: Client, layout: Layout) -> Self {
        Self::start_on(&crate::watch::Watches::new(client), layout)
    }

    /// As [`ConfigStore::start`], watching on `watches`' stream (the instance's own).
    pub fn start_on(watches: &crate::watch::Watches, layout: Layout) -> Self {
        let inner = Arc::new(Inner::new(Some(watches.client().clone()), layout));
        tokio::spawn(follow::run(Arc::downgrade(&inner), watches.clone()));
        Self { inner }
    }

    /// A configuration that never changes, from `(section, JSON)` pairs, at revision 1: for unit
    /// tests of services and for tools, with no etcd behind it. Fails as an instance would
    /// reject it.
    pub fn fixed<'a>(
        sections: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Result<Self, ConfigError> {
        let inner = Inner::new(None, Layout::new(crate::settings::DEFAULT_PREFIX));
        let raw = sections
            .into_iter()
            .map(|(name, json)| (name, json.as_bytes(), 1));
        let sections = inner.registry.parse(raw, |_, _| None)?;
        inner.apply(1, Ok(Snapshot::build(1, sections)?));
        Ok(Self {
            inner: Arc::new(inner),
        })
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
        // Boxed: reading etcd takes a future of several KiB, which every call's future would
        // otherwise carry (and be copied with), though nearly every call is served from memory.
        Box::pin(self.inner.pinned(revision)).await
    }
}

impl<M: ConfigModel> Inner<M> {
    fn new(client: Option<Client>, layout: Layout) -> Self {
        Self {
            registry: Registry::of::<M>(),
            current: ArcSwapOption::empty(),
            history: ArcSwap::from_pointee(Vec::new()),
            pinned: Mutex::new(VecDeque::new()),
            status: watch::Sender::new(ConfigStatus::default()),
            runtime: watch::Sender::new(RuntimeConfig::default()),
            client,
            layout,
        }
    }

    /// etcd, or why a fixed configuration cannot read another revision.
    fn etcd(&self, revision: i64) -> Result<Client, RevisionError> {
        self.client.clone().ok_or(RevisionError::Unreadable {
            revision,
            cause: EtcdError::Unavailable("a fixed configuration holds one revision only".into()),
        })
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}
