//! Golden metrics of every hop: rate, errors and duration of the calls an instance serves and
//! makes, and the state of its runtime, kept with OpenTelemetry's metrics SDK and read out two
//! standard ways: a Prometheus text endpoint (`GET /metrics` on `--metrics-listen`, see
//! [`exposition`]) and OTLP pushes when a collector is configured (`push`).
//!
//! Names follow OpenTelemetry's RPC semantic conventions; Prometheus sees them with dots made
//! underscores and the unit appended (`rpc.server.duration` is `rpc_server_duration_seconds`).
//! Labels stay bounded: service, method, status code, reason; never a tenant, request id or SKU.
//!
//! | metric | kind | attributes |
//! | --- | --- | --- |
//! | `rpc.server.duration` (s) | histogram | `rpc.system`, `rpc.service`, `rpc.method`, `rpc.grpc.status_code` |
//! | `rpc.client.duration` (s), one per attempt | histogram | the same, of the callee |
//! | `herd.server.in_flight`, `herd.server.concurrency_limit` | gauge | |
//! | `herd.server.refused` | counter | `rpc.service`, `reason` |
//! | `herd.client.in_flight` | gauge | |
//! | `herd.client.retries`, `herd.client.retries_throttled` | counter | `rpc.service`, `rpc.method` |
//! | `herd.client.endpoints`, `herd.client.ready_endpoints`, `herd.client.retry_budget` | gauge | `herd.service` (the callee as registered: `pricing`) |
//! | `herd.registration.registered` | gauge | |
//! | `herd.config.revision`, `herd.config.rejected_revision` | gauge | |
//! | `herd.spans.exported`, `herd.spans.dropped`, `herd.spans.failed` | counter | |
//!
//! Nothing is recorded, and nothing paid, unless one of the two ways out is configured.

pub mod exposition;
mod push;

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError, Weak};
use std::time::Duration;

use opentelemetry::KeyValue;
use opentelemetry::metrics::{Counter, Histogram, Meter, MeterProvider as _};
use opentelemetry_sdk::metrics::{ManualReader, SdkMeterProvider};
use tokio::sync::watch;

use crate::config::ConfigStatus;
use crate::limit::Limiter;

/// Upper bounds of the duration buckets, in seconds: a hop on loopback takes tens of
/// microseconds, a quote a few hundred; the top buckets catch timeouts.
const BUCKETS: [f64; 18] = [
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0, 30.0,
];

/// The instruments calls record into, once metrics are on.
struct Instruments {
    server_duration: Histogram<f64>,
    client_duration: Histogram<f64>,
    refused: Counter<u64>,
    retries: Counter<u64>,
    throttled: Counter<u64>,
}

static INSTRUMENTS: OnceLock<Instruments> = OnceLock::new();

/// Outgoing attempts in flight, all channels together.
static CLIENT_IN_FLIGHT: AtomicI64 = AtomicI64::new(0);

/// The process's metrics: the reader both ways out collect from, and the OTLP push if any.
#[derive(Debug)]
pub struct Metrics {
    provider: SdkMeterProvider,
    reader: Arc<ManualReader>,
    push: Option<push::Push>,
}

/// Why metrics could not be turned on.
#[derive(Debug, thiserror::Error)]
#[error("metrics: {0}")]
pub struct MetricsError(String);

impl Metrics {
    /// The reader a Prometheus scrape collects from.
    pub(crate) fn reader(&self) -> Arc<ManualReader> {
        self.reader.clone()
    }

    /// Pushes the final values (when pushing) and stops.
    pub async fn shutdown(self) {
        if let Some(push) = self.push {
            push.stop().await;
        }
        let _ = self.provider.shutdown();
    }
}

