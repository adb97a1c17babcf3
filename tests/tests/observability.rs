//! What operators see of `helios serve`, end to end on the default model at tp 3:
//! - spans reach an OTLP receiver (a tonic `TraceService`, `helios_tests::otlp`); the request
//!   span's parent is the client's `traceparent` (gRPC metadata and HTTP headers alike), and the
//!   workers' step spans belong to the request's trace, under the coordinator's step spans;
//! - `/metrics` counts a known workload exactly (tokens, requests by finish reason, histogram
//!   counts, steps per rank), and parses with the Prometheus project's own parsers
//!   (`tests/reference/observe.py`: Prometheus text and OpenMetrics);
//! - with no OTLP endpoint nothing connects to the default OTLP ports, and `--log-format json`
//!   logs are JSON lines that name requests by id and never quote a prompt unless
//!   `--log-prompts`.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::time::Duration;

use helios_proto::v1::{FinishReason, GenerateRequest, GenerationParameters};
use helios_tests::observe;
use helios_tests::otlp::{OtlpReceiver, ReceivedSpan};
use helios_tests::server::{chat_request, prompt_request, stream_all, Process, Streamed};
use serde_json::Value;

const MODEL: &str = "SmolLM2-135M-Instruct.Q4_1";
/// In every prompt of the log test: it must never reach a log line unless asked.
const MARKER: &str = "Zebulon-Quartz-771";

/// [`Process::serve_default_command`] without the environment's `OTEL_*` variables: what is
/// exported, and where, is this test's to say.
fn serve_command(tp: &str, extra: &[&str]) -> std::process::Command {
    let mut cmd = Process::serve_default_command(tp, extra);
    for (k, _) in std::env::vars() {
        if k.starts_with("OTEL_") {
            cmd.env_remove(k);
        }
    }
    cmd
}

fn full_length(max_new_tokens: u32) -> GenerationParameters {
    GenerationParameters {
        max_new_tokens: Some(max_new_tokens),
        ignore_eos: true,
        ..Default::default()
    }
}

fn with_traceparent(
    req: GenerateRequest,
    trace: &str,
    span: &str,
) -> tonic::Request<GenerateRequest> {
    let mut r = tonic::Request::new(req);
    r.metadata_mut().insert(
        "traceparent",
        format!("00-{trace}-{span}-01").parse().expect("ascii"),
    );
    r
}

fn by_id(spans: &[ReceivedSpan]) -> HashMap<&str, &ReceivedSpan> {
    spans.iter().map(|s| (s.span_id.as_str(), s)).collect()
}

