//! Following one request across every instance it touches: logs with `tracing`, spans exported
//! with OpenTelemetry over OTLP/gRPC, W3C trace context on every hop.
//!
//! Configured by the standard variables: `OTEL_EXPORTER_OTLP_ENDPOINT` (or
//! `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) turns export on; `OTEL_SERVICE_NAME` and
//! `OTEL_RESOURCE_ATTRIBUTES` shape the resource; `OTEL_TRACES_SAMPLER` / `OTEL_TRACES_SAMPLER_ARG`
//! set the initial ratio of the parent-based ratio sampler, which `/herd/config/telemetry` changes
//! at run time. With no endpoint, no OpenTelemetry layer is installed: nothing is exported and
//! nothing is paid beyond plain `tracing` spans.
//!
//! Every server call runs in a `rpc.server` span ([`serve`]) whose parent is the caller's
//! `traceparent` header, or the one carried in the message's `RequestContext`; every outgoing call
//! (`context::call`) runs in a `rpc.client` span whose context is injected into both the
//! metadata and the message. Span names and attributes follow the OpenTelemetry RPC conventions.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use herd_proto::WithContext;
use herd_proto::context::{RequestContext, TraceContext};
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry::{Context, KeyValue};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
use serde::{Deserialize, Serialize};
use tonic::metadata::{MetadataKey, MetadataMap, MetadataValue};
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::Layer;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// Spans waiting for export; beyond this they are dropped and counted rather than slowing or
/// failing a request.
const QUEUE_SPANS: usize = 8192;
/// How long a batch waits before export.
const EXPORT_DELAY: Duration = Duration::from_millis(200);
/// Bound on flushing pending spans at shutdown.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(5);

/// `/herd/config/telemetry`: telemetry settings shared by every instance.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TelemetrySection {
    /// The share of new traces that are sampled, 0 to 1. Calls that arrive with a sampled
    /// parent are always sampled (parent-based).
    pub sampling_ratio: f64,
}

impl crate::config::Section for TelemetrySection {
    const NAME: &'static str = "telemetry";
    const ABOUT: &'static str = "the share of new traces sampled, changed at run time";

    fn validate(&self) -> Result<(), String> {
        if !(0.0..=1.0).contains(&self.sampling_ratio) {
            return Err(format!(
                "sampling_ratio: must be 0 to 1, got {}",
                self.sampling_ratio
            ));
        }
        Ok(())
    }

    fn example() -> String {
        r#"{"sampling_ratio":0.01}"#.into()
    }
}

/// Whether spans are exported: when not, no trace context is extracted or created, only passed on.
static EXPORTING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// The ratio new traces are sampled at, once telemetry is initialised.
static SAMPLING: std::sync::OnceLock<SamplingRatio> = std::sync::OnceLock::new();

/// The sampling ratio in force, shared with the sampler; changing it takes effect for the next
/// trace.
#[derive(Debug, Clone)]
pub struct SamplingRatio(Arc<AtomicU64>);

impl SamplingRatio {
    fn new(ratio: f64) -> Self {
        Self(Arc::new(AtomicU64::new(ratio.to_bits())))
    }

    /// The ratio in force.
    pub fn get(&self) -> f64 {
        f64::from_bits(self.0.load(Ordering::Relaxed))
    }

    /// Sets the ratio, clamped to 0..=1.
    pub fn set(&self, ratio: f64) {
        self.0
            .store(ratio.clamp(0.0, 1.0).to_bits(), Ordering::Relaxed);
    }

    /// The initial ratio from `OTEL_TRACES_SAMPLER` / `OTEL_TRACES_SAMPLER_ARG` (default 1).
    fn from_env() -> Self {
        let sampler = std::env::var("OTEL_TRACES_SAMPLER").unwrap_or_default();
        let arg = std::env::var("OTEL_TRACES_SAMPLER_ARG")
            .ok()
            .and_then(|a| a.parse::<f64>().ok());
        let ratio = match sampler.as_str() {
            "always_off" | "parentbased_always_off" => 0.0,
            "traceidratio" | "parentbased_traceidratio" => arg.unwrap_or(1.0),
            _ => 1.0,
        };
        Self::new(ratio)
    }
}

