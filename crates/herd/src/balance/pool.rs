//! The endpoints of one channel as their probers see them: each discovered endpoint is probed
//! with a `grpc.health.v1.Health/Watch` stream over the connection its calls use, and offered to
//! the balancer only while it says SERVING.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use http::uri::Authority;
use rand::Rng;
use tokio::sync::watch;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tower::BoxError;

use super::subset::{subset, subset_alone};
use crate::client::Connector;
use crate::client::connection::Connection;
use crate::discovery::{Discovered, Endpoints};
use crate::error::{CallError, with_causes};

/// Backoff between probes of an endpoint that is not serving: starts here, doubles, capped below.
const PROBE_BACKOFF_START: Duration = Duration::from_millis(50);
const PROBE_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// How one discovered endpoint stands, as its prober last saw it.
#[derive(Clone)]
pub(super) enum State {
    /// Its first connection and health answer are still to come.
    Connecting,
    /// SERVING: offered to the balancer over this connection.
    Serving(Connection),
    /// It answered NOT_SERVING (starting, or draining).
    NotServing,
    /// Its connection failed or broke, for this reason. Like gRPC's TRANSIENT_FAILURE it stays
    /// so while the endpoint is probed again, until it answers SERVING.
    Unreachable(String),
}

/// Every discovered endpoint's state, by instance id, once discovery has answered.
#[derive(Clone, Default)]
pub(super) struct Pool {
    /// Whether discovery has answered at least once.
    pub(super) resolved: bool,
    pub(super) endpoints: BTreeMap<String, State>,
    /// Whether discovery knows instances beyond these (outside the caller's subset), which it
    /// refills from when these fail.
    pub(super) spare: bool,
}

impl Pool {
    /// Why no call can be served now and none should wait: no instance registered, or every
    /// known one failed. `None` while something may still come (discovery or a first connection
    /// pending, or an endpoint serving).
    pub(super) fn hopeless(&self, service: &Arc<str>) -> Option<CallError> {
        if !self.resolved {
            return None;
        }
        if self.endpoints.is_empty() {
            return Some(CallError::NoInstance {
                service: service.clone(),
            });
        }
        let (mut not_serving, mut unreachable, mut why) = (0, 0, None);
        for state in self.endpoints.values() {
            match state {
                State::Connecting | State::Serving(_) => return None,
                State::NotServing => not_serving += 1,
                State::Unreachable(reason) => {
                    unreachable += 1;
                    why.get_or_insert(reason.as_str());
                }
            }
        }
        if self.spare {
            // Every member failed: the subset is about to be refilled from the rest.
            return None;
        }
        let mut reasons = Vec::new();
        if not_serving > 0 {
            reasons.push(format!("{not_serving} not serving"));
        }
        if let Some(why) = why {
            reasons.push(format!("{unreachable} unreachable: {why}"));
        }
        Some(CallError::NoneServing {
            service: service.clone(),
            known: self.endpoints.len(),
            why: reasons.join("; "),
        })
    }
}

/// Completes once the pool says no call can be served (see [`Pool::hopeless`]).
pub(super) async fn hopeless(pool: &mut watch::Receiver<Pool>, service: &Arc<str>) -> CallError {
    let mut why = None;
    // The sender lives as long as the channel's tracker; if it is gone, keep waiting (the
    // caller's deadline bounds the call).
    if pool
        .wait_for(|p| {
            why = p.hopeless(service);
            why.is_some()
        })
        .await
        .is_err()
    {
        std::future::pending::<()>().await;
    }
    why.unwrap_or_else(|| CallError::NoInstance {
        service: service.clone(),
    })
}

/// Which of the discovered instances a channel connects to (see [`super::subset`]).
#[derive(Clone)]
pub(super) struct Subsetting {
    /// The calling instance's id.
    pub(super) own: String,
    /// The instances of the caller's own service: its rank among callers comes from them.
    /// `None` for a caller with no peers (one outside the mesh): its subset follows its own place
    /// on the ring.
    pub(super) peers: Option<watch::Receiver<Discovered>>,
    /// Instances per subset; 0: all.
    pub(super) size: usize,
}

