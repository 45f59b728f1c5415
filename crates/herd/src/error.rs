//! What can go wrong in the runtime, typed, and the one place each becomes a gRPC status.
//!
//! - [`CallError`]: an outgoing call (no endpoint, none serving, not sent, broken off, refused by
//!   the callee, deadline...).
//! - [`EtcdError`]: a request to etcd (compacted, future revision, unavailable, a watch ended).
//! - [`LeaseLost`]: why a registration's lease was lost.
//! - [`RevisionError`]: the configuration a request is pinned to cannot be had.
//! - [`Expired`], [`ContextError`]: a request that cannot start.
//! - [`ServeError`]: an instance that cannot start or stopped serving.
//!
//! Each request-level error has exactly one `From<_> for tonic::Status`, which picks the code;
//! statuses the callee sent pass through unchanged ([`relay`] says which are prefixed with the
//! service that failed).

use std::sync::Arc;
use std::time::Duration;

use tonic::{Code, Status};

/// Why an outgoing call failed.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// Discovery lists no instance of the service.
    #[error("{service}: no instance registered")]
    NoInstance {
        /// The service called.
        service: Arc<str>,
    },
    /// Instances are known, but every one is NOT_SERVING or unreachable.
    #[error("{service}: {known} instance{} known, none serving ({why})", if *.known == 1 { "" } else { "s" })]
    NoneServing {
        /// The service called.
        service: Arc<str>,
        /// How many instances discovery lists.
        known: usize,
        /// How many are in which state, and the first reason one is unreachable.
        why: String,
    },
    /// The call was never answered: no connection could carry it, or the connection broke before
    /// an answer began. Not processed, so safe to retry.
    #[error("{service}: no response: {cause}")]
    NotSent {
        /// The service called.
        service: Arc<str>,
        /// What failed, with its causes.
        cause: String,
    },
    /// The answer began and broke off; the code is gRPC's for the HTTP/2 error.
    #[error("the answer broke off: {cause}")]
    BrokenOff {
        /// gRPC's code for the HTTP/2 error.
        code: Code,
        /// The HTTP/2 error.
        cause: String,
    },
    /// The peer answered with an HTTP status other than 200: not a gRPC server.
    #[error("the answer has HTTP status {0}")]
    HttpStatus(http::StatusCode),
    /// The answer was larger than the caller accepts.
    #[error("answer larger than {limit} bytes")]
    TooLarge {
        /// The limit, in bytes.
        limit: usize,
    },
    /// The answer ended without saying how the call went.
    #[error("the answer ended without a grpc-status")]
    NoStatus,
    /// The answer was not a well-formed unary gRPC answer.
    #[error("{0}")]
    Malformed(String),
    /// The answer's message did not decode as the method's response.
    #[error("malformed answer from {method}: {cause}")]
    Undecodable {
        /// The method called.
        method: &'static str,
        /// The decoding error.
        cause: String,
    },
    /// The caller's deadline passed while waiting.
    #[error("deadline exceeded waiting for a downstream answer")]
    DeadlineExceeded,
    /// The caller's deadline had passed before an attempt could start.
    #[error(transparent)]
    Expired(#[from] Expired),
    /// The callee answered with this status.
    #[error("{}", .0.message())]
    Refused(Status),
}

impl CallError {
    /// The gRPC code the caller sees.
    pub fn code(&self) -> Code {
        match self {
            Self::NoInstance { .. } | Self::NoneServing { .. } | Self::NotSent { .. } => {
                Code::Unavailable
            }
            Self::BrokenOff { code, .. } => *code,
            // gRPC's mapping of an HTTP status from something that is not a gRPC server.
            Self::HttpStatus(status) => match *status {
                http::StatusCode::BAD_REQUEST => Code::Internal,
                http::StatusCode::UNAUTHORIZED => Code::Unauthenticated,
                http::StatusCode::FORBIDDEN => Code::PermissionDenied,
                http::StatusCode::NOT_FOUND => Code::Unimplemented,
                http::StatusCode::TOO_MANY_REQUESTS
                | http::StatusCode::BAD_GATEWAY
                | http::StatusCode::SERVICE_UNAVAILABLE
                | http::StatusCode::GATEWAY_TIMEOUT => Code::Unavailable,
                _ => Code::Unknown,
            },
            Self::TooLarge { .. } => Code::ResourceExhausted,
            Self::NoStatus => Code::Unknown,
            Self::Malformed(_) | Self::Undecodable { .. } => Code::Internal,
            Self::DeadlineExceeded | Self::Expired(_) => Code::DeadlineExceeded,
            Self::Refused(status) => status.code(),
        }
    }

    /// The callee answered with `status` (an expired `grpc-timeout` is read as the deadline it is).
    pub(crate) fn refused(status: Status) -> Self {
        Self::Refused(normalize(status))
    }

