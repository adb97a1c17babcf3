//! Membership against a real etcd (`helios_tests::etcd::EtcdServer`, loopback only): workers
//! claim ranks under leases, a coordinator's `ClusterWatch` sees them come and go, and both
//! sides ride out etcd being killed and restarted.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use helios_proto::membership::{
    claim, claim_with_retry, ClaimError, ClusterWatch, EtcdClient, EtcdConnect, RankKey,
    RegistrationState, WorkerRecord, DEFAULT_RPC_TIMEOUT,
};
use helios_tests::etcd::EtcdServer;
use helios_tests::server::{send_signal, Process};
use tokio::sync::watch;

/// The bound on every wait for something that should happen promptly.
const PROMPTLY: Duration = Duration::from_secs(15);

fn record(instance: &str, port: u16) -> WorkerRecord {
    WorkerRecord {
        grpc_addr: format!("127.0.0.1:{port}"),
        comm_addr: format!("127.0.0.1:{}", port + 1),
        model_path: "/models/tiny".into(),
        model_fingerprint: "fp1-00112233445566aa".into(),
        version: "0.1.0".into(),
        instance: instance.into(),
    }
}

fn key(cluster: &str, rank: u32) -> RankKey {
    RankKey::new(cluster, 0, rank).unwrap()
}

/// Waits (at most `within`) until `rx`'s value satisfies `pred`; panics naming `what`,
/// with the last value, otherwise.
async fn wait_until<T: std::fmt::Debug>(
    rx: &mut watch::Receiver<T>,
    within: Duration,
    what: &str,
    pred: impl FnMut(&T) -> bool,
) {
    if tokio::time::timeout(within, rx.wait_for(pred))
        .await
        .is_err()
    {
        panic!("{what}: not within {within:?}; last: {:?}", *rx.borrow());
    }
}

/// The lease a registration holds its key under; panics if it is not registered.
fn lease_of(state: &watch::Receiver<RegistrationState>) -> i64 {
    match *state.borrow() {
        RegistrationState::Registered { lease_id } => lease_id,
        ref other => panic!("not registered: {other:?}"),
    }
}

