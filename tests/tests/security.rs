//! Who may call, and what a caller may cost: TLS and API keys on both client APIs (stock
//! clients: grpcio, the `openai` package, `helios generate`), mutual TLS, an authenticated
//! cluster (a stranger on a communicator port, two local clusters on one host), the operator's
//! caps, slow clients, and a client that stops reading its stream.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};

use futures::StreamExt;
use helios_proto::auth::{Authorize, ClusterSecret};
use helios_proto::v1::generation_client::GenerationClient;
use helios_proto::v1::worker_client::WorkerClient;
use helios_proto::v1::{GenerationParameters, HealthRequest};
use helios_tests::recovery::{metric, metrics_text};
use helios_tests::server::{prompt_request, Process};
use helios_tests::tls::TestPki;
use helios_tests::{binary, helios_worker, make_tiny_model, reference_json};
use tonic::transport::{Channel, Endpoint};
use tonic::Code;

const KEY: &str = "test-key-0f3a9c";

/// A tiny model in a fresh folder.
fn tiny_model(seed: u64) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    make_tiny_model(dir.path(), seed, &[]).expect("tiny model");
    dir
}

fn key_file(pki: &TestPki) -> String {
    let path = pki.dir().join("keys");
    std::fs::write(&path, format!("# the test's key\n{KEY}\n")).expect("key file");
    path.to_string_lossy().into_owned()
}

/// `helios serve` over a tiny model (seed `seed`) with TLS and the test's key, and `extra`.
fn secure_server(pki: &TestPki, seed: u64, extra: &[&str]) -> (Process, tempfile::TempDir) {
    let model = tiny_model(seed);
    let keys = key_file(pki);
    let mut args = vec![
        "--model",
        model.path().to_str().expect("utf-8"),
        "--tls-cert",
    ];
    let (cert, key) = (pki.arg("server.pem"), pki.arg("server.key"));
    args.extend([
        cert.as_str(),
        "--tls-key",
        key.as_str(),
        "--api-key-file",
        keys.as_str(),
    ]);
    args.extend_from_slice(extra);
    (Process::serve(&args), model)
}

#[test]
fn tls_and_api_keys_guard_both_apis_and_the_probes_stay_open() {
    let pki = TestPki::new().expect("certificates");
    let (server, _model) = secure_server(&pki, 71, &[]);
    let http = server.http_addr.clone().expect("http address");
    let seen = reference_json(
        "secure_client.py",
        &[&server.addr, &http, &pki.arg("ca.pem"), KEY],
    );
    let (g, h) = (&seen["grpc"], &seen["http"]);
    assert_eq!(g["generate_with_key"], "OK", "{seen}");
    assert!(
        g["generate_reply_bytes"].as_u64().unwrap_or(0) > 0,
        "{seen}"
    );
    for refused in ["generate_wrong_key", "generate_no_key", "model_info_no_key"] {
        assert_eq!(g[refused], "UNAUTHENTICATED", "{refused}: {seen}");
    }
    // Every route but the probes: refused without the key and with a wrong one.
    let routes = g["routes"].as_object().expect("gRPC routes");
    assert_eq!(routes.len(), 12, "{seen}");
    for (route, code) in routes {
        let want = if route.ends_with("the key") {
            "OK"
        } else {
            "UNAUTHENTICATED"
        };
        assert_eq!(code, want, "gRPC {route}: {seen}");
    }
    let http_routes: Vec<_> = h
        .as_object()
        .expect("http")
        .iter()
        .filter(|(route, _)| route.starts_with("POST ") || route.starts_with("GET "))
        .collect();
    assert_eq!(http_routes.len(), 6, "{seen}");
    for (route, code) in http_routes {
        assert_eq!(code, 401, "HTTP {route}: {seen}");
    }
    assert!(
        g["no_key_message"]
            .as_str()
            .unwrap_or("")
            .contains("API key"),
        "{seen}"
    );
    assert_eq!(
        (&g["health_no_key"], &g["health_serving"]),
        (&"OK".into(), &true.into())
    );
    assert_eq!(
        (&h["health_no_key"], &h["metrics_no_key"]),
        (&200.into(), &200.into())
    );
    for refused in ["models_no_key", "models_wrong_key", "completions_no_key"] {
        assert_eq!(h[refused], 401, "{refused}: {seen}");
    }
    assert_eq!(
        h["models_no_key_error"]["code"], "invalid_api_key",
        "{seen}"
    );
    assert_eq!(h["sdk_completion_tokens"], 4, "{seen}");
    assert!(h["sdk_stream_chunks"].as_u64().unwrap_or(0) >= 2, "{seen}");
    assert_eq!(h["sdk_wrong_key"], 401, "{seen}");

    // `helios generate --addr https://...` with the CA and the key; refused without the key,
    // and a plaintext client gets nowhere.
    let generate = |extra: &[&str]| {
        let url = format!("https://{}", server.addr);
        let mut cmd = Command::new(binary("helios"));
        cmd.args([
            "generate",
            "--addr",
            &url,
            "--prompt",
            "Hello",
            "--max-new-tokens",
            "3",
        ])
        .args(["--json", "--tls-ca", &pki.arg("ca.pem")])
        .args(extra)
        .env_remove("HELIOS_API_KEY");
        cmd.output().expect("helios generate")
    };
    let ok = generate(&["--api-key", KEY]);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let out: serde_json::Value = serde_json::from_slice(&ok.stdout).expect("json");
    assert_eq!(
        out["generated_ids"].as_array().map(Vec::len),
        Some(3),
        "{out}"
    );
    let refused = generate(&[]);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("Unauthenticated"));
    let plain = Command::new(binary("helios"))
        .args([
            "generate",
            "--addr",
            &server.addr,
            "--prompt",
            "Hi",
            "--api-key",
            KEY,
        ])
        .output()
        .expect("helios generate");
    assert!(!plain.status.success(), "a plaintext client was served");
}

