//! The configuration sections of the reference mesh, as stored in etcd (JSON, one key each), and
//! the rules each must satisfy. Unknown fields are an error, never silently dropped. The list of
//! sections is [`MeshConfig`]'s [`ConfigModel::sections`]; the runtime adds its own to it.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use herd::error::quoted;
use herd::{ConfigError, ConfigModel, Section, SectionSpec, Sections};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

/// `/herd/config/catalog`: what can be sold, at what price, in the base currency.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Catalog {
    /// ISO 4217 code of every price; also the base of the fx rates.
    pub currency: String,
    /// Items by SKU.
    pub items: BTreeMap<String, CatalogItem>,
}

/// One item of the catalog.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CatalogItem {
    /// Display name.
    pub name: String,
    /// Unit price in minor units of the catalog currency.
    pub price_minor: i64,
    /// Category, used by promotions and tax exemptions.
    pub category: String,
}

/// `/herd/config/promotions`: percentage discounts by SKU or category.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Promotions {
    /// The rules; ids are unique.
    pub rules: Vec<PromotionRule>,
}

/// One promotion: `percent_off` on lines of a SKU or a category from `min_quantity` units.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PromotionRule {
    /// Unique id, reported on the lines it discounts.
    pub id: String,
    /// The SKU it applies to (exactly one of `sku` and `category`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sku: Option<String>,
    /// The category it applies to (exactly one of `sku` and `category`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub category: Option<String>,
    /// Whole percent off, 1 to 100.
    pub percent_off: u32,
    /// The least quantity on the line for the rule to apply.
    #[serde(default = "one")]
    pub min_quantity: i32,
}

fn one() -> i32 {
    1
}

/// `/herd/config/tax`: tax rates by region.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tax {
    /// Regions by code, for example `US-CA`.
    pub regions: BTreeMap<String, TaxRegion>,
}

/// One region's tax rule.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaxRegion {
    /// Rate in basis points (725 = 7.25 %), 0 to 10000.
    pub rate_bps: u32,
    /// Categories not taxed in this region.
    #[serde(default)]
    pub exempt_categories: BTreeSet<String>,
}

/// `/herd/config/fx`: exact conversion rates from the base currency.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Fx {
    /// The base currency; must be the catalog's.
    pub base: String,
    /// Units of each currency per unit of the base, as decimal strings ("0.92").
    pub rates: BTreeMap<String, Decimal>,
}

/// `/herd/config/quote`: how quotes are issued.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuoteSettings {
    /// How long a quote stays valid after the request was accepted, 1 to 86400 seconds.
    pub ttl_seconds: u32,
}

impl Default for QuoteSettings {
    fn default() -> Self {
        Self { ttl_seconds: 300 }
    }
}

/// `/herd/config/limits`: bounds on a basket, and on how many calls a tenant may make.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Most lines in one request.
    pub max_items: u32,
    /// Most units on one line.
    pub max_quantity: i32,
    /// Calls per second each named tenant may make, across the whole mesh.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub tenant_rates: BTreeMap<String, u32>,
    /// Calls per second any other tenant may make; none: no limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_tenant_rate: Option<u32>,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_items: 100,
            max_quantity: 10_000,
            tenant_rates: BTreeMap::new(),
            default_tenant_rate: None,
        }
    }
}

impl Limits {
    /// The mesh-wide rate, in calls per second, that applies to `tenant`, if any.
    pub fn tenant_rate(&self, tenant: &str) -> Option<u32> {
        self.tenant_rates
            .get(tenant)
            .copied()
            .or(self.default_tenant_rate)
    }
}

/// `/herd/config/keys`: the Ed25519 keys of quote tokens — public keys only: the private keys are
/// files held by the instances that sign (see [`crate::keys`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SigningKeys {
    /// The keys; exactly one is active (signs), the others still verify until removed.
    pub keys: Vec<KeyEntry>,
}

/// One signing key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyEntry {
    /// Key id, written into every token it signs.
    pub id: String,
    /// The 32-byte Ed25519 public key, base64.
    #[serde(default)]
    pub public: String,
    /// Whether this key signs new tokens.
    #[serde(default)]
    pub active: bool,
    /// Where earlier versions kept the private key: refused, naming the way out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
}

