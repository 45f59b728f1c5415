//! Connecting to etcd with settings it tolerates: plaintext for development, or TLS (a client
//! certificate, whose common name etcd takes as the user with `--client-cert-auth`) and/or a user
//! and password, as a production etcd asks.
//!
//! Calls go round robin over the members that answer ([`Members`]): a member whose connection
//! fails is left out — the call that found it fails, no other — and probed in the background
//! until it answers a request again. (etcd-client's own balancing picks members at random,
//! dead or alive, so a third of all calls failed while one of three members was down.) A probe
//! is a request, not a connection: a restarted member takes connections as soon as it listens,
//! but answers none until it has rejoined its cluster, and calls sent to it meanwhile would wait
//! for nothing.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use etcd_client::{Certificate, Client, ConnectOptions, Identity, TlsOptions};
use tonic::transport::channel::Change;

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
    Client::connect_with_balanced_channel(endpoints, Some(base_options()), Members).await
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
    Ok(Client::connect_with_balanced_channel(&settings.endpoints, Some(options), Members).await?)
}

/// How long a call waits for etcd-client to hand over the members' endpoints (it does so as it
/// connects, before its first call).
const MEMBERS_WAIT: Duration = Duration::from_secs(3);
/// How often a member left out is tried again, and how long one try may take.
const PROBE_EVERY: Duration = Duration::from_millis(500);
/// What a probe asks: a member's status, which a member serving requests answers at once, with
/// or without a quorum (it is the member's own view), and one that is not yet serving does not.
const PROBE_PATH: &str = "/etcdserverpb.Maintenance/Status";

/// How etcd-client hands over the members' endpoints.
type EndpointUpdater = tokio::sync::mpsc::Sender<Change<http::Uri, tonic::transport::Endpoint>>;

/// etcd's members as one channel: round robin over those that answer (see the module docs).
#[derive(Debug, Clone, Copy)]
pub struct Members;

impl etcd_client::BalancedChannelBuilder for Members {
    type Error = tonic::transport::Error;

    fn balanced_channel(
        self,
        buffer_size: usize,
    ) -> Result<(etcd_client::Channel, EndpointUpdater), Self::Error> {
        let (updates, mut changes) = tokio::sync::mpsc::channel(buffer_size.max(1));
        let (members, known) = tokio::sync::watch::channel(Arc::new(Vec::<Member>::new()));
        tokio::spawn(async move {
            while let Some(change) = changes.recv().await {
                members.send_modify(|list| {
                    let mut next: Vec<Member> = list.as_ref().clone();
                    match change {
                        Change::Insert(uri, endpoint) => {
                            next.retain(|m| m.uri != uri);
                            next.push(Member::new(uri, endpoint));
                        }
                        Change::Remove(uri) => next.retain(|m| m.uri != uri),
                    }
                    *list = Arc::new(next);
                });
            }
        });
        let service = MembersService {
            known,
            next: Arc::new(AtomicUsize::new(0)),
        };
        Ok((
            etcd_client::Channel::Custom(tower::util::BoxCloneSyncService::new(service)),
            updates,
        ))
    }
}

/// One member: its channel, and whether it answers.
#[derive(Clone)]
struct Member {
    uri: http::Uri,
    channel: tonic::transport::Channel,
    up: Arc<AtomicBool>,
    /// Whether it has been tried once (until then, calls wait a little for it).
    tried: Arc<AtomicBool>,
    /// Whether a probe is running for it.
    probing: Arc<AtomicBool>,
}

impl Member {
    /// A member, tried at once: a short-lived caller (herdctl) must not find a dead member with
    /// its first calls.
    fn new(uri: http::Uri, endpoint: tonic::transport::Endpoint) -> Self {
        let member = Self {
            uri,
            channel: endpoint.connect_lazy(),
            up: Arc::new(AtomicBool::new(false)),
            tried: Arc::new(AtomicBool::new(false)),
            probing: Arc::new(AtomicBool::new(false)),
        };
        member.probe(Duration::ZERO);
        member
    }

    fn address(&self) -> String {
        format!(
            "{}:{}",
            self.uri.host().unwrap_or("127.0.0.1"),
            self.uri.port_u16().unwrap_or(2379)
        )
    }

