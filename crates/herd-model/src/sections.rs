//! The configuration sections of the reference mesh, as stored in etcd (JSON, one key each), and
//! the rules each must satisfy. Unknown fields are an error, never silently dropped.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use herd::{ConfigError, ConfigModel};
use rust_decimal::Decimal;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// A configuration section: its key name and its own rules.
pub trait Section: DeserializeOwned + Serialize {
    /// The section's name, the last part of its key (`/herd/config/<NAME>`).
    const NAME: &'static str;
    /// Checks the section's own rules, naming the field at fault.
    fn validate(&self) -> Result<(), String>;
}

/// Every section name, in the order herdctl shows them.
pub const SECTION_NAMES: &[&str] = &[
    "catalog",
    "promotions",
    "tax",
    "fx",
    "quote",
    "limits",
    "keys",
];

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

/// `/herd/config/limits`: bounds on a basket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Most lines in one request.
    pub max_items: u32,
    /// Most units on one line.
    pub max_quantity: i32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_items: 100,
            max_quantity: 10_000,
        }
    }
}

/// `/herd/config/keys`: Ed25519 signing keys for quote tokens.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Keys {
    /// The keys; exactly one is active (signs), the others still verify until removed.
    pub keys: Vec<KeyEntry>,
}

/// One signing key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyEntry {
    /// Key id, written into every token it signs.
    pub id: String,
    /// The 32-byte Ed25519 secret, base64.
    pub secret: String,
    /// Whether this key signs new tokens.
    #[serde(default)]
    pub active: bool,
}

fn is_currency_code(code: &str) -> bool {
    code.len() == 3 && code.bytes().all(|b| b.is_ascii_uppercase())
}

