//! Following one request across every instance it touches: logs with `tracing`, spans exported
//! with OpenTelemetry over OTLP/gRPC, W3C trace context on every hop.
//!
//! Configured by the standard variables: `OTEL_EXPORTER_OTLP_ENDPOINT` (or
//! `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) turns export on; `OTEL_SERVICE_NAME` and
//! `OTEL_RESOURCE_ATTRIBUTES` shape the resource; `OTEL_TRACES_SAMPLER` / `OTEL_TRACES_SAMPLER_ARG`
//! set the initial ratio of the parent-based ratio sampler, which `/herd/config/telemetry` changes
//! at run time. With no endpoint nothing is exported and nothing is paid beyond plain `tracing`
//! spans for logs.
//!
//! Every server call runs in a `rpc.server` span ([`serve`]) whose parent is the caller's
//! `traceparent` header, or the one carried in the message's `RequestContext`; every outgoing call
//! ([`client::call`](crate::client::call)) runs in a `rpc.client` span whose context is injected
//! into both the metadata and the message. Span names and attributes follow the OpenTelemetry RPC
//! conventions. A sampled call's spans are made with the OpenTelemetry SDK's tracer directly, not
//! through a `tracing` layer: a `tracing` span still frames the call's logs (which carry its
//! `trace_id` and `span_id`), and a task-local ties the server span to the client spans and the
//! attributes its handler records.
//!
//! Parts: `sampling` (the ratio and `/herd/config/telemetry`), `server` (server spans),
//! `propagation` (trace context between hops, client spans), `export` (the span queue and the
//! OTLP exporter), `budget` (failures logged at a bounded rate); this module installs logs and
//! export.

mod budget;
mod export;
pub(crate) mod otlp;
mod propagation;
mod sampling;
mod server;

use std::time::Duration;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{SdkTracer, SdkTracerProvider};
use tracing_subscriber::Layer;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

pub(crate) use export::{SpanCounts, span_counts};
pub(crate) use propagation::{PeerSpan, TRACEPARENT, client_result, client_span};
pub(crate) use sampling::apply as apply_sampling;
pub use sampling::{SamplingRatio, TelemetrySection};
pub use server::{record_context, record_quote_id, serve};

/// Bound on flushing pending spans at shutdown.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(5);

/// The tracer of exported spans, once export is on: without it no trace context is extracted or
/// created, only passed on.
static TRACER: std::sync::OnceLock<SdkTracer> = std::sync::OnceLock::new();

/// The ratio new traces are sampled at, once telemetry is initialised.
static SAMPLING: std::sync::OnceLock<SamplingRatio> = std::sync::OnceLock::new();

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

/// The resource every signal of the instance names: `service.name` (`herd-<service>` unless
/// `OTEL_SERVICE_NAME` says otherwise; `OTEL_RESOURCE_ATTRIBUTES` adds to it),
/// `service.version`, `service.instance.id`.
pub(crate) fn resource(service: &str, instance_id: &str) -> opentelemetry_sdk::Resource {
    let mut resource = opentelemetry_sdk::Resource::builder();
    if std::env::var("OTEL_SERVICE_NAME").is_err() {
        resource = resource.with_service_name(format!("herd-{service}"));
    }
    resource
        .with_attributes([
            opentelemetry::KeyValue::new("service.version", env!("CARGO_PKG_VERSION")),
            opentelemetry::KeyValue::new("service.instance.id", instance_id.to_string()),
        ])
        .build()
}

/// Installs logging (text or JSON on stderr, level from `RUST_LOG`) and, when an OTLP endpoint is
/// configured, span export for `service` with `instance_id` as `service.instance.id`. Must run
/// inside the tokio runtime. Calling it twice keeps the first.
pub fn init(log_format: &str, service: &str, instance_id: &str) -> Telemetry {
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    let ratio = SamplingRatio::from_env();
    let provider = if otlp::configured("TRACES") {
        match export::build_provider(service, instance_id) {
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
    type Filtered = tracing_subscriber::layer::Layered<
        tracing_subscriber::EnvFilter,
        tracing_subscriber::Registry,
    >;
    type Boxed = Box<dyn Layer<Filtered> + Send + Sync>;
    let logs: Boxed = if log_format == "json" {
        tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .with_writer(std::io::stderr)
            .boxed()
    } else {
        tracing_subscriber::fmt::layer()
            .with_ansi(ansi)
            .with_writer(std::io::stderr)
            .boxed()
    };
    if let Some(provider) = &provider {
        let _ = TRACER.set(provider.tracer("herd"));
    }
    let _ = SAMPLING.set(ratio.clone());
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(logs)
        .try_init();
    Telemetry { provider, ratio }
}
