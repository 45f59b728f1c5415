//! Mutual TLS between instances: each instance holds a certificate naming its service by a
//! SPIFFE-style URI SAN, `spiffe://<trust-domain>/herd/<service>`, signed by the mesh's CA.
//!
//! - [`Credentials`]: an instance's certificate chain, key and CA, read from PEM files.
//! - [`server_config`]: TLS 1.3 only, ALPN `h2`, a client certificate signed by the CA required
//!   (internal services) or optional (the gateway, whose callers authenticate with tokens).
//! - [`client_config`]: presents the instance's certificate and verifies the callee's chain
//!   against the CA and its identity against the service called — not a host name: instances
//!   move, identities do not. The service is passed as the connection's server name
//!   ([`server_name`]).
//! - [`spiffe_id`]: the identity a certificate names, for the server span and access log.
//!
//! One crypto provider for the whole tree: ring.

use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::future::BoxFuture;
use futures::{Stream, StreamExt};
use http::uri::{Authority, Scheme};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tonic::transport::server::Connected;
use tower::BoxError;

use crate::client::{Connector, Io, TcpConnector, connector::DEFAULT_CONNECT_TIMEOUT};
use crate::incoming::{Guarded, WriteTurn};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};

#[cfg(any(test, feature = "dev-certs"))]
pub mod dev;

/// The identity of `service` in `trust_domain`.
pub fn identity(trust_domain: &str, service: &str) -> String {
    format!("spiffe://{trust_domain}/herd/{service}")
}

/// Where an instance's TLS material is: PEM files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// The instance's certificate (chain), leaf first.
    pub cert: PathBuf,
    /// Its private key.
    pub key: PathBuf,
    /// The CA certificates that sign the mesh's identities.
    pub ca: PathBuf,
}

/// Why TLS material could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read or holds no PEM item of the kind expected.
    #[error("{path}: {what}")]
    File {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        what: String,
    },
    /// The instance's certificate names no `spiffe://` identity.
    #[error("{0}: the certificate names no spiffe:// identity (one URI SAN)")]
    NoIdentity(PathBuf),
    /// rustls refused the material or a setting.
    #[error("TLS: {0}")]
    Rustls(#[from] rustls::Error),
    /// The CA set could not make a verifier.
    #[error("TLS: {0}")]
    Verifier(String),
}

/// An instance's TLS material, read and checked.
#[derive(Debug)]
pub struct Credentials {
    keys: Arc<Reloading>,
    /// The CA set, replaced when its file changes; both sides' verifiers read it per handshake.
    roots: Arc<arc_swap::ArcSwap<RootCertStore>>,
    identity: String,
    trust_domain: String,
}

/// An instance's certificate and key as both sides of its TLS use them, replaced when the files
/// change ([`Credentials::watch`]): new handshakes present the new ones, connections already open
/// keep theirs.
#[derive(Debug)]
pub struct Reloading {
    current: arc_swap::ArcSwap<rustls::sign::CertifiedKey>,
}

impl rustls::server::ResolvesServerCert for Reloading {
    fn resolve(
        &self,
        _: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.current.load_full())
    }
}

impl rustls::client::ResolvesClientCert for Reloading {
    fn resolve(
        &self,
        _: &[&[u8]],
        _: &[SignatureScheme],
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.current.load_full())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// The certificate chain and key in `files`, and the identity the leaf names.
fn certified(files: &TlsFiles) -> Result<(rustls::sign::CertifiedKey, String), TlsError> {
    let chain = CertificateDer::pem_slice_iter(&read_file(&files.cert)?)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(&files.cert, format!("not PEM certificates ({e})")))?;
    let leaf = chain
        .first()
        .ok_or_else(|| bad(&files.cert, "no certificate".into()))?;
    let identity = spiffe_id(leaf).ok_or_else(|| TlsError::NoIdentity(files.cert.clone()))?;
    let key = PrivateKeyDer::from_pem_slice(&read_file(&files.key)?)
        .map_err(|e| bad(&files.key, format!("not a PEM private key ({e})")))?;
    let certified = rustls::sign::CertifiedKey::from_der(chain, key, &provider())
        .map_err(|e| bad(&files.key, format!("does not fit the certificate ({e})")))?;
    Ok((certified, identity))
}

/// The CA certificates in the PEM file `path` (at least one).
fn roots(path: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for ca in CertificateDer::pem_slice_iter(&read_file(path)?) {
        let ca = ca.map_err(|e| bad(path, format!("not PEM certificates ({e})")))?;
        roots
            .add(ca)
            .map_err(|e| bad(path, format!("not a CA certificate ({e})")))?;
    }
    if roots.is_empty() {
        return Err(bad(path, "no CA certificate".into()));
    }
    Ok(roots)
}

