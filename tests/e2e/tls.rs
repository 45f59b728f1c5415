//! Mutual TLS on every hop: the whole mesh started with certificates from `herdctl certs init`
//! quotes as before, and what is not one of its instances gets nowhere — tried with real grpcurl.

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use herd_tests::{Answer, Etcd, Proc, call_over, eventually, fixture, free_port, grpcurl, herdctl};
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

/// How the mesh reaches etcd.
#[derive(Clone, Copy)]
enum EtcdAccess {
    Plain,
    /// TLS, client certificates, users and roles as README sets them up.
    Secured,
}

/// The root user's password in a secured etcd.
const ROOT_PASSWORD: &str = "root-password-for-tests";
/// Pricing authenticates to etcd with a password rather than its certificate's name.
const PRICING_PASSWORD: &str = "pricing-password-for-tests";

/// Runs README's block of etcdctl commands that create herd's users and roles and enable
/// authentication, against `etcd` as the operator; then gives pricing's user a known password.
fn secure(etcd: &Etcd, certs: &Path) -> anyhow::Result<()> {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md"))?;
    let block = readme
        .split("```")
        .find(|block| block.starts_with("sh\n") && block.contains("etcdctl auth enable"))
        .ok_or_else(|| anyhow::anyhow!("README has no block enabling etcd authentication"))?
        .trim_start_matches("sh\n")
        .replace("https://127.0.0.1:2379", &etcd.endpoint);
    let run = |script: &str| -> anyhow::Result<()> {
        let out = std::process::Command::new("bash")
            .args(["-euo", "pipefail", "-c", script])
            .current_dir(certs.parent().unwrap_or(certs))
            .env("ROOT_PASSWORD", ROOT_PASSWORD)
            .output()?;
        anyhow::ensure!(
            out.status.success(),
            "{script}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    };
    run(&block)?;
    let passwd = format!(
        "{}\necho {PRICING_PASSWORD} | etcdctl --user root:{ROOT_PASSWORD} user passwd \
         herd-pricing --interactive=false",
        block.lines().next().unwrap_or_default()
    );
    run(&passwd)
}

/// An instance of `service`'s etcd flags: its own certificate, except pricing, which presents
/// a certificate etcd has no user for and authenticates with its password instead.
fn etcd_flags(certs: &Path, service: &str) -> anyhow::Result<Vec<String>> {
    let file = |name: String| certs.join(name).to_string_lossy().to_string();
    let password = certs.join("pricing-etcd-password");
    std::fs::write(&password, format!("{PRICING_PASSWORD}\n"))?;
    let (cert, user) = match service {
        "pricing" => ("stranger", true),
        other => (other, false),
    };
    let mut flags = vec![
        "--etcd-ca".into(),
        file("ca.pem".into()),
        "--etcd-cert".into(),
        file(format!("{cert}.pem")),
        "--etcd-key".into(),
        file(format!("{cert}-key.pem")),
    ];
    if user {
        flags.extend([
            "--etcd-user".into(),
            "herd-pricing".into(),
            "--etcd-password-file".into(),
            password.to_string_lossy().to_string(),
        ]);
    }
    Ok(flags)
}

/// The reference mesh over mutual TLS: etcd with [`fixture`] (the reference policy included),
/// certificates from `herdctl certs init`, one instance of each service (access logs on).
struct TlsMesh {
    etcd: Etcd,
    dir: tempfile::TempDir,
    certs: PathBuf,
    /// tax, currency, pricing, gateway.
    instances: Vec<Proc>,
    gateway: String,
}

impl TlsMesh {
    async fn start() -> anyhow::Result<Self> {
        Self::start_with(EtcdAccess::Plain).await
    }

    async fn start_with(access: EtcdAccess) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let certs = dir.path().join("certs");
        let out = std::process::Command::new(herd_tests::bin("herdctl")?)
            .args(["certs", "init", &certs.to_string_lossy(), "--services"])
            .arg("gateway,pricing,tax,currency,etcd,herdctl,stranger")
            .output()?;
        anyhow::ensure!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let etcd = match access {
            EtcdAccess::Plain => Etcd::start().await?,
            EtcdAccess::Secured => {
                let etcd = Etcd::start_secured(&certs).await?;
                secure(&etcd, &certs)?;
                etcd
            }
        };
        for (section, json) in fixture() {
            etcd.put(&format!("/herd/config/{section}"), &json)?;
        }
        let mut instances: Vec<Proc> = Vec::new();
        let port = free_port();
        for service in ["tax", "currency", "pricing", "gateway"] {
            let mut flags = tls_flags(&certs, service);
            if let EtcdAccess::Secured = access {
                flags.extend(etcd_flags(&certs, service)?);
            }
            let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
            // Each access log names the callers.
            let env = [("RUST_LOG", "info,herd::access=debug")];
            let port = if service == "gateway" { port } else { 0 };
            instances.push(herd_tests::start_instance_with_env(
                service,
                &etcd,
                port,
                dir.path(),
                &flags,
                &env,
            )?);
        }
        Ok(Self {
            etcd,
            dir,
            certs,
            instances,
            gateway: format!("127.0.0.1:{port}"),
        })
    }

    /// The registered address of `service`'s instance, once it is registered.
    async fn address_of(&self, service: &str) -> anyhow::Result<String> {
        eventually(
            &format!("{service} registered"),
            Duration::from_secs(30),
            || async {
                let out = herdctl(&self.etcd, &["instances", service, "--output", "json"]).ok()?;
                let listed: Value = serde_json::from_slice(&out.stdout).ok()?;
                listed[0]["address"].as_str().map(str::to_string)
            },
        )
        .await
    }

    /// grpcurl's flags to reach an instance over TLS, presenting `service`'s certificate.
    fn transport(&self, service: &str) -> Vec<String> {
        let file = |name: String| self.certs.join(name).to_string_lossy().to_string();
        vec![
            "-cacert".into(),
            file("ca.pem".into()),
            "-cert".into(),
            file(format!("{service}.pem")),
            "-key".into(),
            file(format!("{service}-key.pem")),
        ]
    }

    /// Calls `method` of the instance at `address` with `body`, as `service`'s instance would.
    fn call_as(
        &self,
        service: &str,
        address: &str,
        method: &str,
        body: &Value,
    ) -> anyhow::Result<Answer> {
        let transport = self.transport(service);
        let transport: Vec<&str> = transport.iter().map(String::as_str).collect();
        call_over(&transport, address, method, body, &[])
    }

    /// A quote for `tenant` through the gateway, as an outside caller (CA, token, no certificate).
    fn quote(&self, tenant: &str) -> anyhow::Result<Answer> {
        let ca = self.certs.join("ca.pem").to_string_lossy().to_string();
        let authorization = format!("authorization: {}", herd_tests::bearer(tenant));
        let body = json!({"context": {"tenantId": tenant},
                          "items": [{"sku": "widget", "quantity": 3}],
                          "currency": "EUR", "region": "US-CA"});
        call_over(
            &["-cacert", &ca],
            &self.gateway,
            "herd.quote.v1.QuoteService/CreateQuote",
            &body,
            &[&authorization],
        )
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_mesh_over_mutual_tls_quotes_and_strangers_get_nowhere() -> anyhow::Result<()> {
    let mesh = TlsMesh::start().await?;
    let (etcd, certs, other, instances, gateway) = (
        &mesh.etcd,
        &mesh.certs,
        mesh.dir.path().join("other"),
        &mesh.instances,
        &mesh.gateway,
    );
    let out = herdctl(etcd, &["certs", "init", &other.to_string_lossy()])?;
    anyhow::ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A caller outside the mesh: the CA to trust the gateway, no certificate, a bearer token.
    let ca = certs.join("ca.pem");
    let started = std::time::Instant::now();
    let quote = eventually(
        "a quote over mutual TLS",
        Duration::from_secs(30),
        || async {
            match mesh.quote("acme").ok()? {
                Answer::Ok(quote) => Some(quote),
                Answer::Err { .. } => None,
            }
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
    let plain = grpcurl(&["-plaintext", "-connect-timeout", "2", gateway, "list"])?;
    assert!(!plain.status.success(), "plaintext served over a TLS port");

    // An internal service: only a certificate signed by the mesh's CA gets in.
    let pricing = mesh.address_of("pricing").await?;
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
    Ok(())
}

const PRICE_ITEMS: &str = "herd.pricing.v1.PricingService/PriceItems";

/// The code and message of a refused call (`None` when it got past the door: answered, or
/// refused for what it carries rather than who sent it).
fn refusal(answer: anyhow::Result<Answer>) -> Option<(String, String)> {
    match answer {
        Ok(Answer::Err { code, message }) if code == "PermissionDenied" => Some((code, message)),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_policy_decides_who_calls_what_and_changes_without_restart() -> anyhow::Result<()> {
    let mesh = TlsMesh::start().await?;
    let pricing = mesh.address_of("pricing").await?;
    let tax = mesh.address_of("tax").await?;
    let empty = json!({});
    // The gateway may call pricing: its call passes the door (and is refused for its content).
    let answer = mesh.call_as("gateway", &pricing, PRICE_ITEMS, &empty)?;
    assert!(
        matches!(&answer, Answer::Err { code, .. } if code == "InvalidArgument"),
        "{answer:?}"
    );
    // Currency may not, and is told who it is and what it may not call.
    let refused = refusal(mesh.call_as("currency", &pricing, PRICE_ITEMS, &empty));
    assert_eq!(
        refused.map(|(_, message)| message),
        Some(format!(
            "spiffe://herd.local/herd/currency may not call {PRICE_ITEMS}: no authz rule allows it"
        ))
    );
    // Nobody is allowed to call the gateway's neighbours by the back door: the gateway to tax.
    let refused =
        refusal(mesh.call_as("gateway", &tax, "herd.tax.v1.TaxService/ComputeTax", &empty));
    assert!(refused.is_some(), "the gateway called tax directly");
    // Health and reflection are not subject to the policy.
    let health = mesh.call_as("currency", &pricing, "grpc.health.v1.Health/Check", &empty)?;
    assert!(matches!(health, Answer::Ok(_)), "{health:?}");

    // A new policy applies without a restart: currency allowed, the gateway denied PriceItems.
    let policy = json!({"rules": [
        {"service": "pricing", "methods": ["*"],
         "allow": ["spiffe://herd.local/herd/gateway", "spiffe://herd.local/herd/currency"]},
        {"service": "pricing", "methods": ["PriceItems"], "deny": ["spiffe://herd.local/herd/gateway"]},
        {"service": "tax", "methods": ["*"], "allow": ["spiffe://herd.local/herd/pricing"]},
        {"service": "currency", "methods": ["*"], "allow": ["spiffe://herd.local/herd/pricing"]}]});
    mesh.etcd.put("/herd/config/authz", &policy.to_string())?;
    eventually("currency let in", Duration::from_secs(10), || async {
        refusal(mesh.call_as("currency", &pricing, PRICE_ITEMS, &empty))
            .is_none()
            .then_some(())
    })
    .await?;
    let denied = refusal(mesh.call_as("gateway", &pricing, PRICE_ITEMS, &empty));
    assert!(
        denied
            .as_ref()
            .is_some_and(|(_, m)| m.ends_with("rules[1] denies it")),
        "{denied:?}"
    );
    // ...and the gateway's quotes now fail, refused by pricing.
    let answer = mesh.quote("acme")?;
    assert!(matches!(answer, Answer::Err { .. }), "{answer:?}");

    // A policy that does not validate is rejected; the last good one stays in force.
    mesh.etcd.put(
        "/herd/config/authz",
        r#"{"rules":[{"service":"pricing","methods":[],"allow":["*"]}]}"#,
    )?;
    eventually(
        "the bad policy rejected by pricing",
        Duration::from_secs(10),
        || async {
            let out = herdctl(&mesh.etcd, &["config", "status", "--output", "json"]).ok()?;
            let status: Value = serde_json::from_slice(&out.stdout).ok()?;
            status["instances"].as_array()?.iter().find(|i| {
                i["service"] == "pricing"
                    && i["config"]["rejected"]["error"]["message"]
                        .as_str()
                        .is_some_and(|m| m.starts_with("rules[0].methods"))
            })?;
            Some(())
        },
    )
    .await?;
    assert!(refusal(mesh.call_as("currency", &pricing, PRICE_ITEMS, &empty)).is_none());
    assert!(refusal(mesh.call_as("gateway", &pricing, PRICE_ITEMS, &empty)).is_some());

    // The reference policy back: quotes flow again.
    mesh.etcd.put(
        "/herd/config/authz",
        &herd_model::demo::policy("herd.local"),
    )?;
    eventually("quotes again", Duration::from_secs(10), || async {
        matches!(mesh.quote("acme").ok()?, Answer::Ok(_)).then_some(())
    })
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_registration_under_another_services_name_is_never_used() -> anyhow::Result<()> {
    let mesh = TlsMesh::start().await?;
    let tax = mesh.address_of("tax").await?;
    mesh.address_of("pricing").await?;
    eventually("a first quote", Duration::from_secs(30), || async {
        matches!(mesh.quote("acme").ok()?, Answer::Ok(_)).then_some(())
    })
    .await?;
    // A forged registration: "pricing" at tax's address. Tax holds a valid mesh certificate, but
    // not pricing's identity.
    let forged = json!({"service": "pricing", "instance_id": "pricing-forged", "address": tax,
                        "pid": 1, "version": "0.0.0"});
    mesh.etcd
        .put("/herd/services/pricing/pricing-forged", &forged.to_string())?;
    // The gateway found it, tried it, and refused it at the handshake for what it is.
    eventually("the gateway to refuse the forged pricing", Duration::from_secs(10), || async {
        mesh.instances[3]
            .log_text()
            .lines()
            .any(|line| {
                line.contains("endpoint unreachable")
                    && line.contains("instance=pricing-forged")
                    && line.contains(
                        "the callee is spiffe://herd.local/herd/tax, not spiffe://herd.local/herd/pricing",
                    )
            })
            .then_some(())
    })
    .await?;
    let mut failed = Vec::new();
    for _ in 0..40 {
        if let Answer::Err { code, message } = mesh.quote("acme")? {
            failed.push(format!("{code}: {message}"));
        }
    }
    assert!(failed.is_empty(), "quotes failed: {failed:?}");
    // Tax never received a call meant for pricing: the gateway refused it at the handshake.
    let tax_log = mesh.instances[0].log_text();
    assert!(
        !tax_log.contains("PricingService"),
        "tax was called as pricing: {tax_log}"
    );
    Ok(())
}

/// etcdctl against `etcd` as the holder of `cert` (`None`: no client certificate): whether it
/// succeeded, and what it said.
fn etcdctl_as(etcd: &Etcd, certs: &Path, cert: Option<&str>, args: &[&str]) -> (bool, String) {
    let mut cmd = std::process::Command::new("etcdctl");
    cmd.env("ETCDCTL_API", "3")
        .args([
            "--endpoints",
            &etcd.endpoint,
            "--dial-timeout",
            "2s",
            "--command-timeout",
            "3s",
        ])
        .arg("--cacert")
        .arg(certs.join("ca.pem"));
    if let Some(cert) = cert {
        cmd.arg("--cert")
            .arg(certs.join(format!("{cert}.pem")))
            .arg("--key")
            .arg(certs.join(format!("{cert}-key.pem")));
    }
    match cmd.args(args).output() {
        Ok(out) => (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        ),
        Err(e) => (false, e.to_string()),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn etcd_over_tls_with_client_certificates_users_and_roles() -> anyhow::Result<()> {
    let mesh = TlsMesh::start_with(EtcdAccess::Secured).await?;
    // Every instance reached etcd over TLS as its own user (pricing by password) and registered;
    // the whole mesh quotes.
    for service in ["tax", "currency", "pricing", "gateway"] {
        mesh.address_of(service).await?;
    }
    eventually(
        "a quote with etcd secured",
        Duration::from_secs(30),
        || async { matches!(mesh.quote("acme").ok()?, Answer::Ok(_)).then_some(()) },
    )
    .await?;
    let certs = &mesh.certs;
    let forged = r#"{"service":"pricing","instance_id":"pricing-forged","address":"127.0.0.1:1","pid":1,"version":"0"}"#;
    // A certificate etcd has no user for reads nothing and writes nothing.
    for args in [
        vec!["get", "/herd/config/keys"],
        vec!["put", "/herd/services/pricing/pricing-forged", forged],
    ] {
        let (ok, said) = etcdctl_as(&mesh.etcd, certs, Some("stranger"), &args);
        assert!(
            !ok && said.contains("permission denied"),
            "{args:?}: {said}"
        );
    }
    // A mesh instance writes its own registrations only, and no configuration.
    let (ok, said) = etcdctl_as(
        &mesh.etcd,
        certs,
        Some("tax"),
        &["put", "/herd/services/pricing/pricing-forged", forged],
    );
    assert!(!ok && said.contains("permission denied"), "{said}");
    let (ok, said) = etcdctl_as(
        &mesh.etcd,
        certs,
        Some("tax"),
        &["put", "/herd/config/fx", "{}"],
    );
    assert!(!ok && said.contains("permission denied"), "{said}");
    let (ok, said) = etcdctl_as(&mesh.etcd, certs, Some("tax"), &["get", "/herd/config/fx"]);
    assert!(ok && said.contains("EUR"), "{said}");
    // No client certificate: no connection at all.
    let (ok, said) = etcdctl_as(&mesh.etcd, certs, None, &["get", "/herd/config/fx"]);
    assert!(!ok, "{said}");
    // The operator (herdctl's certificate) sees every instance's status.
    let out = herdctl(&mesh.etcd, &["config", "status", "--output", "json"])?;
    let status: Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(
        status["instances"].as_array().map(Vec::len),
        Some(4),
        "{status}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}
