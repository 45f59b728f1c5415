//! `herdctl config`: every change is validated with the services' own rules against the rest of
//! the configuration before anything is written, and written in one transaction that compares
//! each section's revision with the one validated (compare-and-swap).

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, bail};
use clap::Subcommand;
use etcd_client::{Client, Compare, CompareOp, GetOptions, Txn, TxnOp};
use herd::Registry;
use herd::config::Presence;
use herd::error::EtcdError;
use herd::instance::{InstanceInfo, InstanceStatus};
use herd::layout::Layout;
use herd_model::MeshConfig;
use serde::{Deserialize, Serialize};

use crate::Output;

/// The `config` subcommands.
#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// List the sections: name, whether required, what each holds (with `--output json`, a valid
    /// example of each too).
    Sections,
    /// Print a section's JSON.
    Get {
        /// The section (see `config sections`).
        #[arg(value_parser = section_names())]
        section: String,
    },
    /// Validate FILE as SECTION with the services' own rules and write it if valid.
    Put {
        /// The section (see `config sections`).
        #[arg(value_parser = section_names())]
        section: String,
        /// A JSON file, or - for standard input.
        file: String,
        /// Write only if the section is still at this revision (the one `config get` showed;
        /// 0: only if it does not exist yet); otherwise nothing is written.
        #[arg(long, value_name = "REV")]
        if_revision: Option<i64>,
    },
    /// Write several sections in one transaction; nothing is written if any is invalid.
    /// Each FILE is `SECTION.json` (the section from its name) or `SECTION=PATH`.
    Apply {
        /// The files.
        #[arg(required = true)]
        files: Vec<String>,
    },
    /// Show how each FILE differs from what etcd holds (same naming as apply).
    Diff {
        /// The files.
        #[arg(required = true)]
        files: Vec<String>,
    },
    /// List a section's past revisions: revision, when written, size.
    History {
        /// The section.
        #[arg(value_parser = section_names())]
        section: String,
        /// At most this many revisions, newest first.
        #[arg(long, default_value_t = 20)]
        limit: usize,
    },
    /// Write a section's value as it was at revision REV (validated like any write).
    Rollback {
        /// The section.
        #[arg(value_parser = section_names())]
        section: String,
        /// The revision whose value to restore (see `config history`).
        #[arg(long = "to", value_name = "REV")]
        to: i64,
    },
    /// Each instance's applied configuration revision and any revision it rejected, with why.
    Status,
    /// Write the demo configuration for every section that is absent.
    Seed {
        /// The trust domain of the identities the demo authorization policy names.
        #[arg(long, default_value = herd_model::demo::DEFAULT_TRUST_DOMAIN)]
        trust_domain: String,
        /// The gateways' secrets folder: where the private half of a new signing key goes, and
        /// the development token issuer (`dev-issuer.json`, created if absent).
        #[arg(long = "secrets", value_name = "DIR")]
        secrets: std::path::PathBuf,
    },
}

/// How long an instance has to answer `config status`.
const STATUS_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// A section as etcd holds it.
struct Stored {
    value: Vec<u8>,
    mod_revision: i64,
}

/// herdctl's note beside each section it writes.
#[derive(Debug, Serialize, Deserialize)]
struct WriteNote {
    /// RFC 3339 time of the write.
    written_at: String,
    /// The command that wrote it.
    by: String,
}

/// What `config` commands need.
pub struct Ctl {
    /// etcd.
    pub client: Client,
    /// The key layout.
    pub layout: Layout,
    /// How to print.
    pub output: Output,
    /// How to reach instances to ask them their status.
    pub asker: herd::admin::Asker,
}

/// Every section herdctl reads and writes: the runtime's and the reference mesh's, declared
/// where each is owned.
fn registry() -> Registry {
    Registry::of::<MeshConfig>()
}

/// The section names as clap's possible values, so that help and errors list them.
fn section_names() -> clap::builder::PossibleValuesParser {
    clap::builder::PossibleValuesParser::new(registry().names())
}

fn known(section: &str) -> anyhow::Result<()> {
    registry().spec(section)?;
    Ok(())
}

