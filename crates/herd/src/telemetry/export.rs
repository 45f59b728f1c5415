//! Span export: the OTLP exporter behind a bounded queue drained by its own thread.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use opentelemetry::{Context, KeyValue};
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};

use super::FLUSH_TIMEOUT;

/// Spans waiting for export; beyond this they are dropped and counted rather than slowing or
/// failing a request.
const QUEUE_SPANS: usize = 8192;
/// How long a batch waits before export.
const EXPORT_DELAY: Duration = Duration::from_millis(200);

/// Whether the standard variables ask for span export.
pub(super) fn exporter_configured() -> bool {
    let set = |k: &str| std::env::var(k).is_ok_and(|v| !v.trim().is_empty());
    std::env::var("OTEL_TRACES_EXPORTER").as_deref() != Ok("none")
        && (set("OTEL_EXPORTER_OTLP_ENDPOINT") || set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))
}

/// The tracer provider: the OTLP exporter behind a [`SpanQueue`], the resource naming the instance.
pub(super) fn build_provider(
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
