//! End-to-end tests of the whole mesh: real etcd, the four service binaries as separate
//! processes, real grpcurl and etcdctl.

use std::time::Duration;

use herd_tests::{Answer, Proc, TestMesh, call, call_as, eventually, fixture, grpcurl, health};
use serde_json::{Value, json};

const QUOTE: &str = "herd.quote.v1.QuoteService";

fn basket() -> Value {
    json!({
        "context": {"tenantId": "acme"},
        "items": [{"sku": "widget", "quantity": 3}, {"sku": "apple", "quantity": 4}, {"sku": "lamp", "quantity": 1}],
        "currency": "EUR",
        "region": "US-CA"
    })
}

/// Half-even division of non-negative integers, written independently of herd's own.
fn half_even(num: i128, den: i128) -> i128 {
    let (q, r) = (num / den, num % den);
    if 2 * r > den || (2 * r == den && q % 2 == 1) {
        q + 1
    } else {
        q
    }
}

/// Expected EUR lines (unit, gross, discount, net, tax, total) for the basket, from DESIGN.md's
/// rules applied by hand: widget 3 × 19.99 with the sku rule's 15 % (beating the 5 % category
/// rule), apple 4 × 1.25 exempt as food, lamp 1 × 12.20; tax 7.25 %; EUR at 0.925.
fn expected(lamp_price: i128, rate_milli: i128, rate_bps: i128) -> (Vec<[i64; 6]>, bool) {
    let lines = [
        (1999i128, 3i128, 15i128, false),
        (125, 4, 0, true),
        (lamp_price, 1, 0, false),
    ];
    let mut saw_half = false;
    let mut conv = |amount: i128| {
        saw_half |= (amount * rate_milli) % 1000 == 500;
        half_even(amount * rate_milli, 1000) as i64
    };
    let mut out = Vec::new();
    for (price, qty, pct, exempt) in lines {
        let gross = price * qty;
        let discount = half_even(gross * pct, 100);
        let net = gross - discount;
        let tax = if exempt {
            0
        } else {
            half_even(net * rate_bps, 10_000)
        };
        let (u, g, d, t) = (conv(price), conv(gross), conv(discount), conv(tax));
        out.push([u, g, d, g - d, t, g - d + t]);
    }
    (out, saw_half)
}

fn minor(v: &Value) -> i64 {
    match &v["minorUnits"] {
        Value::String(s) => s.parse().unwrap_or(i64::MIN),
        Value::Number(n) => n.as_i64().unwrap_or(i64::MIN),
        _ => 0,
    }
}

fn lines_of(quote: &Value) -> Vec<[i64; 6]> {
    quote["lines"]
        .as_array()
        .map(|ls| {
            ls.iter()
                .map(|l| {
                    ["unitPrice", "gross", "discount", "net", "tax", "total"].map(|f| minor(&l[f]))
                })
                .collect()
        })
        .unwrap_or_default()
}

fn lamp_unit_price(quote: &Value) -> i64 {
    lines_of(quote).get(2).map(|l| l[0]).unwrap_or(-1)
}

