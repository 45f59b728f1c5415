//! Instances come and go and no caller notices: each scenario runs under a steady stream of
//! CreateQuote calls from a mesh-aware client that counts every call and failure. Scenarios run one
//! at a time: their timing claims should not compete with each other for two cores. Each prints a
//! `REPORT` line with calls sent, calls failed and the time to converge.

use std::time::Duration;

use herd_tests::{
    Load, Report, TestMesh, connected_ports, eventually, first_line_time, fixture, log_time,
    now_secs, start_instance_with_env,
};

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Calls per worker are paced so that the load is steady but leaves the machine room.
const PACE: Duration = Duration::from_millis(10);
const WORKERS: usize = 8;

fn say(scenario: &str, report: &Report, converged: &str) {
    println!("REPORT {scenario}: {report}; {converged}");
}

/// A mesh of `per_service` instances of each service under a steady load whose calls have
/// `deadline`, once the load is flowing.
async fn under_load(per_service: usize, deadline: Duration) -> anyhow::Result<(TestMesh, Load)> {
    let mesh = TestMesh::start(per_service, &fixture()).await?;
    let load = Load::start(&mesh.etcd, WORKERS, PACE, deadline).await?;
    calls(&load, 50).await?;
    Ok((mesh, load))
}

/// Waits until the load has made `n` more calls.
async fn calls(load: &Load, n: u64) -> anyhow::Result<()> {
    load.more(n).await
}

/// When each log first says `needles` at or after `since`, as seconds after `since`.
async fn seen_in_logs(
    what: &str,
    logs: impl Fn() -> Vec<(String, String)>,
    since: f64,
    needles: &[&str],
    timeout: Duration,
) -> anyhow::Result<Vec<f64>> {
    eventually(what, timeout, || async {
        logs()
            .iter()
            .map(|(_, log)| {
                first_line_time(log, since - 0.001, needles).map(|t| (t - since).max(0.0))
            })
            .collect::<Option<Vec<f64>>>()
    })
    .await
}

