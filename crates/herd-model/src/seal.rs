//! The gateway's seal on what it fills into a request's context: request id, tenant, principal,
//! accepted time and pinned revision. A retry sends the returned context back so that it gets the
//! same quote; the seal lets any gateway tell that context from one a caller made up, with
//! nothing stored.
//!
//! Format: `key-id "." base64url(HMAC-SHA256(seal key, fields)[..16])`. The seal key is derived
//! from the quote signing key of that id (`SHA-256("herd.seal.v1" ‖ secret)`), so seals rotate
//! and are revoked with the signing keys, and only the instances holding the private keys (the
//! gateways) make or check them.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use herd_proto::context::RequestContext;
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

use crate::keys::{ActiveKey, SigningSecrets};
use crate::sections::KeyRing;

const DOMAIN: &[u8] = b"herd.seal.v1";
/// Bytes of the MAC kept in a seal.
const MAC_BYTES: usize = 16;

/// The seal key derived from a signing key.
pub(crate) fn derive_key(key: &ed25519_dalek::SigningKey) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(DOMAIN);
    h.update(key.to_bytes());
    h.finalize().into()
}

fn mac(key: &[u8; 32], ctx: &RequestContext) -> Option<Hmac<Sha256>> {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key).ok()?;
    for field in [&ctx.request_id, &ctx.tenant_id, &ctx.principal] {
        mac.update(&(field.len() as u64).to_be_bytes());
        mac.update(field.as_bytes());
    }
    let at = ctx.accepted_at.unwrap_or_default();
    mac.update(&at.seconds.to_be_bytes());
    mac.update(&at.nanos.to_be_bytes());
    mac.update(&ctx.config_revision.to_be_bytes());
    Some(mac)
}

/// The seal of `ctx`'s filled fields under the active key.
pub fn seal(ctx: &RequestContext, key: &ActiveKey) -> String {
    let id = &key.id;
    let tag = mac(key.secret.seal_key(), ctx)
        .map(|m| m.finalize().into_bytes())
        .unwrap_or_default();
    format!("{id}.{}", B64URL.encode(&tag[..MAC_BYTES]))
}

/// Why a context's seal does not hold.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SealError {
    /// Not `key-id.mac`.
    #[error("context.seal: malformed (expected the seal the gateway returned)")]
    Malformed,
    /// Made with a key that is no longer configured.
    #[error("context.seal: made with a key that is no longer configured; start afresh")]
    UnknownKey,
    /// The fields are not the ones sealed, or not for this caller.
    #[error(
        "context.seal: does not match this context and caller (altered, or sealed for another tenant or principal)"
    )]
    Mismatch,
}

/// Checks that `ctx.seal` seals `ctx`'s filled fields, under any key configured in `keys` whose
/// private key is among `secrets`.
pub fn check(
    ctx: &RequestContext,
    keys: &KeyRing,
    secrets: &SigningSecrets,
) -> Result<(), SealError> {
    let (id, tag) = ctx.seal.split_once('.').ok_or(SealError::Malformed)?;
    let tag = B64URL.decode(tag).map_err(|_| SealError::Malformed)?;
    if tag.len() != MAC_BYTES {
        return Err(SealError::Malformed);
    }
    let key = secrets.matching(keys, id).ok_or(SealError::UnknownKey)?;
    mac(key.seal_key(), ctx)
        .ok_or(SealError::Mismatch)?
        .verify_truncated_left(&tag)
        .map_err(|_| SealError::Mismatch)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A test ring, its private keys, and its active key.
    fn ring(active: &str, ids: &[&str]) -> (KeyRing, SigningSecrets, ActiveKey) {
        let (ring, secrets) = KeyRing::for_tests(active, ids);
        match secrets.active(&ring) {
            Ok(key) => (ring, secrets, key),
            Err(e) => panic!("{e}"),
        }
    }

    fn ctx() -> RequestContext {
        RequestContext {
            request_id: "r-1".into(),
            tenant_id: "acme".into(),
            principal: "alice".into(),
            config_revision: 7,
            accepted_at: Some(prost_types::Timestamp {
                seconds: 1_800_000_000,
                nanos: 5,
            }),
            ..Default::default()
        }
    }

    #[test]
    fn a_seal_holds_for_its_fields_only() {
        let (keys, secrets, active) = ring("k1", &["k1"]);
        let mut sealed = ctx();
        sealed.seal = seal(&sealed, &active);
        assert_eq!(check(&sealed, &keys, &secrets), Ok(()));
        assert_eq!(sealed.seal, seal(&ctx(), &active), "deterministic");
        let changes: [fn(&mut RequestContext); 5] = [
            |c| c.request_id.push('x'),
            |c| c.tenant_id = "globex".into(),
            |c| c.principal = "mallory".into(),
            |c| c.config_revision = 3,
            |c| {
                c.accepted_at = Some(prost_types::Timestamp {
                    seconds: 4_102_444_800,
                    nanos: 0,
                })
            },
        ];
        for change in changes {
            let mut altered = sealed.clone();
            change(&mut altered);
            assert_eq!(check(&altered, &keys, &secrets), Err(SealError::Mismatch));
        }
        // Fields the gateway does not fill are not sealed.
        let mut traced = sealed.clone();
        traced.idempotency_key = "k".into();
        assert_eq!(check(&traced, &keys, &secrets), Ok(()));
    }

    #[test]
    fn seals_rotate_with_the_signing_keys() {
        let (old, old_secrets, active) = ring("k1", &["k1"]);
        let mut sealed = ctx();
        sealed.seal = seal(&sealed, &active);
        let (rotated, secrets, _) = ring("k2", &["k1", "k2"]);
        assert_eq!(check(&sealed, &rotated, &secrets), Ok(()));
        // k1 removed from the section: its seals are refused, whatever files remain.
        let (only_k2, _, _) = ring("k2", &["k2"]);
        assert_eq!(
            check(&sealed, &only_k2, &secrets),
            Err(SealError::UnknownKey)
        );
        // k1 still configured but its private key gone from this instance: not checkable here.
        assert_eq!(
            check(&sealed, &old, &SigningSecrets::default()),
            Err(SealError::UnknownKey)
        );
        for junk in ["", "k1", "k1.", "k1.!!", "k1.AAAA"] {
            sealed.seal = junk.into();
            assert!(check(&sealed, &old, &old_secrets).is_err(), "{junk}");
        }
    }
}
