//! Configuration sections, declared once: each is one etcd key under `<prefix>config/` holding a
//! typed JSON value with its own rules. The runtime declares its own ([`runtime_sections`]), an
//! application its own ([`ConfigModel::sections`]); a [`Registry`] composes the two, and every
//! reader and writer of configuration — instances, `herdctl put`/`apply`/`diff`/`rollback`/`get`,
//! the demo seed — derives from it. Adding a section is one [`Section`] impl and one line in its
//! owner's list.

use std::any::Any;
use std::collections::BTreeMap;
use std::sync::Arc;

use serde::de::DeserializeOwned;

use super::ConfigError;
use crate::authz::AuthzSection;
use crate::telemetry::TelemetrySection;

/// One configuration section: its key, what it holds, its rules and a valid example.
pub trait Section: DeserializeOwned + Send + Sync + 'static {
    /// The last part of its key: `<prefix>config/<NAME>`.
    const NAME: &'static str;
    /// What it holds, in a few words (herdctl's help and the README's table say the same).
    const ABOUT: &'static str;
    /// Checks the section's own rules, naming the field at fault.
    fn validate(&self) -> Result<(), String>;
    /// A valid value, as JSON: what `herdctl config seed` writes for a section that must be
    /// present, and what tests write to prove that every section can be written.
    fn example() -> String;
}

/// What applies when a section is absent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Presence {
    /// Nothing: a configuration without it is rejected (`missing`).
    Required,
    /// The section type's `Default`.
    Defaulted,
    /// Nothing; whoever reads it keeps what it had from start-up (used by the runtime's own
    /// settings, whose start-up values come from flags and the environment).
    Optional,
}

/// A parsed section value, typed behind `Any` so that one registry holds every kind.
type Value = Arc<dyn Any + Send + Sync>;

/// How one section is parsed, checked and seeded: built from its [`Section`] impl.
#[derive(Clone, Copy)]
pub struct SectionSpec {
    name: &'static str,
    about: &'static str,
    presence: Presence,
    parse: fn(&[u8]) -> Result<Value, ConfigError>,
    default: Option<fn() -> Value>,
    example: fn() -> String,
}

impl std::fmt::Debug for SectionSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SectionSpec")
            .field("name", &self.name)
            .field("presence", &self.presence)
            .finish()
    }
}

/// Parses one section's JSON and checks its own rules.
pub fn parse_section<S: Section>(raw: &[u8]) -> Result<S, ConfigError> {
    let section: S = serde_json::from_slice(raw)
        .map_err(|e| ConfigError::new(S::NAME, format!("invalid JSON: {e}")))?;
    section
        .validate()
        .map_err(|m| ConfigError::new(S::NAME, m))?;
    Ok(section)
}

fn parse<S: Section>(raw: &[u8]) -> Result<Value, ConfigError> {
    Ok(Arc::new(parse_section::<S>(raw)?))
}

fn default<S: Section + Default>() -> Value {
    Arc::new(S::default())
}

impl SectionSpec {
    fn of<S: Section>(presence: Presence, default: Option<fn() -> Value>) -> Self {
        Self {
            name: S::NAME,
            about: S::ABOUT,
            presence,
            parse: parse::<S>,
            default,
            example: S::example,
        }
    }

    /// A section every configuration must have.
    pub fn required<S: Section>() -> Self {
        Self::of::<S>(Presence::Required, None)
    }

    /// A section whose `Default` applies when it is absent.
    pub fn defaulted<S: Section + Default>() -> Self {
        Self::of::<S>(Presence::Defaulted, Some(default::<S>))
    }

    /// A section that may be absent, with nothing in its place.
    pub fn optional<S: Section>() -> Self {
        Self::of::<S>(Presence::Optional, None)
    }

    /// Its name, the last part of its key.
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// What it holds.
    pub fn about(&self) -> &'static str {
        self.about
    }

    /// What applies when it is absent.
    pub fn presence(&self) -> Presence {
        self.presence
    }

    /// Whether `herdctl config seed` writes it (every section that has no optional meaning).
    pub fn seeded(&self) -> bool {
        self.presence != Presence::Optional
    }

    /// A valid value, as JSON.
    pub fn example(&self) -> String {
        (self.example)()
    }

    /// Parses `raw` and checks the section's own rules.
    pub fn check(&self, raw: &[u8]) -> Result<(), ConfigError> {
        (self.parse)(raw).map(|_| ())
    }
}

