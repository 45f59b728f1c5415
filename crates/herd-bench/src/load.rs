//! The load generator.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::caller::{Caller, Encoded};

/// How load is offered.
#[derive(Debug, Clone, Copy)]
pub enum Mode {
    /// `concurrency` callers, each starting a call as soon as its last one ends.
    Closed {
        /// Calls in flight.
        concurrency: usize,
    },
    /// Calls started at a fixed rate whatever the answers do; latency counts from the scheduled
    /// start, so a stall is not hidden (no coordinated omission).
    Open {
        /// Calls per second.
        rate: f64,
    },
}

/// Which call to make.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Call {
    /// `herd.quote.v1.QuoteService/CreateQuote` of three widgets.
    Quote,
    /// `grpc.health.v1.Health/Check` — the hello world of gRPC.
    Health,
    /// `grpc.health.v1.Health/Check` on a connection dialled for it and closed after: what a
    /// new connection costs (TCP, the TLS handshake when there is TLS, HTTP/2's preface).
    Connect,
}

/// One load run.
#[derive(Debug, Clone)]
pub struct LoadConfig {
    /// `host:port` of each target; connections go round robin over them.
    pub targets: Vec<String>,
    /// Closed or open loop.
    pub mode: Mode,
    /// HTTP/2 connections to open.
    pub connections: usize,
    /// Measured time.
    pub duration: Duration,
    /// Time before measuring, to warm up.
    pub warmup: Duration,
    /// Deadline of each call.
    pub timeout: Duration,
    /// The call.
    pub call: Call,
    /// Sent as `authorization` with every call (a bearer token for the gateway).
    pub authorization: Option<String>,
    /// Print a progress line every second to stderr.
    pub progress: bool,
    /// TLS to the targets, when they speak it.
    pub tls: Option<crate::caller::TlsConnector>,
}

/// What a run measured.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    /// `closed/N` or `open/R`.
    pub mode: String,
    /// Calls measured (after warm-up).
    pub calls: u64,
    /// Calls that failed, by status code.
    pub failed: BTreeMap<String, u64>,
    /// The first message seen of each failed status code.
    pub failed_example: BTreeMap<String, String>,
    /// Measured seconds.
    pub seconds: f64,
    /// Successful calls per second.
    pub throughput: f64,
    /// Latency percentiles of successful calls, microseconds.
    pub p50_us: u64,
    /// 90th percentile.
    pub p90_us: u64,
    /// 99th percentile.
    pub p99_us: u64,
    /// 99.9th percentile.
    pub p999_us: u64,
    /// Slowest.
    pub max_us: u64,
    /// Median latency of the calls that failed, microseconds (0 without failures): a refusal
    /// should be fast.
    pub failed_p50_us: u64,
    /// 99th percentile of the calls that failed.
    pub failed_p99_us: u64,
    /// Open loop: how late the generator started its calls, 99th percentile, microseconds (a
    /// load it could not offer on time shows here, not as the target's latency).
    pub start_lag_p99_us: u64,
}

struct Shared {
    histogram: std::sync::Mutex<Histogram<u64>>,
    failed_histogram: std::sync::Mutex<Histogram<u64>>,
    failed: std::sync::Mutex<BTreeMap<String, u64>>,
    failed_example: std::sync::Mutex<BTreeMap<String, String>>,
    calls: AtomicU64,
    progress_calls: AtomicU64,
}

fn histogram() -> Histogram<u64> {
    // 1 µs to 60 s at three significant figures.
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("constant bounds are valid")
}

async fn connect(config: &LoadConfig) -> anyhow::Result<Vec<Caller>> {
    let mut callers = Vec::new();
    for i in 0..config.connections.max(1) {
        callers.push(
            Caller::connect(
                &config.targets[i % config.targets.len()],
                config.tls.clone(),
            )
            .await?,
        );
    }
    Ok(callers)
}

fn encoded(call: Call) -> Encoded {
    match call {
        Call::Quote => Encoded::new("/herd.quote.v1.QuoteService/CreateQuote", &quote_request()),
        Call::Health => Encoded::new(
            "/grpc.health.v1.Health/Check",
            &tonic_health::pb::HealthCheckRequest::default(),
        ),
        Call::Connect => encoded(Call::Health).on_new_connection(),
    }
}