/// When a file was last written, if it can be read.
fn modified(path: &Path) -> Option<std::time::SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

fn bad(path: &Path, what: String) -> TlsError {
    TlsError::File {
        path: path.to_path_buf(),
        what,
    }
}

fn read_file(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|e| bad(path, e.to_string()))
}

impl Credentials {
    /// Reads `files`: the chain (the leaf must name a `spiffe://` identity), the key, the CA.
    pub fn load(files: &TlsFiles) -> Result<Self, TlsError> {
        let (certified, identity) = certified(files)?;
        let trust_domain = identity
            .strip_prefix("spiffe://")
            .and_then(|rest| rest.split('/').next())
            .unwrap_or_default()
            .to_string();
        Ok(Self {
            keys: Arc::new(Reloading {
                current: arc_swap::ArcSwap::from_pointee(certified),
            }),
            roots: Arc::new(arc_swap::ArcSwap::from_pointee(roots(&files.ca)?)),
            identity,
            trust_domain,
        })
    }

    /// The identity the instance's certificate names.
    pub fn identity(&self) -> &str {
        &self.identity
    }

    /// Re-reads the certificate and key in `files` when either changes, and the CA file when it
    /// changes (looked at every `every`, off the request path) until the returned task is
    /// dropped or aborted. A new pair is taken only if it loads, fits together and names the same
    /// identity; a new CA set only if it holds at least one CA certificate; otherwise what is in
    /// use stays, and why is logged. New handshakes use what was taken; open connections keep
    /// theirs.
    pub fn watch(&self, files: TlsFiles, every: Duration) -> tokio::task::JoinHandle<()> {
        let (keys, roots, identity) =
            (self.keys.clone(), self.roots.clone(), self.identity.clone());
        tokio::spawn(async move {
            let stamp = |files: &TlsFiles| (modified(&files.cert), modified(&files.key));
            let mut seen = stamp(&files);
            let mut seen_ca = modified(&files.ca);
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let now_ca = modified(&files.ca);
                if now_ca != seen_ca {
                    seen_ca = now_ca;
                    // Taken before a new pair: a rotation to a new CA trusts it first.
                    match self::roots(&files.ca) {
                        Ok(fresh) => {
                            let count = fresh.len();
                            roots.store(Arc::new(fresh));
                            tracing::info!(certificates = count, "CA certificates reloaded");
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "CA certificates not reloaded; keeping the current ones")
                        }
                    }
                }
                let now = stamp(&files);
                if now == seen {
                    continue;
                }
                seen = now;
                match certified(&files) {
                    Ok((certified, id)) if id == identity => {
                        keys.current.store(Arc::new(certified));
                        tracing::info!(%identity, "certificate reloaded");
                    }
                    Ok((_, id)) => {
                        tracing::warn!(%identity, new = %id, "certificate not reloaded: it names another identity");
                    }
                    // A half-written pair is read again when the files change once more.
                    Err(e) => {
                        tracing::warn!(error = %e, "certificate not reloaded; keeping the current one")
                    }
                }
            }
        })
    }
}

/// The identity a certificate names: its URI SAN that starts with `spiffe://` (there must be
/// exactly one).
pub fn spiffe_id(cert: &CertificateDer<'_>) -> Option<String> {
    use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};
    let (_, cert) = X509Certificate::from_der(cert.as_ref()).ok()?;
    let names = cert.subject_alternative_name().ok()??;
    let mut ids = names
        .value
        .general_names
        .iter()
        .filter_map(|name| match name {
            GeneralName::URI(uri) if uri.starts_with("spiffe://") => Some(uri.to_string()),
            _ => None,
        });
    match (ids.next(), ids.next()) {
        (Some(id), None) => Some(id),
        _ => None,
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Whether a server asks its callers for a certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAuth {
    /// Internal services: no certificate signed by the CA, no connection.
    Required,
    /// The gateway: external callers authenticate with a bearer token instead.
    Optional,
}

/// The server side of an instance's TLS (see the module docs).
pub fn server_config(
    credentials: &Credentials,
    client_auth: ClientAuth,
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let provider = provider();
    let verifier = Arc::new(CallerVerifier::new(
        credentials.roots.clone(),
        provider.clone(),
        client_auth,
    )?);
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(credentials.keys.clone());
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// The client side of an instance's TLS (see the module docs).
pub fn client_config(credentials: &Credentials) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    client_side(
        credentials.roots.clone(),
        &credentials.trust_domain,
        Some(credentials.keys.clone()),
    )
}

/// The client side of a caller outside the mesh that has no certificate of its own: verifies the
/// callee's chain against the CA in `ca` and its identity against the service called, in
/// `trust_domain`; presents nothing (it is known by its token). The CA is read once.
pub fn anonymous_client_config(
    ca: &Path,
    trust_domain: &str,
) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let roots = Arc::new(arc_swap::ArcSwap::from_pointee(roots(ca)?));
    client_side(roots, trust_domain, None)
}

