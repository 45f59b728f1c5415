//! Registration of an instance in etcd under a lease that is kept alive in the background.
//!
//! The lease is renewed every TTL/3. When renewing fails — a keepalive answer with TTL 0, the
//! keepalive stream breaking, or no good answer within one TTL — the instance reports itself
//! unregistered and tries again, with jittered backoff, for as long as it lives: first to renew
//! the same lease (etcd does not expire leases while it has no leader, and extends them when a new
//! one is elected, so after an election or a lost quorum the lease is usually still there, and
//! with it the key: callers never see the instance leave), and only when etcd says the lease is
//! gone, to grant a new one and put the key again. A key deleted by someone else is put back.
//! Deregistering revokes the lease, which deletes the key at once.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use etcd_client::{Client, EventType, PutOptions, Txn, TxnOp, WatchOptions};
use rand::Rng;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::{Instant, MissedTickBehavior};

use crate::error::{EtcdError, LeaseLost};
use crate::instance::InstanceInfo;
use crate::watch::{Watch, Watches};

/// Bound on one etcd call made while registering or deregistering.
const CALL_TIMEOUT: Duration = Duration::from_secs(3);
/// Backoff between attempts to register again: starts here, doubles, capped below (so that an
/// instance is registered again within about a second of etcd's quorum returning).
const BACKOFF_START: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_millis(250);
/// Bound on one attempt to renew a lease that could not be kept alive: while etcd has no quorum
/// the attempt hangs, and the next one must not wait behind it.
const RENEW_TIMEOUT: Duration = Duration::from_millis(500);
/// While registering again keeps failing, a line at most this often (with the attempts so far).
const FAILURES_LOGGED_EVERY: Duration = Duration::from_secs(10);
/// Tries at starting the keepalive stream before the registration counts as lost.
const START_TRIES: u32 = 3;

/// A live registration. Dropping it stops renewal without revoking (the key then expires with its
/// lease); call [`Registration::deregister`] to leave at once.
pub struct Registration {
    state: Arc<State>,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
    client: Client,
}

struct State {
    key: String,
    value: String,
    /// Further keys that live and die with the registration (for example the config status).
    extras: Mutex<BTreeMap<String, String>>,
    lease: AtomicI64,
    registered: watch::Sender<bool>,
}

impl Registration {
    /// Registers `info` under `key` with a lease of `ttl` seconds, then keeps it registered in the
    /// background. Fails if the first registration fails. Watches its key on a watch stream of
    /// its own.
    pub async fn start(
        client: Client,
        key: String,
        info: &InstanceInfo,
        ttl: i64,
    ) -> Result<Self, EtcdError> {
        Self::start_on(&Watches::new(client), key, info, ttl).await
    }

    /// As [`Registration::start`], watching its key on `watches`' stream (the instance's own).
    pub async fn start_on(
        watches: &Watches,
        key: String,
        info: &InstanceInfo,
        ttl: i64,
    ) -> Result<Self, EtcdError> {
        let client = watches.client().clone();
        // Cannot fail: the record is strings and numbers.
        let value = serde_json::to_string(info).unwrap_or_default();
        let state = Arc::new(State {
            key,
            value,
            extras: Mutex::new(BTreeMap::new()),
            lease: AtomicI64::new(0),
            registered: watch::Sender::new(false),
        });
        let granted = register_once(&client, &state, ttl).await?;
        let (stop, stop_rx) = watch::channel(false);
        let task = tokio::spawn(maintain(
            watches.clone(),
            state.clone(),
            ttl,
            granted,
            stop_rx,
        ));
        Ok(Self {
            state,
            stop,
            task,
            client,
        })
    }

    /// Whether the key is in etcd under a live lease, as far as this instance knows.
    pub fn is_registered(&self) -> bool {
        *self.state.registered.borrow()
    }

    /// Follows whether the instance is registered.
    pub fn subscribe(&self) -> watch::Receiver<bool> {
        self.state.registered.subscribe()
    }

    /// The current lease id (0 while none is held).
    pub fn lease_id(&self) -> i64 {
        self.state.lease.load(Ordering::Acquire)
    }

    /// Puts `key` = `value` under the registration's lease now and after every re-registration, so
    /// that it disappears with the instance.
    pub async fn publish(&self, key: String, value: String) -> Result<(), etcd_client::Error> {
        if let Ok(mut extras) = self.state.extras.lock() {
            extras.insert(key.clone(), value.clone());
        }
        let lease = self.lease_id();
        if lease == 0 {
            return Ok(());
        }
        let mut client = self.client.clone();
        client
            .put(key, value, Some(PutOptions::new().with_lease(lease)))
            .await
            .map(|_| ())
    }

