//! `herd-bench`: offers load to a herd gateway (or any target of the same calls) and reports
//! latency percentiles, throughput and failures by status code.

use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use herd_bench::load::{Call, LoadConfig, Mode, run};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Method {
    /// herd.quote.v1.QuoteService/CreateQuote.
    Quote,
    /// grpc.health.v1.Health/Check.
    Health,
    /// grpc.health.v1.Health/Check, each on a new connection (what a connection costs).
    Connect,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Output {
    Text,
    Json,
}

/// Offer load and measure.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Target addresses, comma separated (host:port); connections go round robin over them.
    #[arg(long, value_delimiter = ',', required = true)]
    target: Vec<String>,
    /// Closed loop: this many calls in flight.
    #[arg(long, conflicts_with = "rate")]
    concurrency: Option<usize>,
    /// Open loop: this many calls started per second.
    #[arg(long)]
    rate: Option<f64>,
    /// HTTP/2 connections.
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// Measured seconds.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Warm-up seconds before measuring.
    #[arg(long, default_value_t = 2.0)]
    warmup: f64,
    /// Deadline of each call, milliseconds.
    #[arg(long, default_value_t = 5000)]
    timeout_ms: u64,
    /// The call to make.
    #[arg(long, value_enum, default_value_t = Method::Quote)]
    method: Method,
    /// Result format.
    #[arg(long, value_enum, default_value_t = Output::Text)]
    output: Output,
    /// Sent as `authorization` with every call, e.g. `Bearer <JWT>` (the gateway requires one).
    #[arg(long, env = "HERD_BENCH_AUTHORIZATION", hide_env_values = true)]
    authorization: Option<String>,
    /// TLS to the targets, trusting these CA certificates (PEM).
    #[arg(long, value_name = "FILE")]
    tls_ca: Option<std::path::PathBuf>,
    /// A client certificate (PEM) to present over TLS, with --tls-key.
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    tls_cert: Option<std::path::PathBuf>,
    /// The client certificate's key (PEM).
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    tls_key: Option<std::path::PathBuf>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let mode = match (args.concurrency, args.rate) {
        (_, Some(rate)) => Mode::Open { rate },
        (Some(concurrency), None) => Mode::Closed { concurrency },
        (None, None) => Mode::Closed { concurrency: 16 },
    };
    let tls = match &args.tls_ca {
        None => None,
        Some(ca) => {
            let identity = args.tls_cert.as_deref().zip(args.tls_key.as_deref());
            match herd_bench::caller::tls_connector(ca, identity) {
                Ok(tls) => Some(tls),
                Err(e) => {
                    eprintln!("error: --tls-ca, --tls-cert, --tls-key: {e:#}");
                    return ExitCode::from(herd::settings::EXIT_USAGE);
                }
            }
        }
    };
    let config = LoadConfig {
        targets: args.target,
        mode,
        connections: args.connections,
        duration: Duration::from_secs_f64(args.duration),
        warmup: Duration::from_secs_f64(args.warmup),
        timeout: Duration::from_millis(args.timeout_ms),
        call: match args.method {
            Method::Quote => Call::Quote,
            Method::Health => Call::Health,
            Method::Connect => Call::Connect,
        },
        authorization: args.authorization,
        progress: args.output == Output::Text,
        tls,
    };
    let output = args.output;
    herd::binary::block_on_main(async move {
        let s = run(config).await?;
        match output {
            Output::Json => println!("{}", serde_json::to_string(&s)?),
            Output::Text => println!(
                "{}: {} calls in {:.1}s, {:.0} ok/s, failed {:?}; latency µs p50 {} p90 {} p99 {} p99.9 {} max {}",
                s.mode,
                s.calls,
                s.seconds,
                s.throughput,
                s.failed,
                s.p50_us,
                s.p90_us,
                s.p99_us,
                s.p999_us,
                s.max_us
            ),
        }
        anyhow::Ok(())
    })
}