    /// How long the callee asked the caller to wait before trying again (`grpc-retry-pushback-ms`
    /// on a shed call), if it did.
    pub fn pushback(&self) -> Option<Duration> {
        let Self::Refused(status) = self else {
            return None;
        };
        crate::door::pushback_of(
            status
                .metadata()
                .get(crate::door::PUSHBACK)?
                .to_str()
                .ok()?,
        )
    }

    /// Whether the call was certainly not processed, so another attempt may be made.
    pub fn retryable(&self) -> bool {
        self.code() == Code::Unavailable
    }

    /// A failure before any answer: `error` and its causes, for `service`.
    pub(crate) fn not_sent(service: &Arc<str>, error: &(dyn std::error::Error + 'static)) -> Self {
        Self::NotSent {
            service: service.clone(),
            cause: with_causes(error),
        }
    }
}

/// An HTTP/2 error on an answer that began, as gRPC maps it: a connection that is gone is
/// `UNAVAILABLE`.
impl From<h2::Error> for CallError {
    fn from(error: h2::Error) -> Self {
        let code = match error.reason() {
            _ if error.is_io() || error.is_go_away() => Code::Unavailable,
            Some(h2::Reason::REFUSED_STREAM) => Code::Unavailable,
            Some(h2::Reason::CANCEL) => Code::Cancelled,
            Some(h2::Reason::ENHANCE_YOUR_CALM) => Code::ResourceExhausted,
            Some(_) => Code::Internal,
            None => Code::Unknown,
        };
        Self::BrokenOff {
            code,
            cause: error.to_string(),
        }
    }
}

impl From<CallError> for Status {
    fn from(error: CallError) -> Self {
        match error {
            CallError::Refused(status) => bounded(status),
            other => bounded(Status::new(other.code(), other.to_string())),
        }
    }
}

/// `error` and every cause under it, joined by `: `.
pub(crate) fn with_causes(error: &(dyn std::error::Error + 'static)) -> String {
    let mut message = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        message.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    message
}

/// tonic reports an expired `grpc-timeout` as CANCELLED("Timeout expired"); callers rely on
/// DEADLINE_EXCEEDED.
fn normalize(status: Status) -> Status {
    if status.code() == Code::Cancelled && status.message().contains("Timeout expired") {
        Status::deadline_exceeded(status.message().to_string())
    } else {
        status
    }
}

/// The most bytes of a status message herd sends or relays: far below any peer's header limit
/// (16 KiB for herd's client, hyper's and tonic's alike), so that no input makes a hop send a
/// header the next one refuses.
pub const MAX_STATUS_MESSAGE: usize = 1024;
/// The most characters of a caller's input a message quotes.
pub const MAX_QUOTED_CHARS: usize = 32;

/// `status` as herd answers it: its code, its message cut to [`MAX_STATUS_MESSAGE`] bytes (at a
/// character boundary, `…` marking the cut), and nothing else a peer may have attached.
pub fn bounded(status: Status) -> Status {
    if status.message().len() <= MAX_STATUS_MESSAGE
        && status.details().is_empty()
        && status.metadata().is_empty()
    {
        return status;
    }
    Status::new(status.code(), cut(status.message(), MAX_STATUS_MESSAGE))
}

/// `text` cut to at most `max` bytes at a character boundary, with `…` (3 bytes) marking a cut.
fn cut(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_string();
    }
    let mut end = max.saturating_sub('…'.len_utf8());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

/// A caller's input as a status message quotes it: in quotes and escaped, at most
/// [`MAX_QUOTED_CHARS`] characters of it, `…` marking a cut.
pub fn quoted(input: &str) -> String {
    match input.char_indices().nth(MAX_QUOTED_CHARS) {
        None => format!("{input:?}"),
        Some((end, _)) => format!("{:?}…", &input[..end]),
    }
}

/// A downstream failure as this hop's caller should see it: statuses that describe the request
/// (bad input, not found, pinned revision gone, deadline, retryable) pass through unchanged so the
/// field names reach the caller; anything else keeps its code and says which service failed.
pub fn relay(service: &str, error: impl Into<Status>) -> Status {
    let status = error.into();
    match status.code() {
        Code::InvalidArgument
        | Code::NotFound
        | Code::FailedPrecondition
        | Code::DeadlineExceeded
        | Code::Unavailable => bounded(status),
        code => bounded(Status::new(
            code,
            format!("{service}: {}", status.message()),
        )),
    }
}

/// Why a request to etcd failed. etcd says why in the message of its gRPC status; this is the one
/// place that reads it.
#[derive(Debug, Clone, thiserror::Error)]
pub enum EtcdError {
    /// The revision asked for has been compacted away.
    #[error("revision {revision} has been compacted")]
    Compacted {
        /// The revision asked for.
        revision: i64,
    },
    /// The revision asked for is newer than etcd's.
    #[error("revision {revision} does not exist yet")]
    FutureRevision {
        /// The revision asked for.
        revision: i64,
    },
    /// No answer in time.
    #[error("no answer from etcd within {0:?}")]
    Timeout(Duration),
    /// A watch was cancelled by etcd (its start revision compacted, or another reason).
    #[error("watch cancelled (compact revision {compact_revision}, reason {reason:?})")]
    WatchCancelled {
        /// The compaction revision, when that is why.
        compact_revision: i64,
        /// etcd's reason.
        reason: String,
    },
    /// A watch's stream ended.
    #[error("watch stream ended")]
    WatchEnded,
    /// etcd could not be reached or failed the request.
    #[error("{0}")]
    Unavailable(String),
}

impl EtcdError {
    /// Classifies an error of a request made at `revision` (0: the newest).
    pub fn at(revision: i64, error: etcd_client::Error) -> Self {
        if let etcd_client::Error::GRpcStatus(status) = &error
            && status.code() == Code::OutOfRange
        {
            if status.message().contains("compacted") {
                return Self::Compacted { revision };
            }
            if status.message().contains("future revision") {
                return Self::FutureRevision { revision };
            }
        }
        Self::Unavailable(error.to_string())
    }
}

impl From<etcd_client::Error> for EtcdError {
    fn from(error: etcd_client::Error) -> Self {
        Self::at(0, error)
    }
}

/// Why a registration's lease is considered lost.
#[derive(Debug, Clone, thiserror::Error)]
pub enum LeaseLost {
    /// etcd answered a keepalive with TTL 0.
    #[error("lease expired or was revoked (TTL 0)")]
    Expired,
    /// No good keepalive answer within one TTL.
    #[error("no keepalive answer within one TTL")]
    Silent,
    /// The keepalive stream could not start, broke or ended.
    #[error("keepalive stream failed: {0}")]
    Stream(String),
    /// The registration key was deleted and could not be put back.
    #[error("putting the deleted key back failed: {0}")]
    KeyNotRestored(String),
}

/// The configuration a request is pinned to cannot be had.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RevisionError {
    /// No valid configuration has been loaded yet.
    #[error("configuration not loaded yet")]
    NotLoaded,
    /// The pinned revision is negative.
    #[error("context.config_revision: must not be negative, got {0}")]
    Negative(i64),
    /// etcd has compacted the pinned revision away.
    #[error(
        "context.config_revision: revision {0} has been compacted; retry without a pinned revision"
    )]
    Compacted(i64),
    /// The pinned revision is newer than etcd's.
    #[error("context.config_revision: revision {0} does not exist yet")]
    Future(i64),
    /// The configuration at the pinned revision is not valid.
    #[error("context.config_revision: configuration at revision {revision} is not valid ({error})")]
    Invalid {
        /// The pinned revision.
        revision: i64,
        /// What is wrong with it.
        error: crate::config::ConfigError,
    },
    /// etcd could not be asked.
    #[error("reading configuration at revision {revision}: {cause}")]
    Unreadable {
        /// The pinned revision.
        revision: i64,
        /// Why etcd did not answer.
        cause: EtcdError,
    },
}