/// Turns metrics on for `service` (`instance_id` names it in pushes) when `listening` (a
/// Prometheus endpoint will be served) or an OTLP metrics collector is configured
/// (`OTEL_EXPORTER_OTLP_METRICS_ENDPOINT` or `OTEL_EXPORTER_OTLP_ENDPOINT`, unless
/// `OTEL_METRICS_EXPORTER=none`); `None` otherwise. Must run inside the tokio runtime. Only the
/// first call in a process turns them on.
pub fn init(
    service: &str,
    instance_id: &str,
    listening: bool,
) -> Result<Option<Metrics>, MetricsError> {
    let pushing = crate::telemetry::otlp::configured("METRICS");
    if !(listening || pushing) || INSTRUMENTS.get().is_some() {
        return Ok(None);
    }
    let reader = Arc::new(ManualReader::builder().build());
    let resource = crate::telemetry::resource(service, instance_id);
    let provider = SdkMeterProvider::builder()
        .with_reader(SharedReader(reader.clone()))
        .with_resource(resource)
        .build();
    let meter = provider.meter("herd");
    let _ = INSTRUMENTS.set(instruments(&meter));
    observe_state(&meter);
    let push = if pushing {
        Some(push::Push::start(reader.clone()).map_err(MetricsError)?)
    } else {
        None
    };
    Ok(Some(Metrics {
        provider,
        reader,
        push,
    }))
}

fn instruments(meter: &Meter) -> Instruments {
    let duration = |name: &'static str, what: &'static str| {
        meter
            .f64_histogram(name)
            .with_unit("s")
            .with_description(what)
            .with_boundaries(BUCKETS.to_vec())
            .build()
    };
    Instruments {
        server_duration: duration(
            "rpc.server.duration",
            "Duration of calls served, by method and status code",
        ),
        client_duration: duration(
            "rpc.client.duration",
            "Duration of outgoing call attempts, by callee method and status code",
        ),
        refused: meter
            .u64_counter("herd.server.refused")
            .with_description(
                "Calls refused before their handler ran, by reason (overloaded, deadline, \
                 unauthorized, invalid, rate_limited)",
            )
            .build(),
        retries: meter
            .u64_counter("herd.client.retries")
            .with_description("Outgoing attempts that were retries of a call not processed")
            .build(),
        throttled: meter
            .u64_counter("herd.client.retries_throttled")
            .with_description("Retries not made because the retry budget was spent")
            .build(),
    }
}

/// Whether metrics are on: calls are measured only then.
pub(crate) fn on() -> bool {
    INSTRUMENTS.get().is_some()
}

/// `[rpc.system, rpc.service, rpc.method, rpc.grpc.status_code]` of a call of `path`
/// (`package.Service/Method`).
fn rpc_attributes(path: &'static str, code: tonic::Code) -> [KeyValue; 4] {
    let (service, method) = split(path);
    [
        KeyValue::new("rpc.system", "grpc"),
        KeyValue::new("rpc.service", service),
        KeyValue::new("rpc.method", method),
        KeyValue::new("rpc.grpc.status_code", code as i64),
    ]
}

fn split(path: &'static str) -> (&'static str, &'static str) {
    let path = path.strip_prefix('/').unwrap_or(path);
    path.rsplit_once('/').unwrap_or((path, ""))
}

/// Records a call of `path` served in `elapsed`, ending with `code`.
pub(crate) fn served(path: &'static str, code: tonic::Code, elapsed: Duration) {
    if let Some(m) = INSTRUMENTS.get() {
        m.server_duration
            .record(elapsed.as_secs_f64(), &rpc_attributes(path, code));
    }
}

/// Records an outgoing attempt of `path` that took `elapsed` and ended with `code`.
pub(crate) fn attempted(path: &'static str, code: tonic::Code, elapsed: Duration) {
    if let Some(m) = INSTRUMENTS.get() {
        m.client_duration
            .record(elapsed.as_secs_f64(), &rpc_attributes(path, code));
    }
}

/// Counts an outgoing attempt in flight until the guard is dropped.
pub(crate) fn attempt_in_flight() -> InFlight {
    CLIENT_IN_FLIGHT.fetch_add(1, Ordering::Relaxed);
    InFlight(())
}

/// An outgoing attempt in flight (see [`attempt_in_flight`]).
pub(crate) struct InFlight(());

