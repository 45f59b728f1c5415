//! The process interface shared by every herd service binary: flags with environment equivalents
//! and named defaults, validated before any port is bound.

use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;

/// Default etcd endpoint: a local single-node etcd.
pub const DEFAULT_ETCD: &str = "http://127.0.0.1:2379";
/// Default key prefix under which herd keeps everything in etcd.
pub const DEFAULT_PREFIX: &str = "/herd/";

/// Exit code for a usage error (sysexits `EX_USAGE`).
pub const EXIT_USAGE: u8 = 64;

/// Process settings of a herd service.
#[derive(Debug, Clone, Parser)]
#[command(version, about)]
pub struct Settings {
    /// Address to listen on for gRPC (port 0 picks a free port; the bound address is registered).
    #[arg(
        long,
        env = "HERD_LISTEN",
        default_value = "127.0.0.1:0",
        value_name = "ADDR"
    )]
    pub listen: SocketAddr,

    /// The IP address other instances reach this one at, registered with the port bound (in
    /// Kubernetes: the pod's IP). Default: the address bound, loopback's when bound to all.
    #[arg(long, env = "HERD_ADVERTISE", value_name = "IP")]
    pub advertise: Option<std::net::IpAddr>,

    /// Also serve grpc.health.v1, and nothing else, in plaintext on this address: for
    /// orchestrators' probes (Kubernetes' gRPC probes speak neither TLS nor any other service).
    #[arg(long, env = "HERD_HEALTH_LISTEN", value_name = "ADDR")]
    pub health_listen: Option<SocketAddr>,

    /// Serve Prometheus metrics (`GET /metrics`, plain HTTP) on this address. Metrics are also
    /// pushed over OTLP when `OTEL_EXPORTER_OTLP_ENDPOINT` (or `..._METRICS_ENDPOINT`) is set;
    /// with neither, none are kept.
    #[arg(long, env = "HERD_METRICS_LISTEN", value_name = "ADDR")]
    pub metrics_listen: Option<SocketAddr>,

    /// How the instance reaches the mesh: etcd, the prefix, its TLS identity, subset size.
    #[command(flatten)]
    pub connect: ConnectSettings,

    /// A folder of secret files this instance's services read (a mounted Kubernetes Secret), such
    /// as the gateway's private quote-signing keys (`<key-id>.pem`); read again while it runs.
    #[arg(long, env = "HERD_SECRETS", value_name = "DIR")]
    pub secrets: Option<std::path::PathBuf>,

    /// Log format: `text` for people, `json` for log pipelines.
    #[arg(long, env = "HERD_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    pub log_format: String,

    /// Lease TTL in seconds for this instance's registration (etcd grants at least 2).
    #[arg(long, env = "HERD_LEASE_TTL", default_value_t = 5)]
    pub lease_ttl: i64,

    /// On shutdown, how long to keep serving after deregistering, so that watchers see the
    /// instance leave before it stops accepting calls (milliseconds).
    #[arg(long, env = "HERD_DRAIN_DELAY_MS", default_value_t = 1000)]
    pub drain_delay_ms: u64,

    /// On shutdown, the most time in-flight calls get to finish (milliseconds).
    #[arg(long, env = "HERD_DRAIN_TIMEOUT_MS", default_value_t = 10_000)]
    pub drain_timeout_ms: u64,

    /// The most connections the instance keeps open at once; one more is closed as soon as it
    /// is accepted.
    #[arg(long, env = "HERD_MAX_CONNECTIONS", default_value_t = 1024)]
    pub max_connections: usize,

    /// How long a new connection may take to send its first bytes (milliseconds).
    #[arg(long, env = "HERD_HANDSHAKE_TIMEOUT_MS", default_value_t = 5_000)]
    pub handshake_timeout_ms: u64,

    /// How long a connection may send nothing before it is closed (milliseconds); herd's own
    /// callers ping every half second while idle.
    #[arg(long, env = "HERD_IDLE_TIMEOUT_MS", default_value_t = 120_000)]
    pub idle_timeout_ms: u64,

    /// The most calls the instance serves at once, whatever its adaptive limit says; calls over
    /// the limit are answered UNAVAILABLE at once.
    #[arg(long, env = "HERD_MAX_IN_FLIGHT", default_value_t = 512)]
    pub max_in_flight: u32,

    /// The fewest calls the instance lets in at once, whatever its adaptive limit says (at most
    /// `--max-in-flight`): lower keeps the tail of admitted calls shorter under overload, higher
    /// refuses less of a caller that keeps a fixed number of calls in flight.
    #[arg(long, env = "HERD_MIN_IN_FLIGHT", default_value_t = 32)]
    pub min_in_flight: u32,
}

