//! One hostile request never hurts anyone else: every poison request below, sent again and again
//! straight to the instances, gets its own precise status, while a steady load from other callers
//! through the mesh loses not one call.

use std::time::{Duration, Instant};

use bytes::Bytes;
use herd_proto::context::{RequestContext, TraceContext};
use herd_proto::quote::CreateQuoteRequest;
use herd_proto::tax::{ComputeTaxRequest, TaxableLine};
use herd_proto::types::{LineItem, Money};
use herd_tests::raw::{RawAnswer, call, framed, post};
use herd_tests::{Load, TestMesh, fixture};
use prost::Message;
use tonic::Code;

const CREATE: &str = "/herd.quote.v1.QuoteService/CreateQuote";
const PRICE: &str = "/herd.pricing.v1.PricingService/PriceItems";
const TAX: &str = "/herd.tax.v1.TaxService/ComputeTax";

fn context(tenant: &str) -> Option<RequestContext> {
    Some(RequestContext {
        tenant_id: tenant.into(),
        ..Default::default()
    })
}

fn quote(sku: &str, region: &str, context: Option<RequestContext>) -> Vec<u8> {
    CreateQuoteRequest {
        context,
        items: vec![LineItem {
            sku: sku.into(),
            quantity: 1,
        }],
        currency: "EUR".into(),
        region: region.into(),
    }
    .encode_to_vec()
}

