//! A real OTLP/gRPC receiver for tests: it records every exported span with its resource, and the
//! latest value of every metric point pushed.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_server::{
    MetricsService, MetricsServiceServer,
};
use opentelemetry_proto::tonic::collector::metrics::v1::{
    ExportMetricsServiceRequest, ExportMetricsServiceResponse,
};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use opentelemetry_proto::tonic::metrics::v1::{metric, number_data_point};

/// One span as received.
#[derive(Debug, Clone)]
pub struct Span {
    /// `service.name` of the resource.
    pub service: String,
    /// `service.instance.id` of the resource.
    pub instance: String,
    /// Span name.
    pub name: String,
    /// OTLP span kind (2 server, 3 client).
    pub kind: i32,
    /// Trace id, hex.
    pub trace_id: String,
    /// Span id, hex.
    pub span_id: String,
    /// Parent span id, hex (empty for a root).
    pub parent: String,
    /// Attributes, as strings.
    pub attrs: BTreeMap<String, String>,
    /// Status code (0 unset, 1 ok, 2 error).
    pub status: i32,
    /// The W3C `tracestate` the span carries.
    pub trace_state: String,
    /// The names of the span's events.
    pub events: Vec<String>,
}

/// OTLP span kinds.
pub const SERVER: i32 = 2;
/// OTLP span kinds.
pub const CLIENT: i32 = 3;

fn text(v: &Option<AnyValue>) -> String {
    match v.as_ref().and_then(|v| v.value.as_ref()) {
        Some(any_value::Value::StringValue(s)) => s.clone(),
        Some(any_value::Value::IntValue(i)) => i.to_string(),
        Some(any_value::Value::BoolValue(b)) => b.to_string(),
        Some(any_value::Value::DoubleValue(d)) => d.to_string(),
        Some(other) => format!("{other:?}"),
        None => String::new(),
    }
}

fn attrs(kvs: &[KeyValue]) -> BTreeMap<String, String> {
    kvs.iter()
        .map(|kv| (kv.key.clone(), text(&kv.value)))
        .collect()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Which instance pushed a metric point, the metric and the point's attributes.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct PointKey {
    /// `service.instance.id` of the resource.
    pub instance: String,
    /// Metric name.
    pub name: String,
    /// The point's attributes, as strings.
    pub attrs: BTreeMap<String, String>,
}

/// The latest value pushed for one point: a histogram's count, or a sum's or gauge's value.
pub type Points = BTreeMap<PointKey, f64>;

#[derive(Clone, Default)]
struct Recorder {
    spans: Arc<Mutex<Vec<Span>>>,
    points: Arc<Mutex<Points>>,
    /// The metadata of every export, as text pairs.
    headers: Arc<Mutex<Vec<BTreeMap<String, String>>>>,
}

impl Recorder {
    fn note_headers(&self, metadata: &tonic::metadata::MetadataMap) {
        let headers = metadata
            .iter()
            .filter_map(|kv| match kv {
                tonic::metadata::KeyAndValueRef::Ascii(k, v) => {
                    Some((k.as_str().to_string(), v.to_str().ok()?.to_string()))
                }
                tonic::metadata::KeyAndValueRef::Binary(..) => None,
            })
            .collect();
        if let Ok(mut all) = self.headers.lock() {
            all.push(headers);
        }
    }
}

fn number(point: &opentelemetry_proto::tonic::metrics::v1::NumberDataPoint) -> f64 {
    match point.value {
        Some(number_data_point::Value::AsDouble(d)) => d,
        Some(number_data_point::Value::AsInt(i)) => i as f64,
        None => 0.0,
    }
}