/// TLS 1.3, ALPN `h2`, the callee verified against `roots` and its identity in `trust_domain`;
/// presenting the certificate `keys` resolves, if any.
fn client_side(
    roots: Arc<arc_swap::ArcSwap<RootCertStore>>,
    trust_domain: &str,
    keys: Option<Arc<Reloading>>,
) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let provider = provider();
    let verifier = Arc::new(IdentityVerifier {
        roots,
        provider: provider.clone(),
        trust_domain: trust_domain.to_string(),
    });
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let mut config = match keys {
        Some(keys) => builder.with_client_cert_resolver(keys),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// The server name to connect to an instance of `service` with: the verifier expects the
/// callee's certificate to name `service` in the caller's own trust domain.
pub fn server_name(service: &str) -> Result<ServerName<'static>, TlsError> {
    ServerName::try_from(service.to_string())
        .map_err(|e| TlsError::Verifier(format!("{service:?} cannot be a server name: {e}")))
}

/// herd's HTTP/2 client over TLS to the instances of one service: TCP as [`TcpConnector`]
/// opens it, then a handshake within the same bound that expects the service's identity.
#[derive(Clone)]
pub struct TlsConnector {
    tcp: TcpConnector,
    tls: tokio_rustls::TlsConnector,
    name: ServerName<'static>,
    timeout: Duration,
}

impl std::fmt::Debug for TlsConnector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsConnector")
            .field("service", &self.name)
            .finish_non_exhaustive()
    }
}

impl TlsConnector {
    /// Connects to instances of `service` with `config` (see [`client_config`]).
    pub fn new(config: Arc<rustls::ClientConfig>, service: &str) -> Result<Self, TlsError> {
        Ok(Self {
            tcp: TcpConnector::default(),
            tls: tokio_rustls::TlsConnector::from(config),
            name: server_name(service)?,
            timeout: DEFAULT_CONNECT_TIMEOUT,
        })
    }
}

impl Connector for TlsConnector {
    fn connect(&self, authority: &Authority) -> BoxFuture<'static, Result<Box<dyn Io>, BoxError>> {
        let tcp = self.tcp.connect(authority);
        let (tls, name, timeout) = (self.tls.clone(), self.name.clone(), self.timeout);
        let address = authority.to_string();
        Box::pin(async move {
            let tcp = tcp.await?;
            let secured = tokio::time::timeout(timeout, tls.connect(name, tcp))
                .await
                .map_err(|_| {
                    format!("the TLS handshake with {address} took longer than {timeout:?}")
                })??;
            Ok(Box::new(secured) as Box<dyn Io>)
        })
    }

    fn scheme(&self) -> Scheme {
        Scheme::HTTPS
    }
}

/// Who is on the other side of an accepted connection: its address, and the identity its
/// certificate names (none in plaintext, or when a client certificate is optional and none was
/// given). tonic puts it in every request's extensions.
#[derive(Debug, Clone)]
pub struct PeerInfo {
    /// This instance's address the connection came to.
    pub local: Option<std::net::SocketAddr>,
    /// The caller's address.
    pub remote: Option<std::net::SocketAddr>,
    /// The caller's `spiffe://` identity.
    pub identity: Option<Arc<str>>,
}

/// TLS handshakes in progress at once; more accepted connections wait for one to end.
const HANDSHAKES_AT_ONCE: usize = 64;

/// `incoming` after TLS with `config`: handshakes run side by side (up to
/// [`HANDSHAKES_AT_ONCE`]), each bounded by `timeout`; a connection whose handshake fails or
/// takes longer is closed (a plaintext caller, a certificate refused) and never reaches the
/// server.
pub fn secured(
    incoming: impl Stream<Item = Result<Guarded, std::io::Error>> + Send + 'static,
    config: Arc<rustls::ServerConfig>,
    timeout: Duration,
) -> impl Stream<Item = Result<Conn, std::io::Error>> + Send + 'static {
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    incoming
        .map(move |accepted| {
            let acceptor = acceptor.clone();
            async move {
                let connection = accepted?;
                let (local, remote) = (
                    connection.connect_info().local_addr(),
                    connection.connect_info().remote_addr(),
                );
                let connection = connection.beneath_tls();
                match tokio::time::timeout(timeout, acceptor.accept(connection)).await {
                    Ok(Ok(stream)) => {
                        let identity = stream
                            .get_ref()
                            .1
                            .peer_certificates()
                            .and_then(|chain| chain.first())
                            .and_then(spiffe_id)
                            .map(Arc::from);
                        Ok(Some(Conn::Tls(Box::new(Secured {
                            stream,
                            peer: PeerInfo {
                                local,
                                remote,
                                identity,
                            },
                            turn: WriteTurn::new(),
                        }))))
                    }
                    Ok(Err(e)) => {
                        tracing::debug!(?remote, error = %e, "TLS handshake refused");
                        Ok(None)
                    }
                    Err(_) => {
                        tracing::debug!(?remote, "TLS handshake timed out");
                        Ok(None)
                    }
                }
            }
        })
        .buffer_unordered(HANDSHAKES_AT_ONCE)
        .filter_map(|handshake| std::future::ready(handshake.transpose()))
}

