//! Calling the mesh: balanced, health-watched, retrying channels to services by name, for any
//! process that can reach etcd — a herd instance (inside [`Mesh`](crate::Mesh)), or a batch job,
//! a CLI or a service not built on herd, which registers nothing, serves nothing and holds no
//! lease.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use etcd_client::Client;
use tokio::sync::watch;

use crate::balance::{Authorization, MeshChannel};
use crate::discovery::{Discovered, Resolver};
use crate::error::ServeError;
use crate::layout::Layout;
use crate::settings::ConnectSettings;
use crate::watch::Watches;

/// What a caller outside the mesh is given: how to reach it, and the bearer token its calls
/// carry to the services that ask for one (the gateway).
#[derive(Debug, Clone, clap::Parser)]
#[command(version, about)]
pub struct CallerSettings {
    /// How the caller reaches the mesh: etcd, the prefix, its TLS identity, subset size.
    #[command(flatten)]
    pub connect: ConnectSettings,

    /// The trust domain of the mesh's identities, for a caller that gives `--tls-ca` alone: the
    /// callee's certificate must name `spiffe://<trust-domain>/herd/<service>`. (With a
    /// certificate of its own, a caller expects its own trust domain.)
    #[arg(long, env = "HERD_TRUST_DOMAIN", default_value = "herd.local")]
    pub trust_domain: String,

    /// A file holding the bearer token (a JWT) sent as `authorization: Bearer <token>` with every
    /// call; read again every second, so that whatever refreshes the token before it expires
    /// only rewrites the file.
    #[arg(long, env = "HERD_TOKEN_FILE", value_name = "FILE")]
    pub token_file: Option<PathBuf>,
}

impl CallerSettings {
    /// Checks the settings that clap's types cannot.
    pub fn validate(&self) -> Result<(), String> {
        self.connect.validate()?;
        let c = &self.connect;
        match (&c.tls_cert, &c.tls_key, &c.tls_ca) {
            (None, None, _) | (Some(_), Some(_), Some(_)) => Ok(()),
            _ => Err(
                "--tls-cert, --tls-key: give both and --tls-ca (mutual TLS), or neither \
                      (--tls-ca alone: TLS, the caller known by its token)"
                    .into(),
            ),
        }
    }
}

/// The process's TLS, ready: its credentials (which the server side of an instance uses too) and
/// the client side built from them.
pub(crate) struct Tls {
    /// `None` for a caller with the CA alone.
    pub(crate) credentials: Option<crate::tls::Credentials>,
    client: Arc<rustls::ClientConfig>,
    /// Re-reads the certificate and key when they change.
    watch: Option<tokio::task::JoinHandle<()>>,
}

impl Drop for Tls {
    fn drop(&mut self) {
        if let Some(watch) = &self.watch {
            watch.abort();
        }
    }
}

impl Tls {
    /// The credentials in `files`, taken up again within a second of a rotation, without a
    /// restart, for as long as the value lives.
    fn load(files: crate::tls::TlsFiles) -> Result<Self, crate::tls::TlsError> {
        let credentials = crate::tls::Credentials::load(&files)?;
        let watch = credentials.watch(files, std::time::Duration::from_secs(1));
        let client = crate::tls::client_config(&credentials)?;
        tracing::info!(identity = credentials.identity(), "mutual TLS on every hop");
        Ok(Self {
            credentials: Some(credentials),
            client,
            watch: Some(watch),
        })
    }

    /// TLS that verifies callees against the CA in `ca` and presents no certificate.
    fn anonymous(ca: &std::path::Path, trust_domain: &str) -> Result<Self, crate::tls::TlsError> {
        Ok(Self {
            credentials: None,
            client: crate::tls::anonymous_client_config(ca, trust_domain)?,
            watch: None,
        })
    }
}