fn is_currency_code(code: &str) -> bool {
    code.len() == 3 && code.bytes().all(|b| b.is_ascii_uppercase())
}

impl Section for Catalog {
    const NAME: &'static str = "catalog";
    const ABOUT: &'static str = "what can be sold, at what price, in the base currency";
    fn example() -> String {
        r#"{"currency":"USD","items":{
  "apple":{"name":"Apple","price_minor":125,"category":"food"},
  "bread":{"name":"Sourdough bread","price_minor":499,"category":"food"},
  "hammer":{"name":"Claw hammer","price_minor":1999,"category":"tools"},
  "drill":{"name":"Cordless drill","price_minor":8999,"category":"tools"},
  "lamp":{"name":"Desk lamp","price_minor":3450,"category":"home"}
}}"#
        .into()
    }
    fn validate(&self) -> Result<(), String> {
        if !is_currency_code(&self.currency) {
            return Err(format!(
                "currency: {} is not an ISO 4217 code",
                quoted(&self.currency)
            ));
        }
        if self.items.is_empty() {
            return Err("items: at least one item is required".into());
        }
        for (sku, item) in &self.items {
            if sku.trim().is_empty() {
                return Err("items: a SKU must not be empty".into());
            }
            if item.price_minor < 0 {
                return Err(format!(
                    "items.{sku}.price_minor: must be at least 0, got {}",
                    item.price_minor
                ));
            }
            if item.category.trim().is_empty() {
                return Err(format!("items.{sku}.category: required"));
            }
        }
        Ok(())
    }
}

impl Section for Promotions {
    const NAME: &'static str = "promotions";
    const ABOUT: &'static str = "percentage discounts by SKU or category";
    fn example() -> String {
        r#"{"rules":[
  {"id":"hammer-3-for-15","sku":"hammer","percent_off":15,"min_quantity":3},
  {"id":"tools-5","category":"tools","percent_off":5,"min_quantity":1}
]}"#
        .into()
    }
    fn validate(&self) -> Result<(), String> {
        let mut ids = HashSet::new();
        for (i, rule) in self.rules.iter().enumerate() {
            if rule.id.trim().is_empty() {
                return Err(format!("rules[{i}].id: required"));
            }
            if !ids.insert(rule.id.as_str()) {
                return Err(format!("rules[{i}].id: duplicate id {}", quoted(&rule.id)));
            }
            match (&rule.sku, &rule.category) {
                (Some(_), None) | (None, Some(_)) => {}
                _ => {
                    return Err(format!(
                        "rules[{i}]: exactly one of sku and category is required"
                    ));
                }
            }
            if !(1..=100).contains(&rule.percent_off) {
                return Err(format!(
                    "rules[{i}].percent_off: must be 1 to 100, got {}",
                    rule.percent_off
                ));
            }
            if rule.min_quantity < 1 {
                return Err(format!(
                    "rules[{i}].min_quantity: must be at least 1, got {}",
                    rule.min_quantity
                ));
            }
        }
        Ok(())
    }
}

impl Section for Tax {
    const NAME: &'static str = "tax";
    const ABOUT: &'static str = "tax rates and exempt categories by region";
    fn example() -> String {
        r#"{"regions":{
  "US-CA":{"rate_bps":725,"exempt_categories":["food"]},
  "US-NY":{"rate_bps":400,"exempt_categories":[]},
  "DE":{"rate_bps":1900,"exempt_categories":[]}
}}"#
        .into()
    }
    fn validate(&self) -> Result<(), String> {
        for (code, region) in &self.regions {
            if code.trim().is_empty() {
                return Err("regions: a region code must not be empty".into());
            }
            if region.rate_bps > 10_000 {
                return Err(format!(
                    "regions.{code}.rate_bps: must be 0 to 10000, got {}",
                    region.rate_bps
                ));
            }
        }
        Ok(())
    }
}

