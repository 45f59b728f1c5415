//! The mesh on a three-member etcd cluster, as production runs it: every instance is given all
//! three endpoints, and what a real cluster does — a leader dies, quorum is lost for a while, an
//! endpoint was never there — costs callers nothing.

use std::time::{Duration, Instant};

use herd_tests::{Etcd, Load, TestMesh, all_applied, eventually, fixture};

/// Writes `value` at `key` through a member that answers; the revision it made.
async fn put(etcd: &Etcd, key: &str, value: &str) -> anyhow::Result<i64> {
    let client = herd::etcd::connect(&etcd.endpoints()).await?;
    // etcd-client spreads calls over every endpoint, the dead member's too: try again.
    eventually(
        &format!("etcd to take {key}"),
        Duration::from_secs(10),
        || {
            let mut client = client.clone();
            async move {
                let response = client.put(key, value, None).await.ok()?;
                response.header().map(|h| h.revision())
            }
        },
    )
    .await
}

/// A steady load through the gateways found in etcd, and a way to wait for more calls.
async fn load(mesh: &TestMesh) -> anyhow::Result<Load> {
    Load::start(
        &mesh.etcd,
        4,
        Duration::from_millis(5),
        Duration::from_secs(5),
    )
    .await
}

/// Every instance's log, for a failure's message.
fn logs(mesh: &TestMesh) -> String {
    mesh.logs_of(&herd_tests::SERVICES)
        .into_iter()
        .map(|(service, log)| format!("--- {service}\n{log}"))
        .collect()
}

/// Every registered instance's `herd.registration` health, by address.
fn registration(mesh: &TestMesh, addresses: &[String]) -> Vec<Option<String>> {
    addresses
        .iter()
        .map(|a| mesh.health(a, herd::server::REGISTRATION_HEALTH))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_leader_killed_under_load_fails_no_call_and_configuration_applies_after()
-> anyhow::Result<()> {
    let mut mesh = TestMesh::start_on(Etcd::start_cluster(3).await?, 1, &fixture()).await?;
    let load = load(&mesh).await?;
    load.more(100).await?;
    let leader = mesh
        .etcd
        .leader()
        .ok_or_else(|| anyhow::anyhow!("no leader"))?;
    let killed = Instant::now();
    mesh.etcd.stop_member(leader, "KILL").await?;
    let next = eventually("a new leader", Duration::from_secs(20), || async {
        mesh.etcd.leader().filter(|&l| l != leader)
    })
    .await?;
    println!(
        "REPORT cluster: member {leader} (leader) killed; member {next} leads after {:?}",
        killed.elapsed()
    );
    // A configuration change after the election reaches every instance.
    let revision = put(
        &mesh.etcd,
        "/herd/config/limits",
        r#"{"max_items":6,"max_quantity":50}"#,
    )
    .await?;
    all_applied(&mesh, 4, revision)
        .await
        .map_err(|e| anyhow::anyhow!("{e}\n{}", logs(&mesh)))?;
    load.more(200).await?;
    mesh.etcd.resume_member(leader)?;
    let report = load.stop().await;
    println!("REPORT cluster, leader killed: {report}");
    assert_eq!(report.failures(), 0, "{report}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn quorum_lost_for_30_s_the_mesh_serves_on_and_registers_again() -> anyhow::Result<()> {
    let mut mesh = TestMesh::start_on(Etcd::start_cluster(3).await?, 1, &fixture()).await?;
    let addresses: Vec<String> = herd_tests::SERVICES
        .iter()
        .map(|s| mesh.addresses(s))
        .collect::<anyhow::Result<Vec<_>>>()?
        .concat();
    let load = load(&mesh).await?;
    load.more(100).await?;
    // Two of three members stopped: no quorum, no leader, no lease renewed, no write.
    let lost = Instant::now();
    mesh.etcd.stop_member(1, "TERM").await?;
    mesh.etcd.stop_member(2, "TERM").await?;
    eventually(
        "every instance to report its registration lost",
        Duration::from_secs(15),
        || async {
            registration(&mesh, &addresses)
                .iter()
                .all(|h| h.as_deref() == Some("NOT_SERVING"))
                .then_some(())
        },
    )
    .await?;
    println!(
        "REPORT cluster: registrations reported lost {:?} after quorum was",
        lost.elapsed()
    );
    // The outage lasts 30 s; calls flow all along on the endpoints already known.
    let outage = Duration::from_secs(30);
    let mut served = load.report().sent;
    while lost.elapsed() < outage {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let now = load.report().sent;
        assert!(
            now > served,
            "no call completed for a second during the outage"
        );
        served = now;
        assert_eq!(load.report().failures(), 0, "{}", load.report());
    }
    mesh.etcd.resume_member(1)?;
    mesh.etcd.resume_member(2)?;
    eventually("quorum back", Duration::from_secs(20), || async {
        mesh.etcd
            .ctl(&["endpoint", "health"])
            .ok()
            .filter(|o| o.status.success())
            .map(|_| ())
    })
    .await?;
    let quorum = Instant::now();
    eventually(
        "every instance registered again",
        Duration::from_secs(15),
        || async {
            registration(&mesh, &addresses)
                .iter()
                .all(|h| h.as_deref() == Some("SERVING"))
                .then_some(())
        },
    )
    .await
    .map_err(|e| anyhow::anyhow!("{e}\n{}", logs(&mesh)))?;
    let again = quorum.elapsed();
    println!("REPORT cluster: every instance registered again {again:?} after quorum returned");
    load.more(100).await?;
    let report = load.stop().await;
    println!("REPORT cluster, quorum lost for {outage:?}: {report}");
    assert_eq!(report.failures(), 0, "{report}\n{}", logs(&mesh));
    assert!(
        again <= Duration::from_secs(2),
        "registered again only after {again:?}\n{}",
        logs(&mesh)
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn an_endpoint_that_was_never_there_does_not_stop_an_instance() -> anyhow::Result<()> {
    let mut etcd = Etcd::start_cluster(3).await?;
    // Member 2 is down from the start, but every instance is still given its endpoint.
    etcd.stop_member(2, "TERM").await?;
    let mesh = TestMesh::start_on(etcd, 1, &fixture()).await?;
    let load = load(&mesh).await?;
    load.more(200).await?;
    let report = load.stop().await;
    assert_eq!(report.failures(), 0, "{report}");
    Ok(())
}
