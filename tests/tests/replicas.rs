//! Several replicas behind one coordinator: every stream gets its solo tokens whichever replica
//! serves it, the cache-aware router keeps prompts where their prefixes are cached (and still
//! spreads one hot prefix), and a replica lost for good hands its requests to another, which
//! finishes them with the tokens they would have had.

use std::process::Command;
use std::time::Duration;

use helios_proto::v1::generation_client::GenerationClient;
use helios_proto::v1::{GenerateRequest, GenerationParameters, ModelInfoResponse};
use helios_tests::etcd::{worker_command, Claim, EtcdServer};
use helios_tests::recovery::{
    assert_same_streams, http_post, metric, metrics_text, run_streams, workload, Answers, Running,
};
use helios_tests::server::{model_info, send_signal, stream_all, wait_until_idle, Process};
use helios_tests::{binary, make_tiny_model};
use tonic::transport::Channel;

const STREAMS: usize = 16;
const TOKENS: u32 = 24;

/// `helios serve --dp 2 --tp 1` on the default model, then `extra`.
fn serve_two_replicas(extra: &[&str]) -> Process {
    let mut args = vec!["--dp", "2"];
    args.extend_from_slice(extra);
    Process::serve_default("1", &args)
}

/// Each request of `requests` run alone, one after the other.
async fn solo(client: &GenerationClient<Channel>, requests: Vec<GenerateRequest>) -> Answers {
    let mut answers = Vec::new();
    for req in requests {
        let mut c = client.clone();
        answers.push(stream_all(&mut c, req).await);
    }
    answers
}

/// Waits until nothing runs and every replica's blocks are free (no leak on either).
async fn assert_no_leaks(client: &mut GenerationClient<Channel>) -> ModelInfoResponse {
    let total = model_info(client).await.kv_blocks_total;
    let info = wait_until_idle(client, total, Duration::from_secs(10))
        .await
        .expect("blocks still held after every request ended");
    for r in &info.replicas {
        assert_eq!(r.kv_blocks_free, r.kv_blocks_total, "replica {}", r.id);
    }
    info
}