impl Drop for InFlight {
    fn drop(&mut self) {
        CLIENT_IN_FLIGHT.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Records a retry of a call of `path`.
pub(crate) fn retried(path: &'static str) {
    count_call(path, |m| &m.retries);
}

/// Records a retry of a call of `path` that the retry budget did not allow.
pub(crate) fn throttled(path: &'static str) {
    count_call(path, |m| &m.throttled);
}

/// Adds one to the counter `of` picks, for the service and method of `path`.
fn count_call(path: &'static str, of: fn(&Instruments) -> &Counter<u64>) {
    if let Some(m) = INSTRUMENTS.get() {
        let (service, method) = split(path);
        of(m).add(
            1,
            &[
                KeyValue::new("rpc.service", service),
                KeyValue::new("rpc.method", method),
            ],
        );
    }
}

/// Why a call was refused before its handler ran.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Over the instance's concurrency limit (`UNAVAILABLE`).
    Overloaded,
    /// Its deadline was spent, or shorter than a call takes here (`DEADLINE_EXCEEDED`).
    Deadline,
    /// The caller may not call the service (`PERMISSION_DENIED`, `UNAUTHENTICATED`).
    Unauthorized,
    /// Its `grpc-timeout` or first message was malformed (`INVALID_ARGUMENT`).
    Invalid,
    /// Its tenant was over its rate (`RESOURCE_EXHAUSTED`).
    RateLimited,
}

impl Refusal {
    /// The `reason` attribute.
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::Overloaded => "overloaded",
            Refusal::Deadline => "deadline",
            Refusal::Unauthorized => "unauthorized",
            Refusal::Invalid => "invalid",
            Refusal::RateLimited => "rate_limited",
        }
    }
}

/// Records a call to `service` (`package.Service`) refused for `reason`.
pub fn refused(service: &'static str, reason: Refusal) {
    if let Some(m) = INSTRUMENTS.get() {
        m.refused.add(
            1,
            &[
                KeyValue::new("rpc.service", service),
                KeyValue::new("reason", reason.as_str()),
            ],
        );
    }
}

/// What the observed gauges read: set by the parts of the instance as they start.
#[derive(Default)]
struct Sources {
    config: Option<watch::Receiver<ConfigStatus>>,
    registered: Option<watch::Receiver<bool>>,
    limiter: Weak<Limiter>,
    channels: Vec<Box<dyn Fn() -> Option<ChannelState> + Send>>,
}

static SOURCES: Mutex<Sources> = Mutex::new(Sources {
    config: None,
    registered: None,
    limiter: Weak::new(),
    channels: Vec::new(),
});

fn sources() -> std::sync::MutexGuard<'static, Sources> {
    SOURCES.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The state of one channel to a callee.
pub(crate) struct ChannelState {
    /// The callee's service name.
    pub(crate) service: Arc<str>,
    /// Instances discovered.
    pub(crate) endpoints: usize,
    /// Instances offered to the balancer (connected, SERVING).
    pub(crate) ready: usize,
    /// Retry tokens left.
    pub(crate) budget: f64,
}

/// The instance's configuration status, for `herd.config.*`.
pub(crate) fn watch_config(status: watch::Receiver<ConfigStatus>) {
    sources().config = Some(status);
}

/// Whether the instance is registered, for `herd.registration.registered`.
pub(crate) fn watch_registration(registered: watch::Receiver<bool>) {
    sources().registered = Some(registered);
}

/// The instance's admission limiter, for `herd.server.in_flight` and its limit.
pub(crate) fn watch_limiter(limiter: &Arc<Limiter>) {
    sources().limiter = Arc::downgrade(limiter);
}

/// A channel's state, read by `state` until it returns `None` (the channel is gone).
pub(crate) fn watch_channel(state: impl Fn() -> Option<ChannelState> + Send + 'static) {
    if INSTRUMENTS.get().is_some() {
        sources().channels.push(Box::new(state));
    }
}