/// How a process reaches the mesh — an instance, or a caller outside it: etcd, the prefix herd's
/// keys are under, the TLS identity it presents, and how many instances of a service it
/// connects to.
#[derive(Debug, Clone, clap::Args)]
pub struct ConnectSettings {
    /// How to reach etcd: endpoints, TLS and credentials.
    #[command(flatten)]
    pub etcd: crate::etcd::EtcdSettings,

    /// Key prefix in etcd under which config and registrations live.
    #[arg(long, env = "HERD_PREFIX", default_value = DEFAULT_PREFIX)]
    pub prefix: String,

    /// How many instances of each service it calls a process connects to (0: all): each caller
    /// takes its own deterministic subset, so that connections stay bounded however many
    /// instances run; raised to ⌈instances/callers⌉ when callers are too few to cover them all.
    #[arg(long, env = "HERD_SUBSET_SIZE", default_value_t = 16)]
    pub subset_size: usize,

    /// This process's certificate (PEM, leaf first, naming `spiffe://<trust-domain>/herd/<service>`).
    /// With --tls-key and --tls-ca every hop is mutual TLS; an instance without all three speaks
    /// plaintext.
    #[arg(long, env = "HERD_TLS_CERT", value_name = "FILE")]
    pub tls_cert: Option<std::path::PathBuf>,

    /// This process's private key (PEM).
    #[arg(long, env = "HERD_TLS_KEY", value_name = "FILE")]
    pub tls_key: Option<std::path::PathBuf>,

    /// The CA certificates (PEM) that sign the mesh's identities. A caller outside the mesh may
    /// give it alone: TLS to the services, the caller known by its token.
    #[arg(long, env = "HERD_TLS_CA", value_name = "FILE")]
    pub tls_ca: Option<std::path::PathBuf>,
}

impl ConnectSettings {
    /// Checks the settings that clap's types cannot.
    pub fn validate(&self) -> Result<(), String> {
        self.etcd.validate()?;
        if !self.prefix.starts_with('/') || !self.prefix.ends_with('/') {
            return Err(format!(
                "--prefix: must start and end with '/', got {:?}",
                self.prefix
            ));
        }
        Ok(())
    }

    /// Where the process's TLS material is, when it speaks TLS (all three files given).
    pub fn tls_files(&self) -> Option<crate::tls::TlsFiles> {
        match (&self.tls_cert, &self.tls_key, &self.tls_ca) {
            (Some(cert), Some(key), Some(ca)) => Some(crate::tls::TlsFiles {
                cert: cert.clone(),
                key: key.clone(),
                ca: ca.clone(),
            }),
            _ => None,
        }
    }
}

impl Settings {
    /// Parses flags and environment for the binary of `service`, whose `--listen` defaults to
    /// `default_listen`; on a bad setting prints the reason and exits with 64.
    pub fn for_service(service: &str, default_listen: &'static str) -> Self {
        use clap::{CommandFactory, FromArgMatches};
        let command = Self::command()
            .bin_name(format!("herd-{service}"))
            .about(format!("herd's {service} service: a stateless mesh worker"))
            .mut_arg("listen", |a| a.default_value(default_listen));
        let parsed = command
            .try_get_matches()
            .and_then(|m| Self::from_arg_matches(&m));
        let settings = match parsed {
            Ok(s) => s,
            Err(e) if e.use_stderr() => {
                let _ = e.print();
                std::process::exit(i32::from(EXIT_USAGE));
            }
            Err(e) => e.exit(),
        };
        if let Err(message) = settings.validate() {
            eprintln!("error: {message}");
            std::process::exit(i32::from(EXIT_USAGE));
        }
        settings
    }