impl Section for Fx {
    const NAME: &'static str = "fx";
    const ABOUT: &'static str = "exact conversion rates from the catalog currency";
    fn example() -> String {
        r#"{"base":"USD","rates":{"EUR":"0.92","GBP":"0.79","CHF":"0.885"}}"#.into()
    }
    fn validate(&self) -> Result<(), String> {
        if !is_currency_code(&self.base) {
            return Err(format!(
                "base: {} is not an ISO 4217 code",
                quoted(&self.base)
            ));
        }
        for (code, rate) in &self.rates {
            if !is_currency_code(code) {
                return Err(format!("rates: {} is not an ISO 4217 code", quoted(code)));
            }
            if *rate <= Decimal::ZERO {
                return Err(format!(
                    "rates.{code}: must be a positive decimal, got {rate}"
                ));
            }
            if code == &self.base && *rate != Decimal::ONE {
                return Err(format!(
                    "rates.{code}: the base currency's rate must be 1, got {rate}"
                ));
            }
        }
        Ok(())
    }
}

impl Section for QuoteSettings {
    const NAME: &'static str = "quote";
    const ABOUT: &'static str = "how long a quote stays valid";
    fn example() -> String {
        r#"{"ttl_seconds":300}"#.into()
    }
    fn validate(&self) -> Result<(), String> {
        if !(1..=86_400).contains(&self.ttl_seconds) {
            return Err(format!(
                "ttl_seconds: must be 1 to 86400, got {}",
                self.ttl_seconds
            ));
        }
        Ok(())
    }
}

impl Section for Limits {
    const NAME: &'static str = "limits";
    const ABOUT: &'static str = "bounds on a basket and on each tenant's calls per second";
    fn example() -> String {
        r#"{"max_items":100,"max_quantity":10000}"#.into()
    }
    fn validate(&self) -> Result<(), String> {
        if !(1..=10_000).contains(&self.max_items) {
            return Err(format!(
                "max_items: must be 1 to 10000, got {}",
                self.max_items
            ));
        }
        if !(1..=1_000_000).contains(&self.max_quantity) {
            return Err(format!(
                "max_quantity: must be 1 to 1000000, got {}",
                self.max_quantity
            ));
        }
        for (tenant, rate) in &self.tenant_rates {
            if tenant.is_empty() || tenant.len() > herd::context::MAX_ID_BYTES {
                return Err(format!(
                    "tenant_rates: a tenant is 1 to {} bytes, got {}",
                    herd::context::MAX_ID_BYTES,
                    quoted(tenant)
                ));
            }
            if *rate == 0 {
                return Err(format!(
                    "tenant_rates[{}]: at least 1 call a second (remove the tenant for none)",
                    quoted(tenant)
                ));
            }
        }
        if self.default_tenant_rate == Some(0) {
            return Err("default_tenant_rate: at least 1 call a second".into());
        }
        Ok(())
    }
}

impl Section for SigningKeys {
    const NAME: &'static str = "keys";
    const ABOUT: &'static str =
        "the Ed25519 public keys of quote tokens, and which one signs (private keys: files)";
    fn example() -> String {
        let secret: [u8; 32] = rand::random();
        format!(
            r#"{{"keys":[{{"id":"k1","public":"{}","active":true}}]}}"#,
            crate::keys::public_of(&secret)
        )
    }
    fn validate(&self) -> Result<(), String> {
        KeyRing::from_section(self).map(|_| ())
    }
}

/// The keys of quote tokens, ready to verify with: each id's public key, and the active id.
#[derive(Clone)]
pub struct KeyRing {
    active: String,
    keys: HashMap<String, ed25519_dalek::VerifyingKey>,
}

impl std::fmt::Debug for KeyRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut ids: Vec<&String> = self.keys.keys().collect();
        ids.sort();
        f.debug_struct("KeyRing")
            .field("active", &self.active)
            .field("ids", &ids)
            .finish()
    }
}

