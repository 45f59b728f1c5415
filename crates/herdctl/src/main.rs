//! `herdctl`: the operator's CLI for herd — read, change, compare, trace and roll back shared
//! configuration (validated with the services' own rules, written with compare-and-swap), see what
//! every instance applied, list live instances, print development tokens, make signing keys, and
//! write development certificates.

mod auth;
mod certs;
mod config;
mod keys;

use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use etcd_client::{Client, GetOptions};
use herd::instance::InstanceInfo;
use herd::layout::Layout;

/// Operate a herd mesh: shared configuration and live instances.
#[derive(Debug, Parser)]
#[command(version)]
struct Cli {
    /// How to reach etcd: endpoints, TLS and credentials (as the services take them).
    #[command(flatten)]
    etcd: herd::etcd::EtcdSettings,
    /// Key prefix in etcd.
    #[arg(long, env = "HERD_PREFIX", default_value = herd::settings::DEFAULT_PREFIX, global = true)]
    prefix: String,
    /// With mutual TLS in the mesh: the certificate herdctl presents when it asks instances
    /// (`config status`), any from the mesh's CA.
    #[arg(long, env = "HERDCTL_TLS_CERT", value_name = "FILE", global = true, requires_all = ["tls_key", "tls_ca"])]
    tls_cert: Option<std::path::PathBuf>,
    /// Its private key.
    #[arg(
        long,
        env = "HERDCTL_TLS_KEY",
        value_name = "FILE",
        global = true,
        requires = "tls_cert"
    )]
    tls_key: Option<std::path::PathBuf>,
    /// The mesh's CA certificates.
    #[arg(
        long,
        env = "HERDCTL_TLS_CA",
        value_name = "FILE",
        global = true,
        requires = "tls_cert"
    )]
    tls_ca: Option<std::path::PathBuf>,
    /// Output: tables for people, JSON for scripts.
    #[arg(long, value_enum, default_value_t = Output::Table, global = true)]
    output: Output,
    #[command(subcommand)]
    command: Command,
}

/// How results are printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// Aligned columns.
    Table,
    /// One JSON document.
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Shared configuration.
    Config {
        #[command(subcommand)]
        command: config::ConfigCommand,
    },
    /// Callers' tokens (development).
    Auth {
        #[command(subcommand)]
        command: auth::AuthCommand,
    },
    /// Quote-signing keys: private keys in files, public keys in etcd.
    Keys {
        #[command(subcommand)]
        command: keys::KeysCommand,
    },
    /// Certificates for mutual TLS (development).
    Certs {
        #[command(subcommand)]
        command: certs::CertsCommand,
    },
    /// Live instances: service, instance id, address, lease TTL left.
    Instances {
        /// Only this service's instances.
        service: Option<String>,
        /// Only this service's instances (as SERVICE, for scripts that name their flags).
        #[arg(
            long = "service",
            id = "service_flag",
            value_name = "SERVICE",
            conflicts_with = "service"
        )]
        service_flag: Option<String>,
    },
}

fn main() -> ExitCode {
    herd::binary::block_on_main(run(Cli::parse()))
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    use anyhow::Context;
    let layout = Layout::new(cli.prefix.clone());
    let needs_etcd = match &cli.command {
        Command::Certs { .. } | Command::Auth { .. } => false,
        Command::Keys { command } => command.needs_etcd(),
        Command::Config { .. } | Command::Instances { .. } => true,
    };
    let client =
        if needs_etcd {
            cli.etcd.validate().map_err(anyhow::Error::msg)?;
            Some(herd::etcd::connect_with(&cli.etcd).await.with_context(|| {
                format!("connecting to etcd at {}", cli.etcd.endpoints.join(","))
            })?)
        } else {
            None
        };
    let etcd = |client: Option<Client>| client.context("this command needs etcd");
    match cli.command {
        Command::Certs { command } => certs::run(command),
        Command::Auth { command } => auth::run(command),
        Command::Keys { command } => keys::run(client, &layout, command).await,
        Command::Config { command } => {
            let asker = match (cli.tls_cert, cli.tls_key, cli.tls_ca) {
                (Some(cert), Some(key), Some(ca)) => {
                    herd::admin::Asker::with_tls(&herd::tls::TlsFiles { cert, key, ca })?
                }
                _ => herd::admin::Asker::plaintext(),
            };
            config::Ctl {
                client: etcd(client)?,
                layout,
                output: cli.output,
                asker,
            }
            .run(command)
            .await
        }
        Command::Instances {
            service,
            service_flag,
        } => {
            let service = service.or(service_flag);
            instances(etcd(client)?, &layout, service.as_deref(), cli.output).await
        }
    }
}

async fn instances(
    mut client: Client,
    layout: &Layout,
    service: Option<&str>,
    output: Output,
) -> anyhow::Result<()> {
    let prefix = match service {
        Some(s) => layout.service_prefix(s),
        None => layout.services_prefix(),
    };
    let resp = client
        .get(prefix, Some(GetOptions::new().with_prefix()))
        .await?;
    let mut rows = Vec::new();
    for kv in resp.kvs() {
        let key = String::from_utf8_lossy(kv.key());
        let Ok(info) = serde_json::from_slice::<InstanceInfo>(kv.value()) else {
            eprintln!("unreadable registration at {key}");
            continue;
        };
        let ttl = if kv.lease() == 0 {
            None
        } else {
            match client.lease_time_to_live(kv.lease(), None).await {
                Ok(r) if r.ttl() >= 0 => Some(r.ttl()),
                _ => None,
            }
        };
        rows.push((info, ttl));
    }
    match output {
        Output::Json => {
            let list: Vec<serde_json::Value> = rows
                .iter()
                .map(|(i, ttl)| {
                    serde_json::json!({
                        "service": i.service, "instance_id": i.instance_id, "address": i.address,
                        "pid": i.pid, "version": i.version, "lease_ttl_seconds": ttl,
                    })
                })
                .collect();
            println!("{}", serde_json::to_string_pretty(&list)?);
        }
        Output::Table => {
            println!(
                "{:<10} {:<24} {:<24} {:>7}",
                "SERVICE", "INSTANCE", "ADDRESS", "TTL"
            );
            for (i, ttl) in rows {
                let ttl = ttl.map_or("expired".to_string(), |t| format!("{t}s"));
                println!(
                    "{:<10} {:<24} {:<24} {:>7}",
                    i.service, i.instance_id, i.address, ttl
                );
            }
        }
    }
    Ok(())
}
