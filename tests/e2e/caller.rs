//! A caller outside the mesh — `examples/caller`, a process that registers nothing and serves
//! nothing — gets every quote while the gateways it calls are killed, stopped and replaced.

use std::process::Command;
use std::time::Duration;

use herd_tests::{Proc, TestMesh, bin, eventually};

/// The quotes the caller has printed so far, each asked for and verified.
fn quotes(caller: &Proc) -> usize {
    caller
        .log_text()
        .lines()
        .filter(|l| l.starts_with("quote ") && l.ends_with(", verified"))
        .count()
}

/// Waits until the caller has printed `more` quotes beyond `after`, and is still running (it
/// exits at its first failed call).
async fn more_quotes(caller: &mut Proc, after: usize, more: usize) -> anyhow::Result<usize> {
    let wanted = after + more;
    let done = eventually(&format!("{wanted} quotes"), Duration::from_secs(30), || {
        let exited = caller.try_wait().ok().flatten();
        let done = quotes(caller);
        async move { (exited.is_some() || done >= wanted).then_some(done) }
    })
    .await?;
    if let Some(status) = caller.try_wait()? {
        anyhow::bail!(
            "the caller exited ({status}) after {done} quotes:\n{}",
            caller.log_text()
        );
    }
    Ok(done)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_caller_outside_the_mesh_gets_every_quote_while_gateways_are_killed_and_replaced()
-> anyhow::Result<()> {
    let mut mesh = TestMesh::start_seeded(2).await?;
    let token = herd_tests::token_file(&mesh)?;
    let mut command = Command::new(bin("herd-caller")?);
    command
        .args(["--etcd", &mesh.etcd.endpoint])
        .arg("--token-file")
        .arg(&token)
        .args(["--quotes", "1000000"]);
    let mut caller = Proc::spawn("caller", command, mesh.dir.path().join("caller.log"))?;
    let mut done = more_quotes(&mut caller, 0, 20).await?;

    // Five rounds: a gateway killed (kill -9, calls on it broken off), a new one started, an
    // old one stopped (SIGTERM: it drains), with quotes flowing between each step.
    for _ in 0..5 {
        let gateways: Vec<usize> = mesh
            .instances
            .iter()
            .enumerate()
            .filter(|(_, (service, _))| service == "gateway")
            .map(|(i, _)| i)
            .collect();
        let (killed, stopped) = (gateways[0], gateways[1]);
        mesh.instances[killed].1.signal("KILL")?;
        mesh.instances[killed]
            .1
            .wait_exit(Duration::from_secs(5))
            .await?;
        done = more_quotes(&mut caller, done, 20).await?;
        let new = mesh.add("gateway")?;
        mesh.wait_serving(new).await?;
        done = more_quotes(&mut caller, done, 20).await?;
        mesh.instances[stopped].1.signal("TERM")?;
        let status = mesh.instances[stopped]
            .1
            .wait_exit(Duration::from_secs(20))
            .await?;
        assert_eq!(status.code(), Some(0));
        let new = mesh.add("gateway")?;
        mesh.wait_serving(new).await?;
        done = more_quotes(&mut caller, done, 20).await?;
        // The two left are the new ones: the next round takes them.
        mesh.instances
            .retain_mut(|(_, proc)| proc.try_wait().ok().flatten().is_none());
    }
    // Every call succeeded: the caller stops at its first failure, and it never stopped.
    assert!(caller.try_wait()?.is_none(), "{}", caller.log_text());
    // It left nothing in etcd: no registration, no lease (one per instance, and no more).
    let registered = mesh.etcd.get_prefix("/herd/")?;
    assert!(
        registered.iter().all(|(key, _)| !key.contains("caller")),
        "{registered:?}"
    );
    let instances = mesh.etcd.get_prefix("/herd/services/")?.len();
    let leases = mesh.etcd.ctl(&["lease", "list"])?;
    let leases = String::from_utf8_lossy(&leases.stdout).to_string();
    assert!(
        leases.starts_with(&format!("found {instances} leases")),
        "{instances} instances: {leases}"
    );
    println!("{done} quotes asked for and verified through five rounds of gateway churn, 0 failed");
    caller.signal("TERM")?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_caller_with_a_certificate_of_its_own_is_known_by_it_and_held_to_the_policy()
-> anyhow::Result<()> {
    // Mutual TLS on every hop, as `make run` starts it; the caller gets a certificate from the
    // mesh's CA naming it `batch` (the CA is kept, a certificate made for the new name).
    let mesh = TestMesh::start_seeded_tls(1).await?;
    let certs = mesh
        .certs
        .clone()
        .ok_or_else(|| anyhow::anyhow!("a TLS mesh has certificates"))?;
    let issued = Command::new(bin("herdctl")?)
        .args(["certs", "init"])
        .arg(&certs)
        .args(["--services", "batch"])
        .output()?;
    assert!(issued.status.success(), "{issued:?}");
    let file = |name: &str| certs.join(name).to_string_lossy().to_string();
    let token = herd_tests::token_file(&mesh)?;
    let out = Command::new(bin("herd-caller")?)
        .args(["--etcd", &mesh.etcd.endpoint])
        .args([
            "--tls-cert",
            &file("batch.pem"),
            "--tls-key",
            &file("batch-key.pem"),
        ])
        .args(["--tls-ca", &file("ca.pem")])
        .arg("--token-file")
        .arg(&token)
        .args(["--quotes", "3"])
        .output()?;
    assert_eq!(herd_tests::verified_quotes(&out)?, 3);

    // Known by its certificate, it is held to the policy: no rule lets `batch` call pricing.
    let settings = <herd::CallerSettings as clap::Parser>::try_parse_from([
        "caller",
        "--etcd",
        &mesh.etcd.endpoint,
        "--tls-cert",
        &file("batch.pem"),
        "--tls-key",
        &file("batch-key.pem"),
        "--tls-ca",
        &file("ca.pem"),
    ])?;
    let caller = herd::Caller::connect(&settings).await?;
    let pricing = caller.channel("pricing");
    let mut ready = pricing.subscribe_ready();
    tokio::time::timeout(Duration::from_secs(20), ready.wait_for(|r| !r.is_empty())).await??;
    let request = herd_proto::pricing::PriceItemsRequest {
        context: Some(herd_proto::context::RequestContext {
            tenant_id: "acme".into(),
            ..Default::default()
        }),
        ..Default::default()
    };
    let refused = herd_proto::pricing::pricing_service_client::PricingServiceClient::new(pricing)
        .price_items(request)
        .await
        .expect_err("batch may not call pricing");
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
    assert!(refused.message().contains("batch"), "{refused:?}");
    Ok(())
}