impl KeyRing {
    /// Decodes and checks the keys section: unique ids, 32-byte Ed25519 public keys, no private
    /// key, exactly one active.
    pub fn from_section(section: &SigningKeys) -> Result<Self, String> {
        let mut keys = HashMap::new();
        let mut active = Vec::new();
        for (i, entry) in section.keys.iter().enumerate() {
            if entry.id.is_empty()
                || !entry
                    .id
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            {
                return Err(format!(
                    "keys[{i}].id: must be non-empty letters, digits, '-' or '_', got {}",
                    quoted(&entry.id)
                ));
            }
            if entry.secret.is_some() {
                return Err(format!(
                    "keys[{i}].secret: private keys are not kept in etcd; give the public key \
                     and keep the private one in the signing instances' secrets folder \
                     (`herdctl keys export DIR` moves them)"
                ));
            }
            let bytes = BASE64
                .decode(entry.public.trim())
                .map_err(|e| format!("keys[{i}].public: not base64 ({e})"))?;
            let public: [u8; 32] = bytes.try_into().map_err(|b: Vec<u8>| {
                format!("keys[{i}].public: must be 32 bytes, got {}", b.len())
            })?;
            let public = ed25519_dalek::VerifyingKey::from_bytes(&public)
                .map_err(|_| format!("keys[{i}].public: not an Ed25519 public key"))?;
            if keys.insert(entry.id.clone(), public).is_some() {
                return Err(format!("keys[{i}].id: duplicate id {}", quoted(&entry.id)));
            }
            if entry.active {
                active.push(entry.id.clone());
            }
        }
        match active.as_slice() {
            [one] => Ok(Self {
                active: one.clone(),
                keys,
            }),
            [] => Err("keys: exactly one key must be active, none is".into()),
            many => Err(format!(
                "keys: exactly one key must be active, {} are ({})",
                many.len(),
                many.join(", ")
            )),
        }
    }

    /// The id of the key that signs.
    pub fn active_id(&self) -> &str {
        &self.active
    }

    /// The public key of `id`.
    pub fn get(&self, id: &str) -> Option<&ed25519_dalek::VerifyingKey> {
        self.keys.get(id)
    }

    /// A ring of `(id, public key in base64)` keys, `active` signing, checked as
    /// [`KeyRing::from_section`] checks a section.
    pub fn from_public(active: &str, keys: &[(&str, String)]) -> Result<Self, String> {
        Self::from_section(&SigningKeys {
            keys: keys
                .iter()
                .map(|(id, public)| KeyEntry {
                    id: id.to_string(),
                    public: public.clone(),
                    active: *id == active,
                    secret: None,
                })
                .collect(),
        })
    }

    /// A ring of `ids` (key `i` of them the public key of the secret `[i + 1; 32]`), `active`
    /// signing, and the private keys of all of them: for tests.
    pub fn for_tests(active: &str, ids: &[&str]) -> (Self, crate::keys::SigningSecrets) {
        let secrets: Vec<(&str, [u8; 32])> = ids
            .iter()
            .enumerate()
            .map(|(i, id)| (*id, [i as u8 + 1; 32]))
            .collect();
        let public: Vec<(&str, String)> = secrets
            .iter()
            .map(|(id, secret)| (*id, crate::keys::public_of(secret)))
            .collect();
        match Self::from_public(active, &public) {
            Ok(ring) => (ring, crate::keys::SigningSecrets::from_secrets(&secrets)),
            Err(e) => panic!("a test ring: {e}"),
        }
    }
}

/// The whole configuration of the reference mesh at one revision. Each section is shared with
/// every other revision that holds the same write of it.
#[derive(Debug, Clone)]
pub struct MeshConfig {
    /// The catalog.
    pub catalog: Arc<Catalog>,
    /// Promotions (none when the key is absent).
    pub promotions: Arc<Promotions>,
    /// Tax regions.
    pub tax: Arc<Tax>,
    /// Conversion rates.
    pub fx: Arc<Fx>,
    /// Quote settings (defaults when absent).
    pub quote: Arc<QuoteSettings>,
    /// Basket limits (defaults when absent).
    pub limits: Arc<Limits>,
    /// Signing keys.
    pub keys: Arc<KeyRing>,
    /// Who may call, compiled.
    pub auth: Arc<crate::auth::Authenticator>,
}

impl ConfigModel for MeshConfig {
    fn sections() -> Vec<SectionSpec> {
        vec![
            SectionSpec::required::<Catalog>(),
            SectionSpec::defaulted::<Promotions>(),
            SectionSpec::required::<Tax>(),
            SectionSpec::required::<Fx>(),
            SectionSpec::defaulted::<QuoteSettings>(),
            SectionSpec::defaulted::<Limits>(),
            SectionSpec::required::<SigningKeys>(),
            SectionSpec::required::<crate::auth::Auth>(),
        ]
    }

