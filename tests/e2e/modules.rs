//! herd's etcd-facing modules — watch, registry, discovery, config — driven in process against a
//! real etcd, through their public API: what each promises, with the state etcd holds checked
//! directly.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context, bail};
use etcd_client::{Client, EventType, GetOptions};
use herd::config::ConfigStore;
use herd::discovery::Resolver;
use herd::error::RevisionError;
use herd::instance::InstanceInfo;
use herd::layout::Layout;
use herd::registry::Registration;
use herd::watch::{Follower, Update, Watches};
use herd_tests::{Etcd, eventually};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const WAIT: Duration = Duration::from_secs(10);

async fn client(etcd: &Etcd) -> anyhow::Result<Client> {
    Ok(Client::connect([etcd.endpoint.as_str()], None).await?)
}

/// etcd's own count of what it holds for watchers: `(streams, watchers)`, from its `/metrics`.
async fn watch_gauges(etcd: &Etcd) -> anyhow::Result<(u64, u64)> {
    let address = etcd
        .endpoint
        .strip_prefix("http://")
        .context("a plaintext etcd")?;
    let mut stream = tokio::net::TcpStream::connect(address).await?;
    stream
        .write_all(b"GET /metrics HTTP/1.0\r\nHost: etcd\r\n\r\n")
        .await?;
    let mut text = String::new();
    stream.read_to_string(&mut text).await?;
    let gauge = |name: &str| -> anyhow::Result<u64> {
        text.lines()
            .find_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
            .with_context(|| format!("etcd reports no {name}"))?
            .trim()
            .parse::<f64>()
            .map(|v| v as u64)
            .with_context(|| format!("{name} is not a number"))
    };
    Ok((
        gauge("etcd_debugging_mvcc_watch_stream_total")?,
        gauge("etcd_debugging_mvcc_watcher_total")?,
    ))
}

async fn next_update(follower: &mut Follower) -> anyhow::Result<Update> {
    tokio::time::timeout(WAIT, follower.next())
        .await
        .context("no update from the follower")
}

#[tokio::test]
async fn a_follower_sees_a_snapshot_then_every_change_once_in_order_and_a_fresh_snapshot_after_etcd_restarts()
-> anyhow::Result<()> {
    let mut etcd = Etcd::start().await?;
    let mut kv = client(&etcd).await?;
    kv.put("/w/a", "1", None).await?;
    kv.put("/w/b", "1", None).await?;
    let read_at = kv
        .put("/elsewhere", "1", None)
        .await?
        .header()
        .map(|h| h.revision());
    let mut follower = Follower::new(Watches::new(client(&etcd).await?), "/w/".into());

    let Update::Reset { revision, kvs } = next_update(&mut follower).await? else {
        bail!("the first update is not a snapshot");
    };
    let keys: Vec<&[u8]> = kvs.iter().map(|kv| kv.key()).collect();
    assert_eq!(keys, [b"/w/a".as_slice(), b"/w/b".as_slice()]);
    assert_eq!(
        Some(revision),
        read_at,
        "the snapshot is read at etcd's revision"
    );

    // Thirty changes, deletions among them, some of them to other prefixes: each of this
    // prefix's is passed on once, in the order etcd made them.
    let mut expected = Vec::new();
    for i in 0..30 {
        let header = if i % 7 == 6 {
            kv.delete("/w/a", None)
                .await?
                .header()
                .map(|h| (h.revision(), EventType::Delete))
        } else if i % 5 == 4 {
            kv.put("/elsewhere", i.to_string(), None).await?;
            continue;
        } else {
            kv.put(
                format!("/w/{}", ["a", "b", "c"][i % 3]),
                i.to_string(),
                None,
            )
            .await?
            .header()
            .map(|h| (h.revision(), EventType::Put))
        };
        expected.push(header.context("etcd answered without a header")?);
    }
    let last = expected.last().map(|(r, _)| *r).unwrap_or_default();
    let mut seen = Vec::new();
    while seen.last().map(|(r, _)| *r) != Some(last) {
        match next_update(&mut follower).await? {
            Update::Events { events, newest } => {
                let revisions: Vec<(i64, EventType)> = events
                    .iter()
                    .filter_map(|e| Some((e.kv()?.mod_revision(), e.event_type())))
                    .collect();
                assert_eq!(revisions.last().map(|(r, _)| *r), Some(newest));
                seen.extend(revisions);
            }
            Update::Reset { .. } => bail!("a snapshot in the middle of an unbroken watch"),
        }
    }
    assert_eq!(seen, expected, "every change once, in order");

    // etcd goes away and comes back: the follower starts over from a snapshot of what is there.
    etcd.stop().await?;
    etcd.resume().await?;
    let mut kv = client(&etcd).await?;
    let after = kv
        .put("/w/d", "after", None)
        .await?
        .header()
        .map(|h| h.revision())
        .context("no header")?;
    let Update::Reset { revision, kvs } = next_update(&mut follower).await? else {
        bail!("the first update after etcd restarted is not a fresh snapshot");
    };
    if revision >= after {
        assert!(kvs.iter().any(|kv| kv.key() == b"/w/d"));
    } else {
        // The snapshot was read before the put: the put follows as a change.
        let Update::Events { newest, .. } = next_update(&mut follower).await? else {
            bail!("a second snapshot");
        };
        assert_eq!(newest, after);
    }
    Ok(())
}

