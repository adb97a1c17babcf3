//! `helios coordinator` over `helios-worker` processes started separately (static addresses)
//! serves what `helios serve` serves, and `helios generate --addr` streams it.

use helios_tests::server::Process;
use helios_tests::{helios_json, helios_worker, make_tiny_model};

#[test]
fn a_coordinator_over_static_workers_answers_like_a_local_replica() {
    let dir = tempfile::tempdir().expect("tempdir");
    make_tiny_model(dir.path(), 31, &[]).expect("tiny model");
    let model = dir.path().to_str().expect("utf-8");
    let workers: Vec<Process> = (0..2)
        .map(|_| Process::start(helios_worker(), "HELIOS_WORKER_READY "))
        .collect();
    // One address as a name: names are resolved when the coordinator connects.
    let addrs = workers
        .iter()
        .enumerate()
        .map(|(i, w)| match i {
            0 => w.addr.replacen("127.0.0.1", "localhost", 1),
            _ => w.addr.clone(),
        })
        .collect::<Vec<_>>()
        .join(",");
    assert!(addrs.starts_with("localhost:"), "{addrs}");
    let cmd = Process::helios_command("coordinator", &["--model", model, "--workers", &addrs]);
    let coordinator = Process::start(cmd, "HELIOS_READY ");

    let flags = [
        "--prompt",
        "hello world",
        "--max-new-tokens",
        "12",
        "--ignore-eos",
        "--json",
    ];
    let mut remote = vec!["generate", "--addr", &coordinator.addr];
    remote.extend_from_slice(&flags);
    let mut local = vec!["generate", "--model", model, "--tp", "2"];
    local.extend_from_slice(&flags);
    let (remote, local) = (helios_json(&remote), helios_json(&local));
    assert_eq!(remote["generated_ids"].as_array().map(Vec::len), Some(12));
    assert_eq!(remote["generated_ids"], local["generated_ids"]);
    assert_eq!(remote["text"], local["text"]);
    assert_eq!(remote["prompt_ids"], local["prompt_ids"]);
    assert_eq!(remote["finish_reason"], "length");
    assert_eq!(remote["usage"]["completion_tokens"], 12);
}

#[test]
fn a_worker_on_every_interface_advertises_a_reachable_address_never_0_0_0_0() {
    let advertised = |envs: &[(&str, &str)], args: &[&str]| {
        let mut cmd = helios_worker();
        cmd.args(["--listen", "0.0.0.0:0"]).args(args);
        for (k, v) in envs {
            cmd.env(k, v);
        }
        let w = Process::start(cmd, "HELIOS_WORKER_READY ");
        let comm = w
            .ready_line
            .split("comm=")
            .nth(1)
            .unwrap_or_default()
            .to_string();
        (w.addr.clone(), comm)
    };
    let host = |addr: &str| addr.rsplit_once(':').map(|(h, _)| h.to_string());
    // The pod IP a Kubernetes downward-API variable gives.
    let (grpc, comm) = advertised(&[("POD_IP", "127.0.0.9")], &[]);
    assert_eq!(host(&grpc).as_deref(), Some("127.0.0.9"), "{grpc}");
    assert_eq!(host(&comm).as_deref(), Some("127.0.0.9"), "{comm}");
    // A flag wins over it.
    let (grpc, _) = advertised(&[("POD_IP", "127.0.0.9")], &["--advertise", "127.0.0.8"]);
    assert_eq!(host(&grpc).as_deref(), Some("127.0.0.8"), "{grpc}");
    // Neither: the hostname, never the unspecified address.
    let (grpc, comm) = advertised(&[("POD_IP", "")], &[]);
    for a in [&grpc, &comm] {
        let h = host(a).unwrap_or_default();
        assert!(!h.is_empty() && h != "0.0.0.0" && h != "[::]", "{a}");
    }
    // The advertised address reaches the worker: a coordinator can use it.
    let dir = tempfile::tempdir().expect("tempdir");
    make_tiny_model(dir.path(), 33, &[]).expect("tiny model");
    let model = dir.path().to_str().expect("utf-8");
    let mut cmd = helios_worker();
    cmd.args(["--listen", "0.0.0.0:0"])
        .env("POD_IP", "127.0.0.7");
    let worker = Process::start(cmd, "HELIOS_WORKER_READY ");
    assert!(worker.addr.starts_with("127.0.0.7:"), "{}", worker.addr);
    let args = ["--model", model, "--workers", &worker.addr];
    let coordinator = Process::start(
        Process::helios_command("coordinator", &args),
        "HELIOS_READY ",
    );
    let out = helios_json(&[
        "generate",
        "--addr",
        &coordinator.addr,
        "--prompt",
        "hi",
        "--max-new-tokens",
        "3",
        "--ignore-eos",
        "--json",
    ]);
    assert_eq!(out["generated_ids"].as_array().map(Vec::len), Some(3));
}

#[test]
fn a_replica_count_that_disagrees_with_the_worker_lists_is_refused() {
    let model = helios_tests::default_model();
    let out = Process::helios_command(
        "coordinator",
        &[
            "--model",
            model.to_str().expect("utf-8"),
            "--workers",
            "127.0.0.1:9",
            "--dp",
            "2",
        ],
    )
    .output()
    .expect("helios coordinator");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--dp 2, but 1 --workers lists"), "{err}");
}