    fn build(sections: &Sections) -> Result<Self, ConfigError> {
        let catalog: Arc<Catalog> = sections.get()?;
        let fx: Arc<Fx> = sections.get()?;
        if fx.base != catalog.currency {
            return Err(ConfigError::new(
                "fx",
                format!(
                    "base: must equal the catalog currency {}, got {}",
                    catalog.currency, fx.base
                ),
            ));
        }
        let keys: Arc<SigningKeys> = sections.get()?;
        let keys = KeyRing::from_section(&keys).map_err(|m| ConfigError::new("keys", m))?;
        let auth: Arc<crate::auth::Auth> = sections.get()?;
        let auth =
            crate::auth::Authenticator::new(&auth).map_err(|m| ConfigError::new("auth", m))?;
        Ok(Self {
            auth: Arc::new(auth),
            catalog,
            promotions: sections.get()?,
            tax: sections.get()?,
            fx,
            quote: sections.get()?,
            limits: sections.get()?,
            keys: Arc::new(keys),
        })
    }
}

impl MeshConfig {
    /// Checks a whole configuration given as section name → JSON (the runtime's sections
    /// included) and builds it, as an instance would.
    pub fn from_json(sections: &BTreeMap<String, Vec<u8>>) -> Result<Self, ConfigError> {
        herd::Registry::of::<Self>()
            .check_all::<Self>(sections)
            .map(|checked| checked.model)
    }

    /// The rate from the base currency to `currency`: 1 for the base itself.
    pub fn rate(&self, currency: &str) -> Option<Decimal> {
        if currency == self.fx.base {
            Some(Decimal::ONE)
        } else {
            self.fx.rates.get(currency).copied()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::demo;
    use herd::config::parse_section;

    fn demo_sections() -> BTreeMap<String, Vec<u8>> {
        demo::sections()
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.into_bytes()))
            .collect()
    }

    #[test]
    fn demo_config_is_valid() {
        let config = MeshConfig::from_json(&demo_sections()).expect("demo is valid");
        assert_eq!(config.catalog.currency, "USD");
        assert_eq!(config.keys.active_id(), "k1");
    }

    #[test]
    fn the_mesh_declares_its_sections_after_the_runtime_s() {
        let mesh = [
            "catalog",
            "promotions",
            "tax",
            "fx",
            "quote",
            "limits",
            "keys",
            "auth",
        ];
        let names = herd::Registry::of::<MeshConfig>().names();
        assert_eq!(names[..2], ["telemetry", "authz"]);
        assert_eq!(names[2..], mesh);
        // Every section of the mesh has a demo value, as has the runtime's authorization policy
        // (the reference mesh's); its optional telemetry is not seeded.
        let seeded: Vec<&str> = demo::sections().iter().map(|(name, _)| *name).collect();
        assert_eq!(seeded[0], "authz");
        assert_eq!(seeded[1..], mesh);
        let policy = demo::sections()
            .into_iter()
            .find(|(name, _)| *name == "authz");
        assert_eq!(
            policy.map(|(_, json)| json),
            Some(demo::policy("herd.local"))
        );
    }