#[tokio::test]
async fn every_watch_of_an_instance_shares_one_etcd_stream_and_a_dropped_watch_is_cancelled()
-> anyhow::Result<()> {
    let etcd = Etcd::start().await?;
    let watches = Watches::new(client(&etcd).await?);
    let mut held = Vec::new();
    for i in 0..30 {
        held.push(
            watches
                .watch(format!("/k/{i}"), etcd_client::WatchOptions::new())
                .await?,
        );
    }
    eventually("thirty watches on one etcd stream", WAIT, || async {
        (watch_gauges(&etcd).await.ok()? == (1, 30)).then_some(())
    })
    .await?;

    // Each watch is told of its own key only.
    let mut kv = client(&etcd).await?;
    for i in [0, 17, 29] {
        kv.put(format!("/k/{i}"), "v", None).await?;
    }
    let told = [0, 17, 29];
    for (i, watch) in held.iter_mut().enumerate() {
        // The first response says the watch was created; the puts were all made by now, so a
        // watch that is told of one is told at once.
        let wait = Duration::from_millis(if told.contains(&i) { 5_000 } else { 50 });
        let mut keys = Vec::new();
        while let Ok(Ok(Some(response))) = tokio::time::timeout(wait, watch.message()).await {
            keys.extend(
                response
                    .events()
                    .iter()
                    .filter_map(|e| e.kv().map(|kv| kv.key().to_vec())),
            );
            if !keys.is_empty() {
                break;
            }
        }
        let expected: Vec<Vec<u8>> = if told.contains(&i) {
            vec![format!("/k/{i}").into_bytes()]
        } else {
            Vec::new()
        };
        assert_eq!(keys, expected, "watch {i}");
    }

    held.truncate(10);
    eventually(
        "etcd to cancel the twenty dropped watches",
        WAIT,
        || async { (watch_gauges(&etcd).await.ok()? == (1, 10)).then_some(()) },
    )
    .await?;
    Ok(())
}

fn info(service: &str, id: &str, address: &str) -> InstanceInfo {
    InstanceInfo {
        service: service.into(),
        instance_id: id.into(),
        address: address.into(),
        pid: 1,
        version: "test".into(),
    }
}

/// The value and lease of `key`, if etcd holds it.
async fn held(kv: &mut Client, key: &str) -> Option<(InstanceInfo, i64)> {
    let resp = kv.get(key, None).await.ok()?;
    let found = resp.kvs().first()?;
    Some((serde_json::from_slice(found.value()).ok()?, found.lease()))
}

