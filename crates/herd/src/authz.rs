//! Who may call what: per-method authorization of mesh identities, from `/herd/config/authz`.
//!
//! Over mutual TLS every caller is known by its certificate's `spiffe://` identity
//! ([`crate::tls`]). Each instance compiles the rules for its own service and checks every call at
//! the door, before the request is decoded (gRFC A43's shape):
//!
//! 1. a **deny** rule that matches the method and the caller refuses the call;
//! 2. otherwise an **allow** rule that matches lets it in;
//! 3. otherwise an internal service refuses it (no rule, no call), while a public one (the
//!    gateway, whose callers authenticate with a bearer token) lets it in.
//!
//! A refusal is `PERMISSION_DENIED` naming the caller's identity and the method. Health and
//! reflection are not subject to the policy; without TLS there are no identities and no policy.
//! The section is hot-reloaded like every other: a policy that does not validate is rejected with
//! its revision and the last good one stays in force.

use std::sync::Arc;

use arc_swap::ArcSwap;
use serde::{Deserialize, Serialize};
use tonic::Status;

use crate::config::RuntimeConfig;

/// `/herd/config/authz`: which identities may call which methods of which services. Absent, no
/// rule allows anything (internal services refuse every call made over TLS).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthzSection {
    /// Deny rules are applied first, then allow rules; their order does not matter otherwise.
    #[serde(default)]
    pub rules: Vec<Rule>,
}

/// One rule: for `service`'s `methods`, the identities it allows, or those it denies.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    /// The herd service it applies to (`pricing`), or `*` for every one.
    pub service: String,
    /// Method names (`PriceItems`), full names (`herd.pricing.v1.PricingService/PriceItems`),
    /// a whole gRPC service (`herd.pricing.v1.PricingService/*`), or `*` for every method.
    pub methods: Vec<String>,
    /// Identities let in: `spiffe://herd.local/herd/gateway`, a prefix ending in `/*`
    /// (`spiffe://herd.local/*`), or `*` for any caller with a certificate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow: Option<Vec<String>>,
    /// Identities refused, written as in `allow`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deny: Option<Vec<String>>,
}

impl crate::config::Section for AuthzSection {
    const NAME: &'static str = "authz";
    const ABOUT: &'static str =
        "which mesh identities may call which methods (deny rules, then allow rules)";

    fn validate(&self) -> Result<(), String> {
        for (i, rule) in self.rules.iter().enumerate() {
            rule.validate().map_err(|e| format!("rules[{i}].{e}"))?;
        }
        Ok(())
    }

    fn example() -> String {
        r#"{"rules":[{"service":"*","methods":["*"],"allow":["spiffe://herd.local/herd/*"]}]}"#
            .into()
    }
}

impl Rule {
    fn validate(&self) -> Result<(), String> {
        let service_ok = self.service == "*"
            || (!self.service.is_empty()
                && self
                    .service
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-'));
        if !service_ok {
            return Err(format!(
                "service: a service name (lowercase letters, digits, '-') or \"*\", got {:?}",
                self.service
            ));
        }
        if self.methods.is_empty() {
            return Err("methods: at least one (\"*\" for every method)".into());
        }
        for (i, method) in self.methods.iter().enumerate() {
            MethodMatch::parse(method).map_err(|e| format!("methods[{i}]: {e}"))?;
        }
        let (kind, identities) = match (&self.allow, &self.deny) {
            (Some(allow), None) => ("allow", allow),
            (None, Some(deny)) => ("deny", deny),
            _ => return Err("allow, deny: exactly one of the two".into()),
        };
        if identities.is_empty() {
            return Err(format!("{kind}: at least one identity"));
        }
        for (i, identity) in identities.iter().enumerate() {
            Principal::parse(identity).map_err(|e| format!("{kind}[{i}]: {e}"))?;
        }
        Ok(())
    }
}

/// Which methods a rule names.
#[derive(Debug, Clone, PartialEq)]
enum MethodMatch {
    Any,
    /// The method's own name, in whichever gRPC service.
    Name(String),
    /// `pkg.Service/Method`.
    Full(String),
    /// Every method of `pkg.Service`.
    Service(String),
}

impl MethodMatch {
    fn parse(text: &str) -> Result<Self, String> {
        let ident = |s: &str| {
            !s.is_empty()
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.')
        };
        match text.split_once('/') {
            _ if text == "*" => Ok(Self::Any),
            None if ident(text) && !text.contains('.') => Ok(Self::Name(text.into())),
            Some((service, "*")) if ident(service) => Ok(Self::Service(service.into())),
            Some((service, method)) if ident(service) && ident(method) && !method.contains('.') => {
                Ok(Self::Full(text.into()))
            }
            _ => Err(format!(
                "\"*\", a method name, pkg.Service/Method or pkg.Service/*, got {text:?}"
            )),
        }
    }