    #[test]
    fn unknown_fields_are_errors() {
        let err =
            parse_section::<Limits>(br#"{"max_items":5,"max_quantity":5,"extra":1}"#).unwrap_err();
        assert_eq!(err.section, "limits");
        assert!(err.message.contains("extra"), "{err}");
    }

    #[test]
    fn tenant_rates_are_optional_and_positive() {
        let limits = parse_section::<Limits>(
            br#"{"max_items":5,"max_quantity":5,"tenant_rates":{"acme":200},"default_tenant_rate":50}"#,
        )
        .expect("valid");
        assert_eq!(
            (limits.tenant_rate("acme"), limits.tenant_rate("other")),
            (Some(200), Some(50))
        );
        let none = parse_section::<Limits>(br#"{"max_items":5,"max_quantity":5}"#).expect("valid");
        assert_eq!(none.tenant_rate("acme"), None);
        let err = parse_section::<Limits>(
            br#"{"max_items":5,"max_quantity":5,"tenant_rates":{"acme":0}}"#,
        )
        .unwrap_err();
        assert!(err.message.contains(r#"tenant_rates["acme"]"#), "{err}");
        let err =
            parse_section::<Limits>(br#"{"max_items":5,"max_quantity":5,"default_tenant_rate":0}"#)
                .unwrap_err();
        assert!(err.message.contains("default_tenant_rate"), "{err}");
    }

    #[test]
    fn rules_name_the_field() {
        let err = parse_section::<Tax>(br#"{"regions":{"X":{"rate_bps":10001}}}"#).unwrap_err();
        assert!(err.message.contains("regions.X.rate_bps"), "{err}");
        let err =
            parse_section::<Promotions>(br#"{"rules":[{"id":"a","sku":"s","percent_off":0}]}"#)
                .unwrap_err();
        assert!(err.message.contains("percent_off"), "{err}");
        let err = parse_section::<Promotions>(
            br#"{"rules":[{"id":"a","sku":"s","percent_off":5},{"id":"a","category":"c","percent_off":5}]}"#,
        )
        .unwrap_err();
        assert!(err.message.contains("duplicate"), "{err}");
        let err = parse_section::<Fx>(br#"{"base":"USD","rates":{"EUR":"-1"}}"#).unwrap_err();
        assert!(err.message.contains("rates.EUR"), "{err}");
        let err = parse_section::<Catalog>(
            br#"{"currency":"USD","items":{"a":{"name":"A","price_minor":-1,"category":"c"}}}"#,
        )
        .unwrap_err();
        assert!(err.message.contains("price_minor"), "{err}");
    }

    #[test]
    fn fx_base_must_be_catalog_currency() {
        let mut sections = demo_sections();
        sections.insert(
            "fx".into(),
            br#"{"base":"EUR","rates":{"USD":"1.1"}}"#.to_vec(),
        );
        let err = MeshConfig::from_json(&sections).unwrap_err();
        assert_eq!(err.section, "fx");
    }

    #[test]
    fn exactly_one_active_key() {
        let public = crate::keys::public_of(&[1; 32]);
        let two = format!(
            r#"{{"keys":[{{"id":"a","public":"{public}","active":true}},{{"id":"b","public":"{public}","active":true}}]}}"#,
        );
        assert!(
            parse_section::<SigningKeys>(two.as_bytes())
                .unwrap_err()
                .message
                .contains("exactly one")
        );
        let none = format!(r#"{{"keys":[{{"id":"a","public":"{public}"}}]}}"#);
        assert!(parse_section::<SigningKeys>(none.as_bytes()).is_err());
    }

    #[test]
    fn a_private_key_in_etcd_is_refused_naming_the_way_out() {
        let old = format!(
            r#"{{"keys":[{{"id":"k1","secret":"{}","active":true}}]}}"#,
            BASE64.encode([1u8; 32])
        );
        let err = parse_section::<SigningKeys>(old.as_bytes()).unwrap_err();
        assert!(
            err.message
                .starts_with("keys[0].secret: private keys are not kept in etcd")
                && err.message.contains("herdctl keys export"),
            "{err}"
        );
        let short = r#"{"keys":[{"id":"k1","public":"AAAA","active":true}]}"#;
        let err = parse_section::<SigningKeys>(short.as_bytes()).unwrap_err();
        assert_eq!(err.message, "keys[0].public: must be 32 bytes, got 3");
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(128))]

        /// Any bytes written to any key: every section parses or is refused, without panic.
        #[test]
        fn any_value_of_any_section_is_parsed_or_refused(
            raw in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..200),
            json in "\\{\"[a-z_]{1,12}\":(\\[|\\{|\"|-?[0-9]{1,20}|true|null)\\PC{0,40}\\}",
        ) {
            let registry = herd::Registry::of::<MeshConfig>();
            for spec in registry.specs() {
                let _ = spec.check(&raw);
                let _ = spec.check(json.as_bytes());
            }
            let mut sections = demo_sections();
            sections.insert("catalog".into(), raw.clone());
            let _ = MeshConfig::from_json(&sections);
        }
    }
}