    /// Leaves the member out until it answers again.
    fn down(&self) {
        if self.up.swap(false, Ordering::AcqRel) {
            tracing::warn!(member = %self.uri, "etcd member left out until it answers again");
        }
        self.probe(PROBE_EVERY);
    }

    /// Asks the member for its status after `first`, then every [`PROBE_EVERY`], until it
    /// answers within [`PROBE_EVERY`]; it is then taken again. One probe at a time.
    fn probe(&self, first: Duration) {
        if self.probing.swap(true, Ordering::AcqRel) {
            return;
        }
        let (up, tried, probing) = (self.up.clone(), self.tried.clone(), self.probing.clone());
        let (address, channel) = (self.address(), self.channel.clone());
        tokio::spawn(async move {
            let mut wait = first;
            loop {
                tokio::time::sleep(wait).await;
                wait = PROBE_EVERY;
                let answered = tokio::time::timeout(PROBE_EVERY, answers(channel.clone()))
                    .await
                    .unwrap_or(false);
                let was_tried = tried.swap(true, Ordering::AcqRel);
                if answered {
                    up.store(true, Ordering::Release);
                    probing.store(false, Ordering::Release);
                    if was_tried {
                        tracing::info!(member = %address, "etcd member answers again");
                    }
                    return;
                }
            }
        });
    }
}

/// Whether the member behind `channel` answers a request: any answer of its own counts, a
/// refusal included (without the credentials calls carry, a member with authentication on may
/// refuse it), a connection that fails or an answer that never comes does not.
async fn answers(channel: tonic::transport::Channel) -> bool {
    use crate::telemetry::otlp::Encoded;
    let mut grpc = tonic::client::Grpc::new(channel);
    if grpc.ready().await.is_err() {
        return false;
    }
    let status = grpc
        .unary::<_, Encoded, _>(
            tonic::Request::new(Encoded::default()),
            http::uri::PathAndQuery::from_static(PROBE_PATH),
            tonic_prost::ProstCodec::default(),
        )
        .await;
    match status {
        Ok(_) => true,
        // What a failed connection or a broken stream becomes.
        Err(status) => !matches!(
            status.code(),
            tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled
        ),
    }
}

/// The service behind [`Members`].
#[derive(Clone)]
struct MembersService {
    known: tokio::sync::watch::Receiver<Arc<Vec<Member>>>,
    next: Arc<AtomicUsize>,
}

type EtcdRequest = http::Request<tonic::body::Body>;
type EtcdResponse = http::Response<tonic::body::Body>;

impl tower::Service<EtcdRequest> for MembersService {
    type Response = EtcdResponse;
    type Error = tower::BoxError;
    type Future = futures::future::BoxFuture<'static, Result<EtcdResponse, tower::BoxError>>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        // Each member's channel is made ready when the call is made.
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: EtcdRequest) -> Self::Future {
        let mut known = self.known.clone();
        let next = self.next.clone();
        Box::pin(async move {
            let members =
                match tokio::time::timeout(MEMBERS_WAIT, known.wait_for(|list| !list.is_empty()))
                    .await
                {
                    Ok(Ok(list)) => list.clone(),
                    _ => return Err("etcd: no member endpoint known".into()),
                };
            // Until each member has been tried once, wait (briefly) for one that answers.
            let deadline = tokio::time::Instant::now() + PROBE_EVERY;
            while !members.iter().any(|m| m.up.load(Ordering::Acquire))
                && !members.iter().all(|m| m.tried.load(Ordering::Acquire))
                && tokio::time::Instant::now() < deadline
            {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            // The next member that answers; any, when none does (the call then says
            // why).
            let start = next.fetch_add(1, Ordering::Relaxed);
            let count = members.len();
            let member = (0..count)
                .map(|i| &members[(start + i) % count])
                .find(|m| m.up.load(Ordering::Relaxed))
                .unwrap_or(&members[start % count])
                .clone();
            let mut channel = member.channel.clone();
            let answer = async {
                tower::ServiceExt::ready(&mut channel).await?;
                tower::Service::call(&mut channel, request).await
            }
            .await;
            answer.map_err(|e| {
                member.down();
                tower::BoxError::from(e)
            })
        })
    }
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