#[tonic::async_trait]
impl MetricsService for Recorder {
    async fn export(
        &self,
        request: tonic::Request<ExportMetricsServiceRequest>,
    ) -> Result<tonic::Response<ExportMetricsServiceResponse>, tonic::Status> {
        self.note_headers(request.metadata());
        let mut received = Points::new();
        for rm in request.into_inner().resource_metrics {
            let resource = rm
                .resource
                .map(|r| attrs(&r.attributes))
                .unwrap_or_default();
            let instance = resource
                .get("service.instance.id")
                .cloned()
                .unwrap_or_default();
            for sm in rm.scope_metrics {
                for m in sm.metrics {
                    let key = |point_attrs: &[KeyValue]| PointKey {
                        instance: instance.clone(),
                        name: m.name.clone(),
                        attrs: attrs(point_attrs),
                    };
                    match &m.data {
                        Some(metric::Data::Histogram(h)) => {
                            for p in &h.data_points {
                                received.insert(key(&p.attributes), p.count as f64);
                            }
                        }
                        Some(metric::Data::Sum(sum)) => {
                            for p in &sum.data_points {
                                received.insert(key(&p.attributes), number(p));
                            }
                        }
                        Some(metric::Data::Gauge(gauge)) => {
                            for p in &gauge.data_points {
                                received.insert(key(&p.attributes), number(p));
                            }
                        }
                        _ => {}
                    }
                }
            }
        }
        if let Ok(mut points) = self.points.lock() {
            points.extend(received);
        }
        Ok(tonic::Response::new(ExportMetricsServiceResponse::default()))
    }
}

#[tonic::async_trait]
impl TraceService for Recorder {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        self.note_headers(request.metadata());
        let mut received = Vec::new();
        for rs in request.into_inner().resource_spans {
            let resource = rs
                .resource
                .map(|r| attrs(&r.attributes))
                .unwrap_or_default();
            let service = resource.get("service.name").cloned().unwrap_or_default();
            let instance = resource
                .get("service.instance.id")
                .cloned()
                .unwrap_or_default();
            for ss in rs.scope_spans {
                for s in ss.spans {
                    received.push(Span {
                        service: service.clone(),
                        instance: instance.clone(),
                        name: s.name,
                        kind: s.kind,
                        trace_id: hex(&s.trace_id),
                        span_id: hex(&s.span_id),
                        parent: hex(&s.parent_span_id),
                        attrs: attrs(&s.attributes),
                        status: s.status.map(|st| st.code).unwrap_or(0),
                        trace_state: s.trace_state,
                        events: s.events.into_iter().map(|e| e.name).collect(),
                    });
                }
            }
        }
        if let Ok(mut spans) = self.spans.lock() {
            spans.extend(received);
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

/// A receiver listening on a free loopback port until dropped.
pub struct Receiver {
    /// `http://127.0.0.1:<port>`, for `OTEL_EXPORTER_OTLP_ENDPOINT`.
    pub endpoint: String,
    recorder: Recorder,
    task: tokio::task::JoinHandle<()>,
}

impl Receiver {
    /// Starts the receiver.
    pub async fn start() -> anyhow::Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let endpoint = format!("http://{}", listener.local_addr()?);
        let recorder = Recorder::default();
        let service = TraceServiceServer::new(recorder.clone());
        let metrics = MetricsServiceServer::new(recorder.clone());
        let task = tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(service)
                .add_service(metrics)
                .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener))
                .await;
        });
        Ok(Self {
            endpoint,
            recorder,
            task,
        })
    }

    /// Every span received so far.
    pub fn spans(&self) -> Vec<Span> {
        self.recorder
            .spans
            .lock()
            .map(|s| s.clone())
            .unwrap_or_default()
    }
}

impl Receiver {
    /// The metadata of every export received so far (spans and metrics), as text pairs.
    pub fn headers(&self) -> Vec<BTreeMap<String, String>> {
        self.recorder
            .headers
            .lock()
            .map(|h| h.clone())
            .unwrap_or_default()
    }

    /// The latest value of every metric point pushed so far.
    pub fn points(&self) -> Points {
        self.recorder
            .points
            .lock()
            .map(|p| p.clone())
            .unwrap_or_default()
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}
