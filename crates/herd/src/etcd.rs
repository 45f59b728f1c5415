//! Connecting to etcd with settings it tolerates: plaintext for development, or TLS (a client
//! certificate, whose common name etcd takes as the user with `--client-cert-auth`) and/or a user
//! and password, as a production etcd asks.

use std::path::PathBuf;
use std::time::Duration;

use etcd_client::{Certificate, Client, ConnectOptions, Identity, TlsOptions};

use crate::settings::DEFAULT_ETCD;

/// etcd kills connections that ping more often than every 5 s; stay above that.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
/// A ping unanswered this long means the connection is dead.
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(5);
/// Bound on establishing a connection to an endpoint.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// How to reach etcd: its endpoints and the credentials it asks for. Shared by every herd binary
/// and herdctl (flags with environment equivalents).
#[derive(Debug, Clone, clap::Args)]
pub struct EtcdSettings {
    /// etcd endpoints, comma separated (for example http://10.0.0.1:2379,http://10.0.0.2:2379;
    /// https:// with --etcd-ca).
    #[arg(long = "etcd", env = "HERD_ETCD_ENDPOINTS", value_delimiter = ',', default_value = DEFAULT_ETCD, global = true)]
    pub endpoints: Vec<String>,

    /// The CA certificates (PEM) that sign etcd's server certificate: TLS to etcd, whose
    /// endpoints are then https://.
    #[arg(
        long = "etcd-ca",
        env = "HERD_ETCD_CA",
        value_name = "FILE",
        global = true
    )]
    pub ca: Option<PathBuf>,

    /// A client certificate (PEM) to present to etcd (with --etcd-key); etcd started with
    /// --client-cert-auth takes its common name as the user.
    #[arg(
        long = "etcd-cert",
        env = "HERD_ETCD_CERT",
        value_name = "FILE",
        global = true
    )]
    pub cert: Option<PathBuf>,

    /// The client certificate's private key (PEM).
    #[arg(
        long = "etcd-key",
        env = "HERD_ETCD_KEY",
        value_name = "FILE",
        global = true
    )]
    pub key: Option<PathBuf>,

    /// An etcd user to authenticate as (with --etcd-password-file).
    #[arg(
        long = "etcd-user",
        env = "HERD_ETCD_USER",
        value_name = "NAME",
        global = true
    )]
    pub user: Option<String>,

    /// A file holding the etcd user's password (its first line).
    #[arg(
        long = "etcd-password-file",
        env = "HERD_ETCD_PASSWORD_FILE",
        value_name = "FILE",
        global = true
    )]
    pub password_file: Option<PathBuf>,
}

impl EtcdSettings {
    /// Plaintext to `endpoints`, no credentials.
    pub fn plain(endpoints: &[String]) -> Self {
        Self {
            endpoints: endpoints.to_vec(),
            ca: None,
            cert: None,
            key: None,
            user: None,
            password_file: None,
        }
    }

    /// Checks what clap's types cannot: endpoints given, files in pairs, TLS with https://.
    pub fn validate(&self) -> Result<(), String> {
        if self.endpoints.iter().all(|e| e.trim().is_empty()) {
            return Err("--etcd: at least one endpoint is required".into());
        }
        if self.cert.is_some() != self.key.is_some() {
            return Err("--etcd-cert, --etcd-key: give both or neither".into());
        }
        if self.user.is_some() != self.password_file.is_some() {
            return Err("--etcd-user, --etcd-password-file: give both or neither".into());
        }
        if self.cert.is_some() && self.ca.is_none() {
            return Err("--etcd-cert: needs --etcd-ca (a client certificate is for TLS)".into());
        }
        let https = self
            .endpoints
            .iter()
            .filter(|e| e.trim().starts_with("https://"))
            .count();
        match (&self.ca, https) {
            (Some(_), n) if n != self.endpoints.len() => {
                Err("--etcd: with --etcd-ca every endpoint is https://".into())
            }
            (None, n) if n > 0 => Err("--etcd: an https:// endpoint needs --etcd-ca".into()),
            _ => Ok(()),
        }
    }

