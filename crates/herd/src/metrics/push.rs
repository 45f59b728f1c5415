//! OTLP metrics push: every `OTEL_METRIC_EXPORT_INTERVAL` milliseconds (60 s unless set) the
//! metrics are collected (cumulative) and sent to the collector's `MetricsService/Export`, and
//! once more when the instance stops. A failed push is logged (at most once a minute) and not
//! retried: the next push carries the same cumulative values.

use std::sync::Arc;
use std::time::Duration;

use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_sdk::metrics::ManualReader;
use opentelemetry_sdk::metrics::data::ResourceMetrics;
use opentelemetry_sdk::metrics::reader::MetricReader as _;
use prost::Message as _;

use crate::telemetry::otlp::Collector;

const EXPORT: &str = "/opentelemetry.proto.collector.metrics.v1.MetricsService/Export";

/// Between pushes unless `OTEL_METRIC_EXPORT_INTERVAL` says otherwise (the specification's
/// default).
const DEFAULT_INTERVAL: Duration = Duration::from_secs(60);
/// Least time between two warnings about failed pushes.
const FAILURE_LOG_EVERY: Duration = Duration::from_secs(60);

/// The pushing task.
#[derive(Debug)]
pub(super) struct Push {
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

impl Push {
    /// Starts pushing what `reader` collects (the resource is the meter provider's).
    pub(super) fn start(reader: Arc<ManualReader>) -> Result<Self, String> {
        let collector = Collector::from_env("METRICS")?;
        let interval = crate::telemetry::otlp::positive(
            std::env::var("OTEL_METRIC_EXPORT_INTERVAL").ok().as_deref(),
        )
        .map_or(DEFAULT_INTERVAL, Duration::from_millis);
        let (stop, mut stopped) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(async move {
            let mut last_warning: Option<tokio::time::Instant> = None;
            let mut ticks = tokio::time::interval(interval);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            ticks.tick().await;
            loop {
                let last = tokio::select! {
                    _ = ticks.tick() => false,
                    _ = &mut stopped => true,
                };
                if let Err(e) = push(&collector, &reader).await {
                    let now = tokio::time::Instant::now();
                    if last || last_warning.is_none_or(|t| now - t >= FAILURE_LOG_EVERY) {
                        last_warning = Some(now);
                        tracing::warn!(error = %e, "pushing metrics failed");
                    }
                }
                if last {
                    return;
                }
            }
        });
        Ok(Self { stop, task })
    }

    /// Pushes once more and stops.
    pub(super) async fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.task.await;
    }
}

/// Collects and sends once.
async fn push(collector: &Collector, reader: &ManualReader) -> Result<(), String> {
    let mut collected = ResourceMetrics::default();
    reader.collect(&mut collected).map_err(|e| e.to_string())?;
    let request = ExportMetricsServiceRequest::from(&collected);
    collector
        .send(EXPORT, request.encode_to_vec())
        .await
        .map_err(|e| e.to_string())
}