/// A connection an instance serves: plaintext (no TLS settings) or after its TLS handshake.
pub enum Conn {
    /// Plaintext.
    Plain(Guarded),
    /// After its TLS handshake, with who the caller is.
    Tls(Box<Secured>),
}

/// A connection after its TLS handshake: the stream, who the caller is, and the turn its writes
/// wait for (taken above TLS, see [`WriteTurn`]).
pub struct Secured {
    stream: tokio_rustls::server::TlsStream<Guarded>,
    peer: PeerInfo,
    turn: WriteTurn,
}

impl Connected for Conn {
    type ConnectInfo = PeerInfo;

    fn connect_info(&self) -> PeerInfo {
        match self {
            Conn::Plain(c) => PeerInfo {
                local: c.connect_info().local_addr(),
                remote: c.connect_info().remote_addr(),
                identity: None,
            },
            Conn::Tls(secured) => secured.peer.clone(),
        }
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(c) => Pin::new(c).poll_read(cx, buf),
            Conn::Tls(s) => Pin::new(&mut s.stream).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(c) => Pin::new(c).poll_write(cx, buf),
            Conn::Tls(s) => {
                std::task::ready!(s.turn.poll(cx));
                Pin::new(&mut s.stream).poll_write(cx, buf)
            }
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(c) => Pin::new(c).poll_write_vectored(cx, bufs),
            Conn::Tls(s) => {
                std::task::ready!(s.turn.poll(cx));
                Pin::new(&mut s.stream).poll_write_vectored(cx, bufs)
            }
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Conn::Plain(c) => c.is_write_vectored(),
            Conn::Tls(s) => s.stream.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(c) => Pin::new(c).poll_flush(cx),
            Conn::Tls(s) => {
                std::task::ready!(Pin::new(&mut s.stream).poll_flush(cx))?;
                s.turn.flushed();
                Poll::Ready(Ok(()))
            }
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(c) => Pin::new(c).poll_shutdown(cx),
            Conn::Tls(s) => Pin::new(&mut s.stream).poll_shutdown(cx),
        }
    }
}

/// The connections an instance serves: `incoming` as is without TLS settings, or after TLS with
/// `config` (see [`secured`]; a plaintext caller then gets nowhere).
pub fn incoming(
    incoming: impl Stream<Item = Result<Guarded, std::io::Error>> + Send + 'static,
    config: Option<Arc<rustls::ServerConfig>>,
    timeout: Duration,
) -> futures::stream::BoxStream<'static, Result<Conn, std::io::Error>> {
    match config {
        None => incoming.map(|c| c.map(Conn::Plain)).boxed(),
        Some(config) => secured(incoming, config, timeout).boxed(),
    }
}

/// A connector that cannot connect, saying why: what a channel gets when its TLS cannot be set
/// up, rather than falling back to plaintext.
#[derive(Debug)]
pub(crate) struct Unusable(pub(crate) String);

impl Connector for Unusable {
    fn connect(&self, _: &Authority) -> BoxFuture<'static, Result<Box<dyn Io>, BoxError>> {
        let why = self.0.clone();
        Box::pin(async move { Err(why.into()) })
    }
}

/// Verifies a caller's certificate against the CA set in force: rustls' own verifier, built
/// again when the CA set is replaced (rarely; the handshake that notices does it).
#[derive(Debug)]
struct CallerVerifier {
    roots: Arc<arc_swap::ArcSwap<RootCertStore>>,
    provider: Arc<CryptoProvider>,
    client_auth: ClientAuth,
    /// The verifier, and the CA set it was built from.
    current: arc_swap::ArcSwap<(Arc<RootCertStore>, Arc<dyn ClientCertVerifier>)>,
}