/// The gauges read from the instance's state at each collection.
fn observe_state(meter: &Meter) {
    let gauge = |name: &'static str, what: &'static str, read: fn(&Sources) -> Option<i64>| {
        meter
            .i64_observable_gauge(name)
            .with_description(what)
            .with_callback(move |observer| {
                if let Some(value) = read(&sources()) {
                    observer.observe(value, &[]);
                }
            })
            .build()
    };
    gauge(
        "herd.server.in_flight",
        "Calls in flight at this instance (admitted by its concurrency limit)",
        |s| Some(i64::from(s.limiter.upgrade()?.in_flight())),
    );
    gauge(
        "herd.server.concurrency_limit",
        "The instance's adaptive concurrency limit",
        |s| Some(i64::from(s.limiter.upgrade()?.limit())),
    );
    gauge(
        "herd.registration.registered",
        "1 while the instance is registered in etcd, else 0",
        |s| Some(i64::from(*s.registered.as_ref()?.borrow())),
    );
    gauge(
        "herd.config.revision",
        "Revision of the configuration in use (0 before the first valid one)",
        |s| Some(s.config.as_ref()?.borrow().applied),
    );
    gauge(
        "herd.config.rejected_revision",
        "The latest configuration revision rejected (0 if none since start)",
        |s| {
            Some(
                s.config
                    .as_ref()?
                    .borrow()
                    .rejected
                    .as_ref()
                    .map_or(0, |r| r.revision),
            )
        },
    );
    meter
        .i64_observable_gauge("herd.client.in_flight")
        .with_description("Outgoing call attempts in flight")
        .with_callback(|observer| observer.observe(CLIENT_IN_FLIGHT.load(Ordering::Relaxed), &[]))
        .build();
    let channels = |name: &'static str, what: &'static str, read: fn(&ChannelState) -> f64| {
        meter
            .f64_observable_gauge(name)
            .with_description(what)
            .with_callback(move |observer| {
                for (service, value) in channel_values(read) {
                    observer.observe(value, &[KeyValue::new("herd.service", service.to_string())]);
                }
            })
            .build()
    };
    channels(
        "herd.client.endpoints",
        "Instances of the callee service discovered",
        |c| c.endpoints as f64,
    );
    channels(
        "herd.client.ready_endpoints",
        "Instances of the callee service ready to take calls (0: every call fails at once)",
        |c| c.ready as f64,
    );
    channels(
        "herd.client.retry_budget",
        "Retry tokens left for calls to the callee (retries stop at 5 of 10)",
        |c| c.budget,
    );
    let spans =
        |name: &'static str, what: &'static str, read: fn(&crate::telemetry::SpanCounts) -> u64| {
            meter
                .u64_observable_counter(name)
                .with_description(what)
                .with_callback(move |observer| {
                    if let Some(counts) = crate::telemetry::span_counts() {
                        observer.observe(read(&counts), &[]);
                    }
                })
                .build()
        };
    spans("herd.spans.exported", "Spans sent to the collector", |c| {
        c.exported
    });
    spans(
        "herd.spans.dropped",
        "Spans dropped because the export queue was full",
        |c| c.dropped,
    );
    spans("herd.spans.failed", "Spans whose export failed", |c| {
        c.failed
    });
}

/// `read` of every live channel, one value per callee (the largest, if several channels lead
/// to the same service); channels that are gone are forgotten.
fn channel_values(read: fn(&ChannelState) -> f64) -> Vec<(Arc<str>, f64)> {
    let mut values: Vec<(Arc<str>, f64)> = Vec::new();
    sources().channels.retain(|state| {
        let Some(state) = state() else {
            return false;
        };
        let value = read(&state);
        match values.iter_mut().find(|(s, _)| *s == state.service) {
            Some((_, v)) => *v = v.max(value),
            None => values.push((state.service, value)),
        }
        true
    });
    values
}

/// A [`ManualReader`] shared between the meter provider and the ways out.
#[derive(Debug)]
struct SharedReader(Arc<ManualReader>);

impl opentelemetry_sdk::metrics::reader::MetricReader for SharedReader {
    fn register_pipeline(&self, pipeline: Weak<opentelemetry_sdk::metrics::Pipeline>) {
        self.0.register_pipeline(pipeline);
    }

