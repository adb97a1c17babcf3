//! A replica whose workers find their coordinator through etcd (a real etcd server): workers
//! on three "hosts" register their ranks, a lost one is replaced by a new process claiming its
//! rank, an etcd restart loses nothing, and a worker that cannot join is refused, saying why.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use helios_tests::etcd::{self, Claim, EtcdServer};
use helios_tests::recovery::{
    assert_same_streams, http_get, metric, metrics_text, run_streams, workload, Running,
};
use helios_tests::server::{model_info, send_signal, wait_until_idle, Process};
use helios_tests::{make_tiny_model, TP3_MODEL};

const STREAMS: usize = 12;
const TOKENS: u32 = 24;

/// `helios-worker` on `host` registering as `rank` of replica `replica` of cluster `test`.
fn worker_command(etcd: &str, host: &str, replica: u32, rank: u32, model: &str) -> Command {
    let claim = Claim {
        cluster: "test",
        replica,
        rank,
    };
    etcd::worker_command(etcd, host, claim, model)
}

fn worker(etcd: &str, host: &str, rank: u32, model: &str) -> Process {
    Process::start(
        worker_command(etcd, host, 0, rank, model),
        "HELIOS_WORKER_READY ",
    )
}

/// A coordinator serving every replica of cluster `test`, `tp` ranks each.
fn coordinator_command(etcd: &str, tp: &str, model: &str) -> Command {
    Process::helios_command(
        "coordinator",
        &[
            "--model",
            model,
            "--etcd",
            etcd,
            "--cluster",
            "test",
            "--tp",
            tp,
            "--max-batch-tokens",
            "32",
        ],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_found_through_etcd_survive_an_etcd_restart_and_a_lost_rank() {
    let mut etcd = EtcdServer::start().expect("etcd");
    let endpoint = etcd.endpoint();
    let dir = tempfile::tempdir().expect("tempdir");
    make_tiny_model(dir.path(), 51, &TP3_MODEL).expect("tiny model");
    let model = dir.path().to_str().expect("utf-8");
    let mut workers: Vec<Option<Process>> = (0..3)
        .map(|r| Some(worker(&endpoint, &format!("127.0.0.{}", r + 2), r, model)))
        .collect();
    let server = Process::start(coordinator_command(&endpoint, "3", model), "HELIOS_READY ");
    let client = server.client().await;
    let undisturbed = run_streams(&client, workload(STREAMS, TOKENS)).await;

    // etcd goes away and comes back while streams run: nothing is lost.
    let run = Running::start(&client, workload(STREAMS, TOKENS));
    run.wait_for(STREAMS, Duration::from_secs(60)).await;
    etcd.kill();
    tokio::time::sleep(Duration::from_secs(1)).await;
    etcd.restart().expect("etcd restart");
    let through_outage = run.finish(Duration::from_secs(120)).await;
    assert_same_streams(&through_outage, &undisturbed);
    let http = server.http_url();
    assert_eq!(
        metric(
            &metrics_text(&http),
            "helios_recoveries_total{replica=\"0\"}"
        ),
        Some(0.0)
    );

    // A second worker claiming a held rank is refused, naming the holder.
    let out = worker_command(&endpoint, "127.0.0.5", 0, 1, model)
        .output()
        .expect("a second rank-1 worker");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("rank 1 of replica 0") && err.contains("already held"),
        "{err}"
    );

    // Membership works after the restart: rank 1 dies mid-run, a new process claims it.
    let run = Running::start(&client, workload(STREAMS, TOKENS));
    run.wait_for(STREAMS, Duration::from_secs(60)).await;
    // SIGKILL: its lease runs out within 2 s. Started at once, the replacement waits for that
    // lease, then claims the rank.
    drop(workers[1].take());
    workers[1] = Some(worker(&endpoint, "127.0.0.3", 1, model));
    let disturbed = run.finish(Duration::from_secs(120)).await;
    assert_same_streams(&disturbed, &undisturbed);
    let mut c = client.clone();
    let total = model_info(&mut c).await.kv_blocks_total;
    assert!(wait_until_idle(&mut c, total, Duration::from_secs(10))
        .await
        .is_some());
    assert_eq!(
        metric(
            &metrics_text(&http),
            "helios_recoveries_total{replica=\"0\"}"
        ),
        Some(1.0)
    );
}

#[test]
fn a_worker_of_another_model_is_refused_naming_both() {
    let etcd = EtcdServer::start().expect("etcd");
    let endpoint = etcd.endpoint();
    let dir = tempfile::tempdir().expect("tempdir");
    let (ours, theirs) = (dir.path().join("ours"), dir.path().join("theirs"));
    make_tiny_model(&ours, 61, &[]).expect("tiny model");
    make_tiny_model(&theirs, 62, &[]).expect("tiny model");
    let (ours, theirs) = (
        ours.to_str().expect("utf-8"),
        theirs.to_str().expect("utf-8"),
    );
    let _other = Process::start(
        worker_command(&endpoint, "127.0.0.2", 7, 0, theirs),
        "HELIOS_WORKER_READY ",
    );
    let log = dir.path().join("coordinator.log");
    let mut cmd = coordinator_command(&endpoint, "1", ours);
    let mut coordinator = cmd
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log"))
        .spawn()
        .expect("coordinator");
    let deadline = Instant::now() + Duration::from_secs(30);
    let text = loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.contains("refusing") || Instant::now() > deadline {
            break text;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let _ = coordinator.kill();
    let _ = coordinator.wait();
    assert!(
        text.contains("refusing the worker registered for rank 0"),
        "{text}"
    );
    assert!(
        text.contains(theirs) && text.contains(ours),
        "both models named: {text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_worker_is_lost_when_its_lease_expires_even_while_idle() {
    let etcd = EtcdServer::start().expect("etcd");
    let endpoint = etcd.endpoint();
    let dir = tempfile::tempdir().expect("tempdir");
    make_tiny_model(dir.path(), 53, &[]).expect("tiny model");
    let model = dir.path().to_str().expect("utf-8");
    let hosts = ["127.0.0.2", "127.0.0.3"];
    let mut workers: Vec<Process> = (0..2)
        .map(|r| worker(&endpoint, hosts[r], r as u32, model))
        .collect();
    let server = Process::start(coordinator_command(&endpoint, "2", model), "HELIOS_READY ");
    let mut client = server.client().await;
    assert!(model_info(&mut client).await.ready);

    // Rank 1 hangs while nothing runs: no step notices, its lease (2 s) does.
    send_signal(workers[1].pid(), "-STOP");
    let hung = Instant::now();
    let recovering = async {
        loop {
            let info = model_info(&mut client).await;
            if info.state == "recovering" {
                return info;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    let info = tokio::time::timeout(Duration::from_secs(20), recovering)
        .await
        .expect("not recovering 20 s after rank 1 hung");
    assert!(!info.ready);
    assert!(info.state_reason.contains("lease"), "{}", info.state_reason);
    let (code, health) = http_get(&server.http_url(), "/health");
    assert_eq!(code, 503, "{health}");
    assert!(health.contains("\"recovering\""), "{health}");
    eprintln!(
        "the hung rank was taken for lost after {:?}",
        hung.elapsed()
    );

    // A request meanwhile waits in the queue; a new worker for rank 1 brings the replica back
    // and the request is answered.
    let waiting = Running::start(&client, workload(1, 4));
    drop(workers.remove(1)); // the hung process is killed for good
    let _new = worker(&endpoint, "127.0.0.4", 1, model);
    let done = waiting.finish(Duration::from_secs(60)).await;
    assert!(done[0].is_ok(), "{done:?}");
    assert!(model_info(&mut client).await.ready);
}
