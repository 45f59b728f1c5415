//! Callers prove who they are: every public call carries a short-lived bearer JWT that any gateway
//! verifies from shared configuration alone; identity comes from the token, the retry context is
//! sealed, and tokens are revoked (by key removal or `revoked_before`) with no session store —
//! tried with real grpcurl against real gateways.

use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use herd_model::auth::{AUDIENCE, Auth, DEV_ISSUER, DevIssuer};
use herd_tests::{
    Answer, Load, TestMesh, all_applied, call_with, eventually, fixture, issuer, now_secs,
};
use serde_json::{Value, json};

/// The scenarios run one at a time: each measures what the other would disturb.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const CREATE: &str = "herd.quote.v1.QuoteService/CreateQuote";
const VERIFY: &str = "herd.quote.v1.QuoteService/VerifyQuote";

fn now() -> i64 {
    now_secs() as i64
}

fn basket(context: Value) -> Value {
    json!({"context": context, "items": [{"sku": "widget", "quantity": 3}],
           "currency": "EUR", "region": "US-CA"})
}

/// Claims of a good token for alice of acme from the test issuer, with `overrides` (null
/// removes a claim).
fn claims(overrides: Value) -> Value {
    let claims = json!({"iss": DEV_ISSUER, "sub": "alice", "aud": AUDIENCE,
                            "iat": now() - 5, "exp": now() + 120, "tenant": "acme"});
    let mut merged = claims.as_object().cloned().unwrap_or_default();
    merged.extend(overrides.as_object().cloned().unwrap_or_default());
    merged.retain(|_, v| !v.is_null());
    serde_json::Value::Object(merged)
}

fn signed(by: &DevIssuer, claims: &Value) -> anyhow::Result<String> {
    by.sign_claims(claims).map_err(anyhow::Error::msg)
}

/// `body` to `method` on `gateway` with `authorization: Bearer <token>`.
fn as_bearer(gateway: &str, method: &str, token: &str, body: &Value) -> anyhow::Result<Answer> {
    call_with(
        gateway,
        method,
        body,
        &[&format!("authorization: Bearer {token}")],
    )
}

/// The code and message of a refused call.
fn refusal(answer: Answer) -> (String, String) {
    match answer {
        Answer::Err { code, message } => (code, message),
        Answer::Ok(v) => ("OK".into(), v.to_string()),
    }
}

/// The test configuration with `auth` in place of its `auth` section.
fn config_with(auth: &Auth) -> anyhow::Result<Vec<(&'static str, String)>> {
    let auth = serde_json::to_string(auth)?;
    Ok(fixture()
        .into_iter()
        .map(|(name, json)| {
            if name == "auth" {
                (name, auth.clone())
            } else {
                (name, json)
            }
        })
        .collect())
}

/// Writes `auth` and waits until all `n` instances applied it; the revision.
async fn put_auth(mesh: &TestMesh, n: usize, auth: &Auth) -> anyhow::Result<i64> {
    let mut etcd = herd::etcd::connect(std::slice::from_ref(&mesh.etcd.endpoint)).await?;
    let resp = etcd
        .put("/herd/config/auth", serde_json::to_string(auth)?, None)
        .await?;
    let revision = resp.header().map(|h| h.revision()).unwrap_or(0);
    all_applied(mesh, n, revision).await?;
    Ok(revision)
}

