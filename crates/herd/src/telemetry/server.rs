//! The `rpc.server` span every call runs in: parented on the caller's trace, sampled at the head,
//! carrying the RPC conventions' attributes and herd's, and the status the call ends with.

use std::cell::RefCell;
use std::future::Future;

use herd_proto::WithContext;
use herd_proto::context::{RequestContext, TraceContext};
use opentelemetry::trace::{
    Span as _, SpanContext, SpanId, SpanKind, Status, TraceContextExt, TraceFlags, TraceId,
    TraceState, Tracer as _,
};
use opentelemetry::{Context, KeyValue};
use tracing::Instrument;

use super::SAMPLING;
use super::budget::LogBudget;
use super::propagation::{SERVING, Serving, parent_of, record_late, split_method, traceparent};
use super::sampling::SamplingRatio;

/// Runs one server call of `path` (`package.Service/Method`) inside its `rpc.server` span,
/// parented on the caller's trace context, recording the status it ends with.
pub async fn serve<Req, Res, F, Fut>(
    path: &'static str,
    mut request: tonic::Request<Req>,
    handler: F,
) -> Result<tonic::Response<Res>, tonic::Status>
where
    Req: WithContext,
    F: FnOnce(tonic::Request<Req>) -> Fut,
    Fut: Future<Output = Result<tonic::Response<Res>, tonic::Status>>,
{
    let started = crate::metrics::on().then(std::time::Instant::now);
    let (service, method) = split_method(path);
    // A served instance's connections carry `PeerInfo`; tonic's own info otherwise.
    let peer = request.extensions().get::<crate::tls::PeerInfo>();
    let local = match peer {
        Some(peer) => peer.local,
        None => request.local_addr(),
    };
    // The caller's identity, from its certificate (over mutual TLS).
    let caller = peer.and_then(|p| p.identity.clone());
    let tracer = super::TRACER.get();
    let parent = match tracer {
        Some(_) => parent_of(request.metadata(), request.get_ref().context()),
        None => None,
    };
    // Head sampling, decided before any span is made: a caller's decision is followed; a new
    // trace is sampled at the configured ratio.
    let sampled = tracer.is_some()
        && match &parent {
            Some(parent) => parent.is_sampled(),
            None => rand::random::<f64>() < SAMPLING.get().map_or(1.0, SamplingRatio::get),
        };
    // The span logs are written in; exported spans are made apart, below.
    let span = tracing::info_span!(
        target: "herd::rpc",
        "rpc.server",
        otel.name = path,
        otel.kind = "server",
        rpc.system = "grpc",
        rpc.service = service,
        rpc.method = method,
        rpc.grpc.status_code = tracing::field::Empty,
        server.address = local.map(|a| a.ip().to_string()).unwrap_or_default(),
        server.port = local.map(|a| i64::from(a.port())).unwrap_or_default(),
        herd.caller = tracing::field::Empty,
        herd.tenant = tracing::field::Empty,
        herd.request_id = tracing::field::Empty,
        herd.config_revision = tracing::field::Empty,
        herd.quote_id = tracing::field::Empty,
        trace_id = tracing::field::Empty,
        span_id = tracing::field::Empty,
    );
    if let Some(caller) = &caller {
        span.record("herd.caller", &**caller);
    }
    let context = request.get_ref().context();
    if let Some(ctx) = context {
        record_on(&span, ctx);
    }
    let result = match tracer {
        Some(tracer) if sampled => {
            let mut exported = start_server_span(tracer, path, local, caller.as_deref(), parent);
            let own = exported.span_context().clone();
            if !span.is_disabled() {
                span.record("trace_id", own.trace_id().to_string());
                span.record("span_id", own.span_id().to_string());
            }
            let mut late = Vec::new();
            if let Some(ctx) = context {
                context_attributes(ctx, &mut late);
            }
            let serving = Serving {
                context: own,
                late: RefCell::new(late),
            };
            let mut call =
                std::pin::pin!(SERVING.scope(serving, handler(request).instrument(span.clone())));
            let result = call.as_mut().await;
            let late = call
                .as_mut()
                .take_value()
                .map(|s| s.late.into_inner())
                .unwrap_or_default();
            end_server_span(&mut exported, late, &result);
            result
        }
        _ => {
            if tracer.is_some() {
                unsampled_context(&mut request, parent.as_ref());
                // Logs of unsampled requests still name their trace (the trace id is the
                // second field of a `traceparent`, `00-<trace id>-...`).
                let trace = request.get_ref().context().and_then(|c| c.trace.as_ref());
                if !span.is_disabled()
                    && let Some(id) = trace.and_then(|t| t.traceparent.get(3..35))
                {
                    span.record("trace_id", id);
                }
            }
            handler(request).instrument(span.clone()).await
        }
    };
    let code = match &result {
        Ok(_) => tonic::Code::Ok,
        Err(status) => status.code(),
    };
    span.record("rpc.grpc.status_code", code as i64);
    if let Some(started) = started {
        crate::metrics::served(path, code, started.elapsed());
    }
    if let Err(status) = &result {
        // At a bounded rate: a flood of failing calls is summarised, not logged call by call.
        static FAILED: LogBudget = LogBudget::new("calls failed");
        if FAILED.admit(code) {
            tracing::warn!(parent: &span, rpc.grpc.status_code = code as i64, error = status.message(), "call failed");
        }
    }
    result
}

