//! Span export: the OTLP exporter behind a bounded queue drained by its own thread.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use opentelemetry::Context;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider, SpanData};

use super::FLUSH_TIMEOUT;

/// Spans waiting for export unless `OTEL_BSP_MAX_QUEUE_SIZE` says otherwise; beyond this they
/// are dropped and counted rather than slowing or failing a request.
const DEFAULT_QUEUE_SPANS: usize = 8192;
/// How long spans wait for a batch to fill before they are exported anyway, unless
/// `OTEL_BSP_SCHEDULE_DELAY` (milliseconds) says otherwise: the specification's default. Under
/// load batches fill and leave long before; at a low rate one export carries the spans of five
/// seconds rather than each trace paying for an export of its own.
const DEFAULT_SCHEDULE_DELAY: Duration = Duration::from_secs(5);

/// The schedule delay `OTEL_BSP_SCHEDULE_DELAY` (`value`) asks for: a positive number of
/// milliseconds, else the default.
fn schedule_delay(value: Option<&str>) -> Duration {
    super::otlp::positive(value).map_or(DEFAULT_SCHEDULE_DELAY, Duration::from_millis)
}

/// The queue size `OTEL_BSP_MAX_QUEUE_SIZE` (`value`) asks for: a positive number of spans, at
/// least a batch, else the default.
fn queue_spans(value: Option<&str>) -> usize {
    super::otlp::positive(value).map_or(DEFAULT_QUEUE_SPANS, |n| {
        usize::try_from(n).unwrap_or(usize::MAX).max(MAX_BATCH)
    })
}

/// How the span queue holds spans: how many at most, and how long a lone one waits.
#[derive(Debug, Clone, Copy)]
struct QueueLimits {
    spans: usize,
    delay: Duration,
}

impl QueueLimits {
    /// From `OTEL_BSP_MAX_QUEUE_SIZE` and `OTEL_BSP_SCHEDULE_DELAY`.
    fn from_env() -> Self {
        let var = |name| std::env::var(name).ok();
        Self {
            spans: queue_spans(var("OTEL_BSP_MAX_QUEUE_SIZE").as_deref()),
            delay: schedule_delay(var("OTEL_BSP_SCHEDULE_DELAY").as_deref()),
        }
    }
}

/// The tracer provider: the OTLP exporter behind a [`SpanQueue`], the resource naming the instance.
pub(super) fn build_provider(
    service: &str,
    instance_id: &str,
) -> Result<SdkTracerProvider, String> {
    let processor = SpanQueue::new(super::otlp::OtlpExporter::from_env, QueueLimits::from_env())?;
    if let Ok(mut exported) = EXPORTED.lock() {
        *exported = Arc::downgrade(&processor.shared);
    }
    Ok(SdkTracerProvider::builder()
        .with_span_processor(processor)
        // herd makes the head decision itself (see `serve`) before a span reaches the SDK.
        .with_sampler(Sampler::ParentBased(Box::new(Sampler::AlwaysOn)))
        .with_resource(super::resource(service, instance_id))
        .build())
}

/// The span queue of the process's tracer provider, for its counts.
static EXPORTED: Mutex<std::sync::Weak<Shared>> = Mutex::new(std::sync::Weak::new());

/// Spans the process has exported, dropped (the queue was full) and failed to export, while span
/// export is on.
pub(crate) fn span_counts() -> Option<SpanCounts> {
    let shared = EXPORTED.lock().ok()?.upgrade()?;
    let stats = &shared.stats;
    Some(SpanCounts {
        exported: stats.exported.load(Ordering::Relaxed),
        dropped: stats.dropped.load(Ordering::Relaxed),
        failed: stats.failed.load(Ordering::Relaxed),
    })
}

/// What became of the spans the process ended.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SpanCounts {
    /// Sent to the collector.
    pub(crate) exported: u64,
    /// Dropped: the queue was full.
    pub(crate) dropped: u64,
    /// Sent, and the export failed.
    pub(crate) failed: u64,
}