/// The process's telemetry: flush it at exit.
#[derive(Debug)]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
    ratio: SamplingRatio,
}

impl Telemetry {
    /// Whether spans are exported.
    pub fn exporting(&self) -> bool {
        self.provider.is_some()
    }

    /// The run-time sampling ratio.
    pub fn ratio(&self) -> SamplingRatio {
        self.ratio.clone()
    }

    /// Exports what is pending and stops the exporter, within a bound. The SDK blocks while
    /// flushing, so it runs on a blocking thread, never on the async runtime.
    pub async fn shutdown(self) {
        let Some(provider) = self.provider else {
            return;
        };
        let flush =
            tokio::task::spawn_blocking(move || provider.shutdown_with_timeout(FLUSH_TIMEOUT));
        match tokio::time::timeout(FLUSH_TIMEOUT + Duration::from_secs(1), flush).await {
            Ok(Ok(Ok(()))) => tracing::info!("pending spans exported"),
            Ok(Ok(Err(e))) => tracing::warn!(error = %e, "exporting pending spans failed"),
            _ => tracing::warn!("exporting pending spans timed out"),
        }
    }
}

fn exporter_configured() -> bool {
    let set = |k: &str| std::env::var(k).is_ok_and(|v| !v.trim().is_empty());
    std::env::var("OTEL_TRACES_EXPORTER").as_deref() != Ok("none")
        && (set("OTEL_EXPORTER_OTLP_ENDPOINT") || set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))
}

/// Installs logging (text or JSON on stderr, level from `RUST_LOG`) and, when an OTLP endpoint is
/// configured, span export for `service` with `instance_id` as `service.instance.id`. Must run
/// inside the tokio runtime. Calling it twice keeps the first.
pub fn init(log_format: &str, service: &str, instance_id: &str) -> Telemetry {
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    let ratio = SamplingRatio::from_env();
    let provider = if exporter_configured() {
        match build_provider(service, instance_id) {
            Ok(p) => Some(p),
            Err(e) => {
                eprintln!("warning: span export disabled: {e}");
                None
            }
        }
    } else {
        None
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new("info,h2=warn,hyper=warn,tower=warn,tonic=info")
    });
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    type Boxed = Box<dyn Layer<tracing_subscriber::Registry> + Send + Sync>;
    let logs: Boxed = if log_format == "json" {
        tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .with_writer(std::io::stderr)
            .with_filter(filter)
            .boxed()
    } else {
        tracing_subscriber::fmt::layer()
            .with_ansi(ansi)
            .with_writer(std::io::stderr)
            .with_filter(filter)
            .boxed()
    };
    // Only herd's own spans are exported: the exporter's transport (tonic, h2, hyper) must not
    // trace its own exports.
    let spans: Option<Boxed> = provider.as_ref().map(|p| {
        tracing_opentelemetry::layer()
            .with_tracer(p.tracer("herd"))
            .with_filter(tracing_subscriber::filter::filter_fn(|m| {
                m.target().starts_with("herd") && !m.target().starts_with("herd::unsampled")
            }))
            .boxed()
    });
    EXPORTING.store(provider.is_some(), Ordering::Relaxed);
    let _ = SAMPLING.set(ratio.clone());
    let mut layers = vec![logs];
    layers.extend(spans);
    let _ = tracing_subscriber::registry().with(layers).try_init();
    Telemetry { provider, ratio }
}