/// The sections the runtime itself reads, whatever the application.
pub fn runtime_sections() -> Vec<SectionSpec> {
    vec![
        SectionSpec::optional::<TelemetrySection>(),
        SectionSpec::defaulted::<AuthzSection>(),
    ]
}

/// The runtime's own settings at one configuration revision.
#[derive(Debug, Clone, Default)]
pub struct RuntimeConfig {
    /// `telemetry`, when set: the sampling ratio (absent: the one the process started with).
    pub telemetry: Option<Arc<TelemetrySection>>,
    /// `authz`: who may call which methods (absent: no rule, so no call over TLS to an internal
    /// service).
    pub authz: Arc<AuthzSection>,
}

impl RuntimeConfig {
    fn from_sections(sections: &Sections) -> Self {
        Self {
            telemetry: sections.optional::<TelemetrySection>(),
            authz: sections.get::<AuthzSection>().unwrap_or_default(),
        }
    }
}

/// A whole configuration built from its sections, with every rule across sections checked.
pub trait ConfigModel: Sized + Send + Sync + 'static {
    /// The application's sections, in the order operators see them.
    fn sections() -> Vec<SectionSpec>;
    /// Builds the model from its sections, each already parsed and valid on its own (absent
    /// defaulted ones hold their default). Fails with the first rule across sections broken.
    fn build(sections: &Sections) -> Result<Self, ConfigError>;
}

/// No application sections: the runtime's own only.
impl ConfigModel for () {
    fn sections() -> Vec<SectionSpec> {
        Vec::new()
    }

    fn build(_: &Sections) -> Result<Self, ConfigError> {
        Ok(())
    }
}

/// One parsed section: its value, the etcd revision it was written at, and its size in JSON.
#[derive(Clone)]
pub(crate) struct Entry {
    pub(crate) mod_revision: i64,
    pub(crate) bytes: usize,
    value: Value,
}

/// The sections of one configuration, each parsed and valid on its own. Values are shared
/// (`Arc`) with every other configuration holding the same write of the same section.
#[derive(Clone, Default)]
pub struct Sections {
    entries: BTreeMap<&'static str, Entry>,
    ignored: Vec<String>,
}

impl std::fmt::Debug for Sections {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sections")
            .field("present", &self.entries.keys().collect::<Vec<_>>())
            .field("ignored", &self.ignored)
            .finish()
    }
}

impl Sections {
    fn value<S: Section>(&self) -> Option<Result<Arc<S>, ConfigError>> {
        let entry = self.entries.get(S::NAME)?;
        Some(
            entry.value.clone().downcast::<S>().map_err(|_| {
                ConfigError::new(S::NAME, "declared with another type than the one read")
            }),
        )
    }

    /// A required or defaulted section; `missing` when absent.
    pub fn get<S: Section>(&self) -> Result<Arc<S>, ConfigError> {
        self.value::<S>()
            .unwrap_or_else(|| Err(ConfigError::new(S::NAME, "missing")))
    }

    /// An optional section, when present.
    pub fn optional<S: Section>(&self) -> Option<Arc<S>> {
        self.value::<S>().and_then(Result::ok)
    }

    /// Keys under `config/` that no declared section claims: left alone, and reported.
    pub fn ignored(&self) -> &[String] {
        &self.ignored
    }

    /// The parsed entry of `name` written at `mod_revision`, to share with a newer configuration.
    pub(crate) fn entry(&self, name: &str, mod_revision: i64) -> Option<Entry> {
        self.entries
            .get(name)
            .filter(|e| e.mod_revision == mod_revision && mod_revision > 0)
            .cloned()
    }

    /// Each present section once: (name, revision written, bytes).
    pub(crate) fn sizes(&self) -> impl Iterator<Item = (&'static str, i64, usize)> + '_ {
        self.entries
            .iter()
            .map(|(name, e)| (*name, e.mod_revision, e.bytes))
    }
}

/// A configuration parsed and checked whole: the runtime's settings and the application's model.
#[derive(Debug)]
pub struct Checked<M> {
    /// The runtime's own sections.
    pub runtime: RuntimeConfig,
    /// The application's model.
    pub model: M,
    /// The parsed sections both were built from.
    pub sections: Sections,
}

/// The runtime's sections and an application's, composed: the one list every reader and writer
/// of configuration uses.
#[derive(Debug, Clone)]
pub struct Registry {
    specs: Arc<[SectionSpec]>,
}

impl Registry {
    /// The runtime's sections followed by those of `M`. A name declared twice keeps its first
    /// declaration (the runtime's), and the clash is logged.
    pub fn of<M: ConfigModel>() -> Self {
        let mut specs: Vec<SectionSpec> = Vec::new();
        for spec in runtime_sections().into_iter().chain(M::sections()) {
            if specs.iter().any(|s| s.name == spec.name) {
                tracing::error!(
                    section = spec.name,
                    "configuration section declared twice; the first declaration is used"
                );
                continue;
            }
            specs.push(spec);
        }
        Self {
            specs: specs.into(),
        }
    }

