//! Who is calling: the `auth` section (token issuers, their public keys, audience, lifetimes and
//! revocations) and the check of a caller's bearer JWT against it. Any gateway verifies any token
//! with nothing but the shared configuration; a token is revoked by removing its key or by a
//! `revoked_before` time, with no session store.
//!
//! Signatures and the standard claims are checked by `jsonwebtoken`, each key accepting only its
//! own algorithm (EdDSA for Ed25519, ES256 for P-256, RS256 for RSA); `none` and every HMAC
//! algorithm are refused before any key is looked at. herd adds what the crate does not check:
//! `iat` (required, not in the future), the maximum lifetime, revocation, and the tenant claim.

use std::collections::{BTreeMap, HashMap};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use herd::error::quoted;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, JwkSet};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Validation};
use serde::{Deserialize, Serialize};
use tonic::Status;

/// `/herd/config/auth`: who may call the mesh's public API.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Auth {
    /// The audience every token must name in `aud`.
    pub audience: String,
    /// The claim that holds the caller's tenant.
    pub tenant_claim: String,
    /// The longest a token may live, `exp − iat`, 1 to 86400 seconds.
    pub max_lifetime_seconds: u32,
    /// Clock difference tolerated on `exp`, `nbf` and `iat`, 0 to 300 seconds.
    #[serde(default = "default_leeway")]
    pub leeway_seconds: u32,
    /// The issuers trusted, each with its public keys.
    pub issuers: Vec<IssuerKeys>,
    /// Tokens issued before these times are refused.
    #[serde(default, skip_serializing_if = "Revoked::is_empty")]
    pub revoked_before: Revoked,
}

fn default_leeway() -> u32 {
    30
}

/// One trusted issuer: its `iss` value and its keys as a JWK set (RFC 7517).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IssuerKeys {
    /// The `iss` its tokens carry.
    pub issuer: String,
    /// Its public keys, each named by `kid`.
    pub jwks: JwkSet,
}

/// Revocations by time: a token of a listed subject or tenant issued (`iat`) before the time
/// given (unix seconds) is refused.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Revoked {
    /// By subject (`sub`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub subjects: BTreeMap<String, i64>,
    /// By tenant.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub tenants: BTreeMap<String, i64>,
}

impl Revoked {
    fn is_empty(&self) -> bool {
        self.subjects.is_empty() && self.tenants.is_empty()
    }
}

impl herd::Section for Auth {
    const NAME: &'static str = "auth";
    const ABOUT: &'static str =
        "who may call: token issuers and their keys, audience, lifetimes, revocations";
    fn example() -> String {
        let issuer = DevIssuer::generate();
        let auth = issuer.auth_section();
        serde_json::to_string(&auth).unwrap_or_default()
    }
    fn validate(&self) -> Result<(), String> {
        Authenticator::new(self).map(|_| ())
    }
}

/// The algorithm a key verifies, from its type and curve; the key's own `alg`, when given, must
/// agree.
fn algorithm_of(jwk: &Jwk) -> Result<Algorithm, String> {
    let (alg, name) = match &jwk.algorithm {
        AlgorithmParameters::OctetKeyPair(p) if p.curve == EllipticCurve::Ed25519 => {
            (Algorithm::EdDSA, "EdDSA")
        }
        AlgorithmParameters::EllipticCurve(p) if p.curve == EllipticCurve::P256 => {
            (Algorithm::ES256, "ES256")
        }
        AlgorithmParameters::RSA(p) => {
            let bits = B64URL.decode(&p.n).map(|n| n.len() * 8).unwrap_or(0);
            if bits < 2048 {
                return Err(format!(
                    "an RSA key must have at least 2048 bits, this one has {bits}"
                ));
            }
            (Algorithm::RS256, "RS256")
        }
        AlgorithmParameters::OctetKey(_) => {
            return Err(
                "symmetric (oct) keys are not accepted: a shared secret is not an \
                        issuer's key"
                    .into(),
            );
        }
        _ => {
            return Err("only Ed25519 (OKP), P-256 (EC) and RSA keys are accepted".into());
        }
    };
    if let Some(declared) = jwk.common.key_algorithm {
        let declared = declared.to_string();
        if declared != name {
            return Err(format!("alg: this key verifies {name}, not {declared}"));
        }
    }
    Ok(alg)
}

/// One key ready to verify: the issuer it belongs to, its algorithm and the checks it applies.
struct Key {
    algorithm: Algorithm,
    decoding: DecodingKey,
    validation: Validation,
}

/// The `auth` section compiled for verifying tokens.
pub struct Authenticator {
    keys: HashMap<String, Key>,
    tenant_claim: String,
    max_lifetime: i64,
    leeway: i64,
    revoked: Revoked,
    verified: Verified,
}