fn build_provider(
    service: &str,
    instance_id: &str,
) -> Result<SdkTracerProvider, opentelemetry_otlp::ExporterBuildError> {
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .build()?;
    let processor = SpanQueue::new(exporter);
    let mut resource = opentelemetry_sdk::Resource::builder();
    if std::env::var("OTEL_SERVICE_NAME").is_err() {
        resource = resource.with_service_name(format!("herd-{service}"));
    }
    let resource = resource
        .with_attributes([
            KeyValue::new("service.version", env!("CARGO_PKG_VERSION")),
            KeyValue::new("service.instance.id", instance_id.to_string()),
        ])
        .build();
    Ok(SdkTracerProvider::builder()
        .with_span_processor(processor)
        // herd makes the head decision itself (see `serve`) before a span reaches the SDK.
        .with_sampler(Sampler::ParentBased(Box::new(Sampler::AlwaysOn)))
        .with_resource(resource)
        .build())
}

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
fn parent_of(metadata: &MetadataMap, context: Option<&RequestContext>) -> Context {
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
fn split_method(path: &str) -> (&str, &str) {
    path.rsplit_once('/').unwrap_or((path, ""))
}

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
    let local = request.local_addr();
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
        tracing::warn!(parent: &span, rpc.grpc.status_code = code as i64, error = status.message(), "call failed");
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

/// Copies the message's own trace context, if any, into the headers.
fn mirror_trace(context: Option<&RequestContext>, metadata: &mut MetadataMap) {
    let Some(trace) = context
        .and_then(|c| c.trace.as_ref())
        .filter(|t| !t.traceparent.is_empty())
    else {
        return;
    };
    let mut injector = MetadataInjector(metadata);
    injector.set("traceparent", trace.traceparent.clone());
    if !trace.tracestate.is_empty() {
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
        tracing::warn!(parent: span, rpc.grpc.status_code = code as i64, %error, "outgoing call failed");
    }
}

/// Records a quote id on the current server span.
pub fn record_quote_id(quote_id: &str) {
    tracing::Span::current().record("herd.quote_id", quote_id);
}

/// Applies the sampling ratio of `/herd/config/telemetry` as each configuration revision is
/// applied; without the section, the ratio the process started with.
pub async fn follow_sampling(
    mut runtime: tokio::sync::watch::Receiver<crate::config::RuntimeConfig>,
    ratio: SamplingRatio,
) {
    let initial = ratio.get();
    loop {
        let wanted = runtime
            .borrow_and_update()
            .telemetry
            .as_ref()
            .map_or(initial, |t| t.sampling_ratio);
        if wanted != ratio.get() {
            tracing::info!(ratio = wanted, "sampling ratio applied");
            ratio.set(wanted);
        }
        if runtime.changed().await.is_err() {
            return;
        }
    }
}

/// A bounded span queue exported in batches from its own thread. A span that finds the queue full
/// is dropped and counted, never waited for: a collector that is down or slow costs requests
/// nothing. Counts are logged when dropping starts, at every power of two, on export failures (at
/// most every ten seconds) and at shutdown.
#[derive(Debug)]
struct SpanQueue {
    tx: std::sync::mpsc::SyncSender<QueueMsg>,
    stats: Arc<QueueStats>,
    thread: std::sync::Mutex<Option<std::thread::JoinHandle<()>>>,
}

#[derive(Debug, Default)]
struct QueueStats {
    dropped: AtomicU64,
    exported: AtomicU64,
    failed: AtomicU64,
}

enum QueueMsg {
    Span(Box<opentelemetry_sdk::trace::SpanData>),
    Resource(opentelemetry_sdk::Resource),
    Flush(std::sync::mpsc::SyncSender<()>),
    Shutdown(std::sync::mpsc::SyncSender<()>),
}

/// Most spans in one export.
const MAX_BATCH: usize = 512;
/// Least time between two export-failure warnings.
const FAILURE_LOG_EVERY: Duration = Duration::from_secs(10);

impl SpanQueue {
    fn new<E: opentelemetry_sdk::trace::SpanExporter + 'static>(exporter: E) -> Self {
        let (tx, rx) = std::sync::mpsc::sync_channel(QUEUE_SPANS);
        let stats = Arc::new(QueueStats::default());
        let thread_stats = stats.clone();
        let thread = std::thread::Builder::new()
            .name("herd-span-export".into())
            .spawn(move || export_loop(exporter, rx, thread_stats))
            .ok();
        Self {
            tx,
            stats,
            thread: std::sync::Mutex::new(thread),
        }
    }

    fn ask(
        &self,
        msg: fn(std::sync::mpsc::SyncSender<()>) -> QueueMsg,
        timeout: Duration,
    ) -> opentelemetry_sdk::error::OTelSdkResult {
        let (ack, done) = std::sync::mpsc::sync_channel(1);
        self.tx
            .send(msg(ack))
            .map_err(|e| opentelemetry_sdk::error::OTelSdkError::InternalFailure(e.to_string()))?;
        done.recv_timeout(timeout)
            .map_err(|_| opentelemetry_sdk::error::OTelSdkError::Timeout(timeout))
    }
}

