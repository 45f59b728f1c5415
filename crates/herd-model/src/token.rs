//! Quote tokens: the quote itself, signed with the active Ed25519 key (whose private key only the
//! signing instances hold, see [`crate::keys`]). Any instance verifies a token with the public keys
//! in shared configuration; nothing is stored.
//!
//! Format: `base64url(Quote protobuf) "." key-id "." base64url(signature)`, where the signature
//! covers `herd.quote.v1.` + key-id + `.` + the encoded quote. Ed25519 signatures are deterministic,
//! so the same quote always gives the same token.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use ed25519_dalek::{Signature, Signer, Verifier};
use herd_proto::quote::Quote;
use prost::Message;
use tonic::Status;

use crate::keys::ActiveKey;
use crate::sections::KeyRing;

const DOMAIN: &[u8] = b"herd.quote.v1.";

/// Why a token was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// Not three parts, or a part that does not decode.
    #[error("token: malformed ({0})")]
    Malformed(String),
    /// Signed with a key id that is not configured (removed, or never existed).
    #[error("token: signed with unknown key {0:?}")]
    UnknownKey(String),
    /// The signature does not match: the token was altered.
    #[error("token: signature does not match; the token was altered or forged")]
    BadSignature,
    /// The quote's validity ended.
    #[error("token: quote {quote_id} expired at {expired_at} (unix seconds)")]
    Expired {
        /// The quote's id.
        quote_id: String,
        /// When it expired, unix seconds.
        expired_at: i64,
    },
}

impl From<TokenError> for Status {
    fn from(e: TokenError) -> Self {
        match e {
            TokenError::Expired { .. } => Status::failed_precondition(e.to_string()),
            _ => Status::invalid_argument(e.to_string()),
        }
    }
}

fn signed_bytes(key_id: &str, payload: &[u8]) -> Vec<u8> {
    let mut msg = Vec::with_capacity(DOMAIN.len() + key_id.len() + 1 + payload.len());
    msg.extend_from_slice(DOMAIN);
    msg.extend_from_slice(key_id.as_bytes());
    msg.push(b'.');
    msg.extend_from_slice(payload);
    msg
}

/// Signs `quote` with the active key.
pub fn sign(quote: &Quote, key: &ActiveKey) -> String {
    let key_id = key.id.as_str();
    let payload = quote.encode_to_vec();
    let signature = key
        .secret
        .signing()
        .sign(&signed_bytes(key_id, &payload))
        .to_bytes();
    format!(
        "{}.{key_id}.{}",
        B64.encode(&payload),
        B64.encode(signature)
    )
}

/// Verifies `token` and returns its quote if the signature holds and it has not expired at
/// `now_unix` seconds.
pub fn verify(token: &str, keys: &KeyRing, now_unix: i64) -> Result<Quote, TokenError> {
    let mut parts = token.trim().split('.');
    let (Some(payload), Some(key_id), Some(signature), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(TokenError::Malformed(
            "expected three dot-separated parts".into(),
        ));
    };
    let payload = B64
        .decode(payload)
        .map_err(|e| TokenError::Malformed(format!("payload is not base64url: {e}")))?;
    let signature = B64
        .decode(signature)
        .map_err(|e| TokenError::Malformed(format!("signature is not base64url: {e}")))?;
    let signature = Signature::from_slice(&signature).map_err(|_| TokenError::BadSignature)?;
    let key = keys
        .get(key_id)
        .ok_or_else(|| TokenError::UnknownKey(key_id.to_string()))?;
    key.verify(&signed_bytes(key_id, &payload), &signature)
        .map_err(|_| TokenError::BadSignature)?;
    let quote = Quote::decode(payload.as_slice())
        .map_err(|e| TokenError::Malformed(format!("payload: {e}")))?;
    let expires = quote.expires_at.as_ref().map(|t| t.seconds).unwrap_or(0);
    if now_unix >= expires {
        return Err(TokenError::Expired {
            quote_id: quote.quote_id.clone(),
            expired_at: expires,
        });
    }
    Ok(quote)
}

