//! `helios-bench serve`, the load generator, against a real `helios serve` (default model,
//! tp 1): a short closed-loop and a short open-loop run finish, the JSON report's counts are
//! exact (requests, prompt and output tokens, as the server reports them in its usage), and
//! every latency figure is positive and ordered (median ≤ p90 ≤ p99). Over gRPC with token ids
//! and over the OpenAI HTTP API with text prompts built to an exact token length; a request
//! the server refuses is counted as failed, with its error, not a crash.

use std::process::Command;

use helios_tests::server::Process;
use helios_tests::{binary, default_model, repo_root};
use serde_json::Value;

const REQUESTS: u64 = 6;
const INPUT_LEN: u64 = 16;
const OUTPUT_LEN: u64 = 8;

/// Runs `helios-bench serve ARGS --json` (built here once: `binary` builds the server's crates
/// only); its exit success and parsed report.
fn bench(args: &[&str]) -> (bool, Value) {
    static BUILT: std::sync::Once = std::sync::Once::new();
    BUILT.call_once(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new(cargo)
            .current_dir(repo_root())
            .args(["build", "--bin", "helios-bench", "-p", "helios-bench"])
            .status()
            .expect("running cargo build");
        assert!(status.success(), "cargo build -p helios-bench failed");
    });
    let out = Command::new(binary("helios-bench"))
        .current_dir(repo_root())
        .arg("serve")
        .args(args)
        .args(["--json", "--request-timeout", "300"])
        .output()
        .expect("running helios-bench");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let report = serde_json::from_str(&stdout).unwrap_or_else(|e| {
        panic!(
            "helios-bench serve {args:?}: no JSON report ({e}): {stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.success(), report)
}

fn num(r: &Value, key: &str) -> f64 {
    r[key]
        .as_f64()
        .unwrap_or_else(|| panic!("{key} is not a number in {r}"))
}

/// Every request completed with exactly the asked lengths, and every figure is sane.
fn assert_exact_and_ordered(r: &Value, what: &str) {
    assert_eq!(r["completed"], REQUESTS, "{what}: {r}");
    assert_eq!(r["failed"], 0, "{what}: {r}");
    assert_eq!(r["errors"].as_array().map(Vec::len), Some(0), "{what}: {r}");
    assert_eq!(r["total_input_tokens"], REQUESTS * INPUT_LEN, "{what}: {r}");
    assert_eq!(
        r["total_output_tokens"],
        REQUESTS * OUTPUT_LEN,
        "{what}: {r}"
    );
    for key in [
        "duration",
        "request_throughput",
        "output_throughput",
        "total_token_throughput",
    ] {
        assert!(num(r, key) > 0.0, "{what}: {key} in {r}");
    }
    let want = (REQUESTS * (INPUT_LEN + OUTPUT_LEN)) as f64 / num(r, "duration");
    assert!((num(r, "total_token_throughput") - want).abs() < 1e-6 * want);
    for metric in ["ttft", "tpot", "itl", "e2el"] {
        let [mean, median, p90, p99] =
            ["mean", "median", "p90", "p99"].map(|s| num(r, &format!("{s}_{metric}_ms")));
        assert!(
            mean > 0.0 && median > 0.0 && median <= p90 && p90 <= p99,
            "{what}: {metric}: mean {mean}, median {median}, p90 {p90}, p99 {p99}"
        );
    }
    // A request's first token comes before its last.
    assert!(
        num(r, "p99_ttft_ms") <= num(r, "p99_e2el_ms") + 1e-9,
        "{what}: {r}"
    );
}

const LENGTHS: [&str; 5] = ["--input-len", "16", "--output-len", "8", "--ignore-eos"];

/// [`bench`] with `target` (which server, over which protocol), then `REQUESTS` requests of
/// `LENGTHS` tokens under `load` (closed or open loop, warm-up, SLOs).
fn bench_requests(target: &[&str], load: &[&str]) -> (bool, Value) {
    let n = REQUESTS.to_string();
    let mut args = target.to_vec();
    args.extend(["--num-requests", &n]);
    args.extend_from_slice(load);
    args.extend(LENGTHS);
    bench(&args)
}

#[test]
fn grpc_closed_and_open_loop_counts_are_exact() {
    let server = Process::serve_default("1", &[]);
    let target = ["--url", server.addr.as_str()];

    let (ok, r) = bench_requests(
        &target,
        &[
            "--concurrency",
            "3",
            "--warmup",
            "2",
            "--slo",
            "ttft:600000,tpot:600000",
        ],
    );
    assert!(ok, "{r}");
    assert_exact_and_ordered(&r, "grpc closed loop");
    assert_eq!(r["load"], "closed");
    assert_eq!(r["concurrency"], 3);
    assert_eq!(r["tensor_parallel_size"], 1);
    // Bounds no request misses: goodput is the request throughput.
    assert!((num(&r, "request_goodput") - num(&r, "request_throughput")).abs() < 1e-9);
    // The server's step counters over the measured phase only (not the warm-up): at least one
    // step per output token of the slowest request.
    assert!(num(&r, "steps") >= OUTPUT_LEN as f64, "{r}");
    assert!(num(&r, "mean_step_compute_ms") > 0.0, "{r}");

    let (ok, r) = bench_requests(
        &target,
        &["--request-rate", "20", "--burstiness", "0.5", "--seed", "7"],
    );
    assert!(ok, "{r}");
    assert_exact_and_ordered(&r, "grpc open loop");
    assert_eq!(r["load"], "open");
    assert_eq!(r["request_rate"], 20.0);
    assert!(r["concurrency"].is_null());

    // Prompts longer than the KV cache: refused, counted as failed with the server's message;
    // the run still reports, and exits non-zero as nothing succeeded.
    let (ok, r) = bench(&[
        "--url",
        &server.addr,
        "--num-requests",
        "2",
        "--input-len",
        "100000",
        "--output-len",
        "4",
    ]);
    assert!(!ok, "{r}");
    assert_eq!(
        (r["completed"].as_u64(), r["failed"].as_u64()),
        (Some(0), Some(2))
    );
    let message = r["errors"][0]["message"].as_str().unwrap_or_default();
    assert!(message.contains("InvalidArgument"), "{r}");
    assert_eq!(r["errors"][0]["count"], 2);
    assert!(r["mean_ttft_ms"].is_null());
}

#[test]
fn openai_http_closed_and_open_loop_counts_are_exact() {
    let server = Process::serve_default("1", &[]);
    let url = format!("{}/v1", server.http_url());
    let tokenizer = default_model();
    let tokenizer = tokenizer.to_str().expect("utf-8 path");
    let target = [
        "--protocol",
        "openai",
        "--url",
        &url,
        "--tokenizer",
        tokenizer,
    ];

    // Text prompts, built with the model's tokenizer to encode to exactly 16 tokens: the
    // server's usage must say so.
    let (ok, r) = bench_requests(&target, &["--concurrency", "3", "--warmup", "1"]);
    assert!(ok, "{r}");
    assert_exact_and_ordered(&r, "openai closed loop");
    assert_eq!(r["protocol"], "openai");
    // The model's name comes from GET /v1/models; no step counters over HTTP.
    assert!(r["model"].as_str().is_some_and(|m| !m.is_empty()), "{r}");
    assert!(r["steps"].is_null() && r["tensor_parallel_size"].is_null());

    let (ok, r) = bench_requests(&target, &["--request-rate", "20"]);
    assert!(ok, "{r}");
    assert_exact_and_ordered(&r, "openai open loop");
}

#[test]
fn routing_workloads_find_their_prefixes_cached_behind_two_replicas() {
    let server = Process::serve_default("1", &["--dp", "2"]);
    let target = ["--url", server.addr.as_str()];
    // Three chats of three turns: turns 2 and 3 resend the history (and the answers).
    let (ok, r) = bench(
        &[
            &target[..],
            &[
                "--workload",
                "chat",
                "--sessions",
                "3",
                "--turns",
                "3",
                "--input-len",
                "32",
                "--output-len",
                "8",
                "--ignore-eos",
                "--concurrency",
                "3",
            ],
        ]
        .concat(),
    );
    assert!(ok, "{r}");
    assert_eq!(
        (r["completed"].as_u64(), r["failed"].as_u64()),
        (Some(9), Some(0)),
        "{r}"
    );
    assert_eq!(r["workload"], "chat", "{r}");
    let chat = num(&r, "prefix_cache_hit_ratio");
    // Each later turn finds at least the whole blocks of the first turn's prompt.
    assert!(chat > 0.3, "chat hit ratio {chat}: {r}");

    // Two system prompts of 64 tokens shared by eight requests of four users.
    let (ok, r) = bench(
        &[
            &target[..],
            &[
                "--workload",
                "shared-prefix",
                "--system-prompts",
                "2",
                "--system-prompt-len",
                "64",
                "--users",
                "4",
                "--num-requests",
                "8",
                "--input-len",
                "16",
                "--output-len",
                "4",
                "--ignore-eos",
                "--concurrency",
                "2",
            ],
        ]
        .concat(),
    );
    assert!(ok, "{r}");
    assert_eq!(r["completed"].as_u64(), Some(8), "{r}");
    let shared = num(&r, "prefix_cache_hit_ratio");
    assert!(shared > 0.3, "shared-prefix hit ratio {shared}: {r}");
    eprintln!("prefix-cache hit ratio: chat {chat:.3}, shared-prefix {shared:.3}");
}
