//! `make run` as a user runs it: `deploy/local/run.sh` starts etcd and the whole mesh, and Ctrl-C
//! (SIGINT to the terminal's process group) stops every instance first and etcd last, leaving no
//! process behind.

use std::os::unix::process::CommandExt;
use std::process::Command;
use std::time::Duration;

use herd_tests::{Proc, bin_dir, eventually, free_port};

/// Whether a process with this pid still exists (a zombie counts as gone).
fn alive(pid: &str) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            let state = stat
                .rsplit_once(')')?
                .1
                .split_whitespace()
                .next()?
                .to_string();
            Some(state != "Z")
        })
        .unwrap_or(false)
}

#[tokio::test(flavor = "multi_thread")]
async fn make_run_starts_the_mesh_and_ctrl_c_stops_it_etcd_last() -> anyhow::Result<()> {
    make_run(1).await
}

#[tokio::test(flavor = "multi_thread")]
async fn make_run_with_three_etcd_members() -> anyhow::Result<()> {
    make_run(3).await
}

/// `make run ETCD_MEMBERS=<members>`, on free ports; checks it up and Ctrl-C stopping it.
async fn make_run(members: usize) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let run_dir = dir.path().join("run");
    let gateways = [free_port(), free_port()];
    let ports = |n: usize| {
        (0..n)
            .map(|_| free_port().to_string())
            .collect::<Vec<_>>()
            .join(" ")
    };
    let etcd_ports = ports(members);
    let metrics_ports = ports(8);
    let mut cmd = Command::new("bash");
    cmd.arg(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/local/run.sh"
    ))
    .env("HERD_RUN_DIR", &run_dir)
    .env("HERD_BIN_DIR", bin_dir())
    .env("ETCD_MEMBERS", members.to_string())
    .env("HERD_ETCD_PORTS", &etcd_ports)
    .env("HERD_ETCD_PEER_PORTS", ports(members))
    .env(
        "HERD_GATEWAY_PORTS",
        format!("{} {}", gateways[0], gateways[1]),
    )
    .env("HERD_METRICS_PORTS", &metrics_ports)
    // Its own process group, as a shell gives a foreground job: Ctrl-C signals the group.
    .process_group(0);
    let mut run = Proc::spawn("run.sh", cmd, dir.path().join("run.log"))?;
    eventually("the mesh to be up", Duration::from_secs(90), || async {
        run.log_text().contains("The mesh is up").then_some(())
    })
    .await
    .map_err(|e| anyhow::anyhow!("{e}\n{}", run.log_text()))?;
    let pids: Vec<String> = std::fs::read_to_string(run_dir.join("pids"))?
        .lines()
        .map(str::to_string)
        .collect();
    assert_eq!(
        pids.len(),
        members + 8,
        "etcd's members and eight instances: {pids:?}"
    );
    // Every member is part of one cluster.
    let endpoints = etcd_ports
        .split(' ')
        .map(|p| format!("http://127.0.0.1:{p}"))
        .collect::<Vec<_>>()
        .join(",");
    let listed = Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .args(["--endpoints", &endpoints, "member", "list"])
        .output()?;
    let listed = String::from_utf8_lossy(&listed.stdout);
    assert_eq!(
        listed.lines().filter(|l| l.contains("started")).count(),
        members,
        "{listed}"
    );
    assert!(pids.iter().all(|p| alive(p)), "{pids:?}");
    // Every hop is mutual TLS: a caller from outside trusts the CA run.sh made.
    let ca = run_dir
        .join("certs")
        .join("ca.pem")
        .to_string_lossy()
        .to_string();
    for port in gateways {
        let address = format!("127.0.0.1:{port}");
        let transport = ["-cacert".to_string(), ca.clone()];
        assert_eq!(
            herd_tests::health_over(&transport, &address).as_deref(),
            Some("SERVING")
        );
        // A refused handshake makes grpcurl retry until its connect timeout.
        let plaintext = herd_tests::health_over(
            &["-plaintext".into(), "-connect-timeout".into(), "1".into()],
            &address,
        );
        assert_eq!(
            plaintext, None,
            "a gateway of make run answered in plaintext"
        );
    }

    // Every instance serves Prometheus metrics on the port it was given, registered.
    for port in metrics_ports.split(' ') {
        let samples = herd_tests::scrape_metrics(&format!("127.0.0.1:{port}"))?;
        let registered = samples
            .iter()
            .find(|s| s["name"] == "herd_registration_registered")
            .and_then(|s| s["value"].as_f64());
        assert_eq!(registered, Some(1.0), "metrics on {port}: {samples:?}");
    }

    // The status command run.sh prints: every instance asked over mutual TLS, each answering.
    let certs = run_dir.join("certs");
    let file = |name: &str| certs.join(name).to_string_lossy().to_string();
    let out = Command::new(herd_tests::bin("herdctl")?)
        .args(["--etcd", &endpoints])
        .args([
            "--tls-cert",
            &file("herdctl.pem"),
            "--tls-key",
            &file("herdctl-key.pem"),
        ])
        .args([
            "--tls-ca",
            &file("ca.pem"),
            "config",
            "status",
            "--output",
            "json",
        ])
        .output()?;
    let status: serde_json::Value = serde_json::from_slice(&out.stdout)
        .map_err(|e| anyhow::anyhow!("{e}: {}", String::from_utf8_lossy(&out.stderr)))?;
    let instances = status["instances"].as_array().cloned().unwrap_or_default();
    assert_eq!(instances.len(), 8, "{status}");
    assert!(
        instances
            .iter()
            .all(|i| i["unreachable"].is_null() && i["config"]["applied"].as_i64() > Some(0)),
        "{status}"
    );
    assert!(
        run.log_text().contains("--tls-ca") && run.log_text().contains("config status"),
        "run.sh no longer prints the status command"
    );

    // The caller from outside that run.sh prints, run as printed: a token, then three quotes.
    let printed: Vec<String> = run
        .log_text()
        .lines()
        .map(str::trim)
        .filter(|l| {
            l.starts_with("export JWT=") || l.starts_with("printf ") || l.contains("herd-caller ")
        })
        .map(str::to_string)
        .collect();
    assert_eq!(printed.len(), 3, "{printed:?}");
    let out = Command::new("bash")
        .arg("-c")
        .arg(printed.join(" && "))
        .output()?;
    assert_eq!(herd_tests::verified_quotes(&out)?, 3);

    // Ctrl-C.
    let status = Command::new("kill")
        .args(["-INT", "--", &format!("-{}", run.pid())])
        .status()?;
    assert!(status.success());
    run.wait_exit(Duration::from_secs(60)).await?;
    let log = run.log_text();
    assert!(
        log.contains("stopping etcd...") && log.ends_with("stopped.\n"),
        "{log}"
    );
    let left: Vec<&String> = pids.iter().filter(|p| alive(p)).collect();
    assert!(left.is_empty(), "still running: {left:?}\n{log}");

    // Every instance drained and stopped while etcd was still there: nothing it logged on the way
    // out is a warning (a lost watch, a failed deregistration).
    let logs = std::fs::read_dir(run_dir.join("logs"))?;
    let mut instances = 0;
    for entry in logs {
        let path = entry?.path();
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
            .to_string();
        if name.starts_with("etcd") {
            continue;
        }
        instances += 1;
        let text = std::fs::read_to_string(&path)?;
        assert!(
            text.contains("stopped"),
            "{name} did not stop cleanly:\n{text}"
        );
        // On the way out: from the signal on.
        let complaints: Vec<&str> = text
            .lines()
            .skip_while(|l| !(l.contains("SIGINT received") || l.contains("SIGTERM received")))
            .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
            .collect();
        assert!(complaints.is_empty(), "{name}: {complaints:#?}\n{text}");
    }
    assert_eq!(instances, 8);
    Ok(())
}