/// The config revision a token's quote claims, read without verifying anything. Only for choosing
/// which keys to verify with: a verifier that has not yet applied that revision may look forward to
/// it, never back.
pub fn claimed_revision(token: &str) -> Option<i64> {
    let payload = B64.decode(token.trim().split('.').next()?).ok()?;
    Some(Quote::decode(payload.as_slice()).ok()?.config_revision)
}

/// The id of the quote made for a request: derived from the tenant, the request id and the time the
/// request was accepted, so that a retry with the same context gets the same id.
pub fn quote_id(tenant_id: &str, request_id: &str, accepted_at: &prost_types::Timestamp) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(tenant_id.as_bytes());
    h.update([0]);
    h.update(request_id.as_bytes());
    h.update([0]);
    h.update(accepted_at.seconds.to_be_bytes());
    h.update(accepted_at.nanos.to_be_bytes());
    let digest = h.finalize();
    let hex: String = digest[..10].iter().map(|b| format!("{b:02x}")).collect();
    format!("q-{hex}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring(active: &str, ids: &[&str]) -> KeyRing {
        KeyRing::for_tests(active, ids).0
    }

    /// The active key of a test ring.
    fn signer(active: &str, ids: &[&str]) -> ActiveKey {
        let (ring, secrets) = KeyRing::for_tests(active, ids);
        match secrets.active(&ring) {
            Ok(key) => key,
            Err(e) => panic!("{e}"),
        }
    }

    fn quote() -> Quote {
        Quote {
            quote_id: "q-1".into(),
            tenant_id: "acme".into(),
            expires_at: Some(prost_types::Timestamp {
                seconds: 1000,
                nanos: 0,
            }),
            ..Default::default()
        }
    }

    #[test]
    fn round_trip_and_determinism() {
        let keys = ring("k1", &["k1"]);
        let t = sign(&quote(), &signer("k1", &["k1"]));
        assert_eq!(t, sign(&quote(), &signer("k1", &["k1"])));
        assert_eq!(verify(&t, &keys, 999), Ok(quote()));
    }

    #[test]
    fn refusals_say_why() {
        let keys = ring("k1", &["k1"]);
        let t = sign(&quote(), &signer("k1", &["k1"]));
        assert!(matches!(
            verify(&t, &keys, 1000),
            Err(TokenError::Expired { .. })
        ));
        let other = ring("k2", &["k2"]);
        assert_eq!(
            verify(&t, &other, 0),
            Err(TokenError::UnknownKey("k1".into()))
        );
        // Flip one character of the payload.
        let mut altered: Vec<char> = t.chars().collect();
        altered[3] = if altered[3] == 'A' { 'B' } else { 'A' };
        let altered: String = altered.into_iter().collect();
        assert!(matches!(
            verify(&altered, &keys, 0),
            Err(TokenError::BadSignature | TokenError::Malformed(_))
        ));
        assert!(matches!(
            verify("nope", &keys, 0),
            Err(TokenError::Malformed(_))
        ));
    }

    #[test]
    fn rotation_keeps_old_tokens_valid() {
        let t = sign(&quote(), &signer("k1", &["k1"]));
        let rotated = ring("k2", &["k1", "k2"]);
        assert!(verify(&t, &rotated, 0).is_ok());
        assert_eq!(rotated.active_id(), "k2");
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(256))]

        /// Any string offered as a token: no panic, and nothing verifies but a signed quote.
        #[test]
        fn any_token_is_refused_without_panic(token in "\\PC{0,200}") {
            let keys = ring("a", &["a"]);
            proptest::prop_assert!(verify(&token, &keys, 0).is_err());
            let _ = claimed_revision(&token);
        }

        /// A genuine token with any one byte changed does not verify as another quote.
        #[test]
        fn an_altered_token_never_verifies_as_another_quote(at in 0usize..400, byte in 0u8..128) {
            let keys = ring("a", &["a"]);
            let token = sign(&quote(), &signer("a", &["a"]));
            let mut bytes = token.clone().into_bytes();
            let at = at % bytes.len();
            bytes[at] = byte;
            if let Ok(altered) = String::from_utf8(bytes)
                && let Ok(q) = verify(&altered, &keys, 0)
            {
                proptest::prop_assert_eq!(q, quote());
            }
        }
    }
}
