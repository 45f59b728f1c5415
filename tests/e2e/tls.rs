//! Mutual TLS on every hop: the whole mesh started with certificates from `herdctl certs init`
//! quotes as before, and what is not one of its instances gets nowhere — tried with real grpcurl.

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use herd_tests::{
    Answer, Etcd, Proc, TestMesh, call_over, eventually, fixture, free_port, grpcurl, herdctl,
};
use serde_json::{Value, json};

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

/// README's etcd users and roles, and pricing's user given a known password.
fn secure(etcd: &Etcd, certs: &Path) -> anyhow::Result<()> {
    herd_tests::etcd_roles_from_readme(etcd, certs, ROOT_PASSWORD)?;
    herd_tests::etcdctl_script(
        etcd,
        certs,
        ROOT_PASSWORD,
        &format!(
            "echo {PRICING_PASSWORD} | etcdctl --user root:{ROOT_PASSWORD} user passwd \
             herd-pricing --interactive=false"
        ),
    )
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
    /// `herdctl` against this mesh's etcd, presenting herdctl's certificate to instances.
    fn herdctl(&self, args: &[&str]) -> anyhow::Result<std::process::Output> {
        let mut all: Vec<String> = herd_tests::tls_flags(&self.certs, "herdctl");
        all.extend(args.iter().map(|a| a.to_string()));
        let all: Vec<&str> = all.iter().map(String::as_str).collect();
        herdctl(&self.etcd, &all)
    }

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
            let mut flags = herd_tests::tls_flags(&certs, service);
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
        herd_tests::grpcurl_tls_flags(&self.certs, service)
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
    // The public gateway takes callers without a certificate, but tells its status only to
    // those with one from the mesh's CA.
    const STATUS: &str = "herd.admin.v1.AdminService/GetStatus";
    let out = grpcurl_tls(&ca, None, &[gateway, STATUS])?;
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && said.contains("PermissionDenied"),
        "{said}"
    );
    let gateway_cert = (certs.join("gateway.pem"), certs.join("gateway-key.pem"));
    let out = grpcurl_tls(
        &ca,
        Some((&gateway_cert.0, &gateway_cert.1)),
        &[gateway, STATUS],
    )?;
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && said.contains("appliedRevision"),
        "{said}"
    );

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
            let out = mesh
                .herdctl(&["config", "status", "--output", "json"])
                .ok()?;
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
    let out = mesh.herdctl(&["config", "status", "--output", "json"])?;
    let status: Value = serde_json::from_slice(&out.stdout)?;
    let instances = status["instances"].as_array().cloned().unwrap_or_default();
    assert_eq!(
        instances.len(),
        4,
        "{status}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        instances
            .iter()
            .all(|i| i["unreachable"].is_null() && i["config"]["applied"].as_i64() > Some(0)),
        "{status}"
    );
    // Without the mesh's TLS, no instance can be asked, and each is listed saying why.
    let out = herdctl(&mesh.etcd, &["config", "status", "--output", "json"])?;
    let status: Value = serde_json::from_slice(&out.stdout)?;
    let reasons = status["instances"].as_array().map_or(0, |a| {
        a.iter().filter(|i| i["unreachable"].is_string()).count()
    });
    assert_eq!(reasons, 4, "{status}");
    Ok(())
}

/// The certificate (DER) a new handshake with `service`'s instance at `address` is shown, the
/// caller presenting the gateway's certificate from `client`.
async fn presented(client: &Path, address: &str, service: &str) -> anyhow::Result<Vec<u8>> {
    let credentials = herd::tls::Credentials::load(&herd::tls::TlsFiles {
        cert: client.join("gateway.pem"),
        key: client.join("gateway-key.pem"),
        ca: client.join("ca.pem"),
    })?;
    let tcp = tokio::net::TcpStream::connect(address).await?;
    let tls = tokio_rustls::TlsConnector::from(herd::tls::client_config(&credentials)?)
        .connect(herd::tls::server_name(service)?, tcp)
        .await?;
    let (_, session) = tls.get_ref();
    Ok(session
        .peer_certificates()
        .and_then(|chain| chain.first())
        .map(|cert| cert.to_vec())
        .unwrap_or_default())
}

/// The certificate in a PEM file, as DER.
fn der(path: &Path) -> anyhow::Result<Vec<u8>> {
    use rustls::pki_types::pem::PemObject;
    Ok(rustls::pki_types::CertificateDer::from_pem_file(path)?.to_vec())
}

/// Writes `contents` to `path` whole: beside it, then renamed over it.
fn replace(path: &Path, contents: &[u8]) -> anyhow::Result<()> {
    let partial = path.with_extension("partial");
    std::fs::write(&partial, contents)?;
    std::fs::rename(&partial, path)?;
    Ok(())
}