impl Section for Catalog {
    const NAME: &'static str = "catalog";
    fn validate(&self) -> Result<(), String> {
        if !is_currency_code(&self.currency) {
            return Err(format!(
                "currency: {:?} is not an ISO 4217 code",
                self.currency
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
    fn validate(&self) -> Result<(), String> {
        let mut ids = HashSet::new();
        for (i, rule) in self.rules.iter().enumerate() {
            if rule.id.trim().is_empty() {
                return Err(format!("rules[{i}].id: required"));
            }
            if !ids.insert(rule.id.as_str()) {
                return Err(format!("rules[{i}].id: duplicate id {:?}", rule.id));
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
    fn validate(&self) -> Result<(), String> {
        if !is_currency_code(&self.base) {
            return Err(format!("base: {:?} is not an ISO 4217 code", self.base));
        }
        for (code, rate) in &self.rates {
            if !is_currency_code(code) {
                return Err(format!("rates: {code:?} is not an ISO 4217 code"));
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
        Ok(())
    }
}

impl Section for Keys {
    const NAME: &'static str = "keys";
    fn validate(&self) -> Result<(), String> {
        KeyRing::from_section(self).map(|_| ())
    }
}

/// Signing keys ready for use.
#[derive(Clone)]
pub struct KeyRing {
    active: String,
    keys: HashMap<String, ed25519_dalek::SigningKey>,
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
    /// Decodes and checks the keys section: unique ids, 32-byte secrets, exactly one active.
    pub fn from_section(section: &Keys) -> Result<Self, String> {
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
                    "keys[{i}].id: must be non-empty letters, digits, '-' or '_', got {:?}",
                    entry.id
                ));
            }
            let bytes = BASE64
                .decode(entry.secret.trim())
                .map_err(|e| format!("keys[{i}].secret: not base64 ({e})"))?;
            let secret: [u8; 32] = bytes.try_into().map_err(|b: Vec<u8>| {
                format!("keys[{i}].secret: must be 32 bytes, got {}", b.len())
            })?;
            if keys
                .insert(
                    entry.id.clone(),
                    ed25519_dalek::SigningKey::from_bytes(&secret),
                )
                .is_some()
            {
                return Err(format!("keys[{i}].id: duplicate id {:?}", entry.id));
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

    /// The signing key of `id`.
    pub fn get(&self, id: &str) -> Option<&ed25519_dalek::SigningKey> {
        self.keys.get(id)
    }
}

/// The whole configuration of the reference mesh at one revision.
#[derive(Debug, Clone)]
pub struct MeshConfig {
    /// The catalog.
    pub catalog: Catalog,
    /// Promotions (none when the key is absent).
    pub promotions: Promotions,
    /// Tax regions.
    pub tax: Tax,
    /// Conversion rates.
    pub fx: Fx,
    /// Quote settings (defaults when absent).
    pub quote: QuoteSettings,
    /// Basket limits (defaults when absent).
    pub limits: Limits,
    /// Signing keys.
    pub keys: KeyRing,
}

/// Parses and validates one section's JSON.
pub fn parse_section<S: Section>(raw: &[u8]) -> Result<S, ConfigError> {
    let section: S = serde_json::from_slice(raw)
        .map_err(|e| ConfigError::new(S::NAME, format!("invalid JSON: {e}")))?;
    section
        .validate()
        .map_err(|m| ConfigError::new(S::NAME, m))?;
    Ok(section)
}

fn required<S: Section>(sections: &BTreeMap<String, Vec<u8>>) -> Result<S, ConfigError> {
    match sections.get(S::NAME) {
        Some(raw) => parse_section(raw),
        None => Err(ConfigError::new(S::NAME, "missing")),
    }
}

fn optional<S: Section + Default>(sections: &BTreeMap<String, Vec<u8>>) -> Result<S, ConfigError> {
    match sections.get(S::NAME) {
        Some(raw) => parse_section(raw),
        None => Ok(S::default()),
    }
}

impl ConfigModel for MeshConfig {
    fn from_sections(sections: &BTreeMap<String, Vec<u8>>) -> Result<Self, ConfigError> {
        if let Some(unknown) = sections
            .keys()
            .find(|k| !SECTION_NAMES.contains(&k.as_str()))
        {
            return Err(ConfigError::new(unknown.as_str(), "unknown section"));
        }
        // The runtime applies telemetry itself; it must still be valid for the revision to be.
        if let Some(raw) = sections.get(herd::telemetry::TelemetrySection::NAME) {
            herd::telemetry::TelemetrySection::parse(raw)
                .map_err(|m| ConfigError::new("telemetry", m))?;
        }
        let catalog: Catalog = required(sections)?;
        let fx: Fx = required(sections)?;
        if fx.base != catalog.currency {
            return Err(ConfigError::new(
                "fx",
                format!(
                    "base: must equal the catalog currency {}, got {}",
                    catalog.currency, fx.base
                ),
            ));
        }
        let keys: Keys = required(sections)?;
        let keys = KeyRing::from_section(&keys).map_err(|m| ConfigError::new("keys", m))?;
        Ok(Self {
            catalog,
            promotions: optional(sections)?,
            tax: required(sections)?,
            fx,
            quote: optional(sections)?,
            limits: optional(sections)?,
            keys,
        })
    }
}

impl MeshConfig {
    /// The rate from the base currency to `currency`: 1 for the base itself.
    pub fn rate(&self, currency: &str) -> Option<Decimal> {
        if currency == self.fx.base {
            Some(Decimal::ONE)
        } else {
            self.fx.rates.get(currency).copied()
        }
    }
}

/// Checks one section's JSON by name with its own rules (used by `herdctl config put`).
pub fn validate_section(name: &str, raw: &[u8]) -> Result<(), ConfigError> {
    match name {
        "catalog" => parse_section::<Catalog>(raw).map(|_| ()),
        "promotions" => parse_section::<Promotions>(raw).map(|_| ()),
        "tax" => parse_section::<Tax>(raw).map(|_| ()),
        "fx" => parse_section::<Fx>(raw).map(|_| ()),
        "quote" => parse_section::<QuoteSettings>(raw).map(|_| ()),
        "limits" => parse_section::<Limits>(raw).map(|_| ()),
        "keys" => parse_section::<Keys>(raw).map(|_| ()),
        "telemetry" => herd::telemetry::TelemetrySection::parse(raw)
            .map(|_| ())
            .map_err(|m| ConfigError::new("telemetry", m)),
        other => Err(ConfigError::new(
            other,
            format!("unknown section; known: {}", SECTION_NAMES.join(", ")),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::demo;

    fn demo_sections() -> BTreeMap<String, Vec<u8>> {
        demo::sections(&[7u8; 32])
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.into_bytes()))
            .collect()
    }

    #[test]
    fn demo_config_is_valid() {
        let config = MeshConfig::from_sections(&demo_sections()).expect("demo is valid");
        assert_eq!(config.catalog.currency, "USD");
        assert_eq!(config.keys.active_id(), "k1");
    }

    #[test]
    fn unknown_fields_are_errors() {
        let err =
            parse_section::<Limits>(br#"{"max_items":5,"max_quantity":5,"extra":1}"#).unwrap_err();
        assert_eq!(err.section, "limits");
        assert!(err.message.contains("extra"), "{err}");
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
        let err = MeshConfig::from_sections(&sections).unwrap_err();
        assert_eq!(err.section, "fx");
    }

    #[test]
    fn exactly_one_active_key() {
        let two = format!(
            r#"{{"keys":[{{"id":"a","secret":"{s}","active":true}},{{"id":"b","secret":"{s}","active":true}}]}}"#,
            s = BASE64.encode([1u8; 32])
        );
        assert!(
            parse_section::<Keys>(two.as_bytes())
                .unwrap_err()
                .message
                .contains("exactly one")
        );
        let none = format!(
            r#"{{"keys":[{{"id":"a","secret":"{}"}}]}}"#,
            BASE64.encode([1u8; 32])
        );
        assert!(parse_section::<Keys>(none.as_bytes()).is_err());
    }
}