/// The spans of one client's request: its `request` span and everything under it.
fn request_span<'a>(spans: &'a [ReceivedSpan], trace: &str) -> Option<&'a ReceivedSpan> {
    spans
        .iter()
        .find(|s| s.name == "request" && s.trace_id == trace)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_reach_an_otlp_receiver_and_join_the_clients_trace() {
    let receiver = OtlpReceiver::start().await;
    let mut cmd = serve_command("3", &[]);
    cmd.env("OTEL_EXPORTER_OTLP_ENDPOINT", &receiver.endpoint)
        .env("OTEL_BSP_SCHEDULE_DELAY", "100");
    let server = Process::start(cmd, "HELIOS_READY ");
    let mut client = server.client().await;

    // A gRPC stream, alone on the replica: every step of its life is in its trace.
    let (grpc_trace, grpc_parent) = ("0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331");
    let req = prompt_request("The capital of France is", full_length(6));
    let grpc = stream_all(&mut client, with_traceparent(req, grpc_trace, grpc_parent))
        .await
        .expect("the traced stream");
    let usage = grpc.usage.expect("usage");
    // The same over HTTP, the parent in a header.
    let (http_trace, http_parent) = ("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7");
    let traceparent = format!("00-{http_trace}-{http_parent}-01");
    let answer = observe(&[
        "complete",
        &server.http_url(),
        MODEL,
        "Tell me about lighthouses.",
        "4",
        &traceparent,
    ]);
    let http_tokens = answer["usage"]["completion_tokens"].to_string();

    // Two requests at once, each in a trace of its own: their shared steps hang under one
    // and link to the other.
    let pair = [
        (
            "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
            "1111111111111111",
            "Once upon a time",
        ),
        (
            "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb",
            "2222222222222222",
            "The sea was calm",
        ),
    ];
    let runs = pair.iter().map(|&(trace, parent, prompt)| {
        let mut c = client.clone();
        let req = with_traceparent(prompt_request(prompt, full_length(8)), trace, parent);
        async move {
            stream_all(&mut c, req)
                .await
                .expect("a traced request of the pair")
        }
    });
    futures::future::join_all(runs).await;

    let done = |spans: &[ReceivedSpan]| {
        let workers = spans
            .iter()
            .filter(|s| s.name == "worker_step" && s.trace_id == grpc_trace)
            .count();
        request_span(spans, grpc_trace).is_some()
            && request_span(spans, http_trace).is_some()
            && pair.iter().all(|p| request_span(spans, p.0).is_some())
            && workers >= 3 * 6
    };
    let spans = receiver.wait_for(Duration::from_secs(60), done).await;
    let ids = by_id(&spans);
    let names: BTreeSet<(&str, &str)> = spans
        .iter()
        .map(|s| (s.service.as_str(), s.name.as_str()))
        .collect();

    // The request span: the client's span is its parent; its attributes say how it went.
    let req = request_span(&spans, grpc_trace)
        .unwrap_or_else(|| panic!("no request span in the client's trace; got {names:?}"));
    assert_eq!(req.service, "helios-coordinator");
    assert_eq!(
        req.parent_span_id, grpc_parent,
        "parent is the client's span"
    );
    assert_eq!(
        req.attr("prompt_tokens"),
        Some(&*usage.prompt_tokens.to_string())
    );
    assert_eq!(req.attr("output_tokens"), Some("6"));
    assert_eq!(req.attr("finish_reason"), Some("length"));
    assert_eq!(req.attr("preemptions"), Some("0"));
    // Which replica served it, and that it never moved.
    assert_eq!(req.attr("replica"), Some("0"));
    assert_eq!(req.attr("moved"), Some("false"));
    assert_eq!(grpc.finish_reason, Some(FinishReason::Length));

    // Its phases, in its trace, under it.
    let phases: Vec<&ReceivedSpan> = spans
        .iter()
        .filter(|s| s.trace_id == grpc_trace && s.parent_span_id == req.span_id)
        .collect();
    let phase_names: BTreeSet<&str> = phases.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(
        phase_names,
        BTreeSet::from(["queue", "prefill", "decode"]),
        "the request's children"
    );

    // The coordinator's step spans hang under its phases; each rank's step span under those.
    let steps: Vec<&ReceivedSpan> = spans
        .iter()
        .filter(|s| s.name == "step" && s.trace_id == grpc_trace)
        .collect();
    assert!(
        steps.len() >= 6,
        "one step per token at least; got {} step spans",
        steps.len()
    );
    for step in &steps {
        let parent = ids
            .get(step.parent_span_id.as_str())
            .unwrap_or_else(|| panic!("step {:?}: parent not received", step.attr("step_id")));
        assert!(
            ["prefill", "decode"].contains(&parent.name.as_str()),
            "a step under {}",
            parent.name
        );
        assert_eq!(step.service, "helios-coordinator");
        let ranks: BTreeSet<&str> = spans
            .iter()
            .filter(|w| w.name == "worker_step" && w.parent_span_id == step.span_id)
            .map(|w| {
                assert_eq!(w.service, "helios-worker");
                assert_eq!(w.trace_id, grpc_trace, "a worker step in another trace");
                assert_eq!(w.attr("step_id"), step.attr("step_id"));
                let forward: u64 = w
                    .attr("forward_us")
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0);
                assert!(forward > 0, "worker step without its forward time: {w:?}");
                assert!(
                    w.attr("allreduce_us").is_some(),
                    "no all-reduce time: {w:?}"
                );
                w.attr("rank").expect("rank")
            })
            .collect();
        assert_eq!(
            ranks,
            BTreeSet::from(["0", "1", "2"]),
            "every rank's span of step {:?}",
            step.attr("step_id")
        );
    }

    // Over HTTP the header's span is the parent.
    let req = request_span(&spans, http_trace).expect("the HTTP request's span");
    assert_eq!(req.parent_span_id, http_parent);
    assert_eq!(req.attr("output_tokens"), Some(http_tokens.as_str()));

    // The pair: every step in their traces hangs under a phase of one of them, and the steps
    // they shared link from one request's trace to the other request.
    let requests: Vec<&ReceivedSpan> = pair
        .iter()
        .map(|p| request_span(&spans, p.0).expect("a request of the pair"))
        .collect();
    let mut crossing = 0;
    for (i, req) in requests.iter().enumerate() {
        assert_eq!(req.parent_span_id, pair[i].1);
        let other = requests[1 - i];
        for step in spans
            .iter()
            .filter(|s| s.name == "step" && s.trace_id == req.trace_id)
        {
            let phase = ids
                .get(step.parent_span_id.as_str())
                .expect("the step's parent was received");
            assert_eq!(
                phase.parent_span_id, req.span_id,
                "a step under another request"
            );
            if step
                .links
                .contains(&(other.trace_id.clone(), other.span_id.clone()))
            {
                crossing += 1;
            }
        }
    }
    assert!(
        crossing > 0,
        "no step of the pair links to the other request of the pair"
    );
}

