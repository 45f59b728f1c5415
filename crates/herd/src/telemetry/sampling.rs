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
        Self::new(initial_ratio(
            std::env::var("OTEL_TRACES_SAMPLER").ok().as_deref(),
            std::env::var("OTEL_TRACES_SAMPLER_ARG").ok().as_deref(),
        ))
    }
}

/// The ratio the standard sampler variables ask for: `always_off` samples nothing, the ratio
/// samplers their argument (1 when it is missing or not a number), anything else everything.
fn initial_ratio(sampler: Option<&str>, arg: Option<&str>) -> f64 {
    let arg = arg.and_then(|a| a.trim().parse::<f64>().ok());
    match sampler.unwrap_or_default() {
        "always_off" | "parentbased_always_off" => 0.0,
        "traceidratio" | "parentbased_traceidratio" => arg.unwrap_or(1.0),
        _ => 1.0,
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Section;

    #[test]
    fn the_standard_variables_set_the_initial_ratio() {
        for (sampler, arg, ratio) in [
            (None, None, 1.0),
            (Some("always_on"), Some("0.2"), 1.0),
            (Some("parentbased_always_on"), None, 1.0),
            (Some("always_off"), None, 0.0),
            (Some("parentbased_always_off"), Some("0.5"), 0.0),
            (Some("traceidratio"), Some("0.25"), 0.25),
            (Some("parentbased_traceidratio"), Some(" 0.01 "), 0.01),
            (Some("parentbased_traceidratio"), None, 1.0),
            (Some("traceidratio"), Some("a lot"), 1.0),
            (Some("jaeger_remote"), Some("0.1"), 1.0),
        ] {
            assert_eq!(initial_ratio(sampler, arg), ratio, "{sampler:?} {arg:?}");
        }
        assert_eq!(SamplingRatio::new(7.0).get(), 1.0, "clamped");
        assert_eq!(SamplingRatio::new(-1.0).get(), 0.0, "clamped");
    }

    #[test]
    fn a_ratio_set_is_seen_by_every_clone_and_clamped() {
        let ratio = SamplingRatio::new(0.5);
        let sampler = ratio.clone();
        ratio.set(0.125);
        assert_eq!(sampler.get(), 0.125);
        ratio.set(3.0);
        assert_eq!(sampler.get(), 1.0);
        ratio.set(f64::NEG_INFINITY);
        assert_eq!(sampler.get(), 0.0);
        assert_eq!(
            sampler.initial, 0.5,
            "the initial ratio stays for when the section goes"
        );
    }

    #[test]
    fn the_section_takes_a_ratio_from_zero_to_one_and_nothing_else() {
        let parse = |json: &str| serde_json::from_str::<TelemetrySection>(json);
        for good in ["0", "0.01", "1"] {
            let section = parse(&format!(r#"{{"sampling_ratio":{good}}}"#));
            assert!(section.is_ok_and(|s| s.validate().is_ok()), "{good}");
        }
        for bad in ["-0.1", "1.5"] {
            let error = parse(&format!(r#"{{"sampling_ratio":{bad}}}"#))
                .map_err(|e| e.to_string())
                .and_then(|s| s.validate());
            assert!(
                error.is_err_and(|e| e.starts_with("sampling_ratio: must be 0 to 1")),
                "{bad}"
            );
        }
        assert!(
            parse(r#"{"sampling_ratio":0.1,"ratio":1}"#).is_err(),
            "unknown field"
        );
        assert!(parse("{}").is_err(), "missing field");
        assert!(parse(&TelemetrySection::example()).is_ok());
    }
}
