//! Golden metrics as the tools people use see them: every instance's `/metrics` scraped while
//! quotes and a known number of bad requests flow, parsed by the Prometheus project's own parser
//! (`scripts/scrape-metrics.py`), counts checked per method and status code on both sides of
//! every hop; and the same histograms pushed over OTLP to a real receiver.

use std::collections::BTreeMap;
use std::time::Duration;

use herd_tests::otlp::Receiver;
use herd_tests::{Answer, TestMesh, call_as, eventually, fixture, scrape_metrics};
use serde_json::{Value, json};

const CREATE: &str = "herd.quote.v1.QuoteService/CreateQuote";

/// (metric, service, method, status code) → calls, summed over `samples` of `_count` series.
type Calls = BTreeMap<(String, String, String, String), f64>;

fn calls(samples: &[Value], into: &mut Calls) {
    for s in samples {
        let name = s["name"].as_str().unwrap_or_default();
        let Some(metric) = name.strip_suffix("_seconds_count") else {
            continue;
        };
        let label = |k: &str| s["labels"][k].as_str().unwrap_or_default().to_string();
        *into
            .entry((
                metric.to_string(),
                label("rpc_service"),
                label("rpc_method"),
                label("rpc_grpc_status_code"),
            ))
            .or_default() += s["value"].as_f64().unwrap_or_default();
    }
}

/// The value of the sample `name` (without labels) in `samples`.
fn value(samples: &[Value], name: &str) -> Option<f64> {
    samples
        .iter()
        .find(|s| s["name"] == name)
        .and_then(|s| s["value"].as_f64())
}