/// Tokens this authenticator verified lately. A caller presents the same token for its whole
/// life, so its signature and claims need checking once: a later call with the very same token
/// (an entry holds all of it, so nothing else matches) only checks that it has not expired since.
/// Nothing else about a verified token can change while its authenticator lives: a removed key or
/// a new revocation is a new configuration, hence a new authenticator with an empty cache.
/// Direct-mapped and fixed in size (at most [`VERIFIED_SLOTS`] tokens, by a hash seeded at
/// random), and never waited for: a slot another call holds is simply not used.
struct Verified {
    hasher: std::collections::hash_map::RandomState,
    slots: Box<[Slot]>,
}

/// One token verified, whole, and who it says the caller is.
type Slot = std::sync::Mutex<Option<(Box<str>, Identity)>>;

/// Slots of [`Verified`].
const VERIFIED_SLOTS: usize = 512;

impl Verified {
    fn new() -> Self {
        Self {
            hasher: std::collections::hash_map::RandomState::new(),
            slots: (0..VERIFIED_SLOTS)
                .map(|_| std::sync::Mutex::new(None))
                .collect(),
        }
    }

    fn slot(&self, token: &str) -> &Slot {
        use std::hash::BuildHasher;
        let at = self.hasher.hash_one(token) as usize % self.slots.len();
        &self.slots[at]
    }

    fn get(&self, token: &str) -> Option<Identity> {
        let slot = self.slot(token).try_lock().ok()?;
        match &*slot {
            Some((held, identity)) if **held == *token => Some(identity.clone()),
            _ => None,
        }
    }

    fn put(&self, token: &str, identity: &Identity) {
        if let Ok(mut slot) = self.slot(token).try_lock() {
            *slot = Some((token.into(), identity.clone()));
        }
    }
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut kids: Vec<&String> = self.keys.keys().collect();
        kids.sort();
        f.debug_struct("Authenticator")
            .field("kids", &kids)
            .field("tenant_claim", &self.tenant_claim)
            .finish_non_exhaustive()
    }
}

/// Who a verified token says the caller is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The subject (`sub`): the principal forwarded in the context.
    pub subject: String,
    /// The tenant, from the configured tenant claim.
    pub tenant: String,
    /// When the token was issued (`iat`), unix seconds.
    pub issued_at: i64,
    /// When it expires (`exp`), unix seconds.
    pub expires_at: i64,
}

