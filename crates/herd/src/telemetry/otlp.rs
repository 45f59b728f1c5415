//! Spans written as an OTLP `ExportTraceServiceRequest` straight from the SDK's span data: each
//! field is encoded where it lies, with no intermediate protobuf structures (which would copy
//! every id, name, key and value first). Field numbers are those of `opentelemetry/proto/trace/v1`
//! and `common/v1`; the tests decode the output with opentelemetry-proto's own types.

use opentelemetry::trace::{SpanKind, Status};
use opentelemetry::{Array, KeyValue, Value};
use opentelemetry_sdk::trace::SpanData;
use prost::encoding::{WireType, encode_key, encode_varint, encoded_len_varint, key_len};

/// `SpanFlags`: the parent's remoteness is known, and whether it is remote.
const HAS_IS_REMOTE: u32 = 0x100;
const IS_REMOTE: u32 = 0x200;

/// The request for `spans` of one resource, whose attributes are `resource`.
pub(super) fn request(resource: &[KeyValue], spans: &[SpanData]) -> Vec<u8> {
    // Spans grouped by instrumentation scope, in the order first seen.
    let mut scopes: Vec<(&opentelemetry::InstrumentationScope, Vec<&SpanData>)> = Vec::new();
    for span in spans {
        match scopes
            .iter_mut()
            .find(|(scope, _)| **scope == span.instrumentation_scope)
        {
            Some((_, of_scope)) => of_scope.push(span),
            None => scopes.push((&span.instrumentation_scope, vec![span])),
        }
    }
    let resource_len: usize = resource
        .iter()
        .map(|kv| nested_len(1, key_value_len(kv)))
        .sum();
    let scope_lens: Vec<usize> = scopes
        .iter()
        .map(|(scope, spans)| scope_spans_len(scope, spans))
        .collect();
    let resource_spans_len =
        nested_len(1, resource_len) + scope_lens.iter().map(|l| nested_len(2, *l)).sum::<usize>();
    let mut out = Vec::with_capacity(nested_len(1, resource_spans_len));
    header(&mut out, 1, resource_spans_len);
    header(&mut out, 1, resource_len);
    for kv in resource {
        key_value(&mut out, 1, kv);
    }
    for ((scope, spans), len) in scopes.iter().zip(scope_lens) {
        header(&mut out, 2, len);
        header(&mut out, 1, scope_len(scope));
        string(&mut out, 1, scope.name());
        string(&mut out, 2, scope.version().unwrap_or_default());
        for kv in scope.attributes() {
            key_value(&mut out, 3, kv);
        }
        for span in spans {
            header(&mut out, 2, span_len(span));
            write_span(&mut out, span);
        }
        string(&mut out, 3, scope.schema_url().unwrap_or_default());
    }
    out
}

fn scope_len(scope: &opentelemetry::InstrumentationScope) -> usize {
    string_len(1, scope.name())
        + string_len(2, scope.version().unwrap_or_default())
        + scope
            .attributes()
            .map(|kv| nested_len(3, key_value_len(kv)))
            .sum::<usize>()
}

fn scope_spans_len(scope: &opentelemetry::InstrumentationScope, spans: &[&SpanData]) -> usize {
    nested_len(1, scope_len(scope))
        + spans
            .iter()
            .map(|s| nested_len(2, span_len(s)))
            .sum::<usize>()
        + string_len(3, scope.schema_url().unwrap_or_default())
}

fn kind(kind: &SpanKind) -> u64 {
    match kind {
        SpanKind::Internal => 1,
        SpanKind::Server => 2,
        SpanKind::Client => 3,
        SpanKind::Producer => 4,
        SpanKind::Consumer => 5,
    }
}