    /// The connection options these settings ask for, their files read.
    fn options(&self) -> Result<ConnectOptions, EtcdConnectError> {
        let read = |path: &PathBuf| {
            std::fs::read(path).map_err(|source| EtcdConnectError::File {
                path: path.clone(),
                source,
            })
        };
        let mut options = base_options();
        if let Some(ca) = &self.ca {
            let mut tls = TlsOptions::new().ca_certificate(Certificate::from_pem(read(ca)?));
            if let (Some(cert), Some(key)) = (&self.cert, &self.key) {
                tls = tls.identity(Identity::from_pem(read(cert)?, read(key)?));
            }
            options = options.with_tls(tls);
        }
        if let (Some(user), Some(file)) = (&self.user, &self.password_file) {
            let password = String::from_utf8_lossy(&read(file)?)
                .lines()
                .next()
                .unwrap_or_default()
                .to_string();
            // etcd's tokens expire (simple tokens after 5 minutes): take a new one when told.
            options = options
                .with_user(user.clone(), password)
                .with_auto_token_refresh(true);
        }
        Ok(options)
    }
}

/// Why etcd could not be connected to.
#[derive(Debug, thiserror::Error)]
pub enum EtcdConnectError {
    /// A credentials file could not be read.
    #[error("reading {path}: {source}")]
    File {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The client refused the settings, or etcd refused the credentials.
    #[error("{0}")]
    Etcd(#[from] etcd_client::Error),
}

/// Connects to the given etcd endpoints in plaintext. The connection is lazy about failures:
/// calls made while etcd is away fail and can be retried on the same client.
pub async fn connect(endpoints: &[String]) -> Result<Client, etcd_client::Error> {
    Client::connect(endpoints, Some(base_options())).await
}

/// Keepalive and connect timeout as etcd tolerates them.
fn base_options() -> ConnectOptions {
    ConnectOptions::new()
        .with_keep_alive(KEEPALIVE_INTERVAL, KEEPALIVE_TIMEOUT)
        .with_keep_alive_while_idle(true)
        .with_connect_timeout(CONNECT_TIMEOUT)
}

/// Connects to etcd as `settings` say. With a user, the first token is taken now (so etcd must be
/// reachable); otherwise as lazy as [`connect`].
pub async fn connect_with(settings: &EtcdSettings) -> Result<Client, EtcdConnectError> {
    let options = settings.options()?;
    Ok(Client::connect(&settings.endpoints, Some(options)).await?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        etcd: EtcdSettings,
    }

    fn check(args: &[&str]) -> Result<(), String> {
        let cli = Cli::try_parse_from(std::iter::once("t").chain(args.iter().copied()))
            .map_err(|e| e.to_string())?;
        cli.etcd.validate()
    }

    #[test]
    fn credentials_come_in_pairs_and_tls_means_https() {
        assert_eq!(check(&[]), Ok(()));
        let https = ["--etcd", "https://127.0.0.1:2379", "--etcd-ca", "ca.pem"];
        assert_eq!(check(&https), Ok(()));
        for (args, error) in [
            (vec!["--etcd-ca", "ca.pem"], "every endpoint is https://"),
            (vec!["--etcd", "https://e:2379"], "needs --etcd-ca"),
            (
                vec![
                    "--etcd",
                    "https://e:2379",
                    "--etcd-ca",
                    "c",
                    "--etcd-cert",
                    "c",
                ],
                "--etcd-cert, --etcd-key",
            ),
            (
                vec!["--etcd-cert", "c", "--etcd-key", "k"],
                "needs --etcd-ca",
            ),
            (
                vec!["--etcd-user", "herd"],
                "--etcd-user, --etcd-password-file",
            ),
            (vec!["--etcd", " "], "at least one endpoint"),
        ] {
            let got = check(&args);
            assert!(
                got.as_ref().is_err_and(|e| e.contains(error)),
                "{args:?}: {got:?}"
            );
        }
    }

    #[tokio::test]
    async fn a_credentials_file_that_cannot_be_read_is_named() {
        let settings = EtcdSettings {
            ca: Some("/nonexistent/ca.pem".into()),
            ..EtcdSettings::plain(&["https://127.0.0.1:1".into()])
        };
        let error = connect_with(&settings).await.err().map(|e| e.to_string());
        assert!(error.is_some_and(|e| e.starts_with("reading /nonexistent/ca.pem")));
    }
}