impl CallerVerifier {
    fn new(
        roots: Arc<arc_swap::ArcSwap<RootCertStore>>,
        provider: Arc<CryptoProvider>,
        client_auth: ClientAuth,
    ) -> Result<Self, TlsError> {
        let set = roots.load_full();
        let verifier = Self::build(&set, &provider, client_auth)?;
        Ok(Self {
            roots,
            provider,
            client_auth,
            current: arc_swap::ArcSwap::from_pointee((set, verifier)),
        })
    }

    fn build(
        roots: &Arc<RootCertStore>,
        provider: &Arc<CryptoProvider>,
        client_auth: ClientAuth,
    ) -> Result<Arc<dyn ClientCertVerifier>, TlsError> {
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            roots.clone(),
            provider.clone(),
        );
        match client_auth {
            ClientAuth::Required => verifier,
            ClientAuth::Optional => verifier.allow_unauthenticated(),
        }
        .build()
        .map_err(|e| TlsError::Verifier(e.to_string()))
    }

    /// The verifier of the CA set in force.
    fn verifier(&self) -> Result<Arc<dyn ClientCertVerifier>, rustls::Error> {
        let set = self.roots.load_full();
        let current = self.current.load();
        if Arc::ptr_eq(&current.0, &set) {
            return Ok(current.1.clone());
        }
        let verifier = Self::build(&set, &self.provider, self.client_auth)
            .map_err(|e| rustls::Error::General(e.to_string()))?;
        self.current.store(Arc::new((set, verifier.clone())));
        Ok(verifier)
    }
}

impl ClientCertVerifier for CallerVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        self.client_auth == ClientAuth::Required
    }

    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        // The CA set may change under a borrowed answer: name no CA (clients send their one
        // certificate anyway).
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.verifier()?
            .verify_client_cert(end_entity, intermediates, now)
    }

    // Signatures are checked as rustls' own verifier checks them, whatever the CA set.
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.current
            .load()
            .1
            .verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.current
            .load()
            .1
            .verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.current.load().1.supported_verify_schemes()
    }
}

/// Verifies a callee: chain signed by the CA (for server use), identity that of the service
/// called.
#[derive(Debug)]
struct IdentityVerifier {
    roots: Arc<arc_swap::ArcSwap<RootCertStore>>,
    provider: Arc<CryptoProvider>,
    trust_domain: String,
}