/// A sample's value by its `name{labels}` key.
fn sample(samples: &Value, key: &str) -> f64 {
    samples[key]
        .as_f64()
        .unwrap_or_else(|| panic!("{key} missing from /metrics"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_a_known_workload_and_logs_name_requests_not_prompts() {
    // Where an exporter with default settings would send spans (OTLP gRPC and HTTP); with no
    // endpoint set nothing may connect there. A port some other program holds is skipped.
    let watchers: Vec<std::net::TcpListener> = [
        "127.0.0.1:4317",
        "127.0.0.1:4318",
        "[::1]:4317",
        "[::1]:4318",
    ]
    .iter()
    .filter_map(|a| std::net::TcpListener::bind(a).ok())
    .inspect(|l| l.set_nonblocking(true).expect("non-blocking"))
    .collect();
    let log_dir = tempfile::tempdir().expect("a temp dir");
    let log_path = log_dir.path().join("serve.log");
    let log = std::fs::File::create(&log_path).expect("the log file");
    let mut cmd = serve_command("3", &["--log-format", "json"]);
    cmd.env(
        "RUST_LOG",
        "warn,helios=debug,helios_coordinator=debug,helios_worker=debug",
    );
    let mut server = Process::start_with_stderr(cmd, "HELIOS_READY ", Stdio::from(log));
    let client = server.client().await;

    // The workload: full-length requests of known sizes, a chat request that may end at EOS,
    // and one over HTTP. Requests run two at a time.
    let mut requests: Vec<GenerateRequest> = (0..4)
        .map(|i| {
            let mut r = prompt_request(
                &format!("{MARKER} story number {i}: once upon a time"),
                full_length(3 + i),
            );
            r.request_id = format!("obs-{i}");
            r
        })
        .collect();
    let mut chat = chat_request(
        &format!("Say hello to {MARKER}."),
        GenerationParameters {
            max_new_tokens: Some(24),
            ..Default::default()
        },
    );
    chat.request_id = "obs-chat".into();
    requests.push(chat);
    let mut answers: Vec<Streamed> = Vec::new();
    for pair in requests.chunks(2) {
        let runs = pair.iter().map(|r| {
            let (mut c, r) = (client.clone(), r.clone());
            async move {
                stream_all(&mut c, r)
                    .await
                    .expect("a request of the workload")
            }
        });
        answers.extend(futures::future::join_all(runs).await);
    }
    let http = observe(&[
        "complete",
        &server.http_url(),
        MODEL,
        &format!("{MARKER} says"),
        "5",
        "00-11111111111111111111111111111111-2222222222222222-01",
    ]);
    let n = answers.len() + 1;
    let mut prompt_tokens = http["usage"]["prompt_tokens"].as_u64().expect("usage");
    let mut completion_tokens = http["usage"]["completion_tokens"].as_u64().expect("usage");
    let mut itl = completion_tokens - 1;
    let mut reasons: BTreeMap<String, u64> = BTreeMap::from([("length".to_string(), 1)]);
    for a in &answers {
        let u = a.usage.expect("usage");
        prompt_tokens += u64::from(u.prompt_tokens);
        completion_tokens += u64::from(u.completion_tokens);
        itl += u64::from(u.completion_tokens) - 1;
        let reason = match a.finish_reason {
            Some(FinishReason::Length) => "length",
            Some(FinishReason::Eos) => "eos",
            Some(FinishReason::Stop) => "stop",
            other => panic!("unexpected finish {other:?}"),
        };
        *reasons.entry(reason.into()).or_default() += 1;
    }

    let scraped = observe(&["metrics", &server.http_url()]);
    assert!(scraped["content_types"][0]
        .as_str()
        .is_some_and(|c| c.starts_with("text/plain; version=0.0.4")));
    assert!(scraped["content_types"][1]
        .as_str()
        .is_some_and(|c| c.starts_with("application/openmetrics-text")));
    for format in ["prometheus", "openmetrics"] {
        let m = &scraped[format];
        let at = |key: &str| sample(m, key);
        assert_eq!(
            at("helios_prompt_tokens_total"),
            prompt_tokens as f64,
            "{format}"
        );
        assert_eq!(
            at("helios_generation_tokens_total"),
            completion_tokens as f64,
            "{format}"
        );
        for h in [
            "helios_request_queue_time_seconds",
            "helios_time_to_first_token_seconds",
            "helios_e2e_request_latency_seconds",
        ] {
            assert_eq!(
                at(&format!("{h}_count")),
                n as f64,
                "{format}: {h} counts every request"
            );
            assert_eq!(
                at(&format!("{h}_bucket{{le=\"+Inf\"}}")),
                n as f64,
                "{format}: {h}"
            );
            assert!(at(&format!("{h}_sum")) > 0.0, "{format}: {h}");
        }
        assert_eq!(
            at("helios_inter_token_latency_seconds_count"),
            itl as f64,
            "{format}"
        );
        for (reason, count) in &reasons {
            let key = format!("helios_requests_finished_total{{finish_reason=\"{reason}\"}}");
            assert_eq!(at(&key), *count as f64, "{format}: {reason}");
        }
        assert_eq!(at("helios_requests_running{replica=\"0\"}"), 0.0);
        assert_eq!(at("helios_requests_waiting{replica=\"0\"}"), 0.0);
        let steps = at("helios_steps_total{replica=\"0\"}");
        assert!(
            steps >= completion_tokens as f64 / 2.0,
            "{format}: {steps} steps"
        );
        assert_eq!(
            at("helios_step_duration_seconds_count{replica=\"0\"}"),
            steps,
            "{format}"
        );
        for rank in 0..3 {
            assert_eq!(
                at(&format!(
                    "helios_worker_up{{rank=\"{rank}\",replica=\"0\"}}"
                )),
                1.0,
                "{format}"
            );
            for h in ["worker_forward_duration", "allreduce_duration"] {
                let key = format!("helios_{h}_seconds_count{{rank=\"{rank}\",replica=\"0\"}}");
                assert_eq!(at(&key), steps, "{format}: {key}");
                let sum = format!("helios_{h}_seconds_sum{{rank=\"{rank}\",replica=\"0\"}}");
                assert!(at(&sum) > 0.0, "{format}: {sum}");
            }
        }
        let usage = at("helios_kv_cache_usage_ratio{replica=\"0\"}");
        assert!((0.0..=1.0).contains(&usage), "{format}: usage {usage}");
    }
    let types = &scraped["types"];
    assert_eq!(types["helios_generation_tokens"], "counter");
    assert_eq!(types["helios_time_to_first_token_seconds"], "histogram");
    assert_eq!(types["helios_requests_running"], "gauge");

    for w in &watchers {
        if let Ok((_, peer)) = w.accept() {
            panic!(
                "with no OTLP endpoint set, {peer} connected to {:?}",
                w.local_addr()
            );
        }
    }

    // The log: JSON lines (the coordinator's and its workers'), every line about a request
    // names it, no prompt text.
    drop(client);
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &server.pid().to_string()])
        .status();
    server.wait_exit(Duration::from_secs(30));
    let lines: Vec<Value> = BufReader::new(std::fs::File::open(&log_path).expect("the log"))
        .lines()
        .map(|l| l.expect("a line"))
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            assert!(!l.contains(MARKER), "a prompt in the log: {l}");
            serde_json::from_str(&l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"))
        })
        .collect();
    let text = std::fs::read_to_string(&log_path).expect("the log");
    assert!(!text.contains(MARKER), "a prompt in the log");
    let about =
        |msg: &str| -> Vec<&Value> { lines.iter().filter(|l| l["message"] == msg).collect() };
    for msg in ["request received", "request finished", "queued"] {
        let ids: BTreeSet<&str> = about(msg)
            .iter()
            .map(|l| {
                l["request_id"]
                    .as_str()
                    .unwrap_or_else(|| panic!("{msg} without id: {l}"))
            })
            .collect();
        assert_eq!(
            ids.len(),
            n,
            "{msg}: one line per request, each with its id: {ids:?}"
        );
        for want in ["obs-0", "obs-3", "obs-chat"] {
            assert!(ids.contains(want), "{msg}: no line for {want}");
        }
    }
    for l in &lines {
        // A line about one request: it names its sequence, or it is one of the request's own
        // ("request received", "request finished", "request failed").
        if l.get("seq").is_some()
            || l["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("request "))
        {
            assert!(
                l["request_id"].is_string(),
                "a line about a request without its id: {l}"
            );
        }
    }
    let finished = about("request finished");
    let chat = finished
        .iter()
        .find(|l| l["request_id"] == "obs-chat")
        .expect("the chat request's last line");
    let chat_reason = match answers[4].finish_reason {
        Some(FinishReason::Eos) => "eos",
        _ => "length",
    };
    assert_eq!(chat["finish_reason"], chat_reason);
    assert_eq!(
        chat["output_tokens"],
        answers[4].usage.expect("usage").completion_tokens
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prompts_reach_the_log_only_when_asked() {
    let log_dir = tempfile::tempdir().expect("a temp dir");
    let log_path = log_dir.path().join("serve.log");
    let log = std::fs::File::create(&log_path).expect("the log file");
    let mut cmd = serve_command("1", &["--log-format", "json", "--log-prompts"]);
    cmd.env("RUST_LOG", "warn,helios_coordinator=info");
    let server = Process::start_with_stderr(cmd, "HELIOS_READY ", Stdio::from(log));
    let mut client = server.client().await;
    let mut req = prompt_request(&format!("Hello {MARKER}"), full_length(2));
    req.request_id = "logged".into();
    stream_all(&mut client, req).await.expect("the request");
    drop(server);
    let received: Vec<Value> = std::fs::read_to_string(&log_path)
        .expect("the log")
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|l| l["message"] == "request received")
        .collect();
    assert_eq!(received.len(), 1, "{received:?}");
    assert_eq!(received[0]["request_id"], "logged");
    assert_eq!(received[0]["prompt"], format!("Hello {MARKER}"));
}
