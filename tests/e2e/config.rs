//! Shared configuration that cannot hurt: pinned per request, hot-reloaded everywhere, invalid
//! values rejected and reported, reversible, with key rotation that no verifier notices.

use std::collections::BTreeMap;
use std::time::Duration;

use herd_proto::quote::{CreateQuoteRequest, Quote, VerifyQuoteRequest};
use herd_tests::{
    Answer, Load, TestMesh, all_applied, call_as, eventually, fixture, herdctl, now_secs, rss_mib,
};
use prost::Message;
use serde_json::{Value, json};

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn catalog_with_widget_price(price: i64) -> String {
    let mut catalog: Value = serde_json::from_str(&fixture()[0].1).unwrap_or_default();
    catalog["items"]["widget"]["price_minor"] = json!(price);
    catalog.to_string()
}

fn half_even(num: i128, den: i128) -> i128 {
    let (q, r) = (num / den, num % den);
    if 2 * r > den || (2 * r == den && q % 2 == 1) {
        q + 1
    } else {
        q
    }
}

/// The total in EUR of 3 widgets at `price`: the sku rule's 15 % off, 7.25 % tax, EUR at 0.925.
fn widget_total(price: i64) -> i64 {
    let gross = i128::from(price) * 3;
    let discount = half_even(gross * 15, 100);
    let tax = half_even((gross - discount) * 725, 10_000);
    let eur = |a: i128| half_even(a * 925, 1000);
    (eur(gross) - eur(discount) + eur(tax)) as i64
}

async fn client(address: &str) -> anyhow::Result<herd_tests::QuoteClient> {
    herd_tests::quote_client(address, "acme").await
}

fn widget_request(context: Option<herd_proto::context::RequestContext>) -> CreateQuoteRequest {
    let mut request = herd_tests::widget_quote("acme", "");
    if context.is_some() {
        request.context = context;
    }
    request
}

