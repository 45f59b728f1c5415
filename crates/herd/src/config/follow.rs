//! Following etcd: every change under `<prefix>config/` parsed (unchanged sections shared),
//! validated whole, applied or rejected; at start, a walk back to the newest valid revision when
//! the newest is not.

use std::collections::BTreeMap;
use std::sync::{Arc, Weak};

use etcd_client::{EventType, GetOptions, KeyValue};

use super::{ConfigError, Inner, Rejection, Snapshot, WALK_BACK_STEPS};
use crate::config::ConfigModel;
use crate::error::EtcdError;
use crate::watch::{Follower, Update, Watches};

impl<M: ConfigModel> Inner<M> {
    /// Builds the configuration of `kvs` (read at one revision), sharing every section value a
    /// snapshot in memory already holds.
    pub(super) fn snapshot_of(
        &self,
        kvs: &[KeyValue],
        revision: i64,
    ) -> Result<Snapshot<M>, ConfigError> {
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
    pub(super) fn snapshot_of_raw(
        &self,
        raw: &Raw,
        revision: i64,
    ) -> Result<Snapshot<M>, ConfigError> {
        let current = self.current.load();
        let sections = self.registry.parse(
            raw.iter()
                .map(|(name, (value, rev))| (name.as_str(), value.as_slice(), *rev)),
            |name, mod_revision| current.as_ref()?.sections.entry(name, mod_revision),
        )?;
        Snapshot::build(revision, sections)
    }

    pub(super) fn apply(&self, revision: i64, result: Result<Snapshot<M>, ConfigError>) {
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
                crate::telemetry::apply_sampling(&snapshot.runtime);
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
    ///
    /// When etcd has compacted `newest` away, it cannot say whether a key was deleted since: the
    /// configuration is named by its newest write, as every instance that saw that write names
    /// it (etcd compacts regularly, and an instance started later must serve the calls pinned to
    /// the name the others use). Only a configuration whose last change was a deletion, compacted
    /// since, is named differently (the deletion's revision elsewhere); calls pinned to that name
    /// then fail with `FAILED_PRECONDITION` until the next change.
    pub(super) async fn name_of_reset(&self, newest: i64, read_at: i64, keys: usize) -> i64 {
        let Some(mut client) = self.client.clone().filter(|_| newest > 0) else {
            return read_at;
        };
        let options = GetOptions::new()
            .with_prefix()
            .with_count_only()
            .with_revision(newest);
        match client
            .get(self.layout.config_prefix(), Some(options))
            .await
            .map_err(|e| EtcdError::at(newest, e))
        {
            Ok(resp) if usize::try_from(resp.count()).ok() == Some(keys) => newest,
            Err(EtcdError::Compacted { .. }) => newest,
            _ => read_at,
        }
    }

    /// Looks back from the invalid revision `rejected` for the newest valid configuration etcd
    /// still holds, so that an instance starting during a bad rollout can serve.
    pub(super) async fn walk_back(&self, rejected: i64) -> Option<Snapshot<M>> {
        let mut client = self.client.clone()?;
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

/// Raw sections with the revision each was last written at.
type Raw = BTreeMap<String, (Vec<u8>, i64)>;

pub(super) async fn run<M: ConfigModel>(inner: Weak<Inner<M>>, watches: Watches) {
    let Some(layout) = inner.upgrade().map(|i| i.layout.clone()) else {
        return;
    };
    let section_of = |key: &[u8]| {
        std::str::from_utf8(key)
            .ok()
            .and_then(|k| layout.section_of(k))
            .map(str::to_string)
    };
    let mut follower = Follower::new(watches, layout.config_prefix());
    let mut raw = Raw::new();
    loop {
        let update = follower.next().await;
        let Some(inner) = inner.upgrade() else {
            return;
        };
        let revision = match update {
            Update::Reset { revision, kvs } => {
                let before = std::mem::replace(
                    &mut raw,
                    kvs.iter()
                        .filter_map(|kv| {
                            let section = section_of(kv.key())?;
                            Some((section, (kv.value().to_vec(), kv.mod_revision())))
                        })
                        .collect(),
                );
                let applied = inner.current.load().as_ref().map(|c| c.revision);
                match applied {
                    // Nothing changed while the watch was down (it may have been compacted past,
                    // so the revision this content had cannot be asked of etcd): the
                    // configuration keeps its name, which callers pin.
                    Some(applied) if before == raw && !raw.is_empty() => applied,
                    _ => {
                        let newest = raw.values().map(|(_, rev)| *rev).max().unwrap_or(0);
                        inner.name_of_reset(newest, revision, kvs.len()).await
                    }
                }
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