#[tokio::test(flavor = "multi_thread")]
async fn every_bad_token_is_unauthenticated_saying_why_and_never_logged() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let mesh = TestMesh::start(1, &fixture()).await?;
    let g = &mesh.gateways[0];
    let dev = issuer();
    let good = signed(&dev, &claims(json!({})))?;
    let body = basket(json!({"tenantId": "acme"}));
    let quote = as_bearer(g, CREATE, &good, &body)?.ok()?;
    assert_eq!(quote["quote"]["tenantId"], "acme");

    let parts: Vec<&str> = good.split('.').collect();
    let b64 = |v: Value| B64URL.encode(v.to_string());
    let richer = b64(claims(json!({"tenant": "globex"})));
    let mut signature = B64URL.decode(parts[2])?;
    signature[0] ^= 1;
    let mut stranger = DevIssuer::from_secret([99; 32]);
    stranger.kid = "stranger-1".into();
    // HS256 keyed with the issuer's public key: the classic algorithm confusion.
    let jwk = serde_json::to_value(dev.jwk().map_err(anyhow::Error::msg)?)?;
    let public = B64URL.decode(jwk["x"].as_str().unwrap_or_default())?;
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
    header.kid = Some(dev.kid.clone());
    let hs256 = jsonwebtoken::encode(
        &header,
        &claims(json!({})),
        &jsonwebtoken::EncodingKey::from_secret(&public),
    )?;
    let t = now();
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "expired",
            signed(&dev, &claims(json!({"iat": t - 400, "exp": t - 100})))?,
            "token: expired",
        ),
        (
            "not yet valid",
            signed(&dev, &claims(json!({"nbf": t + 300})))?,
            "not valid yet",
        ),
        (
            "too long a lifetime",
            signed(&dev, &claims(json!({"exp": t + 3600})))?,
            "longer than the 900 s allowed",
        ),
        (
            "issued in the future",
            signed(&dev, &claims(json!({"iat": t + 300, "exp": t + 400})))?,
            "issued in the future",
        ),
        (
            "no iat",
            signed(&dev, &claims(json!({"iat": null})))?,
            "claim \"iat\" is required",
        ),
        (
            "wrong audience",
            signed(&dev, &claims(json!({"aud": "billing"})))?,
            "audience does not include \"herd\"",
        ),
        (
            "wrong issuer",
            signed(&dev, &claims(json!({"iss": "https://evil.example"})))?,
            "issuer is not the one trusted",
        ),
        (
            "no tenant",
            signed(&dev, &claims(json!({"tenant": null})))?,
            "claim \"tenant\" is required",
        ),
        (
            "unknown kid",
            stranger
                .token("acme", "alice", t, 60)
                .map_err(anyhow::Error::msg)?,
            "unknown key \"stranger-1\"",
        ),
        (
            "alg none",
            format!(
                "{}.{}.",
                b64(json!({"alg": "none", "kid": dev.kid})),
                parts[1]
            ),
            "algorithm \"none\" is refused",
        ),
        (
            "HS256 keyed with the public key",
            hs256,
            "algorithm HS256 is refused",
        ),
        (
            "altered payload",
            format!("{}.{richer}.{}", parts[0], parts[2]),
            "signature does not verify",
        ),
        (
            "altered signature",
            format!("{}.{}.{}", parts[0], parts[1], B64URL.encode(&signature)),
            "signature does not verify",
        ),
        ("not a JWT", "not-a-token".into(), "token: malformed"),
    ];
    for (name, token, says) in &cases {
        let (code, message) = refusal(as_bearer(g, CREATE, token, &body)?);
        assert_eq!(code, "Unauthenticated", "{name}: {message}");
        assert!(
            message.contains(says),
            "{name}: {message:?} does not say {says:?}"
        );
        assert!(
            !message.contains(token.as_str()),
            "{name}: the message holds the token"
        );
    }
    let (code, message) = refusal(call_with(g, CREATE, &body, &[])?);
    assert_eq!(code, "Unauthenticated");
    assert!(message.contains("bearer token is required"), "{message}");
    let (code, message) = refusal(call_with(
        g,
        CREATE,
        &body,
        &[&format!("authorization: Basic {good}")],
    )?);
    assert_eq!(code, "Unauthenticated");
    assert!(message.contains("Bearer <JWT>"), "{message}");
    // VerifyQuote asks the same.
    let verify = json!({"context": {"tenantId": "acme"}, "token": quote["token"]});
    let (code, _) = refusal(call_with(g, VERIFY, &verify, &[])?);
    assert_eq!(code, "Unauthenticated");
    // Health and reflection stay open.
    assert_eq!(herd_tests::health(g, "").as_deref(), Some("SERVING"));

    // No token, good or bad, is ever written to a log.
    for (service, log) in mesh.logs_of(&["gateway", "pricing", "tax", "currency"]) {
        for token in cases.iter().map(|(_, t, _)| t).chain([&good]) {
            let signature = token.rsplit('.').next().unwrap_or_default();
            assert!(
                signature.len() < 8 || !log.contains(signature),
                "{service}'s log holds a token"
            );
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn identity_comes_from_the_token_and_the_retry_context_is_sealed() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let mesh = TestMesh::start(2, &fixture()).await?;
    let (g1, g2) = (&mesh.gateways[0], &mesh.gateways[1]);
    let dev = issuer();
    let token = |tenant: &str, subject: &str| {
        signed(&dev, &claims(json!({"tenant": tenant, "sub": subject})))
    };
    let (alice, bob, gina) = (
        token("acme", "alice")?,
        token("acme", "bob")?,
        token("globex", "gina")?,
    );

    // The tenant and principal are the token's: an empty tenant is filled, a principal replaced,
    // another tenant refused.
    let first = as_bearer(g1, CREATE, &alice, &basket(json!({"principal": "root"})))?.ok()?;
    assert_eq!(first["context"]["tenantId"], "acme");
    assert_eq!(first["context"]["principal"], "alice");
    assert_eq!(first["quote"]["tenantId"], "acme");
    assert!(
        first["context"]["seal"]
            .as_str()
            .is_some_and(|s| !s.is_empty())
    );
    let (code, message) = refusal(as_bearer(
        g1,
        CREATE,
        &alice,
        &basket(json!({"tenantId": "globex"})),
    )?);
    assert_eq!(code, "PermissionDenied", "{message}");
    assert!(message.starts_with("context.tenant_id"), "{message}");

    // The returned context, sent back to the other gateway: the same quote, byte for byte.
    let mut retry = basket(Value::Null);
    retry["context"] = first["context"].clone();
    let again = as_bearer(g2, CREATE, &alice, &retry)?.ok()?;
    assert_eq!(
        (&again["quote"], &again["token"]),
        (&first["quote"], &first["token"])
    );

    // What a caller makes up is not believed.
    let made_up = [
        (
            json!({"tenantId": "acme", "acceptedAt": "2100-01-01T00:00:00Z"}),
            "context.accepted_at",
        ),
        (
            json!({"tenantId": "acme", "configRevision": "1"}),
            "context.config_revision",
        ),
    ];
    for (context, field) in made_up {
        let (code, message) = refusal(as_bearer(g1, CREATE, &alice, &basket(context))?);
        assert_eq!(code, "InvalidArgument", "{message}");
        assert!(message.starts_with(field), "{message}");
    }
    let mut later = retry.clone();
    later["context"]["acceptedAt"] = json!("2100-01-01T00:00:00Z");
    let mut pinned = retry.clone();
    pinned["context"]["configRevision"] = json!("1");
    // globex's sealed context, passed off as acme's.
    let theirs = as_bearer(g1, CREATE, &gina, &basket(json!({})))?.ok()?;
    let mut borrowed = basket(Value::Null);
    borrowed["context"] = theirs["context"].clone();
    borrowed["context"]["tenantId"] = json!("acme");
    borrowed["context"]["principal"] = json!("alice");
    for (name, body, caller) in [
        ("a sealed accepted time moved", &later, &alice),
        ("a sealed revision moved", &pinned, &alice),
        ("another principal's seal", &retry, &bob),
        ("another tenant's seal", &borrowed, &alice),
    ] {
        let (code, message) = refusal(as_bearer(g2, CREATE, caller, body)?);
        assert_eq!(code, "InvalidArgument", "{name}: {message}");
        assert!(message.starts_with("context.seal"), "{name}: {message}");
    }

    // VerifyQuote answers only the quote's own tenant.
    let verify = json!({"context": {}, "token": first["token"]});
    let verified = as_bearer(g2, VERIFY, &bob, &verify)?.ok()?;
    assert_eq!(verified["quote"], first["quote"]);
    let (code, _) = refusal(as_bearer(g2, VERIFY, &gina, &verify)?);
    assert_eq!(code, "PermissionDenied");

    // A seal outside the retry window (the quote TTL, here made 1 s) is refused.
    let mut etcd = herd::etcd::connect(std::slice::from_ref(&mesh.etcd.endpoint)).await?;
    let resp = etcd
        .put("/herd/config/quote", r#"{"ttl_seconds":1}"#, None)
        .await?;
    all_applied(&mesh, 8, resp.header().map(|h| h.revision()).unwrap_or(0)).await?;
    let short = as_bearer(g1, CREATE, &alice, &basket(json!({})))?.ok()?;
    let mut stale = basket(Value::Null);
    stale["context"] = short["context"].clone();
    let message = eventually(
        "the retry window to pass",
        Duration::from_secs(10),
        || async {
            match as_bearer(g2, CREATE, &alice, &stale).ok()? {
                Answer::Err { code, message } if code == "InvalidArgument" => Some(message),
                _ => None,
            }
        },
    )
    .await?;
    assert!(message.contains("retry window of 1 s"), "{message}");
    Ok(())
}

/// How long after `since` every gateway refuses `token` with a message holding `says`.
async fn refused_everywhere(
    mesh: &TestMesh,
    token: &str,
    says: &str,
    since: Instant,
) -> anyhow::Result<Duration> {
    for g in &mesh.gateways {
        let client = herd_tests::connect(g).await?;
        let client = herd_proto::quote::quote_service_client::QuoteServiceClient::new(client);
        let value: tonic::metadata::MetadataValue<_> = format!("Bearer {token}").parse()?;
        eventually(
            &format!("{g} to refuse: {says}"),
            Duration::from_secs(10),
            || {
                let mut request = tonic::Request::new(herd_tests::widget_quote("acme", ""));
                request
                    .metadata_mut()
                    .insert("authorization", value.clone());
                let mut client = client.clone();
                async move {
                    match client.create_quote(request).await {
                        Err(s)
                            if s.code() == tonic::Code::Unauthenticated
                                && s.message().contains(says) =>
                        {
                            Some(())
                        }
                        _ => None,
                    }
                }
            },
        )
        .await?;
    }
    Ok(since.elapsed())
}

#[tokio::test(flavor = "multi_thread")]
async fn revocations_and_removed_keys_reach_every_gateway_within_milliseconds() -> anyhow::Result<()>
{
    let _serial = SERIAL.lock().await;
    let dev = issuer();
    let mut second = DevIssuer::from_secret([12; 32]);
    second.kid = "dev-2".into();
    let mut auth = dev.auth_section();
    auth.issuers[0]
        .jwks
        .keys
        .push(second.jwk().map_err(anyhow::Error::msg)?);
    let mesh = TestMesh::start(2, &config_with(&auth)?).await?;
    let alice = dev
        .token("acme", "alice", now() - 5, 300)
        .map_err(anyhow::Error::msg)?;
    let gina = dev
        .token("globex", "gina", now() - 5, 300)
        .map_err(anyhow::Error::msg)?;
    let by_second = second
        .token("acme", "alice", now() - 5, 300)
        .map_err(anyhow::Error::msg)?;
    let body = basket(json!({}));
    for g in &mesh.gateways {
        for token in [&alice, &gina, &by_second] {
            as_bearer(g, CREATE, token, &body)?.ok()?;
        }
    }

    // Alice's tokens issued before now, and globex's, are refused everywhere.
    let before = now();
    auth.revoked_before.subjects.insert("alice".into(), before);
    auth.revoked_before.tenants.insert("globex".into(), before);
    let written = Instant::now();
    let mut etcd = herd::etcd::connect(std::slice::from_ref(&mesh.etcd.endpoint)).await?;
    etcd.put("/herd/config/auth", serde_json::to_string(&auth)?, None)
        .await?;
    let subject =
        refused_everywhere(&mesh, &alice, "revoked (tokens of this subject", written).await?;
    let tenant =
        refused_everywhere(&mesh, &gina, "revoked (tokens of this tenant", written).await?;
    // A token issued since is good again; bob of acme was never revoked.
    let fresh = dev
        .token("acme", "alice", before, 300)
        .map_err(anyhow::Error::msg)?;
    let bob = dev
        .token("acme", "bob", now() - 5, 300)
        .map_err(anyhow::Error::msg)?;
    for g in &mesh.gateways {
        as_bearer(g, CREATE, &fresh, &body)?.ok()?;
        as_bearer(g, CREATE, &bob, &body)?.ok()?;
    }

    // Removing a key revokes every token it signed, on every gateway.
    auth.issuers[0]
        .jwks
        .keys
        .retain(|k| k.common.key_id.as_deref() != Some("dev-2"));
    let written = Instant::now();
    etcd.put("/herd/config/auth", serde_json::to_string(&auth)?, None)
        .await?;
    let removed = refused_everywhere(&mesh, &by_second, "unknown key \"dev-2\"", written).await?;
    println!(
        "REPORT revocation reached both gateways after: subject {} ms, tenant {} ms, key removal {} ms",
        subject.as_millis(),
        tenant.as_millis(),
        removed.as_millis()
    );
    // Each includes the test's own calls; propagation itself is milliseconds.
    for took in [subject, tenant, removed] {
        assert!(took < Duration::from_secs(2), "{took:?}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn issuer_keys_rotate_under_load_with_no_failed_call() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let mesh = TestMesh::start(2, &fixture()).await?;
    let n = 8;
    let load = Load::start(
        &mesh.etcd,
        8,
        Duration::from_millis(5),
        Duration::from_secs(5),
    )
    .await?;
    let calls = |at_least: u64| {
        let load = &load;
        async move {
            let target = load.report().sent + at_least;
            eventually(
                &format!("{at_least} more calls"),
                Duration::from_secs(20),
                || async { (load.report().sent >= target).then_some(()) },
            )
            .await
        }
    };
    calls(100).await?;
    // 1. The issuer publishes its next key beside the current one.
    let old = issuer();
    let mut next = DevIssuer::from_secret([13; 32]);
    next.kid = "dev-next".into();
    let mut auth = old.auth_section();
    auth.issuers[0]
        .jwks
        .keys
        .push(next.jwk().map_err(anyhow::Error::msg)?);
    put_auth(&mesh, n, &auth).await?;
    calls(100).await?;
    // 2. It issues with the next key.
    let token = next
        .token("load", "tester", now(), 600)
        .map_err(anyhow::Error::msg)?;
    load.set_authorization(&format!("Bearer {token}"))?;
    calls(100).await?;
    // 3. The old key is removed.
    auth.issuers[0]
        .jwks
        .keys
        .retain(|k| k.common.key_id.as_deref() == Some("dev-next"));
    put_auth(&mesh, n, &auth).await?;
    calls(100).await?;
    let report = load.stop().await;
    println!("REPORT issuer key rotation under load: {report}");
    assert_eq!(report.failures(), 0, "{report}");
    // The old key's tokens are refused now.
    let stale = old
        .token("load", "tester", now(), 600)
        .map_err(anyhow::Error::msg)?;
    let (code, message) = refusal(as_bearer(
        &mesh.gateways[0],
        CREATE,
        &stale,
        &basket(json!({})),
    )?);
    assert_eq!(code, "Unauthenticated", "{message}");
    Ok(())
}