impl RevisionError {
    /// The error of reading `revision` from etcd.
    pub(crate) fn reading(revision: i64, error: etcd_client::Error) -> Self {
        match EtcdError::at(revision, error) {
            EtcdError::Compacted { .. } => Self::Compacted(revision),
            EtcdError::FutureRevision { .. } => Self::Future(revision),
            cause => Self::Unreadable { revision, cause },
        }
    }
}

impl From<RevisionError> for Status {
    fn from(error: RevisionError) -> Self {
        let code = match &error {
            RevisionError::NotLoaded | RevisionError::Unreadable { .. } => Code::Unavailable,
            RevisionError::Negative(_) | RevisionError::Future(_) => Code::InvalidArgument,
            RevisionError::Compacted(_) | RevisionError::Invalid { .. } => Code::FailedPrecondition,
        };
        Status::new(code, error.to_string())
    }
}

/// The caller's deadline passed before the work started.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("deadline exceeded before the work started")]
pub struct Expired;

impl From<Expired> for Status {
    fn from(error: Expired) -> Self {
        Status::deadline_exceeded(error.to_string())
    }
}

/// A request whose context is missing what every request needs.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ContextError {
    /// No context at all.
    #[error("context: required")]
    Missing,
    /// No tenant in it.
    #[error("context.tenant_id: required")]
    NoTenant,
    /// A field out of its bounds.
    #[error("context.{field}: {reason}")]
    Invalid {
        /// The field, under `context.`.
        field: &'static str,
        /// The bound it breaks.
        reason: String,
    },
}

impl From<ContextError> for Status {
    fn from(error: ContextError) -> Self {
        Status::invalid_argument(error.to_string())
    }
}