/// `SECTION=PATH`, or a path whose file stem is the section.
fn read_spec(spec: &str) -> anyhow::Result<(String, Vec<u8>)> {
    let (section, path) = match spec.split_once('=') {
        Some((s, p)) => (s.to_string(), p.to_string()),
        None => {
            let stem = Path::new(spec)
                .file_stem()
                .and_then(|s| s.to_str())
                .unwrap_or_default()
                .to_string();
            (stem, spec.to_string())
        }
    };
    known(&section)
        .with_context(|| format!("{spec}: name the file SECTION.json or write SECTION=PATH"))?;
    Ok((section, read_file(&path)?))
}

/// Checks `changes` as a write would: each section by its own rules, then the configuration they
/// would make with the rest of what etcd holds.
fn validate(
    current: &BTreeMap<String, Stored>,
    changes: &[(String, Vec<u8>)],
) -> anyhow::Result<()> {
    let registry = registry();
    let mut merged: BTreeMap<String, Vec<u8>> = current
        .iter()
        .map(|(k, s)| (k.clone(), s.value.clone()))
        .collect();
    for (section, raw) in changes {
        registry
            .check(section, raw)
            .map_err(|e| anyhow::anyhow!("refused: {e}"))?;
        merged.insert(section.clone(), raw.clone());
    }
    if let Err(e) = registry.check_all::<MeshConfig>(&merged) {
        // A configuration still being built up may lack other sections; anything else is a
        // conflict with what is there.
        let building_up = e.message == "missing" && !changes.iter().any(|(s, _)| *s == e.section);
        if !building_up {
            bail!("refused: {e}");
        }
    }
    Ok(())
}

fn read_file(path: &str) -> anyhow::Result<Vec<u8>> {
    if path == "-" {
        let mut s = Vec::new();
        std::io::Read::read_to_end(&mut std::io::stdin(), &mut s)?;
        Ok(s)
    } else {
        std::fs::read(path).with_context(|| format!("reading {path}"))
    }
}

fn pretty(raw: &[u8]) -> String {
    match serde_json::from_slice::<serde_json::Value>(raw) {
        Ok(v) => serde_json::to_string_pretty(&v).unwrap_or_default() + "\n",
        Err(_) => String::from_utf8_lossy(raw).to_string(),
    }
}

fn now_rfc3339() -> String {
    humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string()
}

impl Ctl {
    /// Runs one `config` subcommand.
    pub async fn run(mut self, command: ConfigCommand) -> anyhow::Result<()> {
        match command {
            ConfigCommand::Sections => self.sections(),
            ConfigCommand::Get { section } => self.get(&section).await,
            ConfigCommand::Put {
                section,
                file,
                if_revision,
            } => {
                known(&section)?;
                let raw = read_file(&file)?;
                self.change_from(vec![(section, raw)], "config put", if_revision)
                    .await
            }
            ConfigCommand::Apply { files } => {
                let changes = files
                    .iter()
                    .map(|f| read_spec(f))
                    .collect::<anyhow::Result<Vec<_>>>()?;
                self.change(changes, "config apply").await
            }
            ConfigCommand::Diff { files } => self.diff(&files).await,
            ConfigCommand::History { section, limit } => self.history(&section, limit).await,
            ConfigCommand::Rollback { section, to } => self.rollback(&section, to).await,
            ConfigCommand::Status => self.status().await,
            ConfigCommand::Seed {
                trust_domain,
                secrets,
            } => self.seed(&trust_domain, &secrets).await,
        }
    }

    /// Every section as etcd holds it now, and the store's revision.
    async fn current(&mut self) -> anyhow::Result<(BTreeMap<String, Stored>, i64)> {
        let resp = self
            .client
            .get(
                self.layout.config_prefix(),
                Some(GetOptions::new().with_prefix()),
            )
            .await?;
        let header = resp.header().map(|h| h.revision()).unwrap_or(0);
        let sections = resp
            .kvs()
            .iter()
            .filter_map(|kv| {
                let name = std::str::from_utf8(kv.key())
                    .ok()
                    .and_then(|k| self.layout.section_of(k))?;
                Some((
                    name.to_string(),
                    Stored {
                        value: kv.value().to_vec(),
                        mod_revision: kv.mod_revision(),
                    },
                ))
            })
            .collect();
        Ok((sections, header))
    }