/// `--dp 2` at `tp` on `model`: 16 concurrent greedy and seeded streams give their solo
/// tokens, both replicas serve some, and neither leaks a block.
async fn solo_tokens_at_dp2(tp: &str, model: &[&str]) {
    let mut args = vec!["--dp", "2", "--tp", tp, "--max-batch-tokens", "32"];
    args.extend_from_slice(model);
    let server = Process::serve(&args);
    let mut client = server.client().await;
    let info = model_info(&mut client).await;
    assert_eq!(info.data_parallel_size, 2);
    assert_eq!(info.router_policy, "cache-aware");
    let alone = solo(&client, workload(STREAMS, TOKENS)).await;
    let together = run_streams(&client, workload(STREAMS, TOKENS)).await;
    assert_same_streams(&together, &alone);
    let info = assert_no_leaks(&mut client).await;
    for r in &info.replicas {
        assert_eq!(r.state, "serving");
        assert!(
            r.requests_routed_total > 0,
            "replica {} served nothing",
            r.id
        );
        eprintln!("replica {}: {} requests", r.id, r.requests_routed_total);
    }
    let text = metrics_text(&server.http_url());
    for id in 0..2 {
        let series = format!("helios_steps_total{{replica=\"{id}\"}}");
        assert!(metric(&text, &series).unwrap_or(0.0) > 0.0, "{series}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_of_one_worker_give_every_stream_its_solo_tokens() {
    let model = helios_tests::default_model();
    solo_tokens_at_dp2("1", &["--model", model.to_str().expect("utf-8")]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_of_two_workers_give_every_stream_its_solo_tokens() {
    let dir = tempfile::tempdir().expect("tempdir");
    let flags = ["--hidden", "32", "--heads", "4", "--kv-heads", "2"];
    make_tiny_model(dir.path(), 71, &flags).expect("tiny model");
    let model = dir.path().to_str().expect("utf-8");
    solo_tokens_at_dp2("2", &["--model", model]).await;
}

/// `prefixes` prompts of `prefix_len` shared tokens, each followed by `users` different
/// questions, in rounds (every prefix once per round).
fn shared_prefix_requests(prefixes: u32, prefix_len: u32, users: u32) -> Vec<GenerateRequest> {
    let mut requests = Vec::new();
    for user in 0..users {
        for p in 0..prefixes {
            let mut ids: Vec<u32> = (0..prefix_len).map(|i| 1000 + p * 500 + i).collect();
            ids.extend((0..8).map(|i| 20_000 + user * 16 + i));
            requests.push(GenerateRequest {
                token_ids: ids,
                parameters: Some(GenerationParameters {
                    max_new_tokens: Some(2),
                    ignore_eos: true,
                    ..Default::default()
                }),
                ..Default::default()
            });
        }
    }
    requests
}

/// The prefix-cache hit ratio of a `--dp 2` server under `router` on the shared-prefix
/// workload, sent one at a time; and the server's ModelInfo.
async fn hit_ratio(router: &str) -> (f64, ModelInfoResponse) {
    // Each replica's cache holds two prefixes (8 blocks each) beside the request running.
    let server = serve_two_replicas(&[
        "--num-kv-blocks",
        "24",
        "--block-size",
        "16",
        "--router",
        router,
    ]);
    let mut client = server.client().await;
    // Three prefixes in turn: round-robin sends each to both replicas, whose caches (two
    // prefixes each) then evict one another's; cache-aware keeps each on one replica.
    for req in shared_prefix_requests(3, 128, 6) {
        stream_all(&mut client, req).await.expect("answered");
    }
    let info = assert_no_leaks(&mut client).await;
    (info.prefix_cache_hit_ratio, info)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_aware_routing_finds_more_cached_prefixes_than_round_robin() {
    let (cache_aware, info) = hit_ratio("cache-aware").await;
    let (round_robin, _) = hit_ratio("round-robin").await;
    eprintln!("prefix-cache hit ratio: cache-aware {cache_aware:.3}, round-robin {round_robin:.3}");
    assert!(
        cache_aware >= round_robin + 0.15,
        "cache-aware {cache_aware:.3} vs round-robin {round_robin:.3}"
    );
    for r in &info.replicas {
        assert!(r.requests_routed_total > 0, "replica {} idle", r.id);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_hot_prefix_still_spreads_over_both_replicas() {
    let server = serve_two_replicas(&["--router-balance", "2"]);
    let mut client = server.client().await;
    // Warm replica 0's cache with the prefix, then send 12 at once that all share it.
    let mut requests = shared_prefix_requests(1, 64, 13);
    let first = requests.remove(0);
    stream_all(&mut client, first).await.expect("first");
    for r in &mut requests {
        if let Some(p) = r.parameters.as_mut() {
            p.max_new_tokens = Some(16);
        }
    }
    let answers = run_streams(&client, requests).await;
    assert!(answers.iter().all(Result::is_ok), "{answers:?}");
    let info = assert_no_leaks(&mut client).await;
    let routed: Vec<u64> = info
        .replicas
        .iter()
        .map(|r| r.requests_routed_total)
        .collect();
    eprintln!("requests per replica: {routed:?}");
    // Within the balance of 2 the cache wins, beyond it the least loaded: both work.
    assert!(routed.iter().all(|&n| n >= 4), "{routed:?}");
    assert!(info.prefix_cache_hit_tokens > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_lost_for_good_hands_its_requests_to_the_other() {
    let server = serve_two_replicas(&["--max-batch-tokens", "32", "--max-worker-restarts", "0"]);
    let client = server.client().await;
    let undisturbed = run_streams(&client, workload(STREAMS, TOKENS)).await;
    let run = Running::start(&client, workload(STREAMS, TOKENS));
    run.wait_for(STREAMS, Duration::from_secs(120)).await;
    let workers = server.children();
    assert_eq!(workers.len(), 2, "{workers:?}");
    send_signal(workers[0], "-KILL");
    // New requests are served throughout.
    let later = run_streams(&client, workload(4, 8)).await;
    assert_same_streams(&later, &solo(&client, workload(4, 8)).await);
    let disturbed = run.finish(Duration::from_secs(180)).await;
    assert_same_streams(&disturbed, &undisturbed);

    let mut c = client.clone();
    let info = model_info(&mut c).await;
    assert!(info.ready, "the other replica serves");
    let states: Vec<&str> = info.replicas.iter().map(|r| r.state.as_str()).collect();
    assert!(
        states.contains(&"down") && states.contains(&"serving"),
        "{states:?}"
    );
    let lost = info
        .replicas
        .iter()
        .find(|r| r.state == "down")
        .expect("down");
    assert!(info.requests_moved_total >= 1, "{info:?}");
    assert_eq!(lost.requests_moved_out_total, info.requests_moved_total);
    let text = metrics_text(&server.http_url());
    let series = format!("helios_requests_moved_total{{replica=\"{}\"}}", lost.id);
    assert_eq!(
        metric(&text, &series),
        Some(info.requests_moved_total as f64)
    );
}

/// `helios-worker` on `host` registering as rank 0 of replica `replica` of cluster `scale`.
fn etcd_worker(endpoint: &str, host: &str, replica: u32, model: &str) -> Process {
    let claim = Claim {
        cluster: "scale",
        replica,
        rank: 0,
    };
    Process::start(
        worker_command(endpoint, host, claim, model),
        "HELIOS_WORKER_READY ",
    )
}

/// `helios coordinator` (tp 1) over the replicas of cluster `scale` in etcd at `endpoint`,
/// with `--failover-after` `failover_after` seconds.
fn etcd_coordinator(endpoint: &str, model: &str, failover_after: &str) -> Process {
    let args = [
        "--model",
        model,
        "--etcd",
        endpoint,
        "--cluster",
        "scale",
        "--max-batch-tokens",
        "32",
        "--failover-after",
        failover_after,
    ];
    Process::start(
        Process::helios_command("coordinator", &args),
        "HELIOS_READY ",
    )
}

/// Waits until ModelInfo lists exactly the replicas `ids`, all serving.
async fn wait_for_replicas(client: &mut GenerationClient<Channel>, ids: &[u32]) {
    let listed = async {
        loop {
            let info = model_info(client).await;
            let serving: Vec<u32> = info
                .replicas
                .iter()
                .filter(|r| r.state == "serving")
                .map(|r| r.id)
                .collect();
            if serving == ids && info.replicas.len() == ids.len() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(60), listed)
        .await
        .unwrap_or_else(|_| panic!("replicas {ids:?} not serving after 60 s"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_join_and_leave_through_etcd_without_failing_a_stream() {
    let etcd = EtcdServer::start().expect("etcd");
    let endpoint = etcd.endpoint();
    let dir = tempfile::tempdir().expect("tempdir");
    make_tiny_model(dir.path(), 81, &[]).expect("tiny model");
    let model = dir.path().to_str().expect("utf-8");
    let replica0 = etcd_worker(&endpoint, "127.0.0.2", 0, model);
    let server = etcd_coordinator(&endpoint, model, "1");
    let mut client = server.client().await;
    let undisturbed = run_streams(&client, workload(STREAMS, TOKENS)).await;

    // Scale out under load: replica 1 registers, joins, and takes requests.
    let run = Running::start(&client, workload(STREAMS, TOKENS));
    run.wait_for(STREAMS, Duration::from_secs(60)).await;
    let mut replica1 = Some(etcd_worker(&endpoint, "127.0.0.3", 1, model));
    wait_for_replicas(&mut client, &[0, 1]).await;
    let after_join = run_streams(&client, workload(STREAMS, TOKENS)).await;
    assert_same_streams(&after_join, &undisturbed);
    assert_same_streams(&run.finish(Duration::from_secs(120)).await, &undisturbed);
    let info = model_info(&mut client).await;
    assert!(info.replicas[1].requests_routed_total > 0, "{info:?}");

    // Scale in under load: replica 0 drains, finishing its streams, and leaves.
    let run = Running::start(&client, workload(STREAMS, TOKENS));
    run.wait_for(STREAMS, Duration::from_secs(60)).await;
    drain(&endpoint, &["--replica", "0"]);
    assert_same_streams(&run.finish(Duration::from_secs(120)).await, &undisturbed);
    wait_for_replicas(&mut client, &[1]).await;
    let later = run_streams(&client, workload(4, 8)).await;
    assert!(later.iter().all(Result::is_ok), "{later:?}");
    assert_no_leaks(&mut client).await;

    // Replica 0 may join again (its worker kept its registration); then replica 1's worker
    // dies for good. After --failover-after (1 s) of recovering, replica 1's requests move to
    // replica 0 and finish there with their undisturbed tokens.
    drain(&endpoint, &["--replica", "0", "--undo"]);
    wait_for_replicas(&mut client, &[0, 1]).await;
    let run = Running::start(&client, workload(STREAMS, TOKENS));
    run.wait_for(STREAMS, Duration::from_secs(60)).await;
    drop(replica1.take());
    assert_same_streams(&run.finish(Duration::from_secs(120)).await, &undisturbed);
    let info = model_info(&mut client).await;
    assert!(info.requests_moved_total >= 1, "{info:?}");
    let states: Vec<(u32, &str)> = info
        .replicas
        .iter()
        .map(|r| (r.id, r.state.as_str()))
        .collect();
    assert_eq!(states, [(0, "serving"), (1, "recovering")]);
    assert_eq!(
        info.replicas[1].requests_moved_out_total,
        info.requests_moved_total
    );
    drop(replica0);
}

/// `helios drain --etcd ENDPOINT --cluster scale ARGS`, which must succeed.
fn drain(endpoint: &str, args: &[&str]) {
    let out = Command::new(binary("helios"))
        .args(["drain", "--etcd", endpoint, "--cluster", "scale"])
        .args(args)
        .output()
        .expect("helios drain");
    assert!(out.status.success(), "{out:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_sticks_to_its_replica_over_grpc_and_http() {
    // least-load alone would alternate between two idle replicas as their caches fill.
    let server = serve_two_replicas(&["--router", "least-load"]);
    let mut client = server.client().await;
    let routed = |info: &ModelInfoResponse| -> Vec<u64> {
        info.replicas
            .iter()
            .map(|r| r.requests_routed_total)
            .collect()
    };
    for mut req in workload(6, 2) {
        req.session_id = "alice".into();
        stream_all(&mut client, req).await.expect("answered");
    }
    let after_grpc = routed(&model_info(&mut client).await);
    assert!(
        after_grpc.contains(&6) && after_grpc.contains(&0),
        "{after_grpc:?}"
    );
    // The same over HTTP with OpenAI's `user`: bob's six land together too.
    for i in 0..6 {
        let body =
            format!(r#"{{"prompt": "Turn {i} of a chat.", "max_tokens": 2, "user": "bob"}}"#);
        let (code, text) = http_post(&server.http_url(), "/v1/completions", &body);
        assert_eq!(code, 200, "{text}");
    }
    let after_http = routed(&model_info(&mut client).await);
    let bob: Vec<u64> = after_http
        .iter()
        .zip(&after_grpc)
        .map(|(a, b)| a - b)
        .collect();
    assert!(bob.contains(&6) && bob.contains(&0), "{bob:?}");
    let text = metrics_text(&server.http_url());
    let sticky: f64 = (0..2)
        .filter_map(|id| {
            let series =
                format!("helios_requests_routed_total{{replica=\"{id}\",reason=\"session\"}}");
            metric(&text, &series)
        })
        .sum();
    assert_eq!(
        sticky, 10.0,
        "the first request of each session is routed by load"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_waiting_for_any_replica_to_serve_still_meets_its_deadline() {
    let etcd = EtcdServer::start().expect("etcd");
    let endpoint = etcd.endpoint();
    let dir = tempfile::tempdir().expect("tempdir");
    make_tiny_model(dir.path(), 83, &[]).expect("tiny model");
    let model = dir.path().to_str().expect("utf-8");
    let worker = etcd_worker(&endpoint, "127.0.0.2", 0, model);
    let server = etcd_coordinator(&endpoint, model, "0.5");
    let mut client = server.client().await;
    // The only replica loses its only worker for good (its lease runs out within 2 s): after
    // half a second of recovering, requests wait at the front door for a replica to serve.
    drop(worker);
    let recovering = async {
        while model_info(&mut client).await.state != "recovering" {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(20), recovering)
        .await
        .expect("not recovering 20 s after its worker died");
    tokio::time::sleep(Duration::from_millis(600)).await;
    let mut req = tonic::Request::new(workload(1, 4).swap_remove(0));
    req.set_timeout(Duration::from_secs(2));
    let asked = std::time::Instant::now();
    let answer = async {
        match client.generate_stream(req).await {
            Ok(s) => match s.into_inner().message().await {
                Ok(Some(r)) => panic!("an answer without a replica: {r:?}"),
                Ok(None) => panic!("the stream ended without a status"),
                Err(e) => e,
            },
            Err(e) => e,
        }
    };
    // Not the recovery timeout's UNAVAILABLE a minute later: its own deadline.
    let err = tokio::time::timeout(Duration::from_secs(20), answer)
        .await
        .expect("no answer 20 s after a 2 s deadline");
    assert_eq!(err.code(), tonic::Code::DeadlineExceeded, "{err:?}");
    assert!(
        err.message().contains("deadline passed"),
        "the server's: {err:?}"
    );
    assert!(
        asked.elapsed() < Duration::from_secs(10),
        "{:?}",
        asked.elapsed()
    );
}
