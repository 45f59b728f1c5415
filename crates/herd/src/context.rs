//! Request contexts and deadlines: what travels with every call.
//!
//! Every hop reads the caller's `grpc-timeout` into a [`Deadline`], refuses work whose deadline has
//! passed, and forwards the remaining time on each outgoing call (never the incoming metadata).

use std::time::Duration;

use herd_proto::context::RequestContext;
use tokio::time::Instant;
use tonic::metadata::MetadataMap;

use crate::error::{ContextError, Expired};

/// The point in time by which a call must be answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Deadline(Instant);

impl Deadline {
    /// The deadline `timeout` from now.
    pub fn after(timeout: Duration) -> Self {
        Self(Instant::now() + timeout)
    }

    /// The caller's deadline from its `grpc-timeout` header, or `default` from now without one.
    pub fn from_metadata(metadata: &MetadataMap, default: Duration) -> Self {
        let timeout = metadata
            .get("grpc-timeout")
            .and_then(|v| v.to_str().ok())
            .and_then(parse_grpc_timeout)
            .unwrap_or(default);
        Self::after(timeout)
    }

    /// Time left, or [`Expired`] (`DEADLINE_EXCEEDED`) when none is.
    pub fn remaining(&self) -> Result<Duration, Expired> {
        let left = self.0.saturating_duration_since(Instant::now());
        if left.is_zero() {
            Err(Expired)
        } else {
            Ok(left)
        }
    }
}

/// Parses a `grpc-timeout` value: up to 8 digits and a unit (H, M, S, m, u, n).
pub fn parse_grpc_timeout(value: &str) -> Option<Duration> {
    if value.len() < 2 || value.len() > 9 {
        return None;
    }
    let (digits, unit) = value.split_at(value.len() - 1);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.checked_mul(3600)?),
        "M" => Duration::from_secs(n.checked_mul(60)?),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// The context of a request, or what is missing from it (`INVALID_ARGUMENT` naming the field).
pub fn require(context: Option<&RequestContext>) -> Result<&RequestContext, ContextError> {
    let ctx = context.ok_or(ContextError::Missing)?;
    if ctx.tenant_id.trim().is_empty() {
        return Err(ContextError::NoTenant);
    }
    Ok(ctx)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_grpc_timeouts() {
        assert_eq!(parse_grpc_timeout("100m"), Some(Duration::from_millis(100)));
        assert_eq!(parse_grpc_timeout("2S"), Some(Duration::from_secs(2)));
        assert_eq!(parse_grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_grpc_timeout("5"), None);
        assert_eq!(parse_grpc_timeout("123456789S"), None);
        assert_eq!(parse_grpc_timeout("10x"), None);
    }

    #[test]
    fn context_needs_a_tenant() {
        assert_eq!(require(None).unwrap_err().to_string(), "context: required");
        let ctx = RequestContext::default();
        assert!(
            require(Some(&ctx))
                .unwrap_err()
                .to_string()
                .contains("context.tenant_id")
        );
    }
}