/// Why a caller was not authenticated. The messages name the reason, never the token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No `authorization` metadata.
    #[error("authorization: a bearer token is required (authorization: Bearer <JWT>)")]
    Missing,
    /// `authorization` is not `Bearer <token>`.
    #[error("authorization: expected \"Bearer <JWT>\"")]
    NotBearer,
    /// Not a JWT at all.
    #[error("token: malformed ({0})")]
    Malformed(&'static str),
    /// `none` or an HMAC algorithm, or one no key uses.
    #[error("token: algorithm {0} is refused (EdDSA, ES256 and RS256 only)")]
    Algorithm(String),
    /// The header names no key.
    #[error("token: its header names no key (kid)")]
    NoKeyId,
    /// No configured issuer has a key of that id (never had, or it was removed).
    #[error("token: signed with unknown key {0}")]
    UnknownKey(String),
    /// The key named verifies another algorithm than the header says.
    #[error("token: key {kid} verifies {expected}, the token says {alg}")]
    WrongAlgorithm {
        /// The key's id, quoted.
        kid: String,
        /// What the key verifies.
        expected: String,
        /// What the header claims.
        alg: String,
    },
    /// The signature does not verify: altered or forged.
    #[error("token: the signature does not verify")]
    BadSignature,
    /// `iss` is not the issuer of the key that signed.
    #[error("token: the issuer is not the one trusted for key {0}")]
    WrongIssuer(String),
    /// `aud` does not name this audience.
    #[error("token: the audience does not include {0}")]
    WrongAudience(String),
    /// Past `exp`.
    #[error("token: expired")]
    Expired,
    /// Before `nbf`.
    #[error("token: not valid yet (nbf)")]
    NotYetValid,
    /// A claim that must be present is not, or is not of its type.
    #[error("token: claim {0} is required")]
    MissingClaim(String),
    /// `iat` later than now.
    #[error("token: issued in the future (iat)")]
    IssuedInTheFuture,
    /// `exp − iat` over the maximum.
    #[error("token: lives {lifetime} s (exp - iat), longer than the {max} s allowed")]
    TooLong {
        /// `exp − iat`.
        lifetime: i64,
        /// The maximum configured.
        max: i64,
    },
    /// The tenant claim is not an acceptable tenant id.
    #[error("token: claim {claim}: {why}")]
    BadTenant {
        /// The claim's name, quoted.
        claim: String,
        /// What is wrong with it.
        why: &'static str,
    },
    /// The subject is not an acceptable principal.
    #[error("token: claim \"sub\": {0}")]
    BadSubject(&'static str),
    /// Revoked by a `revoked_before` entry.
    #[error("token: revoked (tokens of this {what} issued before {before} are refused)")]
    Revoked {
        /// `subject` or `tenant`.
        what: &'static str,
        /// The time given, unix seconds.
        before: i64,
    },
}

impl From<AuthError> for Status {
    fn from(e: AuthError) -> Self {
        Status::unauthenticated(e.to_string())
    }
}

/// The claims herd reads itself; `jsonwebtoken` checks `exp`, `nbf`, `iss` and `aud`.
#[derive(Deserialize)]
struct Claims {
    sub: Option<serde_json::Value>,
    iat: Option<serde_json::Value>,
    exp: Option<serde_json::Value>,
    #[serde(flatten)]
    rest: serde_json::Map<String, serde_json::Value>,
}

/// A NumericDate (RFC 7519: seconds, possibly with a fraction) as whole seconds.
fn seconds(value: Option<&serde_json::Value>) -> Option<i64> {
    let n = value?.as_number()?;
    n.as_i64().or_else(|| n.as_f64().map(|f| f.floor() as i64))
}

impl Authenticator {
    /// Compiles and checks `auth`, naming the field at fault.
    pub fn new(auth: &Auth) -> Result<Self, String> {
        if auth.audience.is_empty() {
            return Err("audience: required".into());
        }
        if auth.tenant_claim.is_empty() {
            return Err("tenant_claim: required".into());
        }
        if !(1..=86_400).contains(&auth.max_lifetime_seconds) {
            return Err(format!(
                "max_lifetime_seconds: must be 1 to 86400, got {}",
                auth.max_lifetime_seconds
            ));
        }
        if auth.leeway_seconds > 300 {
            return Err(format!(
                "leeway_seconds: must be 0 to 300, got {}",
                auth.leeway_seconds
            ));
        }
        if auth.issuers.is_empty() {
            return Err("issuers: at least one issuer is required".into());
        }
        let mut keys = HashMap::new();
        for (i, issuer) in auth.issuers.iter().enumerate() {
            if issuer.issuer.is_empty() {
                return Err(format!("issuers[{i}].issuer: required"));
            }
            if issuer.jwks.keys.is_empty() {
                return Err(format!("issuers[{i}].jwks.keys: at least one key"));
            }
            for (j, jwk) in issuer.jwks.keys.iter().enumerate() {
                let at = format!("issuers[{i}].jwks.keys[{j}]");
                let kid = jwk
                    .common
                    .key_id
                    .clone()
                    .filter(|k| !k.is_empty())
                    .ok_or_else(|| format!("{at}.kid: required"))?;
                let algorithm = algorithm_of(jwk).map_err(|e| format!("{at}: {e}"))?;
                let decoding = DecodingKey::from_jwk(jwk)
                    .map_err(|e| format!("{at}: not a usable key ({e})"))?;
                let mut validation = Validation::new(algorithm);
                validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
                validation.set_issuer(&[&issuer.issuer]);
                validation.set_audience(&[&auth.audience]);
                validation.validate_nbf = true;
                validation.leeway = u64::from(auth.leeway_seconds);
                let key = Key {
                    algorithm,
                    decoding,
                    validation,
                };
                if keys.insert(kid.clone(), key).is_some() {
                    return Err(format!(
                        "{at}.kid: {} is used twice; a key id names one key of one issuer",
                        quoted(&kid)
                    ));
                }
            }
        }
        for (what, map) in [
            ("subjects", &auth.revoked_before.subjects),
            ("tenants", &auth.revoked_before.tenants),
        ] {
            if let Some((name, _)) = map.iter().find(|(name, _)| name.is_empty()) {
                return Err(format!(
                    "revoked_before.{what}: a name must not be empty, got {}",
                    quoted(name)
                ));
            }
        }
        Ok(Self {
            verified: Verified::new(),
            keys,
            tenant_claim: auth.tenant_claim.clone(),
            max_lifetime: i64::from(auth.max_lifetime_seconds),
            leeway: i64::from(auth.leeway_seconds),
            revoked: auth.revoked_before.clone(),
        })
    }

    /// Authenticates a call by its `authorization` metadata at `now` (unix seconds).
    pub fn authenticate_call(
        &self,
        metadata: &tonic::metadata::MetadataMap,
        now: i64,
    ) -> Result<Identity, AuthError> {
        let authorization = match metadata.get("authorization") {
            None => None,
            Some(value) => Some(value.to_str().map_err(|_| AuthError::NotBearer)?),
        };
        self.authenticate(authorization, now)
    }

    /// Authenticates the value of a call's `authorization` metadata at `now` (unix seconds).
    pub fn authenticate(
        &self,
        authorization: Option<&str>,
        now: i64,
    ) -> Result<Identity, AuthError> {
        let header = authorization.ok_or(AuthError::Missing)?;
        let token = header
            .strip_prefix("Bearer ")
            .or_else(|| header.strip_prefix("bearer "))
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or(AuthError::NotBearer)?;
        self.verify(token, now)
    }

    /// Verifies a token (without the `Bearer ` prefix) at `now` (unix seconds).
    pub fn verify(&self, token: &str, now: i64) -> Result<Identity, AuthError> {
        if let Some(identity) = self.verified.get(token) {
            self.unexpired(identity.expires_at, now)?;
            return Ok(identity);
        }
        let identity = self.verify_afresh(token, now)?;
        self.verified.put(token, &identity);
        Ok(identity)
    }

    /// Whether a token expiring at `expires_at` is still good at `now`, leeway included.
    fn unexpired(&self, expires_at: i64, now: i64) -> Result<(), AuthError> {
        if expires_at + self.leeway <= now {
            return Err(AuthError::Expired);
        }
        Ok(())
    }

    fn verify_afresh(&self, token: &str, now: i64) -> Result<Identity, AuthError> {
        let header = jsonwebtoken::decode_header(token).map_err(|_| refused_header(token))?;
        if matches!(
            header.alg,
            Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512
        ) {
            return Err(AuthError::Algorithm(format!("{:?}", header.alg)));
        }
        let kid = header.kid.as_deref().ok_or(AuthError::NoKeyId)?;
        let key = self
            .keys
            .get(kid)
            .ok_or_else(|| AuthError::UnknownKey(quoted(kid)))?;
        if header.alg != key.algorithm {
            return Err(AuthError::WrongAlgorithm {
                kid: quoted(kid),
                expected: format!("{:?}", key.algorithm),
                alg: format!("{:?}", header.alg),
            });
        }
        let claims = jsonwebtoken::decode::<Claims>(token, &key.decoding, &key.validation)
            .map_err(|e| refused_claims(&e, kid, &key.validation))?
            .claims;
        // jsonwebtoken checked exp against the system clock; herd's own checks use `now`.
        let expires_at =
            seconds(claims.exp.as_ref()).ok_or(AuthError::MissingClaim("\"exp\"".into()))?;
        let issued_at =
            seconds(claims.iat.as_ref()).ok_or(AuthError::MissingClaim("\"iat\"".into()))?;
        self.unexpired(expires_at, now)?;
        if issued_at > now + self.leeway {
            return Err(AuthError::IssuedInTheFuture);
        }
        let lifetime = expires_at.saturating_sub(issued_at);
        if lifetime > self.max_lifetime {
            return Err(AuthError::TooLong {
                lifetime,
                max: self.max_lifetime,
            });
        }
        let subject = match claims.sub {
            Some(serde_json::Value::String(s)) => s,
            _ => return Err(AuthError::MissingClaim("\"sub\"".into())),
        };
        check_text(&subject, herd::context::MAX_PRINCIPAL_BYTES).map_err(AuthError::BadSubject)?;
        let tenant = match claims.rest.get(&self.tenant_claim) {
            Some(serde_json::Value::String(s)) => s.clone(),
            _ => return Err(AuthError::MissingClaim(quoted(&self.tenant_claim))),
        };
        check_text(&tenant, herd::context::MAX_ID_BYTES).map_err(|why| AuthError::BadTenant {
            claim: quoted(&self.tenant_claim),
            why,
        })?;
        for (what, map, name) in [
            ("subject", &self.revoked.subjects, &subject),
            ("tenant", &self.revoked.tenants, &tenant),
        ] {
            if let Some(&before) = map.get(name.as_str())
                && issued_at < before
            {
                return Err(AuthError::Revoked { what, before });
            }
        }
        Ok(Identity {
            subject,
            tenant,
            issued_at,
            expires_at,
        })
    }
}

/// A subject or tenant as the context will carry it: non-empty, bounded, no control characters.
fn check_text(value: &str, max: usize) -> Result<(), &'static str> {
    if value.is_empty() {
        Err("must not be empty")
    } else if value.len() > max {
        Err("too long for the context")
    } else if value.chars().any(char::is_control) {
        Err("must not hold control characters")
    } else {
        Ok(())
    }
}