/// The instance ids to connect to: every discovered one, or this caller's subset — refilled
/// from the rest, in the caller's order of preference, while fewer than half of its members
/// are healthy. `None` while the caller's peers are not known yet.
fn chosen(
    set: &Endpoints,
    subsetting: Option<(&Subsetting, Option<&Endpoints>)>,
    states: &Pool,
) -> Option<Vec<String>> {
    let Some((subsetting, peers)) = subsetting else {
        return Some(set.keys().cloned().collect());
    };
    let subset = match &subsetting.peers {
        None => subset_alone(
            &subsetting.own,
            set.keys().map(String::as_str),
            subsetting.size,
        ),
        Some(_) => subset(
            &subsetting.own,
            peers?.keys().map(String::as_str),
            set.keys().map(String::as_str),
            subsetting.size,
        ),
    };
    let failed = |id: &String| {
        matches!(
            states.endpoints.get(id),
            Some(State::NotServing | State::Unreachable(_))
        )
    };
    let mut healthy = subset.members().iter().filter(|id| !failed(id)).count();
    let mut take = subset.size;
    if healthy * 2 < subset.size {
        while take < subset.order.len() && healthy < subset.size {
            if !failed(&subset.order[take]) {
                healthy += 1;
            }
            take += 1;
        }
    }
    let mut order = subset.order;
    order.truncate(take);
    Some(order)
}

/// Keeps one prober per chosen endpoint (see [`chosen`]), until the channel is dropped.
pub(super) async fn track(
    service: String,
    connector: Arc<dyn Connector>,
    mut discovered: watch::Receiver<Discovered>,
    mut subsetting: Option<Subsetting>,
    pool: watch::Sender<Pool>,
) {
    let mut probers: HashMap<String, (String, tokio::task::JoinHandle<()>)> = HashMap::new();
    // Endpoint states matter to the choice only when refilling a subset.
    let mut states = pool.subscribe();
    let mut open = true;
    loop {
        let set = discovered.borrow_and_update().clone();
        let peers = subsetting
            .as_mut()
            .and_then(|s| s.peers.as_mut())
            .map(|p| p.borrow_and_update().clone());
        let choice = set.as_ref().and_then(|set| {
            let states = states.borrow_and_update();
            let subsetting = subsetting
                .as_ref()
                .map(|s| (s, peers.as_ref().and_then(Option::as_ref)));
            chosen(set, subsetting, &states)
        });
        if let (Some(set), Some(choice)) = (set, choice) {
            let gone: Vec<String> = probers
                .iter()
                .filter(|(id, (address, _))| {
                    !choice.contains(id) || set.get(id).map(|i| &i.address) != Some(address)
                })
                .map(|(id, _)| id.clone())
                .collect();
            for id in gone {
                if let Some((address, task)) = probers.remove(&id) {
                    task.abort();
                    let was_serving = pool.send_if_modified(|p| {
                        matches!(p.endpoints.remove(&id), Some(State::Serving(_)))
                    });
                    if was_serving {
                        let reason = if set.contains_key(&id) {
                            "left the subset"
                        } else {
                            "deregistered"
                        };
                        tracing::info!(%service, instance = %id, %address, reason, "endpoint removed");
                    }
                }
            }
            pool.send_if_modified(|p| {
                let spare = choice.len() < set.len();
                let mut changed = !p.resolved || p.spare != spare;
                p.resolved = true;
                p.spare = spare;
                for id in &choice {
                    if !p.endpoints.contains_key(id) {
                        p.endpoints.insert(id.clone(), State::Connecting);
                        changed = true;
                    }
                }
                changed
            });
            for id in &choice {
                let Some(info) = set.get(id) else { continue };
                if probers.contains_key(id) {
                    continue;
                }
                let task = tokio::spawn(probe(
                    service.clone(),
                    connector.clone(),
                    id.clone(),
                    info.address.clone(),
                    pool.clone(),
                ));
                probers.insert(id.clone(), (info.address.clone(), task));
            }
        }
        let refilling = subsetting.is_some();
        tokio::select! {
            // Closed: a fixed set, which will not change.
            changed = discovered.changed(), if open => open = changed.is_ok(),
            Ok(()) = peers_changed(&mut subsetting) => {}
            Ok(()) = states.changed(), if refilling => {}
            _ = pool.closed() => break,
        }
    }
    for (_, (_, task)) in probers {
        task.abort();
    }
}

