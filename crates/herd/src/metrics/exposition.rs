//! The Prometheus endpoint: `GET /metrics` on a plain HTTP/1.1 listener, in the OpenMetrics text
//! format written by the `prometheus-client` crate from what the metrics SDK collects at that
//! moment (cumulative, so every scrape sees every call since start).
//!
//! OpenTelemetry names become Prometheus names as the OpenTelemetry compatibility rules say:
//! characters other than letters, digits and `_` become `_`, a unit of seconds appends
//! `_seconds`, counters end in `_total`, histograms give `_bucket`/`_sum`/`_count`.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use opentelemetry_sdk::metrics::ManualReader;
use opentelemetry_sdk::metrics::data::{AggregatedMetrics, Metric, MetricData, ResourceMetrics};
use opentelemetry_sdk::metrics::reader::MetricReader as _;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};
use tokio::net::TcpListener;

/// The content type of the exposition.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Scrapes served at once; more connections wait to be accepted.
const MAX_CONNECTIONS: usize = 16;
/// How long a client may take to send its request head.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves `GET /metrics` from `reader` on `listener` until the task is dropped.
pub(crate) async fn serve(listener: TcpListener, reader: Arc<ManualReader>) {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(Exposition { reader }));
    let registry = Arc::new(registry);
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                tracing::debug!(error = %e, "metrics listener: accept failed");
                // Out of descriptors, for example: let some close before trying again.
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let registry = registry.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request| {
                let response = answer(&registry, &request);
                async move { Ok::<_, Infallible>(response) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await;
            drop(slot);
        });
    }
}

/// The answer to one HTTP request.
fn answer<B>(registry: &Registry, request: &http::Request<B>) -> http::Response<Full<Bytes>> {
    let status = |code: http::StatusCode, text: &'static str| {
        let mut response = http::Response::new(Full::new(Bytes::from_static(text.as_bytes())));
        *response.status_mut() = code;
        response
    };
    if request.uri().path() != "/metrics" {
        return status(http::StatusCode::NOT_FOUND, "not found: try /metrics\n");
    }
    if request.method() != http::Method::GET && request.method() != http::Method::HEAD {
        return status(http::StatusCode::METHOD_NOT_ALLOWED, "GET /metrics\n");
    }
    let mut text = String::new();
    if prometheus_client::encoding::text::encode(&mut text, registry).is_err() {
        return status(
            http::StatusCode::INTERNAL_SERVER_ERROR,
            "encoding the metrics failed\n",
        );
    }
    let mut response = http::Response::new(Full::new(Bytes::from(text)));
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static(CONTENT_TYPE),
    );
    response
}

/// Collects from the SDK at each scrape and writes what it finds.
#[derive(Debug)]
struct Exposition {
    reader: Arc<ManualReader>,
}

impl Collector for Exposition {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let mut collected = ResourceMetrics::default();
        if let Err(e) = self.reader.collect(&mut collected) {
            tracing::warn!(error = %e, "collecting metrics failed");
            return Ok(());
        }
        for scope in collected.scope_metrics() {
            for metric in scope.metrics() {
                encode_metric(&mut encoder, metric)?;
            }
        }
        Ok(())
    }
}

/// A Prometheus name or label name: `[a-zA-Z_][a-zA-Z0-9_]*`.
pub(crate) fn prometheus_name(name: &str) -> String {
    let mut out: String = name
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    if out.starts_with(|c: char| c.is_ascii_digit()) {
        out.insert(0, '_');
    }
    out
}

/// A point's attributes as Prometheus labels, in name order (the same on every scrape).
fn labels<'a>(
    attributes: impl Iterator<Item = &'a opentelemetry::KeyValue>,
) -> Vec<(String, String)> {
    let mut labels: Vec<(String, String)> = attributes
        .map(|kv| {
            (
                prometheus_name(kv.key.as_str()),
                kv.value.as_str().into_owned(),
            )
        })
        .collect();
    labels.sort();
    labels
}

/// A value of one of the SDK's number types.
trait Number: Copy {
    fn float(self) -> f64;
}

impl Number for f64 {
    fn float(self) -> f64 {
        self
    }
}

impl Number for u64 {
    fn float(self) -> f64 {
        self as f64
    }
}

impl Number for i64 {
    fn float(self) -> f64 {
        self as f64
    }
}

/// Writes one point with `write`, under `labels` if it has any.
fn labelled(
    family: &mut MetricEncoder,
    labels: Vec<(String, String)>,
    write: impl FnOnce(&mut MetricEncoder) -> Result<(), std::fmt::Error>,
) -> Result<(), std::fmt::Error> {
    if labels.is_empty() {
        write(family)
    } else {
        write(&mut family.encode_family(&labels)?)
    }
}

fn encode_metric(encoder: &mut DescriptorEncoder, metric: &Metric) -> Result<(), std::fmt::Error> {
    match metric.data() {
        AggregatedMetrics::F64(data) => encode_data(encoder, metric, data),
        AggregatedMetrics::U64(data) => encode_data(encoder, metric, data),
        AggregatedMetrics::I64(data) => encode_data(encoder, metric, data),
    }
}

