//! herd's client side: unary calls over a balanced channel, retried within a budget, written on
//! HTTP/2 directly over a pluggable transport.
//!
//! - [`call`]: one call of a typed method: deadline forwarded, trace context carried, the message
//!   encoded once, not-processed failures retried within the channel's [`RetryBudget`].
//! - [`budget`]: gRPC A6's retry throttle.
//! - [`connector`]: the transport seam ([`Connector`]; [`TcpConnector`] by default).
//! - `connection`: one HTTP/2 connection on `h2`, with keepalive.
//! - `generated`: generated tonic clients' calls, unary ones retried as [`call`] retries.
//! - `unary`: framing a request and reading a unary response within a size limit.

pub mod budget;
pub(crate) mod connection;
pub mod connector;
pub(crate) mod generated;
pub(crate) mod unary;

use std::future::Future;
use std::time::Duration;

use bytes::Bytes;
use herd_proto::{Method, WithContext};
use http::uri::PathAndQuery;
use tonic::metadata::MetadataMap;
use tracing::Instrument;

pub use budget::RetryBudget;
pub use connector::{Connector, Io, TcpConnector};
pub use unary::{DEFAULT_MAX_RESPONSE, frame};

use crate::balance::MeshChannel;
use crate::context::Deadline;
use crate::error::CallError;
use connection::{Request, RequestBody};
use unary::{read_unary, unary_head};

/// Attempts of one call in all, first included, when the failure means "not processed".
const MAX_ATTEMPTS: u32 = 3;
/// Pause before a retry, so a restarting endpoint is not hammered.
const RETRY_PAUSE: Duration = Duration::from_millis(5);

/// A plain tonic endpoint for one fixed address (`host:port`): no discovery, balancing, health
/// watching or retries — for tools, tests and baselines that must reach one given instance (a
/// health probe of an instance that is draining, say), or that measure plain tonic. `tls` picks
/// `https://`, the caller adding its TLS configuration. Nagle's algorithm is off and connecting
/// is bounded as on herd's own channels; `.connect().await` gives the channel.
pub fn fixed_endpoint(
    address: &str,
    tls: bool,
) -> Result<tonic::transport::Endpoint, tonic::transport::Error> {
    let scheme = if tls { "https" } else { "http" };
    Ok(
        tonic::transport::Endpoint::from_shared(format!("{scheme}://{address}"))?
            .tcp_nodelay(true)
            .connect_timeout(connector::DEFAULT_CONNECT_TIMEOUT),
    )
}

/// Makes one unary call of `method` over `channel` with the remaining time as its timeout,
/// retrying only failures that mean the call was not processed (`UNAVAILABLE`), at most three
/// attempts in all, within the deadline and while the channel's retry budget allows. Each attempt
/// runs in its own `rpc.client` span whose trace context travels in the metadata and in the
/// message.
///
/// The message is encoded once; every attempt sends the same bytes (re-encoded only when a
/// sampled attempt must carry its own trace context), so a retry costs no copy of the message.
/// The call is written to the chosen endpoint's HTTP/2 connection directly and its response
/// read from it, without tonic's generic client machinery.
pub async fn call<Req, Res>(
    deadline: Deadline,
    channel: &MeshChannel,
    method: Method<Req, Res>,
    message: &Req,
) -> Result<Res, CallError>
where
    Req: prost::Message + Clone + WithContext,
    Res: prost::Message + Default,
{
    call_with(deadline, channel, method, message, &http::HeaderMap::new()).await
}