    /// Every section, the runtime's first.
    pub fn specs(&self) -> &[SectionSpec] {
        &self.specs
    }

    /// Every section's name, in order.
    pub fn names(&self) -> Vec<&'static str> {
        self.specs.iter().map(|s| s.name).collect()
    }

    /// The section called `name`, or an error naming the known ones.
    pub fn spec(&self, name: &str) -> Result<&SectionSpec, ConfigError> {
        self.specs.iter().find(|s| s.name == name).ok_or_else(|| {
            ConfigError::new(
                name,
                format!("unknown section; known: {}", self.names().join(", ")),
            )
        })
    }

    /// Checks one section's value by its own rules; an unknown name is an error.
    pub fn check(&self, name: &str, raw: &[u8]) -> Result<(), ConfigError> {
        self.spec(name)?.check(raw)
    }

    /// Parses a whole configuration from raw `(name, value, revision written)` sections. A
    /// section whose write `reuse` already holds parsed is shared, not parsed again. Keys that no
    /// section claims are ignored and listed in [`Sections::ignored`]. Fails with the first
    /// section, in registry order, that is invalid or missing.
    pub(crate) fn parse<'a>(
        &self,
        raw: impl IntoIterator<Item = (&'a str, &'a [u8], i64)>,
        reuse: impl Fn(&str, i64) -> Option<Entry>,
    ) -> Result<Sections, ConfigError> {
        let mut raw: BTreeMap<&str, (&[u8], i64)> = raw
            .into_iter()
            .map(|(name, value, revision)| (name, (value, revision)))
            .collect();
        let mut entries = BTreeMap::new();
        for spec in self.specs.iter() {
            let entry = match raw.remove(spec.name) {
                Some((value, mod_revision)) => match reuse(spec.name, mod_revision) {
                    Some(entry) => entry,
                    None => Entry {
                        mod_revision,
                        bytes: value.len(),
                        value: (spec.parse)(value)?,
                    },
                },
                None => match (spec.presence, spec.default) {
                    (Presence::Required, _) => return Err(ConfigError::new(spec.name, "missing")),
                    (_, Some(default)) => Entry {
                        mod_revision: 0,
                        bytes: 0,
                        value: default(),
                    },
                    (_, None) => continue,
                },
            };
            entries.insert(spec.name, entry);
        }
        Ok(Sections {
            entries,
            ignored: raw.keys().map(|k| k.to_string()).collect(),
        })
    }

    /// Parses and checks a whole configuration given as section name → JSON, as `herdctl` does
    /// before writing. Unknown keys are ignored, as instances ignore them.
    pub fn check_all<M: ConfigModel>(
        &self,
        sections: &BTreeMap<String, Vec<u8>>,
    ) -> Result<Checked<M>, ConfigError> {
        let parsed = self.parse(
            sections.iter().map(|(k, v)| (k.as_str(), v.as_slice(), 0)),
            |_, _| None,
        )?;
        build(parsed)
    }
}

