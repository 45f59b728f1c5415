//! Following every key under an etcd prefix: a snapshot, then a watch from the next revision; a
//! compacted, cancelled or broken watch leads to a fresh snapshot. Events that etcd 3.4 repeats are
//! dropped, so consumers see each change once and in order.
//!
//! Every watch of one instance goes over one etcd Watch stream ([`Watches`]), as etcd's Go client
//! shares one stream among a client's watchers: etcd keeps goroutines and buffers for each stream
//! (tens of KiB), and an instance watches its configuration, its own registration, its own
//! service and every service it calls.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use etcd_client::{Client, Event, GetOptions, KeyValue, WatchOptions, WatchResponse, WatchStream};
use tokio::sync::{mpsc, oneshot};

use crate::error::EtcdError;

/// Bound on opening the shared stream.
const OPEN_TIMEOUT: Duration = Duration::from_secs(3);

/// One instance's watches, all on one etcd Watch stream, opened at the first watch and again
/// after it breaks. Clones share the stream.
#[derive(Clone)]
pub struct Watches {
    client: Client,
    commands: mpsc::UnboundedSender<Command>,
}

impl std::fmt::Debug for Watches {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watches").finish_non_exhaustive()
    }
}

enum Command {
    Watch {
        key: Vec<u8>,
        options: WatchOptions,
        token: u64,
        to: mpsc::UnboundedSender<Result<WatchResponse, String>>,
        sent: oneshot::Sender<Result<(), EtcdError>>,
    },
    Drop {
        token: u64,
    },
}

/// One watch on the shared stream: its responses, the first saying it was created. Dropping it
/// cancels the watch.
pub struct Watch {
    token: u64,
    responses: mpsc::UnboundedReceiver<Result<WatchResponse, String>>,
    commands: mpsc::UnboundedSender<Command>,
}

impl Watch {
    /// The next response; `None` once the watch is cancelled, an error once the stream broke.
    pub async fn message(&mut self) -> Result<Option<WatchResponse>, EtcdError> {
        match self.responses.recv().await {
            Some(Ok(response)) => Ok(Some(response)),
            Some(Err(why)) => Err(EtcdError::Unavailable(why)),
            None => Ok(None),
        }
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        let _ = self.commands.send(Command::Drop { token: self.token });
    }
}

impl Watches {
    /// Watches over `client`; the stream is opened at the first watch. Must be called within a
    /// tokio runtime; the stream lives while a clone of this or a [`Watch`] does.
    pub fn new(client: Client) -> Self {
        let (commands, rx) = mpsc::unbounded_channel();
        tokio::spawn(hub(client.clone(), rx));
        Self { client, commands }
    }

    /// The client the watches are made with, for reads beside them.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Starts watching `key` with `options` on the shared stream.
    pub async fn watch(
        &self,
        key: impl Into<Vec<u8>>,
        options: WatchOptions,
    ) -> Result<Watch, EtcdError> {
        static TOKENS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let token = TOKENS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (to, responses) = mpsc::unbounded_channel();
        let (sent, answer) = oneshot::channel();
        let watch = Watch {
            token,
            responses,
            commands: self.commands.clone(),
        };
        self.commands
            .send(Command::Watch {
                key: key.into(),
                options,
                token,
                to,
                sent,
            })
            .map_err(|_| EtcdError::WatchEnded)?;
        answer.await.map_err(|_| EtcdError::WatchEnded)??;
        Ok(watch)
    }
}

/// A watch asked for, or created: where its responses go.
struct Subscriber {
    token: u64,
    to: mpsc::UnboundedSender<Result<WatchResponse, String>>,
}

