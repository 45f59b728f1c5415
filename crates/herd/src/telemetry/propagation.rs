//! W3C trace context across hops: read from a call's metadata or its message, written into the
//! metadata and the message of every outgoing attempt, which runs in its own `rpc.client` span.

use std::collections::HashMap;
use std::sync::atomic::Ordering;

use herd_proto::context::{RequestContext, TraceContext};
use opentelemetry::Context;
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::TraceContextExt;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tonic::metadata::{MetadataKey, MetadataMap, MetadataValue};
use tracing_opentelemetry::OpenTelemetrySpanExt;

use super::EXPORTING;
use super::budget::LogBudget;

struct MetadataExtractor<'a>(&'a MetadataMap);

impl Extractor for MetadataExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }
    fn keys(&self) -> Vec<&str> {
        self.0
            .keys()
            .filter_map(|k| match k {
                tonic::metadata::KeyRef::Ascii(k) => Some(k.as_str()),
                tonic::metadata::KeyRef::Binary(_) => None,
            })
            .collect()
    }
}

struct MetadataInjector<'a>(&'a mut MetadataMap);

impl Injector for MetadataInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(k), Ok(v)) = (
            MetadataKey::from_bytes(key.as_bytes()),
            MetadataValue::try_from(value.as_str()),
        ) {
            self.0.insert(k, v);
        }
    }
}

/// The caller's trace context: the `traceparent` header, else the one in the message.
pub(super) fn parent_of(metadata: &MetadataMap, context: Option<&RequestContext>) -> Context {
    let propagator = TraceContextPropagator::new();
    let from_header = propagator.extract(&MetadataExtractor(metadata));
    if from_header.span().span_context().is_valid() {
        return from_header;
    }
    let Some(trace) = context.and_then(|c| c.trace.as_ref()) else {
        return from_header;
    };
    let mut carrier = HashMap::new();
    carrier.insert("traceparent".to_string(), trace.traceparent.clone());
    if !trace.tracestate.is_empty() {
        carrier.insert("tracestate".to_string(), trace.tracestate.clone());
    }
    propagator.extract(&carrier)
}

/// `service/method` split for the RPC conventions.
pub(super) fn split_method(path: &str) -> (&str, &str) {
    path.rsplit_once('/').unwrap_or((path, ""))
}

/// Creates the `rpc.client` span of one outgoing attempt of `path` and writes its trace context
/// into `metadata`. When the attempt is sampled, its own span is the parent of the next hop, and
/// the trace context the message must carry instead of `context`'s is returned; otherwise the
/// message's trace context travels unchanged (mirrored in the headers) and `None` is returned.
pub(crate) fn client_span(
    path: &'static str,
    context: Option<&RequestContext>,
    metadata: &mut MetadataMap,
) -> (tracing::Span, Option<TraceContext>) {
    let (service, method) = split_method(path);
    let sampled = EXPORTING.load(Ordering::Relaxed) && {
        let current = tracing::Span::current().context();
        let current = current.span();
        current.span_context().is_valid() && current.span_context().is_sampled()
    };
    macro_rules! client_span {
        ($target:literal) => {
            tracing::info_span!(
                target: $target,
                "rpc.client",
                otel.name = path,
                otel.kind = "client",
                otel.status_code = tracing::field::Empty,
                rpc.system = "grpc",
                rpc.service = service,
                rpc.method = method,
                rpc.grpc.status_code = tracing::field::Empty,
                server.address = tracing::field::Empty,
                server.port = tracing::field::Empty,
            )
        };
    }
    let span = if sampled {
        client_span!("herd::rpc")
    } else {
        client_span!("herd::unsampled")
    };
    if sampled && let Some(trace) = inject_own(&span, metadata) {
        return (span, Some(trace));
    }
    mirror_trace(context, metadata);
    (span, None)
}

/// Writes the trace context of a sampled client `span` into `metadata` and returns it, for the
/// message to carry too; `None` if the span has no valid context.
fn inject_own(span: &tracing::Span, metadata: &mut MetadataMap) -> Option<TraceContext> {
    let cx = span.context();
    if !cx.span().span_context().is_valid() {
        return None;
    }
    let mut carrier: HashMap<String, String> = HashMap::new();
    TraceContextPropagator::new().inject_context(&cx, &mut carrier);
    let traceparent = carrier
        .get("traceparent")
        .filter(|t| !t.is_empty())?
        .clone();
    let tracestate = carrier.get("tracestate").cloned().unwrap_or_default();
    let mut injector = MetadataInjector(metadata);
    for (k, v) in carrier.into_iter().filter(|(_, v)| !v.is_empty()) {
        injector.set(&k, v);
    }
    Some(TraceContext {
        traceparent,
        tracestate,
    })
}

/// Copies the message's own trace context, if any and well formed, into the headers.
fn mirror_trace(context: Option<&RequestContext>, metadata: &mut MetadataMap) {
    // Only a well-formed trace context becomes a header: nothing a message carries can make a
    // header the next hop refuses.
    let Some(trace) = context
        .and_then(|c| c.trace.as_ref())
        .filter(|t| crate::context::valid_traceparent(&t.traceparent))
    else {
        return;
    };
    let mut injector = MetadataInjector(metadata);
    injector.set("traceparent", trace.traceparent.clone());
    if !trace.tracestate.is_empty() && crate::context::valid_tracestate(&trace.tracestate) {
        injector.set("tracestate", trace.tracestate.clone());
    }
}

/// The sampled `rpc.client` span of an outgoing attempt, travelling with its request until an
/// endpoint is picked (unsampled attempts carry none, so record nothing).
#[derive(Clone)]
pub(crate) struct PeerSpan(pub(crate) tracing::Span);

impl PeerSpan {
    /// Records the endpoint the attempt goes to.
    pub(crate) fn record(&self, peer: &http::uri::Authority) {
        self.0.record("server.address", peer.host());
        if let Some(port) = peer.port_u16() {
            self.0.record("server.port", i64::from(port));
        }
    }
}

/// Records how an outgoing attempt ended on its span.
pub(crate) fn client_result(span: &tracing::Span, error: Option<&crate::error::CallError>) {
    let code = error.map_or(tonic::Code::Ok, |e| e.code());
    span.record("rpc.grpc.status_code", code as i64);
    if let Some(error) = error {
        span.record("otel.status_code", "ERROR");
        static FAILED: LogBudget = LogBudget::new("outgoing calls failed");
        if FAILED.admit(code) {
            tracing::warn!(parent: span, rpc.grpc.status_code = code as i64, %error, "outgoing call failed");
        }
    }
}