    fn sections(&self) -> anyhow::Result<()> {
        let registry = registry();
        let presence = |p: Presence| match p {
            Presence::Required => "required",
            Presence::Defaulted => "default applies when absent",
            Presence::Optional => "optional",
        };
        match self.output {
            Output::Json => {
                let list: Vec<serde_json::Value> = registry
                    .specs()
                    .iter()
                    .map(|s| {
                        serde_json::json!({
                            "section": s.name(), "key": self.layout.config(s.name()),
                            "presence": presence(s.presence()), "about": s.about(),
                            "seeded": s.seeded(),
                            "example": serde_json::from_str::<serde_json::Value>(&s.example())
                                .unwrap_or(serde_json::Value::Null),
                        })
                    })
                    .collect();
                println!("{}", serde_json::to_string_pretty(&list)?);
            }
            Output::Table => {
                println!("{:<12} {:<28} ABOUT", "SECTION", "PRESENCE");
                for s in registry.specs() {
                    println!(
                        "{:<12} {:<28} {}",
                        s.name(),
                        presence(s.presence()),
                        s.about()
                    );
                }
            }
        }
        Ok(())
    }

    async fn get(&mut self, section: &str) -> anyhow::Result<()> {
        known(section)?;
        let (current, _) = self.current().await?;
        let stored = current
            .get(section)
            .with_context(|| format!("{} is not set", self.layout.config(section)))?;
        let value: serde_json::Value = serde_json::from_slice(&stored.value)
            .with_context(|| format!("{} holds invalid JSON", self.layout.config(section)))?;
        match self.output {
            Output::Json => println!(
                "{}",
                serde_json::to_string_pretty(&serde_json::json!({
                    "section": section, "revision": stored.mod_revision, "value": value
                }))?
            ),
            Output::Table => {
                println!("{}", serde_json::to_string_pretty(&value)?);
                eprintln!("# revision {}", stored.mod_revision);
            }
        }
        Ok(())
    }

    /// Validates `changes` against the rest of the configuration, then writes them in one
    /// transaction guarded by the revisions that were validated.
    async fn change(&mut self, changes: Vec<(String, Vec<u8>)>, by: &str) -> anyhow::Result<()> {
        self.change_from(changes, by, None).await
    }

    /// As [`Self::change`]; with `expected`, the one section changed must still be at that
    /// revision when the transaction runs, whatever was validated.
    async fn change_from(
        &mut self,
        changes: Vec<(String, Vec<u8>)>,
        by: &str,
        expected: Option<i64>,
    ) -> anyhow::Result<()> {
        let (current, _) = self.current().await?;
        validate(&current, &changes)?;
        let note = serde_json::to_string(&WriteNote {
            written_at: now_rfc3339(),
            by: by.to_string(),
        })?;
        let mut guards = Vec::new();
        let mut ops = Vec::new();
        // A key still at `revision` (as read), or still absent.
        let unchanged = |key: &str, revision: Option<i64>| match revision.filter(|r| *r > 0) {
            Some(revision) => Compare::mod_revision(key, CompareOp::Equal, revision),
            None => Compare::create_revision(key, CompareOp::Equal, 0),
        };
        let read = |section: &str| current.get(section).map(|s| s.mod_revision);
        for (section, raw) in &changes {
            let key = self.layout.config(section);
            guards.push(unchanged(&key, expected.or(read(section))));
            ops.push(TxnOp::put(key.as_str(), raw.clone(), None));
            ops.push(TxnOp::put(
                self.layout.config_meta(section),
                note.as_str(),
                None,
            ));
        }
        // The rest of the configuration it was validated against must be as it was read too: a
        // rule across sections (the catalog's currency and fx's base, say) holds only for the
        // revisions it was checked at.
        for name in registry().names() {
            if changes.iter().any(|(section, _)| section == name) {
                continue;
            }
            guards.push(unchanged(&self.layout.config(name), read(name)));
        }
        let resp = self
            .client
            .txn(Txn::new().when(guards).and_then(ops))
            .await?;
        if !resp.succeeded() {
            if let Some(expected) = expected {
                // The guard failed on the named sections, or on a section they were validated
                // against: say which.
                let (now, _) = self.current().await?;
                let moved: Vec<String> = changes
                    .iter()
                    .filter_map(|(section, _)| {
                        let at = now.get(section).map_or(0, |s| s.mod_revision);
                        (at != expected).then(|| format!("{section} is at revision {at}"))
                    })
                    .collect();
                if !moved.is_empty() {
                    bail!(
                        "{}, not {expected}: it changed since; nothing written",
                        moved.join(", ")
                    );
                }
            }
            bail!(
                "the configuration changed while it was being validated; nothing written, try again"
            );
        }
        let revision = resp.header().map(|h| h.revision()).unwrap_or(0);
        let names: Vec<&str> = changes.iter().map(|(s, _)| s.as_str()).collect();
        match self.output {
            Output::Json => println!(
                "{}",
                serde_json::json!({"written": names, "revision": revision})
            ),
            Output::Table => {
                for name in names {
                    println!("wrote {} at revision {revision}", self.layout.config(name));
                }
            }
        }
        Ok(())
    }