/// A bounded span queue exported in batches from its own thread. Ending a span takes a lock held
/// for one push and wakes the export thread only when a whole batch is waiting: the thread
/// otherwise wakes by itself every schedule delay, so a request never pays for a thread switch.
/// A span that finds the queue full is dropped and counted, never waited for: a collector that is
/// down or slow costs requests nothing. Counts are logged when dropping starts, at every power of
/// two, on export failures (at most every ten seconds) and at shutdown.
#[derive(Debug)]
struct SpanQueue {
    shared: Arc<Shared>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

/// What the requests' threads and the export thread share.
#[derive(Debug)]
struct Shared {
    waiting: Mutex<Waiting>,
    /// Signalled when a batch is complete, or a flush, a shutdown or a resource is asked for.
    wake: Condvar,
    stats: QueueStats,
    /// The most spans that wait; one more is dropped.
    capacity: usize,
}

/// Spans and requests waiting for the export thread.
#[derive(Debug, Default)]
struct Waiting {
    spans: Vec<SpanData>,
    asks: Vec<Ask>,
    /// The queue was dropped without a shutdown: export what waits and stop.
    closed: bool,
}

#[derive(Debug, Default)]
struct QueueStats {
    dropped: AtomicU64,
    exported: AtomicU64,
    failed: AtomicU64,
}

#[derive(Debug)]
enum Ask {
    Resource(opentelemetry_sdk::Resource),
    Flush(std::sync::mpsc::SyncSender<()>),
    Shutdown(std::sync::mpsc::SyncSender<()>),
}

/// Most spans in one export; a batch this size wakes the export thread at once.
const MAX_BATCH: usize = 512;
/// Least time between two export-failure warnings.
const FAILURE_LOG_EVERY: Duration = Duration::from_secs(10);

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Waiting> {
        self.waiting.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn ask(&self, ask: Ask) {
        self.lock().asks.push(ask);
        self.wake.notify_one();
    }
}

impl SpanQueue {
    /// Starts the export thread, which makes the exporter with `make` inside a runtime of its
    /// own: encoding and sending spans never take a turn on the runtime that serves calls. At
    /// most `limits.spans` wait, each at most `limits.delay` for its batch to fill.
    fn new<E, F>(make: F, limits: QueueLimits) -> Result<Self, String>
    where
        E: opentelemetry_sdk::trace::SpanExporter + 'static,
        F: FnOnce() -> Result<E, String> + Send + 'static,
    {
        let shared = Arc::new(Shared {
            waiting: Mutex::default(),
            wake: Condvar::new(),
            stats: QueueStats::default(),
            capacity: limits.spans,
        });
        let thread_shared = shared.clone();
        let (built, started) = std::sync::mpsc::sync_channel(1);
        let thread = std::thread::Builder::new()
            .name("herd-span-export".into())
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(runtime) => runtime,
                    Err(e) => {
                        let _ = built.send(Err(e.to_string()));
                        return;
                    }
                };
                let _inside = runtime.enter();
                match make() {
                    Ok(exporter) => {
                        let _ = built.send(Ok(()));
                        export_loop(exporter, &runtime, &thread_shared, limits.delay);
                    }
                    Err(e) => {
                        let _ = built.send(Err(e));
                    }
                }
            })
            .map_err(|e| e.to_string())?;
        started.recv().map_err(|e| e.to_string())??;
        Ok(Self {
            shared,
            thread: Mutex::new(Some(thread)),
        })
    }

    fn ask_and_wait(
        &self,
        ask: fn(std::sync::mpsc::SyncSender<()>) -> Ask,
        timeout: Duration,
    ) -> opentelemetry_sdk::error::OTelSdkResult {
        let (ack, done) = std::sync::mpsc::sync_channel(1);
        self.shared.ask(ask(ack));
        done.recv_timeout(timeout)
            .map_err(|_| opentelemetry_sdk::error::OTelSdkError::Timeout(timeout))
    }
}

impl Drop for SpanQueue {
    fn drop(&mut self) {
        self.shared.lock().closed = true;
        self.shared.wake.notify_one();
    }
}

impl opentelemetry_sdk::trace::SpanProcessor for SpanQueue {
    fn on_start(&self, _span: &mut opentelemetry_sdk::trace::Span, _cx: &Context) {}

    fn on_end(&self, span: SpanData) {
        if !span.span_context.is_sampled() {
            return;
        }
        let mut waiting = self.shared.lock();
        if waiting.spans.len() >= self.shared.capacity {
            drop(waiting);
            let dropped = self.shared.stats.dropped.fetch_add(1, Ordering::Relaxed) + 1;
            if dropped.is_power_of_two() {
                tracing::warn!(
                    dropped_spans = dropped,
                    queue = self.shared.capacity,
                    "span export queue full; dropping spans"
                );
            }
            return;
        }
        waiting.spans.push(span);
        let batch_complete = waiting.spans.len() == MAX_BATCH;
        drop(waiting);
        if batch_complete {
            self.shared.wake.notify_one();
        }
    }

