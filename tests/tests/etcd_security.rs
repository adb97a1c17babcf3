//! The etcd connection's security against a real etcd (loopback only): TLS with a CA of the
//! test's own (and a client certificate when etcd requires one), and etcd's user/password auth,
//! including a token that expires between calls; then a worker and a coordinator that reach
//! such an etcd with the same `--etcd-*` flags.

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use helios_proto::membership::{
    claim, is_auth_refused, ClaimError, ClusterWatch, EtcdClient, EtcdConnect, EtcdCredentials,
    EtcdTls, RankKey, WatchBatch, WorkerRecord, DEFAULT_RPC_TIMEOUT,
};
use helios_tests::etcd::{self, Claim, EtcdSecurity, EtcdServer, TestPki};
use helios_tests::make_tiny_model;
use helios_tests::server::{long_request, stream_all, Process};

/// The bound on every wait for something that should happen promptly.
const PROMPTLY: Duration = Duration::from_secs(15);
const PASSWORD: &str = "etcd-test-password";

fn record(instance: &str) -> WorkerRecord {
    WorkerRecord {
        grpc_addr: "127.0.0.1:40000".into(),
        comm_addr: "127.0.0.1:40001".into(),
        model_path: "/models/tiny".into(),
        model_fingerprint: "fp1-00112233445566aa".into(),
        version: "0.1.0".into(),
        instance: instance.into(),
    }
}

fn read(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap()
}

fn tls(pki: &TestPki, client_cert: bool) -> EtcdTls {
    EtcdTls {
        ca_pem: Some(read(&pki.ca)),
        identity: client_cert.then(|| (read(&pki.client_cert), read(&pki.client_key))),
    }
}

/// Put, get, a prefix watch that sees a put, a lease and its renewal: the calls membership uses.
async fn exercise(connect: &EtcdConnect) {
    let c = tokio::time::timeout(PROMPTLY, EtcdClient::connect(connect, DEFAULT_RPC_TIMEOUT))
        .await
        .expect("connect in time")
        .expect("connect");
    c.put("/t/a", b"1".to_vec(), 0).await.unwrap();
    assert_eq!(c.get("/t/a").await.unwrap().unwrap().value, b"1");
    let mut watch = c.watch_prefix("/t/", 0).await.unwrap();
    c.put("/t/b", b"2".to_vec(), 0).await.unwrap();
    match tokio::time::timeout(PROMPTLY, watch.next()).await {
        Ok(Ok(WatchBatch::Events { events, .. })) => {
            assert_eq!(events[0].kv.as_ref().unwrap().key, b"/t/b")
        }
        other => panic!("the watch saw no put: {other:?}"),
    }
    let lease = c.lease_grant(Duration::from_secs(10)).await.unwrap();
    let (mut keep, ttl) = c.keep_alive(lease.id).await.unwrap();
    assert!(ttl.is_some());
    assert!(keep.renew().await.unwrap().is_some());
    assert!(c.lease_revoke(lease.id).await.unwrap());
}