#[tokio::test(flavor = "multi_thread")]
async fn quotes_are_exact_identical_on_retry_and_verifiable_anywhere() -> anyhow::Result<()> {
    let mesh = TestMesh::start(2, &fixture()).await?;
    let (g1, g2) = (mesh.gateways[0].as_str(), mesh.gateways[1].as_str());

    // Reflection: every service, health and reflection are listed; describe works.
    let out = grpcurl(&["-plaintext", g1, "list"])?;
    let listed = String::from_utf8_lossy(&out.stdout).to_string();
    for name in [
        "herd.quote.v1.QuoteService",
        "herd.pricing.v1.PricingService",
        "herd.tax.v1.TaxService",
        "herd.currency.v1.CurrencyService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    ] {
        assert!(
            listed.contains(name),
            "{name} missing from grpcurl list:\n{listed}"
        );
    }
    let out = grpcurl(&["-plaintext", g1, "describe", QUOTE])?;
    let described = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success() && described.contains("rpc CreateQuote"),
        "{described}"
    );
    let out = grpcurl(&["-plaintext", g1, "describe", "herd.quote.v1.Quote"])?;
    assert!(String::from_utf8_lossy(&out.stdout).contains("config_revision"));

    // Health: "" and each instance's own service are SERVING on every instance.
    for (service, name) in [
        ("gateway", QUOTE),
        ("pricing", "herd.pricing.v1.PricingService"),
        ("tax", "herd.tax.v1.TaxService"),
        ("currency", "herd.currency.v1.CurrencyService"),
    ] {
        for address in mesh.addresses(service)? {
            assert_eq!(
                health(&address, "").as_deref(),
                Some("SERVING"),
                "{service} {address}"
            );
            assert_eq!(
                health(&address, name).as_deref(),
                Some("SERVING"),
                "{service} {address}"
            );
        }
    }

    // Exact totals.
    let first = call_as("acme", g1, &format!("{QUOTE}/CreateQuote"), &basket())?.ok()?;
    let quote = &first["quote"];
    let (want, saw_half) = expected(1220, 925, 725);
    assert!(
        saw_half,
        "the fixture must exercise an exact half in conversion"
    );
    assert_eq!(lines_of(quote), want, "quote: {quote:#}");
    let sum = |i: usize| want.iter().map(|l| l[i]).sum::<i64>();
    assert_eq!(minor(&quote["subtotal"]), sum(1));
    assert_eq!(minor(&quote["discount"]), sum(2));
    assert_eq!(minor(&quote["tax"]), sum(4));
    assert_eq!(minor(&quote["total"]), sum(5));
    assert_eq!(quote["currency"], "EUR");
    assert_eq!(quote["tenantId"], "acme");
    assert_eq!(quote["lines"][0]["promotionId"], "widget-15");
    assert!(
        first["context"]["requestId"]
            .as_str()
            .is_some_and(|s| !s.is_empty())
    );
    assert!(first["context"]["acceptedAt"].is_string());

    // The same request with the returned context, on the other gateway: the identical quote.
    let mut retry = basket();
    retry["context"] = first["context"].clone();
    let second = call_as("acme", g2, &format!("{QUOTE}/CreateQuote"), &retry)?.ok()?;
    assert_eq!(second["quote"], first["quote"]);
    assert_eq!(second["token"], first["token"]);

    // Verification on the other instance; one changed character is refused.
    let token = first["token"].as_str().unwrap_or_default().to_string();
    let verified = call_as(
        "acme",
        g2,
        &format!("{QUOTE}/VerifyQuote"),
        &json!({"context": {"tenantId": "acme"}, "token": token}),
    )?
    .ok()?;
    assert_eq!(verified["quote"], first["quote"]);
    let mut altered: Vec<char> = token.chars().collect();
    let i = altered.len() / 4;
    altered[i] = if altered[i] == 'x' { 'y' } else { 'x' };
    let altered: String = altered.into_iter().collect();
    match call_as(
        "acme",
        g1,
        &format!("{QUOTE}/VerifyQuote"),
        &json!({"context": {"tenantId": "acme"}, "token": altered}),
    )? {
        Answer::Err { code, message } => {
            assert_eq!(code, "InvalidArgument");
            assert!(message.starts_with("token:"), "{message}");
        }
        Answer::Ok(v) => panic!("an altered token verified: {v}"),
    }
    match call_as(
        "other",
        g1,
        &format!("{QUOTE}/VerifyQuote"),
        &json!({"context": {"tenantId": "other"}, "token": token}),
    )? {
        Answer::Err { code, .. } => assert_eq!(code, "PermissionDenied"),
        Answer::Ok(v) => panic!("another tenant's token verified: {v}"),
    }

    // herdctl lists all eight instances.
    let out = std::process::Command::new(herd_tests::bin("herdctl")?)
        .args(["--etcd", &mesh.etcd.endpoint, "instances"])
        .output()?;
    let table = String::from_utf8_lossy(&out.stdout).to_string();
    assert_eq!(table.lines().count(), 9, "{table}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_input_gets_a_precise_status() -> anyhow::Result<()> {
    let mesh = TestMesh::start(1, &fixture()).await?;
    let g = mesh.gateways[0].as_str();
    let with = |f: &dyn Fn(&mut Value)| {
        let mut b = basket();
        f(&mut b);
        b
    };
    let six: Vec<Value> = (0..6)
        .map(|_| json!({"sku": "apple", "quantity": 1}))
        .collect();
    let cases: Vec<(&str, Value, &str, &str)> = vec![
        (
            "no items",
            with(&|b| b["items"] = json!([])),
            "InvalidArgument",
            "items:",
        ),
        (
            "quantity 0",
            with(&|b| b["items"][1]["quantity"] = json!(0)),
            "InvalidArgument",
            "items[1].quantity",
        ),
        (
            "quantity -2",
            with(&|b| b["items"][0]["quantity"] = json!(-2)),
            "InvalidArgument",
            "items[0].quantity",
        ),
        (
            "quantity over limit",
            with(&|b| b["items"][2]["quantity"] = json!(51)),
            "InvalidArgument",
            "items[2].quantity",
        ),
        (
            "too many items",
            with(&|b| b["items"] = json!(six)),
            "InvalidArgument",
            "items: 6 items exceed",
        ),
        (
            "unknown sku",
            with(&|b| b["items"][1]["sku"] = json!("unicorn")),
            "NotFound",
            "items[1].sku: unknown SKU \"unicorn\"",
        ),
        (
            "unknown currency",
            with(&|b| b["currency"] = json!("XYZ")),
            "InvalidArgument",
            "currency: unsupported currency",
        ),
        (
            "unknown region",
            with(&|b| b["region"] = json!("MARS")),
            "InvalidArgument",
            "region: unknown tax region",
        ),
        (
            "another tenant than the token's",
            with(&|b| b["context"] = json!({"tenantId": "globex"})),
            "PermissionDenied",
            "context.tenant_id: \"globex\" is not the tenant",
        ),
        (
            "missing context",
            with(&|b| b["context"] = Value::Null),
            "InvalidArgument",
            "context: required",
        ),
    ];
    for (name, body, code, needle) in cases {
        match call_as("acme", g, &format!("{QUOTE}/CreateQuote"), &body)? {
            Answer::Err { code: got, message } => {
                assert_eq!(got, code, "{name}: {message}");
                assert!(
                    message.contains(needle),
                    "{name}: {message:?} does not name {needle:?}"
                );
            }
            Answer::Ok(v) => panic!("{name}: accepted: {v}"),
        }
    }

    // Not a valid message at all: raw bytes that do not decode as CreateQuoteRequest.
    let status = herd_tests::raw::call(
        g,
        "/herd.quote.v1.QuoteService/CreateQuote",
        &[0x0a, 0xff, 0xff, 0xff],
    )
    .await?;
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    assert!(status.message.contains("CreateQuoteRequest"), "{status:?}");
    // Not a gRPC message either: a JSON body where a frame should be, and a zero deadline.
    let status = herd_tests::raw::post(
        g,
        "/herd.quote.v1.QuoteService/CreateQuote",
        &[],
        bytes::Bytes::from_static(br#"{"items":[]}"#),
    )
    .await?;
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    assert!(
        status
            .message
            .starts_with("request: not an uncompressed gRPC message")
    );
    for timeout in ["0n", "-1S"] {
        let status = herd_tests::raw::post(
            g,
            "/herd.quote.v1.QuoteService/CreateQuote",
            &[("grpc-timeout", timeout)],
            herd_tests::raw::framed(&[]),
        )
        .await?;
        assert_eq!(
            status.code(),
            tonic::Code::DeadlineExceeded,
            "{timeout}: {status:?}"
        );
    }

    // The instances survived all of it.
    assert_eq!(health(g, "").as_deref(), Some("SERVING"));
    let kept = call_as("acme", g, &format!("{QUOTE}/CreateQuote"), &basket())?.ok()?;

    // Expired tokens are refused as such: quotes that live one second.
    mesh.etcd
        .put("/herd/config/quote", r#"{"ttl_seconds":1}"#)?;
    let short = eventually(
        "quotes to live one second",
        Duration::from_secs(10),
        || async {
            let q = call_as("acme", g, &format!("{QUOTE}/CreateQuote"), &basket())
                .ok()?
                .ok()
                .ok()?;
            // RFC 3339 times: seconds are characters 17..19; a 300 s TTL keeps them equal.
            let accepted = q["context"]["acceptedAt"]
                .as_str()?
                .get(17..19)?
                .parse::<u32>()
                .ok()?;
            let expires = q["quote"]["expiresAt"]
                .as_str()?
                .get(17..19)?
                .parse::<u32>()
                .ok()?;
            ((accepted + 1) % 60 == expires).then_some(q)
        },
    )
    .await?;
    let verify = |token: &Value| json!({"context": {"tenantId": "acme"}, "token": token});
    let expired = eventually(
        "the short quote to expire",
        Duration::from_secs(10),
        || async {
            match call_as(
                "acme",
                g,
                &format!("{QUOTE}/VerifyQuote"),
                &verify(&short["token"]),
            )
            .ok()?
            {
                Answer::Err { code, message } => Some((code, message)),
                Answer::Ok(_) => None,
            }
        },
    )
    .await?;
    assert_eq!(expired.0, "FailedPrecondition", "{expired:?}");
    assert!(expired.1.contains("expired"), "{expired:?}");

    // Tokens signed with a key that is no longer configured are refused as such.
    let public = herd_model::keys::public_of(&[3; 32]);
    herd_model::keys::write_key(&herd_tests::secrets_dir(mesh.dir.path())?, "t2", &[3; 32])?;
    mesh.etcd.put(
        "/herd/config/keys",
        &format!(r#"{{"keys":[{{"id":"t2","public":"{public}","active":true}}]}}"#),
    )?;
    let unknown = eventually(
        "the old key to be gone",
        Duration::from_secs(10),
        || async {
            match call_as(
                "acme",
                g,
                &format!("{QUOTE}/VerifyQuote"),
                &verify(&kept["token"]),
            )
            .ok()?
            {
                Answer::Err { code, message } if message.contains("unknown key") => Some(code),
                _ => None,
            }
        },
    )
    .await?;
    assert_eq!(unknown, "InvalidArgument");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn config_changes_reach_every_instance_and_invalid_ones_are_rejected() -> anyhow::Result<()> {
    let mesh = TestMesh::start(2, &fixture()).await?;
    let before = call_as(
        "acme",
        &mesh.gateways[0],
        &format!("{QUOTE}/CreateQuote"),
        &basket(),
    )?
    .ok()?;
    assert_eq!(lamp_unit_price(&before["quote"]), 1128); // 12.20 USD × 0.925 = 11.285 → 11.28

    // A new lamp price, tax rate and EUR rate, written with plain etcdctl.
    let mut catalog: Value = serde_json::from_str(&fixture()[0].1)?;
    catalog["items"]["lamp"]["price_minor"] = json!(1300);
    mesh.etcd
        .put("/herd/config/catalog", &catalog.to_string())?;
    mesh.etcd.put(
        "/herd/config/tax",
        r#"{"regions":{"US-CA":{"rate_bps":800,"exempt_categories":["food"]}}}"#,
    )?;
    mesh.etcd
        .put("/herd/config/fx", r#"{"base":"USD","rates":{"EUR":"0.9"}}"#)?;
    let (want, _) = expected(1300, 900, 800);

    // Every gateway quotes with it...
    for g in &mesh.gateways {
        eventually(
            &format!("gateway {g} to use the new config"),
            Duration::from_secs(10),
            || async {
                let q = call_as("acme", g, &format!("{QUOTE}/CreateQuote"), &basket())
                    .ok()?
                    .ok()
                    .ok()?;
                (lines_of(&q["quote"]) == want).then_some(())
            },
        )
        .await?;
    }
    // ...and every downstream instance answers with it when called directly.
    let ctx = json!({"tenantId": "acme"});
    for address in mesh.addresses("pricing")? {
        eventually(&format!("pricing {address} to use the new price"), Duration::from_secs(10), || async {
            let body = json!({"context": ctx, "items": [{"sku": "lamp", "quantity": 1}], "currency": "USD", "region": "US-CA"});
            let r = call(&address, "herd.pricing.v1.PricingService/PriceItems", &body).ok()?.ok().ok()?;
            (minor(&r["lines"][0]["unitPrice"]) == 1300).then_some(())
        })
        .await?;
    }
    for address in mesh.addresses("tax")? {
        eventually(&format!("tax {address} to use the new rate"), Duration::from_secs(10), || async {
            let body = json!({"context": ctx, "region": "US-CA", "lines": [{"sku": "lamp", "category": "home", "net": {"currencyCode": "USD", "minorUnits": "10000"}}]});
            let r = call(&address, "herd.tax.v1.TaxService/ComputeTax", &body).ok()?.ok().ok()?;
            (minor(&r["taxes"][0]) == 800).then_some(())
        })
        .await?;
    }
    for address in mesh.addresses("currency")? {
        eventually(&format!("currency {address} to use the new rate"), Duration::from_secs(10), || async {
            let body = json!({"context": ctx, "targetCurrency": "EUR", "amounts": [{"currencyCode": "USD", "minorUnits": "1000"}]});
            let r = call(&address, "herd.currency.v1.CurrencyService/Convert", &body).ok()?.ok().ok()?;
            (minor(&r["amounts"][0]) == 900).then_some(())
        })
        .await?;
    }

    // An invalid value: every instance rejects it and keeps the previous configuration.
    let mut bad = catalog.clone();
    bad["items"]["lamp"]["price_minor"] = json!(-5);
    mesh.etcd.put("/herd/config/catalog", &bad.to_string())?;
    rejected_everywhere(&mesh, "catalog", "items.lamp.price_minor").await?;
    for g in &mesh.gateways {
        let q = call_as("acme", g, &format!("{QUOTE}/CreateQuote"), &basket())?.ok()?;
        assert_eq!(
            lines_of(&q["quote"]),
            want,
            "gateway {g} after the invalid write"
        );
    }
    // Unknown fields are rejected too, not silently dropped.
    mesh.etcd
        .put("/herd/config/catalog", &catalog.to_string())?;
    mesh.etcd.put(
        "/herd/config/limits",
        r#"{"max_items":5,"max_quantity":50,"max_weight":3}"#,
    )?;
    rejected_everywhere(&mesh, "limits", "max_weight").await?;
    call_as(
        "acme",
        &mesh.gateways[1],
        &format!("{QUOTE}/CreateQuote"),
        &basket(),
    )?
    .ok()?;
    Ok(())
}

/// Waits until every instance reports, through `herdctl config status` (which asks each one),
/// the latest write of `section` as rejected, its reason naming `field`.
async fn rejected_everywhere(mesh: &TestMesh, section: &str, field: &str) -> anyhow::Result<()> {
    let key = format!("/herd/config/{section}");
    let out = mesh.etcd.ctl(&["get", &key, "-w", "json"])?;
    let written = serde_json::from_slice::<Value>(&out.stdout)?["kvs"][0]["mod_revision"]
        .as_i64()
        .unwrap_or(0);
    let instances = mesh.instances.len();
    eventually(
        &format!("every instance to reject revision {written} of {section}"),
        Duration::from_secs(10),
        || async {
            let all = mesh.config_statuses()?;
            (all.len() == instances
                && all.iter().all(|i| {
                    let rejected = &i["config"]["rejected"];
                    rejected["revision"].as_i64() == Some(written)
                        && rejected["error"]["section"] == section
                        && rejected["error"]["message"]
                            .as_str()
                            .is_some_and(|m| m.contains(field))
                }))
            .then_some(())
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_deregisters_first_then_exits_zero() -> anyhow::Result<()> {
    let mut mesh = TestMesh::start(1, &fixture()).await?;
    let port = herd_tests::free_port();
    let extra = herd_tests::start_instance(
        "pricing",
        &mesh.etcd,
        port,
        mesh.dir.path(),
        // Long enough that a loaded machine still sees the key gone before the process exits.
        &["--drain-delay-ms", "3000"],
    )?;
    let address = format!("127.0.0.1:{port}");
    eventually(
        "the second pricing instance to register",
        Duration::from_secs(20),
        || async {
            mesh.addresses("pricing")
                .ok()
                .filter(|a| a.contains(&address))
                .map(|_| ())
        },
    )
    .await?;
    let mut proc: Proc = extra;
    // An open health Watch stream must not hold the instance open.
    let mut watch_cmd = std::process::Command::new("grpcurl");
    watch_cmd.args([
        "-plaintext",
        "-d",
        r#"{"service":""}"#,
        &address,
        "grpc.health.v1.Health/Watch",
    ]);
    let mut watcher = Proc::spawn(
        "grpcurl watch",
        watch_cmd,
        mesh.dir.path().join("watch.log"),
    )?;
    eventually(
        "the health watch to report SERVING",
        Duration::from_secs(10),
        || async { watcher.log_text().contains("\"SERVING\"").then_some(()) },
    )
    .await?;
    proc.signal("TERM")?;

    // Its key leaves etcd while the process is still draining.
    eventually(
        "the instance's key to leave etcd",
        Duration::from_secs(5),
        || async {
            mesh.addresses("pricing")
                .ok()
                .filter(|a| !a.contains(&address))
                .map(|_| ())
        },
    )
    .await?;
    assert!(
        proc.try_wait()?.is_none(),
        "the process exited before its key left etcd"
    );
    // While it drains it says so: NOT_SERVING, and no longer registered.
    for service in ["", "herd.registration"] {
        assert_eq!(
            herd_tests::health(&address, service).as_deref(),
            Some("NOT_SERVING"),
            "health of {service:?} while draining"
        );
    }
    let status = proc.wait_exit(Duration::from_secs(15)).await?;
    assert_eq!(status.code(), Some(0), "{}", proc.log_text());
    watcher.wait_exit(Duration::from_secs(5)).await?;
    assert!(
        watcher.log_text().contains("NOT_SERVING"),
        "{}",
        watcher.log_text()
    );

    // The mesh still quotes through the remaining instance.
    call_as(
        "acme",
        &mesh.gateways[0],
        &format!("{QUOTE}/CreateQuote"),
        &basket(),
    )?
    .ok()?;
    mesh.instances.clear();
    Ok(())
}

#[test]
fn every_binary_explains_its_flags_and_refuses_bad_settings() -> anyhow::Result<()> {
    for service in herd_tests::SERVICES {
        let bin = herd_tests::bin(&format!("herd-{service}"))?;
        let help = std::process::Command::new(&bin).arg("--help").output()?;
        let text = String::from_utf8_lossy(&help.stdout).to_string();
        assert!(help.status.success(), "{text}");
        for flag in [
            "--listen",
            "--etcd",
            "--prefix",
            "HERD_LISTEN",
            "HERD_ETCD_ENDPOINTS",
            "HERD_PREFIX",
        ] {
            assert!(
                text.contains(flag),
                "herd-{service} --help does not explain {flag}:\n{text}"
            );
        }
        if service == "gateway" {
            assert!(text.contains("127.0.0.1:50051"), "{text}");
        }
        // Refused before any port is bound: with the port it is told to listen on taken, a
        // binary that bound first would exit 1 ("binding ...: address in use"), not 64.
        let taken = std::net::TcpListener::bind("127.0.0.1:0")?;
        let taken = taken.local_addr()?.to_string();
        for bad in [
            &["--prefix", "herd"][..],
            &["--listen", "not-an-address"],
            &["--no-such-flag"],
            &["--lease-ttl", "0"],
            &["--tls-cert", "/nonexistent.pem"],
        ] {
            let mut cmd = std::process::Command::new(&bin);
            if bad[0] != "--listen" {
                cmd.args(["--listen", &taken]);
            }
            let out = cmd.args(["--health-listen", &taken]).args(bad).output()?;
            assert_eq!(
                out.status.code(),
                Some(64),
                "herd-{service} {bad:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            assert!(!out.stderr.is_empty());
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn the_health_port_answers_probes_in_plaintext_and_nothing_else() -> anyhow::Result<()> {
    // The instance serves mutual TLS; orchestrators' probes speak neither TLS nor anything but
    // health.
    let mesh = TestMesh::start_tls(1, &fixture()).await?;
    let certs = mesh
        .certs
        .clone()
        .ok_or_else(|| anyhow::anyhow!("a TLS mesh has certificates"))?;
    let health_address = format!("127.0.0.1:{}", herd_tests::free_port());
    let mut flags = herd_tests::tls_flags(&certs, "tax");
    flags.extend([
        "--health-listen".into(),
        health_address.clone(),
        "--drain-delay-ms".into(),
        "2000".into(),
    ]);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let mut tax = herd_tests::start_instance("tax", &mesh.etcd, 0, mesh.dir.path(), &flags)?;
    for service in ["", "herd.tax.v1.TaxService", "herd.registration"] {
        eventually(
            &format!("the health port to report {service:?} SERVING"),
            Duration::from_secs(20),
            || async {
                (herd_tests::probe(&health_address, service).await.as_deref() == Some("SERVING"))
                    .then_some(())
            },
        )
        .await?;
    }
    // The service port of the same instance refuses a plaintext probe.
    let registered = eventually(
        "the instance registered",
        Duration::from_secs(20),
        || async {
            mesh.etcd
                .get_prefix("/herd/services/tax/")
                .ok()?
                .into_iter()
                .filter_map(|(_, v)| serde_json::from_str::<Value>(&v).ok())
                .find(|v| v["pid"].as_u64() == Some(u64::from(tax.pid())))
                .and_then(|v| v["address"].as_str().map(str::to_string))
        },
    )
    .await?;
    assert_eq!(
        herd_tests::probe(&registered, "").await,
        None,
        "plaintext served"
    );
    // Health alone: no reflection, no service.
    let listed = grpcurl(&["-plaintext", &health_address, "list"])?;
    assert!(!listed.status.success(), "reflection on the health port");
    let answer =
        herd_tests::raw::call(&health_address, "/herd.tax.v1.TaxService/ComputeTax", &[]).await?;
    assert_eq!(answer.code(), tonic::Code::Unimplemented, "{answer:?}");

    // Draining, the probe sees NOT_SERVING; then the port closes with the process.
    tax.signal("TERM")?;
    eventually(
        "the health port to report NOT_SERVING while draining",
        Duration::from_secs(5),
        || async {
            (herd_tests::probe(&health_address, "").await.as_deref() == Some("NOT_SERVING"))
                .then_some(())
        },
    )
    .await?;
    let status = tax.wait_exit(Duration::from_secs(15)).await?;
    assert_eq!(status.code(), Some(0), "{}", tax.log_text());
    assert_eq!(herd_tests::probe(&health_address, "").await, None);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn signing_keys_stay_out_of_etcd_and_a_gateway_without_one_says_so() -> anyhow::Result<()> {
    use base64::Engine;
    let mesh = TestMesh::start_seeded(1).await?;
    let body = json!({"context": {"tenantId": "acme"}, "items": [{"sku": "hammer", "quantity": 3}],
                      "currency": "EUR", "region": "US-CA"});
    // The seeded mesh trusts the development issuer, as `make run`'s does.
    let out = herd_tests::herdctl(
        &mesh.etcd,
        &[
            "auth",
            "token",
            "--issuer-file",
            &herd_tests::secrets_dir(mesh.dir.path())?
                .join("dev-issuer.json")
                .to_string_lossy(),
            "--tenant",
            "acme",
            "--subject",
            "alice",
        ],
    )?;
    let authorization = format!(
        "authorization: Bearer {}",
        String::from_utf8_lossy(&out.stdout).trim()
    );
    let call = |address: &str, method: &str, body: &Value| {
        herd_tests::call_with(
            address,
            &format!("{QUOTE}/{method}"),
            body,
            &[&authorization],
        )
    };
    let g = &mesh.gateways[0];
    let quote = call(g, "CreateQuote", &body)?.ok()?;
    let verify = json!({"context": {"tenantId": "acme"}, "token": quote["token"]});
    call(g, "VerifyQuote", &verify)?.ok()?;

    // The seed wrote k1's private key into the gateways' secrets folder; etcd has its public key
    // and nothing of the private one, in any shape.
    let secrets = herd_tests::secrets_dir(mesh.dir.path())?;
    let pem = std::fs::read_to_string(secrets.join("k1.pem"))?;
    let der = base64::engine::general_purpose::STANDARD.decode(
        pem.lines()
            .filter(|l| !l.starts_with("-----"))
            .collect::<String>(),
    )?;
    // PKCS#8's private key: an OCTET STRING holding the 32-byte OCTET STRING of the seed.
    let at = der
        .windows(4)
        .position(|w| w == [0x04, 0x22, 0x04, 0x20])
        .map(|at| at + 4)
        .ok_or_else(|| anyhow::anyhow!("k1.pem: no Ed25519 seed"))?;
    let private = base64::engine::general_purpose::STANDARD.encode(&der[at..at + 32]);
    // ...nor of the development token issuer's, which the seed kept in the same folder.
    let issuer: herd_model::auth::DevIssuer =
        serde_json::from_slice(&std::fs::read(secrets.join("dev-issuer.json"))?)?;
    // Everything under the prefix: configuration, registrations, statuses.
    let stored = mesh.etcd.get_prefix("/herd/")?;
    assert!(stored.iter().any(|(key, _)| key == "/herd/config/keys"));
    for (key, value) in &stored {
        for secret in [
            private.as_str(),
            issuer.private_key.as_str(),
            "PRIVATE KEY",
            "\"secret\"",
            "private_key",
        ] {
            assert!(!value.contains(secret), "{key} holds {secret}: {value}");
        }
    }

    // A gateway whose secrets folder lacks the active key serves, and says what it lacks...
    let empty = mesh.dir.path().join("no-secrets");
    std::fs::create_dir_all(&empty)?;
    let port = herd_tests::free_port();
    let _bare = herd_tests::start_instance_with_env(
        "gateway",
        &mesh.etcd,
        port,
        mesh.dir.path(),
        &[],
        &[("HERD_SECRETS", &empty.to_string_lossy())],
    )?;
    let bare = format!("127.0.0.1:{port}");
    let refused = eventually(
        "the bare gateway to answer",
        Duration::from_secs(30),
        || async {
            match call(&bare, "CreateQuote", &body).ok()? {
                Answer::Err { code, message } if code == "FailedPrecondition" => Some(message),
                _ => None,
            }
        },
    )
    .await?;
    assert_eq!(
        refused,
        "keys: k1 is the active signing key, but this instance holds no k1.pem among its \
         secrets (it holds: )"
    );
    // ...and signs once the file is there, without a restart.
    std::fs::copy(secrets.join("k1.pem"), empty.join("k1.pem"))?;
    eventually("the key file taken up", Duration::from_secs(10), || async {
        matches!(call(&bare, "CreateQuote", &body).ok()?, Answer::Ok(_)).then_some(())
    })
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn keys_export_moves_private_keys_from_etcd_into_files() -> anyhow::Result<()> {
    use base64::Engine;
    let etcd = herd_tests::Etcd::start().await?;
    let b64 = |seed: u8| base64::engine::general_purpose::STANDARD.encode([seed; 32]);
    // The keys section as an earlier version wrote it.
    let old = json!({"keys": [{"id": "a", "secret": b64(1), "active": false},
                              {"id": "b", "secret": b64(2), "active": true}]});
    etcd.put("/herd/config/keys", &old.to_string())?;
    let dir = tempfile::tempdir()?;
    let secrets = dir.path().join("secrets");
    let out = herd_tests::herdctl(
        &etcd,
        &["keys", "export", "--secrets", &secrets.to_string_lossy()],
    )?;
    anyhow::ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let section: Value = serde_json::from_str(
        &etcd
            .get_prefix("/herd/config/keys")?
            .first()
            .map(|(_, v)| v.clone())
            .unwrap_or_default(),
    )?;
    assert_eq!(
        section,
        json!({"keys": [
            {"id": "a", "public": herd_model::keys::public_of(&[1; 32]), "active": false},
            {"id": "b", "public": herd_model::keys::public_of(&[2; 32]), "active": true}]})
    );
    // The files hold the same keys: they sign for the section now in etcd.
    let ring = herd::config::parse_section::<herd_model::sections::SigningKeys>(
        section.to_string().as_bytes(),
    )?;
    let ring = herd_model::sections::KeyRing::from_section(&ring).map_err(anyhow::Error::msg)?;
    let files = herd_model::keys::SigningSecrets::load(&secrets)?;
    assert_eq!(files.ids(), ["a", "b"]);
    assert!(files.matching(&ring, "a").is_some());
    assert_eq!(files.active(&ring).map(|k| k.id).ok().as_deref(), Some("b"));
    // Run again: nothing left to move.
    let out = herd_tests::herdctl(
        &etcd,
        &["keys", "export", "--secrets", &secrets.to_string_lossy()],
    )?;
    assert!(String::from_utf8_lossy(&out.stdout).contains("nothing to export"));
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn an_instance_is_not_serving_nor_registered_until_its_configuration_is_loaded()
-> anyhow::Result<()> {
    // etcd without any configuration yet; the instance writes its logs as JSON.
    let etcd = herd_tests::Etcd::start().await?;
    let dir = tempfile::tempdir()?;
    let health = format!("127.0.0.1:{}", herd_tests::free_port());
    let mut tax = herd_tests::start_instance(
        "tax",
        &etcd,
        0,
        dir.path(),
        &["--health-listen", &health, "--log-format", "json"],
    )?;
    let registered = || {
        etcd.get_prefix("/herd/services/tax/")
            .map(|kvs| !kvs.is_empty())
            .unwrap_or(false)
    };
    // Up and answering its probes, but neither serving nor registered.
    let answer = eventually(
        "the health port to answer",
        Duration::from_secs(20),
        || async { herd_tests::probe(&health, "").await },
    )
    .await?;
    assert_eq!(answer, "NOT_SERVING");
    assert_eq!(
        herd_tests::probe(&health, "herd.registration")
            .await
            .as_deref(),
        Some("NOT_SERVING")
    );
    assert!(
        !registered(),
        "registered before its configuration was loaded"
    );
    // Once the configuration is there: serving, and registered.
    for (section, json) in fixture() {
        etcd.put(&format!("/herd/config/{section}"), &json)?;
    }
    eventually(
        "SERVING and registered",
        Duration::from_secs(20),
        || async {
            (herd_tests::probe(&health, "").await.as_deref() == Some("SERVING") && registered())
                .then_some(())
        },
    )
    .await?;
    tax.signal("TERM")?;
    assert_eq!(
        tax.wait_exit(Duration::from_secs(15)).await?.code(),
        Some(0)
    );
    // --log-format json: every line is one JSON object with a level and a message.
    let log = tax.log_text();
    let lines: Vec<Value> = log
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).map_err(|e| anyhow::anyhow!("{e}: {l}")))
        .collect::<anyhow::Result<_>>()?;
    assert!(lines.len() >= 3, "{log}");
    for line in &lines {
        assert!(
            line["level"].is_string() && line["message"].is_string(),
            "{line}"
        );
    }
    Ok(())
}

/// A `grpc-timeout` value (`<digits><unit>`) as a duration.
fn grpc_timeout(value: &str) -> Option<Duration> {
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn the_callers_deadline_travels_to_the_last_hop() -> anyhow::Result<()> {
    let mut mesh = TestMesh::start(1, &fixture()).await?;
    // The only tax instance pricing can reach: one that sleeps past any deadline.
    let slow = herd_tests::SlowTax::default();
    let server = herd_tests::with_slow_tax(&mut mesh, &slow).await?;

    let client = herd_tests::quote_client(&mesh.gateways[0], "acme").await?;
    let deadline = Duration::from_millis(1500);
    let waited = eventually(
        "a call to reach the slow tax",
        Duration::from_secs(20),
        || {
            let (mut client, slow) = (client.clone(), slow.clone());
            async move {
                let mut request = tonic::Request::new(herd_tests::widget_quote("acme", ""));
                request.set_timeout(deadline);
                let started = std::time::Instant::now();
                let failed = client.create_quote(request).await.is_err();
                // Until pricing's balancer offers the slow instance, calls fail at once.
                let reached = slow.seen.lock().map(|s| !s.is_empty()).unwrap_or(false);
                (failed && reached).then(|| started.elapsed())
            }
        },
    )
    .await?;
    // The caller's deadline ended the call, not tax's ten seconds or a default.
    assert!(waited < deadline + Duration::from_millis(500), "{waited:?}");
    // Tax was told the time left, less what the gateway and pricing took: the caller's 1.5 s,
    // forwarded hop by hop, not reset.
    let seen = slow.seen.lock().map(|s| s.clone()).unwrap_or_default();
    let told: Vec<Duration> = seen.iter().filter_map(|v| grpc_timeout(v)).collect();
    assert!(!told.is_empty() && told.len() == seen.len(), "{seen:?}");
    let last = told[told.len() - 1];
    assert!(
        last <= deadline && last > deadline / 2,
        "tax was told {last:?} of {deadline:?}"
    );
    server.abort();
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_call_in_flight_at_sigterm_finishes_before_the_instance_exits() -> anyhow::Result<()> {
    let mut mesh = TestMesh::start(1, &fixture()).await?;
    // Tax answers after a second: a quote is in flight at pricing that long.
    let slow = herd_tests::SlowTax {
        answer_after: Some(Duration::from_secs(1)),
        ..Default::default()
    };
    let server = herd_tests::with_slow_tax(&mut mesh, &slow).await?;
    let client = herd_tests::quote_client(&mesh.gateways[0], "acme").await?;
    eventually(
        "a quote through the slow tax",
        Duration::from_secs(20),
        || {
            let mut client = client.clone();
            async move {
                client
                    .create_quote(herd_tests::widget_quote("acme", ""))
                    .await
                    .ok()
            }
        },
    )
    .await?;
    let reached = slow.seen.lock().map(|s| s.len()).unwrap_or(0);
    let mut in_flight = client.clone();
    let call = tokio::spawn(async move {
        in_flight
            .create_quote(herd_tests::widget_quote("acme", "in-flight"))
            .await
    });
    // Once tax holds the call, pricing is told to stop.
    eventually("the call to reach tax", Duration::from_secs(10), || async {
        (slow.seen.lock().map(|s| s.len()).unwrap_or(0) > reached).then_some(())
    })
    .await?;
    let pricing = mesh
        .instances
        .iter_mut()
        .find(|(s, _)| s == "pricing")
        .map(|(_, p)| p)
        .ok_or_else(|| anyhow::anyhow!("no pricing instance"))?;
    pricing.signal("TERM")?;
    let answer = tokio::time::timeout(Duration::from_secs(10), call).await???;
    let quote = answer
        .into_inner()
        .quote
        .ok_or_else(|| anyhow::anyhow!("no quote"))?;
    assert_eq!(
        quote.tax.map(|t| t.minor_units),
        Some(0),
        "tax's answer, zero"
    );
    // Then it drains and exits 0, well within its drain bound.
    assert_eq!(
        pricing.wait_exit(Duration::from_secs(15)).await?.code(),
        Some(0)
    );
    server.abort();
    Ok(())
}
