//! A lost worker costs a pause, not a request: its replica requeues what ran, replaces the rank
//! (respawned here, restarted at its address, or a new registration) and rebuilds itself, and
//! every stream finishes with exactly the tokens of an undisturbed run.

use std::time::{Duration, Instant};

use helios_tests::recovery::{
    assert_same_streams, metric, metrics_text, run_streams, workload, Answers, Running,
};
use helios_tests::server::{model_info, send_signal, wait_until_idle, Process};
use helios_tests::{free_port, helios_worker, make_tiny_model, TP3_MODEL};

/// Streams in every run, and tokens each generates.
const STREAMS: usize = 16;
const TOKENS: u32 = 24;
/// A small step budget: long prompts are read in several chunks.
const SERVE_FLAGS: [&str; 4] = ["--max-batch-tokens", "32", "--recovery-timeout", "60"];

/// Runs the workload undisturbed, then again while `disturb` breaks the replica once a few
/// responses have come back; both results.
async fn disturbed_run(server: &Process, disturb: impl FnOnce()) -> (Answers, Answers) {
    let client = server.client().await;
    let undisturbed = run_streams(&client, workload(STREAMS, TOKENS)).await;
    let run = Running::start(&client, workload(STREAMS, TOKENS));
    run.wait_for(STREAMS, Duration::from_secs(120)).await;
    disturb();
    (undisturbed, run.finish(Duration::from_secs(180)).await)
}

/// Nothing held once the requests are done, and the replica serves.
async fn assert_idle_and_serving(server: &Process) {
    let mut client = server.client().await;
    let total = model_info(&mut client).await.kv_blocks_total;
    let info = wait_until_idle(&mut client, total, Duration::from_secs(10))
        .await
        .expect("blocks still held after every request ended");
    assert!(info.ready, "not serving after the recovery");
}