async fn connect_error(connect: &EtcdConnect) -> String {
    let e = EtcdClient::connect(connect, Duration::from_secs(3))
        .await
        .err()
        .expect("the connection must be refused");
    format!("{e:#}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_the_ca_works_and_without_it_fails_naming_the_certificate() {
    let etcd = EtcdServer::start_with(EtcdSecurity {
        tls: true,
        ..Default::default()
    })
    .unwrap();
    let pki = etcd.pki().unwrap();
    assert!(etcd.endpoint().starts_with("https://127.0.0.1:"));
    let mut connect = EtcdConnect::new(vec![etcd.endpoint()]);
    connect.tls = tls(pki, false);
    exercise(&connect).await;

    // No CA: the public roots do not know the test CA.
    let text = connect_error(&EtcdConnect::new(vec![etcd.endpoint()])).await;
    assert!(text.contains("certificate"), "{text}");
    assert!(text.contains("--etcd-ca"), "{text}");

    // A CA given with only http:// endpoints is refused before any connection.
    let mut plain = connect.clone();
    plain.endpoints = vec![etcd.endpoint().replace("https://", "http://")];
    let text = connect_error(&plain).await;
    assert!(text.contains("no etcd endpoint is https://"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_certificate_is_presented_when_etcd_requires_one() {
    let etcd = EtcdServer::start_with(EtcdSecurity {
        tls: true,
        client_cert_auth: true,
        ..Default::default()
    })
    .unwrap();
    let pki = etcd.pki().unwrap();
    let mut connect = EtcdConnect::new(vec![etcd.endpoint()]);
    connect.tls = tls(pki, true);
    exercise(&connect).await;

    // Without one, the handshake (or the first call on it) fails.
    connect.tls = tls(pki, false);
    let refused = match EtcdClient::connect(&connect, Duration::from_secs(3)).await {
        Err(e) => format!("{e:#}"),
        Ok(c) => format!(
            "{:#}",
            c.get("/t/a").await.expect_err("no client certificate")
        ),
    };
    assert!(
        refused.to_lowercase().contains("certificate") || refused.contains("tls"),
        "{refused}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_with_the_right_password_works_and_a_wrong_or_missing_one_fails() {
    let etcd = EtcdServer::start().unwrap();
    etcd.enable_auth(PASSWORD).unwrap();
    let mut connect = EtcdConnect::new(vec![etcd.endpoint()]);
    connect.credentials = Some(EtcdCredentials::new("root", PASSWORD));
    exercise(&connect).await;

    // Membership on top: a claim (lease, keep-alive) seen by a watch.
    let cw = ClusterWatch::start(&connect, "demo", 0).await.unwrap();
    let key = RankKey::new("demo", 0, 0).unwrap();
    let reg = claim(&connect, key, record("w-a"), Duration::from_secs(5))
        .await
        .unwrap();
    let mut members = cw.members();
    tokio::time::timeout(PROMPTLY, members.wait_for(|m| m.contains_key(&0)))
        .await
        .expect("the watch saw the claim")
        .unwrap();
    reg.release().await.unwrap();

    // A wrong password: refused at connect, naming authentication, and a claim gives up at
    // once rather than retrying as for an outage.
    let mut wrong = connect.clone();
    wrong.credentials = Some(EtcdCredentials::new("root", "not-the-password"));
    let e = EtcdClient::connect(&wrong, DEFAULT_RPC_TIMEOUT)
        .await
        .err()
        .expect("a wrong password");
    assert!(is_auth_refused(&e), "{e:#}");
    let text = format!("{e:#}");
    assert!(
        text.contains("authentication") && text.contains("root"),
        "{text}"
    );
    assert!(!text.contains("not-the-password"), "{text}");
    let key = RankKey::new("demo", 0, 1).unwrap();
    let started = std::time::Instant::now();
    let claimed = claim(&wrong, key, record("w-b"), Duration::from_secs(5)).await;
    assert!(matches!(claimed, Err(ClaimError::Invalid { .. })));
    assert!(started.elapsed() < PROMPTLY, "{:?}", started.elapsed());

    // No credentials: the connection opens, but every call is refused.
    let none = EtcdClient::connect(
        &EtcdConnect::new(vec![etcd.endpoint()]),
        DEFAULT_RPC_TIMEOUT,
    )
    .await
    .unwrap();
    let text = format!("{:#}", none.get("/t/a").await.unwrap_err());
    assert!(text.contains("user name is empty"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_token_is_renewed_and_the_call_retried() {
    let etcd = EtcdServer::start_with(EtcdSecurity {
        auth_token_ttl: Some(1),
        ..Default::default()
    })
    .unwrap();
    etcd.enable_auth(PASSWORD).unwrap();
    let mut connect = EtcdConnect::new(vec![etcd.endpoint()]);
    connect.credentials = Some(EtcdCredentials::new("root", PASSWORD));
    let c = EtcdClient::connect(&connect, DEFAULT_RPC_TIMEOUT)
        .await
        .unwrap();
    c.put("/t/a", b"1".to_vec(), 0).await.unwrap();
    // etcd drops a simple token unused for its TTL (checked every second).
    tokio::time::sleep(Duration::from_secs(4)).await;
    let got = c.get("/t/a").await.expect("the call with a renewed token");
    assert_eq!(got.unwrap().value, b"1");
    let lease = c.lease_grant(Duration::from_secs(30)).await.unwrap();
    tokio::time::sleep(Duration::from_secs(4)).await;
    let mut watch = c.watch_prefix("/t/", 0).await.unwrap();
    c.put("/t/b", b"2".to_vec(), lease.id).await.unwrap();
    assert!(matches!(
        tokio::time::timeout(PROMPTLY, watch.next()).await,
        Ok(Ok(WatchBatch::Events { .. }))
    ));
}

/// A worker and a coordinator reaching a TLS etcd with auth through their `--etcd-*` flags;
/// the coordinator serves a request on that worker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_and_a_coordinator_use_tls_and_auth_from_their_flags() {
    let etcd = EtcdServer::start_with(EtcdSecurity {
        tls: true,
        ..Default::default()
    })
    .unwrap();
    etcd.enable_auth(PASSWORD).unwrap();
    let pki = etcd.pki().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let password_file = dir.path().join("etcd-password");
    std::fs::write(&password_file, format!("{PASSWORD}\n")).unwrap();
    let model_dir = dir.path().join("model");
    std::fs::create_dir(&model_dir).unwrap();
    make_tiny_model(&model_dir, 52, &[]).unwrap();
    let model = model_dir.to_str().unwrap();
    let flags: Vec<String> = vec![
        "--etcd-ca".into(),
        pki.ca.display().to_string(),
        "--etcd-user".into(),
        "root".into(),
        "--etcd-password-file".into(),
        password_file.display().to_string(),
    ];
    let endpoint = etcd.endpoint();
    let claim = Claim {
        cluster: "sec",
        replica: 0,
        rank: 0,
    };
    let mut worker = etcd::worker_command(&endpoint, "127.0.0.1", claim, model);
    worker.args(&flags);
    let _worker = Process::start(worker, "HELIOS_WORKER_READY ");
    let mut coordinator = Process::helios_command(
        "coordinator",
        &["--model", model, "--etcd", &endpoint, "--cluster", "sec"],
    );
    coordinator.args(&flags);
    let server = Process::start(coordinator, "HELIOS_READY ");
    let mut client = server.client().await;
    let answer = tokio::time::timeout(
        Duration::from_secs(60),
        stream_all(&mut client, long_request(4)),
    )
    .await
    .expect("an answer in time");
    assert!(answer.is_ok(), "{answer:?}");

    // The same coordinator flags with a wrong password: it refuses to start, saying why.
    let wrong = dir.path().join("wrong");
    std::fs::write(&wrong, "nope\n").unwrap();
    let log = dir.path().join("refused.log");
    let ca = pki.ca.display().to_string();
    let mut refused = Process::helios_command(
        "coordinator",
        &["--model", model, "--etcd", &endpoint, "--cluster", "sec"],
    )
    .args([
        "--etcd-ca",
        &ca,
        "--etcd-user",
        "root",
        "--etcd-password-file",
    ])
    .arg(&wrong)
    .stdin(Stdio::null())
    .stdout(Stdio::null())
    .stderr(std::fs::File::create(&log).unwrap())
    .spawn()
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = refused.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = refused.kill();
            panic!("a coordinator with a wrong etcd password did not exit within 30 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(!status.success());
    let err = std::fs::read_to_string(&log).unwrap();
    assert!(
        err.contains("authentication") && err.contains("refused"),
        "{err}"
    );
}
