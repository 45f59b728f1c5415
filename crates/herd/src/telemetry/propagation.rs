//! W3C trace context across hops: read from a call's metadata or its message, written into the
//! metadata and the message of every outgoing attempt. An attempt made while serving a sampled
//! call is an OpenTelemetry `rpc.client` span, child of that call's server span.

use std::cell::RefCell;
use std::sync::{Arc, OnceLock};

use herd_proto::context::{RequestContext, TraceContext};
use opentelemetry::trace::{
    Span as _, SpanContext, SpanId, SpanKind, Status, TraceContextExt, TraceFlags, TraceId,
    TraceState, Tracer as _,
};
use opentelemetry::{Context, KeyValue};
use tonic::metadata::MetadataMap;

use super::budget::LogBudget;

tokio::task_local! {
    /// The sampled server span the current task serves a call in: its context parents the
    /// call's outgoing spans, and what the handler records about the call lands on it.
    pub(super) static SERVING: Serving;
}

/// What a sampled server call shares with its handler's task.
pub(super) struct Serving {
    /// The server span's own context (not remote: the client spans it parents are local).
    pub(super) context: SpanContext,
    /// Attributes recorded while serving; at the end the last value of each key is kept.
    pub(super) late: RefCell<Vec<KeyValue>>,
}

/// Records `attribute` on the sampled server span the current task serves, if any.
pub(super) fn record_late(attribute: impl FnOnce() -> KeyValue) {
    let _ = SERVING.try_with(|s| s.late.borrow_mut().push(attribute()));
}

/// A span context from a W3C `traceparent` (the form [`valid_traceparent`] accepts, as text or
/// a header's bytes) and `tracestate`, as a caller sent them.
///
/// [`valid_traceparent`]: crate::context::valid_traceparent
pub(super) fn parse(traceparent: impl AsRef<[u8]>, tracestate: &str) -> Option<SpanContext> {
    let (trace, parent, flags) = crate::context::parse_traceparent(traceparent)?;
    let trace_id = TraceId::from_bytes(trace.to_be_bytes());
    let span_id = SpanId::from_bytes(parent.to_be_bytes());
    let state = if tracestate.is_empty() || !crate::context::valid_tracestate(tracestate) {
        TraceState::NONE
    } else {
        tracestate.parse().unwrap_or(TraceState::NONE)
    };
    Some(SpanContext::new(
        trace_id,
        span_id,
        TraceFlags::new(flags) & TraceFlags::SAMPLED,
        true,
        state,
    ))
}

/// The `traceparent` of `context`.
pub(super) fn traceparent(context: &SpanContext) -> String {
    crate::context::format_traceparent(
        u128::from_be_bytes(context.trace_id().to_bytes()),
        u64::from_be_bytes(context.span_id().to_bytes()),
        context.trace_flags().to_u8(),
    )
}

