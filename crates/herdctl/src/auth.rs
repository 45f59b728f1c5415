//! `herdctl auth`: tokens for trying the mesh by hand, signed by the development issuer that
//! `herdctl config seed` creates.

use anyhow::{Context, bail};
use clap::Subcommand;
use etcd_client::Client;
use herd::layout::Layout;
use herd_model::auth::DevIssuer;

/// Where the development issuer is kept: beside the configuration, not in it (instances never
/// read it).
pub fn dev_issuer_key(layout: &Layout) -> String {
    format!("{}dev/issuer", layout.prefix())
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
        /// Sign with the issuer in this file (the JSON kept at `<prefix>dev/issuer`) instead of
        /// the one in etcd; etcd is then not contacted.
        #[arg(long)]
        issuer_file: Option<std::path::PathBuf>,
    },
}

impl AuthCommand {
    /// Whether the command needs etcd.
    pub fn needs_etcd(&self) -> bool {
        match self {
            AuthCommand::Token { issuer_file, .. } => issuer_file.is_none(),
        }
    }
}

/// Runs one `herdctl auth` command (`client` is `None` when it [does not need
/// etcd](AuthCommand::needs_etcd)).
pub async fn run(
    client: Option<Client>,
    layout: &Layout,
    command: AuthCommand,
) -> anyhow::Result<()> {
    match command {
        AuthCommand::Token {
            tenant,
            subject,
            ttl,
            issuer_file,
        } => {
            let issuer: DevIssuer = match (issuer_file, client) {
                (Some(file), _) => {
                    let bytes = std::fs::read(&file)
                        .with_context(|| format!("reading {}", file.display()))?;
                    serde_json::from_slice(&bytes)
                        .with_context(|| format!("reading the issuer in {}", file.display()))?
                }
                (None, Some(mut client)) => {
                    let key = dev_issuer_key(layout);
                    let response = client.get(key.as_str(), None).await?;
                    let Some(kv) = response.kvs().first() else {
                        bail!("no development issuer at {key}: `herdctl config seed` creates one");
                    };
                    serde_json::from_slice(kv.value())
                        .with_context(|| format!("reading the development issuer at {key}"))?
                }
                (None, None) => bail!("no issuer: give --issuer-file or reach etcd"),
            };
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