/// Completes when the caller's peers change; never without peers to rank among.
async fn peers_changed(subsetting: &mut Option<Subsetting>) -> Result<(), watch::error::RecvError> {
    match subsetting.as_mut().and_then(|s| s.peers.as_mut()) {
        Some(peers) => peers.changed().await,
        None => std::future::pending().await,
    }
}

/// Watches one endpoint's health over the connection its calls use, and offers it to the balancer
/// only while it reports SERVING. A broken connection is replaced by a new one.
async fn probe(
    service: String,
    connector: Arc<dyn Connector>,
    id: String,
    address: String,
    pool: watch::Sender<Pool>,
) {
    let set = |state: State| {
        let mut was_serving = false;
        let changed = pool.send_if_modified(|p| {
            // The tracker removes an endpoint that discovery dropped; never bring it back.
            let Some(current) = p.endpoints.get_mut(&id) else {
                return false;
            };
            was_serving = matches!(current, State::Serving(_));
            let same = match (&*current, &state) {
                (State::Serving(old), State::Serving(new)) => old.generation == new.generation,
                (State::NotServing, State::NotServing) => true,
                (State::Unreachable(_), State::Unreachable(_)) => true,
                _ => false,
            };
            *current = state.clone();
            !same
        });
        match (&state, changed) {
            (State::Serving(_), true) => {
                tracing::info!(%service, instance = %id, %address, "endpoint added: serving");
            }
            (State::NotServing, true) if was_serving => {
                tracing::info!(%service, instance = %id, %address, reason = "not serving", "endpoint removed");
            }
            (State::Unreachable(why), true) if was_serving => {
                tracing::info!(%service, instance = %id, %address, reason = %why, "endpoint removed");
            }
            // Once per endpoint until it serves: a registration nothing can reach (its address
            // wrong, or its certificate not the identity of the service it claims to be).
            (State::Unreachable(why), true) => {
                tracing::warn!(%service, instance = %id, %address, reason = %why, "endpoint unreachable");
            }
            _ => {}
        }
    };
    let authority: Authority = match address.parse() {
        Ok(a) => a,
        Err(e) => {
            tracing::warn!(%service, instance = %id, %address, error = %e, "unusable endpoint address");
            set(State::Unreachable(format!("unusable address {address:?}")));
            return;
        }
    };
    let mut backoff = PROBE_BACKOFF_START;
    loop {
        match watch_health(&*connector, authority.clone(), &service).await {
            Ok((connection, mut stream)) => loop {
                match stream.message().await {
                    Ok(Some(r)) if r.status == ServingStatus::Serving as i32 => {
                        set(State::Serving(connection.clone()));
                        backoff = PROBE_BACKOFF_START;
                    }
                    Ok(Some(_)) => set(State::NotServing),
                    Ok(None) => {
                        set(State::Unreachable("health watch ended".into()));
                        break;
                    }
                    Err(e) => {
                        set(State::Unreachable(e.message().to_string()));
                        break;
                    }
                }
            },
            Err(e) => set(State::Unreachable(with_causes(&*e))),
        }
        let jitter = rand::rng().random_range(0.5..1.5);
        tokio::time::sleep(backoff.mul_f64(jitter)).await;
        backoff = (backoff * 2).min(PROBE_BACKOFF_MAX);
    }
}

/// A new connection to `authority` and the health Watch stream opened over it, for the service
/// the endpoint is registered as: an instance of another service answers NOT_FOUND, and is never
/// offered to the balancer.
async fn watch_health(
    connector: &dyn Connector,
    authority: Authority,
    service: &str,
) -> Result<
    (
        Connection,
        tonic::Streaming<tonic_health::pb::HealthCheckResponse>,
    ),
    BoxError,
> {
    let connection = Connection::open(connector, authority).await?;
    let stream = HealthClient::new(connection.clone())
        .watch(HealthCheckRequest {
            service: service.to_string(),
        })
        .await?
        .into_inner();
    Ok((connection, stream))
}
