//! The scale run: `N` simulated instances in one process, each as a real instance is to etcd and
//! to its callers — its own etcd connection, lease and registration, configuration watch,
//! discovery of its own service, and a real health server on a loopback port — and `M` callers
//! built on herd's own discovery and balanced channels with subsetting, sending calls.
//!
//! It measures what grows with `N`: how long until every caller has discovered every instance
//! and its subset is SERVING, how long a new instance waits for its first call, how long a
//! configuration change takes to reach every instance, how many writes it costs etcd, and what
//! etcd spends (CPU, memory, database).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use etcd_client::Client;
use futures::StreamExt;
use herd::balance::subset::subset;
use herd::discovery::Resolver;
use herd::instance::InstanceInfo;
use herd::layout::Layout;
use herd::registry::Registration;
use herd::watch::Watches;
use herd::{ConfigStore, MeshChannel};
use serde::Serialize;
use tokio::net::TcpListener;
use tokio::sync::Mutex;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

/// The simulated service, and its callers'.
const SERVICE: &str = "scale";
const CALLERS: &str = "scale-caller";
/// Instances started at once.
const STARTING_AT_ONCE: usize = 64;
/// Every wait is bounded.
const WAIT: Duration = Duration::from_secs(60);
/// Places on the ring tried for one instance or caller coming or going.
const CHURN_SAMPLES: usize = 10;
/// How often a condition is checked.
const POLL: Duration = Duration::from_millis(2);

/// What a scale run does.
#[derive(Debug, Clone)]
pub struct ScaleSettings {
    /// etcd's client URLs.
    pub endpoints: Vec<String>,
    /// The pids of etcd's members, for their CPU time and memory.
    pub etcd_pids: Vec<u32>,
    /// The pids of etcd gRPC proxies the instances reach etcd through, if any (their CPU time and
    /// memory are reported apart from the members').
    pub proxy_pids: Vec<u32>,
    /// Simulated instances.
    pub instances: usize,
    /// Callers.
    pub callers: usize,
    /// Each caller's subset size.
    pub subset_size: usize,
    /// Configuration changes timed.
    pub changes: usize,
    /// Lease TTL of every registration, seconds.
    pub lease_ttl: i64,
    /// Calls per second each caller sends.
    pub rate: u32,
    /// Whether each simulated instance watches its own service's registrations, as an instance
    /// that calls another service does (its rank among callers comes from them).
    pub peers_watch: bool,
    /// How etcd was run, for the report (`GOMEMLIMIT=256MiB`, say).
    pub label: String,
}