/// The quote every run asks for: three widgets (a SKU promotion), two apples (tax-exempt), in EUR.
pub fn quote_request() -> herd_proto::quote::CreateQuoteRequest {
    herd_proto::quote::CreateQuoteRequest {
        context: Some(herd_proto::context::RequestContext {
            tenant_id: "bench".into(),
            ..Default::default()
        }),
        items: vec![
            herd_proto::types::LineItem {
                sku: "widget".into(),
                quantity: 3,
            },
            herd_proto::types::LineItem {
                sku: "apple".into(),
                quantity: 2,
            },
        ],
        currency: "EUR".into(),
        region: "US-CA".into(),
    }
}

fn record(shared: &Shared, measuring: bool, started: Instant, result: Result<(), tonic::Status>) {
    shared.progress_calls.fetch_add(1, Ordering::Relaxed);
    if !measuring {
        return;
    }
    shared.calls.fetch_add(1, Ordering::Relaxed);
    let us = u64::try_from(started.elapsed().as_micros())
        .unwrap_or(u64::MAX)
        .clamp(1, 60_000_000);
    match result {
        Ok(()) => {
            if let Ok(mut h) = shared.histogram.lock() {
                let _ = h.record(us);
            }
        }
        Err(status) => {
            let code = format!("{:?}", status.code());
            if let Ok(mut f) = shared.failed_example.lock() {
                f.entry(code.clone())
                    .or_insert_with(|| status.message().to_string());
            }
            if let Ok(mut f) = shared.failed.lock() {
                *f.entry(code).or_default() += 1;
            }
            if let Ok(mut h) = shared.failed_histogram.lock() {
                let _ = h.record(us);
            }
        }
    }
}