/// Why a header did not parse: an algorithm herd refuses (`none`, HMAC, unknown), or not a JWT.
fn refused_header(token: &str) -> AuthError {
    let Some(header) = token.split('.').next() else {
        return AuthError::Malformed("not three dot-separated parts");
    };
    let parsed = B64URL
        .decode(header)
        .ok()
        .and_then(|h| serde_json::from_slice::<serde_json::Value>(&h).ok());
    match parsed {
        None => AuthError::Malformed("the header is not base64url JSON"),
        Some(h) => match h.get("alg").and_then(|a| a.as_str()) {
            Some(alg) => AuthError::Algorithm(quoted(alg)),
            None => AuthError::Malformed("the header names no algorithm"),
        },
    }
}

/// A refusal by `jsonwebtoken` as herd says it.
fn refused_claims(
    e: &jsonwebtoken::errors::Error,
    kid: &str,
    validation: &Validation,
) -> AuthError {
    use jsonwebtoken::errors::ErrorKind as K;
    match e.kind() {
        K::InvalidSignature => AuthError::BadSignature,
        K::ExpiredSignature => AuthError::Expired,
        K::ImmatureSignature => AuthError::NotYetValid,
        K::InvalidIssuer => AuthError::WrongIssuer(quoted(kid)),
        K::InvalidAudience => AuthError::WrongAudience(
            validation
                .aud
                .iter()
                .flatten()
                .next()
                .map(|a| quoted(a))
                .unwrap_or_default(),
        ),
        K::MissingRequiredClaim(claim) | K::InvalidClaimFormat(claim) => {
            AuthError::MissingClaim(quoted(claim))
        }
        K::InvalidAlgorithm => AuthError::Algorithm("of the header".into()),
        K::Base64(_) | K::Json(_) | K::Utf8(_) | K::InvalidToken => {
            AuthError::Malformed("a part does not decode")
        }
        _ => AuthError::BadSignature,
    }
}