    /// Whether it names the call to `full` (`pkg.Service/Method`).
    fn matches(&self, full: &str) -> bool {
        match self {
            Self::Any => true,
            Self::Name(name) => full.rsplit_once('/').is_some_and(|(_, m)| m == name),
            Self::Full(exact) => full == exact,
            Self::Service(service) => full.split_once('/').is_some_and(|(s, _)| s == service),
        }
    }
}

/// Which callers a rule names.
#[derive(Debug, Clone, PartialEq)]
enum Principal {
    /// Any caller whose certificate names an identity.
    Any,
    Exact(String),
    /// Identities beginning with this (which ends in `/`).
    Prefix(String),
}

impl Principal {
    fn parse(text: &str) -> Result<Self, String> {
        if text == "*" {
            return Ok(Self::Any);
        }
        let Some(rest) = text.strip_prefix("spiffe://") else {
            return Err(format!("\"*\" or a spiffe:// identity, got {text:?}"));
        };
        match rest.find('*') {
            None if !rest.is_empty() => Ok(Self::Exact(text.into())),
            Some(at) if at > 0 && rest.ends_with("/*") && at == rest.len() - 1 => {
                Ok(Self::Prefix(text[..text.len() - 1].into()))
            }
            _ => Err(format!(
                "a '*' may only end an identity, after '/' (spiffe://herd.local/*), got {text:?}"
            )),
        }
    }

    fn matches(&self, identity: &str) -> bool {
        match self {
            Self::Any => true,
            Self::Exact(exact) => identity == exact,
            Self::Prefix(prefix) => identity.starts_with(prefix.as_str()),
        }
    }
}

/// One compiled rule of a service's policy.
#[derive(Debug, Clone)]
struct Compiled {
    /// Its place in the section, for the refusal's message.
    index: usize,
    deny: bool,
    methods: Vec<MethodMatch>,
    principals: Vec<Principal>,
}

/// The rules of one service, compiled: what the door checks every call against.
#[derive(Debug, Clone)]
pub struct Policy {
    /// Deny rules first.
    rules: Arc<[Compiled]>,
    /// Whether a call no rule names is let in (a public service).
    open: bool,
}

impl Policy {
    /// The rules of `section` that apply to `service`; `public` services let in what no rule
    /// names.
    pub fn compile(section: &AuthzSection, service: &str, public: bool) -> Self {
        let mut rules: Vec<Compiled> = section
            .rules
            .iter()
            .enumerate()
            .filter(|(_, rule)| rule.service == "*" || rule.service == service)
            .map(|(index, rule)| {
                let (deny, identities) = match (&rule.deny, &rule.allow) {
                    (Some(deny), _) => (true, deny.as_slice()),
                    (None, Some(allow)) => (false, allow.as_slice()),
                    (None, None) => (false, &[][..]),
                };
                Compiled {
                    index,
                    deny,
                    // A section is validated before it is compiled: nothing is dropped here.
                    methods: rule
                        .methods
                        .iter()
                        .filter_map(|m| MethodMatch::parse(m).ok())
                        .collect(),
                    principals: identities
                        .iter()
                        .filter_map(|p| Principal::parse(p).ok())
                        .collect(),
                }
            })
            .collect();
        rules.sort_by_key(|rule| !rule.deny);
        Self {
            rules: rules.into(),
            open: public,
        }
    }

    /// A policy with no rules: a public service lets every call in, an internal one none.
    pub fn empty(public: bool) -> Self {
        Self::compile(&AuthzSection::default(), "", public)
    }

    /// How many rules apply to the service.
    pub fn len(&self) -> usize {
        self.rules.len()
    }

