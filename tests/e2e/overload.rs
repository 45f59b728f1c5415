//! More load than the mesh can serve: each instance admits what it can, refuses the rest at once
//! with UNAVAILABLE, stays small, and serves at full speed again as soon as the load goes.

use std::process::Command;
use std::time::Duration;

use herd_tests::{TestMesh, bin, fixture};
use serde_json::Value;

/// Resident memory of a process, in MiB.
fn rss_mib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

/// Runs herd-bench against `gateway` with `args`; its JSON summary.
fn bench(gateway: &str, args: &[&str]) -> anyhow::Result<Value> {
    let out = Command::new(bin("herd-bench")?)
        .args([
            "--target",
            gateway,
            "--output",
            "json",
            "--connections",
            "4",
        ])
        .args(args)
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "herd-bench {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(serde_json::from_slice(&out.stdout)?)
}

fn figure(summary: &Value, name: &str) -> f64 {
    summary[name].as_f64().unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread")]
async fn three_times_the_capacity_is_shed_fast_and_goodput_comes_back() -> anyhow::Result<()> {
    let mesh = TestMesh::start(1, &fixture()).await?;
    let gateway = mesh.gateways[0].clone();
    let capacity = figure(
        &bench(
            &gateway,
            &["--concurrency", "32", "--duration", "2", "--warmup", "1"],
        )?,
        "throughput",
    );
    anyhow::ensure!(capacity > 50.0, "capacity {capacity}/s");

    let offered = (capacity * 3.0).round();
    let pids: Vec<u32> = mesh.instances.iter().map(|(_, p)| p.pid()).collect();
    let watcher = {
        let pids = pids.clone();
        tokio::spawn(async move {
            let mut peak: f64 = 0.0;
            for _ in 0..60 {
                for pid in &pids {
                    peak = peak.max(rss_mib(*pid));
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            peak
        })
    };
    let rate = offered.to_string();
    let over = bench(
        &gateway,
        &[
            "--rate",
            &rate,
            "--duration",
            "4",
            "--warmup",
            "0.5",
            "--timeout-ms",
            "2000",
        ],
    )?;
    let peak_rss = watcher.await?;
    // Right after: a load the mesh can carry is carried again, at once.
    let after_rate = (capacity * 0.7).round().to_string();
    let after = bench(
        &gateway,
        &["--rate", &after_rate, "--duration", "1", "--warmup", "0"],
    )?;

    let goodput = figure(&over, "throughput");
    let failed = over["failed"].as_object().cloned().unwrap_or_default();
    let refused: f64 = failed.values().filter_map(Value::as_f64).sum();
    println!(
        "REPORT overload: capacity {capacity:.0}/s; offered {offered}/s: goodput {goodput:.0}/s, refused {refused} {failed:?} in {} µs at the median (p99 {} µs), successes p99 {} µs; peak RSS {peak_rss:.1} MiB; right after: {:.0}/s, failed {}",
        over["failed_p50_us"],
        over["failed_p99_us"],
        over["p99_us"],
        figure(&after, "throughput"),
        after["failed"]
    );
    // What is refused is refused as overload, at once: retry elsewhere or later.
    for code in failed.keys() {
        assert_eq!(code, "Unavailable", "{failed:?}");
    }
    assert!(
        refused > 0.0,
        "3× the capacity was all served: was it measured right?"
    );
    assert!(
        figure(&over, "failed_p50_us") < 20_000.0,
        "refusals take {} µs",
        over["failed_p50_us"]
    );
    // The admitted calls are served, at no less than most of the capacity.
    assert!(goodput >= capacity * 0.6, "goodput {goodput} of {capacity}");
    assert!(peak_rss < 80.0, "peak RSS {peak_rss} MiB");
    assert!(
        figure(&after, "throughput") >= capacity * 0.6,
        "{} a second after the overload, offered {after_rate}/s",
        figure(&after, "throughput")
    );
    // The flood left a few lines a second in the logs, not one per failed call.
    let logged: usize = mesh.instances.iter().map(|(_, p)| p.log_text().len()).sum();
    println!("REPORT overload logs: {logged} bytes in all instances' logs");
    assert!(logged < 1_000_000, "{logged} bytes of logs");
    let after_failed = after["failed"].as_object().cloned().unwrap_or_default();
    for code in after_failed.keys() {
        assert_eq!(code, "Unavailable", "{after}");
    }
    Ok(())
}