/// The development issuer `herdctl config seed` creates and `herdctl auth token` signs with. Its
/// private key is kept in etcd beside the configuration, readable by anyone who can read etcd:
/// for trying the mesh by hand, never for production.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DevIssuer {
    /// Says what this is wherever it is read.
    pub warning: String,
    /// Its `iss`.
    pub issuer: String,
    /// Its key's id.
    pub kid: String,
    /// Its Ed25519 private key (the 32-byte seed), base64url.
    pub private_key: String,
}

impl std::fmt::Debug for DevIssuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DevIssuer")
            .field("issuer", &self.issuer)
            .field("kid", &self.kid)
            .finish_non_exhaustive()
    }
}

/// The audience the reference mesh's gateways expect.
pub const AUDIENCE: &str = "herd";
/// The claim the reference mesh reads the tenant from.
pub const TENANT_CLAIM: &str = "tenant";
/// The development issuer's `iss`.
pub const DEV_ISSUER: &str = "https://dev.herd.local";
/// What [`DevIssuer::warning`] says.
pub const DEV_WARNING: &str =
    "development only: this private key is readable by anyone who can read etcd";

impl DevIssuer {
    /// A new issuer with a fresh Ed25519 key.
    pub fn generate() -> Self {
        Self::from_secret(rand::random())
    }

    /// The issuer whose Ed25519 secret is `secret` (tests use fixed ones).
    pub fn from_secret(secret: [u8; 32]) -> Self {
        Self {
            warning: DEV_WARNING.into(),
            issuer: DEV_ISSUER.into(),
            kid: "dev-1".into(),
            private_key: B64URL.encode(secret),
        }
    }

    fn signing_key(&self) -> Result<ed25519_dalek::SigningKey, String> {
        let secret: [u8; 32] = B64URL
            .decode(self.private_key.trim())
            .map_err(|e| format!("private_key: not base64url ({e})"))?
            .try_into()
            .map_err(|_| "private_key: not 32 bytes".to_string())?;
        Ok(ed25519_dalek::SigningKey::from_bytes(&secret))
    }

    fn encoding_key(&self) -> Result<EncodingKey, String> {
        use ed25519_dalek::pkcs8::EncodePrivateKey;
        let der = self
            .signing_key()?
            .to_pkcs8_der()
            .map_err(|e| format!("private_key: {e}"))?;
        Ok(EncodingKey::from_ed_der(der.as_bytes()))
    }

    /// Its public key as a JWK named by its kid.
    pub fn jwk(&self) -> Result<Jwk, String> {
        let public = self.signing_key()?.verifying_key();
        serde_json::from_value(serde_json::json!({
            "kty": "OKP",
            "crv": "Ed25519",
            "alg": "EdDSA",
            "use": "sig",
            "kid": self.kid,
            "x": B64URL.encode(public.as_bytes()),
        }))
        .map_err(|e| format!("jwk: {e}"))
    }