    async fn diff(&mut self, files: &[String]) -> anyhow::Result<()> {
        let (current, _) = self.current().await?;
        let changes = files
            .iter()
            .map(|f| read_spec(f))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let mut out = Vec::new();
        for (spec, (section, raw)) in files.iter().zip(&changes) {
            let (old, revision) = current
                .get(section)
                .map(|s| (pretty(&s.value), s.mod_revision))
                .unwrap_or_default();
            let new = pretty(raw);
            let diff = similar::TextDiff::from_lines(&old, &new)
                .unified_diff()
                .context_radius(3)
                .header(
                    &format!("{section} (etcd, revision {revision})"),
                    &format!("{section} ({spec})"),
                )
                .to_string();
            out.push((section.clone(), revision, diff));
        }
        let verdict = validate(&current, &changes);
        match self.output {
            Output::Json => {
                let list: Vec<serde_json::Value> = out
                    .iter()
                    .map(|(s, r, d)| serde_json::json!({"section": s, "revision": r, "changed": !d.is_empty(), "diff": d, "refused": verdict.as_ref().err().map(|e| e.to_string())}))
                    .collect();
                println!("{}", serde_json::to_string_pretty(&list)?);
            }
            Output::Table => {
                for (section, _, diff) in out {
                    if diff.is_empty() {
                        println!("{section}: no changes");
                    } else {
                        print!("{diff}");
                    }
                }
            }
        }
        // What would be refused is shown, and said by the exit status.
        verdict
    }

    async fn history(&mut self, section: &str, limit: usize) -> anyhow::Result<()> {
        known(section)?;
        let key = self.layout.config(section);
        let meta = self.layout.config_meta(section);
        let mut rows = Vec::new();
        let mut at = 0; // 0 reads the newest
        let mut end = None;
        while rows.len() < limit {
            let options = if at > 0 {
                Some(GetOptions::new().with_revision(at))
            } else {
                None
            };
            let resp = match self.client.get(key.as_str(), options.clone()).await {
                Ok(r) => r,
                Err(e) => match EtcdError::at(at, e) {
                    EtcdError::Compacted { .. } => {
                        end = Some("older revisions are compacted");
                        break;
                    }
                    other => return Err(other.into()),
                },
            };
            let Some(kv) = resp.kvs().first() else {
                end = Some(if at == 0 { "not set" } else { "created here" });
                break;
            };
            let revision = kv.mod_revision();
            let note = self
                .client
                .get(
                    meta.as_str(),
                    Some(GetOptions::new().with_revision(revision)),
                )
                .await
                .ok()
                .and_then(|r| r.kvs().first().cloned())
                .filter(|m| m.mod_revision() == revision)
                .and_then(|m| serde_json::from_slice::<WriteNote>(m.value()).ok());
            rows.push((revision, kv.value().len(), note));
            at = revision - 1;
            if at <= 0 {
                end = Some("created here");
                break;
            }
        }
        match self.output {
            Output::Json => {
                let list: Vec<serde_json::Value> = rows
                    .iter()
                    .map(|(rev, size, note)| {
                        serde_json::json!({
                            "revision": rev, "size": size,
                            "written_at": note.as_ref().map(|n| n.written_at.clone()),
                            "by": note.as_ref().map(|n| n.by.clone()),
                        })
                    })
                    .collect();
                println!("{}", serde_json::to_string_pretty(&list)?);
            }
            Output::Table => {
                println!("{:>9}  {:<22} {:>7}  BY", "REVISION", "WRITTEN", "SIZE");
                for (rev, size, note) in &rows {
                    let (when, by) = note.as_ref().map_or(("unknown", "not herdctl"), |n| {
                        (n.written_at.as_str(), n.by.as_str())
                    });
                    println!("{rev:>9}  {when:<22} {size:>7}  {by}");
                }
                if let Some(end) = end {
                    println!("({end})");
                }
            }
        }
        Ok(())
    }

