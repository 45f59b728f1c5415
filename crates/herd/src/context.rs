//! Request contexts and deadlines: what travels with every call.
//!
//! Every hop reads the caller's `grpc-timeout` into a [`Deadline`], refuses work whose deadline has
//! passed, and forwards the remaining time on each outgoing call (never the incoming metadata).

use std::future::Future;
use std::time::Duration;

use bytes::Bytes;
use herd_proto::context::RequestContext;
use herd_proto::{Method, WithContext};
use http::uri::PathAndQuery;
use tokio::time::Instant;
use tonic::metadata::MetadataMap;
use tracing::Instrument;

use crate::balance::{MeshChannel, RetryBudget};
use crate::connection::{Outgoing, OutgoingBody, frame, read_unary, unary_head};
use crate::error::{CallError, ContextError, Expired};
use crate::telemetry::PeerSpan;

/// Attempts of one call in all, first included, when the failure means "not processed".
const MAX_ATTEMPTS: u32 = 3;
/// Pause before a retry, so a restarting endpoint is not hammered.
const RETRY_PAUSE: Duration = Duration::from_millis(5);

/// The point in time by which a call must be answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Deadline(Instant);

impl Deadline {
    /// The deadline `timeout` from now.
    pub fn after(timeout: Duration) -> Self {
        Self(Instant::now() + timeout)
    }

    /// The caller's deadline from its `grpc-timeout` header, or `default` from now without one.
    pub fn from_metadata(metadata: &MetadataMap, default: Duration) -> Self {
        let timeout = metadata
            .get("grpc-timeout")
            .and_then(|v| v.to_str().ok())
            .and_then(parse_grpc_timeout)
            .unwrap_or(default);
        Self::after(timeout)
    }

    /// Time left, or [`Expired`] (`DEADLINE_EXCEEDED`) when none is.
    pub fn remaining(&self) -> Result<Duration, Expired> {
        let left = self.0.saturating_duration_since(Instant::now());
        if left.is_zero() {
            Err(Expired)
        } else {
            Ok(left)
        }
    }
}

/// Parses a `grpc-timeout` value: up to 8 digits and a unit (H, M, S, m, u, n).
pub fn parse_grpc_timeout(value: &str) -> Option<Duration> {
    if value.len() < 2 || value.len() > 9 {
        return None;
    }
    let (digits, unit) = value.split_at(value.len() - 1);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.checked_mul(3600)?),
        "M" => Duration::from_secs(n.checked_mul(60)?),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// The context of a request, or what is missing from it (`INVALID_ARGUMENT` naming the field).
pub fn require(context: Option<&RequestContext>) -> Result<&RequestContext, ContextError> {
    let ctx = context.ok_or(ContextError::Missing)?;
    if ctx.tenant_id.trim().is_empty() {
        return Err(ContextError::NoTenant);
    }
    Ok(ctx)
}

/// Makes one unary call of `method` over `channel` with the remaining time as its timeout,
/// retrying only failures that mean the call was not processed (`UNAVAILABLE`), at most three
/// attempts in all, within the deadline and while the channel's retry budget allows. Each attempt
/// runs in its own `rpc.client` span whose trace context travels in the metadata and in the
/// message.
///
/// The message is encoded once; every attempt sends the same bytes (re-encoded only when a
/// sampled attempt must carry its own trace context), so a retry costs no copy of the message.
/// The call is written to the chosen endpoint's HTTP/2 connection directly and its answer read
/// from it, without tonic's generic client machinery.
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
            // The sampled attempt's span, to record the endpoint picked.
            head.extensions = extensions;
            let request = Outgoing {
                head,
                body: OutgoingBody::Frame(frame),
            };
            async move {
                let answer = channel.send(request).await?;
                let bytes = read_unary(answer).await?;
                Res::decode(bytes).map_err(|e| CallError::Undecodable {
                    method: method.name(),
                    cause: e.to_string(),
                })
            }
        },
    )
    .await
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
    let encoded = frame(message);
    let mut number = 1;
    loop {
        let left = deadline.remaining()?;
        let mut metadata = MetadataMap::new();
        let (span, trace) = crate::telemetry::client_span(name, message.context(), &mut metadata);
        let sampled = trace.is_some();
        let body = match trace {
            None => encoded.clone(),
            Some(trace) => {
                let mut traced = message.clone();
                if let Some(ctx) = traced.context_mut().as_mut() {
                    ctx.trace = Some(trace);
                }
                frame(&traced)
            }
        };
        let mut request = tonic::Request::from_parts(metadata, Default::default(), body);
        request.set_timeout(left);
        if sampled {
            request.extensions_mut().insert(PeerSpan(span.clone()));
        }
        let outcome = tokio::time::timeout(left, attempt(request).instrument(span.clone())).await;
        let error = match outcome {
            Ok(Ok(response)) => {
                crate::telemetry::client_result(&span, None);
                budget.success();
                return Ok(response);
            }
            Ok(Err(error)) => error,
            Err(_) => CallError::DeadlineExceeded,
        };
        crate::telemetry::client_result(&span, Some(&error));
        if !error.retryable() {
            return Err(error);
        }
        budget.failure();
        if number >= MAX_ATTEMPTS || !budget.can_retry() {
            return Err(error);
        }
        tracing::debug!(attempt = number, %error, "retrying a call that was not processed");
        number += 1;
        tokio::time::sleep(RETRY_PAUSE.min(deadline.remaining()?)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::{Code, Status};

    fn msg() -> herd_proto::tax::ComputeTaxRequest {
        herd_proto::tax::ComputeTaxRequest::default()
    }

    #[test]
    fn parses_grpc_timeouts() {
        assert_eq!(parse_grpc_timeout("100m"), Some(Duration::from_millis(100)));
        assert_eq!(parse_grpc_timeout("2S"), Some(Duration::from_secs(2)));
        assert_eq!(parse_grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_grpc_timeout("5"), None);
        assert_eq!(parse_grpc_timeout("123456789S"), None);
        assert_eq!(parse_grpc_timeout("10x"), None);
    }

    #[test]
    fn context_needs_a_tenant() {
        assert_eq!(require(None).unwrap_err().to_string(), "context: required");
        let ctx = RequestContext::default();
        assert!(
            require(Some(&ctx))
                .unwrap_err()
                .to_string()
                .contains("context.tenant_id")
        );
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
        // Three attempts while the budget lasts (half of ten tokens), then one each.
        assert!(tries < 20, "{tries} attempts for 10 calls");
        assert!(!budget.can_retry());
        for _ in 0..60 {
            budget.success();
        }
        assert!(budget.can_retry());
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
}