    fn force_flush(&self) -> opentelemetry_sdk::error::OTelSdkResult {
        self.ask_and_wait(Ask::Flush, FLUSH_TIMEOUT)
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> opentelemetry_sdk::error::OTelSdkResult {
        let result = self.ask_and_wait(Ask::Shutdown, timeout);
        if let (Ok(()), Some(thread)) =
            (&result, self.thread.lock().ok().and_then(|mut t| t.take()))
        {
            let _ = thread.join();
        }
        let stats = &self.shared.stats;
        tracing::info!(
            exported_spans = stats.exported.load(Ordering::Relaxed),
            failed_spans = stats.failed.load(Ordering::Relaxed),
            dropped_spans = stats.dropped.load(Ordering::Relaxed),
            "span export stopped"
        );
        result
    }

    fn set_resource(&mut self, resource: &opentelemetry_sdk::Resource) {
        self.shared.ask(Ask::Resource(resource.clone()));
    }
}

/// The export thread: every `delay`, or as soon as a batch is complete or something is
/// asked, takes everything waiting and exports it in batches of at most [`MAX_BATCH`].
fn export_loop<E: opentelemetry_sdk::trace::SpanExporter>(
    mut exporter: E,
    runtime: &tokio::runtime::Runtime,
    shared: &Shared,
    delay: Duration,
) {
    let mut last_failure_log: Option<std::time::Instant> = None;
    let mut export = |mut spans: Vec<SpanData>, exporter: &E| {
        while !spans.is_empty() {
            // Most often everything waiting is one batch, exported as it is, without a copy.
            let rest = spans.split_off(spans.len().min(MAX_BATCH));
            let batch = std::mem::replace(&mut spans, rest);
            let n = batch.len() as u64;
            match runtime.block_on(exporter.export(batch)) {
                Ok(()) => {
                    shared.stats.exported.fetch_add(n, Ordering::Relaxed);
                }
                Err(e) => {
                    let failed = shared.stats.failed.fetch_add(n, Ordering::Relaxed) + n;
                    if last_failure_log.is_none_or(|t| t.elapsed() >= FAILURE_LOG_EVERY) {
                        last_failure_log = Some(std::time::Instant::now());
                        tracing::warn!(error = %e, failed_spans = failed, "exporting spans failed; they are lost, requests are not affected");
                    }
                }
            }
        }
    };
    loop {
        let due = std::time::Instant::now() + delay;
        let (spans, asks, closed) = {
            let mut waiting = shared.lock();
            while waiting.spans.len() < MAX_BATCH && waiting.asks.is_empty() && !waiting.closed {
                let left = due.saturating_duration_since(std::time::Instant::now());
                if left.is_zero() {
                    break;
                }
                waiting = shared
                    .wake
                    .wait_timeout(waiting, left)
                    .unwrap_or_else(PoisonError::into_inner)
                    .0;
            }
            (
                // Room for a whole batch, made here: ending a span never grows the vector.
                if waiting.spans.is_empty() {
                    Vec::new()
                } else {
                    std::mem::replace(&mut waiting.spans, Vec::with_capacity(MAX_BATCH))
                },
                std::mem::take(&mut waiting.asks),
                waiting.closed,
            )
        };
        for ask in &asks {
            if let Ask::Resource(resource) = ask {
                exporter.set_resource(resource);
            }
        }
        export(spans, &exporter);
        for ask in asks {
            match ask {
                Ask::Resource(_) => {}
                Ask::Flush(ack) => {
                    let _ = ack.send(());
                }
                Ask::Shutdown(ack) => {
                    let _ = exporter.shutdown();
                    let _ = ack.send(());
                    return;
                }
            }
        }
        if closed {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicBool;
    use std::time::{Instant, SystemTime};

    use opentelemetry::KeyValue;
    use opentelemetry::trace::{SpanContext, SpanId, SpanKind, Status, TraceFlags, TraceId};
    use opentelemetry_sdk::trace::SpanProcessor;

    use super::*;

    /// Records the size of every batch; while `held`, an export waits for the gate to open.
    #[derive(Debug, Clone, Default)]
    struct Recording {
        batches: Arc<Mutex<Vec<usize>>>,
        held: Arc<AtomicBool>,
        exporting: Arc<AtomicBool>,
        gate: Arc<tokio::sync::Notify>,
    }

    impl opentelemetry_sdk::trace::SpanExporter for Recording {
        fn export(
            &self,
            batch: Vec<SpanData>,
        ) -> impl std::future::Future<Output = opentelemetry_sdk::error::OTelSdkResult> + Send
        {
            let this = self.clone();
            async move {
                this.exporting.store(true, Ordering::SeqCst);
                if this.held.load(Ordering::SeqCst) {
                    this.gate.notified().await;
                }
                this.batches.lock().unwrap().push(batch.len());
                Ok(())
            }
        }
    }

    fn span(sampled: bool) -> SpanData {
        let flags = if sampled {
            TraceFlags::SAMPLED
        } else {
            TraceFlags::default()
        };
        SpanData {
            span_context: SpanContext::new(
                TraceId::from_bytes([1; 16]),
                SpanId::from_bytes([2; 8]),
                flags,
                false,
                Default::default(),
            ),
            parent_span_id: SpanId::INVALID,
            parent_span_is_remote: false,
            span_kind: SpanKind::Server,
            name: "test".into(),
            start_time: SystemTime::now(),
            end_time: SystemTime::now(),
            attributes: Vec::new(),
            dropped_attributes_count: 0,
            events: Default::default(),
            links: Default::default(),
            status: Status::Unset,
            instrumentation_scope: Default::default(),
        }
    }

    /// What the OTLP exporter does per span before sending: opentelemetry-proto's conversion
    /// (`group_spans_by_resource_and_scope`) and prost's encoding, for spans shaped like a
    /// sampled server span of herd's. `cargo test --release -p herd measure_otlp_encoding --
    /// --ignored --nocapture` (figures in BENCHMARKS.md).
    #[test]
    #[ignore = "a measurement, not a check"]
    fn measure_otlp_encoding() {
        use opentelemetry_proto::transform::common::tonic::ResourceAttributesWithSchema;
        use opentelemetry_proto::transform::trace::tonic::group_spans_by_resource_and_scope;
        use prost::Message;
        let sdk_resource = opentelemetry_sdk::Resource::builder()
            .with_service_name("herd-pricing")
            .build();
        let resource = ResourceAttributesWithSchema::from(&sdk_resource);
        let resource_attributes = || {
            sdk_resource
                .iter()
                .map(|(k, v)| KeyValue::new(k.clone(), v.clone()))
                .collect()
        };
        let herd_span = || {
            let mut span = span(true);
            span.name = "herd.pricing.v1.PricingService/PriceItems".into();
            span.attributes = vec![
                KeyValue::new("rpc.system", "grpc"),
                KeyValue::new("rpc.service", "herd.pricing.v1.PricingService"),
                KeyValue::new("rpc.method", "PriceItems"),
                KeyValue::new("server.address", "127.0.0.1".to_string()),
                KeyValue::new("server.port", 41234_i64),
                KeyValue::new("herd.tenant", "acme".to_string()),
                KeyValue::new("herd.request_id", "0123456789abcdef0123".to_string()),
                KeyValue::new("herd.config_revision", 42_i64),
                KeyValue::new("rpc.grpc.status_code", 0_i64),
            ];
            span
        };
        let (batches, size) = (200, MAX_BATCH);
        let attributes: Vec<KeyValue> = resource_attributes();
        // Each way encodes the same batches, made afresh (both consume or drop them), and
        // reports time and bytes per span.
        let measure = |what: &str, encode: &dyn Fn(Vec<SpanData>) -> usize| {
            let spans: Vec<Vec<SpanData>> = (0..batches)
                .map(|_| (0..size).map(|_| herd_span()).collect())
                .collect();
            let started = Instant::now();
            let bytes: usize = spans.into_iter().map(encode).sum();
            let per_span = started.elapsed() / (batches * size) as u32;
            let bytes = bytes / (batches * size);
            println!("REPORT {what}: {per_span:?} per span, {bytes} bytes per span");
        };
        measure("opentelemetry-proto conversion and encoding", &|batch| {
            group_spans_by_resource_and_scope(batch, &resource)
                .iter()
                .map(|r| r.encode_to_vec().len())
                .sum()
        });
        measure("herd's encoding", &|batch| {
            super::super::otlp::request(&attributes, &batch).len()
        });
    }

    fn queue(exporter: &Recording) -> SpanQueue {
        queue_waiting(exporter, DEFAULT_SCHEDULE_DELAY)
    }

    fn queue_waiting(exporter: &Recording, delay: Duration) -> SpanQueue {
        let exporter = exporter.clone();
        let limits = QueueLimits {
            spans: DEFAULT_QUEUE_SPANS,
            delay,
        };
        SpanQueue::new(move || Ok(exporter), limits).unwrap()
    }

    #[test]
    fn the_queue_limits_are_the_otel_bsp_variables_or_the_defaults() {
        assert_eq!(schedule_delay(Some("250")), Duration::from_millis(250));
        assert_eq!(schedule_delay(Some(" 1000 ")), Duration::from_secs(1));
        for unusable in [None, Some(""), Some("0"), Some("-5"), Some("soon")] {
            assert_eq!(
                schedule_delay(unusable),
                DEFAULT_SCHEDULE_DELAY,
                "{unusable:?}"
            );
            assert_eq!(queue_spans(unusable), DEFAULT_QUEUE_SPANS, "{unusable:?}");
        }
        assert_eq!(queue_spans(Some("4096")), 4096);
        assert_eq!(
            queue_spans(Some("100")),
            MAX_BATCH,
            "never less than a batch"
        );
    }

    #[test]
    fn a_lone_span_waits_for_the_schedule_delay_and_no_longer() {
        let (short, long) = (Recording::default(), Recording::default());
        let soon = queue_waiting(&short, Duration::from_millis(50));
        let later = queue_waiting(&long, Duration::from_secs(3600));
        later.on_end(span(true));
        soon.on_end(span(true));
        let deadline = Instant::now() + Duration::from_secs(10);
        while short.batches.lock().unwrap().is_empty() {
            assert!(Instant::now() < deadline, "the span never left");
            std::thread::yield_now();
        }
        // Ended before the other, it still waits for its own delay (or a flush).
        assert!(long.batches.lock().unwrap().is_empty());
        later.force_flush().unwrap();
        assert_eq!(*long.batches.lock().unwrap(), vec![1]);
        soon.shutdown_with_timeout(FLUSH_TIMEOUT).unwrap();
        later.shutdown_with_timeout(FLUSH_TIMEOUT).unwrap();
    }

    #[test]
    fn every_sampled_span_is_exported_in_batches_of_at_most_a_batch() {
        let exporter = Recording::default();
        let queue = queue(&exporter);
        let sampled = 3 * MAX_BATCH + 5;
        for i in 0..sampled + 40 {
            queue.on_end(span(i < sampled));
        }
        queue.force_flush().unwrap();
        let batches = exporter.batches.lock().unwrap().clone();
        assert_eq!(batches.iter().sum::<usize>(), sampled, "{batches:?}");
        assert!(batches.iter().all(|n| *n <= MAX_BATCH), "{batches:?}");
        queue.shutdown_with_timeout(FLUSH_TIMEOUT).unwrap();
        assert_eq!(
            queue.shared.stats.exported.load(Ordering::Relaxed),
            sampled as u64
        );
    }

    #[test]
    fn a_full_queue_drops_and_counts_without_waiting() {
        let exporter = Recording::default();
        exporter.held.store(true, Ordering::SeqCst);
        let queue = queue(&exporter);
        // A whole batch wakes the export thread, which takes it and is held in the export.
        for _ in 0..MAX_BATCH {
            queue.on_end(span(true));
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while !exporter.exporting.load(Ordering::SeqCst) {
            assert!(Instant::now() < deadline, "the batch was never taken");
            std::thread::yield_now();
        }
        // Meanwhile the queue fills; what does not fit is dropped, at once.
        let started = Instant::now();
        for _ in 0..DEFAULT_QUEUE_SPANS + 10 {
            queue.on_end(span(true));
        }
        assert!(started.elapsed() < Duration::from_secs(1));
        assert_eq!(queue.shared.stats.dropped.load(Ordering::Relaxed), 10);
        exporter.held.store(false, Ordering::SeqCst);
        exporter.gate.notify_one();
        queue.shutdown_with_timeout(FLUSH_TIMEOUT).unwrap();
        let exported: usize = exporter.batches.lock().unwrap().iter().sum();
        assert_eq!(exported, MAX_BATCH + DEFAULT_QUEUE_SPANS);
    }
}
