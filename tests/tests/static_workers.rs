//! `helios coordinator` over `helios-worker` processes started separately (static addresses)
//! serves what `helios serve` serves, and `helios generate --addr` streams it.

use std::process::Command;

use helios_tests::server::Process;
use helios_tests::{binary, helios_json, make_tiny_model};

#[test]
fn a_coordinator_over_static_workers_answers_like_a_local_replica() {
    let dir = tempfile::tempdir().expect("tempdir");
    make_tiny_model(dir.path(), 31, &[]).expect("tiny model");
    let model = dir.path().to_str().expect("utf-8");
    let workers: Vec<Process> = (0..2)
        .map(|_| {
            Process::start(
                Command::new(binary("helios-worker")),
                "HELIOS_WORKER_READY ",
            )
        })
        .collect();
    let addrs = workers
        .iter()
        .map(|w| w.addr.clone())
        .collect::<Vec<_>>()
        .join(",");
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
