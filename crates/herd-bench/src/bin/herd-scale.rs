//! `herd-scale`: one scale run — N simulated instances and M callers in this process against a
//! real etcd — printed as one JSON line (see `herd_bench::scale`).

use std::process::ExitCode;

use clap::Parser;
use herd_bench::scale::{ScaleSettings, run};

/// Start N simulated instances and M subsetting callers against etcd, and measure.
#[derive(Debug, Parser)]
struct Args {
    /// etcd's client URLs, comma-separated.
    #[arg(long, value_delimiter = ',', required = true)]
    etcd: Vec<String>,
    /// The pids of etcd's members (for their CPU time and memory), comma-separated.
    #[arg(long, value_delimiter = ',')]
    etcd_pids: Vec<u32>,
    /// The pids of the etcd gRPC proxies `--etcd` names, if any, comma-separated.
    #[arg(long, value_delimiter = ',')]
    proxy_pids: Vec<u32>,
    /// Simulated instances.
    #[arg(long, default_value_t = 100)]
    instances: usize,
    /// Callers.
    #[arg(long, default_value_t = 64)]
    callers: usize,
    /// Each caller's subset size.
    #[arg(long, default_value_t = 16)]
    subset_size: usize,
    /// Configuration changes timed.
    #[arg(long, default_value_t = 10)]
    changes: usize,
    /// Lease TTL of every registration, seconds.
    #[arg(long, default_value_t = 5)]
    lease_ttl: i64,
    /// Calls per second each caller sends.
    #[arg(long, default_value_t = 20)]
    rate: u32,
    /// Simulated instances do not watch their own service (an instance that calls no other does
    /// not).
    #[arg(long)]
    no_peers_watch: bool,
    /// How etcd was run, copied into the report.
    #[arg(long, default_value = "")]
    label: String,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let settings = ScaleSettings {
        endpoints: args.etcd,
        etcd_pids: args.etcd_pids,
        proxy_pids: args.proxy_pids,
        instances: args.instances,
        callers: args.callers,
        subset_size: args.subset_size,
        changes: args.changes,
        lease_ttl: args.lease_ttl,
        rate: args.rate,
        peers_watch: !args.no_peers_watch,
        label: args.label,
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("herd-scale: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(settings)) {
        Ok(report) => match serde_json::to_string(&report) {
            Ok(line) => {
                println!("{line}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("herd-scale: {e}");
                ExitCode::FAILURE
            }
        },
        Err(e) => {
            eprintln!("herd-scale: {e:#}");
            ExitCode::FAILURE
        }
    }
}