    /// Whether no rule applies to the service.
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// Whether `identity` (`None`: a caller without a certificate) may call `path`
    /// (`/pkg.Service/Method`); `PERMISSION_DENIED` naming both if not.
    pub fn check(&self, path: &str, identity: Option<&str>) -> Result<(), Status> {
        let method = path.strip_prefix('/').unwrap_or(path);
        for rule in self.rules.iter() {
            let named = identity.is_some_and(|id| rule.principals.iter().any(|p| p.matches(id)));
            if named && rule.methods.iter().any(|m| m.matches(method)) {
                if rule.deny {
                    return Err(refused(
                        identity,
                        method,
                        &format!("rules[{}] denies it", rule.index),
                    ));
                }
                return Ok(());
            }
        }
        if self.open {
            return Ok(());
        }
        Err(refused(identity, method, "no authz rule allows it"))
    }
}

/// The policy of `service` as configuration revisions are applied from `runtime`, compiled
/// anew only when the `authz` section changes; followed for as long as the result is held.
pub fn follow(
    mut runtime: tokio::sync::watch::Receiver<RuntimeConfig>,
    service: &str,
    public: bool,
) -> Arc<ArcSwap<Policy>> {
    let mut section = runtime.borrow_and_update().authz.clone();
    let policy = Arc::new(ArcSwap::from_pointee(Policy::compile(
        &section, service, public,
    )));
    let held = Arc::downgrade(&policy);
    let service = service.to_string();
    tokio::spawn(async move {
        while runtime.changed().await.is_ok() {
            let Some(policy) = held.upgrade() else { return };
            let latest = runtime.borrow_and_update().authz.clone();
            // Unchanged sections are shared between revisions: the same value is the same Arc.
            if Arc::ptr_eq(&latest, &section) {
                continue;
            }
            section = latest;
            let compiled = Policy::compile(&section, &service, public);
            tracing::info!(
                service,
                rules = compiled.len(),
                "authorization policy applied"
            );
            policy.store(Arc::new(compiled));
        }
    });
    policy
}

fn refused(identity: Option<&str>, method: &str, why: &str) -> Status {
    let caller = identity.unwrap_or("a caller whose certificate names no spiffe:// identity");
    Status::permission_denied(format!("{caller} may not call {method}: {why}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Section, parse_section};
    use tonic::Code;

    const GATEWAY: &str = "spiffe://herd.local/herd/gateway";
    const PRICING: &str = "spiffe://herd.local/herd/pricing";
    const PRICE: &str = "/herd.pricing.v1.PricingService/PriceItems";

    fn section(json: &str) -> AuthzSection {
        match parse_section::<AuthzSection>(json.as_bytes()) {
            Ok(section) => section,
            Err(e) => panic!("{json}: {e}"),
        }
    }

    #[test]
    fn allowed_callers_get_in_and_no_rule_means_no_call() {
        let authz = section(&format!(
            r#"{{"rules":[{{"service":"pricing","methods":["*"],"allow":["{GATEWAY}"]}}]}}"#
        ));
        let pricing = Policy::compile(&authz, "pricing", false);
        assert_eq!(pricing.len(), 1);
        assert!(pricing.check(PRICE, Some(GATEWAY)).is_ok());
        let refused = pricing.check(PRICE, Some(PRICING)).err();
        let refused = refused.as_ref().map(|s| (s.code(), s.message()));
        assert_eq!(
            refused,
            Some((
                Code::PermissionDenied,
                "spiffe://herd.local/herd/pricing may not call \
                 herd.pricing.v1.PricingService/PriceItems: no authz rule allows it"
            ))
        );
        // No certificate identity at all: named, and refused.
        let anonymous = pricing
            .check(PRICE, None)
            .err()
            .map(|s| s.message().to_string());
        assert!(anonymous.is_some_and(|m| m.contains("names no spiffe:// identity")));
        // Tax has no rule: nobody calls it; a public service lets in what no rule names.
        assert!(
            Policy::compile(&authz, "tax", false)
                .check(PRICE, Some(GATEWAY))
                .is_err()
        );
        assert!(
            Policy::compile(&authz, "gateway", true)
                .check(PRICE, None)
                .is_ok()
        );
        assert!(Policy::empty(false).check(PRICE, Some(GATEWAY)).is_err());
    }

    #[test]
    fn deny_rules_come_first_whatever_their_place() {
        let authz = section(
            r#"{"rules":[
                {"service":"*","methods":["*"],"allow":["spiffe://herd.local/*"]},
                {"service":"pricing","methods":["herd.pricing.v1.PricingService/*"],
                 "deny":["spiffe://herd.local/herd/tax"]},
                {"service":"gateway","methods":["CreateQuote"],"deny":["*"]}]}"#,
        );
        let pricing = Policy::compile(&authz, "pricing", false);
        assert!(pricing.check(PRICE, Some(GATEWAY)).is_ok());
        let denied = pricing
            .check(PRICE, Some("spiffe://herd.local/herd/tax"))
            .err();
        assert!(
            denied.is_some_and(|s| s.code() == Code::PermissionDenied
                && s.message().ends_with("rules[1] denies it")),
        );
        // Another trust domain matches no prefix.
        assert!(
            pricing
                .check(PRICE, Some("spiffe://evil.example/herd/gateway"))
                .is_err()
        );
        // The gateway: any certificate is refused CreateQuote; callers without one are not named.
        let gateway = Policy::compile(&authz, "gateway", true);
        let create = "/herd.quote.v1.QuoteService/CreateQuote";
        assert!(gateway.check(create, Some(GATEWAY)).is_err());
        assert!(gateway.check(create, None).is_ok());
        assert!(
            gateway
                .check("/herd.quote.v1.QuoteService/VerifyQuote", Some(GATEWAY))
                .is_ok()
        );
    }

    #[test]
    fn methods_match_by_name_full_name_or_service() {
        for (pattern, matches) in [
            ("*", true),
            ("PriceItems", true),
            ("Price", false),
            ("herd.pricing.v1.PricingService/PriceItems", true),
            ("herd.pricing.v1.PricingService/*", true),
            ("herd.tax.v1.TaxService/*", false),
            ("herd.tax.v1.TaxService/PriceItems", false),
        ] {
            let m = MethodMatch::parse(pattern);
            assert_eq!(
                m.map(|m| m.matches("herd.pricing.v1.PricingService/PriceItems")),
                Ok(matches),
                "{pattern}"
            );
        }
    }

    #[test]
    fn a_bad_rule_is_refused_naming_its_field() {
        for (json, field) in [
            (
                r#"{"rules":[{"service":"","methods":["*"],"allow":["*"]}]}"#,
                "rules[0].service",
            ),
            (
                r#"{"rules":[{"service":"Pricing","methods":["*"],"allow":["*"]}]}"#,
                "rules[0].service",
            ),
            (
                r#"{"rules":[{"service":"tax","methods":[],"allow":["*"]}]}"#,
                "rules[0].methods",
            ),
            (
                r#"{"rules":[{"service":"tax","methods":["a/b/c"],"allow":["*"]}]}"#,
                "rules[0].methods[0]",
            ),
            (
                r#"{"rules":[{"service":"tax","methods":["*"]}]}"#,
                "rules[0].allow, deny",
            ),
            (
                r#"{"rules":[{"service":"tax","methods":["*"],"allow":["*"],"deny":["*"]}]}"#,
                "rules[0].allow, deny",
            ),
            (
                r#"{"rules":[{"service":"tax","methods":["*"],"allow":[]}]}"#,
                "rules[0].allow",
            ),
            (
                r#"{"rules":[{"service":"*","methods":["*"],"allow":["*"]},
                             {"service":"tax","methods":["*"],"deny":["gateway"]}]}"#,
                "rules[1].deny[0]",
            ),
            (
                r#"{"rules":[{"service":"tax","methods":["*"],"allow":["spiffe://herd.local/her*"]}]}"#,
                "rules[0].allow[0]",
            ),
            (
                r#"{"rules":[{"service":"tax","method":["*"],"allow":["*"]}]}"#,
                "unknown field",
            ),
        ] {
            let error = parse_section::<AuthzSection>(json.as_bytes()).err();
            let error = error.map(|e| e.to_string()).unwrap_or_default();
            assert!(error.contains(field), "{json}: {error}");
            assert!(error.starts_with("authz: "), "{error}");
        }
        assert!(parse_section::<AuthzSection>(AuthzSection::example().as_bytes()).is_ok());
    }
}