/// As [`call`], every attempt also sending `headers` (for example a caller's
/// `authorization: Bearer <token>` to a public service).
pub async fn call_with<Req, Res>(
    deadline: Deadline,
    channel: &MeshChannel,
    method: Method<Req, Res>,
    message: &Req,
    headers: &http::HeaderMap,
) -> Result<Res, CallError>
where
    Req: prost::Message + Clone + WithContext,
    Res: prost::Message + Default,
{
    // Cannot fail: `Method::new` admits only paths that parse.
    let path = PathAndQuery::from_static(method.path());
    attempts(
        deadline,
        channel.budget(),
        method.name(),
        message,
        |request| {
            let (metadata, extensions, frame) = request.into_parts();
            let mut head = unary_head(&path, metadata);
            for (name, value) in headers {
                head.headers.append(name, value.clone());
            }
            // The sampled attempt's span, to record the endpoint picked.
            head.extensions = extensions;
            let request = Request {
                head,
                body: RequestBody::Frame(frame),
            };
            async move {
                let response = channel.send(request).await?;
                let bytes = read_unary(response, channel.max_response()).await?;
                Res::decode(bytes).map_err(|e| CallError::Undecodable {
                    method: method.name(),
                    cause: e.to_string(),
                })
            }
        },
    )
    .await
}

/// Why an attempt that failed with a retryable error is not retried.
#[derive(Debug)]
enum NoRetry {
    /// The deadline has passed: the call fails with that.
    Expired(crate::error::Expired),
    /// [`MAX_ATTEMPTS`] were made.
    Spent,
    /// The retry budget does not allow one.
    Throttled,
    /// The deadline cannot afford the pause before it.
    NoTime,
}

/// Counts the failure of attempt `number` against `budget`, then how long to pause before the
/// next attempt — the instance's `pushback` (gRPC A6), or [`RETRY_PAUSE`] — or why there is none.
fn retry_after(
    number: u32,
    budget: &RetryBudget,
    pushback: Option<Duration>,
    deadline: Option<&Deadline>,
) -> Result<Duration, NoRetry> {
    budget.failure();
    if number >= MAX_ATTEMPTS {
        return Err(NoRetry::Spent);
    }
    if !budget.can_retry() {
        return Err(NoRetry::Throttled);
    }
    let pause = pushback.unwrap_or(RETRY_PAUSE);
    match deadline.map(Deadline::remaining) {
        Some(Err(expired)) => Err(NoRetry::Expired(expired)),
        Some(Ok(left)) if pause >= left => Err(NoRetry::NoTime),
        _ => Ok(pause),
    }
}