/// `herdctl config status --output json`, as (instance id → (applied, rejected revision, reason)).
fn status(mesh: &TestMesh) -> anyhow::Result<BTreeMap<String, (i64, i64, String)>> {
    let out = mesh.herdctl(&["config", "status", "--output", "json"])?;
    let v: Value = serde_json::from_slice(&out.stdout)?;
    Ok(v["instances"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .map(|i| {
            let rejected = &i["config"]["rejected"];
            (
                i["instance_id"].as_str().unwrap_or_default().to_string(),
                (
                    i["config"]["applied"].as_i64().unwrap_or(0),
                    rejected["revision"].as_i64().unwrap_or(0),
                    format!(
                        "{}: {}",
                        rejected["error"]["section"].as_str().unwrap_or(""),
                        rejected["error"]["message"].as_str().unwrap_or("")
                    ),
                ),
            )
        })
        .collect())
}

/// Writes `value` at `key`; the revision it made.
async fn put(etcd: &mut etcd_client::Client, key: &str, value: String) -> anyhow::Result<i64> {
    let resp = etcd.put(key, value, None).await?;
    Ok(resp.header().map(|h| h.revision()).unwrap_or(0))
}

/// What a quote of 3 widgets depends on, as written at one revision: the widget's price (USD
/// minor units, catalog, read by pricing), the US-CA tax rate (basis points, read by tax) and the
/// EUR rate (thousandths, read by currency).
#[derive(Debug, Clone, Copy, PartialEq)]
struct Written {
    price: i64,
    tax_bps: i64,
    eur_per_mille: i64,
}

impl Written {
    /// As the test configuration (`fixture()`) has it.
    const FIXTURE: Written = Written {
        price: 1999,
        tax_bps: 725,
        eur_per_mille: 925,
    };

    /// The `tax` section with this US-CA rate.
    fn tax_section(&self) -> String {
        json!({"regions": {"US-CA": {"rate_bps": self.tax_bps, "exempt_categories": ["food"]}}})
            .to_string()
    }

    /// The `fx` section with this EUR rate.
    fn fx_section(&self) -> String {
        json!({"base": "USD", "rates": {"EUR": format!("0.{}", self.eur_per_mille)}}).to_string()
    }
}

/// What was in force at `revision`, of the values `written` (revision, values; oldest first).
fn written_at(written: &[(i64, Written)], revision: i64) -> Written {
    written
        .iter()
        .rev()
        .find(|(r, _)| *r <= revision)
        .map_or(Written::FIXTURE, |w| w.1)
}

/// Checks every line field and total of `quote` (3 widgets in EUR) against [`widget_line`] at
/// what was in force at its revision.
fn check_widget_quote(quote: &Quote, written: &[(i64, Written)]) -> anyhow::Result<()> {
    let values = written_at(written, quote.config_revision);
    let expected = widget_line(values);
    let minor = |m: &Option<herd_proto::types::Money>| m.as_ref().map_or(-1, |m| m.minor_units);
    let [line] = quote.lines.as_slice() else {
        anyhow::bail!("a quote of one item has {} lines", quote.lines.len());
    };
    let got = [
        minor(&line.unit_price),
        minor(&line.gross),
        minor(&line.discount),
        minor(&line.net),
        minor(&line.tax),
        minor(&line.total),
    ];
    assert_eq!(
        got, expected,
        "the line of a quote at revision {} (unit, gross, discount, net, tax, total) is not what \
         {values:?} makes",
        quote.config_revision
    );
    assert_eq!(line.promotion_id, "widget-15");
    let totals = [
        minor(&quote.subtotal),
        minor(&quote.discount),
        minor(&quote.tax),
        minor(&quote.total),
    ];
    assert_eq!(totals, [expected[1], expected[2], expected[4], expected[5]]);
    Ok(())
}

/// The line of a quote of 3 widgets in EUR at `w`, computed apart from the mesh: (unit price,
/// gross, discount, net, tax, total), EUR minor units. The sku rule's 15 % off wins over the
/// category's 5 %; every USD amount is converted on its own, half to even.
fn widget_line(w: Written) -> [i64; 6] {
    let gross = i128::from(w.price) * 3;
    let discount = half_even(gross * 15, 100);
    let tax = half_even((gross - discount) * i128::from(w.tax_bps), 10_000);
    let eur = |a: i128| half_even(a * i128::from(w.eur_per_mille), 1000) as i64;
    let (unit, gross, discount, tax) = (
        eur(i128::from(w.price)),
        eur(gross),
        eur(discount),
        eur(tax),
    );
    let net = gross - discount;
    [unit, gross, discount, net, tax, net + tax]
}

#[tokio::test(flavor = "multi_thread")]
async fn a_fifty_changes_to_three_hops_under_load_never_mix_revisions() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let mesh = TestMesh::start(2, &fixture()).await?;
    let mut etcd = herd::etcd::connect(std::slice::from_ref(&mesh.etcd.endpoint)).await?;
    let load = Load::start(
        &mesh.etcd,
        8,
        Duration::from_millis(5),
        Duration::from_secs(5),
    )
    .await?;
    // Each change is read by another hop: the catalog by pricing, the tax rate by tax, the EUR
    // rate by currency. A quote priced with one hop's configuration at one revision and another
    // hop's at another would differ from the computation at its revision.
    let mut now = Written::FIXTURE;
    let mut written = vec![(0i64, now)];
    for i in 1..=51i64 {
        let (key, value) = match i % 3 {
            0 => {
                now.price = 1999 + i * 7;
                ("catalog", catalog_with_widget_price(now.price))
            }
            1 => {
                now.tax_bps = 700 + i;
                ("tax", now.tax_section())
            }
            _ => {
                now.eur_per_mille = 900 + i;
                ("fx", now.fx_section())
            }
        };
        let revision = put(&mut etcd, &format!("/herd/config/{key}"), value).await?;
        written.push((revision, now));
        // Pacing so that quotes land at many revisions.
        tokio::time::sleep(Duration::from_millis(60)).await;
    }
    let last = written.last().map(|w| w.0).unwrap_or(0);
    all_applied(&mesh, 8, last).await?;
    let (report, quotes) = load.finish().await;
    let mut revisions = BTreeMap::new();
    for quote in &quotes {
        check_widget_quote(quote, &written)?;
        *revisions.entry(quote.config_revision).or_insert(0) += 1;
    }
    // Quotes at revisions of each kind of change.
    let kinds: std::collections::BTreeSet<i64> = revisions
        .keys()
        .filter_map(|r| written.iter().position(|w| w.0 == *r))
        .map(|i| i as i64 % 3)
        .collect();
    println!(
        "REPORT config a: {report}; {} quotes at {} distinct revisions (catalog, tax and fx changes), each line and total equal to the computation at its revision",
        quotes.len(),
        revisions.len()
    );
    assert_eq!(report.failures(), 0, "{report}");
    assert!(
        revisions.len() >= 25,
        "quotes covered only {} revisions",
        revisions.len()
    );
    assert_eq!(
        kinds.len(),
        3,
        "quotes at revisions of only {kinds:?} kinds of change"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a2_config_apply_of_three_sections_is_one_revision_for_requests_in_flight()
-> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let mesh = TestMesh::start(2, &fixture()).await?;
    let load = Load::start(
        &mesh.etcd,
        8,
        Duration::from_millis(5),
        Duration::from_secs(5),
    )
    .await?;
    let dir = mesh.dir.path();
    let file = |name: &str| dir.join(name).to_string_lossy().to_string();
    let mut written = vec![(0i64, Written::FIXTURE)];
    // Each apply changes what three hops read (pricing, tax, currency) in one write: a quote sees
    // all three old values or all three new ones, never some of each.
    for i in 1..=12i64 {
        let now = Written {
            price: 2000 + i * 11,
            tax_bps: 730 + i,
            eur_per_mille: 910 + i,
        };
        std::fs::write(file("catalog.json"), catalog_with_widget_price(now.price))?;
        std::fs::write(file("tax.json"), now.tax_section())?;
        std::fs::write(file("fx.json"), now.fx_section())?;
        let out = mesh.herdctl(&[
            "config",
            "apply",
            "--output",
            "json",
            &file("catalog.json"),
            &file("tax.json"),
            &file("fx.json"),
        ])?;
        anyhow::ensure!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let applied: Value = serde_json::from_slice(&out.stdout)?;
        let revision = applied["revision"].as_i64().unwrap_or(0);
        written.push((revision, now));
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    let last = written.last().map(|w| w.0).unwrap_or(0);
    all_applied(&mesh, 8, last).await?;
    // One revision per apply: etcd moved by exactly one per apply (each section's write note
    // rides in the same transaction).
    assert_eq!(
        written
            .windows(2)
            .skip(1)
            .map(|w| w[1].0 - w[0].0)
            .collect::<Vec<_>>(),
        vec![1; 11],
        "{written:?}"
    );
    let (report, quotes) = load.finish().await;
    let mut revisions = std::collections::BTreeSet::new();
    for quote in &quotes {
        check_widget_quote(quote, &written)?;
        revisions.insert(quote.config_revision);
    }
    println!(
        "REPORT config a2: {report}; {} quotes at {} revisions of 13",
        quotes.len(),
        revisions.len()
    );
    assert_eq!(report.failures(), 0, "{report}");
    assert!(revisions.len() >= 8, "quotes at only {revisions:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn b_a_retry_after_a_change_is_byte_identical_on_another_gateway() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let mesh = TestMesh::start(2, &fixture()).await?;
    let mut g1 = client(&mesh.gateways[0]).await?;
    let mut g2 = client(&mesh.gateways[1]).await?;
    let first = g1.create_quote(widget_request(None)).await?.into_inner();
    let mut etcd = herd::etcd::connect(std::slice::from_ref(&mesh.etcd.endpoint)).await?;
    let revision = put(
        &mut etcd,
        "/herd/config/catalog",
        catalog_with_widget_price(2500),
    )
    .await?;
    all_applied(&mesh, 8, revision).await?;
    let fresh = g2.create_quote(widget_request(None)).await?.into_inner();
    assert_eq!(
        fresh.quote.as_ref().map(|q| q.config_revision),
        Some(revision)
    );
    let retry = g2
        .create_quote(widget_request(first.context.clone()))
        .await?
        .into_inner();
    let bytes = |q: &Option<Quote>| q.as_ref().map(|q| q.encode_to_vec()).unwrap_or_default();
    assert_eq!(bytes(&retry.quote), bytes(&first.quote));
    assert_eq!(retry.token, first.token);
    assert_ne!(bytes(&fresh.quote), bytes(&first.quote));
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn c_an_invalid_value_is_rejected_everywhere_reported_and_harmless() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let mesh = TestMesh::start(2, &fixture()).await?;
    let load = Load::start(
        &mesh.etcd,
        8,
        Duration::from_millis(10),
        Duration::from_secs(5),
    )
    .await?;
    let before = status(&mesh)?;
    let applied = before.values().map(|s| s.0).max().unwrap_or(0);
    let bad = catalog_with_widget_price(-1);
    mesh.etcd.put("/herd/config/catalog", &bad)?;
    let out = mesh
        .etcd
        .ctl(&["get", "/herd/config/catalog", "-w", "json"])?;
    let rejected: i64 = serde_json::from_slice::<Value>(&out.stdout)?["kvs"][0]["mod_revision"]
        .as_i64()
        .unwrap_or(0);
    eventually(
        "every instance to report the rejection",
        Duration::from_secs(10),
        || async {
            let s = status(&mesh).ok()?;
            (s.len() == 8
                && s.values().all(|(a, r, why)| {
                    *a == applied && *r == rejected && why.contains("items.widget.price_minor")
                }))
            .then_some(())
        },
    )
    .await?;
    let table = mesh.herdctl(&["config", "status"])?;
    let table = String::from_utf8_lossy(&table.stdout).to_string();
    assert!(
        table.contains(&rejected.to_string())
            && table.contains("catalog: items.widget.price_minor"),
        "{table}"
    );
    let before_stop = load.report().sent;
    eventually(
        "more calls after the rejection",
        Duration::from_secs(10),
        || async { (load.report().sent > before_stop + 100).then_some(()) },
    )
    .await?;
    let (report, quotes) = load.finish().await;
    for quote in &quotes {
        assert_eq!(
            quote.config_revision, applied,
            "a quote used something other than the last good revision"
        );
    }
    println!(
        "REPORT config c: {report}; revision {rejected} rejected by all 8 instances, all kept {applied}"
    );
    assert_eq!(report.failures(), 0, "{report}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn d_propagation_to_eight_instances() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let mesh = TestMesh::start(2, &fixture()).await?;
    let mut etcd = herd::etcd::connect(std::slice::from_ref(&mesh.etcd.endpoint)).await?;
    let mut delays = Vec::new();
    let mut revisions = Vec::new();
    for i in 0..100 {
        // From the moment the write is sent: etcd's commit, the watch and the apply.
        let sent = now_secs();
        let revision = put(
            &mut etcd,
            "/herd/config/catalog",
            catalog_with_widget_price(3000 + i),
        )
        .await?;
        revisions.push(revision);
        // When each instance applied it: only its log line says (with its timestamp); the state
        // it exposes (`config status`) says that, not when.
        let needle = format!("configuration applied revision={revision}");
        let times = eventually(
            &format!("8 instances to apply {revision}"),
            Duration::from_secs(10),
            || async {
                mesh.instances
                    .iter()
                    .map(|(_, p)| {
                        p.log_text()
                            .lines()
                            .find(|l| l.ends_with(&needle))
                            .and_then(herd_tests::log_time)
                    })
                    .collect::<Option<Vec<f64>>>()
            },
        )
        .await?;
        let slowest = times.iter().copied().fold(f64::MIN, f64::max);
        delays.push((slowest - sent) * 1000.0);
    }
    // Each change applied by eight instances cost etcd the one write that made it: nothing
    // else was written between two changes (instances write nothing when they apply one).
    assert_eq!(
        revisions.last().zip(revisions.first()).map(|(l, f)| l - f),
        Some(99),
        "{revisions:?}"
    );
    delays.sort_by(|a, b| a.total_cmp(b));
    let pct =
        |p: f64| delays[((delays.len() as f64 * p).ceil() as usize).clamp(1, delays.len()) - 1];
    println!(
        "REPORT config d: put to all 8 instances applied over {} changes: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        delays.len(),
        pct(0.50),
        pct(0.99),
        pct(1.0)
    );
    // Every instance applied the change after it was sent (the same clock: no delay is negative).
    assert!(delays[0] > 0.0, "{delays:?}");
    // The goal (p99 ≤ 10 ms) cannot be asserted here without flaking: a debug build, every
    // process of the mesh and the test on two loaded cores. `make bench` judges it on release
    // builds and exits non-zero when it is missed; here only a gross regression (25 times the
    // goal) fails.
    assert!(pct(0.99) < 250.0, "p99 {} ms", pct(0.99));
    Ok(())
}

/// The keys section of `keys` (id, secret byte, active), once their private keys are in the
/// gateways' secrets folder and every gateway holds them (as a rotation goes: files first).
async fn keys_json(mesh: &TestMesh, keys: &[(&str, u8, bool)]) -> anyhow::Result<String> {
    let secrets = herd_tests::secrets_dir(mesh.dir.path())?;
    let mut entries = Vec::new();
    let mut added = Vec::new();
    for (id, seed, active) in keys {
        if !secrets.join(format!("{id}.pem")).exists() {
            herd_model::keys::write_key(&secrets, id, &[*seed; 32])?;
            added.push(format!("\"{id}\""));
        }
        entries.push(
            json!({"id": id, "public": herd_model::keys::public_of(&[*seed; 32]), "active": active}),
        );
    }
    if !added.is_empty() {
        // Nothing else says which private keys a gateway holds: its log line when it reads them.
        eventually(
            "every gateway to hold the new keys",
            Duration::from_secs(10),
            || async {
                mesh.logs_of(&["gateway"])
                    .iter()
                    .all(|(_, log)| {
                        log.lines().any(|line| {
                            line.contains("signing keys read again")
                                && added.iter().all(|id| line.contains(id.as_str()))
                        })
                    })
                    .then_some(())
            },
        )
        .await?;
    }
    Ok(json!({ "keys": entries }).to_string())
}

#[tokio::test(flavor = "multi_thread")]
async fn e_key_rotation_under_load_fails_no_verification() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let mesh = TestMesh::start(2, &fixture()).await?;
    let mut etcd = herd::etcd::connect(std::slice::from_ref(&mesh.etcd.endpoint)).await?;
    let old_token = client(&mesh.gateways[0])
        .await?
        .create_quote(widget_request(None))
        .await?
        .into_inner()
        .token;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let verified = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut workers = Vec::new();
    for w in 0..4 {
        let (a, b) = (
            mesh.gateways[w % 2].clone(),
            mesh.gateways[(w + 1) % 2].clone(),
        );
        let (stop, verified) = (stop.clone(), verified.clone());
        workers.push(tokio::spawn(async move {
            let (mut create, mut verify) = (client(&a).await?, client(&b).await?);
            let mut failed = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let token = create
                    .create_quote(widget_request(None))
                    .await?
                    .into_inner()
                    .token;
                let request = VerifyQuoteRequest {
                    context: widget_request(None).context,
                    token,
                };
                match verify.verify_quote(request).await {
                    Ok(_) => {
                        verified.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                    Err(s) => failed.push(s.message().to_string()),
                }
            }
            anyhow::Ok(failed)
        }));
    }
    let more = |n: u64| {
        let verified = verified.clone();
        async move {
            let target = verified.load(std::sync::atomic::Ordering::Relaxed) + n;
            eventually(
                &format!("{n} more verifications"),
                Duration::from_secs(20),
                || async {
                    (verified.load(std::sync::atomic::Ordering::Relaxed) >= target).then_some(())
                },
            )
            .await
        }
    };
    more(50).await?;
    // Rotate in one step: k2 appears already active while k1 only verifies. Instances that have
    // not applied it yet verify k2's tokens with the revision the token names.
    let rotated = put(
        &mut etcd,
        "/herd/config/keys",
        keys_json(&mesh, &[("t1", 9, false), ("t2", 4, true)]).await?,
    )
    .await?;
    all_applied(&mesh, 8, rotated).await?;
    more(50).await?;
    let verify_old = |address: String, token: String| async move {
        let request = VerifyQuoteRequest {
            context: widget_request(None).context,
            token,
        };
        client(&address)
            .await?
            .verify_quote(request)
            .await
            .map(|_| ())
            .map_err(|s| anyhow::anyhow!("{}", s.message()))
    };
    for g in &mesh.gateways {
        verify_old(g.clone(), old_token.clone()).await?;
    }
    // Retire k1.
    let retired = put(
        &mut etcd,
        "/herd/config/keys",
        keys_json(&mesh, &[("t2", 4, true)]).await?,
    )
    .await?;
    all_applied(&mesh, 8, retired).await?;
    more(50).await?;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut failed = Vec::new();
    for w in workers {
        failed.extend(w.await??);
    }
    let verified = verified.load(std::sync::atomic::Ordering::Relaxed);
    for g in &mesh.gateways {
        let refused = verify_old(g.clone(), old_token.clone())
            .await
            .expect_err("a retired key still verifies");
        assert!(refused.to_string().contains("unknown key"), "{refused}");
    }
    println!(
        "REPORT config e: {verified} tokens verified across gateways during rotation, {} failed",
        failed.len()
    );
    assert!(failed.is_empty(), "{failed:?}");
    assert!(verified >= 150);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn f_a_compacted_revision_is_failed_precondition() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let mut mesh = TestMesh::start(1, &fixture()).await?;
    let first = call_as("acme", &mesh.gateways[0], "herd.quote.v1.QuoteService/CreateQuote", &json!({
        "context": {"tenantId": "acme"}, "items": [{"sku": "widget", "quantity": 3}], "currency": "EUR", "region": "US-CA"
    }))?
    .ok()?;
    let pinned = first["context"]["configRevision"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let mut etcd = herd::etcd::connect(std::slice::from_ref(&mesh.etcd.endpoint)).await?;
    let revision = put(
        &mut etcd,
        "/herd/config/catalog",
        catalog_with_widget_price(2100),
    )
    .await?;
    etcd.compact(revision, None).await?;
    // A gateway started now has never seen the pinned revision; etcd no longer has it.
    let index = mesh.add("gateway")?;
    mesh.wait_serving(index).await?;
    let fresh = mesh.gateways.last().cloned().unwrap_or_default();
    let mut retry =
        json!({"items": [{"sku": "widget", "quantity": 3}], "currency": "EUR", "region": "US-CA"});
    retry["context"] = first["context"].clone();
    match call_as(
        "acme",
        &fresh,
        "herd.quote.v1.QuoteService/CreateQuote",
        &retry,
    )? {
        Answer::Err { code, message } => {
            assert_eq!(code, "FailedPrecondition", "{message}");
            assert!(
                message.contains(&format!("revision {pinned}")) && message.contains("compacted"),
                "{message}"
            );
        }
        Answer::Ok(v) => panic!("a compacted revision was served: {v}"),
    }
    // The instance that still holds it in memory answers identically.
    let again = call_as(
        "acme",
        &mesh.gateways[0],
        "herd.quote.v1.QuoteService/CreateQuote",
        &retry,
    )?
    .ok()?;
    assert_eq!(again["quote"], first["quote"]);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn herdctl_apply_diff_history_rollback() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let mesh = TestMesh::start(1, &fixture()).await?;
    let dir = mesh.dir.path();
    let path = |name: &str| dir.join(name).to_string_lossy().to_string();
    std::fs::write(
        dir.join("limits.json"),
        r#"{"max_items":9,"max_quantity":90}"#,
    )?;
    std::fs::write(dir.join("quote.json"), r#"{"ttl_seconds":0}"#)?;
    // One invalid section: nothing is written.
    let out = herdctl(
        &mesh.etcd,
        &["config", "apply", &path("limits.json"), &path("quote.json")],
    )?;
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("ttl_seconds"));
    let out = mesh.herdctl(&["config", "get", "limits"])?;
    assert!(String::from_utf8_lossy(&out.stdout).contains("\"max_items\": 5"));

    // diff shows what would change, and says when the write would be refused.
    let out = mesh.herdctl(&["config", "diff", &path("quote.json")])?;
    assert!(
        !out.status.success()
            && String::from_utf8_lossy(&out.stdout).contains("+  \"ttl_seconds\": 0")
            && String::from_utf8_lossy(&out.stderr).contains("refused: quote: ttl_seconds"),
        "{out:?}"
    );
    let out = mesh.herdctl(&["config", "diff", &path("limits.json")])?;
    assert!(out.status.success(), "{out:?}");
    let diff = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        diff.contains("-  \"max_items\": 5") && diff.contains("+  \"max_items\": 9"),
        "{diff}"
    );

    // Both sections in one transaction.
    std::fs::write(dir.join("quote.json"), r#"{"ttl_seconds":600}"#)?;
    let out = herdctl(
        &mesh.etcd,
        &[
            "config",
            "apply",
            &path("limits.json"),
            &format!("quote={}", path("quote.json")),
            "--output",
            "json",
        ],
    )?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let applied: Value = serde_json::from_slice(&out.stdout)?;
    let revision = applied["revision"].as_i64().unwrap_or(0);
    let history = |section: &str| -> anyhow::Result<Vec<Value>> {
        let out = herdctl(
            &mesh.etcd,
            &["config", "history", section, "--output", "json"],
        )?;
        Ok(serde_json::from_slice::<Value>(&out.stdout)?
            .as_array()
            .cloned()
            .unwrap_or_default())
    };
    let limits = history("limits")?;
    assert_eq!(limits[0]["revision"].as_i64(), Some(revision));
    assert!(limits[0]["written_at"].is_string());
    assert_eq!(history("quote")?[0]["revision"].as_i64(), Some(revision));
    let original = limits[1]["revision"].as_i64().unwrap_or(0);
    assert!(
        limits[1]["written_at"].is_null(),
        "the fixture was written with etcdctl: {limits:?}"
    );

    // Roll back to the original, and every instance applies it.
    let out = herdctl(
        &mesh.etcd,
        &[
            "config",
            "rollback",
            "limits",
            "--to",
            &original.to_string(),
        ],
    )?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = mesh.herdctl(&["config", "get", "limits"])?;
    assert!(String::from_utf8_lossy(&out.stdout).contains("\"max_items\": 5"));
    let rolled = history("limits")?;
    assert!(
        rolled[0]["by"]
            .as_str()
            .unwrap_or_default()
            .contains("rollback")
    );
    all_applied(&mesh, 4, rolled[0]["revision"].as_i64().unwrap_or(0)).await?;
    let table = mesh.herdctl(&["config", "history", "limits"])?;
    assert!(String::from_utf8_lossy(&table.stdout).contains("REVISION"));
    Ok(())
}

/// The sections README.md's table documents under `/herd/config/`, in its order.
fn documented_sections() -> Vec<String> {
    std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.strip_prefix("| `/herd/config/"))
        .filter_map(|rest| rest.split('`').next())
        .map(str::to_string)
        .collect()
}

/// `herdctl config sections --output json`: every section instances read, with a valid example.
fn sections(mesh: &TestMesh) -> anyhow::Result<Vec<(String, Value)>> {
    let out = mesh.herdctl(&["config", "sections", "--output", "json"])?;
    anyhow::ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(serde_json::from_slice::<Value>(&out.stdout)?
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .map(|s| {
            (
                s["section"].as_str().unwrap_or_default().to_string(),
                s["example"].clone(),
            )
        })
        .collect())
}

/// The newest revision of any configuration key, from `herdctl config status`.
fn config_revision(mesh: &TestMesh) -> anyhow::Result<i64> {
    let out = mesh.herdctl(&["config", "status", "--output", "json"])?;
    Ok(serde_json::from_slice::<Value>(&out.stdout)?["revision"]
        .as_i64()
        .unwrap_or(0))
}

/// Waits until all `n` instances applied `revision` and none rejected or ignored anything.
async fn all_applied_cleanly(mesh: &TestMesh, n: usize, revision: i64) -> anyhow::Result<()> {
    all_applied(mesh, n, revision).await?;
    let statuses = mesh
        .config_statuses()
        .ok_or_else(|| anyhow::anyhow!("herdctl config status answered nothing"))?;
    for instance in statuses {
        assert!(
            instance["config"]["rejected"].is_null() && instance["config"]["ignored"].is_null(),
            "{instance}"
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn g_every_documented_key_can_be_written_and_configuration_still_applies()
-> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let mesh = TestMesh::start_seeded(1).await?;
    let sections = sections(&mesh)?;
    let names: Vec<String> = sections.iter().map(|(name, _)| name.clone()).collect();
    assert_eq!(
        documented_sections(),
        names,
        "README's table of /herd/config/ keys and the sections instances read differ"
    );

    // Every section written with plain etcdctl...
    for (name, example) in &sections {
        mesh.etcd
            .put(&format!("/herd/config/{name}"), &example.to_string())?;
    }
    all_applied_cleanly(&mesh, 4, config_revision(&mesh)?).await?;
    // ...and with herdctl.
    for (name, example) in &sections {
        let file = mesh.dir.path().join(format!("{name}.json"));
        std::fs::write(&file, example.to_string())?;
        let out = herdctl(
            &mesh.etcd,
            &["config", "put", name, &file.to_string_lossy()],
        )?;
        assert!(
            out.status.success(),
            "herdctl config put {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    all_applied_cleanly(&mesh, 4, config_revision(&mesh)?).await?;

    // The catalog still changes everywhere, and quotes use it.
    let mut catalog = sections
        .iter()
        .find(|(name, _)| name == "catalog")
        .map(|(_, example)| example.clone())
        .unwrap_or_default();
    catalog["items"]["hammer"]["price_minor"] = json!(2345);
    // Callers with the test issuer's tokens, and quotes signed with a key the gateway holds (each
    // example names a key nobody holds).
    mesh.etcd.put(
        "/herd/config/auth",
        &serde_json::to_string(&herd_tests::issuer().auth_section())?,
    )?;
    if let Some((_, keys)) = fixture().into_iter().find(|(name, _)| *name == "keys") {
        mesh.etcd.put("/herd/config/keys", &keys)?;
    }
    let file = mesh.dir.path().join("catalog.json");
    std::fs::write(&file, catalog.to_string())?;
    let out = herdctl(
        &mesh.etcd,
        &[
            "config",
            "put",
            "catalog",
            &file.to_string_lossy(),
            "--output",
            "json",
        ],
    )?;
    let revision = serde_json::from_slice::<Value>(&out.stdout)?["revision"]
        .as_i64()
        .unwrap_or(0);
    all_applied_cleanly(&mesh, 4, revision).await?;
    let quote = call_as(
        "acme",
        &mesh.gateways[0],
        "herd.quote.v1.QuoteService/CreateQuote",
        &json!({"context": {"tenantId": "acme"}, "items": [{"sku": "hammer", "quantity": 1}],
                "currency": "USD", "region": "US-CA"}),
    )?
    .ok()?;
    assert_eq!(quote["quote"]["configRevision"], revision.to_string());
    assert_eq!(
        quote["quote"]["lines"][0]["unitPrice"]["minorUnits"],
        "2345"
    );

    // A key that no section claims: herdctl refuses it naming the known ones; instances ignore
    // it, say so, and go on applying the rest.
    let colour = mesh.dir.path().join("colour.json");
    std::fs::write(&colour, r#"{"name":"teal"}"#)?;
    let known = names.join(", ");
    for args in [
        vec!["config", "put", "colour", &*colour.to_string_lossy()],
        vec!["config", "apply", &*colour.to_string_lossy()],
    ] {
        let out = mesh.herdctl(&args)?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && stderr.contains("colour") && stderr.contains(&known),
            "{args:?}: {stderr}"
        );
    }
    mesh.etcd.put("/herd/config/colour", r#"{"name":"teal"}"#)?;
    catalog["items"]["hammer"]["price_minor"] = json!(2346);
    mesh.etcd
        .put("/herd/config/catalog", &catalog.to_string())?;
    let revision = config_revision(&mesh)?;
    all_applied(&mesh, 4, revision).await?;
    let status = mesh.herdctl(&["config", "status", "--output", "json"])?;
    let status: Value = serde_json::from_slice(&status.stdout)?;
    for instance in status["instances"].as_array().cloned().unwrap_or_default() {
        assert_eq!(
            instance["config"]["ignored"],
            json!(["colour"]),
            "{instance}"
        );
        assert!(instance["config"]["rejected"].is_null(), "{instance}");
    }
    let table = mesh.herdctl(&["config", "status"])?;
    assert!(String::from_utf8_lossy(&table.stdout).contains("ignored unknown: colour"));
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn h_an_instance_started_during_a_bad_rollout_serves_the_newest_valid_revision()
-> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let mut mesh = TestMesh::start(1, &fixture()).await?;
    let good = config_revision(&mesh)?;
    all_applied(&mesh, 4, good).await?;
    mesh.etcd
        .put("/herd/config/catalog", &catalog_with_widget_price(-1))?;
    let bad = config_revision(&mesh)?;
    eventually(
        "every instance to reject the bad revision",
        Duration::from_secs(10),
        || async {
            let s = status(&mesh).ok()?;
            (s.len() == 4 && s.values().all(|(_, r, _)| *r == bad)).then_some(())
        },
    )
    .await?;

    // A gateway (re)started now registers and serves on the newest valid revision.
    let index = mesh.add("gateway")?;
    let (id, address) = mesh.wait_serving(index).await?;
    let (applied, rejected, why) = status(&mesh)?.remove(&id).unwrap_or_default();
    assert_eq!(
        (applied, rejected),
        (good, bad),
        "the new instance reports what it applied and what it rejected"
    );
    assert!(why.contains("items.widget.price_minor"), "{why}");
    let request = json!({"context": {"tenantId": "acme"}, "items": [{"sku": "widget", "quantity": 3}],
                         "currency": "EUR", "region": "US-CA"});
    let quote_from = |address: &str| {
        call_as(
            "acme",
            address,
            "herd.quote.v1.QuoteService/CreateQuote",
            &request,
        )?
        .ok()
    };
    let quote = quote_from(&address)?;
    assert_eq!(quote["quote"]["configRevision"], good.to_string());
    assert_eq!(
        quote["quote"]["total"]["minorUnits"],
        widget_total(1999).to_string()
    );

    // The rollout is fixed: every instance, the new one included, moves on.
    mesh.etcd
        .put("/herd/config/catalog", &catalog_with_widget_price(2100))?;
    let fixed = config_revision(&mesh)?;
    all_applied(&mesh, 5, fixed).await?;
    let quote = quote_from(&address)?;
    assert_eq!(
        quote["quote"]["total"]["minorUnits"],
        widget_total(2100).to_string()
    );
    Ok(())
}

/// A catalog of about `bytes` bytes of JSON whose widget costs `price`.
fn big_catalog(bytes: usize, price: i64) -> String {
    let mut catalog: Value =
        serde_json::from_str(&catalog_with_widget_price(price)).unwrap_or_default();
    let mut i = 0;
    let mut size = catalog.to_string().len();
    while size < bytes {
        let item = json!({"name": format!("Filler item number {i}"), "price_minor": 100 + i, "category": "filler"});
        size += item.to_string().len() + 20;
        catalog["items"][format!("filler-{i:08}")] = item;
        i += 1;
    }
    catalog.to_string()
}

/// Range requests etcd has served so far, from its Prometheus metrics.
fn etcd_ranges(etcd: &herd_tests::Etcd) -> anyhow::Result<u64> {
    use std::io::{Read, Write};
    let address = etcd.endpoint.trim_start_matches("http://");
    let mut stream = std::net::TcpStream::connect(address)?;
    write!(stream, "GET /metrics HTTP/1.0\r\nHost: {address}\r\n\r\n")?;
    let mut text = String::new();
    stream.read_to_string(&mut text)?;
    let ranges = text
        .lines()
        .filter(|l| {
            l.starts_with("grpc_server_started_total") && l.contains(r#"grpc_method="Range""#)
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>();
    anyhow::ensure!(
        text.contains("grpc_server_started_total"),
        "no gRPC metrics from etcd"
    );
    Ok(ranges as u64)
}

#[tokio::test(flavor = "multi_thread")]
async fn i_history_is_bounded_by_bytes_and_an_old_pin_is_read_once() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let etcd = herd_tests::Etcd::start().await?;
    for (section, json) in fixture() {
        etcd.put(&format!("/herd/config/{section}"), &json)?;
    }
    let dir = tempfile::tempdir()?;
    let mut tax = herd_tests::start_instance("tax", &etcd, 0, dir.path(), &[])?;
    let mut client = herd::etcd::connect(std::slice::from_ref(&etcd.endpoint)).await?;
    let store = herd::ConfigStore::<herd_model::MeshConfig>::start(
        client.clone(),
        herd::layout::Layout::new("/herd/"),
    );
    tokio::time::timeout(Duration::from_secs(10), store.ready()).await?;
    let first = store.current().map(|s| s.revision).unwrap_or(0);
    let status_of_tax = || {
        let out = herdctl(&etcd, &["config", "status", "--output", "json"]).ok()?;
        let v: Value = serde_json::from_slice(&out.stdout).ok()?;
        v["instances"][0]["config"]["applied"].as_i64()
    };
    eventually("tax to register", Duration::from_secs(20), || async {
        status_of_tax()
    })
    .await?;
    let rss_before = rss_mib(tax.pid());

    // 70 writes of a 1.4 MB catalog.
    let size = 1_400_000;
    let mut last = 0;
    for i in 0..70 {
        last = put(
            &mut client,
            "/herd/config/catalog",
            big_catalog(size, 2000 + i),
        )
        .await?;
    }
    tokio::time::timeout(Duration::from_secs(60), store.applied_at_least(last)).await?;
    eventually(
        "tax to apply the last write",
        Duration::from_secs(60),
        || async { status_of_tax().filter(|a| *a >= last) },
    )
    .await?;
    let rss_after = rss_mib(tax.pid());
    let history = store.history();
    println!(
        "REPORT config i: 70 writes of a {size} B catalog: {} revisions kept in memory; a tax instance's RSS {rss_before:.1} MiB before, {rss_after:.1} MiB after",
        history.len()
    );
    let most = herd::config::HISTORY_BYTES / size + 1;
    assert!(
        history.len() <= most && history.len() >= 2,
        "{} revisions kept, at most {most} fit the byte bound: {history:?}",
        history.len()
    );
    assert_eq!(history.last(), Some(&last));
    assert!(!history.contains(&first), "{history:?}");
    // Without the byte bound this grew past 250 MiB.
    assert!(rss_after < 110.0, "RSS grew to {rss_after:.1} MiB");
    tax.signal("TERM")?;
    tax.wait_exit(Duration::from_secs(20)).await?;

    // A request pinned to a revision no longer in memory reads it from etcd once, however many
    // ask at the same time or after.
    let ranges = etcd_ranges(&etcd)?;
    let concurrent = futures::future::join_all((0..50).map(|_| store.at(first))).await;
    let mut pinned = Vec::new();
    for answer in concurrent {
        pinned.push(answer?);
    }
    for _ in 0..50 {
        pinned.push(store.at(first).await?);
    }
    assert!(pinned.iter().all(|s| s.revision == first
        && s.model.catalog.items["widget"].price_minor == 1999
        && std::sync::Arc::ptr_eq(s, &pinned[0])));
    assert_eq!(etcd_ranges(&etcd)? - ranges, 1, "reads of revision {first}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn j_a_gateway_behind_on_a_rotation_verifies_at_the_revision_the_token_names()
-> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let mesh = TestMesh::start(1, &fixture()).await?;
    // A second gateway that reaches etcd only through a grpc-proxy: stopping the proxy holds it
    // at the revision it has applied, while everything else moves on.
    let proxy_address = format!("127.0.0.1:{}", herd_tests::free_port());
    let mut proxy_cmd = std::process::Command::new("etcd");
    proxy_cmd.args([
        "grpc-proxy",
        "start",
        "--endpoints",
        &mesh.etcd.endpoint,
        "--listen-addr",
        &proxy_address,
    ]);
    let proxy = herd_tests::Proc::spawn(
        "etcd grpc-proxy",
        proxy_cmd,
        mesh.dir.path().join("proxy.log"),
    )?;
    let behind = format!("127.0.0.1:{}", herd_tests::free_port());
    let mut gateway_cmd = std::process::Command::new(herd_tests::bin("herd-gateway")?);
    gateway_cmd
        .args([
            "--etcd",
            &format!("http://{proxy_address}"),
            "--listen",
            &behind,
        ])
        // Its lease outlives the pause below.
        .env("HERD_LEASE_TTL", "10")
        .env("RUST_LOG", "info")
        .env("HERD_SECRETS", herd_tests::secrets_dir(mesh.dir.path())?);
    let _behind_gateway = herd_tests::Proc::spawn(
        "herd-gateway behind a proxy",
        gateway_cmd,
        mesh.dir.path().join("gateway-behind.log"),
    )?;
    eventually(
        "the gateway behind the proxy to serve",
        Duration::from_secs(30),
        || async { (herd_tests::health(&behind, "").as_deref() == Some("SERVING")).then_some(()) },
    )
    .await?;
    let mut etcd = herd::etcd::connect(std::slice::from_ref(&mesh.etcd.endpoint)).await?;
    let keys = keys_json(&mesh, &[("t1", 9, false), ("t2", 4, true)]).await?;

    proxy.signal("STOP")?;
    let rotated = put(&mut etcd, "/herd/config/keys", keys).await?;
    // The first gateway signs with the new key at the rotation's revision.
    let signer = client(&mesh.gateways[0]).await?;
    let token = eventually(
        "the first gateway to sign at the rotation",
        Duration::from_secs(10),
        || {
            let mut signer = signer.clone();
            async move {
                let created = signer
                    .create_quote(widget_request(None))
                    .await
                    .ok()?
                    .into_inner();
                (created.quote.as_ref()?.config_revision == rotated).then_some(created.token)
            }
        },
    )
    .await?;
    let mut verifier = client(&behind).await?;
    let request = VerifyQuoteRequest {
        context: widget_request(None).context,
        token,
    };
    let mut verify = tokio::spawn(async move { verifier.verify_quote(request).await });
    // It does not know the key: it asks etcd for the keys of the token's revision, and waits for
    // an answer that cannot come while the proxy is stopped.
    assert!(
        tokio::time::timeout(Duration::from_millis(500), &mut verify)
            .await
            .is_err(),
        "verified without reading the token's revision"
    );
    // Still at the revision before the rotation (its admin service answers from memory): of the
    // two gateways, the one that signed is at the rotation, the one behind before it.
    let out = mesh.herdctl(&["config", "status", "--output", "json"])?;
    let status: Value = serde_json::from_slice(&out.stdout)?;
    let mut gateways: Vec<i64> = status["instances"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|i| i["service"] == "gateway")
        .filter_map(|i| i["config"]["applied"].as_i64())
        .collect();
    gateways.sort();
    assert!(
        matches!(gateways.as_slice(), [behind, signer] if *behind < rotated && *signer >= rotated),
        "gateways at {gateways:?}, the rotation at {rotated}: {status}"
    );
    proxy.signal("CONT")?;
    let verified = tokio::time::timeout(Duration::from_secs(10), verify)
        .await
        .map_err(|_| anyhow::anyhow!("no answer once etcd is reachable again"))???
        .into_inner();
    assert_eq!(
        verified.quote.map(|q| q.config_revision),
        Some(rotated),
        "verified at the token's revision"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn k_a_write_based_on_a_revision_that_changed_is_refused() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let mesh = TestMesh::start(1, &fixture()).await?;
    let dir = mesh.dir.path();
    let revision_of = |section: &str| -> anyhow::Result<i64> {
        let out = mesh.herdctl(&["config", "get", section, "--output", "json"])?;
        let got: Value = serde_json::from_slice(&out.stdout)?;
        got["revision"]
            .as_i64()
            .ok_or_else(|| anyhow::anyhow!("no revision: {got}"))
    };
    // Two writers read the catalog at the same revision; the first writes.
    let read = revision_of("catalog")?;
    let first = dir.join("first.json");
    let second = dir.join("second.json");
    std::fs::write(&first, catalog_with_widget_price(2100))?;
    std::fs::write(&second, catalog_with_widget_price(2200))?;
    let path = |p: &std::path::Path| p.to_string_lossy().to_string();
    let read_at = read.to_string();
    let out = mesh.herdctl(&[
        "config",
        "put",
        "catalog",
        &path(&first),
        "--if-revision",
        &read_at,
    ])?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The second, based on what it read, is refused: nothing of it is written.
    let out = mesh.herdctl(&[
        "config",
        "put",
        "catalog",
        &path(&second),
        "--if-revision",
        &read_at,
    ])?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a write over a change went through");
    let now = revision_of("catalog")?;
    assert!(
        stderr.contains(&format!(
            "catalog is at revision {now}, not {read}: it changed since; nothing written"
        )),
        "{stderr}"
    );
    let out = mesh.herdctl(&["config", "get", "catalog", "--output", "json"])?;
    let got: Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(
        got["value"]["items"]["widget"]["price_minor"], 2100,
        "{got}"
    );
    // Based on the revision it has now, it goes through.
    let now = now.to_string();
    let out = mesh.herdctl(&[
        "config",
        "put",
        "catalog",
        &path(&second),
        "--if-revision",
        &now,
    ])?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn l_a_section_changed_while_herdctl_validates_it_is_refused_and_nothing_written()
-> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let etcd = herd_tests::Etcd::start().await?;
    for (section, json) in fixture() {
        etcd.put(&format!("/herd/config/{section}"), &json)?;
    }
    // A catalog large enough that herdctl takes a while to read and validate it...
    let items: serde_json::Map<String, Value> = (0..8_000)
        .map(|i| {
            let item =
                json!({"name": format!("Item {i}"), "price_minor": 100 + i, "category": "tools"});
            (format!("sku-{i}"), item)
        })
        .collect();
    let big = json!({"currency": "USD", "items": items}).to_string();
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("catalog.json");
    std::fs::write(&file, &big)?;
    let file = file.to_string_lossy().to_string();
    // ...while another writer rewrites the catalog as fast as etcd takes it.
    let mut other = etcd_client::Client::connect([etcd.endpoint.as_str()], None).await?;
    let (stop, mut stopped) = tokio::sync::watch::channel(false);
    let small = fixture()
        .into_iter()
        .find(|(s, _)| *s == "catalog")
        .map(|(_, json)| json)
        .unwrap_or_default();
    let writer = tokio::spawn(async move {
        let mut writes = 0u64;
        while !*stopped.borrow_and_update() {
            if other
                .put("/herd/config/catalog", small.as_str(), None)
                .await
                .is_ok()
            {
                writes += 1;
            }
        }
        writes
    });
    // Each attempt reads the configuration, validates the change against it and writes it
    // guarded by the revision it validated: the other writer's change lands in between, and
    // the write is refused — nothing of it written (not even herdctl's note of the write).
    let meta = |etcd: &herd_tests::Etcd| etcd.get_prefix("/herd/meta/config/catalog");
    let mut refused = 0;
    for _ in 0..5 {
        let before = meta(&etcd)?;
        let out =
            tokio::task::block_in_place(|| herdctl(&etcd, &["config", "put", "catalog", &file]))?;
        let stderr = String::from_utf8_lossy(&out.stderr).to_string();
        if out.status.success() {
            continue;
        }
        assert!(
            stderr.contains(
                "the configuration changed while it was being validated; nothing written"
            ),
            "{stderr}"
        );
        assert_eq!(meta(&etcd)?, before, "a refused write left its note");
        refused += 1;
    }
    let _ = stop.send(true);
    let writes = writer.await?;
    assert!(writes > 0);
    assert!(
        refused > 0,
        "no attempt of five met the other writer's change"
    );
    let got = etcd.get_prefix("/herd/config/catalog")?;
    assert!(
        got.iter().all(|(_, value)| !value.contains("sku-7999")),
        "the big catalog was written"
    );
    println!("{refused} of 5 writes refused while another writer made {writes} changes");

    // A write of one section is validated against the others (fx's rates against the catalog's
    // currency): another writer changing the catalog meanwhile refuses it too.
    let mut other = etcd_client::Client::connect([etcd.endpoint.as_str()], None).await?;
    let (stop, mut stopped) = tokio::sync::watch::channel(false);
    let writer = tokio::spawn(async move {
        while !*stopped.borrow_and_update() {
            let _ = other.put("/herd/config/catalog", big.as_str(), None).await;
        }
    });
    let fx = dir.path().join("fx.json");
    std::fs::write(&fx, r#"{"base":"USD","rates":{"EUR":"0.93"}}"#)?;
    let fx = fx.to_string_lossy().to_string();
    let meta = |etcd: &herd_tests::Etcd| etcd.get_prefix("/herd/meta/config/fx");
    let mut refused = 0;
    for _ in 0..5 {
        let before = meta(&etcd)?;
        let out = tokio::task::block_in_place(|| herdctl(&etcd, &["config", "put", "fx", &fx]))?;
        if out.status.success() {
            continue;
        }
        let stderr = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(
            stderr.contains("the configuration changed while it was being validated"),
            "{stderr}"
        );
        assert_eq!(meta(&etcd)?, before, "a refused write left its note");
        refused += 1;
    }
    let _ = stop.send(true);
    writer.await?;
    assert!(
        refused > 0,
        "a write validated against a section that changed went through"
    );
    println!("{refused} of 5 writes of fx refused while the catalog changed");
    Ok(())
}