#[tokio::test]
async fn a_registration_lives_under_its_lease_comes_back_when_taken_and_leaves_at_once()
-> anyhow::Result<()> {
    let etcd = Etcd::start().await?;
    let layout = Layout::new("/herd/");
    let key = layout.instance("pricing", "p1");
    let me = info("pricing", "p1", "127.0.0.1:1");
    let mut kv = client(&etcd).await?;
    let registration = Registration::start(client(&etcd).await?, key.clone(), &me, 2).await?;
    assert!(registration.is_registered());
    let lease = registration.lease_id();
    assert!(lease > 0);
    let (value, on) = held(&mut kv, &key)
        .await
        .context("the key is not in etcd")?;
    assert_eq!((value.address.as_str(), on), ("127.0.0.1:1", lease));

    // Renewed every TTL/3: alive after three TTLs.
    let ttl = |kv: Client, lease| async move {
        let mut kv = kv;
        kv.lease_time_to_live(lease, None)
            .await
            .ok()
            .map(|r| r.ttl())
    };
    // (Time must pass for this: the sleep is the observation, not a synchronisation.)
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert!(
        ttl(kv.clone(), lease).await.is_some_and(|t| t > 0),
        "the lease expired while the registration lived"
    );

    // Someone deletes the key: it is put back, under the same lease.
    kv.delete(key.as_str(), None).await?;
    eventually("the deleted key to be put back", WAIT, || {
        let mut kv = kv.clone();
        let key = key.clone();
        async move { (held(&mut kv, &key).await?.1 == lease).then_some(()) }
    })
    .await?;

    // Someone revokes the lease (the key goes with it): a new lease, the key again.
    kv.lease_revoke(lease).await?;
    let renewed = eventually("a new lease and the key under it", WAIT, || {
        let mut kv = kv.clone();
        let key = key.clone();
        let now = registration.lease_id();
        async move {
            let (_, on) = held(&mut kv, &key).await?;
            (on != lease && on == now).then_some(on)
        }
    })
    .await?;
    assert!(registration.is_registered());

    // Deregistering revokes the lease: the key is gone when it returns, not a TTL later.
    registration.deregister().await;
    assert!(
        held(&mut kv, &key).await.is_none(),
        "the key outlived deregister"
    );
    assert!(ttl(kv.clone(), renewed).await.is_some_and(|t| t < 0));

    // Dropped without deregistering, a registration stops renewing: the key expires with its
    // lease.
    let dropped = Registration::start(client(&etcd).await?, key.clone(), &me, 2).await?;
    drop(dropped);
    assert!(held(&mut kv, &key).await.is_some());
    eventually("the dropped registration's key to expire", WAIT, || {
        let mut kv = kv.clone();
        let key = key.clone();
        async move { held(&mut kv, &key).await.is_none().then_some(()) }
    })
    .await?;
    Ok(())
}