/// The retry loop of [`call`]; `attempt` sends one request, already a gRPC frame.
async fn attempts<Req, Res, F, Fut>(
    deadline: Deadline,
    budget: &RetryBudget,
    name: &'static str,
    message: &Req,
    mut attempt: F,
) -> Result<Res, CallError>
where
    Req: prost::Message + Clone + WithContext,
    F: FnMut(tonic::Request<Bytes>) -> Fut,
    Fut: Future<Output = Result<Res, CallError>>,
{
    // Encoded once, when first needed: a sampled attempt sends the message with its own trace
    // context instead.
    let mut encoded: Option<Bytes> = None;
    let mut number = 1;
    loop {
        let left = deadline.remaining()?;
        let mut metadata = MetadataMap::new();
        let (span, trace) = crate::telemetry::client_span(name, message.context(), &mut metadata);
        let body = match trace {
            None => encoded.get_or_insert_with(|| frame(message)).clone(),
            Some(trace) => {
                let mut traced = message.clone();
                if let Some(ctx) = traced.context_mut().as_mut() {
                    ctx.trace = Some(trace);
                }
                frame(&traced)
            }
        };
        AsMut::<http::HeaderMap>::as_mut(&mut metadata).insert(
            crate::context::GRPC_TIMEOUT,
            crate::context::grpc_timeout(left),
        );
        let mut request = tonic::Request::from_parts(metadata, Default::default(), body);
        if let Some(peer) = span.peer() {
            request.extensions_mut().insert(peer);
        }
        let measured = crate::metrics::on().then(|| {
            (
                std::time::Instant::now(),
                crate::metrics::attempt_in_flight(),
            )
        });
        let sent = attempt(request).instrument(span.log.clone());
        // Made for a served call whose door answers it by this deadline, the attempt is dropped
        // with the call's work then; a timer of its own would be one more per call, for nothing.
        let outcome = if crate::door::answers_by(deadline.instant()) {
            Ok(sent.await)
        } else {
            tokio::time::timeout(left, sent).await
        };
        let error = match outcome {
            Ok(Ok(response)) => {
                if let Some((started, _)) = measured {
                    crate::metrics::attempted(name, tonic::Code::Ok, started.elapsed());
                }
                crate::telemetry::client_result(span, None);
                budget.success();
                return Ok(response);
            }
            Ok(Err(error)) => error,
            Err(_) => CallError::DeadlineExceeded,
        };
        if let Some((started, _)) = measured {
            crate::metrics::attempted(name, error.code(), started.elapsed());
        }
        crate::telemetry::client_result(span, Some(&error));
        if !error.retryable() {
            return Err(error);
        }
        let pause = match retry_after(number, budget, error.pushback(), Some(&deadline)) {
            Ok(pause) => pause,
            Err(NoRetry::Throttled) => {
                crate::metrics::throttled(name);
                return Err(error);
            }
            Err(NoRetry::Expired(expired)) => return Err(expired.into()),
            Err(NoRetry::Spent | NoRetry::NoTime) => return Err(error),
        };
        tracing::debug!(attempt = number, %error, "retrying a call that was not processed");
        number += 1;
        crate::metrics::retried(name);
        tokio::time::sleep(pause).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::{Code, Status};

    fn msg() -> herd_proto::tax::ComputeTaxRequest {
        herd_proto::tax::ComputeTaxRequest::default()
    }

    #[tokio::test]
    async fn retries_only_unavailable() {
        let deadline = Deadline::after(Duration::from_secs(5));
        let mut tries = 0;
        let r: Result<(), CallError> =
            attempts(deadline, &RetryBudget::default(), "t.S/M", &msg(), |_| {
                tries += 1;
                async { Err(CallError::Refused(Status::unavailable("down"))) }
            })
            .await;
        assert_eq!(r.unwrap_err().code(), Code::Unavailable);
        assert_eq!(tries, 3);

        let mut tries = 0;
        let r: Result<(), CallError> =
            attempts(deadline, &RetryBudget::default(), "t.S/M", &msg(), |_| {
                tries += 1;
                async { Err(CallError::Refused(Status::invalid_argument("bad"))) }
            })
            .await;
        assert_eq!(r.unwrap_err().code(), Code::InvalidArgument);
        assert_eq!(tries, 1);
    }

    #[tokio::test]
    async fn a_retry_sends_the_same_bytes_with_the_same_trace_context() {
        let deadline = Deadline::after(Duration::from_secs(5));
        let mut message = msg();
        message.context = Some(herd_proto::context::RequestContext {
            tenant_id: "acme".into(),
            request_id: "r-1".into(),
            config_revision: 7,
            trace: Some(herd_proto::context::TraceContext {
                traceparent: "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00".into(),
                tracestate: String::new(),
            }),
            ..Default::default()
        });
        let mut sent: Vec<(Bytes, Option<String>)> = Vec::new();
        let answer: Result<(), CallError> = attempts(
            deadline,
            &RetryBudget::default(),
            "t.S/M",
            &message,
            |request| {
                let traceparent = request
                    .metadata()
                    .get("traceparent")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string);
                sent.push((request.into_inner(), traceparent));
                let last = sent.len() == 3;
                async move {
                    if last {
                        Ok(())
                    } else {
                        Err(CallError::Refused(Status::unavailable("down")))
                    }
                }
            },
        )
        .await;
        assert!(answer.is_ok());
        assert_eq!(sent.len(), 3);
        assert!(sent.iter().all(|s| *s == sent[0]), "{sent:?}");
        assert_eq!(sent[0].0, frame(&message));
        assert_eq!(
            sent[0].1.as_deref(),
            Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00")
        );
    }

    #[tokio::test]
    async fn the_budget_stops_retry_storms() {
        let budget = RetryBudget::default();
        let deadline = Deadline::after(Duration::from_secs(5));
        let mut tries = 0;
        for _ in 0..10 {
            let _: Result<(), CallError> = attempts(deadline, &budget, "t.S/M", &msg(), |_| {
                tries += 1;
                async { Err(CallError::Refused(Status::unavailable("down"))) }
            })
            .await;
        }
        // Three attempts while the budget lasts (half of ten tokens: the first call takes it
        // from 10 to 7, the second to 5, where retries stop), then one each.
        assert_eq!(tries, 3 + 2 + 8, "attempts for 10 calls");
        assert!(!budget.can_retry());
        for _ in 0..60 {
            budget.success();
        }
        assert!(budget.can_retry());
    }

    #[tokio::test]
    async fn retries_and_the_retries_the_budget_refused_are_counted() {
        let metrics = crate::metrics::for_tests();
        let budget = RetryBudget::default();
        let deadline = Deadline::after(Duration::from_secs(5));
        for _ in 0..4 {
            let _: Result<(), CallError> =
                attempts(deadline, &budget, "t.Retry/Counted", &msg(), |_| async {
                    Err(CallError::Refused(Status::unavailable("down")))
                })
                .await;
        }
        // Attempts 3, 2, 1, 1: three retries, then the budget refuses the next three.
        let total = |name| metrics.total(name, &[("rpc.method", "Counted")]);
        assert_eq!(total("rpc.client.duration"), 7.0);
        assert_eq!(total("herd.client.retries"), 3.0);
        assert_eq!(total("herd.client.retries_throttled"), 3.0);
    }

    #[tokio::test]
    async fn expired_deadline_refuses_work() {
        let deadline = Deadline::after(Duration::ZERO);
        let r: Result<(), CallError> = attempts(
            deadline,
            &RetryBudget::default(),
            "t.S/M",
            &msg(),
            |_| async { Ok(()) },
        )
        .await;
        assert_eq!(r.unwrap_err().code(), Code::DeadlineExceeded);
    }

    /// A shed answer, as the door writes it: UNAVAILABLE with a pushback of `millis`.
    fn shed(millis: u64) -> CallError {
        let mut status = Status::unavailable("overloaded: 8 calls in flight, the limit is 8");
        status
            .metadata_mut()
            .insert(crate::door::PUSHBACK, millis.to_string().parse().unwrap());
        CallError::refused(status)
    }

    #[tokio::test]
    async fn when_every_instance_sheds_attempts_stay_within_a_tenth_more_than_calls() {
        let budget = RetryBudget::default();
        let (mut calls, mut tries) = (0u32, 0u32);
        for i in 0..1000u32 {
            calls += 1;
            let deadline = Deadline::after(Duration::from_secs(5));
            // Nine in ten calls shed, the tenth served: a mesh at four times its capacity.
            let _: Result<(), CallError> = attempts(deadline, &budget, "t.S/M", &msg(), |_| {
                tries += 1;
                let served = (i + tries).is_multiple_of(10);
                async move { if served { Ok(()) } else { Err(shed(0)) } }
            })
            .await;
        }
        assert!(
            f64::from(tries) <= 1.1 * f64::from(calls),
            "{tries} attempts for {calls} calls"
        );
    }

    #[tokio::test]
    async fn a_shed_call_is_retried_after_its_pushback_and_not_past_its_deadline() {
        let budget = RetryBudget::default();
        let started = std::time::Instant::now();
        let mut tries = 0;
        let r: Result<(), CallError> = attempts(
            Deadline::after(Duration::from_secs(5)),
            &budget,
            "t.S/M",
            &msg(),
            |_| {
                tries += 1;
                async move { if tries < 2 { Err(shed(50)) } else { Ok(()) } }
            },
        )
        .await;
        assert!(r.is_ok());
        assert!(
            started.elapsed() >= Duration::from_millis(50),
            "{:?}",
            started.elapsed()
        );
        // A pushback the deadline cannot afford: no retry.
        let mut tries = 0;
        let r: Result<(), CallError> = attempts(
            Deadline::after(Duration::from_millis(30)),
            &budget,
            "t.S/M",
            &msg(),
            |_| {
                tries += 1;
                async { Err(shed(100)) }
            },
        )
        .await;
        assert_eq!(r.unwrap_err().pushback(), Some(Duration::from_millis(100)));
        assert_eq!(tries, 1);
    }
}