fn max(v: &[f64]) -> f64 {
    v.iter().copied().fold(0.0, f64::max)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_kill_9_one_instance_of_each_downstream_service() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let (mesh, load) = under_load(2, Duration::from_secs(5)).await?;

    let mut victims = Vec::new();
    for service in ["pricing", "tax", "currency"] {
        let index = mesh
            .instances
            .iter()
            .position(|(s, _)| s == service)
            .unwrap_or(0);
        let (id, _) = mesh
            .registration_of(mesh.instances[index].1.pid())
            .unwrap_or_default();
        victims.push((service, index, id));
    }
    let killed_at = now_secs();
    for (_, index, _) in &victims {
        mesh.instances[*index].1.signal("KILL")?;
    }
    let killed: Vec<usize> = victims.iter().map(|(_, i, _)| *i).collect();
    let mut worst = 0.0f64;
    for (service, _, id) in &victims {
        let callers = if *service == "pricing" {
            "gateway"
        } else {
            "pricing"
        };
        let logs = || {
            mesh.instances
                .iter()
                .enumerate()
                .filter(|(i, (s, _))| s == callers && !killed.contains(i))
                .map(|(_, (s, p))| (s.clone(), p.log_text()))
                .collect::<Vec<_>>()
        };
        let needle = format!("instance={id}");
        let delays = seen_in_logs(
            &format!("every {callers} to drop the killed {service}"),
            logs,
            killed_at,
            &["endpoint removed", &needle],
            Duration::from_secs(5),
        )
        .await?;
        assert!(max(&delays) < 1.0, "{service}: dropped after {delays:?} s");
        worst = worst.max(max(&delays));
    }
    calls(&load, 400).await?;
    let report = load.stop().await;
    say(
        "a kill -9",
        &report,
        &format!("dead endpoints out of every balancer within {worst:.3} s"),
    );
    assert_eq!(report.failures(), 0, "{report}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn b_a_silent_peer_is_avoided_and_serves_again() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    // Deadlines shorter than the stall: calls caught on the silent peer may fail, no others.
    let (mesh, load) = under_load(2, Duration::from_secs(1)).await?;
    let index = mesh
        .instances
        .iter()
        .position(|(s, _)| s == "pricing")
        .unwrap_or(0);
    let (id, _) = mesh
        .registration_of(mesh.instances[index].1.pid())
        .unwrap_or_default();
    let needle = format!("instance={id}");
    let gateways = || mesh.logs_of(&["gateway"]);

    let stopped_at = now_secs();
    mesh.instances[index].1.signal("STOP")?;
    let avoided = seen_in_logs(
        "every gateway to stop offering the silent pricing instance",
        gateways,
        stopped_at,
        &["endpoint removed", &needle],
        Duration::from_secs(5),
    )
    .await;
    // The scenario's stall lasts ten seconds whatever happens; resume before judging.
    tokio::time::sleep(Duration::from_secs_f64(
        (stopped_at + 10.0 - now_secs()).max(0.0),
    ))
    .await;
    mesh.instances[index].1.signal("CONT")?;
    let resumed_at = now_secs();
    let avoided = avoided?;
    let back = seen_in_logs(
        "every gateway to offer the pricing instance again",
        gateways,
        resumed_at,
        &["endpoint added", &needle],
        Duration::from_secs(5),
    )
    .await?;
    calls(&load, 100).await?;
    let report = load.stop().await;
    say(
        "b SIGSTOP 10 s",
        &report,
        &format!(
            "avoided within {:.3} s; serving again {:.3} s after SIGCONT",
            max(&avoided),
            max(&back)
        ),
    );
    // README: a silent peer leaves the balancer within 1.5 s of its last answer (which came
    // before the SIGSTOP); 0.1 s more for the balancer to hear of it and log it on this loaded
    // machine (measured: 1.42–1.49 s).
    assert!(max(&avoided) < 1.6, "avoided only after {avoided:?} s");
    // Only calls already on the silent instance fail, with their deadline: each gateway's
    // balancer gives it a call or two before their growing wait makes p2c pick the other
    // instance — at most one per load worker (measured: 4 of 8, every run).
    let deadlines = report.failed.get("DeadlineExceeded").copied().unwrap_or(0);
    assert_eq!(
        report.failures(),
        deadlines,
        "failures other than deadlines: {report}"
    );
    assert!(
        deadlines <= WORKERS as u64,
        "{deadlines} calls failed on the silent instance: {report}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn c_rolling_restart_of_every_instance_loses_nothing() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let (mut mesh, load) = under_load(2, Duration::from_secs(5)).await?;
    let started = now_secs();
    let originals: Vec<(usize, String)> = mesh
        .instances
        .iter()
        .enumerate()
        .map(|(i, (s, _))| (i, s.clone()))
        .collect();
    for (old, service) in originals {
        let new = mesh.add(&service)?;
        mesh.wait_serving(new).await?;
        let proc = &mut mesh.instances[old].1;
        proc.signal("TERM")?;
        let status = proc.wait_exit(Duration::from_secs(20)).await?;
        assert_eq!(status.code(), Some(0), "{}", proc.log_text());
    }
    let took = now_secs() - started;
    calls(&load, 50).await?;
    let report = load.stop().await;
    say(
        "c rolling restart",
        &report,
        &format!("8 instances replaced one at a time in {took:.1} s"),
    );
    assert_eq!(report.failures(), 0, "{report}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn d_a_new_instance_gets_calls_within_a_second_of_serving() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let (mut mesh, load) = under_load(1, Duration::from_secs(5)).await?;
    let proc = start_instance_with_env(
        "pricing",
        &mesh.etcd,
        0,
        mesh.dir.path(),
        &[],
        &[("RUST_LOG", "info,herd::access=debug")],
    )?;
    mesh.instances.push(("pricing".into(), proc));
    let index = mesh.instances.len() - 1;
    let log = || mesh.instances[index].1.log_text();
    let serving = eventually(
        "the new instance to report SERVING",
        Duration::from_secs(20),
        || async {
            log()
                .lines()
                .find(|l| l.contains(" serving "))
                .and_then(log_time)
        },
    )
    .await?;
    let first_call = eventually(
        "the new instance to receive a call",
        Duration::from_secs(10),
        || async { first_line_time(&log(), serving, &["call received", "PriceItems"]) },
    )
    .await?;
    let report = load.stop().await;
    let delay = first_call - serving;
    say(
        "d scale-out",
        &report,
        &format!("first call {delay:.3} s after SERVING"),
    );
    assert!(delay < 1.0, "first call {delay} s after SERVING");
    assert_eq!(report.failures(), 0, "{report}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn e_a_lease_revoked_behind_its_back_is_replaced_within_one_ttl() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let (mesh, load) = under_load(2, Duration::from_secs(5)).await?;
    let index = mesh
        .instances
        .iter()
        .position(|(s, _)| s == "pricing")
        .unwrap_or(0);
    let pid = mesh.instances[index].1.pid();
    let (id, _) = mesh.registration_of(pid).unwrap_or_default();
    let key = format!("/herd/services/pricing/{id}");
    let lease = lease_of(&mesh, &key)?;
    let out = mesh.etcd.ctl(&["lease", "revoke", &format!("{lease:x}")])?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let revoked_at = now_secs();
    let new_lease = eventually(
        "the instance to register again",
        Duration::from_secs(10),
        || async { lease_of(&mesh, &key).ok().filter(|l| *l != lease) },
    )
    .await
    .map_err(|e| anyhow::anyhow!("{e}\n{}", mesh.instances[index].1.log_text()))?;
    let took = now_secs() - revoked_at;
    // A key deleted by hand is put back, under the same lease.
    let out = mesh.etcd.ctl(&["del", &key])?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let deleted_at = now_secs();
    let back = eventually(
        "the deleted key to be put back",
        Duration::from_secs(5),
        || async { lease_of(&mesh, &key).ok() },
    )
    .await?;
    let put_back = now_secs() - deleted_at;
    assert_eq!(back, new_lease);
    calls(&load, 50).await?;
    let report = load.stop().await;
    say(
        "e lease revoked",
        &report,
        &format!(
            "registered again under lease {new_lease:x} after {took:.3} s; deleted key back after {put_back:.3} s"
        ),
    );
    assert!(took < 2.0, "registered again only after {took} s (TTL 2 s)");
    // The instance says so itself: its registration health is SERVING again.
    let (_, address) = mesh.registration_of(pid).unwrap_or_default();
    assert_eq!(
        herd_tests::health(&address, "herd.registration").as_deref(),
        Some("SERVING")
    );
    assert_eq!(report.failures(), 0, "{report}");
    Ok(())
}

/// The lease a key is attached to.
fn lease_of(mesh: &TestMesh, key: &str) -> anyhow::Result<i64> {
    let out = mesh.etcd.ctl(&["get", key, "-w", "json"])?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    v["kvs"][0]["lease"]
        .as_i64()
        .ok_or_else(|| anyhow::anyhow!("{key} is not in etcd: {v}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn f_watchers_converge_after_compaction_past_their_revision() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let (mut mesh, load) = under_load(2, Duration::from_secs(5)).await?;
    // Freeze one pricing instance so its watch on tax's registrations falls behind, write far more
    // than its stream can buffer, compact past it all, then let it go.
    let watcher = mesh
        .instances
        .iter()
        .position(|(s, _)| s == "pricing")
        .unwrap_or(0);
    mesh.instances[watcher].1.signal("STOP")?;
    let mut etcd = herd::etcd::connect(std::slice::from_ref(&mesh.etcd.endpoint)).await?;
    let junk = "x".repeat(64 * 1024);
    for i in 0..300 {
        etcd.put(format!("/herd/services/tax/junk-{i}"), junk.as_str(), None)
            .await?;
    }
    let deleted = etcd
        .delete(
            "/herd/services/tax/junk-",
            Some(etcd_client::DeleteOptions::new().with_prefix()),
        )
        .await?;
    let revision = deleted.header().map(|h| h.revision()).unwrap_or(0);
    etcd.compact(revision, None).await?;
    let resumed_at = now_secs();
    mesh.instances[watcher].1.signal("CONT")?;

    // Every tax watcher converges: a new tax instance is added and a killed one removed everywhere.
    let fresh = mesh.add("tax")?;
    let (fresh_id, _) = mesh.wait_serving(fresh).await?;
    let old = mesh
        .instances
        .iter()
        .position(|(s, _)| s == "tax")
        .unwrap_or(0);
    let (old_id, _) = mesh
        .registration_of(mesh.instances[old].1.pid())
        .unwrap_or_default();
    mesh.instances[old].1.signal("KILL")?;
    let pricing = || mesh.logs_of(&["pricing"]);
    let added = format!("instance={fresh_id}");
    let removed = format!("instance={old_id}");
    let a = seen_in_logs(
        "every pricing to add the new tax",
        pricing,
        resumed_at,
        &["endpoint added", &added],
        Duration::from_secs(15),
    )
    .await?;
    let r = seen_in_logs(
        "every pricing to drop the killed tax",
        pricing,
        resumed_at,
        &["endpoint removed", &removed],
        Duration::from_secs(15),
    )
    .await?;
    let compacted = mesh.instances[watcher].1.log_text().lines().any(|l| {
        l.contains("watch cancelled (compact revision") && !l.contains("compact revision 0,")
    });
    calls(&load, 50).await?;
    let report = load.stop().await;
    say(
        "f compaction",
        &report,
        &format!(
            "compacted at revision {revision}; frozen watcher saw the compaction: {compacted}; converged {:.3} s after resuming",
            max(&a).max(max(&r))
        ),
    );
    assert!(
        compacted,
        "the frozen watcher never saw its revision compacted: the scenario did not happen"
    );
    // The frozen instance's calls waited (within their 5 s deadline) and the killed one's were
    // retried elsewhere; the new tax instance, started after etcd compacted past the
    // configuration's last write, names it as the others do and serves the calls pinned to it:
    // no caller noticed.
    assert_eq!(report.failures(), 0, "{report}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn g_etcd_down_for_5_s_under_load() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let (mut mesh, load) = under_load(2, Duration::from_secs(5)).await?;
    let gateway = mesh.gateways[0].clone();
    let stopped_at = now_secs();
    mesh.etcd.stop().await?;
    // Operators see that the instance lost its registration, while it keeps serving.
    eventually(
        "health to report the registration lost",
        Duration::from_secs(4),
        || async {
            (herd_tests::health(&gateway, "herd.registration").as_deref() == Some("NOT_SERVING"))
                .then_some(())
        },
    )
    .await?;
    assert_eq!(herd_tests::health(&gateway, "").as_deref(), Some("SERVING"));
    // The outage lasts five seconds whatever happens.
    tokio::time::sleep(Duration::from_secs_f64(
        (stopped_at + 5.0 - now_secs()).max(0.0),
    ))
    .await;
    let during = load.report();
    mesh.etcd.resume().await?;
    let resumed_at = now_secs();
    let all = || mesh.logs_of(&["gateway", "pricing", "tax", "currency"]);
    let again = seen_in_logs(
        "every instance to register again",
        all,
        stopped_at,
        &["registered", "lease="],
        Duration::from_secs(20),
    )
    .await?;
    let pids: Vec<u32> = mesh.instances.iter().map(|(_, p)| p.pid()).collect();
    eventually(
        "every instance's key back, with old leases gone",
        Duration::from_secs(20),
        || async {
            let keys = pids.iter().all(|pid| mesh.registration_of(*pid).is_some());
            // `etcdctl lease list` prints "found N leases", then one id a line.
            let leases = mesh.etcd.ctl(&["lease", "list"]).ok()?;
            let count = String::from_utf8_lossy(&leases.stdout)
                .lines()
                .skip(1)
                .count();
            (keys && count == pids.len()).then_some(())
        },
    )
    .await?;
    eventually(
        "health to report the registration back",
        Duration::from_secs(5),
        || async {
            (herd_tests::health(&gateway, "herd.registration").as_deref() == Some("SERVING"))
                .then_some(())
        },
    )
    .await?;
    calls(&load, 50).await?;
    let report = load.stop().await;
    say(
        "g etcd down 5 s",
        &report,
        &format!(
            "{} calls made during the outage; every instance registered again {:.3} s after etcd returned",
            during.sent,
            max(&again) - (resumed_at - stopped_at)
        ),
    );
    assert_eq!(report.failures(), 0, "{report}");
    Ok(())
}

/// One CreateQuote through grpcurl with a 10 s deadline: the status code and message, and how long
/// the answer took.
fn quote_with_10_s_deadline(gateway: &str) -> anyhow::Result<(String, String, Duration)> {
    let started = std::time::Instant::now();
    let answer = herd_tests::call_as(
        "acme",
        gateway,
        "herd.quote.v1.QuoteService/CreateQuote",
        &serde_json::json!({"context": {"tenantId": "acme"}, "items": [{"sku": "widget", "quantity": 3}],
                            "currency": "EUR", "region": "US-CA"}),
    )?;
    let took = started.elapsed();
    Ok(match answer {
        herd_tests::Answer::Ok(v) => ("OK".into(), v.to_string(), took),
        herd_tests::Answer::Err { code, message } => (code, message, took),
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn h_with_every_instance_of_a_service_gone_calls_fail_at_once_saying_why()
-> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let mesh = TestMesh::start(1, &fixture()).await?;
    let gateway = mesh.gateways[0].clone();
    let (code, _, _) = quote_with_10_s_deadline(&gateway)?;
    assert_eq!(code, "OK");
    let pricing = mesh
        .instances
        .iter()
        .find(|(service, _)| service == "pricing")
        .map(|(_, proc)| proc)
        .ok_or_else(|| anyhow::anyhow!("no pricing instance"))?;
    pricing.signal("KILL")?;

    // Still registered (its lease has up to 2 s to run), but unreachable: no waiting for the
    // deadline.
    let (code, message, took) = quote_with_10_s_deadline(&gateway)?;
    println!("REPORT churn h: pricing killed, still registered: {code} after {took:?}: {message}");
    assert_eq!(code, "Unavailable", "{message}");
    assert!(
        message.starts_with("pricing: 1 instance known, none serving (1 unreachable"),
        "{message}"
    );
    assert!(took < Duration::from_secs(3), "{took:?}");

    // Its lease expired: no instance at all, and still no waiting.
    let (message, took) = eventually(
        "the dead instance's lease to expire",
        Duration::from_secs(10),
        || async {
            let (code, message, took) = quote_with_10_s_deadline(&gateway).ok()?;
            (code == "Unavailable" && message == "pricing: no instance registered")
                .then_some((message, took))
        },
    )
    .await?;
    println!("REPORT churn h: no pricing registered: {message} after {took:?}");
    assert!(took < Duration::from_secs(3), "{took:?}");
    Ok(())
}

/// The established connections from gateway `index` to instances of pricing, by pricing port.
fn pricing_peers(mesh: &TestMesh, index: usize, pricing: &[(usize, u16)]) -> Vec<usize> {
    let ports = connected_ports(mesh.instances[index].1.pid());
    pricing
        .iter()
        .filter(|(_, port)| ports.contains(port))
        .map(|(i, _)| *i)
        .collect()
}

/// Three gateways over five pricing instances with `--subset-size 2`: each gateway connects to
/// two (⌈5/3⌉ = 2) and no more, every pricing instance gets at least one; when both members of a
/// gateway's subset are killed, it connects to two others at once — health, not discovery,
/// tells it: the dead are still registered — and no call fails.
#[tokio::test(flavor = "multi_thread")]
async fn i_a_gateway_holds_its_subset_and_refills_it_when_its_members_die() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let mut mesh = TestMesh::start_with_env(1, &fixture(), &[("HERD_SUBSET_SIZE", "2")]).await?;
    for service in [
        "gateway", "gateway", "pricing", "pricing", "pricing", "pricing",
    ] {
        mesh.add(service)?;
    }
    let mut ports = Vec::new();
    for (index, (service, _)) in mesh.instances.iter().enumerate() {
        if service == "gateway" || service == "pricing" {
            let (_, address) = mesh.wait_serving(index).await?;
            let port: u16 = address
                .rsplit_once(':')
                .and_then(|(_, p)| p.parse().ok())
                .unwrap_or(0);
            ports.push((index, service.clone(), port));
        }
    }
    let pricing: Vec<(usize, u16)> = ports
        .iter()
        .filter(|(_, s, _)| s == "pricing")
        .map(|(i, _, p)| (*i, *p))
        .collect();
    let gateways: Vec<usize> = ports
        .iter()
        .filter(|(_, s, _)| s == "gateway")
        .map(|(i, _, _)| *i)
        .collect();
    assert_eq!((pricing.len(), gateways.len()), (5, 3));
    let load = Load::start(&mesh.etcd, WORKERS, PACE, Duration::from_secs(5)).await?;
    calls(&load, 200).await?;
    let subsets = eventually(
        "every gateway to hold two pricing connections",
        Duration::from_secs(10),
        || async {
            let subsets: Vec<Vec<usize>> = gateways
                .iter()
                .map(|g| pricing_peers(&mesh, *g, &pricing))
                .collect();
            subsets.iter().all(|s| s.len() == 2).then_some(subsets)
        },
    )
    .await?;
    calls(&load, 200).await?;
    for (g, subset) in gateways.iter().zip(&subsets) {
        assert_eq!(
            &pricing_peers(&mesh, *g, &pricing),
            subset,
            "a subset moved"
        );
    }
    let covered: std::collections::BTreeSet<usize> = subsets.iter().flatten().copied().collect();
    assert_eq!(covered.len(), 5, "a pricing instance left out: {subsets:?}");

    let victims = subsets[0].clone();
    for v in &victims {
        mesh.instances[*v].1.signal("KILL")?;
    }
    let killed_at = std::time::Instant::now();
    let refilled = eventually(
        "the first gateway to connect to two live pricing instances",
        Duration::from_secs(3),
        || async {
            let now = pricing_peers(&mesh, gateways[0], &pricing);
            (now.len() == 2 && now.iter().all(|p| !victims.contains(p))).then_some(now)
        },
    )
    .await?;
    let took = killed_at.elapsed();
    // Still registered: their leases (5 s) have not run out.
    assert_eq!(
        mesh.addresses("pricing")?.len(),
        5,
        "refilled only once deregistered"
    );
    calls(&load, 200).await?;
    let report = load.stop().await;
    say(
        "churn i",
        &report,
        &format!(
            "subsets {subsets:?}; both of gateway 0's killed, refilled with {refilled:?} after {took:?}"
        ),
    );
    assert!(took < Duration::from_secs(1), "refilled after {took:?}");
    assert_eq!(report.failures(), 0, "{report}");
    Ok(())
}
