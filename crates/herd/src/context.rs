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
        Self::from_headers(metadata.as_ref()).unwrap_or_else(|| Self::after(default))
    }

    /// The deadline a request's `grpc-timeout` header gives, if it has a well-formed one.
    pub fn from_headers(headers: &http::HeaderMap) -> Option<Self> {
        headers
            .get(GRPC_TIMEOUT)
            .and_then(|v| v.to_str().ok())
            .and_then(parse_grpc_timeout)
            .map(Self::after)
    }

    /// The point in time itself.
    pub(crate) fn instant(&self) -> Instant {
        self.0
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

/// The deadline's header, its name made once (a name given as a string is parsed on every use).
pub(crate) const GRPC_TIMEOUT: http::HeaderName = http::HeaderName::from_static("grpc-timeout");

/// The `grpc-timeout` value for `left`: whole milliseconds, at least 1, at most 8 digits.
///
/// Sent never indexed: it differs on almost every call, so in HPACK's dynamic table it would
/// only push out the headers that do repeat, and every later call's lookup of the name would
/// compare its value against each one stored. (Each connection sends its first one indexed, so
/// that the name is in the table: see `client::connection`.)
pub(crate) fn grpc_timeout(left: Duration) -> http::HeaderValue {
    let millis = left.as_millis().clamp(1, 99_999_999);
    // Cannot fail: digits and a letter.
    let mut value = http::HeaderValue::from_str(&format!("{millis}m"))
        .unwrap_or_else(|_| http::HeaderValue::from_static("1m"));
    value.set_sensitive(true);
    value
}

/// Parses a `grpc-timeout` value: up to 8 digits and a unit (H, M, S, m, u, n).
pub fn parse_grpc_timeout(value: &str) -> Option<Duration> {
    if value.len() < 2 || value.len() > 9 || !value.is_ascii() {
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

/// The most bytes of `request_id`, `tenant_id` and `idempotency_key`.
pub const MAX_ID_BYTES: usize = 128;
/// The most bytes of `principal`.
pub const MAX_PRINCIPAL_BYTES: usize = 256;
/// The most bytes of `trace.tracestate` (W3C: at most 32 list members).
pub const MAX_TRACESTATE_BYTES: usize = 512;
/// The most `baggage` entries...
pub const MAX_BAGGAGE_ENTRIES: usize = 64;
/// ...and the most bytes of their keys and values together.
pub const MAX_BAGGAGE_BYTES: usize = 8192;

/// The context of a request, checked against every bound (see `context.proto`): present, with a
/// tenant, every id within [`MAX_ID_BYTES`] and free of control characters, the trace context
/// in W3C format, the baggage within [`MAX_BAGGAGE_ENTRIES`] and [`MAX_BAGGAGE_BYTES`]. A
/// violation is `INVALID_ARGUMENT` naming the field and the bound. Every hop checks it, so no
/// field travels further than the first instance that receives it.
pub fn require(context: Option<&RequestContext>) -> Result<&RequestContext, ContextError> {
    let ctx = context.ok_or(ContextError::Missing)?;
    if ctx.tenant_id.trim().is_empty() {
        return Err(ContextError::NoTenant);
    }
    text("tenant_id", &ctx.tenant_id, MAX_ID_BYTES)?;
    text("request_id", &ctx.request_id, MAX_ID_BYTES)?;
    text("idempotency_key", &ctx.idempotency_key, MAX_ID_BYTES)?;
    text("principal", &ctx.principal, MAX_PRINCIPAL_BYTES)?;
    text("seal", &ctx.seal, MAX_ID_BYTES)?;
    if ctx.config_revision < 0 {
        return Err(invalid(
            "config_revision",
            format!("must not be negative, got {}", ctx.config_revision),
        ));
    }
    if let Some(trace) = &ctx.trace {
        if !trace.traceparent.is_empty() && !valid_traceparent(&trace.traceparent) {
            return Err(invalid(
                "trace.traceparent",
                "not a W3C traceparent (00-<32 hex>-<16 hex>-<2 hex>)".into(),
            ));
        }
        if !valid_tracestate(&trace.tracestate) {
            return Err(invalid(
                "trace.tracestate",
                format!(
                    "at most {MAX_TRACESTATE_BYTES} bytes of printable ASCII in at most 32 members"
                ),
            ));
        }
    }
    if ctx.baggage.len() > MAX_BAGGAGE_ENTRIES {
        return Err(invalid(
            "baggage",
            format!(
                "at most {MAX_BAGGAGE_ENTRIES} entries, got {}",
                ctx.baggage.len()
            ),
        ));
    }
    let bytes: usize = ctx.baggage.iter().map(|(k, v)| k.len() + v.len()).sum();
    if bytes > MAX_BAGGAGE_BYTES {
        return Err(invalid(
            "baggage",
            format!("at most {MAX_BAGGAGE_BYTES} bytes of keys and values, got {bytes}"),
        ));
    }
    Ok(ctx)
}

fn invalid(field: &'static str, reason: String) -> ContextError {
    ContextError::Invalid { field, reason }
}

/// A text field of at most `max` bytes with no control characters.
fn text(field: &'static str, value: &str, max: usize) -> Result<(), ContextError> {
    if value.len() > max {
        return Err(invalid(
            field,
            format!("at most {max} bytes, got {}", value.len()),
        ));
    }
    // Every hop checks every field of every call: ASCII, the usual case, byte by byte.
    let control = if value.is_ascii() {
        value.bytes().any(|b| b.is_ascii_control())
    } else {
        value.chars().any(char::is_control)
    };
    if control {
        return Err(invalid(field, "must not hold control characters".into()));
    }
    Ok(())
}

/// The length of a W3C `traceparent` of version 00.
pub const TRACEPARENT_LEN: usize = 55;

/// Whether `value` is a W3C `traceparent` of version 00: `00-<trace id>-<parent id>-<flags>`, in
/// lowercase hex, neither id all zeros.
pub fn valid_traceparent(value: &str) -> bool {
    parse_traceparent(value).is_some()
}

/// The trace id, parent id and flags of a W3C `traceparent` of version 00 (see
/// [`valid_traceparent`]), as text or as the bytes of a header, eight digits at a time: every
/// hop reads one per call, sampled or not.
pub fn parse_traceparent(value: impl AsRef<[u8]>) -> Option<(u128, u64, u8)> {
    let b: &[u8; TRACEPARENT_LEN] = value.as_ref().try_into().ok()?;
    if !b.starts_with(b"00-") || b[35] != b'-' || b[52] != b'-' {
        return None;
    }
    let word = |at: usize| {
        let mut digits = [0u8; 8];
        digits.copy_from_slice(&b[at..at + 8]);
        hex8(u64::from_le_bytes(digits))
    };
    let ((t0, b0), (t1, b1), (t2, b2), (t3, b3)) = (word(3), word(11), word(19), word(27));
    let ((p0, b4), (p1, b5)) = (word(36), word(44));
    let (flags, b6) = hex8(u64::from_le_bytes([
        b'0', b'0', b'0', b'0', b'0', b'0', b[53], b[54],
    ]));
    if b0 | b1 | b2 | b3 | b4 | b5 | b6 != 0 {
        return None;
    }
    let trace = u128::from(t0) << 96 | u128::from(t1) << 64 | u128::from(t2) << 32 | u128::from(t3);
    let parent = u64::from(p0) << 32 | u64::from(p1);
    (trace != 0 && parent != 0).then_some((trace, parent, flags as u8))
}

/// The W3C `traceparent` (version 00) of a trace id, parent id and flags: the inverse of
/// [`parse_traceparent`], written without the formatting machinery (the gateway makes one for
/// every call it starts a trace for, sampled or not).
pub fn format_traceparent(trace: u128, parent: u64, flags: u8) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = [0u8; TRACEPARENT_LEN];
    out[..3].copy_from_slice(b"00-");
    out[35] = b'-';
    out[52] = b'-';
    let mut put = |at: usize, width: usize, value: u128| {
        for i in 0..width {
            out[at + i] = DIGITS[((value >> (4 * (width - 1 - i))) & 0xf) as usize];
        }
    };
    put(3, 32, trace);
    put(36, 16, u128::from(parent));
    put(53, 2, u128::from(flags));
    // Cannot fail: every byte is ASCII.
    String::from_utf8(out.to_vec()).unwrap_or_default()
}

/// The value of eight lowercase hex digits (`x`, the first in the least significant byte), all
/// eight checked and converted at once (about twenty operations, no table and no branch), and
/// a mask that is not zero if any of them is not such a digit.
#[inline(always)]
fn hex8(x: u64) -> (u32, u64) {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = ONES * 0x80;
    // For a byte below 0x80, adding `0x80 - low` sets its high bit exactly when it is at least
    // `low`, adding `0x7f - high` leaves its high bit clear exactly when it is at most `high`,
    // and no carry crosses into the next byte. (A byte of 0x80 or more is bad whatever else.)
    let at_least = |low: u8| x.wrapping_add(ONES * u64::from(0x80 - low)) & HIGH;
    let at_most = |high: u8| !x.wrapping_add(ONES * u64::from(0x7f - high)) & HIGH;
    let digit = at_least(b'0') & at_most(b'9');
    let letter = at_least(b'a') & at_most(b'f');
    let bad = x & HIGH | (digit | letter) ^ HIGH;
    // '0'..'9' are 0x30..0x39 and 'a'..'f' are 0x61..0x66: the low four bits, plus 9 for a letter.
    let nibbles = (x & (ONES * 0x0f)) + (letter >> 7) * 9;
    // Gather the nibbles, the first most significant: pairs into bytes, bytes into 16 bits,
    // then into 32.
    let bytes = (nibbles << 4 | nibbles >> 8) & 0x00ff_00ff_00ff_00ff;
    let halves = (bytes << 8 | bytes >> 16) & 0x0000_ffff_0000_ffff;
    ((halves << 16 | halves >> 32) as u32, bad)
}

/// Whether `value` is a `tracestate` herd forwards: at most [`MAX_TRACESTATE_BYTES`] bytes of
/// printable ASCII in at most 32 comma-separated members.
pub fn valid_tracestate(value: &str) -> bool {
    value.len() <= MAX_TRACESTATE_BYTES
        && value.bytes().all(|b| (0x20..0x7f).contains(&b))
        && value.split(',').count() <= 32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_time_left_goes_as_grpc_timeout_in_milliseconds_never_indexed() {
        for (left, sent) in [
            (Duration::from_millis(1500), "1500m"),
            (Duration::from_micros(10), "1m"),
            (Duration::from_secs(10_000_000), "99999999m"),
        ] {
            let value = grpc_timeout(left);
            assert_eq!(value, sent);
            assert!(value.is_sensitive(), "kept out of HPACK's dynamic table");
        }
    }

    #[test]
    fn parses_grpc_timeouts() {
        assert_eq!(parse_grpc_timeout("100m"), Some(Duration::from_millis(100)));
        assert_eq!(parse_grpc_timeout("2S"), Some(Duration::from_secs(2)));
        assert_eq!(parse_grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_grpc_timeout("5"), None);
        assert_eq!(parse_grpc_timeout("123456789S"), None);
        assert_eq!(parse_grpc_timeout("10x"), None);
    }

    fn tenant(id: &str) -> RequestContext {
        RequestContext {
            tenant_id: id.into(),
            ..Default::default()
        }
    }

    #[test]
    fn every_field_has_a_bound_named_when_broken() {
        assert!(require(Some(&tenant("acme"))).is_ok());
        let refused = |ctx: RequestContext| require(Some(&ctx)).unwrap_err().to_string();
        assert_eq!(
            refused(tenant(&"t".repeat(129))),
            "context.tenant_id: at most 128 bytes, got 129"
        );
        let mut ctx = tenant("acme");
        ctx.request_id = "a\nb".into();
        assert_eq!(
            refused(ctx),
            "context.request_id: must not hold control characters"
        );
        let mut ctx = tenant("acme");
        ctx.principal = "p".repeat(257);
        assert!(refused(ctx).starts_with("context.principal: at most 256 bytes"));
        let mut ctx = tenant("acme");
        ctx.baggage = (0..65).map(|i| (i.to_string(), String::new())).collect();
        assert_eq!(refused(ctx), "context.baggage: at most 64 entries, got 65");
        let mut ctx = tenant("acme");
        ctx.baggage.insert("k".into(), "v".repeat(9000));
        assert!(refused(ctx).starts_with("context.baggage: at most 8192 bytes"));
        let mut ctx = tenant("acme");
        ctx.config_revision = -1;
        assert!(refused(ctx).starts_with("context.config_revision"));
        let mut ctx = tenant("acme");
        ctx.trace = Some(herd_proto::context::TraceContext {
            traceparent: "x".repeat(100_000),
            tracestate: String::new(),
        });
        assert!(refused(ctx).starts_with("context.trace.traceparent: not a W3C traceparent"));
    }

    #[test]
    fn traceparents_are_w3c_or_refused() {
        let good = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        assert!(valid_traceparent(good));
        assert_eq!(
            parse_traceparent(good),
            Some((0x4bf92f3577b34da6a3ce929d0e0e4736, 0x00f067aa0ba902b7, 1))
        );
        assert_eq!(
            parse_traceparent("00-ffffffffffffffffffffffffffffffff-ffffffffffffffff-ff"),
            Some((u128::MAX, u64::MAX, 0xff))
        );
        for (trace, parent, flags) in [
            (0x4bf92f3577b34da6a3ce929d0e0e4736, 0x00f067aa0ba902b7, 1),
            (1, 1, 0),
            (u128::MAX, u64::MAX, 0xff),
        ] {
            let written = format_traceparent(trace, parent, flags);
            let formatted = format!("00-{trace:032x}-{parent:016x}-{flags:02x}");
            assert_eq!(written, formatted);
            assert_eq!(parse_traceparent(&written), Some((trace, parent, flags)));
        }
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736x00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473é-00f067aa0ba902b7-0",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0g",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7+01",
        ] {
            assert!(!valid_traceparent(bad), "{bad}");
        }
        assert!(valid_tracestate("rojo=00f067aa0ba902b7,congo=t61rcWkgMzE"));
        assert!(!valid_tracestate(&"a=b,".repeat(40)));
        assert!(!valid_tracestate("a=\u{7f}"));
    }

    /// The plain reading of a `traceparent`, for comparison: split, then each part parsed alone.
    fn plain_parse(value: &str) -> Option<(u128, u64, u8)> {
        let parts: Vec<&str> = value.split('-').collect();
        let hex = |s: &str, len: usize| {
            (s.len() == len && s.bytes().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f')))
                .then(|| u128::from_str_radix(s, 16).ok())
                .flatten()
        };
        let [version, trace, parent, flags] = parts[..] else {
            return None;
        };
        let (trace, parent, flags) = (hex(trace, 32)?, hex(parent, 16)?, hex(flags, 2)?);
        (version == "00" && trace != 0 && parent != 0).then_some((
            trace,
            parent as u64,
            flags as u8,
        ))
    }

    #[test]
    #[ignore = "a measurement: cargo test --release -p herd measure_traceparent_parse -- --ignored"]
    fn measure_traceparent_parse() {
        let values: Vec<String> = (1..=1000u64)
            .map(|i| format_traceparent(u128::from(i) << 64 | u128::from(i), i, 1))
            .collect();
        let started = std::time::Instant::now();
        let mut sum = 0u64;
        for _ in 0..1000 {
            for value in &values {
                sum = sum.wrapping_add(
                    std::hint::black_box(parse_traceparent(value)).map_or(0, |p| p.1),
                );
            }
        }
        println!(
            "REPORT {:?} per parse ({sum})",
            started.elapsed() / 1_000_000
        );
    }

    #[test]
    fn a_traceparent_with_any_one_byte_changed_reads_as_the_plain_parse_reads_it() {
        let good = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        for at in 0..good.len() {
            for byte in 0..=255u8 {
                let mut bytes = good.as_bytes().to_vec();
                bytes[at] = byte;
                let Ok(value) = String::from_utf8(bytes) else {
                    continue;
                };
                assert_eq!(parse_traceparent(&value), plain_parse(&value), "{value:?}");
            }
        }
        for digits in ["0123456789abcdef", "fedcba9876543210", "0000000000000001"] {
            let value = format!("00-{digits}{digits}-{digits}-a9");
            assert_eq!(parse_traceparent(&value), plain_parse(&value), "{value}");
            assert!(parse_traceparent(&value).is_some());
        }
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

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(256))]

        /// Any context: no panic, and what is accepted is within every bound.
        #[test]
        fn any_context_is_judged_and_what_passes_is_bounded(
            tenant in "\\PC{0,140}",
            request_id in ".{0,140}",
            principal in ".{0,300}",
            traceparent in "[0-9a-f-]{0,60}",
            tracestate in ".{0,600}",
            baggage in proptest::collection::btree_map(".{0,20}", ".{0,200}", 0..70),
            revision in -2i64..3,
        ) {
            let ctx = RequestContext {
                tenant_id: tenant,
                request_id,
                principal,
                config_revision: revision,
                trace: Some(herd_proto::context::TraceContext { traceparent, tracestate }),
                baggage: baggage.into_iter().collect(),
                ..Default::default()
            };
            if let Ok(ctx) = require(Some(&ctx)) {
                proptest::prop_assert!(ctx.tenant_id.len() <= MAX_ID_BYTES && !ctx.tenant_id.trim().is_empty());
                proptest::prop_assert!(ctx.request_id.len() <= MAX_ID_BYTES);
                proptest::prop_assert!(ctx.principal.len() <= MAX_PRINCIPAL_BYTES);
                proptest::prop_assert!(ctx.baggage.len() <= MAX_BAGGAGE_ENTRIES);
                proptest::prop_assert!(ctx.config_revision >= 0);
                let trace = ctx.trace.as_ref().map(|t| (t.traceparent.as_str(), t.tracestate.as_str()));
                if let Some((parent, state)) = trace {
                    proptest::prop_assert!(parent.is_empty() || valid_traceparent(parent));
                    proptest::prop_assert!(state.len() <= MAX_TRACESTATE_BYTES);
                }
            }
        }

        /// Any grpc-timeout: no panic, and only digits and a unit are read.
        #[test]
        fn any_grpc_timeout_is_parsed_or_refused(value in "\\PC{0,12}") {
            if parse_grpc_timeout(&value).is_some() {
                let (digits, unit) = value.split_at(value.len() - 1);
                proptest::prop_assert!(digits.bytes().all(|b| b.is_ascii_digit()));
                proptest::prop_assert!(["H", "M", "S", "m", "u", "n"].contains(&unit));
            }
        }
    }
}