fn nanos(time: std::time::SystemTime) -> u64 {
    time.duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// `SpanFlags`: the W3C trace flags, and whether the parent (of a span) or the linked span (of a
/// link) is remote.
fn flags(trace_flags: opentelemetry::trace::TraceFlags, remote: bool) -> u32 {
    let mut flags = u32::from(trace_flags.to_u8()) | HAS_IS_REMOTE;
    if remote {
        flags |= IS_REMOTE;
    }
    flags
}

/// (code, message) of a span's status.
fn status(status: &Status) -> (u64, &str) {
    match status {
        Status::Unset => (0, ""),
        Status::Ok => (1, ""),
        Status::Error { description } => (2, description),
    }
}

fn status_len(status: &Status) -> usize {
    let (code, message) = self::status(status);
    string_len(2, message) + varint_len(3, code)
}

fn span_len(span: &SpanData) -> usize {
    let parent = span.parent_span_id != opentelemetry::trace::SpanId::INVALID;
    nested_len(1, 16)
        + nested_len(2, 8)
        + string_len(3, &span.span_context.trace_state().header())
        + if parent { nested_len(4, 8) } else { 0 }
        + string_len(5, &span.name)
        + varint_len(6, kind(&span.span_kind))
        + 2 * (key_len(7) + 8)
        + span
            .attributes
            .iter()
            .map(|kv| nested_len(9, key_value_len(kv)))
            .sum::<usize>()
        + varint_len(10, u64::from(span.dropped_attributes_count))
        + span
            .events
            .iter()
            .map(|e| nested_len(11, event_len(e)))
            .sum::<usize>()
        + varint_len(12, u64::from(span.events.dropped_count))
        + span
            .links
            .iter()
            .map(|l| nested_len(13, link_len(l)))
            .sum::<usize>()
        + varint_len(14, u64::from(span.links.dropped_count))
        + nested_len(15, status_len(&span.status))
        + key_len(16)
        + 4
}

fn write_span(out: &mut Vec<u8>, span: &SpanData) {
    bytes(out, 1, &span.span_context.trace_id().to_bytes());
    bytes(out, 2, &span.span_context.span_id().to_bytes());
    string(out, 3, &span.span_context.trace_state().header());
    if span.parent_span_id != opentelemetry::trace::SpanId::INVALID {
        bytes(out, 4, &span.parent_span_id.to_bytes());
    }
    string(out, 5, &span.name);
    varint(out, 6, kind(&span.span_kind));
    fixed64(out, 7, nanos(span.start_time));
    fixed64(out, 8, nanos(span.end_time));
    for kv in &span.attributes {
        key_value(out, 9, kv);
    }
    varint(out, 10, u64::from(span.dropped_attributes_count));
    for event in span.events.iter() {
        header(out, 11, event_len(event));
        fixed64(out, 1, nanos(event.timestamp));
        string(out, 2, &event.name);
        for kv in &event.attributes {
            key_value(out, 3, kv);
        }
        varint(out, 4, u64::from(event.dropped_attributes_count));
    }
    varint(out, 12, u64::from(span.events.dropped_count));
    for link in span.links.iter() {
        header(out, 13, link_len(link));
        bytes(out, 1, &link.span_context.trace_id().to_bytes());
        bytes(out, 2, &link.span_context.span_id().to_bytes());
        string(out, 3, &link.span_context.trace_state().header());
        for kv in &link.attributes {
            key_value(out, 4, kv);
        }
        varint(out, 5, u64::from(link.dropped_attributes_count));
        encode_key(6, WireType::ThirtyTwoBit, out);
        let remote = link.span_context.is_remote();
        out.extend_from_slice(&flags(link.span_context.trace_flags(), remote).to_le_bytes());
    }
    varint(out, 14, u64::from(span.links.dropped_count));
    header(out, 15, status_len(&span.status));
    let (code, message) = status(&span.status);
    string(out, 2, message);
    varint(out, 3, code);
    encode_key(16, WireType::ThirtyTwoBit, out);
    let flags = flags(span.span_context.trace_flags(), span.parent_span_is_remote);
    out.extend_from_slice(&flags.to_le_bytes());
}

fn event_len(event: &opentelemetry::trace::Event) -> usize {
    key_len(1)
        + 8
        + string_len(2, &event.name)
        + event
            .attributes
            .iter()
            .map(|kv| nested_len(3, key_value_len(kv)))
            .sum::<usize>()
        + varint_len(4, u64::from(event.dropped_attributes_count))
}

fn link_len(link: &opentelemetry::trace::Link) -> usize {
    nested_len(1, 16)
        + nested_len(2, 8)
        + string_len(3, &link.span_context.trace_state().header())
        + link
            .attributes
            .iter()
            .map(|kv| nested_len(4, key_value_len(kv)))
            .sum::<usize>()
        + varint_len(5, u64::from(link.dropped_attributes_count))
        + key_len(6)
        + 4
}

/// `KeyValue { key = 1; AnyValue value = 2 }`.
fn key_value_len(kv: &KeyValue) -> usize {
    string_len(1, kv.key.as_str()) + nested_len(2, any_value_len(&kv.value))
}

fn key_value(out: &mut Vec<u8>, tag: u32, kv: &KeyValue) {
    header(out, tag, key_value_len(kv));
    string(out, 1, kv.key.as_str());
    header(out, 2, any_value_len(&kv.value));
    any_value(out, &kv.value);
}

/// `AnyValue`, a oneof: its one field is written even when it holds the default value.
fn any_value_len(value: &Value) -> usize {
    match value {
        Value::String(s) => nested_len(1, s.as_str().len()),
        Value::Bool(b) => key_len(2) + encoded_len_varint(u64::from(*b)),
        Value::I64(i) => key_len(3) + encoded_len_varint(*i as u64),
        Value::F64(_) => key_len(4) + 8,
        Value::Array(array) => nested_len(5, array_len(array)),
        other => nested_len(1, other.as_str().len()),
    }
}

fn any_value(out: &mut Vec<u8>, value: &Value) {
    match value {
        Value::String(s) => {
            header(out, 1, s.as_str().len());
            out.extend_from_slice(s.as_str().as_bytes());
        }
        Value::Bool(b) => {
            encode_key(2, WireType::Varint, out);
            encode_varint(u64::from(*b), out);
        }
        Value::I64(i) => {
            encode_key(3, WireType::Varint, out);
            encode_varint(*i as u64, out);
        }
        Value::F64(f) => {
            encode_key(4, WireType::SixtyFourBit, out);
            out.extend_from_slice(&f.to_le_bytes());
        }
        Value::Array(array) => {
            header(out, 5, array_len(array));
            write_array(out, array);
        }
        other => {
            let text = other.as_str();
            header(out, 1, text.len());
            out.extend_from_slice(text.as_bytes());
        }
    }
}

/// The elements of an array as `ArrayValue { repeated AnyValue values = 1 }`.
fn array_values(array: &Array) -> Vec<Value> {
    match array {
        Array::Bool(v) => v.iter().map(|b| Value::Bool(*b)).collect(),
        Array::I64(v) => v.iter().map(|i| Value::I64(*i)).collect(),
        Array::F64(v) => v.iter().map(|f| Value::F64(*f)).collect(),
        Array::String(v) => v.iter().map(|s| Value::String(s.clone())).collect(),
        other => vec![Value::String(other.to_string().into())],
    }
}

fn array_len(array: &Array) -> usize {
    array_values(array)
        .iter()
        .map(|v| nested_len(1, any_value_len(v)))
        .sum()
}

fn write_array(out: &mut Vec<u8>, array: &Array) {
    for value in array_values(array) {
        header(out, 1, any_value_len(&value));
        any_value(out, &value);
    }
}

/// A length-delimited field of `len` bytes, with its key and length.
fn nested_len(tag: u32, len: usize) -> usize {
    key_len(tag) + encoded_len_varint(len as u64) + len
}

/// A string field, left out when empty (proto3's default).
fn string_len(tag: u32, s: &str) -> usize {
    if s.is_empty() {
        0
    } else {
        nested_len(tag, s.len())
    }
}

/// A varint field, left out when zero.
fn varint_len(tag: u32, v: u64) -> usize {
    if v == 0 {
        0
    } else {
        key_len(tag) + encoded_len_varint(v)
    }
}

fn header(out: &mut Vec<u8>, tag: u32, len: usize) {
    encode_key(tag, WireType::LengthDelimited, out);
    encode_varint(len as u64, out);
}

fn bytes(out: &mut Vec<u8>, tag: u32, data: &[u8]) {
    header(out, tag, data.len());
    out.extend_from_slice(data);
}

fn string(out: &mut Vec<u8>, tag: u32, s: &str) {
    if !s.is_empty() {
        bytes(out, tag, s.as_bytes());
    }
}

fn varint(out: &mut Vec<u8>, tag: u32, v: u64) {
    if v != 0 {
        encode_key(tag, WireType::Varint, out);
        encode_varint(v, out);
    }
}

fn fixed64(out: &mut Vec<u8>, tag: u32, v: u64) {
    encode_key(tag, WireType::SixtyFourBit, out);
    out.extend_from_slice(&v.to_le_bytes());
}

/// The gRPC method spans are sent to.
const EXPORT: &str = "/opentelemetry.proto.collector.trace.v1.TraceService/Export";
/// How long one export may take unless `OTEL_EXPORTER_OTLP_TIMEOUT` says otherwise.
const DEFAULT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Bytes already encoded as a protobuf message, sent as they are; an answer is read and ignored.
/// (Also the empty request and unread answer of the etcd members' status probe.)
#[derive(Debug, Default)]
pub(crate) struct Encoded(pub(crate) Vec<u8>);

impl prost::Message for Encoded {
    fn encode_raw(&self, buf: &mut impl bytes::BufMut) {
        buf.put_slice(&self.0);
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl bytes::Buf,
        ctx: prost::encoding::DecodeContext,
    ) -> Result<(), prost::DecodeError> {
        prost::encoding::skip_field(wire_type, tag, buf, ctx)
    }

    fn encoded_len(&self) -> usize {
        self.0.len()
    }

    fn clear(&mut self) {
        self.0.clear();
    }
}

/// A connection to an OTLP/gRPC collector configured by the standard variables of one signal
/// (`TRACES`, `METRICS`): the endpoint (`OTEL_EXPORTER_OTLP_<SIGNAL>_ENDPOINT`, else
/// `OTEL_EXPORTER_OTLP_ENDPOINT`), headers (`..._HEADERS`, `key=value` pairs separated by commas)
/// and the timeout of one export (`..._TIMEOUT`, milliseconds).
#[derive(Debug, Clone)]
pub(crate) struct Collector {
    grpc: tonic::client::Grpc<tonic::transport::Channel>,
    metadata: tonic::metadata::MetadataMap,
    timeout: std::time::Duration,
}

/// A positive whole number, if a variable's `value` is one (the OpenTelemetry variables' counts
/// and milliseconds).
pub(crate) fn positive(value: Option<&str>) -> Option<u64> {
    value
        .and_then(|v| v.trim().parse::<u64>().ok())
        .filter(|n| *n > 0)
}

/// The value of `OTEL_EXPORTER_OTLP_<SIGNAL>_<NAME>`, else of `OTEL_EXPORTER_OTLP_<NAME>`.
fn setting(signal: &str, name: &str) -> Option<String> {
    [
        format!("OTEL_EXPORTER_OTLP_{signal}_{name}"),
        format!("OTEL_EXPORTER_OTLP_{name}"),
    ]
    .iter()
    .find_map(|k| std::env::var(k).ok().filter(|v| !v.trim().is_empty()))
}

/// Whether the variables name a collector for `signal` (`TRACES`, `METRICS`), and
/// `OTEL_<SIGNAL>_EXPORTER` does not say `none`.
pub(crate) fn configured(signal: &str) -> bool {
    std::env::var(format!("OTEL_{signal}_EXPORTER")).as_deref() != Ok("none")
        && setting(signal, "ENDPOINT").is_some()
}

/// `%XX` escapes of a header value decoded (W3C baggage's encoding, which the variable uses).
fn percent_decoded(value: &str) -> String {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(b)) => {
                out.push(b);
                i += 3;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Headers from `key=value` pairs separated by commas; blank pairs are skipped.
fn headers(spec: &str) -> Result<tonic::metadata::MetadataMap, String> {
    let mut metadata = tonic::metadata::MetadataMap::new();
    for pair in spec.split(',').filter(|p| !p.trim().is_empty()) {
        let parsed = pair.split_once('=').and_then(|(key, value)| {
            let key = key.trim().to_lowercase();
            let key = tonic::metadata::MetadataKey::from_bytes(key.as_bytes()).ok()?;
            Some((key, percent_decoded(value.trim()).parse().ok()?))
        });
        let Some((key, value)) = parsed else {
            return Err(format!("OTLP headers: {pair:?} is not key=value"));
        };
        metadata.insert(key, value);
    }
    Ok(metadata)
}

impl Collector {
    /// The collector the variables of `signal` describe. Connects lazily, on the runtime it is
    /// made in.
    pub(crate) fn from_env(signal: &str) -> Result<Self, String> {
        let endpoint =
            setting(signal, "ENDPOINT").unwrap_or_else(|| "http://localhost:4317".into());
        let channel = tonic::transport::Endpoint::from_shared(endpoint.clone())
            .map_err(|e| format!("OTLP endpoint {endpoint:?}: {e}"))?
            .connect_timeout(std::time::Duration::from_secs(5))
            .connect_lazy();
        let metadata = headers(&setting(signal, "HEADERS").unwrap_or_default())?;
        let timeout = setting(signal, "TIMEOUT")
            .and_then(|t| t.trim().parse::<u64>().ok())
            .map_or(DEFAULT_TIMEOUT, std::time::Duration::from_millis);
        Ok(Self {
            grpc: tonic::client::Grpc::new(channel),
            metadata,
            timeout,
        })
    }

    /// Sends `body`, an encoded export request, to the collector's `path`; the answer is
    /// ignored. Bounded by the export timeout.
    pub(crate) fn send(
        &self,
        path: &'static str,
        body: Vec<u8>,
    ) -> impl std::future::Future<Output = opentelemetry_sdk::error::OTelSdkResult> + Send + use<>
    {
        let mut request = tonic::Request::from_parts(
            self.metadata.clone(),
            tonic::Extensions::default(),
            Encoded(body),
        );
        request.set_timeout(self.timeout);
        let mut grpc = self.grpc.clone();
        let timeout = self.timeout;
        async move {
            let send = async {
                grpc.ready()
                    .await
                    .map_err(|e| format!("OTLP collector unreachable: {e}"))?;
                grpc.unary::<_, Encoded, _>(
                    request,
                    http::uri::PathAndQuery::from_static(path),
                    tonic_prost::ProstCodec::default(),
                )
                .await
                .map_err(|s| format!("OTLP export refused: {:?}: {}", s.code(), s.message()))
            };
            match tokio::time::timeout(timeout, send).await {
                Ok(Ok(_)) => Ok(()),
                Ok(Err(e)) => Err(opentelemetry_sdk::error::OTelSdkError::InternalFailure(e)),
                Err(_) => Err(opentelemetry_sdk::error::OTelSdkError::Timeout(timeout)),
            }
        }
    }
}

/// The OTLP/gRPC span exporter: spans encoded by [`request`] and sent to the traces collector.
#[derive(Debug)]
pub(super) struct OtlpExporter {
    collector: Collector,
    resource: Vec<KeyValue>,
}

impl OtlpExporter {
    /// The exporter the `TRACES` variables describe. Connects lazily, on the runtime it is made in.
    pub(super) fn from_env() -> Result<Self, String> {
        Ok(Self {
            collector: Collector::from_env("TRACES")?,
            resource: Vec::new(),
        })
    }
}

impl opentelemetry_sdk::trace::SpanExporter for OtlpExporter {
    fn export(
        &self,
        batch: Vec<SpanData>,
    ) -> impl std::future::Future<Output = opentelemetry_sdk::error::OTelSdkResult> + Send {
        let body = request(&self.resource, &batch);
        drop(batch);
        self.collector.send(EXPORT, body)
    }

    fn set_resource(&mut self, resource: &opentelemetry_sdk::Resource) {
        self.resource = resource
            .iter()
            .map(|(k, v)| KeyValue::new(k.clone(), v.clone()))
            .collect();
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    use opentelemetry::trace::{Event, Link, SpanContext, SpanId, TraceFlags, TraceId, TraceState};
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use opentelemetry_proto::transform::common::tonic::ResourceAttributesWithSchema;
    use opentelemetry_proto::transform::trace::tonic::group_spans_by_resource_and_scope;
    use prost::Message;

    use super::*;

    fn context(trace: u8, span: u8, sampled: bool, remote: bool) -> SpanContext {
        let flags = if sampled {
            TraceFlags::SAMPLED
        } else {
            TraceFlags::default()
        };
        let state = TraceState::from_key_value([("rojo", "00f067aa0ba902b7")]).unwrap();
        SpanContext::new(
            TraceId::from_bytes([trace; 16]),
            SpanId::from_bytes([span; 8]),
            flags,
            remote,
            state,
        )
    }

    fn spans() -> Vec<SpanData> {
        let start = SystemTime::UNIX_EPOCH + Duration::from_nanos(1_700_000_000_123_456_789);
        let herd = opentelemetry::InstrumentationScope::builder("herd")
            .with_version("1.2.3")
            .with_attributes([KeyValue::new("scope.k", "v")])
            .build();
        let server = SpanData {
            span_context: context(1, 2, true, false),
            parent_span_id: SpanId::from_bytes([3; 8]),
            parent_span_is_remote: true,
            span_kind: SpanKind::Server,
            name: "herd.pricing.v1.PricingService/PriceItems".into(),
            start_time: start,
            end_time: start + Duration::from_micros(250),
            attributes: vec![
                KeyValue::new("rpc.system", "grpc"),
                KeyValue::new("server.port", 41234_i64),
                KeyValue::new("negative", -5_i64),
                KeyValue::new("flag", false),
                KeyValue::new("ratio", 0.25),
                KeyValue::new("empty", ""),
                KeyValue::new("herd.tenant", "acme".to_string()),
                KeyValue::new(
                    "list",
                    Value::Array(Array::String(vec!["a".into(), "b".into()])),
                ),
                KeyValue::new("ints", Value::Array(Array::I64(vec![1, -2]))),
            ],
            dropped_attributes_count: 2,
            events: opentelemetry_sdk::trace::SpanEvents::default(),
            links: opentelemetry_sdk::trace::SpanLinks::default(),
            status: Status::error("pricing failed"),
            instrumentation_scope: herd.clone(),
        };
        let mut client = server.clone();
        client.span_context = context(1, 4, true, false);
        client.parent_span_id = SpanId::from_bytes([2; 8]);
        client.parent_span_is_remote = false;
        client.span_kind = SpanKind::Client;
        client.status = Status::Ok;
        client.events.events.push(Event::new(
            "outgoing call failed",
            start + Duration::from_micros(100),
            vec![KeyValue::new("rpc.grpc.status_code", 14_i64)],
            1,
        ));
        client.links.links.push(Link::new(
            context(9, 9, false, true),
            vec![KeyValue::new("why", "retry")],
            0,
        ));
        let mut root = server.clone();
        root.parent_span_id = SpanId::INVALID;
        root.parent_span_is_remote = false;
        root.status = Status::Unset;
        root.instrumentation_scope = opentelemetry::InstrumentationScope::builder("other").build();
        vec![server, client, root]
    }

    #[test]
    fn headers_are_key_value_pairs_with_percent_escapes() {
        let parsed = headers("api-key=s%3Dcret, X-Team = herd ,").expect("valid");
        assert_eq!(
            parsed.get("api-key").and_then(|v| v.to_str().ok()),
            Some("s=cret")
        );
        assert_eq!(
            parsed.get("x-team").and_then(|v| v.to_str().ok()),
            Some("herd")
        );
        assert!(headers("").expect("none").is_empty());
        assert!(headers("no-equals-sign").is_err());
        assert!(headers("bad key=1").is_err());
    }

    #[test]
    fn the_request_decodes_to_what_opentelemetry_proto_makes() {
        let resource = opentelemetry_sdk::Resource::builder()
            .with_service_name("herd-pricing")
            .with_attributes([KeyValue::new("service.instance.id", "pricing-1")])
            .build();
        let attributes: Vec<KeyValue> = resource
            .iter()
            .map(|(k, v)| KeyValue::new(k.clone(), v.clone()))
            .collect();
        let ours = ExportTraceServiceRequest::decode(&request(&attributes, &spans())[..])
            .expect("a valid request");
        let theirs = ExportTraceServiceRequest {
            resource_spans: group_spans_by_resource_and_scope(
                spans(),
                &ResourceAttributesWithSchema::from(&resource),
            ),
        };
        assert_eq!(ours, theirs);
    }
}