    fn collect(
        &self,
        rm: &mut opentelemetry_sdk::metrics::data::ResourceMetrics,
    ) -> opentelemetry_sdk::error::OTelSdkResult {
        self.0.collect(rm)
    }

    fn force_flush(&self) -> opentelemetry_sdk::error::OTelSdkResult {
        self.0.force_flush()
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> opentelemetry_sdk::error::OTelSdkResult {
        self.0.shutdown_with_timeout(timeout)
    }

    fn temporality(
        &self,
        kind: opentelemetry_sdk::metrics::InstrumentKind,
    ) -> opentelemetry_sdk::metrics::Temporality {
        self.0.temporality(kind)
    }
}

/// The metrics of a unit-test binary, turned on by the first test that asks.
#[cfg(test)]
pub(crate) fn for_tests() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(|| {
        init("test", "test-1", true)
            .ok()
            .flatten()
            .expect("nothing else turns metrics on in unit tests")
    })
}

#[cfg(test)]
impl Metrics {
    /// `name` summed over its points with every attribute of `with`: counters' values,
    /// histograms' counts.
    pub(crate) fn total(&self, name: &str, with: &[(&str, &str)]) -> f64 {
        use opentelemetry_sdk::metrics::data::{AggregatedMetrics, MetricData, ResourceMetrics};
        use opentelemetry_sdk::metrics::reader::MetricReader as _;
        let mut collected = ResourceMetrics::default();
        self.reader.collect(&mut collected).expect("collects");
        let of = |attributes: Vec<&KeyValue>| {
            with.iter().all(|(key, value)| {
                attributes
                    .iter()
                    .any(|kv| kv.key.as_str() == *key && kv.value.as_str() == *value)
            })
        };
        let mut total = 0.0;
        for metric in collected
            .scope_metrics()
            .flat_map(|s| s.metrics())
            .filter(|m| m.name() == name)
        {
            match metric.data() {
                AggregatedMetrics::U64(MetricData::Sum(sum)) => {
                    for point in sum.data_points() {
                        if of(point.attributes().collect()) {
                            total += point.value() as f64;
                        }
                    }
                }
                AggregatedMetrics::F64(MetricData::Histogram(histogram)) => {
                    for point in histogram.data_points() {
                        if of(point.attributes().collect()) {
                            total += point.count() as f64;
                        }
                    }
                }
                _ => {}
            }
        }
        total
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(service: &str, ready: usize) -> ChannelState {
        ChannelState {
            service: service.into(),
            endpoints: 3,
            ready,
            budget: 10.0,
        }
    }

    #[test]
    fn channels_to_one_callee_give_one_value_and_gone_channels_are_forgotten() {
        let gone = Arc::new(());
        let weak = Arc::downgrade(&gone);
        drop(gone);
        {
            let mut sources = sources();
            sources.channels.clear();
            sources
                .channels
                .push(Box::new(|| Some(state("t-pricing", 1))));
            sources
                .channels
                .push(Box::new(|| Some(state("t-pricing", 3))));
            sources.channels.push(Box::new(|| Some(state("t-tax", 2))));
            sources
                .channels
                .push(Box::new(move || weak.upgrade().map(|_| state("t-gone", 1))));
        }
        let mut values = channel_values(|c| c.ready as f64);
        values.sort_by(|a, b| a.0.cmp(&b.0));
        let values: Vec<(&str, f64)> = values.iter().map(|(s, v)| (&**s, *v)).collect();
        assert_eq!(values, [("t-pricing", 3.0), ("t-tax", 2.0)]);
        assert_eq!(sources().channels.len(), 3, "the gone channel is forgotten");
        sources().channels.clear();
    }

    #[test]
    fn a_path_splits_into_service_and_method() {
        assert_eq!(
            split("/herd.tax.v1.TaxService/ComputeTax"),
            ("herd.tax.v1.TaxService", "ComputeTax")
        );
        assert_eq!(
            split("herd.tax.v1.TaxService/ComputeTax"),
            ("herd.tax.v1.TaxService", "ComputeTax")
        );
    }
}
