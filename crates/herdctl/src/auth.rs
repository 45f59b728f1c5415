//! `herdctl auth`: tokens for trying the mesh by hand, signed by the development issuer that
//! `herdctl config seed` creates in the secrets folder (never in etcd).

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Subcommand;
use herd_model::auth::DevIssuer;

/// The development issuer's file in a secrets folder.
pub fn dev_issuer_file(secrets: &Path) -> PathBuf {
    secrets.join("dev-issuer.json")
}

/// Callers' tokens.
#[derive(Debug, Subcommand)]
pub enum AuthCommand {
    /// Print a bearer token signed by the development issuer (for development only).
    Token {
        /// The tenant the token is for.
        #[arg(long)]
        tenant: String,
        /// The caller (`sub`).
        #[arg(long, default_value = "developer")]
        subject: String,
        /// How long it lives, e.g. `5m`, `90s` (at most the `auth` section's
        /// `max_lifetime_seconds`).
        #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
        ttl: std::time::Duration,
        /// The issuer to sign with: `dev-issuer.json` in the folder given to `config seed
        /// --secrets` (or any file of that shape).
        #[arg(long)]
        issuer_file: PathBuf,
    },
}

/// Reads the development issuer in `file`.
pub fn read_issuer(file: &Path) -> anyhow::Result<DevIssuer> {
    let bytes = std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
    serde_json::from_slice(&bytes)
        .with_context(|| format!("reading the issuer in {}", file.display()))
}

/// Runs one `herdctl auth` command; none needs etcd.
pub fn run(command: AuthCommand) -> anyhow::Result<()> {
    match command {
        AuthCommand::Token {
            tenant,
            subject,
            ttl,
            issuer_file,
        } => {
            let issuer = read_issuer(&issuer_file)?;
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .context("the system clock is before 1970")?
                .as_secs();
            let token = issuer
                .token(
                    &tenant,
                    &subject,
                    i64::try_from(now)?,
                    i64::try_from(ttl.as_secs())?,
                )
                .map_err(anyhow::Error::msg)?;
            println!("{token}");
            Ok(())
        }
    }
}