fn recoveries(server: &Process) -> f64 {
    metric(
        &metrics_text(&server.http_url()),
        "helios_recoveries_total{replica=\"0\"}",
    )
    .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_local_worker_is_respawned_and_no_stream_notices() {
    let server = Process::serve_default("3", &SERVE_FLAGS);
    let workers = server.children();
    assert_eq!(workers.len(), 3);
    let killed = Instant::now();
    let (undisturbed, disturbed) =
        disturbed_run(&server, || send_signal(workers[1], "-KILL")).await;
    assert_same_streams(&disturbed, &undisturbed);
    eprintln!("16 streams finished {:?} after the kill", killed.elapsed());
    assert_idle_and_serving(&server).await;
    let text = metrics_text(&server.http_url());
    assert_eq!(
        metric(&text, "helios_recoveries_total{replica=\"0\"}"),
        Some(1.0),
        "{text}"
    );
    assert!(metric(&text, "helios_sequences_requeued_total{replica=\"0\"}").unwrap_or(0.0) >= 1.0);
    assert_eq!(
        metric(&text, "helios_worker_up{replica=\"0\",rank=\"1\"}"),
        Some(1.0)
    );
    let now = server.children();
    assert_eq!(now.len(), 3, "{now:?}");
    assert!(!now.contains(&workers[1]), "rank 1 was not replaced");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_worker_is_found_replaced_and_no_stream_notices() {
    let server = Process::serve_default("3", &SERVE_FLAGS);
    let workers = server.children();
    let (undisturbed, disturbed) =
        disturbed_run(&server, || send_signal(workers[2], "-STOP")).await;
    assert_same_streams(&disturbed, &undisturbed);
    assert_idle_and_serving(&server).await;
    assert_eq!(recoveries(&server), 1.0);
    // The stopped process was killed for good, not left holding its ports.
    let stat = std::fs::read_to_string(format!("/proc/{}/stat", workers[2])).unwrap_or_default();
    assert!(
        stat.is_empty() || stat.contains(") Z "),
        "still there: {stat}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kills_in_a_row_and_during_a_recovery_lose_nothing() {
    let server = Process::serve_default("3", &SERVE_FLAGS);
    let workers = server.children();
    let (undisturbed, disturbed) = disturbed_run(&server, || {
        send_signal(workers[1], "-KILL");
        // Kill rank 1's replacement as soon as it is spawned, during the recovery.
        let deadline = Instant::now() + Duration::from_secs(30);
        let replacement = loop {
            let now = server.children();
            if let Some(&p) = now.iter().find(|p| !workers.contains(p)) {
                break p;
            }
            assert!(Instant::now() < deadline, "rank 1 was not respawned");
            std::thread::sleep(Duration::from_millis(2));
        };
        send_signal(replacement, "-KILL");
        // And once the replica serves again, another rank.
        let deadline = Instant::now() + Duration::from_secs(60);
        while recoveries(&server) < 1.0 {
            assert!(Instant::now() < deadline, "no recovery within 60 s");
            std::thread::sleep(Duration::from_millis(20));
        }
        send_signal(workers[2], "-KILL");
    })
    .await;
    assert_same_streams(&disturbed, &undisturbed);
    assert_idle_and_serving(&server).await;
    assert!(recoveries(&server) >= 2.0);
}

/// `helios-worker` listening on `addr` (its communicator on the same host).
fn worker_at(addr: &str) -> Process {
    let mut cmd = helios_worker();
    cmd.args(["--listen", addr, "--threads", "1"]);
    Process::start(cmd, "HELIOS_WORKER_READY ")
}

/// Three workers on three "hosts" (127.0.0.2, .3, .4) and a coordinator over them: nothing of
/// theirs listens on 127.0.0.1, so an address used wrongly fails. Their addresses, the workers,
/// and the coordinator.
fn static_replica(model: &str, extra: &[&str]) -> (Vec<String>, Vec<Process>, Process) {
    let addrs: Vec<String> = (2..5)
        .map(|h| {
            let host = format!("127.0.0.{h}");
            format!("{host}:{}", free_port(&host).expect("a free port"))
        })
        .collect();
    let workers: Vec<Process> = addrs.iter().map(|a| worker_at(a)).collect();
    for (w, a) in workers.iter().zip(&addrs) {
        assert_eq!(
            &w.addr, a,
            "a worker advertises another address than it was given"
        );
        let comm = w.ready_line.split("comm=").nth(1).unwrap_or_default();
        let host = a.split(':').next().unwrap_or_default();
        assert!(
            comm.starts_with(host),
            "communicator on {comm}, not on {host}"
        );
    }
    let mut args = vec!["--model", model, "--workers"];
    let list = addrs.join(",");
    args.push(&list);
    args.extend_from_slice(extra);
    let coordinator = Process::start(
        Process::helios_command("coordinator", &args),
        "HELIOS_READY ",
    );
    (addrs, workers, coordinator)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_static_worker_restarted_at_its_address_rejoins_on_distinct_hosts() {
    let dir = tempfile::tempdir().expect("tempdir");
    make_tiny_model(dir.path(), 41, &TP3_MODEL).expect("tiny model");
    let model = dir.path().to_str().expect("utf-8");
    let (addrs, mut workers, coordinator) = static_replica(model, &SERVE_FLAGS);
    let restarted = std::sync::Mutex::new(None);
    let (undisturbed, disturbed) = disturbed_run(&coordinator, || {
        let killed = workers.remove(1);
        drop(killed); // SIGKILL, and reaped
        std::thread::sleep(Duration::from_millis(300));
        *restarted.lock().expect("lock") = Some(worker_at(&addrs[1]));
    })
    .await;
    assert_same_streams(&disturbed, &undisturbed);
    assert_idle_and_serving(&coordinator).await;
    assert_eq!(recoveries(&coordinator), 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rank_that_never_returns_fails_its_requests_after_the_recovery_timeout() {
    let dir = tempfile::tempdir().expect("tempdir");
    make_tiny_model(dir.path(), 43, &TP3_MODEL).expect("tiny model");
    let model = dir.path().to_str().expect("utf-8");
    let flags = ["--max-batch-tokens", "64", "--recovery-timeout", "3"];
    let (addrs, mut workers, coordinator) = static_replica(model, &flags);
    let client = coordinator.client().await;
    // Short prompts (the tiny model holds 512 positions), long answers.
    let run = Running::start(&client, workload(3, 450));
    run.wait_for(3, Duration::from_secs(60)).await;
    // The clock starts before the kill: the coordinator may notice the loss while the test
    // is still reaping the process, and its timeout counts from there.
    let lost = Instant::now();
    drop(workers.remove(1));
    let results = run.finish(Duration::from_secs(30)).await;
    let waited = lost.elapsed();
    for r in &results {
        let e = r.as_ref().expect_err("a request finished without its rank");
        assert_eq!(e.code(), tonic::Code::Unavailable, "{e:?}");
    }
    assert!(
        waited >= Duration::from_secs(3),
        "answered after {waited:?}, before the timeout"
    );
    // Nothing held, and the replica says it is down.
    let mut client = coordinator.client().await;
    let info = model_info(&mut client).await;
    assert_eq!(info.kv_blocks_free, info.kv_blocks_total);
    assert!(!info.ready);
    let e = client
        .generate(workload(1, 4).remove(0))
        .await
        .expect_err("a new request while down");
    assert_eq!(e.code(), tonic::Code::Unavailable);
    // The replica kept trying: once the rank is back, it serves again.
    let _back = worker_at(&addrs[1]);
    let deadline = Instant::now() + Duration::from_secs(60);
    while !model_info(&mut client).await.ready {
        assert!(
            Instant::now() < deadline,
            "not serving 60 s after the rank came back"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let done = run_streams(&client, workload(2, 4)).await;
    assert!(done.iter().all(Result::is_ok), "{done:?}");
}