    async fn rollback(&mut self, section: &str, to: i64) -> anyhow::Result<()> {
        known(section)?;
        let key = self.layout.config(section);
        let resp = self
            .client
            .get(key.as_str(), Some(GetOptions::new().with_revision(to)))
            .await
            .map_err(|e| match EtcdError::at(to, e) {
                EtcdError::Compacted { .. } => anyhow::anyhow!(
                    "revision {to} has been compacted; see `herdctl config history {section}`"
                ),
                other => other.into(),
            })?;
        let kv = resp
            .kvs()
            .first()
            .with_context(|| format!("{key} did not exist at revision {to}"))?;
        let raw = kv.value().to_vec();
        self.change(
            vec![(section.to_string(), raw)],
            &format!("config rollback --to {to}"),
        )
        .await
    }

    async fn status(&mut self) -> anyhow::Result<()> {
        let (current, _) = self.current().await?;
        let latest = current.values().map(|s| s.mod_revision).max().unwrap_or(0);
        let resp = self
            .client
            .get(
                self.layout.services_prefix(),
                Some(GetOptions::new().with_prefix()),
            )
            .await?;
        let registered: Vec<InstanceInfo> = resp
            .kvs()
            .iter()
            .filter_map(|kv| serde_json::from_slice(kv.value()).ok())
            .collect();
        // Each instance is asked: none writes its status to etcd.
        let answers = self.asker.statuses(&registered, STATUS_TIMEOUT).await;
        let statuses: Vec<InstanceStatus> = registered
            .into_iter()
            .zip(answers)
            .map(|(info, answer)| {
                answer.unwrap_or_else(|why| InstanceStatus {
                    service: info.service,
                    instance_id: info.instance_id,
                    config: Default::default(),
                    unreachable: Some(why),
                })
            })
            .collect();
        match self.output {
            Output::Json => println!(
                "{}",
                serde_json::to_string_pretty(&serde_json::json!({
                    "revision": latest, "instances": statuses
                }))?
            ),
            Output::Table => {
                println!("configuration revision in etcd: {latest}");
                println!(
                    "{:<10} {:<24} {:>8} {:>9}  REASON",
                    "SERVICE", "INSTANCE", "APPLIED", "REJECTED"
                );
                for s in statuses {
                    let (rejected, mut reason) = s
                        .config
                        .rejected
                        .map_or((String::from("-"), String::new()), |r| {
                            (r.revision.to_string(), r.error.to_string())
                        });
                    if let Some(why) = &s.unreachable {
                        reason = format!("not asked: {why}");
                    }
                    if !s.config.ignored.is_empty() {
                        if !reason.is_empty() {
                            reason.push_str("; ");
                        }
                        reason
                            .push_str(&format!("ignored unknown: {}", s.config.ignored.join(", ")));
                    }
                    println!(
                        "{:<10} {:<24} {:>8} {:>9}  {}",
                        s.service, s.instance_id, s.config.applied, rejected, reason
                    );
                }
            }
        }
        Ok(())
    }

    async fn seed(&mut self, trust_domain: &str, secrets: &std::path::Path) -> anyhow::Result<()> {
        let keys_name = <herd_model::sections::SigningKeys as herd::Section>::NAME;
        let keys_key = self.layout.config(keys_name);
        // A new signing key only for a keys section that is not there yet.
        let signing = self
            .client
            .get(keys_key.as_str(), None)
            .await?
            .kvs()
            .is_empty()
            .then(rand::random::<[u8; 32]>);
        let issuer = dev_issuer(secrets)?;
        for (section, mut value) in herd_model::demo::sections_in(trust_domain) {
            if section == <herd_model::auth::Auth as herd::Section>::NAME {
                value = serde_json::to_string(&issuer.auth_section())?;
            }
            if let (true, Some(secret)) = (section == keys_name, &signing) {
                let public = herd_model::keys::public_of(secret);
                value =
                    serde_json::json!({"keys": [{"id": "k1", "public": public, "active": true}]})
                        .to_string();
            }
            let key = self.layout.config(section);
            let txn = Txn::new()
                .when([Compare::create_revision(key.as_str(), CompareOp::Equal, 0)])
                .and_then([TxnOp::put(key.as_str(), value, None)]);
            let resp = self.client.txn(txn).await?;
            if !resp.succeeded() {
                println!("kept    {key} (already set)");
                continue;
            }
            println!("seeded  {key}");
            if let (true, Some(secret)) = (section == keys_name, &signing) {
                let path = herd_model::keys::write_key(secrets, "k1", secret)
                    .with_context(|| format!("writing k1.pem into {}", secrets.display()))?;
                println!("seeded  {} (the private key of k1)", path.display());
            }
        }
        Ok(())
    }
}