/// A poison request: where it goes, what it is, and the code and message it must get.
struct Poison {
    name: &'static str,
    target: &'static str,
    path: &'static str,
    headers: Vec<(&'static str, String)>,
    body: Bytes,
    code: Code,
    says: &'static str,
}

fn poisons() -> Vec<Poison> {
    let big_sku = "u".repeat(100_000);
    let mut traced = context("acme");
    if let Some(ctx) = traced.as_mut() {
        ctx.trace = Some(TraceContext {
            traceparent: "0".repeat(100_000),
            tracestate: String::new(),
        });
    }
    let mut baggage = context("acme");
    if let Some(ctx) = baggage.as_mut() {
        ctx.baggage = (0..10_000).map(|i| (format!("k{i}"), "v".into())).collect();
    }
    let lines = ComputeTaxRequest {
        context: context("acme"),
        region: "US-CA".into(),
        lines: vec![
            TaxableLine {
                sku: "widget".into(),
                category: "tools".into(),
                net: Some(Money {
                    currency_code: "USD".into(),
                    minor_units: 1,
                }),
            };
            100_000
        ],
    }
    .encode_to_vec();
    let pricing = herd_proto::pricing::PriceItemsRequest {
        context: context("acme"),
        items: vec![LineItem {
            sku: big_sku.clone(),
            quantity: 1,
        }],
        currency: "EUR".into(),
        region: "US-CA".into(),
    }
    .encode_to_vec();
    let p = |name, target, path, body: Vec<u8>, code, says| Poison {
        name,
        target,
        path,
        headers: Vec::new(),
        body: framed(&body),
        code,
        says,
    };
    vec![
        p(
            "a 100 KB SKU",
            "gateway",
            CREATE,
            quote(&big_sku, "US-CA", context("acme")),
            Code::InvalidArgument,
            "items[0].sku: at most 64 bytes",
        ),
        p(
            "a 20 KB SKU",
            "gateway",
            CREATE,
            quote(&"u".repeat(20_000), "US-CA", context("acme")),
            Code::InvalidArgument,
            "items[0].sku: at most 64 bytes",
        ),
        p(
            "an unknown SKU",
            "gateway",
            CREATE,
            quote(&"u".repeat(64), "US-CA", context("acme")),
            Code::NotFound,
            "items[0].sku: unknown SKU \"uuuu",
        ),
        p(
            "a 100 KB traceparent",
            "gateway",
            CREATE,
            quote("widget", "US-CA", traced),
            Code::InvalidArgument,
            "context.trace.traceparent",
        ),
        p(
            "a 1 MB region",
            "gateway",
            CREATE,
            quote("widget", &"r".repeat(1 << 20), context("acme")),
            Code::InvalidArgument,
            "exceeds the limit of 262144",
        ),
        p(
            "10,000 baggage entries",
            "gateway",
            CREATE,
            quote("widget", "US-CA", baggage),
            Code::InvalidArgument,
            "context.baggage: at most 64 entries",
        ),
        p(
            "a 1 MB tenant",
            "gateway",
            CREATE,
            quote("widget", "US-CA", context(&"t".repeat(1 << 20))),
            Code::InvalidArgument,
            "exceeds the limit of 262144",
        ),
        p(
            "a 100 KB SKU to pricing",
            "pricing",
            PRICE,
            pricing,
            Code::InvalidArgument,
            "items[0].sku: at most 64 bytes",
        ),
        p(
            "100,000 lines to tax",
            "tax",
            TAX,
            lines,
            Code::InvalidArgument,
            "exceeds the limit of 2097152",
        ),
        p(
            "a 4 MiB message to tax",
            "tax",
            TAX,
            vec![0; 4 << 20],
            Code::InvalidArgument,
            "exceeds the limit of 2097152",
        ),
        p(
            "a 4 MiB message to the gateway",
            "gateway",
            CREATE,
            vec![0; 4 << 20],
            Code::InvalidArgument,
            "exceeds the limit of 262144",
        ),
        Poison {
            name: "a body that is not a gRPC message",
            target: "gateway",
            path: CREATE,
            headers: Vec::new(),
            body: Bytes::from_static(b"{\"items\":[{\"sku\":\"widget\"}]}"),
            code: Code::InvalidArgument,
            says: "request: not an uncompressed gRPC message",
        },
        Poison {
            name: "a zero timeout",
            target: "tax",
            path: TAX,
            headers: vec![("grpc-timeout", "0n".into())],
            body: framed(&[]),
            code: Code::DeadlineExceeded,
            says: "grpc-timeout: zero",
        },
    ]
}

#[tokio::test(flavor = "multi_thread")]
async fn poison_requests_get_their_status_and_cost_other_callers_nothing() -> anyhow::Result<()> {
    let mesh = TestMesh::start(2, &fixture()).await?;
    let load = Load::start(
        &mesh.etcd,
        8,
        Duration::from_millis(10),
        Duration::from_secs(5),
    )
    .await?;
    let targets = |service: &str| -> anyhow::Result<Vec<String>> {
        Ok(match service {
            "gateway" => mesh.gateways.clone(),
            other => mesh.addresses(other)?,
        })
    };
    let poisons = poisons();
    let started = Instant::now();
    let mut sent = 0;
    while started.elapsed() < Duration::from_secs(6) {
        // Eight at a time, every instance of the target service in turn.
        for batch in poisons.chunks(8) {
            let mut calls = Vec::new();
            for poison in batch {
                for address in targets(poison.target)? {
                    let headers: Vec<(&str, &str)> = poison
                        .headers
                        .iter()
                        .map(|(k, v)| (*k, v.as_str()))
                        .collect();
                    let (path, body) = (poison.path, poison.body.clone());
                    calls.push(async move { post(&address, path, &headers, body).await });
                }
            }
            let answers = futures::future::join_all(calls).await;
            let mut answers = answers.into_iter();
            for poison in batch {
                for _ in targets(poison.target)? {
                    let answer: RawAnswer = answers.next().unwrap_or(Ok(RawAnswer {
                        http: 0,
                        code: None,
                        message: String::new(),
                    }))?;
                    sent += 1;
                    assert_eq!(answer.code(), poison.code, "{}: {answer:?}", poison.name);
                    assert!(
                        answer.message.contains(poison.says) && answer.message.len() <= 1024,
                        "{}: {answer:?}",
                        poison.name
                    );
                }
            }
        }
    }
    // Every instance still serves, and a plain quote still works everywhere.
    for gateway in &mesh.gateways {
        let answer = call(gateway, CREATE, &quote("widget", "US-CA", context("acme"))).await?;
        assert_eq!(answer.code(), Code::Ok, "{answer:?}");
    }
    let report = load.stop().await;
    println!(
        "REPORT hostile: {sent} poison requests answered with their own status; other callers: {report}"
    );
    assert!(report.sent > 100, "{report}");
    assert_eq!(report.failures(), 0, "{report}");
    Ok(())
}
