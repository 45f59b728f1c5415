//! The demo configuration `herdctl config seed` writes where nothing is configured yet: the
//! example of every section that must be present or has a default (a small catalog, a promotion by
//! SKU and one by category, tax regions with a food exemption, fx rates, quote and limit settings,
//! and a freshly generated signing key), as the sections declare them.

use herd::authz::AuthzSection;
use herd::{Registry, Section};

use crate::MeshConfig;

/// The demo sections as `(name, JSON)`, in the order the mesh declares them; the authorization
/// policy is the reference mesh's ([`policy`]) in the trust domain `herd.local`.
pub fn sections() -> Vec<(&'static str, String)> {
    sections_in(DEFAULT_TRUST_DOMAIN)
}

/// The trust domain of `herdctl certs init` and of the demo policy unless told otherwise.
pub const DEFAULT_TRUST_DOMAIN: &str = "herd.local";

/// The demo sections, with the reference mesh's policy in `trust_domain`.
pub fn sections_in(trust_domain: &str) -> Vec<(&'static str, String)> {
    Registry::of::<MeshConfig>()
        .specs()
        .iter()
        .filter(|spec| spec.seeded())
        .map(|spec| match spec.name() {
            <AuthzSection as Section>::NAME => (spec.name(), policy(trust_domain)),
            _ => (spec.name(), spec.example()),
        })
        .collect()
}

/// The reference mesh's authorization policy: the gateway calls pricing, pricing calls tax and
/// currency, and nothing else inside the mesh is called by anyone (the gateway is public).
pub fn policy(trust_domain: &str) -> String {
    let id = |service: &str| herd::tls::identity(trust_domain, service);
    let rule = |service: &str, caller: &str| serde_json::json!({"service": service, "methods": ["*"], "allow": [id(caller)]});
    serde_json::json!({"rules": [
        rule("pricing", "gateway"),
        rule("tax", "pricing"),
        rule("currency", "pricing"),
    ]})
    .to_string()
}

/// The demo configuration as a fixed store, for tests and tools that need no etcd.
pub fn fixed() -> Result<herd::ConfigStore<MeshConfig>, herd::ConfigError> {
    let sections = sections();
    herd::ConfigStore::fixed(sections.iter().map(|(name, json)| (*name, json.as_str())))
}

/// The demo configuration trusting `issuer` alone, signing with a fixed key (`k1`) whose
/// private key comes with it, as a fixed store: for tests of the gateway.
pub fn fixed_for(
    issuer: &crate::auth::DevIssuer,
) -> Result<(herd::ConfigStore<MeshConfig>, crate::keys::SigningSecrets), herd::ConfigError> {
    let auth = serde_json::to_string(&issuer.auth_section()).unwrap_or_default();
    let secret = [7; 32];
    let keys = serde_json::json!({"keys": [
        {"id": "k1", "public": crate::keys::public_of(&secret), "active": true}]})
    .to_string();
    let sections = sections();
    let store = herd::ConfigStore::fixed(sections.iter().map(|(name, json)| match *name {
        <crate::auth::Auth as herd::Section>::NAME => (*name, auth.as_str()),
        <crate::sections::SigningKeys as herd::Section>::NAME => (*name, keys.as_str()),
        _ => (*name, json.as_str()),
    }))?;
    Ok((
        store,
        crate::keys::SigningSecrets::from_secrets(&[("k1", secret)]),
    ))
}
