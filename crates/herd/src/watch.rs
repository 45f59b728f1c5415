//! Following every key under an etcd prefix: a snapshot, then a watch from the next revision; a
//! compacted, cancelled or broken watch leads to a fresh snapshot. Events that etcd 3.4 repeats are
//! dropped, so consumers see each change once and in order.

use std::time::Duration;

use etcd_client::{Client, Event, GetOptions, KeyValue, WatchOptions, WatchStream};

use crate::error::EtcdError;

/// Pause before a fresh snapshot after a failure, so a down etcd is not hammered.
const RESYNC_BACKOFF: Duration = Duration::from_millis(200);
/// Bound on reading a prefix and starting its watch.
const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(3);

/// What a follower is told.
#[derive(Debug)]
pub enum Update {
    /// Everything under the prefix at one revision: replace what is known.
    Reset {
        /// The revision of the snapshot.
        revision: i64,
        /// Every key-value under the prefix.
        kvs: Vec<KeyValue>,
    },
    /// Changes from one etcd response (one or more revisions), each newer than all before.
    Events {
        /// The new events, in order.
        events: Vec<Event>,
        /// The newest revision among them.
        newest: i64,
    },
}

/// Follows one prefix: each [`Follower::next`] is the next snapshot or batch of changes. Failures
/// are logged and followed by a fresh snapshot, for as long as the follower lives.
pub struct Follower {
    client: Client,
    prefix: String,
    /// The watch after the last snapshot, and the newest revision passed on from it.
    watching: Option<(WatchStream, i64)>,
}

impl Follower {
    /// A follower of `prefix`; nothing is read until the first [`Follower::next`].
    pub fn new(client: Client, prefix: String) -> Self {
        Self {
            client,
            prefix,
            watching: None,
        }
    }

    /// The next update: a snapshot first (and after any failure), then changes as they happen.
    pub async fn next(&mut self) -> Update {
        loop {
            let result = match self.watching.take() {
                None => self.snapshot().await,
                Some((stream, applied)) => self.changes(stream, applied).await,
            };
            match result {
                Ok(update) => return update,
                Err(e) => {
                    tracing::warn!(prefix = %self.prefix, error = %e, "watch interrupted; resyncing");
                    tokio::time::sleep(RESYNC_BACKOFF).await;
                }
            }
        }
    }

    /// Everything under the prefix, and a watch from the revision after it; within
    /// [`SNAPSHOT_TIMEOUT`], so that a member that takes connections but does not answer (one just
    /// restarted, say) is not waited on: the next try goes to another.
    async fn snapshot(&mut self) -> Result<Update, EtcdError> {
        match tokio::time::timeout(SNAPSHOT_TIMEOUT, self.snapshot_now()).await {
            Ok(result) => result,
            Err(_) => Err(EtcdError::Timeout(SNAPSHOT_TIMEOUT)),
        }
    }

    async fn snapshot_now(&mut self) -> Result<Update, EtcdError> {
        let mut resp = self
            .client
            .get(self.prefix.as_str(), Some(GetOptions::new().with_prefix()))
            .await?;
        let revision = resp.header().map(|h| h.revision()).unwrap_or(0);
        let options = WatchOptions::new()
            .with_prefix()
            .with_start_revision(revision + 1);
        let stream = self
            .client
            .watch(self.prefix.as_str(), Some(options))
            .await?;
        self.watching = Some((stream, revision));
        Ok(Update::Reset {
            revision,
            kvs: resp.take_kvs(),
        })
    }

    /// The next batch of new events from the watch; keeps the watch unless it failed.
    async fn changes(
        &mut self,
        mut stream: WatchStream,
        applied: i64,
    ) -> Result<Update, EtcdError> {
        loop {
            let Some(resp) = stream.message().await? else {
                return Err(EtcdError::WatchEnded);
            };
            if resp.canceled() || resp.compact_revision() > 0 {
                return Err(EtcdError::WatchCancelled {
                    compact_revision: resp.compact_revision(),
                    reason: resp.cancel_reason().to_string(),
                });
            }
            // etcd 3.4 can repeat events: anything at or below what is applied is old news.
            let events: Vec<Event> = resp
                .events()
                .iter()
                .filter(|e| e.kv().is_some_and(|kv| kv.mod_revision() > applied))
                .cloned()
                .collect();
            let Some(newest) = events
                .iter()
                .filter_map(|e| e.kv())
                .map(|kv| kv.mod_revision())
                .max()
            else {
                continue;
            };
            self.watching = Some((stream, newest));
            return Ok(Update::Events { events, newest });
        }
    }
}