fn quote(request_id: &str, sku: &str) -> Value {
    json!({
        "context": {"tenantId": "acme", "requestId": request_id},
        "items": [{"sku": sku, "quantity": 2}],
        "currency": "EUR",
        "region": "US-CA"
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn every_hop_is_counted_on_both_sides_by_method_and_status_code() -> anyhow::Result<()> {
    let receiver = Receiver::start().await?;
    let env = [
        (
            "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT",
            receiver.endpoint.as_str(),
        ),
        ("OTEL_METRIC_EXPORT_INTERVAL", "300"),
    ];
    let mesh = TestMesh::start_with_metrics(1, &fixture(), &env).await?;
    let gateway = mesh.gateways[0].clone();
    let (good, unknown, empty) = (12, 3, 2);
    for i in 0..good {
        call_as(
            "acme",
            &gateway,
            CREATE,
            &quote(&format!("m-{i}"), "widget"),
        )?
        .ok()?;
    }
    // Refused by pricing (NOT_FOUND), after a hop: counted on both sides of it.
    for i in 0..unknown {
        let answer = call_as(
            "acme",
            &gateway,
            CREATE,
            &quote(&format!("u-{i}"), "unicorn"),
        )?;
        anyhow::ensure!(
            matches!(&answer, Answer::Err { code, .. } if code == "NotFound"),
            "{answer:?}"
        );
    }
    // Refused by the gateway itself (INVALID_ARGUMENT), before any hop.
    for i in 0..empty {
        let mut body = quote(&format!("e-{i}"), "widget");
        body["items"] = json!([]);
        let answer = call_as("acme", &gateway, CREATE, &body)?;
        anyhow::ensure!(
            matches!(&answer, Answer::Err { code, .. } if code == "InvalidArgument"),
            "{answer:?}"
        );
    }

    let addresses = mesh.metrics.clone().unwrap_or_default();
    let mut scraped = Calls::new();
    let mut per_instance = Vec::new();
    for (service, address) in &addresses {
        let samples = scrape_metrics(address)?;
        calls(&samples, &mut scraped);
        per_instance.push((service.clone(), samples));
    }
    let count = |metric: &str, service: &str, method: &str, code: u8| {
        scraped
            .get(&(
                metric.to_string(),
                service.to_string(),
                method.to_string(),
                code.to_string(),
            ))
            .copied()
            .unwrap_or_default()
    };
    let quotes = "herd.quote.v1.QuoteService";
    let pricing = "herd.pricing.v1.PricingService";
    let server = "rpc_server_duration";
    let client = "rpc_client_duration";
    for (metric, service, method, code, calls) in [
        (server, quotes, "CreateQuote", 0, good),
        (server, quotes, "CreateQuote", 5, unknown),
        (server, quotes, "CreateQuote", 3, empty),
        (client, pricing, "PriceItems", 0, good),
        (client, pricing, "PriceItems", 5, unknown),
    ] {
        assert_eq!(
            count(metric, service, method, code),
            calls as f64,
            "{metric} {service}/{method} code {code}: {scraped:#?}"
        );
    }
    // Both sides of every hop: what callers counted, their callees counted, code by code.
    let mut hops = 0;
    for ((metric, service, method, code), n) in &scraped {
        if metric != client {
            continue;
        }
        let served = count(server, service, method, code.parse()?);
        assert_eq!(*n, served, "{service}/{method} {code}: {scraped:#?}");
        hops += 1;
    }
    // Gateway → pricing (OK and NOT_FOUND), pricing → tax, pricing → currency at least.
    assert!(hops >= 4, "{scraped:#?}");

    for (service, samples) in &per_instance {
        assert_eq!(
            value(samples, "herd_registration_registered"),
            Some(1.0),
            "{service}"
        );
        assert!(
            value(samples, "herd_config_revision") > Some(0.0),
            "{service}"
        );
        assert_eq!(
            value(samples, "herd_config_rejected_revision"),
            Some(0.0),
            "{service}"
        );
        // No call was refused at any door.
        assert!(
            !samples
                .iter()
                .any(|s| s["family"] == "herd_server_refused" && s["value"].as_f64() > Some(0.0)),
            "{service}"
        );
    }
    let gateway_samples = &per_instance
        .iter()
        .find(|(s, _)| s == "gateway")
        .expect("a gateway")
        .1;
    let ready = gateway_samples
        .iter()
        .find(|s| {
            s["name"] == "herd_client_ready_endpoints" && s["labels"]["herd_service"] == "pricing"
        })
        .and_then(|s| s["value"].as_f64());
    assert_eq!(ready, Some(1.0), "{gateway_samples:#?}");

    // The OTLP receiver gets the same histograms: every call counted, by method and code.
    let pushed = eventually(
        "the pushed counts to match the scraped ones",
        Duration::from_secs(10),
        || async {
            let mut pushed = Calls::new();
            for (key, n) in receiver.points() {
                let Some(metric) = key.name.strip_suffix(".duration") else {
                    continue;
                };
                let attr = |k: &str| key.attrs.get(k).cloned().unwrap_or_default();
                *pushed
                    .entry((
                        format!("{}_duration", metric.replace('.', "_")),
                        attr("rpc.service"),
                        attr("rpc.method"),
                        attr("rpc.grpc.status_code"),
                    ))
                    .or_default() += n;
            }
            (pushed == scraped).then_some(pushed)
        },
    )
    .await?;
    assert!(!pushed.is_empty());

    // A configuration revision the gateway refuses shows, and the one in force stays.
    let (gateway_metrics, applied) = {
        let (_, address) = addresses
            .iter()
            .find(|(s, _)| s == "gateway")
            .expect("a gateway");
        let applied = value(&scrape_metrics(address)?, "herd_config_revision");
        (address.clone(), applied)
    };
    mesh.etcd.put(
        "/herd/config/limits",
        r#"{"max_items":"many","max_quantity":50}"#,
    )?;
    let out = mesh
        .etcd
        .ctl(&["get", "/herd/config/limits", "-w", "json"])?;
    let rejected = serde_json::from_slice::<Value>(&out.stdout)?["kvs"][0]["mod_revision"]
        .as_f64()
        .unwrap_or(0.0);
    eventually(
        "the gateway to report the rejected revision",
        Duration::from_secs(10),
        || async {
            let samples = scrape_metrics(&gateway_metrics).ok()?;
            (value(&samples, "herd_config_rejected_revision") == Some(rejected)).then_some(())
        },
    )
    .await?;
    assert_eq!(
        value(&scrape_metrics(&gateway_metrics)?, "herd_config_revision"),
        applied
    );
    Ok(())
}

/// Answers `GET <url>` (Prometheus' HTTP API), as JSON; fails on an HTTP error (a query that does
/// not parse is a 400).
fn get_json(url: &str) -> anyhow::Result<Value> {
    let out = std::process::Command::new("python3")
        .args([
            "-c",
            "import sys, urllib.request; print(urllib.request.urlopen(sys.argv[1], timeout=10).read().decode())",
            url,
        ])
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "GET {url}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(serde_json::from_slice(&out.stdout)?)
}

/// The result vector of the instant query `promql`.
fn query(prometheus: &str, promql: &str) -> anyhow::Result<Vec<Value>> {
    let encoded: String =
        percent_encoding::utf8_percent_encode(promql, percent_encoding::NON_ALPHANUMERIC)
            .to_string();
    let answer = get_json(&format!("http://{prometheus}/api/v1/query?query={encoded}"))?;
    anyhow::ensure!(answer["status"] == "success", "{promql}: {answer}");
    Ok(answer["data"]["result"]
        .as_array()
        .cloned()
        .unwrap_or_default())
}

/// The value of one result of an instant query.
fn sample(result: &Value) -> f64 {
    result["value"][1]
        .as_str()
        .and_then(|v| v.parse().ok())
        .unwrap_or(f64::NAN)
}

/// The lines of README's `promql` blocks.
fn readme_promql() -> Vec<String> {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md"))
        .unwrap_or_default();
    let mut inside = false;
    let mut out = Vec::new();
    for line in readme.lines() {
        if line.starts_with("```") {
            inside = line == "```promql";
            continue;
        }
        if inside && !line.trim().is_empty() && !line.starts_with('#') {
            out.push(line.to_string());
        }
    }
    out
}

/// Every query of the Grafana dashboard, as Grafana would send it for all services.
fn dashboard_queries() -> anyhow::Result<Vec<(String, String)>> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/grafana/herd-golden-signals.json"
    );
    let dashboard: Value = serde_json::from_str(&std::fs::read_to_string(path)?)?;
    let mut queries = Vec::new();
    for panel in dashboard["panels"].as_array().into_iter().flatten() {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"].as_str().unwrap_or_default();
            queries.push((
                panel["title"].as_str().unwrap_or_default().to_string(),
                expr.replace("$__rate_interval", "1m")
                    .replace("$service", ".*"),
            ));
        }
    }
    Ok(queries)
}

