//! Mutual TLS on every hop: the whole mesh started with certificates from `herdctl certs init`
//! quotes as before, and what is not one of its instances gets nowhere — tried with real grpcurl.

use std::path::Path;
use std::process::Output;
use std::time::Duration;

use herd_tests::{Etcd, Proc, eventually, fixture, free_port, grpcurl, herdctl};
use serde_json::{Value, json};

/// The TLS flags of an instance holding `service`'s certificate from `certs`.
fn tls_flags(certs: &Path, service: &str) -> Vec<String> {
    let file = |name: String| certs.join(name).to_string_lossy().to_string();
    vec![
        "--tls-cert".into(),
        file(format!("{service}.pem")),
        "--tls-key".into(),
        file(format!("{service}-key.pem")),
        "--tls-ca".into(),
        file("ca.pem".into()),
    ]
}

/// A client certificate and its key.
type Client<'a> = (&'a Path, &'a Path);

/// grpcurl over TLS trusting `ca`, presenting `client` if given.
fn grpcurl_tls(ca: &Path, client: Option<Client>, args: &[&str]) -> anyhow::Result<Output> {
    let ca = ca.to_string_lossy().to_string();
    // A refused handshake makes grpcurl try again until its connect timeout (10 s by default).
    let mut all: Vec<String> = vec!["-connect-timeout".into(), "2".into(), "-cacert".into(), ca];
    if let Some((cert, key)) = client {
        all.extend([
            "-cert".into(),
            cert.to_string_lossy().to_string(),
            "-key".into(),
            key.to_string_lossy().to_string(),
        ]);
    }
    all.extend(args.iter().map(|a| a.to_string()));
    let all: Vec<&str> = all.iter().map(String::as_str).collect();
    grpcurl(&all)
}

#[tokio::test(flavor = "multi_thread")]
async fn the_mesh_over_mutual_tls_quotes_and_strangers_get_nowhere() -> anyhow::Result<()> {
    let etcd = Etcd::start().await?;
    for (section, json) in fixture() {
        etcd.put(&format!("/herd/config/{section}"), &json)?;
    }
    let dir = tempfile::tempdir()?;
    let (certs, other) = (dir.path().join("certs"), dir.path().join("other"));
    for folder in [&certs, &other] {
        let out = herdctl(&etcd, &["certs", "init", &folder.to_string_lossy()])?;
        anyhow::ensure!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let mut instances: Vec<Proc> = Vec::new();
    for service in ["tax", "currency", "pricing"] {
        let flags = tls_flags(&certs, service);
        let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
        // Its access log names each caller.
        let env = [("RUST_LOG", "info,herd::access=debug")];
        instances.push(herd_tests::start_instance_with_env(
            service,
            &etcd,
            0,
            dir.path(),
            &flags,
            &env,
        )?);
    }
    let port = free_port();
    let gateway = format!("127.0.0.1:{port}");
    let flags = tls_flags(&certs, "gateway");
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    instances.push(herd_tests::start_instance(
        "gateway",
        &etcd,
        port,
        dir.path(),
        &flags,
    )?);

    // A caller outside the mesh: the CA to trust the gateway, no certificate, a bearer token.
    let ca = certs.join("ca.pem");
    let authorization = format!("authorization: {}", herd_tests::bearer("acme"));
    let body = json!({"context": {"tenantId": "acme"}, "items": [{"sku": "widget", "quantity": 3}],
                      "currency": "EUR", "region": "US-CA"})
    .to_string();
    let started = std::time::Instant::now();
    let quote = eventually(
        "a quote over mutual TLS",
        Duration::from_secs(30),
        || async {
            let out = grpcurl_tls(
                &ca,
                None,
                &[
                    "-H",
                    &authorization,
                    "-d",
                    &body,
                    &gateway,
                    "herd.quote.v1.QuoteService/CreateQuote",
                ],
            )
            .ok()?;
            out.status
                .success()
                .then(|| serde_json::from_slice::<Value>(&out.stdout).ok())
                .flatten()
        },
    )
    .await?;
    println!(
        "REPORT first quote over mutual TLS after {:?}",
        started.elapsed()
    );
    assert_eq!(quote["quote"]["tenantId"], "acme");
    // Pricing learnt from the handshake that the gateway called it.
    let pricing_log = instances[2].log_text();
    assert!(
        pricing_log.contains("caller=\"spiffe://herd.local/herd/gateway\"")
            || pricing_log.contains("caller=spiffe://herd.local/herd/gateway"),
        "{pricing_log}"
    );
    assert_eq!(quote["quote"]["currency"], "EUR");
    assert!(quote["token"].as_str().is_some_and(|t| !t.is_empty()));

    // Plaintext to the gateway: refused.
    let plain = grpcurl(&["-plaintext", "-connect-timeout", "2", &gateway, "list"])?;
    assert!(!plain.status.success(), "plaintext served over a TLS port");

    // An internal service: only a certificate signed by the mesh's CA gets in.
    let out = herdctl(&etcd, &["instances", "pricing", "--output", "json"])?;
    let listed: Value = serde_json::from_slice(&out.stdout)?;
    let pricing = listed[0]["address"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    anyhow::ensure!(!pricing.is_empty(), "pricing is not registered: {listed}");
    let mesh_cert = (certs.join("gateway.pem"), certs.join("gateway-key.pem"));
    let stranger = (other.join("gateway.pem"), other.join("gateway-key.pem"));
    let tries: [(&str, Option<Client>, bool); 3] = [
        (
            "a mesh certificate",
            Some((&mesh_cert.0, &mesh_cert.1)),
            true,
        ),
        ("no certificate", None, false),
        (
            "another CA's certificate",
            Some((&stranger.0, &stranger.1)),
            false,
        ),
    ];
    for (name, client, served) in tries {
        let out = grpcurl_tls(&ca, client, &[&pricing, "list"])?;
        assert_eq!(
            out.status.success(),
            served,
            "{name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let plain = grpcurl(&["-plaintext", "-connect-timeout", "2", &pricing, "list"])?;
    assert!(!plain.status.success(), "plaintext served by pricing");
    drop(instances);
    Ok(())
}