async fn client(etcd: &EtcdServer) -> EtcdClient {
    EtcdClient::connect(
        &EtcdConnect::new(vec![etcd.endpoint()]),
        DEFAULT_RPC_TIMEOUT,
    )
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_is_seen_by_the_watch() {
    let etcd = EtcdServer::start().unwrap();
    let endpoints = EtcdConnect::new(vec![etcd.endpoint()]);
    let cw = ClusterWatch::start(&endpoints, "demo", 0).await.unwrap();
    let mut members = cw.members();
    assert!(members.borrow().is_empty());
    assert!(*cw.connected().borrow());

    let a = record("worker-a", 40000);
    let reg = claim(
        &endpoints,
        key("demo", 1),
        a.clone(),
        Duration::from_secs(10),
    )
    .await
    .unwrap();
    assert!(matches!(
        *reg.state().borrow(),
        RegistrationState::Registered { .. }
    ));
    wait_until(&mut members, PROMPTLY, "rank 1 appears", |m| {
        m.get(&1) == Some(&a)
    })
    .await;
    assert_eq!(members.borrow().len(), 1);

    // What etcd holds is the JSON record, under the documented key, attached to the lease.
    let kv = client(&etcd)
        .await
        .get("/helios/demo/replicas/0/ranks/1")
        .await
        .unwrap()
        .expect("the key exists");
    assert_eq!(WorkerRecord::from_json(&kv.value).unwrap(), a);
    let lease_id = lease_of(&reg.state());
    assert_eq!(kv.lease, lease_id);

    // A watch on another replica of the same cluster does not see it.
    let other = ClusterWatch::start(&endpoints, "demo", 1).await.unwrap();
    assert!(other.members().borrow().is_empty());
    reg.release().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_claim_of_a_rank_is_refused_naming_the_holder() {
    let etcd = EtcdServer::start().unwrap();
    let endpoints = EtcdConnect::new(vec![etcd.endpoint()]);
    let a = record("worker-a", 40000);
    let _reg = claim(
        &endpoints,
        key("demo", 1),
        a.clone(),
        Duration::from_secs(10),
    )
    .await
    .unwrap();
    let e = claim(
        &endpoints,
        key("demo", 1),
        record("worker-b", 40010),
        Duration::from_secs(10),
    )
    .await
    .err()
    .expect("the rank is taken");
    assert_eq!(
        e.to_string(),
        "rank 1 of replica 0 in cluster \"demo\" is already held by worker worker-a at \
         127.0.0.1:40000"
    );
    match e {
        ClaimError::Taken { key: k, holder } => {
            assert_eq!(k, key("demo", 1));
            assert_eq!(holder, a);
        }
        other => panic!("expected Taken, got {other:?}"),
    }
    // Another rank is free.
    claim(
        &endpoints,
        key("demo", 2),
        record("worker-b", 40010),
        Duration::from_secs(10),
    )
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_registration_is_gone_after_its_ttl_and_a_released_one_at_once() {
    let etcd = EtcdServer::start().unwrap();
    let endpoints = EtcdConnect::new(vec![etcd.endpoint()]);
    let cw = ClusterWatch::start(&endpoints, "demo", 0).await.unwrap();
    let mut members = cw.members();
    let ttl = Duration::from_secs(2);

    // Dropped without release, as a crash looks: gone once the lease expires.
    let crashed = claim(&endpoints, key("demo", 0), record("worker-a", 40000), ttl)
        .await
        .unwrap();
    wait_until(&mut members, PROMPTLY, "rank 0 appears", |m| {
        m.contains_key(&0)
    })
    .await;
    // Renewals keep it well past its TTL while the worker lives.
    tokio::time::sleep(ttl * 2).await;
    assert!(
        members.borrow().contains_key(&0),
        "renewed registration expired"
    );
    drop(crashed);
    let dropped = Instant::now();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        members.borrow().contains_key(&0),
        "a dropped registration must linger until its lease expires"
    );
    wait_until(&mut members, PROMPTLY, "rank 0 goes after its TTL", |m| {
        !m.contains_key(&0)
    })
    .await;
    assert!(
        dropped.elapsed() >= Duration::from_secs(1),
        "gone after {:?}, before its lease could expire",
        dropped.elapsed()
    );

    // Released: gone at once, long before its (long) TTL.
    let reg = claim(
        &endpoints,
        key("demo", 0),
        record("worker-b", 40010),
        Duration::from_secs(60),
    )
    .await
    .unwrap();
    wait_until(&mut members, PROMPTLY, "rank 0 is back", |m| {
        m.contains_key(&0)
    })
    .await;
    let released = Instant::now();
    reg.release().await.unwrap();
    wait_until(
        &mut members,
        Duration::from_secs(3),
        "rank 0 goes at release",
        |m| !m.contains_key(&0),
    )
    .await;
    assert!(released.elapsed() < Duration::from_secs(3));
    assert!(client(&etcd)
        .await
        .get(&key("demo", 0).key())
        .await
        .unwrap()
        .is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_sides_ride_out_an_etcd_restart() {
    let mut etcd = EtcdServer::start().unwrap();
    let endpoints = EtcdConnect::new(vec![etcd.endpoint()]);
    let cw = ClusterWatch::start(&endpoints, "demo", 0).await.unwrap();
    let mut members = cw.members();
    let mut connected = cw.connected();
    let a = record("worker-a", 40000);
    let reg = claim(
        &endpoints,
        key("demo", 0),
        a.clone(),
        Duration::from_secs(2),
    )
    .await
    .unwrap();
    let mut state = reg.state();
    let first = lease_of(&state);
    wait_until(&mut members, PROMPTLY, "rank 0 appears", |m| {
        m.contains_key(&0)
    })
    .await;
    let before: BTreeMap<u32, WorkerRecord> = members.borrow().clone();

    etcd.kill();
    wait_until(&mut state, PROMPTLY, "the registration notices", |s| {
        matches!(s, RegistrationState::Reconnecting { .. })
    })
    .await;
    wait_until(&mut connected, PROMPTLY, "the watch notices", |c| !*c).await;
    // Longer than the TTL: the worker keeps going, the watch keeps its view.
    let outage = Instant::now();
    while outage.elapsed() < Duration::from_secs(3) {
        assert_eq!(
            *members.borrow(),
            before,
            "the view changed during the outage"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    etcd.restart().unwrap();
    wait_until(&mut state, PROMPTLY, "registered again", |s| {
        matches!(s, RegistrationState::Registered { .. })
    })
    .await;
    wait_until(&mut connected, PROMPTLY, "the watch reconnects", |c| *c).await;
    // If the lease ran out during the outage (a loaded machine), the watch sees the key go and
    // come back with the new claim: either way rank 0 is back in the view.
    wait_until(&mut members, PROMPTLY, "rank 0 in the view again", |m| {
        m.get(&0) == Some(&a)
    })
    .await;

    // The key is held again under the registration's (current) lease, and is renewed.
    let lease_id = lease_of(&state);
    let kv = client(&etcd)
        .await
        .get(&key("demo", 0).key())
        .await
        .unwrap()
        .expect("the key is back");
    assert_eq!(kv.lease, lease_id);
    // etcd extends every lease when it comes back, so the registration usually goes on with
    // its lease; on a loaded machine the lease may have run out first, and then it claimed the
    // rank again under a new one (that path: the next test). Either way it holds its key.
    if lease_id != first {
        eprintln!("the lease ran out during the outage; claimed again");
    }

    // The watch follows changes made after the restart.
    let b = record("worker-b", 40010);
    let _reg_b = claim(
        &endpoints,
        key("demo", 1),
        b.clone(),
        Duration::from_secs(10),
    )
    .await
    .unwrap();
    wait_until(
        &mut members,
        PROMPTLY,
        "a member added after the restart",
        |m| m.get(&1) == Some(&b),
    )
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(members.borrow().get(&0), Some(&a), "rank 0 lapsed");
    assert!(matches!(
        *state.borrow(),
        RegistrationState::Registered { .. }
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_lease_is_claimed_again_unless_the_rank_was_taken() {
    let etcd = EtcdServer::start().unwrap();
    let endpoints = EtcdConnect::new(vec![etcd.endpoint()]);
    let c = client(&etcd).await;
    let cw = ClusterWatch::start(&endpoints, "demo", 0).await.unwrap();
    let mut members = cw.members();
    let a = record("worker-a", 40000);
    let reg = claim(
        &endpoints,
        key("demo", 0),
        a.clone(),
        Duration::from_secs(3),
    )
    .await
    .unwrap();
    let mut state = reg.state();
    let first = lease_of(&state);

    // The lease vanishes (as if it expired): the key goes, and the worker claims it again.
    assert!(c.lease_revoke(first).await.unwrap());
    wait_until(
        &mut state,
        PROMPTLY,
        "registered under a new lease",
        |s| matches!(s, RegistrationState::Registered { lease_id } if *lease_id != first),
    )
    .await;
    wait_until(&mut members, PROMPTLY, "rank 0 is back", |m| {
        m.get(&0) == Some(&a)
    })
    .await;
    let second = lease_of(&state);

    // Another worker's record replaces the key, then the lease vanishes: the worker does not
    // take the rank back, it reports who holds it (and keeps running).
    let b = record("worker-b", 40010);
    c.put(&key("demo", 0).key(), b.to_json(), 0).await.unwrap();
    c.lease_revoke(second).await.unwrap();
    wait_until(
        &mut state,
        PROMPTLY,
        "the rank is reported taken",
        |s| matches!(s, RegistrationState::Taken { holder } if *holder == b),
    )
    .await;
    wait_until(&mut members, PROMPTLY, "rank 0 is b", |m| {
        m.get(&0) == Some(&b)
    })
    .await;
    let kv = c.get(&key("demo", 0).key()).await.unwrap().unwrap();
    assert_eq!(WorkerRecord::from_json(&kv.value).unwrap(), b);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_keys_and_values_are_skipped() {
    let etcd = EtcdServer::start().unwrap();
    let endpoints = EtcdConnect::new(vec![etcd.endpoint()]);
    let c = client(&etcd).await;
    let good = record("worker-a", 40000);
    let prefix = RankKey::replica_prefix("demo", 0);
    c.put(&key("demo", 2).key(), good.to_json(), 0)
        .await
        .unwrap();
    c.put(&key("demo", 5).key(), b"not json".to_vec(), 0)
        .await
        .unwrap();
    c.put(&format!("{prefix}ranks/x"), good.to_json(), 0)
        .await
        .unwrap();
    c.put(&format!("{prefix}ranks/3/extra"), good.to_json(), 0)
        .await
        .unwrap();
    c.put(&format!("{prefix}other"), good.to_json(), 0)
        .await
        .unwrap();

    let cw = ClusterWatch::start(&endpoints, "demo", 0).await.unwrap();
    let mut members = cw.members();
    assert_eq!(
        members.borrow().keys().copied().collect::<Vec<_>>(),
        vec![2],
        "listed"
    );

    // The same through the watch.
    c.put(&key("demo", 7).key(), b"{\"grpc_addr\":1}".to_vec(), 0)
        .await
        .unwrap();
    c.put(&format!("{prefix}ranks/01"), good.to_json(), 0)
        .await
        .unwrap();
    let b = record("worker-b", 40010);
    c.put(&key("demo", 3).key(), b.to_json(), 0).await.unwrap();
    wait_until(&mut members, PROMPTLY, "rank 3 appears", |m| {
        m.contains_key(&3)
    })
    .await;
    assert_eq!(
        members.borrow().keys().copied().collect::<Vec<_>>(),
        vec![2, 3]
    );

    // A rank whose value turns malformed leaves the view; the watch goes on.
    c.put(&key("demo", 2).key(), b"garbage".to_vec(), 0)
        .await
        .unwrap();
    wait_until(&mut members, PROMPTLY, "rank 2 leaves", |m| {
        !m.contains_key(&2)
    })
    .await;
    c.delete(&key("demo", 3).key()).await.unwrap();
    wait_until(&mut members, PROMPTLY, "rank 3 leaves", |m| m.is_empty()).await;
    assert!(*cw.connected().borrow());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claiming_without_etcd_fails_clearly_in_bounded_time() {
    // A port nothing listens on.
    let port = helios_tests::free_port("127.0.0.1").unwrap();
    let endpoints = EtcdConnect::new(vec![format!("http://127.0.0.1:{port}")]);
    let start = Instant::now();
    let e = claim_with_retry(
        &endpoints,
        key("demo", 0),
        record("worker-a", 40000),
        Duration::from_secs(2),
        Duration::from_secs(2),
    )
    .await
    .err()
    .expect("no etcd there");
    assert!(start.elapsed() < Duration::from_secs(10));
    assert!(matches!(e, ClaimError::Unreachable { .. }), "{e:?}");
    let text = e.to_string();
    assert!(
        text.contains("etcd unreachable while claiming rank 0 of replica 0 in cluster \"demo\""),
        "{text}"
    );
    assert!(text.contains(&port.to_string()), "{text}");

    let e = ClusterWatch::start_with_retry(&endpoints, "demo", 0, Duration::from_secs(1))
        .await
        .err()
        .expect("no etcd there");
    assert!(format!("{e:#}").contains("etcd unreachable"), "{e:#}");
    assert!(ClusterWatch::start(&endpoints, "bad/name", 0)
        .await
        .is_err());
}

/// A worker told to stop (SIGTERM, as Kubernetes stops a pod) leaves at once and frees its
/// rank, long before its lease would run out, so that its replacement need not wait; and
/// `--worker-index I --tp T` (a StatefulSet pod's index) claims rank `I % T` of replica `I / T`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_worker_frees_its_rank_at_once_and_an_index_names_its_rank() {
    let etcd = EtcdServer::start().unwrap();
    let model = helios_tests::default_model();
    let mut cmd = helios_tests::helios_worker();
    cmd.args(["--listen", "127.0.0.1:0", "--threads", "1"])
        .args(["--etcd", &etcd.endpoint(), "--cluster", "pods"])
        .args(["--worker-index", "4", "--tp", "3", "--lease-ttl", "60"])
        .args(["--model", &model.display().to_string()]);
    let mut worker = Process::start(cmd, "HELIOS_WORKER_READY ");
    let etcd_client = client(&etcd).await;
    let key = "/helios/pods/replicas/1/ranks/1";
    assert!(
        etcd_client.get(key).await.unwrap().is_some(),
        "index 4 of tp 3 is rank 1 of replica 1"
    );

    send_signal(worker.pid(), "-TERM");
    let status = worker
        .wait_exit(PROMPTLY)
        .expect("the worker exits on SIGTERM");
    assert!(status.success(), "{status:?}");
    // Gone at once: the 60 s lease has not run out.
    assert!(
        etcd_client.get(key).await.unwrap().is_none(),
        "{key} still held"
    );
}