/// Waits until a new handshake with every registered instance shows the certificate now in
/// `certs` for its service.
async fn all_present(mesh: &TestMesh, certs: &Path, what: &str) -> anyhow::Result<()> {
    for service in herd_tests::SERVICES {
        let expected = der(&certs.join(format!("{service}.pem")))?;
        for address in mesh.addresses(service)? {
            eventually(
                &format!("{service} at {address} to present {what}"),
                Duration::from_secs(15),
                || async {
                    (presented(certs, &address, service).await.ok()? == expected).then_some(())
                },
            )
            .await?;
        }
    }
    Ok(())
}

/// Waits until every registered instance takes (`true`) or refuses (`false`) a handshake from a
/// caller holding the certificates in `client`.
async fn all_accept(
    mesh: &TestMesh,
    client: &Path,
    accept: bool,
    what: &str,
) -> anyhow::Result<()> {
    for service in herd_tests::SERVICES {
        for address in mesh.addresses(service)? {
            eventually(
                &format!("{service} at {address} to {what}"),
                Duration::from_secs(15),
                || async {
                    // A refused client certificate shows on the first read, not the handshake.
                    let taken = herd_tests::health_over(
                        &herd_tests::grpcurl_tls_flags(client, "gateway"),
                        &address,
                    )
                    .is_some();
                    (taken == accept).then_some(())
                },
            )
            .await?;
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn certificates_and_the_ca_rotate_under_load_without_a_failed_call() -> anyhow::Result<()> {
    let mut mesh = TestMesh::start_tls(2, &fixture()).await?;
    let certs = mesh
        .certs
        .clone()
        .ok_or_else(|| anyhow::anyhow!("a TLS mesh has certificates"))?;
    let load = herd_tests::Load::start_with(
        &mesh.etcd,
        Some(&certs),
        8,
        Duration::from_millis(5),
        Duration::from_secs(5),
    )
    .await?;
    load.more(200).await?;

    // 1. New certificates from the same CA (herdctl certs init again).
    let first = der(&certs.join("pricing.pem"))?;
    herd_tests::certs_init(&certs)?;
    assert_ne!(der(&certs.join("pricing.pem"))?, first);
    all_present(&mesh, &certs, "its new certificate").await?;
    load.more(200).await?;

    // 2. A new CA: trusted first, beside the old one; then certificates from it; then the old
    // one dropped.
    let (next, old) = (mesh.dir.path().join("next"), mesh.dir.path().join("old"));
    herd_tests::certs_init(&next)?;
    std::fs::create_dir_all(&old)?;
    for file in ["ca.pem", "gateway.pem", "gateway-key.pem"] {
        std::fs::copy(certs.join(file), old.join(file))?;
    }
    let (old_ca, new_ca) = (
        std::fs::read(certs.join("ca.pem"))?,
        std::fs::read(next.join("ca.pem"))?,
    );
    replace(
        &certs.join("ca.pem"),
        &[old_ca.as_slice(), &new_ca].concat(),
    )?;
    // The new CA's certificates name both CAs too, so the probes below verify either side.
    replace(&next.join("ca.pem"), &[old_ca.as_slice(), &new_ca].concat())?;
    all_accept(&mesh, &next, true, "trust the new CA").await?;
    load.more(200).await?;
    for service in herd_tests::SERVICES {
        let (cert, key) = (format!("{service}.pem"), format!("{service}-key.pem"));
        replace(&certs.join(&key), &std::fs::read(next.join(&key))?)?;
        replace(&certs.join(&cert), &std::fs::read(next.join(&cert))?)?;
    }
    all_present(&mesh, &certs, "the new CA's certificate").await?;
    load.more(200).await?;
    replace(&certs.join("ca.pem"), &new_ca)?;
    all_accept(&mesh, &old, false, "refuse the old CA").await?;

    // 3. New connections with everything new: one more pricing instance, which the gateways
    // call and which calls tax and currency.
    mesh.add("pricing")?;
    eventually(
        "a third pricing instance serving",
        Duration::from_secs(30),
        || async {
            let addresses = mesh.addresses("pricing").ok()?;
            (addresses.len() == 3
                && addresses
                    .iter()
                    .all(|a| mesh.health(a, "").as_deref() == Some("SERVING")))
            .then_some(())
        },
    )
    .await?;
    load.more(400).await?;
    let report = load.stop().await;
    println!("REPORT rotation under load: {report}");
    assert_eq!(report.failures(), 0, "{report}");
    Ok(())
}