/// What a scale run measured.
#[derive(Debug, Clone, Serialize)]
pub struct ScaleReport {
    /// Simulated instances.
    pub instances: usize,
    /// Callers.
    pub callers: usize,
    /// How etcd was run.
    pub label: String,
    /// etcd members.
    pub members: usize,
    /// Each caller's subset, as it computes it (⌈N/M⌉ when callers are few).
    pub subset: usize,
    /// From the first instance starting to the last registered, ms.
    pub start_ms: f64,
    /// From the last instance registered until every caller had discovered all, ms.
    pub discovered_after_last_ms: f64,
    /// From the first instance starting until every caller's subset was SERVING, ms.
    pub converged_ms: f64,
    /// From the last instance registered until every caller's subset was SERVING, ms.
    pub converged_after_last_ms: f64,
    /// From a new instance's registration to its first call, ms.
    pub new_instance_first_call_ms: f64,
    /// From its registration until every caller had discovered it, ms (-1: not before its first
    /// call).
    pub new_instance_discovered_ms: f64,
    /// From its registration until it was SERVING in some caller's balancer, ms (-1: likewise).
    pub new_instance_ready_ms: f64,
    /// Configuration changes: from the write's answer to each instance applying it, ms.
    pub config_p50_ms: f64,
    /// The 99th percentile of the same.
    pub config_p99_ms: f64,
    /// The slowest.
    pub config_max_ms: f64,
    /// etcd revisions per configuration change, the change included.
    pub writes_per_change: f64,
    /// The most connections one caller held.
    pub connections_per_caller_max: usize,
    /// The most callers connected to one instance.
    pub connections_per_instance_max: usize,
    /// The fewest.
    pub connections_per_instance_min: usize,
    /// Calls made by the callers, and how many failed.
    pub calls: u64,
    /// Calls that failed.
    pub failed_calls: u64,
    /// etcd's CPU time over the run, all members, seconds.
    pub etcd_cpu_s: f64,
    /// The largest member's resident memory at the end, MiB.
    pub etcd_rss_mib: f64,
    /// The largest member's peak resident memory, MiB.
    pub etcd_peak_rss_mib: f64,
    /// The proxies' CPU time over the run, all of them, seconds (0 without proxies).
    pub proxy_cpu_s: f64,
    /// The largest proxy's peak resident memory, MiB (0 without proxies).
    pub proxy_peak_rss_mib: f64,
    /// The largest member's database, MiB.
    pub etcd_db_mib: f64,
    /// This process's CPU time over the run, seconds.
    pub harness_cpu_s: f64,
    /// With N callers over the N instances (computed, not run): the most and fewest callers
    /// whose subset holds one instance.
    pub ring_per_instance_max: usize,
    /// The fewest.
    pub ring_per_instance_min: usize,
    /// With N callers over N instances, how many callers' subsets change when one instance is
    /// added, one removed, one caller added, one removed; and the members they swap in all (the
    /// mean of ten places on the ring).
    pub ring_churn: Vec<(String, usize, usize)>,
}

/// One simulated instance: alive while held.
struct Simulated {
    _registration: Registration,
    _config: ConfigStore<()>,
    _peers: Option<Resolver>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    calls: Arc<AtomicU64>,
}

impl Drop for Simulated {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// When each instance applied each configuration revision.
type Applied = Arc<Mutex<HashMap<i64, Vec<Instant>>>>;

async fn simulate(
    settings: &ScaleSettings,
    layout: &Layout,
    index: usize,
    applied: Applied,
) -> anyhow::Result<(Simulated, Instant)> {
    // One etcd connection and one watch stream per instance, as each process has.
    let watches = Watches::new(herd::etcd::connect(&settings.endpoints).await?);
    let id = format!("{SERVICE}-{index:06}");
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let address = listener.local_addr()?.to_string();
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter
        .set_service_status(SERVICE, tonic_health::ServingStatus::Serving)
        .await;
    let calls = Arc::new(AtomicU64::new(0));
    let counted = calls.clone();
    let server = tonic::transport::Server::builder()
        .layer(tower::util::MapRequestLayer::new(
            move |request: http::Request<tonic::body::Body>| {
                if request.uri().path().ends_with("/Check") {
                    counted.fetch_add(1, Ordering::Relaxed);
                }
                request
            },
        ))
        .add_service(health)
        .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener));
    let mut tasks = vec![tokio::spawn(async move {
        let _reporter = reporter;
        if let Err(e) = server.await {
            eprintln!("health server: {e}");
        }
    })];
    let config = ConfigStore::<()>::start_on(&watches, layout.clone());
    tokio::time::timeout(WAIT, config.ready())
        .await
        .context("configuration not loaded")?;
    let mut status = config.subscribe_status();
    tasks.push(tokio::spawn(async move {
        while status.changed().await.is_ok() {
            let revision = status.borrow_and_update().applied;
            let at = Instant::now();
            applied.lock().await.entry(revision).or_default().push(at);
        }
    }));
    let peers = settings
        .peers_watch
        .then(|| Resolver::start_on(&watches, layout, SERVICE));
    let registration = register(&watches, layout, SERVICE, &id, address, settings).await?;
    Ok((
        Simulated {
            _registration: registration,
            _config: config,
            _peers: peers,
            tasks,
            calls,
        },
        Instant::now(),
    ))
}

