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
    assert_eq!(
        count(server, quotes, "CreateQuote", 0),
        good as f64,
        "{scraped:#?}"
    );
    assert_eq!(
        count(server, quotes, "CreateQuote", 5),
        unknown as f64,
        "{scraped:#?}"
    );
    assert_eq!(
        count(server, quotes, "CreateQuote", 3),
        empty as f64,
        "{scraped:#?}"
    );
    assert_eq!(
        count(client, pricing, "PriceItems", 0),
        good as f64,
        "{scraped:#?}"
    );
    assert_eq!(
        count(client, pricing, "PriceItems", 5),
        unknown as f64,
        "{scraped:#?}"
    );
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
    Ok(())
}