    /// An `auth` section trusting this issuer alone, with the reference mesh's audience and
    /// tenant claim, tokens living at most 15 minutes.
    pub fn auth_section(&self) -> Auth {
        Auth {
            audience: AUDIENCE.into(),
            tenant_claim: TENANT_CLAIM.into(),
            max_lifetime_seconds: 900,
            leeway_seconds: default_leeway(),
            issuers: vec![IssuerKeys {
                issuer: self.issuer.clone(),
                jwks: JwkSet {
                    keys: self.jwk().into_iter().collect(),
                },
            }],
            revoked_before: Revoked::default(),
        }
    }

    /// `claims` (any JSON object) signed as a token of this issuer's key, whatever they say:
    /// for tests of what a gateway refuses.
    pub fn sign_claims(&self, claims: &serde_json::Value) -> Result<String, String> {
        let mut header = jsonwebtoken::Header::new(Algorithm::EdDSA);
        header.kid = Some(self.kid.clone());
        jsonwebtoken::encode(&header, claims, &self.encoding_key()?)
            .map_err(|e| format!("signing: {e}"))
    }

    /// A token for `subject` of `tenant`, issued at `now` (unix seconds), living `ttl_seconds`.
    pub fn token(
        &self,
        tenant: &str,
        subject: &str,
        now: i64,
        ttl_seconds: i64,
    ) -> Result<String, String> {
        self.sign_claims(&serde_json::json!({
            "iss": self.issuer,
            "sub": subject,
            "aud": AUDIENCE,
            "iat": now,
            "exp": now.saturating_add(ttl_seconds),
            TENANT_CLAIM: tenant,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn now() -> i64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or_default()
    }

    /// A key of each kind herd accepts, with its kid and algorithm.
    fn keys() -> Vec<(EncodingKey, &'static str, Algorithm)> {
        let dev = DevIssuer::from_secret([7; 32]);
        vec![
            (dev.encoding_key().expect("valid"), "ed-1", Algorithm::EdDSA),
            (
                EncodingKey::from_ec_der(include_bytes!("../testdata/es256.pk8.der")),
                "ec-1",
                Algorithm::ES256,
            ),
            (
                EncodingKey::from_rsa_der(include_bytes!("../testdata/rs256.pk1.der")),
                "rsa-1",
                Algorithm::RS256,
            ),
        ]
    }

    fn auth() -> Auth {
        let mut ed = DevIssuer::from_secret([7; 32]);
        ed.kid = "ed-1".into();
        let jwks: Vec<Jwk> = vec![
            ed.jwk().expect("jwk"),
            serde_json::from_str(include_str!("../testdata/es256.jwk.json")).expect("jwk"),
            serde_json::from_str(include_str!("../testdata/rs256.jwk.json")).expect("jwk"),
        ];
        serde_json::from_value(json!({
            "audience": "herd",
            "tenant_claim": "tenant",
            "max_lifetime_seconds": 900,
            "leeway_seconds": 30,
            "issuers": [
                {"issuer": "https://id.example", "jwks": JwkSet { keys: jwks }},
                {"issuer": "https://other.example", "jwks": {"keys": [
                    serde_json::to_value(DevIssuer::from_secret([8; 32]).jwk().expect("jwk")).expect("json")
                ]}},
            ],
            "revoked_before": {"subjects": {"mallory": now() - 5}, "tenants": {"globex": now() - 5}},
        }))
        .expect("a valid section")
    }

    fn claims(overrides: serde_json::Value) -> serde_json::Value {
        let claims = json!({
            "iss": "https://id.example", "sub": "alice", "aud": "herd",
            "iat": now() - 10, "exp": now() + 290, "tenant": "acme",
        });
        let mut merged = claims.as_object().cloned().unwrap_or_default();
        merged.extend(overrides.as_object().cloned().unwrap_or_default());
        merged.retain(|_, v| !v.is_null());
        serde_json::Value::Object(merged)
    }

    fn sign(key: usize, claims: &serde_json::Value) -> String {
        let (key, kid, alg) = &keys()[key];
        let mut header = jsonwebtoken::Header::new(*alg);
        header.kid = Some(kid.to_string());
        jsonwebtoken::encode(&header, claims, key).expect("signed")
    }

    fn verify(token: &str) -> Result<Identity, AuthError> {
        Authenticator::new(&auth())
            .expect("valid")
            .authenticate(Some(&format!("Bearer {token}")), now())
    }

    #[test]
    fn each_kind_of_key_verifies_its_tokens() {
        for key in 0..3 {
            let identity = verify(&sign(key, &claims(json!({})))).expect("valid");
            assert_eq!(
                (identity.subject.as_str(), identity.tenant.as_str()),
                ("alice", "acme")
            );
        }
    }

    #[test]
    fn every_refusal_names_its_reason() {
        let t = now();
        let cases = [
            (json!({"exp": t - 100}), "expired"),
            (json!({"nbf": t + 100}), "not valid yet"),
            (json!({"exp": t + 1000}), "longer than the 900 s"),
            (
                json!({"iat": t + 100, "exp": t + 200}),
                "issued in the future",
            ),
            (json!({"iat": null}), "\"iat\" is required"),
            (json!({"exp": null}), "\"exp\" is required"),
            (
                json!({"aud": "other"}),
                "audience does not include \"herd\"",
            ),
            (json!({"aud": ["other", "herd"]}), ""),
            (
                json!({"iss": "https://other.example"}),
                "issuer is not the one trusted",
            ),
            (json!({"tenant": null}), "claim \"tenant\" is required"),
            (json!({"tenant": 7}), "claim \"tenant\" is required"),
            (json!({"tenant": ""}), "must not be empty"),
            (json!({"sub": null}), "\"sub\" is required"),
            (json!({"sub": "mallory"}), "revoked (tokens of this subject"),
            (
                json!({"tenant": "globex"}),
                "revoked (tokens of this tenant",
            ),
            (json!({"sub": "mallory", "iat": t + 10, "exp": t + 100}), ""),
        ];
        for (overrides, reason) in cases {
            let token = sign(0, &claims(overrides.clone()));
            match verify(&token) {
                Ok(_) => assert!(reason.is_empty(), "{overrides} was accepted"),
                Err(e) => {
                    assert!(
                        !reason.is_empty() && e.to_string().contains(reason),
                        "{overrides}: {e}"
                    );
                    let status = Status::from(e);
                    assert_eq!(status.code(), tonic::Code::Unauthenticated);
                    assert!(!status.message().contains(&token[..20]));
                }
            }
        }
    }

    #[test]
    fn none_hmac_and_algorithm_confusion_are_refused() {
        let b64 = |v: serde_json::Value| B64URL.encode(v.to_string());
        let body = b64(claims(json!({})));
        let none = format!("{}.{body}.", b64(json!({"alg": "none", "kid": "ed-1"})));
        assert_eq!(verify(&none), Err(AuthError::Algorithm("\"none\"".into())));
        // HS256 keyed with the Ed25519 key's public bytes, the classic confusion.
        let public = DevIssuer::from_secret([7; 32]).jwk().expect("jwk");
        let AlgorithmParameters::OctetKeyPair(p) = &public.algorithm else {
            panic!("an OKP key")
        };
        let secret = B64URL.decode(&p.x).expect("x");
        let mut header = jsonwebtoken::Header::new(Algorithm::HS256);
        header.kid = Some("ed-1".into());
        let hs = jsonwebtoken::encode(
            &header,
            &claims(json!({})),
            &EncodingKey::from_secret(&secret),
        )
        .expect("signed");
        assert_eq!(verify(&hs), Err(AuthError::Algorithm("HS256".into())));
        // An ES256 signature presented under the RSA key's id.
        let (key, _, _) = &keys()[1];
        let mut header = jsonwebtoken::Header::new(Algorithm::ES256);
        header.kid = Some("rsa-1".into());
        let mixed = jsonwebtoken::encode(&header, &claims(json!({})), key).expect("signed");
        assert!(matches!(
            verify(&mixed),
            Err(AuthError::WrongAlgorithm { .. })
        ));
    }

    #[test]
    fn altered_unknown_and_malformed_tokens_are_refused() {
        let token = sign(0, &claims(json!({})));
        let parts: Vec<&str> = token.split('.').collect();
        let richer = B64URL.encode(claims(json!({"tenant": "globex-rich"})).to_string());
        let altered_payload = format!("{}.{richer}.{}", parts[0], parts[2]);
        assert_eq!(verify(&altered_payload), Err(AuthError::BadSignature));
        let mut signature = B64URL.decode(parts[2]).expect("signature");
        signature[5] ^= 1;
        let altered_signature = format!("{}.{}.{}", parts[0], parts[1], B64URL.encode(signature));
        assert_eq!(verify(&altered_signature), Err(AuthError::BadSignature));

        let mut stranger = DevIssuer::from_secret([9; 32]);
        stranger.kid = "nobody".into();
        let unknown = stranger.token("acme", "alice", now(), 60).expect("signed");
        assert_eq!(
            verify(&unknown),
            Err(AuthError::UnknownKey("\"nobody\"".into()))
        );

        let a = Authenticator::new(&auth()).expect("valid");
        assert_eq!(a.authenticate(None, now()), Err(AuthError::Missing));
        assert_eq!(
            a.authenticate(Some(&format!("Basic {token}")), now()),
            Err(AuthError::NotBearer)
        );
        for junk in ["", "x", "a.b.c", "....", "eyJhbGciOiJFZERTQSJ9.e30.AAAA"] {
            assert!(a.verify(junk, now()).is_err(), "{junk}");
        }
    }

    #[test]
    fn the_section_refuses_keys_it_cannot_trust() {
        let with_key = |key: serde_json::Value| {
            let mut auth = serde_json::to_value(auth()).expect("json");
            auth["issuers"][1]["jwks"]["keys"] = json!([key]);
            serde_json::from_value::<Auth>(auth)
                .map_err(|e| e.to_string())
                .and_then(|a| Authenticator::new(&a).map(|_| ()))
        };
        let oct = with_key(json!({"kty": "oct", "kid": "s", "k": "c2VjcmV0"}));
        assert!(oct.unwrap_err().contains("symmetric"));
        let dup =
            with_key(serde_json::to_value(auth().issuers[0].jwks.keys[0].clone()).expect("json"));
        assert!(dup.unwrap_err().contains("used twice"));
        let mut ed = serde_json::to_value(DevIssuer::from_secret([3; 32]).jwk().expect("jwk"))
            .expect("json");
        ed["alg"] = json!("ES256");
        assert!(
            with_key(ed.clone())
                .unwrap_err()
                .contains("verifies EdDSA, not ES256")
        );
        ed["alg"] = json!("EdDSA");
        ed["kid"] = json!(null);
        assert!(with_key(ed).unwrap_err().contains("kid: required"));
        let short = with_key(
            json!({"kty": "RSA", "kid": "r", "n": B64URL.encode([0xffu8; 128]), "e": "AQAB"}),
        );
        assert!(short.unwrap_err().contains("2048 bits"));
        let mut auth = auth();
        auth.max_lifetime_seconds = 0;
        assert!(
            Authenticator::new(&auth)
                .unwrap_err()
                .contains("max_lifetime_seconds")
        );
    }

    #[test]
    fn the_development_issuer_mints_what_its_section_accepts() {
        let dev = DevIssuer::generate();
        let a = Authenticator::new(&dev.auth_section()).expect("valid");
        let token = dev.token("acme", "alice", now(), 300).expect("signed");
        let identity = a.verify(&token, now()).expect("valid");
        assert_eq!(identity.tenant, "acme");
        assert_eq!(identity.expires_at - identity.issued_at, 300);
        let long = dev.token("acme", "alice", now(), 901).expect("signed");
        assert!(matches!(
            a.verify(&long, now()),
            Err(AuthError::TooLong { .. })
        ));
        // The stored form round-trips.
        let stored: DevIssuer =
            serde_json::from_str(&serde_json::to_string(&dev).expect("json")).expect("parse");
        assert_eq!(stored.jwk(), dev.jwk());
    }

    #[test]
    fn a_token_verified_once_is_recognised_until_it_expires() {
        let a = Authenticator::new(&auth()).expect("valid");
        let t = now();
        let token = sign(0, &claims(json!({"iat": t - 10, "exp": t + 100})));
        let first = a.verify(&token, t).expect("valid");
        assert_eq!(a.verified.get(&token), Some(first.clone()));
        assert_eq!(a.verify(&token, t + 50), Ok(first));
        // Expired since (leeway included): refused, from the cache as afresh.
        assert_eq!(a.verify(&token, t + 131), Err(AuthError::Expired));
        // Another token in the same slot is not taken for it.
        let mut other = token.clone();
        other.push('x');
        assert!(a.verify(&other, t).is_err());
        assert_eq!(a.verified.get(&other), None);
        // A new configuration (a revocation) starts with nothing verified.
        let mut revoking = auth();
        revoking.revoked_before.subjects.insert("alice".into(), t);
        let b = Authenticator::new(&revoking).expect("valid");
        assert!(matches!(
            b.verify(&token, t),
            Err(AuthError::Revoked { .. })
        ));
    }

    /// What a token costs a gateway, first seen and then again: `cargo test --release -p
    /// herd-model measure_verification -- --ignored --nocapture` (figures in BENCHMARKS.md).
    #[test]
    #[ignore = "a measurement, not a check"]
    fn measure_verification() {
        let a = Authenticator::new(&auth()).expect("valid");
        let t = now();
        for (key, name) in [(0, "EdDSA"), (1, "ES256"), (2, "RS256")] {
            let tokens: Vec<String> = (0..200)
                .map(|i| sign(key, &claims(json!({"sub": format!("user-{i}")}))))
                .collect();
            let started = std::time::Instant::now();
            for token in &tokens {
                a.verify_afresh(token, t).expect("valid");
            }
            let afresh = started.elapsed() / tokens.len() as u32;
            a.verify(&tokens[0], t).expect("valid");
            let started = std::time::Instant::now();
            for _ in 0..100_000 {
                a.verify(&tokens[0], t).expect("valid");
            }
            let cached = started.elapsed() / 100_000;
            println!("REPORT {name}: verified afresh {afresh:?}, recognised {cached:?}");
        }
    }
}
