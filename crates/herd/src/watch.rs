//! Following every key under an etcd prefix: a snapshot, then a watch from the next revision; a
//! compacted, cancelled or broken watch leads to a fresh snapshot. Events that etcd 3.4 repeats are
//! dropped, so consumers see each change once and in order.

use std::time::Duration;

use etcd_client::{Client, Event, GetOptions, KeyValue, WatchOptions};

/// Pause before a fresh snapshot after a failure, so a down etcd is not hammered.
const RESYNC_BACKOFF: Duration = Duration::from_millis(200);

/// What a follower is told.
#[derive(Debug)]
pub enum Update<'a> {
    /// Everything under the prefix at one revision: replace what is known.
    Reset {
        /// The revision of the snapshot.
        revision: i64,
        /// Every key-value under the prefix.
        kvs: &'a [KeyValue],
    },
    /// Changes from one etcd response (one or more revisions), each newer than all before.
    Events {
        /// The new events, in order.
        events: Vec<&'a Event>,
        /// The newest revision among them.
        newest: i64,
    },
}

/// Follows `prefix` until `apply` returns `false`, resyncing after any failure.
pub async fn follow(client: Client, prefix: String, mut apply: impl FnMut(Update<'_>) -> bool) {
    loop {
        match follow_once(client.clone(), &prefix, &mut apply).await {
            Ok(()) => return,
            Err(e) => tracing::warn!(%prefix, error = %e, "watch interrupted; resyncing"),
        }
        tokio::time::sleep(RESYNC_BACKOFF).await;
    }
}

/// One snapshot and the watch after it. `Ok` when `apply` asked to stop.
async fn follow_once(
    mut client: Client,
    prefix: &str,
    apply: &mut impl FnMut(Update<'_>) -> bool,
) -> anyhow::Result<()> {
    let resp = client
        .get(prefix, Some(GetOptions::new().with_prefix()))
        .await?;
    let revision = resp.header().map(|h| h.revision()).unwrap_or(0);
    if !apply(Update::Reset {
        revision,
        kvs: resp.kvs(),
    }) {
        return Ok(());
    }
    let mut applied = revision;
    let options = WatchOptions::new()
        .with_prefix()
        .with_start_revision(revision + 1);
    let mut stream = client.watch(prefix, Some(options)).await?;
    while let Some(resp) = stream.message().await? {
        if resp.canceled() || resp.compact_revision() > 0 {
            anyhow::bail!(
                "watch cancelled (compact revision {}, reason {:?})",
                resp.compact_revision(),
                resp.cancel_reason()
            );
        }
        // etcd 3.4 can repeat events: anything at or below what is applied is old news.
        let events: Vec<&Event> = resp
            .events()
            .iter()
            .filter(|e| e.kv().is_some_and(|kv| kv.mod_revision() > applied))
            .collect();
        let Some(newest) = events
            .iter()
            .filter_map(|e| e.kv())
            .map(|kv| kv.mod_revision())
            .max()
        else {
            continue;
        };
        applied = newest;
        if !apply(Update::Events { events, newest }) {
            return Ok(());
        }
    }
    anyhow::bail!("watch stream ended")
}
