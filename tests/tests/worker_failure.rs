//! A worker that dies and cannot come back (no restarts allowed) takes its replica down, not
//! the coordinator: requests in flight and new ones are answered UNAVAILABLE, health turns
//! NOT_SERVING, everything else keeps answering. (Workers that come back: `recovery.rs`.)

use std::time::{Duration, Instant};

use futures::StreamExt;
use helios_tests::observe;
use helios_tests::server::{
    long_request, model_info, send_signal, stream_started, tokenize, Process,
};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_worker_is_noticed_and_answered_unavailable() {
    let mut server = Process::serve_default("3", &["--max-worker-restarts", "0"]);
    let workers = server.children();
    assert_eq!(workers.len(), 3, "expected 3 worker processes: {workers:?}");
    let mut client = server.client().await;
    let long = long_request(2000);
    let (mut stream, _) = stream_started(&mut client, long.clone(), 2).await;

    let killed = Instant::now();
    send_signal(workers[1], "-KILL");

    // The request in flight ends with UNAVAILABLE within seconds.
    let ended = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match stream.next().await {
                Some(Ok(_)) => continue,
                Some(Err(e)) => return Some(e),
                None => return None,
            }
        }
    })
    .await
    .expect("the in-flight request was not answered within 10 s");
    let e = ended.expect("the stream ended without an error");
    assert_eq!(e.code(), tonic::Code::Unavailable, "{e:?}");
    assert!(e.message().contains("rank"), "{:?}", e.message());
    eprintln!(
        "in-flight request answered {:?} after the kill",
        killed.elapsed()
    );

    // New requests: UNAVAILABLE at once.
    let e = client.generate(long).await.expect_err("a new request");
    assert_eq!(e.code(), tonic::Code::Unavailable, "{e:?}");

    let mut health = HealthClient::new(server.channel().await);
    let status = health
        .check(HealthCheckRequest {
            service: "helios.v1.Generation".into(),
        })
        .await
        .expect("health")
        .into_inner()
        .status;
    assert_eq!(status, ServingStatus::NotServing as i32);

    // The coordinator itself is up and answers what needs no workers.
    assert!(server.is_running());
    assert!(!model_info(&mut client).await.ready);
    // /metrics says which rank went, and that the request in flight ended in an error.
    let metrics = observe(&["metrics", &server.http_url()]);
    let m = &metrics["prometheus"];
    assert_eq!(m["helios_worker_up{rank=\"1\",replica=\"0\"}"], 0.0, "{m}");
    assert_eq!(
        m["helios_requests_finished_total{finish_reason=\"error\"}"], 1.0,
        "{m}"
    );
    let ids = tokenize(&mut client, "still here")
        .await
        .expect("tokenize after the failure");
    assert!(!ids.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_dies_while_idle_is_noticed_too() {
    let server = Process::serve_default("3", &["--max-worker-restarts", "0"]);
    let workers = server.children();
    assert_eq!(workers.len(), 3);
    send_signal(workers[2], "-KILL");
    let mut health = HealthClient::new(server.channel().await);
    let down = async {
        loop {
            let status = health
                .check(HealthCheckRequest {
                    service: String::new(),
                })
                .await
                .expect("health")
                .into_inner()
                .status;
            if status == ServingStatus::NotServing as i32 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(5), down)
        .await
        .expect("health still SERVING 5 s after a worker died");
}