    /// Stops renewal and revokes the lease, which removes the key. Bounded in time.
    pub async fn deregister(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
        let lease = self.state.lease.swap(0, Ordering::AcqRel);
        self.state.registered.send_replace(false);
        if lease == 0 {
            return;
        }
        let mut client = self.client.clone();
        match tokio::time::timeout(CALL_TIMEOUT, client.lease_revoke(lease)).await {
            Ok(Ok(_)) => tracing::info!(key = %self.state.key, "deregistered"),
            Ok(Err(e)) => {
                tracing::warn!(key = %self.state.key, error = %e, "revoking lease failed; deleting key");
                let _ = tokio::time::timeout(
                    CALL_TIMEOUT,
                    client.delete(self.state.key.as_str(), None),
                )
                .await;
            }
            Err(_) => {
                tracing::warn!(key = %self.state.key, "revoking lease timed out; key expires with its lease")
            }
        }
    }
}

/// One transaction putting the key and its extras under `lease`.
fn puts(state: &State, lease: i64) -> Txn {
    let with_lease = || Some(PutOptions::new().with_lease(lease));
    let mut ops = vec![TxnOp::put(
        state.key.as_str(),
        state.value.as_str(),
        with_lease(),
    )];
    if let Ok(extras) = state.extras.lock() {
        ops.extend(
            extras
                .iter()
                .map(|(k, v)| TxnOp::put(k.as_str(), v.as_str(), with_lease())),
        );
    }
    Txn::new().and_then(ops)
}

/// Grants a lease and puts the key under it. Returns the granted TTL.
async fn register_once(client: &Client, state: &State, ttl: i64) -> Result<i64, EtcdError> {
    let mut client = client.clone();
    let grant = tokio::time::timeout(CALL_TIMEOUT, client.lease_grant(ttl, None))
        .await
        .map_err(|_| EtcdError::Timeout(CALL_TIMEOUT))??;
    let lease = grant.id();
    tokio::time::timeout(CALL_TIMEOUT, client.txn(puts(state, lease)))
        .await
        .map_err(|_| EtcdError::Timeout(CALL_TIMEOUT))??;
    state.lease.store(lease, Ordering::Release);
    state.registered.send_replace(true);
    tracing::info!(key = %state.key, lease = format!("{lease:x}"), ttl = grant.ttl(), "registered");
    Ok(grant.ttl().max(1))
}

async fn maintain(
    watches: Watches,
    state: Arc<State>,
    ttl: i64,
    mut granted: i64,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let lost = tokio::select! {
            _ = stop.changed() => return,
            reason = keep_alive(&watches, &state, granted) => reason,
        };
        if *stop.borrow() {
            return;
        }
        state.registered.send_replace(false);
        tracing::warn!(key = %state.key, reason = %lost, "registration lost; registering again");
        let mut backoff = BACKOFF_START;
        let (mut failed, mut logged) = (0u64, None);
        loop {
            let jitter = rand::rng().random_range(0.5..1.5);
            tokio::select! {
                _ = stop.changed() => return,
                _ = tokio::time::sleep(backoff.mul_f64(jitter)) => {}
            }
            let again = match renew(watches.client(), &state).await {
                Renewed::Alive(t) => Ok(t),
                Renewed::Gone => register_once(watches.client(), &state, ttl).await,
                Renewed::Failed(e) => Err(e),
            };
            match again {
                Ok(t) => {
                    granted = t;
                    break;
                }
                Err(e) => {
                    // The first failure, then one line per interval with how many there were:
                    // an outage of minutes must not write a line per attempt.
                    failed += 1;
                    if logged.is_none_or(|at: Instant| at.elapsed() >= FAILURES_LOGGED_EVERY) {
                        tracing::warn!(key = %state.key, error = %e, attempts = failed, "registering again failed");
                        logged = Some(Instant::now());
                    }
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                }
            }
        }
    }
}

/// What an attempt to renew the current lease found.
enum Renewed {
    /// The lease is alive again, with this TTL; its keys are in place.
    Alive(i64),
    /// etcd says the lease is gone: a new one is needed.
    Gone,
    /// etcd could not say (no quorum, unreachable): try again later.
    Failed(EtcdError),
}