/// Builds the runtime's settings and the model from parsed sections.
pub(crate) fn build<M: ConfigModel>(sections: Sections) -> Result<Checked<M>, ConfigError> {
    Ok(Checked {
        runtime: RuntimeConfig::from_sections(&sections),
        model: M::build(&sections)?,
        sections,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Default, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Colour {
        name: String,
    }

    impl Section for Colour {
        const NAME: &'static str = "colour";
        const ABOUT: &'static str = "a colour";
        fn validate(&self) -> Result<(), String> {
            if self.name.is_empty() {
                return Err("name: required".into());
            }
            Ok(())
        }
        fn example() -> String {
            r#"{"name":"teal"}"#.into()
        }
    }

    #[derive(Debug, Default, serde::Deserialize)]
    struct Size {
        #[serde(default)]
        cm: u32,
    }

    impl Section for Size {
        const NAME: &'static str = "size";
        const ABOUT: &'static str = "a size";
        fn validate(&self) -> Result<(), String> {
            Ok(())
        }
        fn example() -> String {
            r#"{"cm":3}"#.into()
        }
    }

    #[derive(Debug)]
    struct Model {
        colour: Arc<Colour>,
        size: Arc<Size>,
    }

    impl ConfigModel for Model {
        fn sections() -> Vec<SectionSpec> {
            vec![
                SectionSpec::required::<Colour>(),
                SectionSpec::defaulted::<Size>(),
            ]
        }
        fn build(sections: &Sections) -> Result<Self, ConfigError> {
            Ok(Self {
                colour: sections.get()?,
                size: sections.get()?,
            })
        }
    }

    fn raw(pairs: &[(&str, &str)]) -> BTreeMap<String, Vec<u8>> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec()))
            .collect()
    }

    #[test]
    fn the_runtime_and_the_application_compose() {
        let registry = Registry::of::<Model>();
        assert_eq!(registry.names(), ["telemetry", "authz", "colour", "size"]);
        let checked = registry
            .check_all::<Model>(&raw(&[
                ("colour", r#"{"name":"red"}"#),
                ("telemetry", r#"{"sampling_ratio":0.5}"#),
            ]))
            .expect("valid");
        assert_eq!(checked.model.colour.name, "red");
        assert_eq!(checked.model.size.cm, 0, "defaulted");
        assert_eq!(
            checked.runtime.telemetry.map(|t| t.sampling_ratio),
            Some(0.5)
        );
        assert!(
            checked.runtime.authz.rules.is_empty(),
            "defaulted: no rules"
        );
    }

    #[test]
    fn every_section_is_checked_by_its_own_rules() {
        let registry = Registry::of::<Model>();
        let err = registry
            .check_all::<Model>(&raw(&[
                ("colour", r#"{"name":"red"}"#),
                ("telemetry", r#"{"sampling_ratio":2}"#),
            ]))
            .unwrap_err();
        assert_eq!(err.section, "telemetry");
        assert!(err.message.contains("sampling_ratio"), "{err}");
        let err = registry
            .check_all::<Model>(&raw(&[("size", "{}")]))
            .unwrap_err();
        assert_eq!(
            (err.section.as_str(), err.message.as_str()),
            ("colour", "missing")
        );
        let err = registry.check("colour", br#"{"name":""}"#).unwrap_err();
        assert!(err.message.contains("name: required"), "{err}");
    }

    #[test]
    fn unknown_sections_are_refused_by_name_and_ignored_whole() {
        let registry = Registry::of::<Model>();
        let err = registry.check("flavour", b"{}").unwrap_err();
        assert_eq!(err.section, "flavour");
        assert!(
            err.message
                .contains("unknown section; known: telemetry, authz, colour, size"),
            "{err}"
        );
        let checked = registry
            .check_all::<Model>(&raw(&[("colour", r#"{"name":"red"}"#), ("flavour", "x")]))
            .expect("an unknown key does not stop the rest");
        assert_eq!(checked.sections.ignored(), ["flavour"]);
    }

    #[test]
    fn examples_are_valid_and_only_optional_sections_go_unseeded() {
        let registry = Registry::of::<Model>();
        for spec in registry.specs() {
            spec.check(spec.example().as_bytes())
                .unwrap_or_else(|e| panic!("example of {}: {e}", spec.name()));
        }
        let seeded: Vec<&str> = registry
            .specs()
            .iter()
            .filter(|s| s.seeded())
            .map(|s| s.name())
            .collect();
        assert_eq!(seeded, ["authz", "colour", "size"]);
    }

    #[test]
    fn an_unchanged_write_is_shared_not_parsed_again() {
        let registry = Registry::of::<Model>();
        let first = registry
            .parse([("colour", br#"{"name":"red"}"#.as_slice(), 7)], |_, _| {
                None
            })
            .expect("valid");
        // The same write (revision 7), even if its bytes were not looked at again.
        let second = registry
            .parse([("colour", b"not even json".as_slice(), 7)], |name, rev| {
                first.entry(name, rev)
            })
            .expect("shared");
        let (a, b) = (
            first.get::<Colour>().expect("colour"),
            second.get::<Colour>().expect("colour"),
        );
        assert!(Arc::ptr_eq(&a, &b));
    }
}