/// The development token issuer in the secrets folder `dir`, created (and reported) if there is
/// none. Its private key is for development only.
fn dev_issuer(dir: &std::path::Path) -> anyhow::Result<herd_model::auth::DevIssuer> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let file = crate::auth::dev_issuer_file(dir);
    if file.exists() {
        println!("kept    {} (development issuer)", file.display());
        return crate::auth::read_issuer(&file);
    }
    let fresh = herd_model::auth::DevIssuer::generate();
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&file)
        .and_then(|mut f| f.write_all(serde_json::to_string(&fresh)?.as_bytes()))
        .with_context(|| format!("writing {}", file.display()))?;
    println!(
        "seeded  {} (development issuer: its private key is for development only)",
        file.display()
    );
    Ok(fresh)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stored(sections: &[(&str, &str)]) -> BTreeMap<String, Stored> {
        sections
            .iter()
            .map(|(name, json)| {
                (
                    name.to_string(),
                    Stored {
                        value: json.as_bytes().to_vec(),
                        mod_revision: 1,
                    },
                )
            })
            .collect()
    }

    fn demo() -> BTreeMap<String, Stored> {
        let sections = herd_model::demo::sections();
        let pairs: Vec<(&str, &str)> = sections.iter().map(|(n, j)| (*n, j.as_str())).collect();
        stored(&pairs)
    }

    fn change(section: &str, json: &str) -> Vec<(String, Vec<u8>)> {
        vec![(section.to_string(), json.as_bytes().to_vec())]
    }

    #[test]
    fn files_name_their_section_or_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let limits = dir.path().join("limits.json");
        std::fs::write(&limits, "{}").unwrap();
        let (section, raw) = read_spec(&limits.to_string_lossy()).unwrap();
        assert_eq!(
            (section.as_str(), raw.as_slice()),
            ("limits", b"{}".as_slice())
        );
        let (section, _) = read_spec(&format!("quote={}", limits.to_string_lossy())).unwrap();
        assert_eq!(section, "quote");
        let colour = dir.path().join("colour.json");
        std::fs::write(&colour, "{}").unwrap();
        let err = read_spec(&colour.to_string_lossy()).unwrap_err();
        assert!(
            format!("{err:#}").contains("unknown section; known: telemetry, authz, catalog"),
            "{err:#}"
        );
    }

    #[test]
    fn a_write_is_checked_by_its_own_rules_and_against_the_rest() {
        assert!(
            validate(
                &demo(),
                &change("limits", r#"{"max_items":7,"max_quantity":70}"#)
            )
            .is_ok()
        );
        assert!(validate(&demo(), &change("telemetry", r#"{"sampling_ratio":0.5}"#)).is_ok());
        let err = validate(
            &demo(),
            &change("limits", r#"{"max_items":0,"max_quantity":70}"#),
        );
        assert!(format!("{:#}", err.unwrap_err()).contains("refused: limits: max_items"));
        // An fx base that is not the catalog's currency contradicts what etcd holds.
        let err = validate(
            &demo(),
            &change("fx", r#"{"base":"EUR","rates":{"USD":"1.08"}}"#),
        );
        assert!(format!("{:#}", err.unwrap_err()).contains("catalog currency"));
        let err = validate(&demo(), &change("colour", "{}")).unwrap_err();
        assert!(format!("{err:#}").contains("unknown section"));
    }

    #[test]
    fn a_configuration_may_be_built_up_a_section_at_a_time() {
        let empty = BTreeMap::new();
        // The other required sections are still missing: that is not this write's fault.
        assert!(
            validate(
                &empty,
                &change("limits", r#"{"max_items":7,"max_quantity":70}"#)
            )
            .is_ok()
        );
        // A key already in etcd that no section claims does not block a write either.
        let mut with_unknown = demo();
        with_unknown.extend(stored(&[("colour", "{}")]));
        assert!(validate(&with_unknown, &change("quote", r#"{"ttl_seconds":60}"#)).is_ok());
    }

    #[test]
    fn json_is_shown_pretty_and_anything_else_as_it_is() {
        assert_eq!(pretty(br#"{"a":1}"#), "{\n  \"a\": 1\n}\n");
        assert_eq!(pretty(b"not json"), "not json");
    }
}