/// Channels to the mesh's services by name, over one etcd client and one watch stream: every
/// service's channel is opened at its first use and shared after.
///
/// A caller's channels connect to a subset of each service's instances (`--subset-size`). An
/// instance takes its place among the instances of its own service (see
/// [`subset`](crate::balance::subset)); a caller outside the mesh, which knows no peers, takes
/// the instances that follow its own random id round the ring, so that many such callers spread
/// over every instance.
pub struct Caller {
    pub(crate) id: String,
    /// The service whose instances rank this caller, when it is an instance.
    own_service: Option<String>,
    subset_size: usize,
    pub(crate) layout: Layout,
    pub(crate) etcd: Client,
    /// Every watch of this process, on one etcd Watch stream.
    pub(crate) watches: Watches,
    pub(crate) tls: Option<Tls>,
    authorization: Option<Authorization>,
    /// Reads the token file again when it changes.
    token_watch: Option<tokio::task::JoinHandle<()>>,
    channels: Mutex<HashMap<String, (MeshChannel, Resolver)>>,
}

impl std::fmt::Debug for Caller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Caller")
            .field("id", &self.id)
            .field("tls", &self.tls.is_some())
            .finish_non_exhaustive()
    }
}

impl Caller {
    /// Connects to etcd as a caller from outside the mesh: nothing registered, nothing served.
    /// The token file, when given, must be readable and hold a token.
    pub async fn connect(settings: &CallerSettings) -> Result<Self, ServeError> {
        settings.validate().map_err(ServeError::Settings)?;
        let authorization = match &settings.token_file {
            None => None,
            Some(path) => Some(Authorization::new(bearer(path)?)),
        };
        let id = crate::Mesh::new_instance_id("caller");
        let mut caller = Self::open(&settings.connect, id, None).await?;
        if caller.tls.is_none()
            && let Some(ca) = &settings.connect.tls_ca
        {
            caller.tls = Some(Tls::anonymous(ca, &settings.trust_domain)?);
        }
        if let (Some(path), Some(authorization)) = (&settings.token_file, &authorization) {
            caller.token_watch = Some(tokio::spawn(follow_token(
                path.clone(),
                authorization.clone(),
                TOKEN_CHECK_EVERY,
            )));
        }
        caller.authorization = authorization;
        Ok(caller)
    }

    /// The caller side of the instance `id` of `service`.
    pub(crate) async fn open(
        settings: &ConnectSettings,
        id: String,
        own_service: Option<String>,
    ) -> Result<Self, ServeError> {
        let tls = settings.tls_files().map(Tls::load).transpose()?;
        let etcd = crate::etcd::connect_with(&settings.etcd).await?;
        Ok(Self {
            id,
            own_service,
            subset_size: settings.subset_size,
            layout: Layout::new(settings.prefix.clone()),
            watches: Watches::new(etcd.clone()),
            etcd,
            tls,
            authorization: None,
            token_watch: None,
            channels: Mutex::new(HashMap::new()),
        })
    }

    /// This caller's id: the instance's, or `caller-` and 12 random hex digits.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The etcd client.
    pub fn etcd(&self) -> &Client {
        &self.etcd
    }

    /// Where herd's keys are in etcd.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// A balanced channel to `service`, by name alone: generated tonic clients take it
    /// (`QuoteServiceClient::new(channel)`), as does [`client::call`](crate::client::call).
    pub fn channel(&self, service: &str) -> MeshChannel {
        self.with_service(service, |(channel, _)| channel.clone())
    }

    /// The instances of `service` registered now and every later set, from the same watch its
    /// channel balances over.
    pub fn discover(&self, service: &str) -> watch::Receiver<Discovered> {
        self.with_service(service, |(_, resolver)| resolver.subscribe())
    }

    fn with_service<T>(&self, service: &str, f: impl FnOnce(&(MeshChannel, Resolver)) -> T) -> T {
        let mut channels = match self.channels.lock() {
            Ok(c) => c,
            Err(poisoned) => poisoned.into_inner(),
        };
        if let Some(entry) = channels.get(service) {
            return f(entry);
        }
        // An instance's own service ranks it among the callers of every other.
        let peers = self
            .own_service
            .as_deref()
            .map(|own| match channels.get(own) {
                Some((_, peers)) => peers.subscribe(),
                None => {
                    let opened = self.open_channel(own, None);
                    let peers = opened.1.subscribe();
                    channels.insert(own.to_string(), opened);
                    peers
                }
            });
        f(channels
            .entry(service.to_string())
            .or_insert_with(|| self.open_channel(service, peers)))
    }