#[test]
fn mutual_tls_refuses_a_client_without_a_certificate() {
    let pki = TestPki::new().expect("certificates");
    let (server, _model) = secure_server(&pki, 72, &["--tls-client-ca", &pki.arg("ca.pem")]);
    let http = server.http_addr.clone().expect("http address");
    let seen = reference_json(
        "secure_client.py",
        &[
            &server.addr,
            &http,
            &pki.arg("ca.pem"),
            KEY,
            &pki.arg("client.pem"),
            &pki.arg("client.key"),
        ],
    );
    assert_eq!(seen["grpc"]["generate_with_key"], "OK", "{seen}");
    assert_eq!(seen["http"]["sdk_completion_tokens"], 4, "{seen}");
    let g = &seen["grpc_without_client_cert"];
    assert_ne!(g["generate_with_key"], "OK", "{seen}");
    assert_ne!(g["health_no_key"], "OK", "{seen}");
    assert!(
        seen["http_without_client_cert"]["error"].is_string(),
        "an HTTPS client without a certificate was served: {seen}"
    );
}

#[test]
fn unusable_tls_files_fail_at_start_naming_them() {
    let pki = TestPki::new().expect("certificates");
    let start = |cert: &str, key: &str| {
        let out = Command::new(binary("helios"))
            .args([
                "serve",
                "--port",
                "0",
                "--http-port",
                "0",
                "--host",
                "127.0.0.1",
            ])
            .args(["--tls-cert", cert, "--tls-key", key])
            .output()
            .expect("helios serve");
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let e = start(&pki.arg("server.pem"), &pki.arg("other.key"));
    assert!(e.contains("do not make a key pair"), "{e}");
    let e = start(&pki.arg("missing.pem"), &pki.arg("server.key"));
    assert!(e.contains("missing.pem"), "{e}");
    let e = start(&pki.arg("server.key"), &pki.arg("server.key"));
    assert!(e.contains("no PEM certificate"), "{e}");
}

/// `key=value` of a process' ready line.
fn ready_field(p: &Process, key: &str) -> String {
    p.ready_line
        .split_whitespace()
        .find_map(|kv| kv.strip_prefix(key))
        .expect("a field of the ready line")
        .to_string()
}

/// Whether the peer at `addr`, sent `bytes`, closes the connection within 10 s without a
/// byte of answer (a read that times out means it left the connection open: false).
fn closes_after(addr: &str, bytes: &[u8]) -> bool {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let _ = s.write_all(bytes);
    let mut b = [0u8; 64];
    match s.read(&mut b) {
        Ok(n) => n == 0,
        Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
    }
}

async fn greedy_ids(client: &mut GenerationClient<Channel>) -> Vec<u32> {
    let params = GenerationParameters {
        max_new_tokens: Some(8),
        ignore_eos: true,
        ..Default::default()
    };
    let r = client
        .generate(prompt_request("Hello there", params))
        .await
        .expect("generate");
    r.into_inner().token_ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stranger_on_a_communicator_port_is_dropped_and_the_replica_steps_on() {
    let model = tiny_model(73);
    let workers: Vec<Process> = (0..2)
        .map(|_| {
            let mut cmd = helios_worker();
            cmd.args(["--listen", "127.0.0.1:0", "--threads", "1"]);
            Process::start(cmd, "HELIOS_WORKER_READY ")
        })
        .collect();
    let addrs: Vec<String> = workers.iter().map(|w| w.addr.clone()).collect();
    let model_path = model.path().to_str().expect("utf-8");
    let coordinator = Process::start(
        Process::helios_command(
            "coordinator",
            &["--model", model_path, "--workers", &addrs.join(",")],
        ),
        "HELIOS_READY ",
    );
    let mut client = coordinator.client().await;
    let before = greedy_ids(&mut client).await;
    // Garbage, and a hello in the communicator's own format (magic HLX2, generation 1, rank 1,
    // a nonce) from someone without the secret: both are closed, on either rank.
    let mut hello = b"HLX2".to_vec();
    hello.extend_from_slice(&1u64.to_le_bytes());
    hello.extend_from_slice(&1u32.to_le_bytes());
    hello.extend_from_slice(&[7u8; 16]);
    for w in &workers {
        let comm = ready_field(w, "comm=");
        assert!(closes_after(&comm, &[0xAB; 32]), "garbage was answered");
        assert!(
            closes_after(&comm, &hello),
            "a stranger's hello was answered"
        );
    }
    assert_eq!(
        greedy_ids(&mut client).await,
        before,
        "the replica steps on"
    );
}

/// The TCP ports `pid` listens on (from /proc: its sockets' inodes in /proc/net/tcp*).
fn listening_ports(pid: u32) -> Vec<u16> {
    let inodes: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.flatten()
                .filter_map(|e| std::fs::read_link(e.path()).ok())
                .filter_map(|l| {
                    let l = l.to_string_lossy().into_owned();
                    l.strip_prefix("socket:[")?
                        .strip_suffix(']')
                        .map(str::to_string)
                })
                .collect()
        })
        .unwrap_or_default();
    let mut ports = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let text = std::fs::read_to_string(table).unwrap_or_default();
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            // local_address, st (0A: LISTEN), inode.
            if f.len() > 9 && f[3] == "0A" && inodes.iter().any(|i| i == f[9]) {
                let port = f[1]
                    .rsplit(':')
                    .next()
                    .and_then(|p| u16::from_str_radix(p, 16).ok());
                ports.extend(port);
            }
        }
    }
    ports
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_local_clusters_on_one_host_do_not_cross() {
    let model = tiny_model(74);
    let model_path = model.path().to_str().expect("utf-8");
    let a = Process::serve(&["--model", model_path]);
    let b = Process::serve(&["--model", model_path]);
    let (mut ca, mut cb) = (a.client().await, b.client().await);
    let expected = greedy_ids(&mut ca).await;
    assert_eq!(greedy_ids(&mut cb).await, expected);
    // A's worker refuses a caller holding any other secret: B's coordinator's (random, like
    // A's), or the tests' own, which stands in for it here.
    let outsider = ClusterSecret::new(helios_tests::TEST_CLUSTER_SECRET).expect("secret");
    let worker = *a.children().first().expect("A's worker");
    let mut refused = 0;
    for port in listening_ports(worker) {
        let Ok(ch) = Endpoint::from_shared(format!("http://127.0.0.1:{port}"))
            .expect("url")
            .connect_timeout(Duration::from_secs(2))
            .connect()
            .await
        else {
            continue;
        };
        let mut w = WorkerClient::with_interceptor(ch, Authorize::cluster(Some(&outsider)));
        let health = tokio::time::timeout(Duration::from_secs(5), w.health(HealthRequest {})).await;
        if let Ok(Err(s)) = health {
            if s.code() == Code::Unauthenticated {
                refused += 1;
            }
        }
    }
    assert_eq!(
        refused, 1,
        "A's worker gRPC port did not refuse another cluster's token"
    );
    // And both serve on, each with its own workers.
    assert_eq!(greedy_ids(&mut ca).await, expected);
    assert_eq!(greedy_ids(&mut cb).await, expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn caps_connection_limits_and_read_timeouts_refuse_clearly() {
    let model = tiny_model(75);
    let server = Process::serve(&[
        "--model",
        model.path().to_str().expect("utf-8"),
        "--max-prompt-tokens",
        "8",
        "--max-new-tokens-limit",
        "4",
        "--max-stop-strings",
        "1",
        "--max-connections",
        "3",
        "--read-timeout",
        "1",
    ]);
    let mut client = server.client().await;
    let refusal = |p: GenerationParameters, prompt: &str| {
        let mut c = client.clone();
        let req = prompt_request(prompt, p);
        async move { c.generate(req).await.expect_err("refused") }
    };
    let e = refusal(Default::default(), &"word ".repeat(40)).await;
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("at most 8"), "{}", e.message());
    let many = GenerationParameters {
        max_new_tokens: Some(5),
        ..Default::default()
    };
    let e = refusal(many, "Hi").await;
    assert!(e.message().contains("at most 4 tokens"), "{}", e.message());
    let stops = GenerationParameters {
        stop: vec!["a".into(), "b".into()],
        ..Default::default()
    };
    let e = refusal(stops, "Hi").await;
    assert!(
        e.message().contains("at most 1 are allowed"),
        "{}",
        e.message()
    );
    let ok = client
        .generate(prompt_request("Hi", Default::default()))
        .await;
    assert_eq!(
        ok.expect("served").into_inner().token_ids.len(),
        4,
        "the cap is the default"
    );
    drop(client);

    // Headers that never finish, and a body that never comes: closed, and 408.
    let http = server.http_addr.clone().expect("http");
    let started = Instant::now();
    assert!(closes_after(
        &http,
        b"POST /v1/completions HTTP/1.1\r\nHost: a\r\n"
    ));
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "{:?}",
        started.elapsed()
    );
    let mut s = TcpStream::connect(&http).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    s.write_all(b"POST /v1/completions HTTP/1.1\r\nHost: a\r\nContent-Type: application/json\r\nContent-Length: 50\r\n\r\n{\"pro")
        .expect("write");
    let mut answer = String::new();
    let _ = s.read_to_string(&mut answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer:?}");
    assert!(answer.contains("\"code\":\"timeout\""), "{answer:?}");

    // Three connections are held; a fourth is closed as it arrives; once they go, all is well.
    let held: Vec<TcpStream> = (0..3)
        .map(|_| TcpStream::connect(&server.addr).expect("connect"))
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        closes_after(&server.addr, b""),
        "a fourth connection was kept"
    );
    drop(held);
    std::thread::sleep(Duration::from_millis(300));
    let mut client = server.client().await;
    assert!(client
        .generate(prompt_request("Hi", Default::default()))
        .await
        .is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_cut_off_and_its_blocks_freed() {
    let model = tiny_model(76);
    // Room for long answers: a tiny model computes thousands of tokens in seconds.
    let config = model.path().join("config.json");
    let mut c: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&config).expect("config")).expect("json");
    c["max_position_embeddings"] = 8192.into();
    std::fs::write(&config, c.to_string()).expect("config");
    let server = Process::serve(&[
        "--model",
        model.path().to_str().expect("utf-8"),
        "--num-kv-blocks",
        "600",
    ]);
    // A client with 1 KiB windows, which reads one response and then nothing.
    let channel = Endpoint::from_shared(format!("http://{}", server.addr))
        .expect("url")
        .initial_stream_window_size(Some(1024))
        .initial_connection_window_size(Some(1024))
        .connect()
        .await
        .expect("connect");
    let mut slow = GenerationClient::new(channel);
    let params = GenerationParameters {
        max_new_tokens: Some(8000),
        ignore_eos: true,
        logprobs: Some(20),
        ..Default::default()
    };
    let mut stream = slow
        .generate_stream(prompt_request("Hi", params))
        .await
        .expect("stream")
        .into_inner();
    assert!(stream.next().await.is_some());
    // The server cuts it off well before 8000 tokens: its blocks are freed while the client
    // still holds the stream.
    let metrics = || metrics_text(&server.http_url());
    let deadline = Instant::now() + Duration::from_secs(120);
    let aborted = "helios_requests_finished_total{finish_reason=\"aborted\"}";
    let kv = "helios_kv_cache_usage_ratio{replica=\"0\"}";
    let mut seen = String::new();
    while Instant::now() < deadline {
        seen = metrics();
        if metric(&seen, aborted) == Some(1.0) && metric(&seen, kv) == Some(0.0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert_eq!(metric(&seen, aborted), Some(1.0), "not cut off:\n{seen}");
    assert_eq!(metric(&seen, kv), Some(0.0), "its blocks are held:\n{seen}");
    // Reading again: what was queued, then RESOURCE_EXHAUSTED.
    let mut last = None;
    let mut n = 0;
    while let Some(item) = stream.next().await {
        n += 1;
        last = Some(item);
    }
    let e = last.expect("responses").expect_err("ends in an error");
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(
        e.message().contains("did not read its stream"),
        "{}",
        e.message()
    );
    assert!(n < 8000, "{n} responses");
    // The server serves on.
    let mut client = server.client().await;
    assert!(client
        .generate(prompt_request("Hi", Default::default()))
        .await
        .is_ok());
}