#[tokio::test(flavor = "multi_thread")]
async fn prometheus_scrapes_the_mesh_and_answers_the_dashboard_and_readme_queries()
-> anyhow::Result<()> {
    let mesh = TestMesh::start_with_metrics(1, &fixture(), &[]).await?;
    // The repository's scrape configuration, with this mesh's instances as its targets and a
    // scrape every second.
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/prometheus/prometheus.yml"
    );
    let out = std::process::Command::new("python3")
        .args([
            "-c",
            "import json, sys, yaml; print(json.dumps(yaml.safe_load(open(sys.argv[1]))))",
            path,
        ])
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut config: Value = serde_json::from_slice(&out.stdout)?;
    config["global"]["scrape_interval"] = json!("1s");
    config["global"]["evaluation_interval"] = json!("1s");
    let jobs = config["scrape_configs"]
        .as_array_mut()
        .ok_or_else(|| anyhow::anyhow!("no scrape_configs"))?;
    let local = jobs
        .iter_mut()
        .find(|j| j["job_name"] == "herd-local")
        .ok_or_else(|| anyhow::anyhow!("no herd-local job"))?;
    let groups = local["static_configs"]
        .as_array_mut()
        .ok_or_else(|| anyhow::anyhow!("no static_configs"))?;
    for group in groups.iter_mut() {
        let service = group["labels"]["service"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let targets: Vec<String> = mesh
            .metrics
            .iter()
            .flatten()
            .filter(|(s, _)| *s == service)
            .map(|(_, a)| a.clone())
            .collect();
        anyhow::ensure!(!targets.is_empty(), "no {service} instance");
        group["targets"] = json!(targets);
    }
    let file = mesh.dir.path().join("prometheus.yml");
    std::fs::write(&file, config.to_string())?;
    let prometheus = format!("127.0.0.1:{}", herd_tests::free_port());
    let mut cmd = std::process::Command::new("prometheus");
    cmd.arg(format!("--config.file={}", file.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            mesh.dir.path().join("tsdb").display()
        ))
        .arg(format!("--web.listen-address={prometheus}"));
    let _running =
        herd_tests::Proc::spawn("prometheus", cmd, mesh.dir.path().join("prometheus.log"))?;
    // Calls flow while Prometheus scrapes: OK, and NOT_FOUND from pricing.
    let gateway = mesh.gateways[0].clone();
    let target_up = "up{job=\"herd-local\"}";
    eventually(
        "Prometheus to scrape every instance",
        Duration::from_secs(30),
        || async {
            let up = query(&prometheus, target_up).ok()?;
            (up.len() == 4 && up.iter().all(|r| sample(r) == 1.0)).then_some(())
        },
    )
    .await?;
    let mut made = 0;
    let rates = eventually(
        "rates over at least two scrapes",
        Duration::from_secs(30),
        || {
            made += 1;
            let gateway = gateway.clone();
            let prometheus = prometheus.clone();
            async move {
                for i in 0..4 {
                    call_as(
                        "acme",
                        &gateway,
                        CREATE,
                        &quote(&format!("p-{made}-{i}"), "widget"),
                    )
                    .ok()?
                    .ok()
                    .ok()?;
                }
                call_as(
                    "acme",
                    &gateway,
                    CREATE,
                    &quote(&format!("p-{made}"), "unicorn"),
                )
                .ok()?;
                let rate = query(
                    &prometheus,
                    "sum by (rpc_service) (rate(rpc_server_duration_seconds_count[1m]))",
                )
                .ok()?;
                (rate.len() == 4 && rate.iter().all(|r| sample(r) > 0.0)).then_some(rate)
            }
        },
    )
    .await?;
    assert_eq!(rates.len(), 4, "{rates:?}");

    // README's examples.
    let readme = readme_promql();
    assert!(readme.len() >= 2, "README shows no PromQL");
    for promql in &readme {
        let result = query(&prometheus, promql)?;
        assert!(!result.is_empty(), "README: {promql} answers nothing");
        for r in &result {
            let v = sample(r);
            assert!(v.is_finite() && v > 0.0, "README: {promql}: {r}");
        }
    }
    // Every query of the dashboard parses, and those of signals this load makes answer.
    let quiet = ["herd_server_refused", "herd_client_retries", "herd_spans"];
    for (panel, promql) in dashboard_queries()? {
        let result = query(&prometheus, &promql).map_err(|e| anyhow::anyhow!("{panel}: {e}"))?;
        if !quiet.iter().any(|q| promql.contains(q)) {
            assert!(
                !result.is_empty(),
                "dashboard panel {panel:?}: {promql} answers nothing"
            );
        }
    }
    // The success rate the dashboard shows: below 1 for the gateway (a fifth of the quotes asked
    // for an unknown SKU), 1 for tax.
    let success = query(
        &prometheus,
        "sum by (rpc_service) (rate(rpc_server_duration_seconds_count{rpc_grpc_status_code=\"0\"}[1m])) / sum by (rpc_service) (rate(rpc_server_duration_seconds_count[1m]))",
    )?;
    let of = |service: &str| {
        success
            .iter()
            .find(|r| r["metric"]["rpc_service"] == service)
            .map(sample)
    };
    let quotes = of("herd.quote.v1.QuoteService").unwrap_or(f64::NAN);
    assert!(quotes > 0.5 && quotes < 1.0, "{success:?}");
    assert_eq!(of("herd.tax.v1.TaxService"), Some(1.0), "{success:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn an_instance_pushes_its_metrics_once_more_as_it_stops() -> anyhow::Result<()> {
    let receiver = Receiver::start().await?;
    // No push before the instances stop: only the last one can carry the calls.
    let env = [
        (
            "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT",
            receiver.endpoint.as_str(),
        ),
        ("OTEL_METRIC_EXPORT_INTERVAL", "600000"),
        // Every push carries these headers (values %-encoded) and this bound.
        (
            "OTEL_EXPORTER_OTLP_HEADERS",
            "x-team=payments,authorization=Bearer%20s3cret",
        ),
        ("OTEL_EXPORTER_OTLP_METRICS_TIMEOUT", "2500"),
    ];
    let mut mesh = TestMesh::start_with_env(1, &fixture(), &env).await?;
    let calls = 5;
    for i in 0..calls {
        call_as(
            "acme",
            &mesh.gateways[0],
            CREATE,
            &quote(&format!("s-{i}"), "widget"),
        )?
        .ok()?;
    }
    assert!(receiver.points().is_empty(), "pushed before the end");
    for (_, instance) in &mut mesh.instances {
        instance.signal("TERM")?;
        assert!(instance.wait_exit(Duration::from_secs(20)).await?.success());
    }
    let served = |service: &str, method: &str| {
        receiver
            .points()
            .into_iter()
            .filter(|(k, _)| {
                k.name == "rpc.server.duration"
                    && k.attrs.get("rpc.service").map(String::as_str) == Some(service)
                    && k.attrs.get("rpc.method").map(String::as_str) == Some(method)
                    && k.attrs.get("rpc.grpc.status_code").map(String::as_str) == Some("0")
            })
            .map(|(_, n)| n)
            .sum::<f64>()
    };
    assert_eq!(
        served("herd.quote.v1.QuoteService", "CreateQuote"),
        calls as f64
    );
    assert_eq!(served("herd.tax.v1.TaxService", "ComputeTax"), calls as f64);
    let headers = receiver.headers();
    assert_eq!(headers.len(), 4, "one push per instance: {headers:?}");
    for h in &headers {
        assert_eq!(
            h.get("x-team").map(String::as_str),
            Some("payments"),
            "{h:?}"
        );
        assert_eq!(
            h.get("authorization").map(String::as_str),
            Some("Bearer s3cret")
        );
        // The export's bound travels as its gRPC deadline (tonic writes microseconds).
        assert_eq!(h.get("grpc-timeout").map(String::as_str), Some("2500000u"));
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn the_span_counts_are_what_the_collector_received() -> anyhow::Result<()> {
    let receiver = Receiver::start().await?;
    let env = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint.as_str()),
        ("OTEL_METRICS_EXPORTER", "none"),
        ("OTEL_BSP_SCHEDULE_DELAY", herd_tests::SCHEDULE_DELAY_MS),
    ];
    let mesh = TestMesh::start_with_metrics(1, &fixture(), &env).await?;
    let quotes = 4;
    for i in 0..quotes {
        call_as(
            "acme",
            &mesh.gateways[0],
            CREATE,
            &quote(&format!("t-{i}"), "widget"),
        )?
        .ok()?;
    }
    // A quote is seven spans (four served calls, three outgoing); every one exported is counted.
    let counted = |name: &str| -> anyhow::Result<f64> {
        let mut total = 0.0;
        for (_, address) in mesh.metrics.iter().flatten() {
            total += herd_tests::sample_sum(&scrape_metrics(address)?, name, &[]);
        }
        Ok(total)
    };
    let spans = eventually(
        "every span exported and counted",
        Duration::from_secs(10),
        || async {
            let received = receiver.spans().len() as f64;
            let exported = counted("herd_spans_exported_total").ok()?;
            (received >= (7 * quotes) as f64 && exported == received).then_some(received)
        },
    )
    .await?;
    assert_eq!(spans, (7 * quotes) as f64);
    assert_eq!(counted("herd_spans_dropped_total")?, 0.0);
    assert_eq!(counted("herd_spans_failed_total")?, 0.0);
    // Spans went out, metrics did not (OTEL_METRICS_EXPORTER=none).
    assert!(receiver.points().is_empty());
    Ok(())
}
