//! `herdctl`: the operator's CLI for herd — read and write shared configuration (validated with the
//! services' own rules, written with compare-and-swap) and list live instances.

use std::collections::BTreeMap;
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use etcd_client::{Client, Compare, CompareOp, GetOptions, Txn, TxnOp};
use herd::ConfigModel;
use herd::keys::{InstanceInfo, Keys};
use herd_model::MeshConfig;
use herd_model::sections::{SECTION_NAMES, validate_section};

/// Operate a herd mesh: shared configuration and live instances.
#[derive(Debug, Parser)]
#[command(version)]
struct Cli {
    /// etcd endpoints, comma separated.
    #[arg(long = "etcd", env = "HERD_ETCD_ENDPOINTS", value_delimiter = ',', default_value = herd::settings::DEFAULT_ETCD, global = true)]
    etcd_endpoints: Vec<String>,
    /// Key prefix in etcd.
    #[arg(long, env = "HERD_PREFIX", default_value = herd::settings::DEFAULT_PREFIX, global = true)]
    prefix: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Shared configuration.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Live instances: service, instance id, address, lease TTL left.
    Instances {
        /// Only this service's instances.
        service: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
enum ConfigCommand {
    /// Print a section's JSON.
    Get {
        /// catalog, promotions, tax, fx, quote, limits or keys.
        section: String,
    },
    /// Validate FILE as SECTION with the services' own rules and write it if valid.
    Put {
        /// catalog, promotions, tax, fx, quote, limits or keys.
        section: String,
        /// A JSON file, or - for standard input.
        file: String,
    },
    /// Write the demo configuration for every section that is absent.
    Seed,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let keys = Keys::new(cli.prefix.clone());
    let mut client = herd::etcd::connect(&cli.etcd_endpoints)
        .await
        .with_context(|| format!("connecting to etcd at {}", cli.etcd_endpoints.join(",")))?;
    match cli.command {
        Command::Config { command } => match command {
            ConfigCommand::Get { section } => get(&mut client, &keys, &section).await,
            ConfigCommand::Put { section, file } => put(&mut client, &keys, &section, &file).await,
            ConfigCommand::Seed => seed(&mut client, &keys).await,
        },
        Command::Instances { service } => instances(&mut client, &keys, service.as_deref()).await,
    }
}

fn known(section: &str) -> anyhow::Result<()> {
    if !SECTION_NAMES.contains(&section) {
        bail!(
            "unknown section {section:?}; known: {}",
            SECTION_NAMES.join(", ")
        );
    }
    Ok(())
}

async fn get(client: &mut Client, keys: &Keys, section: &str) -> anyhow::Result<()> {
    known(section)?;
    let resp = client.get(keys.config(section), None).await?;
    let kv = resp
        .kvs()
        .first()
        .with_context(|| format!("{} is not set", keys.config(section)))?;
    let value: serde_json::Value = serde_json::from_slice(kv.value())
        .with_context(|| format!("{} holds invalid JSON", keys.config(section)))?;
    println!("{}", serde_json::to_string_pretty(&value)?);
    eprintln!("# revision {}", kv.mod_revision());
    Ok(())
}

async fn put(client: &mut Client, keys: &Keys, section: &str, file: &str) -> anyhow::Result<()> {
    known(section)?;
    let raw = if file == "-" {
        let mut s = Vec::new();
        std::io::Read::read_to_end(&mut std::io::stdin(), &mut s)?;
        s
    } else {
        std::fs::read(file).with_context(|| format!("reading {file}"))?
    };
    validate_section(section, &raw).map_err(|e| anyhow::anyhow!("refused: {e}"))?;

    // The section must also fit the rest of the configuration as it is now.
    let resp = client
        .get(keys.config_prefix(), Some(GetOptions::new().with_prefix()))
        .await?;
    let mut sections = BTreeMap::new();
    let mut seen = 0;
    for kv in resp.kvs() {
        let Some(name) = std::str::from_utf8(kv.key())
            .ok()
            .and_then(|k| keys.section_of(k))
        else {
            continue;
        };
        if name == section {
            seen = kv.mod_revision();
        }
        sections.insert(name.to_string(), kv.value().to_vec());
    }
    sections.insert(section.to_string(), raw.clone());
    if let Err(e) = MeshConfig::from_sections(&sections) {
        // An incomplete configuration is being built up; anything else is a real conflict.
        if !(e.message == "missing" && e.section != section) {
            bail!("refused: {e}");
        }
    }
    let key = keys.config(section);
    let guard = if seen == 0 {
        Compare::create_revision(key.as_str(), CompareOp::Equal, 0)
    } else {
        Compare::mod_revision(key.as_str(), CompareOp::Equal, seen)
    };
    let txn = Txn::new()
        .when([guard])
        .and_then([TxnOp::put(key.as_str(), raw, None)]);
    let resp = client.txn(txn).await?;
    if !resp.succeeded() {
        bail!("{key} changed while it was being validated; nothing written, try again");
    }
    let revision = resp.header().map(|h| h.revision()).unwrap_or(0);
    println!("wrote {key} at revision {revision}");
    Ok(())
}

async fn seed(client: &mut Client, keys: &Keys) -> anyhow::Result<()> {
    let secret: [u8; 32] = rand::random();
    for (section, value) in herd_model::demo::sections(&secret) {
        let key = keys.config(section);
        let txn = Txn::new()
            .when([Compare::create_revision(key.as_str(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(key.as_str(), value, None)]);
        let resp = client.txn(txn).await?;
        if resp.succeeded() {
            println!("seeded  {key}");
        } else {
            println!("kept    {key} (already set)");
        }
    }
    Ok(())
}

async fn instances(client: &mut Client, keys: &Keys, service: Option<&str>) -> anyhow::Result<()> {
    let prefix = match service {
        Some(s) => keys.service_prefix(s),
        None => keys.services_prefix(),
    };
    let resp = client
        .get(prefix, Some(GetOptions::new().with_prefix()))
        .await?;
    println!(
        "{:<10} {:<24} {:<24} {:>7}",
        "SERVICE", "INSTANCE", "ADDRESS", "TTL"
    );
    for kv in resp.kvs() {
        let key = String::from_utf8_lossy(kv.key());
        let Ok(info) = serde_json::from_slice::<InstanceInfo>(kv.value()) else {
            eprintln!("unreadable registration at {key}");
            continue;
        };
        let ttl = if kv.lease() == 0 {
            "none".to_string()
        } else {
            match client.lease_time_to_live(kv.lease(), None).await {
                Ok(r) if r.ttl() >= 0 => format!("{}s", r.ttl()),
                _ => "expired".to_string(),
            }
        };
        println!(
            "{:<10} {:<24} {:<24} {:>7}",
            info.service, info.instance_id, info.address, ttl
        );
    }
    Ok(())
}
