//! `herdctl certs`: development certificates for mutual TLS between instances (see
//! [`herd::tls::dev`]).

use std::path::PathBuf;
use std::time::Duration;

use clap::Subcommand;
use herd::tls::dev::{MESH_SERVICES, init_with_names};

/// Certificates for mutual TLS.
#[derive(Debug, Subcommand)]
pub enum CertsCommand {
    /// Write a CA (`ca.pem`, `ca-key.pem`; kept if already there) and, signed by it, a certificate
    /// and key per service (`<service>.pem`, `<service>-key.pem`; replaced, which is how they are
    /// rotated) into DIR.
    Init {
        /// The folder to write into (created if absent).
        dir: PathBuf,
        /// The trust domain of the identities, `spiffe://<trust-domain>/herd/<service>`.
        #[arg(long, default_value = herd_model::demo::DEFAULT_TRUST_DOMAIN)]
        trust_domain: String,
        /// The services to issue certificates for, comma separated.
        #[arg(long, value_delimiter = ',', default_values_t = MESH_SERVICES.map(String::from))]
        services: Vec<String>,
        /// DNS names every certificate also names, comma separated (for servers reached by host
        /// name: etcd's members in Kubernetes, `*.etcd.herd.svc.cluster.local`).
        #[arg(long, value_delimiter = ',')]
        dns: Vec<String>,
        /// How long the service certificates are valid (the CA: ten times as long).
        #[arg(long, default_value = "30d", value_parser = humantime::parse_duration)]
        validity: Duration,
    },
}

/// Runs one `herdctl certs` command; prints each file written.
pub fn run(command: CertsCommand) -> anyhow::Result<()> {
    match command {
        CertsCommand::Init {
            dir,
            trust_domain,
            services,
            dns,
            validity,
        } => {
            for (path, what) in init_with_names(&dir, &trust_domain, &services, &dns, validity)? {
                println!("{what:<8} {}", path.display());
            }
            Ok(())
        }
    }
}