/// Registers `id` of `service` at `address`, as an instance of this process.
async fn register(
    watches: &Watches,
    layout: &Layout,
    service: &str,
    id: &str,
    address: String,
    settings: &ScaleSettings,
) -> anyhow::Result<Registration> {
    let info = InstanceInfo {
        service: service.into(),
        instance_id: id.into(),
        address,
        pid: std::process::id(),
        version: env!("CARGO_PKG_VERSION").into(),
    };
    let key = layout.instance(service, id);
    Ok(Registration::start_on(watches, key, &info, settings.lease_ttl).await?)
}

/// One caller: registered as a `scale-caller`, with a subset channel to `scale`, sending calls.
struct Caller {
    channel: MeshChannel,
    _registration: Registration,
    peers: Resolver,
    _resolver: Resolver,
    traffic: tokio::task::JoinHandle<()>,
    calls: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
}

impl Drop for Caller {
    fn drop(&mut self) {
        self.traffic.abort();
    }
}

async fn caller(
    settings: &ScaleSettings,
    layout: &Layout,
    index: usize,
    go: Arc<AtomicBool>,
) -> anyhow::Result<Caller> {
    let watches = Watches::new(herd::etcd::connect(&settings.endpoints).await?);
    let id = format!("{CALLERS}-{index:04}");
    let peers = Resolver::start_on(&watches, layout, CALLERS);
    let resolver = Resolver::start_on(&watches, layout, SERVICE);
    let channel = MeshChannel::builder(SERVICE)
        .subset(&id, peers.subscribe(), settings.subset_size)
        .build(resolver.subscribe());
    // Callers serve nothing: the address is never dialled.
    let registration = register(
        &watches,
        layout,
        CALLERS,
        &id,
        "127.0.0.1:9".into(),
        settings,
    )
    .await?;
    let (calls, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let pace = Duration::from_secs(1) / settings.rate.max(1);
    let traffic = tokio::spawn({
        let (channel, calls, failed) = (channel.clone(), calls.clone(), failed.clone());
        let go = go.clone();
        async move {
            let mut client = HealthClient::new(channel);
            let mut tick = tokio::time::interval(pace);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                // Calls start once every subset is SERVING.
                if !go.load(Ordering::Relaxed) {
                    continue;
                }
                let request = HealthCheckRequest {
                    service: SERVICE.into(),
                };
                calls.fetch_add(1, Ordering::Relaxed);
                let answer = tokio::time::timeout(Duration::from_secs(1), client.check(request));
                if !matches!(answer.await, Ok(Ok(_))) {
                    failed.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    });
    Ok(Caller {
        channel,
        _registration: registration,
        peers,
        _resolver: resolver,
        traffic,
        calls,
        failed,
    })
}

/// Waits until `done` says yes, checking every [`POLL`]; when it first did.
async fn until(what: &str, mut done: impl FnMut() -> bool) -> anyhow::Result<Instant> {
    let deadline = Instant::now() + WAIT;
    loop {
        if done() {
            return Ok(Instant::now());
        }
        anyhow::ensure!(Instant::now() < deadline, "{what}: not within {WAIT:?}");
        tokio::time::sleep(POLL).await;
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Runs the scale run of `settings` against the etcd it names.
pub async fn run(settings: ScaleSettings) -> anyhow::Result<ScaleReport> {
    let layout = Layout::new(herd::settings::DEFAULT_PREFIX);
    let mut etcd = herd::etcd::connect(&settings.endpoints).await?;
    etcd.put(
        layout.config("telemetry"),
        r#"{"sampling_ratio":0.0}"#,
        None,
    )
    .await?;
    let cpu_before = total_cpu_seconds(&settings.etcd_pids);
    let proxy_cpu_before = total_cpu_seconds(&settings.proxy_pids);
    let harness_before = cpu_seconds(std::process::id());

    // Callers first: they watch the instances come.
    let go = Arc::new(AtomicBool::new(false));
    let mut callers = Vec::new();
    for index in 0..settings.callers {
        callers.push(caller(&settings, &layout, index, go.clone()).await?);
    }
    let m = settings.callers;
    until("every caller to see every caller", || {
        callers.iter().all(|c| {
            c.peers
                .subscribe()
                .borrow()
                .as_ref()
                .is_some_and(|p| p.len() == m)
        })
    })
    .await?;

    let applied: Applied = Arc::default();
    let started = Instant::now();
    let mut simulated = Vec::new();
    let mut last_registered = started;
    let mut starting = futures::stream::iter(0..settings.instances)
        .map(|i| simulate(&settings, &layout, i, applied.clone()))
        .buffer_unordered(STARTING_AT_ONCE);
    while let Some(sim) = starting.next().await {
        let (sim, registered) = sim?;
        last_registered = last_registered.max(registered);
        simulated.push(sim);
    }
    drop(starting);
    let n = settings.instances;
    let discovered = until("every caller to discover every instance", || {
        callers.iter().all(|c| c.channel.endpoint_count() == n)
    })
    .await?;
    let expected = expected_subset(&settings);
    let converged = until("every caller's subset to be SERVING", || {
        callers
            .iter()
            .all(|c| c.channel.ready_instances().len() == expected)
    })
    .await?;

    go.store(true, Ordering::Relaxed);
    // Connections, as the callers hold them.
    let mut per_instance: BTreeMap<String, usize> = BTreeMap::new();
    let mut per_caller_max = 0;
    for c in &callers {
        let connected = c.channel.connected_instances();
        per_caller_max = per_caller_max.max(connected.len());
        for id in connected {
            *per_instance.entry(id).or_default() += 1;
        }
    }
    let instance_max = per_instance.values().copied().max().unwrap_or(0);
    let instance_min = if per_instance.len() < n {
        0
    } else {
        per_instance.values().copied().min().unwrap_or(0)
    };

    // A new instance: from its registration to its first call.
    let (newcomer, registered) = simulate(&settings, &layout, n, applied.clone()).await?;
    let newcomer_id = format!("{SERVICE}-{n:06}");
    let (mut discovered_by_all, mut ready_somewhere) = (None, None);
    let mut told = false;
    let first_call = until("the new instance's first call", || {
        if !told && registered.elapsed() > Duration::from_secs(3) {
            told = true;
            for (i, c) in callers.iter().enumerate() {
                if c.channel.connected_instances().contains(&newcomer_id) {
                    eprintln!(
                        "slow first call: caller {i} connected to it, ready {:?}, {} calls",
                        c.channel.ready_instances().contains(&newcomer_id),
                        c.calls.load(Ordering::Relaxed)
                    );
                }
            }
        }
        if discovered_by_all.is_none()
            && callers.iter().all(|c| c.channel.endpoint_count() == n + 1)
        {
            discovered_by_all = Some(Instant::now());
        }
        if ready_somewhere.is_none()
            && callers
                .iter()
                .any(|c| c.channel.ready_instances().contains(&newcomer_id))
        {
            ready_somewhere = Some(Instant::now());
        }
        newcomer.calls.load(Ordering::Relaxed) > 0
    })
    .await?;
    simulated.push(newcomer);
    let since_registered =
        |at: Option<Instant>| at.map_or(-1.0, |t| ms(t.saturating_duration_since(registered)));

    // Configuration changes, one at a time: from the write's answer to every instance applying.
    let mut delays = Vec::new();
    let mut writes = Vec::new();
    for change in 1..=settings.changes {
        let value = format!(r#"{{"sampling_ratio":{}}}"#, change as f64 / 1000.0);
        let put = etcd.put(layout.config("telemetry"), value, None).await?;
        let written = Instant::now();
        let revision = put.header().map_or(0, |h| h.revision());
        let total = simulated.len();
        let times = loop {
            let times = applied
                .lock()
                .await
                .get(&revision)
                .cloned()
                .unwrap_or_default();
            if times.len() >= total {
                break times;
            }
            anyhow::ensure!(
                written.elapsed() < WAIT,
                "revision {revision}: {} of {total} applied",
                times.len()
            );
            tokio::time::sleep(POLL).await;
        };
        delays.extend(
            times
                .iter()
                .map(|t| ms(t.saturating_duration_since(written))),
        );
        // What else etcd wrote because of the change: anything after it, a second later.
        tokio::time::sleep(Duration::from_secs(1)).await;
        let now = etcd.get("/herd-scale-none", None).await?;
        let newest = now.header().map_or(revision, |h| h.revision());
        writes.push((newest - revision + 1) as f64);
    }
    delays.sort_by(f64::total_cmp);
    let pct = |p: f64| {
        let i = ((delays.len() as f64 * p).ceil() as usize).clamp(1, delays.len().max(1)) - 1;
        delays.get(i).copied().unwrap_or(0.0)
    };

    let (calls, failed) = callers.iter().fold((0, 0), |(c, f), caller| {
        (
            c + caller.calls.load(Ordering::Relaxed),
            f + caller.failed.load(Ordering::Relaxed),
        )
    });
    let mut db = 0u64;
    for endpoint in &settings.endpoints {
        let mut member = Client::connect([endpoint.as_str()], None).await?;
        db = db.max(u64::try_from(member.status().await?.db_size()).unwrap_or(0));
    }
    let report = ScaleReport {
        instances: n,
        callers: settings.callers,
        label: settings.label.clone(),
        // Through a proxy, the endpoints are the proxy's: count the members' pids when given.
        members: if settings.etcd_pids.is_empty() {
            settings.endpoints.len()
        } else {
            settings.etcd_pids.len()
        },
        subset: expected,
        start_ms: ms(last_registered - started),
        discovered_after_last_ms: ms(discovered.saturating_duration_since(last_registered)),
        converged_ms: ms(converged - started),
        converged_after_last_ms: ms(converged.saturating_duration_since(last_registered)),
        new_instance_first_call_ms: ms(first_call - registered),
        new_instance_discovered_ms: since_registered(discovered_by_all),
        new_instance_ready_ms: since_registered(ready_somewhere),
        config_p50_ms: pct(0.5),
        config_p99_ms: pct(0.99),
        config_max_ms: pct(1.0),
        writes_per_change: writes.iter().sum::<f64>() / writes.len().max(1) as f64,
        connections_per_caller_max: per_caller_max,
        connections_per_instance_max: instance_max,
        connections_per_instance_min: instance_min,
        calls,
        failed_calls: failed,
        etcd_cpu_s: total_cpu_seconds(&settings.etcd_pids) - cpu_before,
        etcd_rss_mib: largest_mib(&settings.etcd_pids, "VmRSS:"),
        etcd_peak_rss_mib: largest_mib(&settings.etcd_pids, "VmHWM:"),
        proxy_cpu_s: total_cpu_seconds(&settings.proxy_pids) - proxy_cpu_before,
        proxy_peak_rss_mib: largest_mib(&settings.proxy_pids, "VmHWM:"),
        etcd_db_mib: db as f64 / (1024.0 * 1024.0),
        harness_cpu_s: cpu_seconds(std::process::id()) - harness_before,
        ring_per_instance_max: 0,
        ring_per_instance_min: 0,
        ring_churn: Vec::new(),
    };
    drop(callers);
    drop(simulated);
    Ok(ring_figures(report, settings.subset_size))
}

/// Subsets of N callers over N instances, computed with herd's own function: the spread of
/// callers per instance, and what one instance or caller coming or going changes.
fn ring_figures(mut report: ScaleReport, size: usize) -> ScaleReport {
    let n = report.instances;
    let callers: Vec<String> = (0..n).map(|i| format!("{CALLERS}-{i:06}")).collect();
    let instances: Vec<String> = (0..n).map(|i| format!("{SERVICE}-{i:06}")).collect();
    let subsets = |callers: &[String], instances: &[String]| -> BTreeMap<String, Vec<String>> {
        callers
            .iter()
            .map(|c| {
                let s = subset(
                    c,
                    callers.iter().map(String::as_str),
                    instances.iter().map(String::as_str),
                    size,
                );
                let mut members = s.members().to_vec();
                members.sort();
                (c.clone(), members)
            })
            .collect()
    };
    let before = subsets(&callers, &instances);
    let mut per: BTreeMap<&String, usize> = BTreeMap::new();
    for m in before.values().flatten() {
        *per.entry(m).or_default() += 1;
    }
    report.ring_per_instance_max = per.values().copied().max().unwrap_or(0);
    report.ring_per_instance_min = per.values().copied().min().unwrap_or(0);
    let with = |mut v: Vec<String>, extra: String| {
        v.push(extra);
        v
    };
    let without = |v: &[String], sample: usize| {
        let mut v = v.to_vec();
        v.remove(sample * v.len() / CHURN_SAMPLES);
        v
    };
    // Where on the ring the one coming or going lands decides how many subsets move: the mean
    // of several places.
    for what in [
        "instance added",
        "instance removed",
        "caller added",
        "caller removed",
    ] {
        let (mut changed, mut swapped) = (0, 0);
        for sample in 0..CHURN_SAMPLES {
            let (c, i) = match what {
                "instance added" => (
                    callers.clone(),
                    with(instances.clone(), format!("new-{sample}")),
                ),
                "instance removed" => (callers.clone(), without(&instances, sample)),
                "caller added" => (
                    with(callers.clone(), format!("new-caller-{sample}")),
                    instances.clone(),
                ),
                _ => (without(&callers, sample), instances.clone()),
            };
            let after = subsets(&c, &i);
            for (caller, was) in &before {
                let Some(now) = after.get(caller) else {
                    continue;
                };
                let gone = was.iter().filter(|m| !now.contains(m)).count();
                if gone > 0 || was.len() != now.len() {
                    changed += 1;
                    swapped += gone;
                }
            }
        }
        report.ring_churn.push((
            what.to_string(),
            changed / CHURN_SAMPLES,
            swapped / CHURN_SAMPLES,
        ));
    }
    report
}

/// The subset each caller should hold: as [`subset`] computes it for these counts.
fn expected_subset(settings: &ScaleSettings) -> usize {
    let callers: Vec<String> = (0..settings.callers)
        .map(|i| format!("{CALLERS}-{i:04}"))
        .collect();
    let instances: Vec<String> = (0..settings.instances)
        .map(|i| format!("{SERVICE}-{i:06}"))
        .collect();
    subset(
        &callers[0],
        callers.iter().map(String::as_str),
        instances.iter().map(String::as_str),
        settings.subset_size,
    )
    .size
}

/// CPU time of processes `pids` together (see [`cpu_seconds`]), seconds.
fn total_cpu_seconds(pids: &[u32]) -> f64 {
    pids.iter().map(|p| cpu_seconds(*p)).sum()
}

/// The largest of a memory figure over processes `pids` (see [`status_mib`]), MiB.
fn largest_mib(pids: &[u32], field: &str) -> f64 {
    pids.iter()
        .map(|p| status_mib(*p, field))
        .fold(0.0, f64::max)
}

/// CPU time (user and system) of process `pid`, seconds.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces): utime and stime are the 12th and
    // 13th of them, in clock ticks (100 a second on Linux).
    let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (ticks(11) + ticks(12)) / 100.0
}

/// A memory figure of process `pid` from `/proc/<pid>/status` (`VmRSS:`, `VmHWM:`), MiB.
fn status_mib(pid: u32, field: &str) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}
