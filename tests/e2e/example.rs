//! A fifth service, written by following README's "Adding a service of your own"
//! (`examples/thing`), joins a running mesh: grpcurl lists and describes its contract, its health is
//! SERVING, and a caller outside the mesh reaches it by name with its typed method; its own
//! configuration section applies.

use std::time::Duration;

use herd_example_thing::DESCRIBE;
use herd_example_thing::pb::DescribeRequest;
use herd_tests::{TestMesh, eventually, fixture, grpcurl, health};

#[tokio::test(flavor = "multi_thread")]
async fn a_service_added_by_following_the_readme_joins_the_mesh() -> anyhow::Result<()> {
    let mut mesh = TestMesh::start(1, &fixture()).await?;
    mesh.etcd
        .put("/herd/config/thing", r#"{"note":"priced by the mesh"}"#)?;
    let proc = herd_tests::start_instance("thing", &mesh.etcd, 0, mesh.dir.path(), &[])?;
    mesh.instances.push(("thing".into(), proc));
    let index = mesh.instances.len() - 1;
    let (_, address) = mesh.wait_serving(index).await?;

    // Reflection knows the contract that lives in the example's crate.
    let list = grpcurl(&["-plaintext", &address, "list"])?;
    let list = String::from_utf8_lossy(&list.stdout).to_string();
    assert!(list.contains("yourteam.thing.v1.ThingService"), "{list}");
    let described = grpcurl(&[
        "-plaintext",
        &address,
        "describe",
        "yourteam.thing.v1.DescribeRequest",
    ])?;
    assert!(
        String::from_utf8_lossy(&described.stdout)
            .contains(".herd.context.v1.RequestContext context = 1"),
        "{described:?}"
    );
    assert_eq!(
        health(&address, "yourteam.thing.v1.ThingService").as_deref(),
        Some("SERVING")
    );

    // Found by name, balanced and called like any service of the mesh, by a caller outside it
    // with a typed method.
    let settings = <herd::CallerSettings as clap::Parser>::try_parse_from([
        "caller",
        "--etcd",
        &mesh.etcd.endpoint,
    ])?;
    let caller = herd::Caller::connect(&settings).await?;
    let channel = caller.channel("thing");
    eventually("the thing to be ready", Duration::from_secs(20), || async {
        (!channel.ready_instances().is_empty()).then_some(())
    })
    .await?;
    let request = DescribeRequest {
        context: Some(herd_proto::context::RequestContext {
            tenant_id: "acme".into(),
            ..Default::default()
        }),
        sku: "widget".into(),
        currency: "USD".into(),
        region: "US-CA".into(),
    };
    let answer = herd::client::call(
        herd::Deadline::after(Duration::from_secs(5)),
        &channel,
        DESCRIBE,
        &request,
    )
    .await?;
    // One widget at 19.99: the tools category's 5 % off (1.00), then 7.25 % tax on 18.99.
    let total = answer.unit_total.map(|m| (m.currency_code, m.minor_units));
    assert_eq!(total, Some(("USD".into(), 2037)));
    assert_eq!(answer.note, "priced by the mesh");
    Ok(())
}