impl opentelemetry_sdk::trace::SpanProcessor for SpanQueue {
    fn on_start(&self, _span: &mut opentelemetry_sdk::trace::Span, _cx: &Context) {}

    fn on_end(&self, span: opentelemetry_sdk::trace::SpanData) {
        if !span.span_context.is_sampled() {
            return;
        }
        if let Err(std::sync::mpsc::TrySendError::Full(_)) =
            self.tx.try_send(QueueMsg::Span(Box::new(span)))
        {
            let dropped = self.stats.dropped.fetch_add(1, Ordering::Relaxed) + 1;
            if dropped.is_power_of_two() {
                tracing::warn!(
                    dropped_spans = dropped,
                    queue = QUEUE_SPANS,
                    "span export queue full; dropping spans"
                );
            }
        }
    }

    fn force_flush(&self) -> opentelemetry_sdk::error::OTelSdkResult {
        self.ask(QueueMsg::Flush, FLUSH_TIMEOUT)
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> opentelemetry_sdk::error::OTelSdkResult {
        let result = self.ask(QueueMsg::Shutdown, timeout);
        if let (Ok(()), Some(thread)) =
            (&result, self.thread.lock().ok().and_then(|mut t| t.take()))
        {
            let _ = thread.join();
        }
        tracing::info!(
            exported_spans = self.stats.exported.load(Ordering::Relaxed),
            failed_spans = self.stats.failed.load(Ordering::Relaxed),
            dropped_spans = self.stats.dropped.load(Ordering::Relaxed),
            "span export stopped"
        );
        result
    }

    fn set_resource(&mut self, resource: &opentelemetry_sdk::Resource) {
        let _ = self.tx.try_send(QueueMsg::Resource(resource.clone()));
    }
}

fn export_loop<E: opentelemetry_sdk::trace::SpanExporter>(
    mut exporter: E,
    rx: std::sync::mpsc::Receiver<QueueMsg>,
    stats: Arc<QueueStats>,
) {
    let mut batch: Vec<opentelemetry_sdk::trace::SpanData> = Vec::with_capacity(MAX_BATCH);
    let mut last_failure_log: Option<std::time::Instant> = None;
    let mut export = |batch: &mut Vec<opentelemetry_sdk::trace::SpanData>, exporter: &E| {
        if batch.is_empty() {
            return;
        }
        let n = batch.len() as u64;
        match futures::executor::block_on(exporter.export(std::mem::take(batch))) {
            Ok(()) => {
                stats.exported.fetch_add(n, Ordering::Relaxed);
            }
            Err(e) => {
                let failed = stats.failed.fetch_add(n, Ordering::Relaxed) + n;
                if last_failure_log.is_none_or(|t| t.elapsed() >= FAILURE_LOG_EVERY) {
                    last_failure_log = Some(std::time::Instant::now());
                    tracing::warn!(error = %e, failed_spans = failed, "exporting spans failed; they are lost, requests are not affected");
                }
            }
        }
    };
    let mut due = std::time::Instant::now() + EXPORT_DELAY;
    loop {
        let wait = due.saturating_duration_since(std::time::Instant::now());
        match rx.recv_timeout(wait) {
            Ok(QueueMsg::Span(span)) => {
                batch.push(*span);
                if batch.len() >= MAX_BATCH {
                    export(&mut batch, &exporter);
                }
            }
            Ok(QueueMsg::Resource(resource)) => exporter.set_resource(&resource),
            Ok(QueueMsg::Flush(ack)) => {
                while let Ok(QueueMsg::Span(span)) = rx.try_recv() {
                    batch.push(*span);
                }
                export(&mut batch, &exporter);
                let _ = ack.send(());
            }
            Ok(QueueMsg::Shutdown(ack)) => {
                while let Ok(QueueMsg::Span(span)) = rx.try_recv() {
                    batch.push(*span);
                }
                export(&mut batch, &exporter);
                let _ = exporter.shutdown();
                let _ = ack.send(());
                return;
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                export(&mut batch, &exporter);
                due = std::time::Instant::now() + EXPORT_DELAY;
            }
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                export(&mut batch, &exporter);
                return;
            }
        }
    }
}