/// Runs one load and returns what it measured.
pub async fn run(config: LoadConfig) -> anyhow::Result<Summary> {
    anyhow::ensure!(
        !config.targets.is_empty(),
        "--target: at least one address is required"
    );
    let callers = connect(&config).await?;
    let mut call = encoded(config.call);
    if let Some(authorization) = &config.authorization {
        call = call.with_authorization(authorization)?;
    }
    let call = Arc::new(call);
    let shared = Arc::new(Shared {
        histogram: std::sync::Mutex::new(histogram()),
        failed_histogram: std::sync::Mutex::new(histogram()),
        failed: std::sync::Mutex::new(BTreeMap::new()),
        failed_example: std::sync::Mutex::new(BTreeMap::new()),
        calls: AtomicU64::new(0),
        progress_calls: AtomicU64::new(0),
    });
    let start = Instant::now();
    let measure_from = start + config.warmup;
    let end = measure_from + config.duration;
    let progress = config.progress.then(|| {
        let shared = shared.clone();
        tokio::spawn(async move {
            let mut last = 0;
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.tick().await;
            loop {
                tick.tick().await;
                let now = shared.progress_calls.load(Ordering::Relaxed);
                let failed: u64 = shared.failed.lock().map(|f| f.values().sum()).unwrap_or(0);
                eprintln!(
                    "{:>6.1}s  {:>8} calls/s  {:>8} failed",
                    start.elapsed().as_secs_f64(),
                    now - last,
                    failed
                );
                last = now;
            }
        })
    });
    let mut lag = histogram();
    let mode = match config.mode {
        Mode::Closed { concurrency } => {
            let mut tasks = Vec::new();
            for i in 0..concurrency.max(1) {
                let caller = callers[i % callers.len()].clone();
                let shared = shared.clone();
                let (call, timeout) = (call.clone(), config.timeout);
                tasks.push(tokio::spawn(async move {
                    while Instant::now() < end {
                        let started = Instant::now();
                        let result = caller.call(&call, timeout).await;
                        record(
                            &shared,
                            started >= measure_from && Instant::now() <= end,
                            started,
                            result,
                        );
                    }
                }));
            }
            for t in tasks {
                let _ = t.await;
            }
            format!("closed/{concurrency}")
        }
        Mode::Open { rate } => {
            anyhow::ensure!(rate > 0.0, "--rate: must be positive");
            let interval = Duration::from_secs_f64(1.0 / rate);
            let mut tasks = tokio::task::JoinSet::new();
            let mut n: u64 = 0;
            loop {
                let scheduled = start + interval.mul_f64(n as f64);
                if scheduled >= end {
                    break;
                }
                tokio::time::sleep_until(scheduled.into()).await;
                if scheduled >= measure_from {
                    let late = u64::try_from(scheduled.elapsed().as_micros()).unwrap_or(u64::MAX);
                    let _ = lag.record(late.clamp(1, 60_000_000));
                }
                let caller = callers[(n as usize) % callers.len()].clone();
                let shared = shared.clone();
                let (call, timeout) = (call.clone(), config.timeout);
                tasks.spawn(async move {
                    let result = caller.call(&call, timeout).await;
                    record(&shared, scheduled >= measure_from, scheduled, result);
                });
                while tasks.try_join_next().is_some() {}
                n += 1;
            }
            while tasks.join_next().await.is_some() {}
            format!("open/{rate}")
        }
    };
    if let Some(p) = progress {
        p.abort();
    }
    let h = shared
        .histogram
        .lock()
        .map(|h| h.clone())
        .unwrap_or_else(|_| histogram());
    let failed = shared.failed.lock().map(|f| f.clone()).unwrap_or_default();
    let failed_example = shared
        .failed_example
        .lock()
        .map(|f| f.clone())
        .unwrap_or_default();
    let fh = shared
        .failed_histogram
        .lock()
        .map(|h| h.clone())
        .unwrap_or_else(|_| histogram());
    let seconds = config.duration.as_secs_f64();
    Ok(Summary {
        mode,
        calls: shared.calls.load(Ordering::Relaxed),
        failed,
        failed_example,
        seconds,
        throughput: h.len() as f64 / seconds,
        p50_us: h.value_at_quantile(0.50),
        p90_us: h.value_at_quantile(0.90),
        p99_us: h.value_at_quantile(0.99),
        p999_us: h.value_at_quantile(0.999),
        max_us: h.max(),
        failed_p50_us: fh.value_at_quantile(0.50),
        failed_p99_us: fh.value_at_quantile(0.99),
        start_lag_p99_us: lag.value_at_quantile(0.99),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn hello() -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap().to_string();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(tonic_health::server::health_reporter().1)
                .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
        );
        address
    }

    fn config(target: String, mode: Mode) -> LoadConfig {
        LoadConfig {
            targets: vec![target],
            mode,
            connections: 2,
            duration: Duration::from_millis(500),
            warmup: Duration::from_millis(100),
            timeout: Duration::from_secs(1),
            call: Call::Health,
            authorization: None,
            progress: false,
            tls: None,
        }
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn closed_loop_measures_calls_and_latency() {
        let s = run(config(hello().await, Mode::Closed { concurrency: 4 }))
            .await
            .unwrap();
        assert!(s.calls > 50, "{s:?}");
        assert!(s.failed.is_empty(), "{s:?}");
        assert!(
            s.p50_us > 0 && s.p50_us <= s.p99_us && s.p99_us <= s.max_us,
            "{s:?}"
        );
        assert!((s.throughput - s.calls as f64 / 0.5).abs() < 1.0, "{s:?}");
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn open_loop_offers_the_rate() {
        let s = run(config(hello().await, Mode::Open { rate: 200.0 }))
            .await
            .unwrap();
        // 0.5 s measured at 200/s.
        assert!((90..=110).contains(&s.calls), "{s:?}");
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn failures_are_counted_by_code() {
        let mut c = config(hello().await, Mode::Closed { concurrency: 2 });
        c.call = Call::Quote; // the hello server does not serve quotes
        let s = run(c).await.unwrap();
        assert_eq!(
            s.failed.keys().collect::<Vec<_>>(),
            vec!["Unimplemented"],
            "{s:?}"
        );
        assert_eq!(s.failed.values().sum::<u64>(), s.calls);
    }
}
