//! The demo configuration `herdctl config seed` writes where nothing is configured yet: the
//! example of every section that must be present or has a default (a small catalog, a promotion by
//! SKU and one by category, tax regions with a food exemption, fx rates, quote and limit settings,
//! and a freshly generated signing key), as the sections declare them.

use herd::Registry;

use crate::MeshConfig;

/// The demo sections as `(name, JSON)`, in the order the mesh declares them.
pub fn sections() -> Vec<(&'static str, String)> {
    Registry::of::<MeshConfig>()
        .specs()
        .iter()
        .filter(|spec| spec.seeded())
        .map(|spec| (spec.name(), spec.example()))
        .collect()
}

/// The demo configuration as a fixed store, for tests and tools that need no etcd.
pub fn fixed() -> Result<herd::ConfigStore<MeshConfig>, herd::ConfigError> {
    let sections = sections();
    herd::ConfigStore::fixed(sections.iter().map(|(name, json)| (*name, json.as_str())))
}

/// The demo configuration trusting `issuer` alone, as a fixed store.
pub fn fixed_for(
    issuer: &crate::auth::DevIssuer,
) -> Result<herd::ConfigStore<MeshConfig>, herd::ConfigError> {
    let auth = serde_json::to_string(&issuer.auth_section()).unwrap_or_default();
    let sections = sections();
    herd::ConfigStore::fixed(sections.iter().map(|(name, json)| {
        if *name == <crate::auth::Auth as herd::Section>::NAME {
            (*name, auth.as_str())
        } else {
            (*name, json.as_str())
        }
    }))
}
