//! Head sampling: the share of new traces sampled, from the environment at start and from
//! `/herd/config/telemetry` at run time.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

use crate::config::RuntimeConfig;

/// `/herd/config/telemetry`: telemetry settings shared by every instance.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TelemetrySection {
    /// The share of new traces that are sampled, 0 to 1. Calls that arrive with a sampled
    /// parent are always sampled (parent-based).
    pub sampling_ratio: f64,
}

impl crate::config::Section for TelemetrySection {
    const NAME: &'static str = "telemetry";
    const ABOUT: &'static str = "the share of new traces sampled, changed at run time";

    fn validate(&self) -> Result<(), String> {
        if !(0.0..=1.0).contains(&self.sampling_ratio) {
            return Err(format!(
                "sampling_ratio: must be 0 to 1, got {}",
                self.sampling_ratio
            ));
        }
        Ok(())
    }

    fn example() -> String {
        r#"{"sampling_ratio":0.01}"#.into()
    }
}

/// The sampling ratio in force, shared with the sampler; changing it takes effect for the next
/// trace.
#[derive(Debug, Clone)]
pub struct SamplingRatio {
    current: Arc<AtomicU64>,
    /// The ratio the process started with, in force while no configuration sets one.
    initial: f64,
}

impl SamplingRatio {
    pub(super) fn new(ratio: f64) -> Self {
        let ratio = ratio.clamp(0.0, 1.0);
        Self {
            current: Arc::new(AtomicU64::new(ratio.to_bits())),
            initial: ratio,
        }
    }

    /// The ratio in force.
    pub fn get(&self) -> f64 {
        f64::from_bits(self.current.load(Ordering::Relaxed))
    }

    /// Sets the ratio, clamped to 0..=1.
    pub fn set(&self, ratio: f64) {
        self.current
            .store(ratio.clamp(0.0, 1.0).to_bits(), Ordering::Relaxed);
    }

    /// The initial ratio from `OTEL_TRACES_SAMPLER` / `OTEL_TRACES_SAMPLER_ARG` (default 1).
    pub(super) fn from_env() -> Self {
        let sampler = std::env::var("OTEL_TRACES_SAMPLER").unwrap_or_default();
        let arg = std::env::var("OTEL_TRACES_SAMPLER_ARG")
            .ok()
            .and_then(|a| a.parse::<f64>().ok());
        let ratio = match sampler.as_str() {
            "always_off" | "parentbased_always_off" => 0.0,
            "traceidratio" | "parentbased_traceidratio" => arg.unwrap_or(1.0),
            _ => 1.0,
        };
        Self::new(ratio)
    }
}

/// Puts the sampling ratio of an applied configuration in force: its `telemetry` section's, or
/// the one the process started with. The configuration store calls it as it applies a revision,
/// so the ratio changes with the revision that carries it, before the instance reports that
/// revision applied. Nothing happens before telemetry is initialised.
pub(crate) fn apply(runtime: &RuntimeConfig) {
    let Some(ratio) = super::SAMPLING.get() else {
        return;
    };
    let wanted = runtime
        .telemetry
        .as_ref()
        .map_or(ratio.initial, |t| t.sampling_ratio);
    if wanted != ratio.get() {
        tracing::info!(ratio = wanted, "sampling ratio applied");
        ratio.set(wanted);
    }
}