/// Starts the exported `rpc.server` span of a call of `path` served at `local`, child of the
/// caller's `parent` (a new trace without one).
fn start_server_span(
    tracer: &opentelemetry_sdk::trace::SdkTracer,
    path: &'static str,
    local: Option<std::net::SocketAddr>,
    caller: Option<&str>,
    parent: Option<SpanContext>,
) -> opentelemetry_sdk::trace::Span {
    let (service, method) = split_method(path);
    let mut attributes = Vec::with_capacity(8);
    attributes.extend([
        KeyValue::new("rpc.system", "grpc"),
        KeyValue::new("rpc.service", service),
        KeyValue::new("rpc.method", method),
    ]);
    if let Some(local) = local {
        attributes.push(KeyValue::new("server.address", local.ip().to_string()));
        attributes.push(KeyValue::new("server.port", i64::from(local.port())));
    }
    if let Some(caller) = caller {
        attributes.push(KeyValue::new("herd.caller", caller.to_string()));
    }
    let parent = match parent {
        Some(parent) => Context::new().with_remote_span_context(parent),
        None => Context::new(),
    };
    tracer
        .span_builder(path)
        .with_kind(SpanKind::Server)
        .with_attributes(attributes)
        .start_with_context(tracer, &parent)
}

/// Ends an exported server span: the attributes recorded while serving (the last of each key),
/// the status code, and for a failure an event and, if the server is at fault, an error status.
fn end_server_span<Res>(
    span: &mut opentelemetry_sdk::trace::Span,
    late: Vec<KeyValue>,
    result: &Result<Res, tonic::Status>,
) {
    let mut kept: Vec<KeyValue> = Vec::with_capacity(late.len() + 1);
    for attribute in late.into_iter().rev() {
        if !kept.iter().any(|k| k.key == attribute.key) {
            kept.push(attribute);
        }
    }
    let code = match result {
        Ok(_) => tonic::Code::Ok,
        Err(status) => status.code(),
    };
    kept.push(KeyValue::new("rpc.grpc.status_code", code as i64));
    span.set_attributes(kept);
    if let Err(status) = result {
        span.add_event(
            "call failed",
            vec![
                KeyValue::new("rpc.grpc.status_code", code as i64),
                KeyValue::new("error", status.message().to_string()),
            ],
        );
        if is_server_fault(code) {
            span.set_status(Status::error(status.message().to_string()));
        }
    }
    span.end();
}