/// Owns the shared stream: sends create and cancel requests on it, and hands each response to the
/// watch it names. etcd answers create requests in the order it gets them, so the next `created`
/// answer is for the oldest create still unanswered.
async fn hub(mut client: Client, mut commands: mpsc::UnboundedReceiver<Command>) {
    let mut stream: Option<WatchStream> = None;
    let mut pending: VecDeque<Subscriber> = VecDeque::new();
    let mut active: HashMap<i64, Subscriber> = HashMap::new();
    loop {
        tokio::select! {
            command = commands.recv() => match command {
                None => return,
                Some(Command::Watch { key, options, token, to, sent }) => {
                    let result = match stream.as_mut() {
                        Some(open) => open.watch(key, Some(options)).await.map_err(EtcdError::from),
                        None => match tokio::time::timeout(OPEN_TIMEOUT, client.watch(key, Some(options))).await {
                            Ok(Ok(open)) => {
                                stream = Some(open);
                                Ok(())
                            }
                            Ok(Err(e)) => Err(EtcdError::from(e)),
                            Err(_) => Err(EtcdError::Timeout(OPEN_TIMEOUT)),
                        },
                    };
                    if result.is_ok() {
                        pending.push_back(Subscriber { token, to });
                    }
                    let _ = sent.send(result);
                }
                Some(Command::Drop { token }) => {
                    let id = active.iter().find(|(_, s)| s.token == token).map(|(id, _)| *id);
                    if let (Some(id), Some(open)) = (id, stream.as_mut()) {
                        active.remove(&id);
                        let _ = open.cancel(id).await;
                    }
                    // Still pending: its sender is closed, and it is cancelled once created.
                }
            },
            response = next(&mut stream) => match response {
                Ok(Some(response)) => {
                    let id = response.watch_id();
                    if response.created() {
                        let Some(subscriber) = pending.pop_front() else { continue };
                        if response.canceled() {
                            let _ = subscriber.to.send(Ok(response));
                        } else if subscriber.to.send(Ok(response)).is_ok() {
                            active.insert(id, subscriber);
                        } else if let Some(open) = stream.as_mut() {
                            let _ = open.cancel(id).await;
                        }
                    } else if let Some(subscriber) = active.get(&id) {
                        let canceled = response.canceled();
                        let delivered = subscriber.to.send(Ok(response)).is_ok();
                        if canceled || !delivered {
                            active.remove(&id);
                        }
                        if !canceled && !delivered && let Some(open) = stream.as_mut() {
                            let _ = open.cancel(id).await;
                        }
                    }
                }
                broken => {
                    let why = match broken {
                        Err(e) => format!("watch stream broke: {e}"),
                        _ => "watch stream ended".to_string(),
                    };
                    for subscriber in pending.drain(..).chain(active.drain().map(|(_, s)| s)) {
                        let _ = subscriber.to.send(Err(why.clone()));
                    }
                    stream = None;
                }
            },
        }
    }
}

/// The next response on the stream; pending forever while there is none.
async fn next(
    stream: &mut Option<WatchStream>,
) -> Result<Option<WatchResponse>, etcd_client::Error> {
    match stream.as_mut() {
        Some(open) => open.message().await,
        None => std::future::pending().await,
    }
}

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
    watches: Watches,
    prefix: String,
    /// The watch after the last snapshot, and the newest revision passed on from it.
    watching: Option<(Watch, i64)>,
}

impl Follower {
    /// A follower of `prefix`, watching on `watches`' stream; nothing is read until the first
    /// [`Follower::next`].
    pub fn new(watches: Watches, prefix: String) -> Self {
        Self {
            watches,
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
                Err(e) if crate::server::stopping() => {
                    // The instance is letting go of its etcd client: expected, not a failure.
                    tracing::debug!(prefix = %self.prefix, error = %e, "watch ended while stopping");
                    tokio::time::sleep(RESYNC_BACKOFF).await;
                }
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
            .watches
            .client()
            .clone()
            .get(self.prefix.as_str(), Some(GetOptions::new().with_prefix()))
            .await?;
        let revision = resp.header().map(|h| h.revision()).unwrap_or(0);
        let options = WatchOptions::new()
            .with_prefix()
            .with_start_revision(revision + 1);
        let stream = self.watches.watch(self.prefix.as_str(), options).await?;
        self.watching = Some((stream, revision));
        Ok(Update::Reset {
            revision,
            kvs: resp.take_kvs(),
        })
    }

    /// The next batch of new events from the watch; keeps the watch unless it failed.
    async fn changes(&mut self, mut stream: Watch, applied: i64) -> Result<Update, EtcdError> {
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