impl ServerCertVerifier for IdentityVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let parsed = rustls::server::ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &self.roots.load(),
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )?;
        let ServerName::DnsName(service) = server_name else {
            return Err(rustls::Error::General(
                "herd connects to a service by its name".into(),
            ));
        };
        let expected = identity(&self.trust_domain, service.as_ref());
        match spiffe_id(end_entity) {
            Some(id) if id == expected => Ok(ServerCertVerified::assertion()),
            found => Err(rustls::Error::General(format!(
                "the callee is {}, not {expected}",
                found.as_deref().unwrap_or("no spiffe:// identity")
            ))),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A CA and certificates for `services` in a temporary folder.
    fn certs(trust_domain: &str, services: &[&str]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().expect("temp dir");
        let services: Vec<String> = services.iter().map(|s| s.to_string()).collect();
        dev::init(
            dir.path(),
            trust_domain,
            &services,
            Duration::from_secs(3600),
        )
        .expect("certificates");
        dir
    }

    fn credentials(dir: &Path, service: &str) -> Credentials {
        Credentials::load(&TlsFiles {
            cert: dir.join(format!("{service}.pem")),
            key: dir.join(format!("{service}-key.pem")),
            ca: dir.join("ca.pem"),
        })
        .expect("valid material")
    }

    /// Serves one TLS connection on loopback; answers with the caller's identity (or `-`).
    async fn server(
        config: Arc<rustls::ServerConfig>,
    ) -> (String, tokio::task::JoinHandle<Result<String, String>>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let address = listener.local_addr().expect("address").to_string();
        let task = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.map_err(|e| e.to_string())?;
            let mut tls = tokio_rustls::TlsAcceptor::from(config)
                .accept(tcp)
                .await
                .map_err(|e| e.to_string())?;
            let caller = tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .and_then(spiffe_id)
                .unwrap_or_else(|| "-".into());
            tls.write_all(caller.as_bytes())
                .await
                .map_err(|e| e.to_string())?;
            tls.shutdown().await.map_err(|e| e.to_string())?;
            Ok(caller)
        });
        (address, task)
    }

    /// Connects to `address` as `config`, expecting `service`; what the server said.
    async fn call(
        config: Arc<rustls::ClientConfig>,
        address: &str,
        service: &str,
    ) -> Result<(String, Option<Vec<u8>>), String> {
        let tcp = tokio::net::TcpStream::connect(address)
            .await
            .map_err(|e| e.to_string())?;
        let mut tls = tokio_rustls::TlsConnector::from(config)
            .connect(server_name(service).map_err(|e| e.to_string())?, tcp)
            .await
            .map_err(|e| e.to_string())?;
        let alpn = tls.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
        let mut said = String::new();
        tls.read_to_string(&mut said)
            .await
            .map_err(|e| e.to_string())?;
        Ok((said, alpn))
    }

    #[tokio::test]
    async fn both_sides_learn_who_the_other_is() {
        let dir = certs("herd.local", &["gateway", "pricing"]);
        let (gateway, pricing) = (
            credentials(dir.path(), "gateway"),
            credentials(dir.path(), "pricing"),
        );
        assert_eq!(pricing.identity(), "spiffe://herd.local/herd/pricing");
        let (address, served) =
            server(server_config(&pricing, ClientAuth::Required).expect("server")).await;
        let (said, alpn) = call(
            client_config(&gateway).expect("client"),
            &address,
            "pricing",
        )
        .await
        .expect("handshake");
        assert_eq!(said, "spiffe://herd.local/herd/gateway");
        assert_eq!(alpn.as_deref(), Some(&b"h2"[..]));
        assert_eq!(served.await.expect("task").expect("served"), said);
    }

    #[tokio::test]
    async fn a_callee_that_is_not_the_service_called_is_refused() {
        let dir = certs("herd.local", &["gateway", "pricing"]);
        let (gateway, pricing) = (
            credentials(dir.path(), "gateway"),
            credentials(dir.path(), "pricing"),
        );
        // A pricing instance registered as tax (a forged registration) is not tax.
        let (address, _served) =
            server(server_config(&pricing, ClientAuth::Required).expect("server")).await;
        let err = call(client_config(&gateway).expect("client"), &address, "tax")
            .await
            .expect_err("not tax");
        assert!(err.contains("not spiffe://herd.local/herd/tax"), "{err}");
    }

    #[tokio::test]
    async fn certificates_from_another_ca_are_refused_both_ways() {
        let ours = certs("herd.local", &["gateway", "pricing"]);
        let theirs = certs("herd.local", &["gateway", "pricing"]);
        let pricing = credentials(ours.path(), "pricing");
        let stranger = credentials(theirs.path(), "gateway");
        // The server does not know the stranger's CA.
        let (address, served) =
            server(server_config(&pricing, ClientAuth::Required).expect("server")).await;
        let _ = call(
            client_config(&stranger).expect("client"),
            &address,
            "pricing",
        )
        .await;
        assert!(
            served.await.expect("task").is_err(),
            "a stranger's certificate was accepted"
        );
        // Nor does the stranger know the server's.
        let (address, _served) =
            server(server_config(&pricing, ClientAuth::Optional).expect("server")).await;
        let err = call(
            client_config(&stranger).expect("client"),
            &address,
            "pricing",
        )
        .await
        .expect_err("unknown CA");
        // Both CAs are named alike: the chain is refused for its signature.
        assert!(err.contains("invalid peer certificate"), "{err}");
    }

    #[tokio::test]
    async fn a_client_certificate_is_required_inside_and_optional_at_the_gateway() {
        let dir = certs("herd.local", &["gateway", "pricing"]);
        let pricing = credentials(dir.path(), "pricing");
        let gateway = credentials(dir.path(), "gateway");
        // A client with the CA but no certificate of its own.
        let anonymous = Arc::new(
            rustls::ClientConfig::builder_with_provider(provider())
                .with_protocol_versions(&[&rustls::version::TLS13])
                .expect("TLS 1.3")
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(IdentityVerifier {
                    roots: pricing.roots.clone(),
                    provider: provider(),
                    trust_domain: "herd.local".into(),
                }))
                .with_no_client_auth(),
        );
        let (address, served) =
            server(server_config(&pricing, ClientAuth::Required).expect("server")).await;
        let _ = call(anonymous.clone(), &address, "pricing").await;
        assert!(
            served.await.expect("task").is_err(),
            "no certificate, yet served"
        );
        let (address, served) =
            server(server_config(&gateway, ClientAuth::Optional).expect("server")).await;
        let (said, _) = call(anonymous, &address, "gateway")
            .await
            .expect("optional");
        assert_eq!(said, "-");
        assert_eq!(served.await.expect("task").expect("served"), "-");
    }

    #[test]
    fn material_that_cannot_be_used_says_which_file_and_why() {
        let dir = certs("herd.local", &["tax"]);
        let files = |cert: &str, key: &str, ca: &str| TlsFiles {
            cert: dir.path().join(cert),
            key: dir.path().join(key),
            ca: dir.path().join(ca),
        };
        let err =
            Credentials::load(&files("nope.pem", "tax-key.pem", "ca.pem")).expect_err("no file");
        assert!(err.to_string().contains("nope.pem"), "{err}");
        let err =
            Credentials::load(&files("tax-key.pem", "tax-key.pem", "ca.pem")).expect_err("a key");
        assert!(err.to_string().contains("tax-key.pem"), "{err}");
        let err = Credentials::load(&files("tax.pem", "tax.pem", "ca.pem")).expect_err("not a key");
        assert!(err.to_string().contains("private key"), "{err}");
        // The CA's own certificate names no identity.
        let err =
            Credentials::load(&files("ca.pem", "ca-key.pem", "ca.pem")).expect_err("no identity");
        assert!(matches!(err, TlsError::NoIdentity(_)), "{err}");
    }

    /// A tonic server of health ("" and `service` SERVING) behind [`secured`]; its address and
    /// the identities its requests arrived with.
    async fn secured_health_server(
        config: Arc<rustls::ServerConfig>,
        service: &'static str,
    ) -> (String, Arc<std::sync::Mutex<Vec<String>>>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let address = listener.local_addr().expect("address").to_string();
        let (reporter, health) = tonic_health::server::health_reporter();
        for name in ["", service] {
            reporter
                .set_service_status(name, tonic_health::ServingStatus::Serving)
                .await;
        }
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let record = seen.clone();
        let incoming = crate::incoming::guarded(
            tonic::transport::server::TcpIncoming::from(listener),
            crate::incoming::Hygiene::default(),
        );
        tokio::spawn(
            tonic::transport::Server::builder()
                .layer(tower::util::MapRequestLayer::new(
                    move |request: http::Request<tonic::body::Body>| {
                        let identity = request
                            .extensions()
                            .get::<PeerInfo>()
                            .and_then(|p| p.identity.as_deref().map(str::to_string));
                        record
                            .lock()
                            .expect("not poisoned")
                            .push(identity.unwrap_or_else(|| "-".into()));
                        request
                    },
                ))
                .add_service(health)
                .serve_with_incoming(secured(incoming, config, Duration::from_secs(1))),
        );
        (address, seen)
    }

    #[tokio::test]
    async fn herds_client_reaches_a_secured_server_which_learns_its_identity() {
        let dir = certs("herd.local", &["gateway", "tax"]);
        let (gateway, tax) = (
            credentials(dir.path(), "gateway"),
            credentials(dir.path(), "tax"),
        );
        let config = server_config(&tax, ClientAuth::Required).expect("server");
        let (address, seen) = secured_health_server(config, "tax").await;
        let client = client_config(&gateway).expect("client");
        let connector = TlsConnector::new(client.clone(), "tax").expect("connector");
        let resolver = crate::discovery::Resolver::fixed([crate::instance::InstanceInfo {
            service: "tax".into(),
            instance_id: "tax-1".into(),
            address: address.clone(),
            pid: 0,
            version: "test".into(),
        }]);
        let channel = crate::balance::MeshChannel::builder("tax")
            .connector(connector)
            .build(resolver.subscribe());
        // The channel watches the instance's health over TLS before offering it.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while channel.ready_instances().is_empty() {
            assert!(std::time::Instant::now() < deadline, "never ready over TLS");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(
            seen.lock()
                .expect("not poisoned")
                .iter()
                .all(|id| id == "spiffe://herd.local/herd/gateway"),
            "{seen:?}"
        );
        assert!(!seen.lock().expect("not poisoned").is_empty());
        // The same server is not pricing, and plaintext gets nowhere.
        let authority: Authority = address.parse().expect("authority");
        let wrong = TlsConnector::new(client, "pricing").expect("connector");
        let err = wrong.connect(&authority).await.err().expect("not pricing");
        assert!(
            err.to_string()
                .contains("not spiffe://herd.local/herd/pricing"),
            "{err}"
        );
        use crate::client::connection::{Connection, Request, RequestBody};
        let mut plaintext = Connection::open(&TcpConnector::default(), authority)
            .await
            .expect("TCP connects");
        let request = Request {
            head: crate::client::unary::unary_head(
                &http::uri::PathAndQuery::from_static("/grpc.health.v1.Health/Check"),
                tonic::metadata::MetadataMap::new(),
            ),
            body: RequestBody::Frame(crate::client::frame(
                &tonic_health::pb::HealthCheckRequest::default(),
            )),
        };
        let answered = tower::Service::call(&mut plaintext, request).await;
        assert!(answered.is_err(), "a plaintext call was answered");
    }

    #[tokio::test]
    async fn a_rotated_certificate_is_presented_by_new_handshakes_without_a_restart() {
        let dir = certs("herd.local", &["gateway", "pricing"]);
        let files = TlsFiles {
            cert: dir.path().join("pricing.pem"),
            key: dir.path().join("pricing-key.pem"),
            ca: dir.path().join("ca.pem"),
        };
        let pricing = Credentials::load(&files).expect("valid");
        let _watch = pricing.watch(files.clone(), Duration::from_millis(20));
        let config = server_config(&pricing, ClientAuth::Required).expect("server");
        let client = client_config(&credentials(dir.path(), "gateway")).expect("client");
        // What a new handshake is shown, as DER.
        let presented = || {
            let (config, client) = (config.clone(), client.clone());
            async move {
                let (address, _served) = server(config).await;
                let tcp = tokio::net::TcpStream::connect(&address)
                    .await
                    .expect("connect");
                let tls = tokio_rustls::TlsConnector::from(client)
                    .connect(server_name("pricing").expect("name"), tcp)
                    .await
                    .expect("handshake");
                tls.get_ref().1.peer_certificates().expect("a chain")[0].to_vec()
            }
        };
        let file_der = || {
            let pem = std::fs::read(&files.cert).expect("written");
            CertificateDer::from_pem_slice(&pem).expect("PEM").to_vec()
        };
        let before = file_der();
        assert_eq!(presented().await, before);
        // Rotate under the same CA; new handshakes present the new certificate.
        dev::init(
            dir.path(),
            "herd.local",
            &["pricing".to_string()],
            Duration::from_secs(3600),
        )
        .expect("rotated");
        let after = file_der();
        assert_ne!(after, before);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while presented().await != after {
            assert!(
                std::time::Instant::now() < deadline,
                "the new certificate was never presented"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // A pair that does not fit (another service's key) does not load, so the watcher keeps
        // the current one.
        std::fs::copy(dir.path().join("gateway-key.pem"), &files.key).expect("copied");
        let err = certified(&files).expect_err("a key of another certificate");
        assert!(err.to_string().contains("does not fit"), "{err}");
        assert_eq!(presented().await, after);
    }

    #[tokio::test]
    async fn a_new_ca_is_trusted_on_both_sides_once_its_file_names_it() {
        // Pricing's certificate comes from one CA, the gateway's from another; each side's CA
        // file names only its own at first.
        let (one, two) = (
            certs("herd.local", &["pricing"]),
            certs("herd.local", &["gateway"]),
        );
        let bundle = tempfile::tempdir().expect("temp dir");
        let files = |dir: &Path, service: &str| TlsFiles {
            cert: dir.join(format!("{service}.pem")),
            key: dir.join(format!("{service}-key.pem")),
            ca: bundle.path().join(format!("{service}-ca.pem")),
        };
        let (pricing_files, gateway_files) =
            (files(one.path(), "pricing"), files(two.path(), "gateway"));
        let ca = |dir: &Path| std::fs::read_to_string(dir.join("ca.pem")).expect("CA");
        std::fs::write(&pricing_files.ca, ca(one.path())).expect("written");
        std::fs::write(&gateway_files.ca, ca(two.path())).expect("written");
        let pricing = Credentials::load(&pricing_files).expect("valid");
        let gateway = Credentials::load(&gateway_files).expect("valid");
        let _watches = (
            pricing.watch(pricing_files.clone(), Duration::from_millis(20)),
            gateway.watch(gateway_files.clone(), Duration::from_millis(20)),
        );
        let server_side = server_config(&pricing, ClientAuth::Required).expect("server");
        let client_side = client_config(&gateway).expect("client");
        let attempt = || {
            let (server_side, client_side) = (server_side.clone(), client_side.clone());
            async move {
                let (address, served) = server(server_side).await;
                let called = call(client_side, &address, "pricing").await;
                let served = served.await.map_err(|e| e.to_string()).and_then(|r| r);
                called.and(served)
            }
        };
        assert!(attempt().await.is_err(), "trusted a CA nobody named");
        // Both files now name both CAs (how a CA rotation starts): taken up without a restart.
        let both = format!("{}{}", ca(one.path()), ca(two.path()));
        std::fs::write(&pricing_files.ca, &both).expect("written");
        std::fs::write(&gateway_files.ca, &both).expect("written");
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            match attempt().await {
                Ok(said) => {
                    assert_eq!(said, "spiffe://herd.local/herd/gateway");
                    break;
                }
                Err(e) => assert!(
                    std::time::Instant::now() < deadline,
                    "the new CA was never trusted: {e}"
                ),
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // A CA file that holds no certificate is not taken: the set in force stays.
        std::fs::write(&pricing_files.ca, "not a certificate").expect("written");
        assert!(roots(&pricing_files.ca).is_err());
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(attempt().await.is_ok(), "an unusable CA file was taken");
    }
}
