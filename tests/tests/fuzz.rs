//! The bounded fuzz run (see `helios_tests::fuzz`): generated and mutated input over real
//! sockets to a `helios serve` (gRPC, then HTTP) and to a `helios-worker` (step plans). Every
//! case must end in the status its target documents, and each server must serve on: after each
//! target the same greedy generation as before, `/health` 200; the worker answers Health after
//! every stream, and a new Init and a step still give the token they gave before.
//!
//! `HELIOS_FUZZ_SECONDS` (per target, default 15), `HELIOS_FUZZ_CASES` and `HELIOS_FUZZ_SEED`
//! (default fixed; every report prints it) set the run; `scripts/fuzz.sh` runs a long one.

use helios_proto::auth::ClusterSecret;
use helios_tests::fuzz::generation::{self, ModelShape};
use helios_tests::fuzz::worker::{self, WorkerShape};
use helios_tests::fuzz::{self, check_serving, greedy_probe, FuzzConfig, FuzzTarget, Report};
use helios_tests::server::{model_info, Process};
use helios_tests::{helios_worker, TEST_CLUSTER_SECRET};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_input_ends_in_the_documented_status_and_the_servers_serve_on() {
    let cfg = FuzzConfig::from_env();
    eprintln!(
        "fuzz: HELIOS_FUZZ_SEED={:#x}, {:?} and at most {} cases per target",
        cfg.seed, cfg.per_target, cfg.max_cases
    );
    let dir = tempfile::tempdir().expect("tempdir");
    fuzz::tiny_chat_model(dir.path(), 41).expect("tiny model");
    let model = dir.path().to_str().expect("utf-8 path");

    let mut reports = serve_targets(model, &cfg).await;
    reports.extend(worker_target(model, &cfg).await);
    for r in &reports {
        eprintln!("{r}");
    }
    for r in &reports {
        r.assert_clean();
    }
}

/// The gRPC and the HTTP API of one `helios serve`, each checked for serving afterwards.
async fn serve_targets(model: &str, cfg: &FuzzConfig) -> Vec<Report> {
    let mut server = Process::serve(&["--model", model, "--tp", "1"]);
    let before = greedy_probe(&server)
        .await
        .expect("the probe before fuzzing");
    assert_eq!(before.len(), 8, "{before:?}");
    let vocab_size = model_info(&mut server.client().await).await.vocab_size;

    let target = FuzzTarget::new(server.addr.clone());
    let mut grpc = generation::fuzz(&target, ModelShape { vocab_size }, cfg).await;
    check_serving(&mut server, &before, &mut grpc).await;

    let addr = server.http_addr.clone().expect("an HTTP address");
    let cfg_http = *cfg;
    let mut http = tokio::task::spawn_blocking(move || fuzz::http::fuzz(&addr, &cfg_http))
        .await
        .expect("the HTTP fuzz task");
    check_serving(&mut server, &before, &mut http).await;
    vec![grpc, http]
}

/// A worker started alone, initialized as a replica of one rank, fed hostile step plans;
/// then initialized again (a new generation) and stepped.
async fn worker_target(model: &str, cfg: &FuzzConfig) -> Vec<Report> {
    let mut process = Process::start(helios_worker(), "HELIOS_WORKER_READY ");
    let secret = ClusterSecret::new(TEST_CLUSTER_SECRET).expect("a secret");
    let bearer = format!("Bearer {}", secret.rpc_token());
    let target = FuzzTarget::new(process.addr.clone()).with_metadata("authorization", &bearer);
    let shape: WorkerShape = worker::init(&target, model, 64, 1)
        .await
        .expect("the first Init");
    let before = worker::reference_step(&target, 1)
        .await
        .expect("the reference step");
    assert_eq!((before.error.as_str(), before.tokens.len()), ("", 1));

    let report = worker::fuzz(&target, shape, cfg).await;
    // Strangers: no token, and a token of another secret. Nothing they send changes the
    // worker: it is still in generation 1, and steps as before.
    // Refusals are cheap: a quarter of the time is plenty.
    let quick = FuzzConfig {
        per_target: cfg.per_target / 4,
        ..*cfg
    };
    let wrong = ClusterSecret::new("another cluster's secret").expect("a secret");
    let forged = FuzzTarget::new(process.addr.clone())
        .with_metadata("authorization", &format!("Bearer {}", wrong.rpc_token()));
    let mut strangers = vec![
        worker::fuzz_without_secret(&FuzzTarget::new(process.addr.clone()), shape, &quick).await,
        worker::fuzz_without_secret(&forged, shape, &quick).await,
    ];
    if let Err(e) = worker::check_health(&target, 1).await {
        strangers[1].fail(format!("after the strangers: {e}"));
    }
    match worker::reference_step(&target, 1).await {
        Ok(r) if r.tokens == before.tokens => {}
        other => strangers[1].fail(format!(
            "after the strangers the reference step gave {other:?}"
        )),
    }
    let mut reports = vec![report];
    reports.append(&mut strangers);
    let report = &mut reports[0];
    if !process.is_running() {
        report.fail("the worker exited".into());
        return reports;
    }
    if let Err(e) = worker::init(&target, model, 64, 2).await {
        report.fail(format!("Init after fuzzing: {e}"));
        return reports;
    }
    match worker::reference_step(&target, 2).await {
        Ok(after) if after.tokens == before.tokens && after.error.is_empty() => {}
        Ok(after) => report.fail(format!(
            "the reference step gave {after:?}, before {before:?}"
        )),
        Err(e) => report.fail(format!("the reference step after fuzzing: {e}")),
    }
    reports
}