    /// Checks the settings that clap's types cannot.
    pub fn validate(&self) -> Result<(), String> {
        self.connect.validate()?;
        let c = &self.connect;
        let tls_given = [&c.tls_cert, &c.tls_key, &c.tls_ca]
            .iter()
            .filter(|f| f.is_some())
            .count();
        if tls_given != 0 && tls_given != 3 {
            return Err(
                "--tls-cert, --tls-key, --tls-ca: give all three (mutual TLS) or none".into(),
            );
        }
        if self.max_in_flight == 0 {
            return Err("--max-in-flight: at least 1".into());
        }
        if self.min_in_flight == 0 {
            return Err("--min-in-flight: at least 1".into());
        }
        if self.max_connections == 0 {
            return Err("--max-connections: at least 1".into());
        }
        if self.handshake_timeout_ms == 0 || self.idle_timeout_ms == 0 {
            return Err("--handshake-timeout-ms, --idle-timeout-ms: at least 1".into());
        }
        if !(1..=3600).contains(&self.lease_ttl) {
            return Err(format!(
                "--lease-ttl: must be 1..=3600 seconds, got {}",
                self.lease_ttl
            ));
        }
        Ok(())
    }

    /// The instance's concurrency limit: adaptive, under `--max-in-flight`.
    pub fn limit_settings(&self) -> crate::limit::LimitSettings {
        let defaults = crate::limit::LimitSettings::default();
        crate::limit::LimitSettings {
            max: self.max_in_flight,
            initial: defaults.initial.min(self.max_in_flight),
            min: self.min_in_flight.min(self.max_in_flight),
            ..defaults
        }
    }

    /// What the instance tolerates of the connections it accepts.
    pub fn hygiene(&self) -> crate::incoming::Hygiene {
        crate::incoming::Hygiene {
            max_connections: self.max_connections,
            handshake_timeout: Duration::from_millis(self.handshake_timeout_ms),
            idle_timeout: Duration::from_millis(self.idle_timeout_ms),
        }
    }

    /// How long to keep serving after deregistering.
    pub fn drain_delay(&self) -> Duration {
        Duration::from_millis(self.drain_delay_ms)
    }

    /// The bound on finishing in-flight calls at shutdown.
    pub fn drain_timeout(&self) -> Duration {
        Duration::from_millis(self.drain_timeout_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        let s = Settings::try_parse_from(["svc"]).expect("defaults parse");
        assert_eq!(s.connect.prefix, "/herd/");
        assert_eq!(s.connect.etcd.endpoints, vec![DEFAULT_ETCD.to_string()]);
        assert!(s.validate().is_ok());
    }

    #[test]
    fn bad_prefix_is_rejected() {
        let s = Settings::try_parse_from(["svc", "--prefix", "herd"]).expect("parses");
        assert!(s.validate().unwrap_err().contains("--prefix"));
    }

    #[test]
    fn the_limit_is_bounded_by_the_in_flight_flags() {
        let limit = |args: &[&str]| {
            let s = Settings::try_parse_from([&["svc"], args].concat()).expect("parses");
            s.validate().map(|()| s.limit_settings())
        };
        let defaults = limit(&[]).unwrap();
        assert_eq!((defaults.min, defaults.max), (32, 512));
        let lowered = limit(&["--min-in-flight", "8"]).unwrap();
        assert_eq!((lowered.min, lowered.max), (8, 512));
        // A cap below the minimum lowers the minimum with it.
        let capped = limit(&["--max-in-flight", "4"]).unwrap();
        assert_eq!((capped.min, capped.max), (4, 4));
        assert_eq!(
            limit(&["--min-in-flight", "0"]).unwrap_err(),
            "--min-in-flight: at least 1"
        );
    }

    #[test]
    fn several_etcd_endpoints() {
        let s =
            Settings::try_parse_from(["svc", "--etcd", "http://a:1,http://b:2"]).expect("parses");
        assert_eq!(s.connect.etcd.endpoints.len(), 2);
    }
}
