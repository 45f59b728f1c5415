//! herd's runtime: everything that turns a tonic service into a stateless mesh worker.
//!
//! - [`settings`]: the process interface every herd binary shares (`--listen`, `--etcd`, `--prefix`).
//! - [`layout`]: where herd's keys are in etcd.
//! - [`instance`]: what an instance says about itself there (its registration).
//! - [`admin`]: what an instance tells its operators when asked (the configuration it applied).
//! - [`etcd`]: connecting to etcd with the keepalive settings etcd tolerates.
//! - [`registry`]: registration of an instance under a lease that is kept alive and renewed.
//! - [`discovery`]: a snapshot-then-watch view of a service's live instances.
//! - [`balance`]: a client-side power-of-two-choices balancer over peak-EWMA latency.
//! - [`config`]: typed shared configuration: the registry of sections (the runtime's and the
//!   application's), loaded, watched, validated, and pinned by revision.
//! - [`context`]: request contexts and deadlines that travel with every call.
//! - [`tls`]: mutual TLS between instances with SPIFFE-style identities.
//! - [`authz`]: which mesh identities may call which methods, checked at the door.
//! - [`client`]: unary calls over a balanced channel, retried within a budget, on HTTP/2 over a
//!   pluggable transport.
//! - [`mesh`]: one instance's link to the mesh: identity, etcd, configuration, channels.
//! - [`handler`]: the opening every handler shares (span, deadline, context, pinned config).
//! - [`door`]: what every request passes before it is decoded (timeout, frame, size).
//! - [`incoming`]: connections as an instance accepts them: bounded, closed when silent.
//! - [`limit`]: how many calls an instance serves at once: an adaptive concurrency limit.
//! - [`server`]: serving with health, reflection, registration and graceful drain.
//! - [`binary`]: the life of a service binary or tool: settings, logs, signals, exit code.
//! - [`error`]: what can go wrong, typed, and the one place each becomes a gRPC status.
//! - [`telemetry`]: logs, OpenTelemetry spans and W3C trace context on every hop.
//! - [`metrics`]: golden metrics of every hop, scraped by Prometheus and pushed over OTLP.
//! - [`watch`]: following an etcd prefix through compactions and broken watches.

pub mod admin;
pub mod authz;
mod backlog;
pub mod balance;
pub mod binary;
pub mod caller;
pub mod client;
pub mod config;
pub mod context;
pub mod discovery;
pub mod door;
pub mod error;
pub mod etcd;
pub mod handler;
mod http2;
pub mod incoming;
pub mod instance;
pub mod layout;
pub mod limit;
pub mod mesh;
pub mod metrics;
pub mod registry;
pub mod server;
pub mod settings;
pub mod telemetry;
pub mod tls;
pub mod watch;
mod woken;

pub use balance::{Authorization, MeshChannel};
pub use caller::{Caller, CallerSettings};
pub use config::{
    ConfigError, ConfigModel, ConfigStore, Registry, Section, SectionSpec, Sections, Snapshot,
};
pub use context::Deadline;
pub use error::CallError;
pub use mesh::Mesh;
pub use server::Services;
pub use settings::Settings;
