//! Helpers for the tests that lose a worker while requests run: a fixed workload of streams
//! (greedy and seeded, short and long prompts), run concurrently while the test breaks
//! something, and compared with the same workload run undisturbed.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use helios_proto::v1::generation_client::GenerationClient;
use helios_proto::v1::{GenerateRequest, GenerationParameters};
use tonic::transport::Channel;
use tonic::Status;

use crate::server::{prompt_request, stream_all_counted, Streamed};

/// `n` requests: even ones greedy, odd ones seeded sampling; every fourth has a long prompt
/// (read in several chunks under a small `--max-batch-tokens`, so some are still reading their
/// prompt when a worker is lost). Each generates exactly `max_new_tokens`.
pub fn workload(n: usize, max_new_tokens: u32) -> Vec<GenerateRequest> {
    (0..n)
        .map(|i| {
            let prompt = if i % 4 == 3 {
                format!(
                    "Request {i}. {}",
                    "Tell me about lighthouses and the sea. ".repeat(8)
                )
            } else {
                format!("Request {i}: a short story about a fox.")
            };
            let sampled = i % 2 == 1;
            prompt_request(
                &prompt,
                GenerationParameters {
                    max_new_tokens: Some(max_new_tokens),
                    ignore_eos: true,
                    temperature: if sampled { 0.9 } else { 0.0 },
                    seed: sampled.then_some(1000 + i as u64),
                    ..Default::default()
                },
            )
        })
        .collect()
}

/// Every stream's whole answer, or its error, in request order.
pub type Answers = Vec<Result<Streamed, Status>>;

/// Runs every request as a stream at once, to the end.
pub async fn run_streams(
    client: &GenerationClient<Channel>,
    requests: Vec<GenerateRequest>,
) -> Answers {
    run_counted(client, requests, &AtomicUsize::new(0)).await
}

async fn run_counted(
    client: &GenerationClient<Channel>,
    requests: Vec<GenerateRequest>,
    responses: &AtomicUsize,
) -> Answers {
    let runs = requests.into_iter().map(|req| {
        let mut client = client.clone();
        async move { stream_all_counted(&mut client, req, responses).await }
    });
    futures::future::join_all(runs).await
}

/// Streams running in the background while a test breaks something.
pub struct Running {
    /// Responses received so far, over all streams.
    responses: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<Answers>,
}

impl Running {
    /// Starts every request as a stream at once.
    pub fn start(client: &GenerationClient<Channel>, requests: Vec<GenerateRequest>) -> Self {
        let responses = Arc::new(AtomicUsize::new(0));
        let task = tokio::spawn({
            let (client, responses) = (client.clone(), responses.clone());
            async move { run_counted(&client, requests, &responses).await }
        });
        Self { responses, task }
    }

    /// Waits (at most `limit`) until `n` responses have come back.
    pub async fn wait_for(&self, n: usize, limit: Duration) {
        let reached = async {
            while self.responses.load(Ordering::SeqCst) < n {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        };
        tokio::time::timeout(limit, reached)
            .await
            .unwrap_or_else(|_| panic!("fewer than {n} responses within {limit:?}"));
    }

    /// Every stream's answer, once all have ended (at most `limit` from now).
    pub async fn finish(self, limit: Duration) -> Answers {
        tokio::time::timeout(limit, self.task)
            .await
            .unwrap_or_else(|_| panic!("the streams did not end within {limit:?}"))
            .expect("the streams' task panicked")
    }
}

/// Every stream finished as its undisturbed run did: the same finish reason, tokens, text and
/// usage.
pub fn assert_same_streams(got: &[Result<Streamed, Status>], want: &[Result<Streamed, Status>]) {
    assert_eq!(got.len(), want.len());
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let w = w
            .as_ref()
            .unwrap_or_else(|e| panic!("undisturbed stream {i}: {e:?}"));
        let g = g
            .as_ref()
            .unwrap_or_else(|e| panic!("stream {i} failed: {e:?}"));
        assert!(
            w.finish_reason.is_some(),
            "undisturbed stream {i} did not finish"
        );
        assert_eq!(g.finish_reason, w.finish_reason, "stream {i}");
        assert_eq!(
            g.token_ids, w.token_ids,
            "stream {i}: other tokens than undisturbed"
        );
        assert_eq!(g.text, w.text, "stream {i}");
        assert_eq!(g.usage, w.usage, "stream {i}: usage");
    }
}

/// `GET PATH` from the HTTP API at `http_url` (`http://host:port`): the status line's code and
/// the whole response as text.
pub fn http_get(http_url: &str, path: &str) -> (u16, String) {
    http_call(http_url, &format!("GET {path}"), "")
}

/// `POST PATH` of the JSON `body` to the HTTP API at `http_url`: the status line's code and the
/// whole response as text.
pub fn http_post(http_url: &str, path: &str, body: &str) -> (u16, String) {
    http_call(http_url, &format!("POST {path}"), body)
}

fn http_call(http_url: &str, request_line: &str, body: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let addr = http_url.trim_start_matches("http://");
    let mut s = std::net::TcpStream::connect(addr).expect("connecting to the HTTP API");
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    write!(
        s,
        "{request_line} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .expect("send");
    let mut text = String::new();
    s.read_to_string(&mut text).expect("read the response");
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (code, text)
}

/// `GET /metrics` from the HTTP API at `http_url`, as text.
pub fn metrics_text(http_url: &str) -> String {
    http_get(http_url, "/metrics").1
}

/// The value of the sample `series` (name with labels, as written) in Prometheus text.
pub fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}
