//! The `rpc.server` span every call runs in: parented on the caller's trace, sampled at the head,
//! carrying the RPC conventions' attributes and herd's, and the status the call ends with.

use std::future::Future;
use std::sync::atomic::Ordering;

use herd_proto::WithContext;
use herd_proto::context::{RequestContext, TraceContext};
use opentelemetry::Context;
use opentelemetry::trace::TraceContextExt;
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use super::budget::LogBudget;
use super::propagation::{parent_of, split_method};
use super::sampling::SamplingRatio;
use super::{EXPORTING, SAMPLING};

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
    let (service, method) = split_method(path);
    // A served instance's connections carry `PeerInfo`; tonic's own info otherwise.
    let peer = request.extensions().get::<crate::tls::PeerInfo>();
    let local = match peer {
        Some(peer) => peer.local,
        None => request.local_addr(),
    };
    // The caller's identity, from its certificate (over mutual TLS).
    let caller = peer.and_then(|p| p.identity.clone());
    let exporting = EXPORTING.load(Ordering::Relaxed);
    let parent = if exporting {
        parent_of(request.metadata(), request.get_ref().context())
    } else {
        Context::new()
    };
    // Head sampling, decided here so that an unsampled request never reaches the OpenTelemetry
    // layer: a caller's decision is followed; a new trace is sampled at the configured ratio.
    let sampled = exporting && {
        let parent_span = parent.span();
        let parent_span = parent_span.span_context();
        if parent_span.is_valid() {
            parent_span.is_sampled()
        } else {
            rand::random::<f64>() < SAMPLING.get().map_or(1.0, SamplingRatio::get)
        }
    };
    macro_rules! server_span {
        ($target:literal) => {
            tracing::info_span!(
                target: $target,
                "rpc.server",
                otel.name = path,
                otel.kind = "server",
                otel.status_code = tracing::field::Empty,
                otel.status_description = tracing::field::Empty,
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
            )
        };
    }
    let span = if sampled {
        let span = server_span!("herd::rpc");
        let _ = span.set_parent(parent);
        let otel = span.context().span().span_context().clone();
        if otel.is_valid() {
            span.record("trace_id", otel.trace_id().to_string());
            span.record("span_id", otel.span_id().to_string());
        }
        span
    } else {
        let span = server_span!("herd::unsampled");
        if exporting {
            unsampled_context(&mut request, &parent);
            // Logs of unsampled requests still name their trace.
            let trace = request.get_ref().context().and_then(|c| c.trace.as_ref());
            if let Some(id) = trace.and_then(|t| t.traceparent.split('-').nth(1)) {
                span.record("trace_id", id);
            }
        }
        span
    };
    if let Some(caller) = caller {
        span.record("herd.caller", &*caller);
    }
    let context = request.get_ref().context();
    if let Some(ctx) = context {
        record_context(&span, ctx);
    }
    let result = handler(request).instrument(span.clone()).await;
    let code = match &result {
        Ok(_) => tonic::Code::Ok,
        Err(status) => status.code(),
    };
    span.record("rpc.grpc.status_code", code as i64);
    if let Err(status) = &result {
        if is_server_fault(code) {
            span.record("otel.status_code", "ERROR");
            span.record("otel.status_description", status.message());
        }
        // At a bounded rate: a flood of failing calls is summarised, not logged call by call.
        static FAILED: LogBudget = LogBudget::new("calls failed");
        if FAILED.admit(code) {
            tracing::warn!(parent: &span, rpc.grpc.status_code = code as i64, error = status.message(), "call failed");
        }
    }
    result
}

/// Makes sure an unsampled request carries a trace context saying so, for every hop after it: the
/// caller's as it came, or for a new trace a fresh trace id with the sampled flag off.
fn unsampled_context<Req: WithContext>(request: &mut tonic::Request<Req>, parent: &Context) {
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
    let span = parent.span();
    let incoming = span.span_context();
    let traceparent = if incoming.is_valid() {
        format!("00-{}-{}-00", incoming.trace_id(), incoming.span_id())
    } else {
        format!(
            "00-{:032x}-{:016x}-00",
            rand::random::<u128>().max(1),
            rand::random::<u64>().max(1)
        )
    };
    ctx.trace = Some(TraceContext {
        traceparent,
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

/// Records herd's attributes of `ctx` (tenant, request id, config revision) on `span`.
pub fn record_context(span: &tracing::Span, ctx: &RequestContext) {
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

/// Records a quote id on the current server span.
pub fn record_quote_id(quote_id: &str) {
    tracing::Span::current().record("herd.quote_id", quote_id);
}