fn encode_data<T: Number>(
    encoder: &mut DescriptorEncoder,
    metric: &Metric,
    data: &MetricData<T>,
) -> Result<(), std::fmt::Error> {
    let name = prometheus_name(metric.name());
    let help = if metric.description().is_empty() {
        metric.name()
    } else {
        metric.description()
    };
    let unit = (metric.unit() == "s").then_some(&Unit::Seconds);
    match data {
        MetricData::Histogram(histogram) => {
            let mut family = encoder.encode_descriptor(&name, help, unit, MetricType::Histogram)?;
            for point in histogram.data_points() {
                let buckets: Vec<(f64, u64)> = point
                    .bounds()
                    .chain([f64::INFINITY])
                    .zip(point.bucket_counts())
                    .collect();
                labelled(&mut family, labels(point.attributes()), |m| {
                    m.encode_histogram::<NoLabelSet>(
                        point.sum().float(),
                        point.count(),
                        &buckets,
                        None,
                    )
                })?;
            }
        }
        MetricData::Sum(sum) if sum.is_monotonic() => {
            let mut family = encoder.encode_descriptor(&name, help, unit, MetricType::Counter)?;
            for point in sum.data_points() {
                labelled(&mut family, labels(point.attributes()), |m| {
                    m.encode_counter::<NoLabelSet, f64, f64>(&point.value().float(), None)
                })?;
            }
        }
        MetricData::Sum(sum) => {
            let mut family = encoder.encode_descriptor(&name, help, unit, MetricType::Gauge)?;
            for point in sum.data_points() {
                labelled(&mut family, labels(point.attributes()), |m| {
                    m.encode_gauge(&point.value().float())
                })?;
            }
        }
        MetricData::Gauge(gauge) => {
            let mut family = encoder.encode_descriptor(&name, help, unit, MetricType::Gauge)?;
            for point in gauge.data_points() {
                labelled(&mut family, labels(point.attributes()), |m| {
                    m.encode_gauge(&point.value().float())
                })?;
            }
        }
        // herd makes no exponential histograms.
        MetricData::ExponentialHistogram(_) => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use opentelemetry::KeyValue;
    use opentelemetry::metrics::MeterProvider as _;
    use opentelemetry_sdk::metrics::SdkMeterProvider;

    use super::*;

    /// The exposition of what `record` records, and the reader's provider (kept alive).
    fn exposition(
        record: impl FnOnce(&opentelemetry::metrics::Meter),
    ) -> (String, SdkMeterProvider) {
        let reader = Arc::new(ManualReader::builder().build());
        let provider = SdkMeterProvider::builder()
            .with_reader(super::super::SharedReader(reader.clone()))
            .build();
        record(&provider.meter("test"));
        let mut registry = Registry::default();
        registry.register_collector(Box::new(Exposition { reader }));
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).expect("encodes");
        (text, provider)
    }

    #[test]
    fn histograms_counters_and_gauges_get_prometheus_names_and_labels() {
        let (text, _provider) = exposition(|meter| {
            let duration = meter
                .f64_histogram("rpc.server.duration")
                .with_unit("s")
                .with_boundaries(vec![0.001, 0.01])
                .build();
            let labels = [
                KeyValue::new("rpc.method", "A"),
                KeyValue::new("rpc.grpc.status_code", 0_i64),
            ];
            for seconds in [0.0005, 0.005, 0.5] {
                duration.record(seconds, &labels);
            }
            meter
                .u64_counter("herd.client.retries")
                .build()
                .add(3, &[KeyValue::new("rpc.service", "x.S")]);
            meter
                .i64_observable_gauge("herd.config.revision")
                .with_callback(|o| o.observe(42, &[]))
                .build();
        });
        for line in [
            "# TYPE rpc_server_duration_seconds histogram",
            r#"rpc_server_duration_seconds_bucket{le="0.001",rpc_grpc_status_code="0",rpc_method="A"} 1"#,
            r#"rpc_server_duration_seconds_bucket{le="0.01",rpc_grpc_status_code="0",rpc_method="A"} 2"#,
            r#"rpc_server_duration_seconds_bucket{le="+Inf",rpc_grpc_status_code="0",rpc_method="A"} 3"#,
            r#"rpc_server_duration_seconds_count{rpc_grpc_status_code="0",rpc_method="A"} 3"#,
            r#"rpc_server_duration_seconds_sum{rpc_grpc_status_code="0",rpc_method="A"} 0.5055"#,
            "# TYPE herd_client_retries counter",
            r#"herd_client_retries_total{rpc_service="x.S"} 3.0"#,
            "# TYPE herd_config_revision gauge",
            "herd_config_revision 42.0",
            "# EOF",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in:\n{text}"
            );
        }
    }

    #[test]
    fn only_get_metrics_is_answered() {
        let registry = Registry::default();
        let get = |method: &str, path: &str| {
            let request = http::Request::builder()
                .method(method)
                .uri(path)
                .body(())
                .expect("a request");
            answer(&registry, &request).status()
        };
        assert_eq!(get("GET", "/metrics"), http::StatusCode::OK);
        assert_eq!(get("GET", "/"), http::StatusCode::NOT_FOUND);
        assert_eq!(
            get("POST", "/metrics"),
            http::StatusCode::METHOD_NOT_ALLOWED
        );
    }

    #[test]
    fn names_become_prometheus_names() {
        assert_eq!(
            prometheus_name("rpc.server.duration"),
            "rpc_server_duration"
        );
        assert_eq!(prometheus_name("9lives-x"), "_9lives_x");
    }
}
