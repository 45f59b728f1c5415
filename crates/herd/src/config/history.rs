//! The revisions an instance holds: recent applied snapshots (bounded by count and by bytes of
//! distinct section values) and older ones read from etcd for pinned requests (once each, shared).

use std::collections::HashSet;
use std::sync::Arc;

use etcd_client::GetOptions;
use tokio::sync::OnceCell;

use super::{HISTORY_BYTES, HISTORY_COUNT, Inner, PINNED_COUNT, Snapshot, lock};
use crate::config::ConfigModel;
use crate::error::RevisionError;

impl<M: ConfigModel> Inner<M> {
    pub(super) fn recent(&self, revision: i64) -> Option<Arc<Snapshot<M>>> {
        self.history
            .load()
            .iter()
            .rev()
            .find(|s| s.revision == revision)
            .cloned()
    }

    /// An older revision, read from etcd by the first request that asks and shared with the rest.
    /// A failure that may pass (etcd unreachable) is not kept: the next request reads again.
    pub(super) async fn pinned(&self, revision: i64) -> Result<Arc<Snapshot<M>>, RevisionError> {
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
    pub(super) async fn load_revision(
        &self,
        revision: i64,
    ) -> Result<Arc<Snapshot<M>>, RevisionError> {
        let mut client = self.etcd(revision)?;
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

    pub(super) fn remember(&self, snapshot: Arc<Snapshot<M>>) {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::Layout;

    /// A runtime-only configuration at `revision` whose telemetry section was written at
    /// `written` and is `bytes` long (padded with spaces, which JSON ignores).
    fn snapshot(inner: &Inner<()>, revision: i64, written: i64, bytes: usize) -> Arc<Snapshot<()>> {
        let mut value = br#"{"sampling_ratio":0.5}"#.to_vec();
        value.resize(bytes.max(value.len()), b' ');
        let sections = inner
            .registry
            .parse([("telemetry", value.as_slice(), written)], |_, _| None)
            .expect("valid");
        Arc::new(Snapshot::build(revision, sections).expect("builds"))
    }

    fn held(inner: &Inner<()>) -> Vec<i64> {
        inner.history.load().iter().map(|s| s.revision).collect()
    }

    #[test]
    fn history_keeps_the_newest_by_count_and_a_revision_once() {
        let inner = Inner::<()>::new(None, Layout::new("/herd/"));
        for revision in 1..=(HISTORY_COUNT as i64 + 10) {
            inner.remember(snapshot(&inner, revision, revision, 10));
        }
        let kept = held(&inner);
        assert_eq!(kept.len(), HISTORY_COUNT);
        assert_eq!(kept.first(), Some(&11));
        assert_eq!(kept.last(), Some(&(HISTORY_COUNT as i64 + 10)));
        // The same revision again replaces, not adds; an older one is put in its order.
        inner.remember(snapshot(&inner, 20, 20, 10));
        assert_eq!(held(&inner).len(), HISTORY_COUNT);
        assert!(inner.recent(20).is_some() && inner.recent(10).is_none());
    }

    #[test]
    fn history_is_bounded_by_the_bytes_of_distinct_writes_and_keeps_the_current_one() {
        let inner = Inner::<()>::new(None, Layout::new("/herd/"));
        // Three revisions sharing one write of a big section hold its bytes once...
        let big = HISTORY_BYTES / 2 + 1;
        for revision in 1..=3 {
            inner.remember(snapshot(&inner, revision, 1, big));
        }
        assert_eq!(held(&inner), [1, 2, 3]);
        assert_eq!(held_bytes(&inner.history.load()), big);
        // ...a second write of that size pushes the older ones out...
        inner.remember(snapshot(&inner, 4, 4, big));
        assert_eq!(held(&inner), [4]);
        // ...and one larger than the whole bound is still kept, alone: it is the current one.
        inner.remember(snapshot(&inner, 5, 5, HISTORY_BYTES + 1));
        assert_eq!(held(&inner), [5]);
    }
}
