//! Per-tenant rate limits with no shared counter: `/herd/config/limits` gives each tenant a rate
//! for the whole mesh; each gateway enforces its share — the rate divided by the gateways it sees
//! registered — with a token bucket per tenant, so that callers spread over the gateways (as
//! herd's balanced callers are) get the mesh-wide rate. A call over it is `RESOURCE_EXHAUSTED`
//! naming the tenant and the rate, and is not retried.

use std::collections::HashMap;
use std::sync::Mutex;

use herd::discovery::Discovered;
use herd_model::sections::Limits;
use tokio::sync::watch;
use tokio::time::Instant;
use tonic::Status;

/// A bucket holds this many seconds' worth of its rate: short bursts pass, a sustained excess
/// does not.
const BURST_SECONDS: f64 = 0.2;
/// The most tenants with a bucket at once; beyond, buckets that are full (their tenants idle)
/// are forgotten first.
const MAX_BUCKETS: usize = 10_000;

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    updated: Instant,
}

/// This gateway's share of every tenant's rate.
#[derive(Debug, Default)]
pub struct TenantRates {
    buckets: Mutex<HashMap<String, Bucket>>,
    /// The gateways registered, this one included; none known: this one alone.
    peers: Option<watch::Receiver<Discovered>>,
}

impl TenantRates {
    /// Shares counted among the gateways `peers` lists.
    pub fn shared_with(peers: watch::Receiver<Discovered>) -> Self {
        Self {
            buckets: Mutex::new(HashMap::new()),
            peers: Some(peers),
        }
    }

    fn gateways(&self) -> usize {
        self.peers
            .as_ref()
            .and_then(|p| p.borrow().as_ref().map(|e| e.len()))
            .unwrap_or(1)
            .max(1)
    }

    /// Takes one call of `tenant` out of its bucket at `now`, or refuses it.
    pub fn admit(&self, tenant: &str, limits: &Limits, now: Instant) -> Result<(), Status> {
        let Some(rate) = limits.tenant_rate(tenant) else {
            return Ok(());
        };
        let gateways = self.gateways();
        let share = f64::from(rate) / gateways as f64;
        let burst = (share * BURST_SECONDS).max(1.0);
        let mut buckets = self
            .buckets
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if buckets.len() >= MAX_BUCKETS && !buckets.contains_key(tenant) {
            buckets.retain(|_, b| {
                b.tokens + now.saturating_duration_since(b.updated).as_secs_f64() * share < burst
            });
            if buckets.len() >= MAX_BUCKETS {
                buckets.clear();
            }
        }
        if !buckets.contains_key(tenant) {
            buckets.insert(
                tenant.to_string(),
                Bucket {
                    tokens: burst,
                    updated: now,
                },
            );
        }
        let Some(bucket) = buckets.get_mut(tenant) else {
            return Ok(());
        };
        let elapsed = now.saturating_duration_since(bucket.updated).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * share).min(burst);
        bucket.updated = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            return Ok(());
        }
        herd::metrics::refused(
            herd_proto::quote::quote_service_server::SERVICE_NAME,
            herd::metrics::Refusal::RateLimited,
        );
        Err(Status::resource_exhausted(format!(
            "tenant {}: over its rate of {rate} calls/s (this gateway's share: {share:.1}/s, one of {gateways})",
            herd::error::quoted(tenant)
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn limits(rates: &[(&str, u32)], default: Option<u32>) -> Limits {
        Limits {
            tenant_rates: rates.iter().map(|(t, r)| (t.to_string(), *r)).collect(),
            default_tenant_rate: default,
            ..Limits::default()
        }
    }

    /// Calls admitted over `seconds` of `per_second` attempts, on a clock moved by hand.
    fn admitted(
        rates: &TenantRates,
        tenant: &str,
        limits: &Limits,
        per_second: u32,
        seconds: u32,
    ) -> u32 {
        let mut now = Instant::now();
        let step = Duration::from_secs(1) / per_second;
        let mut ok = 0;
        for _ in 0..per_second * seconds {
            if rates.admit(tenant, limits, now).is_ok() {
                ok += 1;
            }
            now += step;
        }
        ok
    }

    #[test]
    fn a_tenant_gets_its_rate_and_no_more() {
        let rates = TenantRates::default();
        let limits = limits(&[("acme", 100)], None);
        let ok = admitted(&rates, "acme", &limits, 400, 10);
        assert!((1000..=1025).contains(&ok), "{ok} in 10 s at 100/s");
        // Others are not limited, or by the default.
        assert_eq!(admitted(&rates, "other", &limits, 400, 1), 400);
        let with_default = self::limits(&[("acme", 100)], Some(10));
        let ok = admitted(&TenantRates::default(), "other", &with_default, 400, 10);
        assert!((100..=103).contains(&ok), "{ok}");
        let refused = rates.admit("acme", &limits, Instant::now()).unwrap_err();
        assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
        assert!(
            refused
                .message()
                .starts_with("tenant \"acme\": over its rate of 100"),
            "{refused:?}"
        );
    }

    #[test]
    fn each_gateway_takes_its_share() {
        let peers = |n: usize| {
            let endpoints: herd::discovery::Endpoints = (0..n)
                .map(|i| herd::instance::InstanceInfo {
                    service: "gateway".into(),
                    instance_id: format!("gateway-{i}"),
                    address: format!("127.0.0.1:{}", 1000 + i),
                    pid: 0,
                    version: "test".into(),
                })
                .collect();
            watch::channel(Some(endpoints)).1
        };
        let limits = limits(&[("acme", 100)], None);
        let ok = admitted(
            &TenantRates::shared_with(peers(4)),
            "acme",
            &limits,
            400,
            10,
        );
        assert!(
            (250..=260).contains(&ok),
            "{ok} in 10 s for a quarter of 100/s"
        );
    }
}