/// Why an instance could not start serving, or stopped.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// Its address could not be bound or read.
    #[error("binding {address}: {source}")]
    Bind {
        /// The address.
        address: String,
        /// Why.
        source: std::io::Error,
    },
    /// A setting that cannot be used, naming it.
    #[error("{0}")]
    Settings(String),
    /// etcd could not be reached.
    #[error("connecting to etcd: {0}")]
    Etcd(#[from] crate::etcd::EtcdConnectError),
    /// Reflection could not be built from the descriptor sets.
    #[error("server reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    /// The server stopped on its own.
    #[error("the server stopped unexpectedly")]
    Stopped,
    /// The server's task panicked or was cancelled.
    #[error("the server task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
    /// The application's services could not be built.
    #[error("{0}")]
    Services(tower::BoxError),
    /// The instance's TLS material could not be used.
    #[error("{0}")]
    Tls(#[from] crate::tls::TlsError),
    /// Metrics could not be turned on (an OTLP endpoint that is not a URI, for example).
    #[error("{0}")]
    Metrics(#[from] crate::metrics::MetricsError),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_failure_has_its_code() {
        let service: Arc<str> = "pricing".into();
        let cases = [
            (
                CallError::NoInstance {
                    service: service.clone(),
                },
                Code::Unavailable,
                "pricing: no instance registered",
            ),
            (
                CallError::NoneServing {
                    service: service.clone(),
                    known: 1,
                    why: "1 not serving".into(),
                },
                Code::Unavailable,
                "pricing: 1 instance known, none serving (1 not serving)",
            ),
            (
                CallError::HttpStatus(http::StatusCode::NOT_FOUND),
                Code::Unimplemented,
                "the answer has HTTP status 404 Not Found",
            ),
            (
                CallError::TooLarge { limit: 4 },
                Code::ResourceExhausted,
                "answer larger than 4 bytes",
            ),
            (
                CallError::Refused(Status::not_found("items[0].sku: unknown SKU")),
                Code::NotFound,
                "items[0].sku: unknown SKU",
            ),
        ];
        for (error, code, message) in cases {
            let retryable = error.retryable();
            let status = Status::from(error);
            assert_eq!((status.code(), status.message()), (code, message));
            assert_eq!(retryable, code == Code::Unavailable);
        }
        let expired = CallError::refused(Status::cancelled("Timeout expired"));
        assert_eq!(expired.code(), Code::DeadlineExceeded);
        assert_eq!(Status::from(expired).code(), Code::DeadlineExceeded);
    }

    #[test]
    fn etcd_says_why_in_its_messages() {
        let compacted = etcd_client::Error::GRpcStatus(Status::out_of_range(
            "etcdserver: mvcc: required revision has been compacted",
        ));
        assert!(matches!(
            RevisionError::reading(7, compacted),
            RevisionError::Compacted(7)
        ));
        let future = etcd_client::Error::GRpcStatus(Status::out_of_range(
            "etcdserver: mvcc: required revision is a future revision",
        ));
        let status = Status::from(RevisionError::reading(9, future));
        assert_eq!(status.code(), Code::InvalidArgument);
        let down = etcd_client::Error::GRpcStatus(Status::unavailable("connection refused"));
        assert_eq!(
            Status::from(RevisionError::reading(9, down)).code(),
            Code::Unavailable
        );
    }

    #[test]
    fn statuses_are_bounded_and_quote_input_briefly() {
        let long = Status::not_found(format!("items[0].sku: unknown SKU {}", "é".repeat(100_000)));
        let status = bounded(long);
        assert!(status.message().len() <= MAX_STATUS_MESSAGE);
        assert!(status.message().ends_with('…'));
        assert_eq!(status.code(), Code::NotFound);
        let mut detailed = Status::with_details(Code::Internal, "x", vec![0; 100_000].into());
        detailed.metadata_mut().insert("big", "y".parse().unwrap());
        let status = bounded(detailed);
        assert!(status.details().is_empty() && status.metadata().is_empty());
        assert_eq!(quoted("unicorn"), "\"unicorn\"");
        assert_eq!(quoted(&"a".repeat(40)), format!("\"{}\"…", "a".repeat(32)));
        assert_eq!(quoted("a\nb"), "\"a\\nb\"");
        let relayed = relay("pricing", Status::internal("x".repeat(5000)));
        assert!(relayed.message().starts_with("pricing: xxx") && relayed.message().len() <= 1024);
    }

    #[test]
    fn relayed_statuses_name_the_service_unless_they_describe_the_request() {
        let kept = relay("tax", Status::invalid_argument("region: unknown"));
        assert_eq!(kept.message(), "region: unknown");
        let named = relay("tax", Status::internal("boom"));
        assert_eq!(named.message(), "tax: boom");
    }
}