/// Renews the current lease once and, if it is alive, puts its keys again (in case they were
/// deleted meanwhile; unchanged values are a no-op for watchers that compare them).
async fn renew(client: &Client, state: &State) -> Renewed {
    let lease = state.lease.load(Ordering::Acquire);
    if lease == 0 {
        return Renewed::Gone;
    }
    let mut client = client.clone();
    let attempt = async {
        let (mut keeper, mut responses) = client.lease_keep_alive(lease).await?;
        keeper.keep_alive().await?;
        responses.message().await
    };
    let ttl = match tokio::time::timeout(RENEW_TIMEOUT, attempt).await {
        Err(_) => return Renewed::Failed(EtcdError::Timeout(RENEW_TIMEOUT)),
        // etcd-client's word for a first answer with TTL 0: the lease is not there.
        Ok(Err(etcd_client::Error::LeaseKeepAliveError(_))) => return Renewed::Gone,
        Ok(Err(e)) => return Renewed::Failed(e.into()),
        Ok(Ok(None)) => {
            return Renewed::Failed(EtcdError::Unavailable(
                "the keepalive stream ended unanswered".into(),
            ));
        }
        Ok(Ok(Some(answer))) if answer.ttl() <= 0 => return Renewed::Gone,
        Ok(Ok(Some(answer))) => answer.ttl(),
    };
    // The keepalive answered: the lease, and the keys under it, live on — registered from now.
    state.registered.send_replace(true);
    tracing::info!(key = %state.key, lease = format!("{lease:x}"), ttl, "registered again on the same lease");
    // Putting the keys again only restores one deleted meanwhile; it is tried once, briefly (each
    // etcd call goes to the next member, and one that has just come back may not answer yet),
    // and its failure does not undo the renewal: a deletion seen from now on is put back by the
    // key watch.
    let put = tokio::time::timeout(RENEW_TIMEOUT, client.txn(puts(state, lease))).await;
    if let Some(why) = match put {
        Ok(Ok(_)) => None,
        Ok(Err(e)) => Some(e.to_string()),
        Err(_) => Some(format!("no answer within {RENEW_TIMEOUT:?}")),
    } {
        tracing::debug!(key = %state.key, error = %why, "keys not put again after renewing");
    }
    Renewed::Alive(ttl.max(1))
}

/// Keeps the current lease alive and the key present; returns why the registration was lost.
async fn keep_alive(watches: &Watches, state: &State, ttl: i64) -> LeaseLost {
    let client = watches.client().clone();
    let mut client = client.clone();
    let lease = state.lease.load(Ordering::Acquire);
    let ttl = Duration::from_secs(ttl as u64);
    // A member that has just come back may take connections before it answers: a few short
    // tries (each goes to the next member) rather than one that waits on it.
    let mut tries = 0;
    let (mut keeper, mut responses) = loop {
        tries += 1;
        match tokio::time::timeout(RENEW_TIMEOUT, client.lease_keep_alive(lease)).await {
            Ok(Ok(pair)) => break pair,
            Ok(Err(e)) if tries >= START_TRIES => {
                return LeaseLost::Stream(format!("could not start: {e}"));
            }
            Err(_) if tries >= START_TRIES => {
                return LeaseLost::Stream(format!(
                    "could not start: no answer within {RENEW_TIMEOUT:?}, {START_TRIES} times"
                ));
            }
            // etcd says the lease is gone: no use trying again.
            Ok(Err(e @ etcd_client::Error::LeaseKeepAliveError(_))) => {
                return LeaseLost::Stream(format!("could not start: {e}"));
            }
            _ => continue,
        }
    };
    // Someone deleting the key (by hand or by tooling) must not leave the instance unlisted.
    let mut key_watch = watches
        .watch(state.key.as_str(), WatchOptions::new())
        .await
        .ok();
    let mut tick = tokio::time::interval(ttl / 3);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut last_good = Instant::now();
    loop {
        tokio::select! {
            _ = tick.tick() => {
                if last_good.elapsed() >= ttl {
                    return LeaseLost::Silent;
                }
                if let Err(e) = keeper.keep_alive().await {
                    return LeaseLost::Stream(format!("send failed: {e}"));
                }
            }
            msg = responses.message() => match msg {
                Ok(Some(r)) if r.ttl() > 0 => last_good = Instant::now(),
                Ok(Some(_)) => return LeaseLost::Expired,
                Ok(None) => return LeaseLost::Stream("ended".into()),
                Err(e) => return LeaseLost::Stream(format!("broke: {e}")),
            },
            msg = next_watch(&mut key_watch) => match msg {
                Some(deleted) if deleted => {
                    tracing::warn!(key = %state.key, "registration key deleted by someone else; putting it back");
                    let put = client.put(state.key.as_str(), state.value.as_str(), Some(PutOptions::new().with_lease(lease)));
                    if let Err(e) = tokio::time::timeout(CALL_TIMEOUT, put).await.map_err(|e| e.to_string()).and_then(|r| r.map_err(|e| e.to_string())) {
                        return LeaseLost::KeyNotRestored(e);
                    }
                }
                Some(_) => {}
                None => key_watch = None,
            },
        }
    }
}

/// The next key-watch answer: `Some(true)` when it deleted the key, `Some(false)` otherwise, `None`
/// when the watch broke. Pending forever without a watch.
async fn next_watch(watch: &mut Option<Watch>) -> Option<bool> {
    let Some(w) = watch.as_mut() else {
        return std::future::pending().await;
    };
    match w.message().await {
        Ok(Some(resp)) => Some(
            resp.events()
                .iter()
                .any(|e| e.event_type() == EventType::Delete),
        ),
        _ => None,
    }
}