#[tokio::test]
async fn discovery_follows_a_services_registrations_and_ignores_what_is_not_one()
-> anyhow::Result<()> {
    let etcd = Etcd::start().await?;
    let layout = Layout::new("/herd/");
    let resolver = Resolver::start(client(&etcd).await?, &layout, "pricing");
    let mut rx = resolver.subscribe();
    let found = tokio::time::timeout(WAIT, rx.wait_for(|d| d.is_some()))
        .await??
        .as_ref()
        .map(|e| e.len());
    assert_eq!(
        found,
        Some(0),
        "an empty service is discovered as empty, not unknown"
    );

    let mut kv = client(&etcd).await?;
    let put = |key: String, value: String| {
        let mut kv = kv.clone();
        async move { kv.put(key, value, None).await.map(|_| ()) }
    };
    let json = |i: &InstanceInfo| serde_json::to_string(i).unwrap_or_default();
    let registration = |service: &str, id: &str, address: &str| json(&info(service, id, address));
    for (key, value) in [
        (
            layout.instance("pricing", "p1"),
            registration("pricing", "p1", "127.0.0.1:1"),
        ),
        (
            layout.instance("pricing", "p2"),
            registration("pricing", "p2", "127.0.0.1:2"),
        ),
        // Not registrations of pricing: unreadable, another id than its key's, below an
        // instance's key, another service's.
        (layout.instance("pricing", "p3"), "{not json".into()),
        (
            layout.instance("pricing", "p4"),
            registration("pricing", "p9", "127.0.0.1:4"),
        ),
        (
            format!("{}/extra", layout.instance("pricing", "p5")),
            registration("pricing", "p5", "127.0.0.1:5"),
        ),
        (
            layout.instance("tax", "t1"),
            registration("tax", "t1", "127.0.0.1:6"),
        ),
    ] {
        put(key, value).await?;
    }
    let addresses = |rx: &tokio::sync::watch::Receiver<herd::discovery::Discovered>| {
        rx.borrow()
            .as_ref()
            .map(|e| {
                e.iter()
                    .map(|(id, i)| (id.clone(), i.address.clone()))
                    .collect::<BTreeMap<_, _>>()
            })
            .unwrap_or_default()
    };
    let two = BTreeMap::from([
        ("p1".to_string(), "127.0.0.1:1".to_string()),
        ("p2".to_string(), "127.0.0.1:2".to_string()),
    ]);
    // Events are applied in order: once p7, put last, is discovered, every put before it was
    // seen, and only p1, p2 and p7 are registrations of pricing.
    put(
        layout.instance("pricing", "p7"),
        registration("pricing", "p7", "127.0.0.1:7"),
    )
    .await?;
    eventually("p7 discovered", WAIT, || {
        let now = addresses(&rx);
        async move { now.contains_key("p7").then_some(()) }
    })
    .await?;
    let mut three = two.clone();
    three.insert("p7".into(), "127.0.0.1:7".into());
    assert_eq!(addresses(&rx), three);

    // A new address replaces the old; a deletion removes.
    put(
        layout.instance("pricing", "p2"),
        registration("pricing", "p2", "127.0.0.1:22"),
    )
    .await?;
    kv.delete(layout.instance("pricing", "p1"), None).await?;
    let one = BTreeMap::from([
        ("p2".to_string(), "127.0.0.1:22".to_string()),
        ("p7".to_string(), "127.0.0.1:7".to_string()),
    ]);
    eventually("p1 gone and p2 moved", WAIT, || {
        let now = addresses(&rx);
        let one = one.clone();
        async move { (now == one).then_some(()) }
    })
    .await?;
    let everything = kv
        .get(
            layout.service_prefix("pricing"),
            Some(GetOptions::new().with_prefix()),
        )
        .await?;
    assert_eq!(everything.kvs().len(), 5, "the others are still in etcd");
    Ok(())
}

/// The sampling ratio a snapshot of the runtime-only configuration holds.
fn ratio(snapshot: &herd::config::Snapshot<()>) -> Option<f64> {
    snapshot
        .runtime
        .telemetry
        .as_ref()
        .map(|t| t.sampling_ratio)
}