/// Makes sure an unsampled request carries a trace context saying so, for every hop after it: the
/// caller's as it came, or for a new trace a fresh trace id with the sampled flag off.
fn unsampled_context<Req: WithContext>(
    request: &mut tonic::Request<Req>,
    parent: Option<&SpanContext>,
) {
    let Some(ctx) = request.get_mut().context_mut().as_mut() else {
        return;
    };
    if ctx
        .trace
        .as_ref()
        .is_some_and(|t| !t.traceparent.is_empty())
    {
        return;
    }
    // The caller's (not sampled, or this call would be), else a new trace's.
    let fresh;
    let context = match parent {
        Some(incoming) => incoming,
        None => {
            fresh = SpanContext::new(
                TraceId::from_bytes(rand::random::<u128>().max(1).to_be_bytes()),
                SpanId::from_bytes(rand::random::<u64>().max(1).to_be_bytes()),
                TraceFlags::NOT_SAMPLED,
                false,
                TraceState::NONE,
            );
            &fresh
        }
    };
    ctx.trace = Some(TraceContext {
        traceparent: traceparent(context),
        tracestate: String::new(),
    });
}

/// Per the RPC conventions a server span is an error only for codes that mean the server failed.
fn is_server_fault(code: tonic::Code) -> bool {
    use tonic::Code::*;
    matches!(
        code,
        Unknown | DeadlineExceeded | Unimplemented | Internal | Unavailable | DataLoss
    )
}

/// Records herd's attributes of `ctx` (tenant, request id, config revision) on `span`, and on
/// the exported span of the call the current task serves, if it is sampled.
pub fn record_context(span: &tracing::Span, ctx: &RequestContext) {
    record_on(span, ctx);
    let _ = SERVING.try_with(|s| context_attributes(ctx, &mut s.late.borrow_mut()));
}

/// Records herd's attributes of `ctx` on the `tracing` span `span`.
fn record_on(span: &tracing::Span, ctx: &RequestContext) {
    if !ctx.tenant_id.is_empty() {
        span.record("herd.tenant", ctx.tenant_id.as_str());
    }
    if !ctx.request_id.is_empty() {
        span.record("herd.request_id", ctx.request_id.as_str());
    }
    if ctx.config_revision != 0 {
        span.record("herd.config_revision", ctx.config_revision);
    }
}

/// herd's attributes of `ctx`, for an exported span.
fn context_attributes(ctx: &RequestContext, attributes: &mut Vec<KeyValue>) {
    if !ctx.tenant_id.is_empty() {
        attributes.push(KeyValue::new("herd.tenant", ctx.tenant_id.clone()));
    }
    if !ctx.request_id.is_empty() {
        attributes.push(KeyValue::new("herd.request_id", ctx.request_id.clone()));
    }
    if ctx.config_revision != 0 {
        attributes.push(KeyValue::new("herd.config_revision", ctx.config_revision));
    }
}

/// Records a quote id on the current server span.
pub fn record_quote_id(quote_id: &str) {
    tracing::Span::current().record("herd.quote_id", quote_id);
    record_late(|| KeyValue::new("herd.quote_id", quote_id.to_string()));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_codes_that_mean_the_server_failed_make_a_server_span_an_error() {
        use tonic::Code::*;
        let faults: Vec<tonic::Code> = [
            Ok,
            Cancelled,
            Unknown,
            InvalidArgument,
            DeadlineExceeded,
            NotFound,
            AlreadyExists,
            PermissionDenied,
            ResourceExhausted,
            FailedPrecondition,
            Aborted,
            OutOfRange,
            Unimplemented,
            Internal,
            Unavailable,
            DataLoss,
            Unauthenticated,
        ]
        .into_iter()
        .filter(|code| is_server_fault(*code))
        .collect();
        assert_eq!(
            faults,
            [
                Unknown,
                DeadlineExceeded,
                Unimplemented,
                Internal,
                Unavailable,
                DataLoss
            ]
        );
    }
}