/// The caller's trace context: the `traceparent` header, else the one in the message.
pub(super) fn parent_of(
    metadata: &MetadataMap,
    context: Option<&RequestContext>,
) -> Option<SpanContext> {
    let headers: &http::HeaderMap = metadata.as_ref();
    // The traceparent's bytes are read as they are: parsing checks every one of them.
    if let Some(parent) = headers.get(&TRACEPARENT)
        && let Some(parent) = parse(
            parent.as_bytes(),
            headers
                .get(&TRACESTATE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default(),
        )
    {
        return Some(parent);
    }
    let trace = context.and_then(|c| c.trace.as_ref())?;
    parse(&trace.traceparent, &trace.tracestate)
}

/// `service/method` split for the RPC conventions.
pub(super) fn split_method(path: &str) -> (&str, &str) {
    path.rsplit_once('/').unwrap_or((path, ""))
}

/// One outgoing attempt's spans: the `tracing` span its logs are written in, and, when the call
/// it serves is sampled, its OpenTelemetry `rpc.client` span.
pub(crate) struct ClientSpan {
    pub(crate) log: tracing::Span,
    exported: Option<(opentelemetry_sdk::trace::Span, PeerSpan)>,
}

impl ClientSpan {
    /// Where the endpoint the attempt goes to is recorded, if its span is exported.
    pub(crate) fn peer(&self) -> Option<PeerSpan> {
        self.exported.as_ref().map(|(_, peer)| peer.clone())
    }
}

/// Creates the spans of one outgoing attempt of `path` and writes its trace context into
/// `metadata`. When the attempt is sampled, its own span is the parent of the next hop, and the
/// trace context the message must carry instead of `context`'s is returned; otherwise the
/// message's trace context travels unchanged (mirrored in the headers) and `None` is returned.
pub(crate) fn client_span(
    path: &'static str,
    context: Option<&RequestContext>,
    metadata: &mut MetadataMap,
) -> (ClientSpan, Option<TraceContext>) {
    let (service, method) = split_method(path);
    let log = tracing::info_span!(
        target: "herd::rpc",
        "rpc.client",
        otel.name = path,
        otel.kind = "client",
        rpc.service = service,
        rpc.method = method,
        rpc.grpc.status_code = tracing::field::Empty,
    );
    let parent = SERVING.try_with(|s| s.context.clone()).ok();
    let (Some(parent), Some(tracer)) = (parent, super::TRACER.get()) else {
        mirror_trace(context, metadata);
        return (
            ClientSpan {
                log,
                exported: None,
            },
            None,
        );
    };
    let span = tracer
        .span_builder(path)
        .with_kind(SpanKind::Client)
        .with_attributes([
            KeyValue::new("rpc.system", "grpc"),
            KeyValue::new("rpc.service", service),
            KeyValue::new("rpc.method", method),
        ])
        .start_with_context(tracer, &Context::new().with_remote_span_context(parent));
    let own = span.span_context();
    let trace = TraceContext {
        traceparent: traceparent(own),
        tracestate: own.trace_state().header(),
    };
    insert(metadata, TRACEPARENT, &trace.traceparent);
    if !trace.tracestate.is_empty() {
        insert(metadata, TRACESTATE, &trace.tracestate);
    }
    let exported = Some((span, PeerSpan::default()));
    (ClientSpan { log, exported }, Some(trace))
}

/// Writes a trace header. A trace context differs on every call: kept out of HPACK's dynamic
/// table (sent as never indexed), it does not push out the headers that repeat on every call,
/// which then would be sent in full again.
fn insert(metadata: &mut MetadataMap, key: http::HeaderName, value: &str) {
    if let Ok(mut value) = http::HeaderValue::from_str(value) {
        value.set_sensitive(true);
        AsMut::<http::HeaderMap>::as_mut(metadata).insert(key, value);
    }
}

/// The trace headers' names, made once: a name given as a string is parsed again on every use.
pub(crate) const TRACEPARENT: http::HeaderName = http::HeaderName::from_static("traceparent");
const TRACESTATE: http::HeaderName = http::HeaderName::from_static("tracestate");

/// Copies the message's own trace context, if any, into the headers.
fn mirror_trace(context: Option<&RequestContext>, metadata: &mut MetadataMap) {
    // The message's trace context was checked where the call entered this instance
    // (`context::require`), so it is not parsed again for every attempt. Only a value of a
    // traceparent's length becomes a header, and `insert` takes visible ASCII only: nothing a
    // message carries can make a header the next hop refuses. A malformed one that gets through
    // is refused by the next hop's own check of the message, naming the field.
    let Some(trace) = context
        .and_then(|c| c.trace.as_ref())
        .filter(|t| t.traceparent.len() == crate::context::TRACEPARENT_LEN)
    else {
        return;
    };
    insert(metadata, TRACEPARENT, &trace.traceparent);
    if !trace.tracestate.is_empty() && crate::context::valid_tracestate(&trace.tracestate) {
        insert(metadata, TRACESTATE, &trace.tracestate);
    }
}

/// Where the endpoint a sampled outgoing attempt went to is written, travelling with its request
/// until an endpoint is picked (unsampled attempts carry none).
#[derive(Clone, Default)]
pub(crate) struct PeerSpan(Arc<OnceLock<http::uri::Authority>>);

impl PeerSpan {
    /// Records the endpoint the attempt goes to.
    pub(crate) fn record(&self, peer: &http::uri::Authority) {
        let _ = self.0.set(peer.clone());
    }
}

/// Records how an outgoing attempt ended and ends its spans.
pub(crate) fn client_result(span: ClientSpan, error: Option<&crate::error::CallError>) {
    let code = error.map_or(tonic::Code::Ok, |e| e.code());
    span.log.record("rpc.grpc.status_code", code as i64);
    if let Some(error) = error {
        static FAILED: LogBudget = LogBudget::new("outgoing calls failed");
        if FAILED.admit(code) {
            tracing::warn!(parent: &span.log, rpc.grpc.status_code = code as i64, %error, "outgoing call failed");
        }
    }
    let Some((mut exported, peer)) = span.exported else {
        return;
    };
    exported.set_attribute(KeyValue::new("rpc.grpc.status_code", code as i64));
    if let Some(peer) = peer.0.get() {
        exported.set_attribute(KeyValue::new("server.address", peer.host().to_string()));
        if let Some(port) = peer.port_u16() {
            exported.set_attribute(KeyValue::new("server.port", i64::from(port)));
        }
    }
    if let Some(error) = error {
        let message = error.to_string();
        exported.add_event(
            "outgoing call failed",
            vec![
                KeyValue::new("rpc.grpc.status_code", code as i64),
                KeyValue::new("error", message.clone()),
            ],
        );
        exported.set_status(Status::error(message));
    }
    exported.end();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_traceparent_round_trips() {
        let header = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let parsed = parse(header, "rojo=00f067aa0ba902b7").expect("a valid traceparent");
        assert!(parsed.is_sampled() && parsed.is_remote());
        assert_eq!(traceparent(&parsed), header);
        assert_eq!(parsed.trace_state().header(), "rojo=00f067aa0ba902b7");
        let unsampled = parse(header.replace("-01", "-00"), "").expect("valid");
        assert!(!unsampled.is_sampled());
        for bad in ["", "00-0000", &header.replace("4bf9", "XYZW")] {
            assert!(parse(bad, "").is_none(), "{bad}");
        }
    }

    /// What herd's own code does per hop for an unsampled call while export is on: read the
    /// caller's trace context, then mirror it into the next attempt's headers. `cargo test
    /// --release -p herd measure_unsampled_hop -- --ignored --nocapture` (figures in
    /// BENCHMARKS.md).
    #[test]
    #[ignore = "a measurement, not a check"]
    fn measure_unsampled_hop() {
        let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00";
        let ctx = RequestContext {
            trace: Some(TraceContext {
                traceparent: traceparent.into(),
                tracestate: String::new(),
            }),
            ..Default::default()
        };
        let mut incoming = MetadataMap::new();
        insert(&mut incoming, TRACEPARENT, traceparent);
        let rounds = 1_000_000;
        let started = std::time::Instant::now();
        for _ in 0..rounds {
            let parent = parent_of(&incoming, Some(&ctx));
            assert!(parent.is_some_and(|p| !p.is_sampled()));
            let mut outgoing = MetadataMap::new();
            let (span, trace) = client_span(
                "herd.tax.v1.TaxService/ComputeTax",
                Some(&ctx),
                &mut outgoing,
            );
            assert!(trace.is_none() && span.peer().is_none());
            std::hint::black_box(outgoing);
        }
        println!("REPORT unsampled hop: {:?}", started.elapsed() / rounds);
    }

    #[test]
    fn the_message_carries_the_trace_when_no_header_does() {
        let trace = TraceContext {
            traceparent: "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into(),
            tracestate: String::new(),
        };
        let ctx = RequestContext {
            trace: Some(trace),
            ..Default::default()
        };
        let from_message = parent_of(&MetadataMap::new(), Some(&ctx)).expect("from the message");
        assert_eq!(
            from_message.span_id(),
            SpanId::from_hex("00f067aa0ba902b7").unwrap()
        );
        let mut metadata = MetadataMap::new();
        insert(
            &mut metadata,
            TRACEPARENT,
            "00-4bf92f3577b34da6a3ce929d0e0e4736-1111111111111111-01",
        );
        let from_header = parent_of(&metadata, Some(&ctx)).expect("from the header");
        assert_eq!(
            from_header.span_id(),
            SpanId::from_hex("1111111111111111").unwrap()
        );
    }
}