#[tokio::test]
async fn the_configuration_is_applied_rejected_and_read_at_any_revision_from_memory_or_etcd()
-> anyhow::Result<()> {
    let mut etcd = Etcd::start().await?;
    let layout = Layout::new("/herd/");
    let key = layout.config("telemetry");
    let mut kv = client(&etcd).await?;
    let writer = client(&etcd).await?;
    let write = |value: String| {
        let mut kv = writer.clone();
        let key = key.clone();
        async move {
            kv.put(key, value, None)
                .await?
                .header()
                .map(|h| h.revision())
                .context("no header")
        }
    };
    let first = write(r#"{"sampling_ratio":0.5}"#.into()).await?;
    let store = ConfigStore::<()>::start(client(&etcd).await?, layout.clone());
    tokio::time::timeout(WAIT, store.ready()).await?;
    let current = store.current().context("ready, yet nothing current")?;
    assert_eq!((current.revision, ratio(&current)), (first, Some(0.5)));

    // An invalid write is rejected whole, named by its revision, and the last good one stays.
    let bad = write(r#"{"sampling_ratio":2}"#.into()).await?;
    let mut status = store.subscribe_status();
    let rejected = tokio::time::timeout(WAIT, status.wait_for(|s| s.rejected.is_some()))
        .await??
        .rejected
        .clone()
        .context("no rejection")?;
    assert_eq!(rejected.revision, bad);
    assert_eq!(rejected.error.section, "telemetry");
    assert!(rejected.error.message.contains("sampling_ratio"));
    assert_eq!(store.status().applied, first);

    // A key no section claims is ignored and reported; the rest applies.
    let good = write(r#"{"sampling_ratio":0.25}"#.into()).await?;
    let unknown = kv
        .put(layout.config("zzz"), "{}", None)
        .await?
        .header()
        .map(|h| h.revision())
        .context("no header")?;
    tokio::time::timeout(WAIT, store.applied_at_least(unknown)).await?;
    assert_eq!(store.status().ignored, ["zzz"]);
    assert_eq!(
        store.at(good).await.ok().and_then(|s| ratio(&s)),
        Some(0.25)
    );
    assert_eq!(store.at(0).await.ok().map(|s| s.revision), Some(unknown));
    assert!(matches!(
        store.at(bad).await,
        Err(RevisionError::Invalid { revision, .. }) if revision == bad
    ));
    assert!(matches!(
        store.at(unknown + 1000).await,
        Err(RevisionError::Future(_))
    ));

    // More writes than the window holds: the oldest leave memory and are read from etcd.
    let count = herd::config::HISTORY_COUNT as i64 + 6;
    let mut newest = 0;
    for i in 0..count {
        newest = write(format!(r#"{{"sampling_ratio":{}}}"#, i as f64 / 1000.0)).await?;
    }
    tokio::time::timeout(WAIT, store.applied_at_least(newest)).await?;
    let history = store.history();
    assert_eq!(history.len(), herd::config::HISTORY_COUNT);
    assert_eq!(history.last(), Some(&newest));
    let oldest_held = history[0];
    let just_outside = oldest_held - 1;
    assert!(!history.contains(&just_outside) && !history.contains(&first));

    // With etcd stopped, what memory holds is served and what it does not is unreadable.
    etcd.stop().await?;
    let held = store.at(oldest_held).await.ok().and_then(|s| ratio(&s));
    assert_eq!(
        held,
        Some((oldest_held - (newest - count + 1)) as f64 / 1000.0)
    );
    assert!(matches!(
        tokio::time::timeout(WAIT, store.at(just_outside)).await?,
        Err(RevisionError::Unreadable { .. })
    ));
    etcd.resume().await?;
    let outside = tokio::time::timeout(WAIT, store.at(just_outside)).await??;
    assert_eq!(
        (outside.revision, ratio(&outside)),
        (
            just_outside,
            Some((just_outside - (newest - count + 1)) as f64 / 1000.0)
        )
    );
    let old = tokio::time::timeout(WAIT, store.at(first)).await??;
    assert_eq!(ratio(&old), Some(0.5));

    // Compacted away: FAILED_PRECONDITION, saying so.
    kv = client(&etcd).await?;
    kv.compact(newest, None).await?;
    let compacted = store.at(good).await;
    assert!(
        matches!(compacted, Err(RevisionError::Compacted(r)) if r == good),
        "{compacted:?}"
    );
    let status = tonic::Status::from(RevisionError::Compacted(good));
    assert_eq!(status.code(), tonic::Code::FailedPrecondition);
    Ok(())
}

#[tokio::test]
async fn a_member_that_takes_connections_but_answers_nothing_is_left_out() -> anyhow::Result<()> {
    let etcd = Etcd::start().await?;
    // Listening, never answering: its connections wait in the kernel's queue, as a restarted etcd
    // member's do until it has rejoined its cluster.
    let silent = std::net::TcpListener::bind("127.0.0.1:0")?;
    let endpoints = [
        format!("http://{}", silent.local_addr()?),
        etcd.endpoint.clone(),
    ];
    let mut kv = herd::etcd::connect(&endpoints).await?;
    kv.put("/silent/k", "v", None).await?;
    // Round robin over both would send every other call to the silent one.
    for i in 0..20 {
        let answer = tokio::time::timeout(Duration::from_secs(2), kv.get("/silent/k", None))
            .await
            .with_context(|| format!("call {i} was sent to the member that never answers"))??;
        anyhow::ensure!(answer.kvs().len() == 1, "call {i}: {answer:?}");
    }
    drop(silent);
    Ok(())
}