    /// A resolver of `service` and a channel to it, subset among `peers`: the resolver's own set
    /// for an instance's channel to its own service, none for a caller outside the mesh.
    fn open_channel(
        &self,
        service: &str,
        peers: Option<watch::Receiver<Discovered>>,
    ) -> (MeshChannel, Resolver) {
        let resolver = Resolver::start_on(&self.watches, &self.layout, service);
        let mut channel = MeshChannel::builder(service);
        channel = match (&self.own_service, peers) {
            (Some(_), peers) => channel.subset(
                &self.id,
                peers.unwrap_or_else(|| resolver.subscribe()),
                self.subset_size,
            ),
            (None, _) => channel.subset_alone(&self.id, self.subset_size),
        };
        if let Some(authorization) = &self.authorization {
            channel = channel.authorization(authorization.clone());
        }
        if let Some(tls) = &self.tls {
            channel = match crate::tls::TlsConnector::new(tls.client.clone(), service) {
                Ok(connector) => channel.connector(connector),
                // Never plaintext instead: every call fails, saying why.
                Err(e) => channel.connector(crate::tls::Unusable(e.to_string())),
            };
        }
        (channel.build(resolver.subscribe()), resolver)
    }
}

impl Drop for Caller {
    fn drop(&mut self) {
        if let Some(watch) = &self.token_watch {
            watch.abort();
        }
    }
}

/// How often the token file is looked at.
const TOKEN_CHECK_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// Puts the token in `path` in force whenever it changes, read `every` (a token is a few hundred
/// bytes; reading it is cheaper than trusting modification times, which the kernel keeps to a
/// clock tick). A file that cannot be read or holds no token leaves the one in force, and says
/// why once.
async fn follow_token(path: PathBuf, authorization: Authorization, every: std::time::Duration) {
    let mut failing: Option<String> = None;
    loop {
        tokio::time::sleep(every).await;
        match bearer(&path) {
            Ok(value) => {
                failing = None;
                if value != authorization.get() {
                    authorization.set(value);
                    tracing::info!(file = %path.display(), "token read again");
                }
            }
            Err(e) => {
                let why = e.to_string();
                if failing.as_ref() != Some(&why) {
                    tracing::warn!(error = %why, "keeping the token in force");
                    failing = Some(why);
                }
            }
        }
    }
}

/// `Bearer <token>` from the token in `path`.
fn bearer(path: &std::path::Path) -> Result<http::HeaderValue, ServeError> {
    let bad = |why: String| ServeError::Settings(format!("--token-file {}: {why}", path.display()));
    let token = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
    let token = token.trim();
    if token.is_empty() {
        return Err(bad("empty".into()));
    }
    http::HeaderValue::from_str(&format!("Bearer {token}"))
        .map_err(|_| bad("not a token: it holds characters a header cannot".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_token_file_rewritten_is_put_in_force_and_a_broken_one_is_not() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("token");
        std::fs::write(&path, "first\n").expect("write");
        let authorization = Authorization::new(bearer(&path).expect("a token"));
        assert_eq!(authorization.get(), "Bearer first");
        let every = std::time::Duration::from_millis(20);
        let follow = tokio::spawn(follow_token(path.clone(), authorization.clone(), every));
        let until = |wanted: &'static str| {
            let authorization = authorization.clone();
            async move {
                while authorization.get() != wanted {
                    tokio::time::sleep(every).await;
                }
            }
        };
        std::fs::write(&path, "second").expect("write");
        tokio::time::timeout(std::time::Duration::from_secs(5), until("Bearer second"))
            .await
            .expect("the rewritten token in force");
        std::fs::write(&path, "  \n").expect("write");
        std::fs::write(&path, "bad\u{7f}token").expect("write");
        tokio::time::sleep(every * 5).await;
        assert_eq!(
            authorization.get(),
            "Bearer second",
            "a broken file changes nothing"
        );
        std::fs::write(&path, "third").expect("write");
        tokio::time::timeout(std::time::Duration::from_secs(5), until("Bearer third"))
            .await
            .expect("the next good token in force");
        follow.abort();
        for (contents, why) in [("", "empty"), ("a\u{7f}b", "not a token")] {
            std::fs::write(&path, contents).expect("write");
            let error = bearer(&path).expect_err(why).to_string();
            assert!(
                error.contains("--token-file") && error.contains(why),
                "{error}"
            );
        }
        let missing = bearer(&dir.path().join("none"))
            .expect_err("missing")
            .to_string();
        assert!(missing.starts_with("--token-file"), "{missing}");
    }
}
