//! The OpenAI protocol: `POST {url}/v1/completions` with `stream: true` and
//! `stream_options: {"include_usage": true}`, read as server-sent events until `[DONE]`.
//!
//! Every chunk with a choice is one step of the stream, as vLLM measures it: the first sets
//! TTFT, each later one adds an ITL (a chunk may carry several tokens, or none: a special token
//! such as end-of-sequence has no text). The exact counts come from the final usage chunk; a
//! server that sends none is credited one token per chunk with text, and the prompt length the
//! client built.
//! The chunks' text is kept as the answer (a chat's next turn resends it).
//! `ignore_eos` is sent as vLLM's extension; a request's session id goes as OpenAI's `user`;
//! `--extra-body` is merged into every body last, for servers that need something else (e.g.
//! llama.cpp: `{"logit_bias": {"2": -100}}`).
//!
//! Plain HTTP/1.1 over hyper (already in the tree through tonic): benchmarks talk to a server
//! on the local network, so there is no TLS.

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::header::{ACCEPT, CONTENT_TYPE};
use hyper::{Method, Request, StatusCode};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client as HttpClient;
use hyper_util::rt::TokioExecutor;
use serde_json::{json, Map, Value};

use super::sse::SseParser;
use super::{clip, Clock, Reply, Sampling};
use crate::load::dataset::{Input, Prompt};

/// How much of an error body an error message quotes.
const QUOTED: usize = 300;

pub struct OpenAi {
    http: HttpClient<HttpConnector, Full<Bytes>>,
    /// `http://host:port`, no trailing slash.
    base: String,
    /// The full completions URL.
    completions: String,
    pub model: String,
    extra_body: Map<String, Value>,
}

/// `http://host:port` from `host:port`, `http://host:port/` or `http://host:port/v1` (the form
/// OpenAI client libraries take).
pub fn base_url(url: &str) -> Result<String> {
    if url.starts_with("https://") {
        bail!("{url}: https is not supported (plain HTTP only)");
    }
    let mut base = if url.contains("://") {
        url.to_string()
    } else {
        format!("http://{url}")
    };
    while base.ends_with('/') {
        base.pop();
    }
    if let Some(b) = base.strip_suffix("/v1") {
        base = b.to_string();
    }
    Ok(base)
}

impl OpenAi {
    /// Connects to `url`; `model` defaults to the first one `GET /v1/models` lists.
    pub async fn connect(
        url: &str,
        endpoint: &str,
        model: Option<String>,
        extra_body: Map<String, Value>,
    ) -> Result<OpenAi> {
        let base = base_url(url)?;
        let endpoint = if endpoint.starts_with('/') {
            endpoint.to_string()
        } else {
            format!("/{endpoint}")
        };
        let http = HttpClient::builder(TokioExecutor::new()).build_http();
        let mut c = OpenAi {
            http,
            completions: format!("{base}{endpoint}"),
            base,
            model: model.unwrap_or_default(),
            extra_body,
        };
        if c.model.is_empty() {
            c.model = c
                .first_model()
                .await
                .context("finding the model's name (or give --model)")?;
        }
        Ok(c)
    }

    /// The first id of `GET /v1/models`.
    async fn first_model(&self) -> Result<String> {
        let url = format!("{}/v1/models", self.base);
        let req = Request::get(&url).body(Full::new(Bytes::new()))?;
        let resp = self
            .http
            .request(req)
            .await
            .with_context(|| format!("GET {url}"))?;
        let status = resp.status();
        let body = resp.into_body().collect().await?.to_bytes();
        if status != StatusCode::OK {
            bail!(
                "GET {url}: HTTP {status}: {}",
                clip(&String::from_utf8_lossy(&body), QUOTED)
            );
        }
        let v: Value = serde_json::from_slice(&body).with_context(|| format!("GET {url}"))?;
        v.pointer("/data/0/id")
            .and_then(Value::as_str)
            .map(str::to_string)
            .with_context(|| {
                format!(
                    "GET {url}: no model listed in {}",
                    clip(&v.to_string(), QUOTED)
                )
            })
    }

    /// The request body: the prompt, `max_tokens`, sampling, streaming with usage, then
    /// `--extra-body` on top.
    pub fn body(&self, prompt: &Prompt, s: &Sampling) -> Value {
        let prompt_value = match &prompt.input {
            Input::Text(t) => json!(t),
            // The completions API also takes a prompt as a list of token ids.
            Input::Ids(ids) => json!(ids),
        };
        let mut body = json!({
            "model": self.model,
            "prompt": prompt_value,
            "max_tokens": prompt.output_len,
            "temperature": s.temperature,
            "stream": true,
            "stream_options": {"include_usage": true},
        });
        if let Value::Object(o) = &mut body {
            if let Some(p) = s.top_p {
                o.insert("top_p".into(), json!(p));
            }
            if let Some(k) = s.top_k {
                o.insert("top_k".into(), json!(k));
            }
            if let Some(seed) = s.seed {
                o.insert("seed".into(), json!(seed));
            }
            if s.ignore_eos {
                o.insert("ignore_eos".into(), json!(true));
            }
            if let Some(session) = &prompt.session_id {
                o.insert("user".into(), json!(session));
            }
            for (k, v) in &self.extra_body {
                o.insert(k.clone(), v.clone());
            }
        }
        body
    }

    pub async fn send(&self, prompt: &Prompt, s: &Sampling) -> Result<Reply, String> {
        let body = self.body(prompt, s).to_string();
        let req = Request::builder()
            .method(Method::POST)
            .uri(&self.completions)
            .header(CONTENT_TYPE, "application/json")
            .header(ACCEPT, "text/event-stream")
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| format!("building the request: {e}"))?;
        let mut clock = Clock::start();
        let resp = self
            .http
            .request(req)
            .await
            .map_err(|e| format!("POST {}: {e}", self.completions))?;
        let status = resp.status();
        let mut body = resp.into_body();
        if status != StatusCode::OK {
            let text = body
                .collect()
                .await
                .map(|b| String::from_utf8_lossy(&b.to_bytes()).into_owned())
                .unwrap_or_default();
            return Err(format!("HTTP {status}: {}", clip(text.trim(), QUOTED)));
        }
        let mut sse = SseParser::default();
        let mut stream = Stream::default();
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| format!("reading the stream: {e}"))?;
            let Ok(data) = frame.into_data() else {
                continue;
            };
            for event in sse.push(&data) {
                if stream.event(&event, &mut clock)? {
                    return stream.finish(clock, prompt);
                }
            }
        }
        for event in sse.finish() {
            if stream.event(&event, &mut clock)? {
                return stream.finish(clock, prompt);
            }
        }
        Err(format!(
            "the stream ended without [DONE] after {} chunks",
            clock.chunks
        ))
    }
}

/// What a stream said so far.
#[derive(Default)]
struct Stream {
    usage: Option<(usize, usize)>,
    /// Chunks with text: the output tokens if the server reports no usage.
    text_chunks: usize,
    /// The text so far.
    text: String,
}

impl Stream {
    /// Takes one event's payload; `true` at `[DONE]`.
    fn event(&mut self, data: &str, clock: &mut Clock) -> Result<bool, String> {
        let data = data.trim();
        if data == "[DONE]" {
            return Ok(true);
        }
        let v: Value = serde_json::from_str(data)
            .map_err(|e| format!("bad event {:?}: {e}", clip(data, QUOTED)))?;
        if let Some(err) = v.get("error") {
            let msg = err
                .get("message")
                .and_then(Value::as_str)
                .map_or_else(|| err.to_string(), str::to_string);
            return Err(format!("error event: {}", clip(&msg, QUOTED)));
        }
        if let Some(choice) = v.pointer("/choices/0") {
            clock.chunk();
            if let Some(t) = choice
                .get("text")
                .and_then(Value::as_str)
                .filter(|t| !t.is_empty())
            {
                self.text_chunks += 1;
                self.text.push_str(t);
            }
        }
        if let Some(u) = v.get("usage").filter(|u| !u.is_null()) {
            let n = |k: &str| u.get(k).and_then(Value::as_u64).map(|n| n as usize);
            match (n("prompt_tokens"), n("completion_tokens")) {
                (Some(p), Some(c)) => self.usage = Some((p, c)),
                _ => return Err(format!("bad usage {}", clip(&u.to_string(), QUOTED))),
            }
        }
        Ok(false)
    }

    fn finish(self, clock: Clock, prompt: &Prompt) -> Result<Reply, String> {
        let (prompt_tokens, output_tokens) =
            self.usage.unwrap_or((prompt.prompt_len, self.text_chunks));
        Ok(Reply {
            record: clock.finish(prompt_tokens, output_tokens)?,
            answer: Input::Text(self.text),
        })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    #[test]
    fn base_urls() {
        for (url, want) in [
            ("127.0.0.1:8000", "http://127.0.0.1:8000"),
            ("http://h:1/", "http://h:1"),
            ("http://h:1/v1", "http://h:1"),
            ("http://h:1/v1/", "http://h:1"),
        ] {
            assert_eq!(base_url(url).expect("url"), want);
        }
        assert!(base_url("https://h").is_err());
    }

    /// A one-shot HTTP server: answers every connection with `response`, and sends back the
    /// requests it read.
    pub(crate) async fn fake_server(
        responses: Vec<String>,
    ) -> (String, tokio::sync::mpsc::UnboundedReceiver<String>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            for response in responses {
                let Ok((mut sock, _)) = listener.accept().await else {
                    return;
                };
                let mut req = Vec::new();
                let mut buf = [0u8; 4096];
                // Read the head, then as many body bytes as Content-Length says.
                loop {
                    let n = sock.read(&mut buf).await.unwrap_or(0);
                    if n == 0 {
                        break;
                    }
                    req.extend_from_slice(&buf[..n]);
                    let text = String::from_utf8_lossy(&req).to_string();
                    if let Some(head_end) = text.find("\r\n\r\n") {
                        let len = text
                            .lines()
                            .find_map(|l| {
                                l.to_ascii_lowercase()
                                    .strip_prefix("content-length:")
                                    .map(|v| v.trim().parse::<usize>().unwrap_or(0))
                            })
                            .unwrap_or(0);
                        if req.len() >= head_end + 4 + len {
                            break;
                        }
                    }
                }
                let _ = tx.send(String::from_utf8_lossy(&req).into_owned());
                let _ = sock.write_all(response.as_bytes()).await;
                let _ = sock.shutdown().await;
            }
        });
        (format!("http://{addr}"), rx)
    }

    pub(crate) fn sse_response(events: &[&str]) -> String {
        let mut body = String::new();
        for e in events {
            body.push_str(&format!("data: {e}\n\n"));
        }
        format!(
            "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n{body}"
        )
    }

    fn json_response(status: &str, body: &str) -> String {
        format!(
            "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\
             connection: close\r\n\r\n{body}",
            body.len()
        )
    }

    fn prompt() -> Prompt {
        Prompt {
            input: Input::Text("Hello there".into()),
            prompt_len: 3,
            output_len: 3,
            session_id: Some("session-2".into()),
        }
    }

    #[tokio::test]
    async fn streams_are_timed_and_counted_from_usage() {
        let models = json_response("200 OK", r#"{"object":"list","data":[{"id":"smol"}]}"#);
        let stream = sse_response(&[
            r#"{"choices":[{"index":0,"text":"Hi"}]}"#,
            r#"{"choices":[{"index":0,"text":""}]}"#,
            r#"{"choices":[{"index":0,"text":" there"}]}"#,
            r#"{"choices":[{"index":0,"text":"!","finish_reason":"length"}]}"#,
            r#"{"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":3,"total_tokens":6}}"#,
            "[DONE]",
        ]);
        let (url, mut requests) = fake_server(vec![models, stream]).await;
        let extra = json!({"logit_bias": {"2": -100}, "temperature": 0.5});
        let Value::Object(extra) = extra else {
            unreachable!()
        };
        let c = OpenAi::connect(&url, "/v1/completions", None, extra)
            .await
            .expect("connect");
        assert_eq!(c.model, "smol");
        let s = Sampling {
            ignore_eos: true,
            seed: Some(4),
            ..Default::default()
        };
        let reply = c.send(&prompt(), &s).await.expect("record");
        // The answer is the chunks' text, in order.
        assert_eq!(reply.answer, Input::Text("Hi there!".into()));
        let r = reply.record;
        assert_eq!((r.prompt_tokens, r.output_tokens), (3, 3));
        // Every chunk with a choice is a step, the empty one too (as vLLM counts).
        assert_eq!(r.itl.len(), 3);
        assert!(r.ttft <= r.e2el);

        let get = requests.recv().await.expect("GET");
        assert!(get.starts_with("GET /v1/models "), "{get}");
        let post = requests.recv().await.expect("POST");
        assert!(post.starts_with("POST /v1/completions "), "{post}");
        let body: Value =
            serde_json::from_str(post.split("\r\n\r\n").nth(1).expect("body")).expect("JSON body");
        assert_eq!(body["model"], "smol");
        assert_eq!(body["prompt"], "Hello there");
        assert_eq!(body["max_tokens"], 3);
        assert_eq!(body["stream"], true);
        assert_eq!(body["stream_options"]["include_usage"], true);
        assert_eq!(body["ignore_eos"], true);
        assert_eq!(body["seed"], 4);
        // The session id is OpenAI's `user`.
        assert_eq!(body["user"], "session-2");
        // --extra-body wins over the flags.
        assert_eq!(body["temperature"], 0.5);
        assert_eq!(body["logit_bias"]["2"], -100);
    }

    #[tokio::test]
    async fn without_usage_chunks_count_and_errors_are_failures() {
        let no_usage = sse_response(&[
            r#"{"choices":[{"text":"a"}]}"#,
            r#"{"choices":[{"text":"b"}]}"#,
            r#"{"choices":[{"text":"","finish_reason":"stop"}]}"#,
            "[DONE]",
        ]);
        let error_event = sse_response(&[
            r#"{"choices":[{"text":"a"}]}"#,
            r#"{"error":{"message":"worker died","type":"server_error"}}"#,
        ]);
        let refused = json_response("400 Bad Request", r#"{"error":{"message":"too long"}}"#);
        let truncated = sse_response(&[r#"{"choices":[{"text":"a"}]}"#]);
        let (url, _requests) = fake_server(vec![
            no_usage.clone(),
            error_event,
            refused,
            truncated,
            no_usage,
        ])
        .await;
        let c = OpenAi::connect(&url, "v1/completions", Some("m".into()), Map::new())
            .await
            .expect("connect");
        let s = Sampling::default();
        let r = c.send(&prompt(), &s).await.expect("record").record;
        assert_eq!((r.prompt_tokens, r.output_tokens), (3, 2));
        let e = c.send(&prompt(), &s).await.expect_err("error event");
        assert!(e.contains("worker died"), "{e}");
        let e = c.send(&prompt(), &s).await.expect_err("400");
        assert!(e.starts_with("HTTP 400") && e.contains("too long"), "{e}");
        let e = c.send(&prompt(), &s).await.expect_err("no [DONE]");
        assert!(e.contains("without [DONE]"), "{e}");
        // Two tokens where --ignore-eos asked for exactly three: a failed request.
        let c = super::super::Client::OpenAi(c);
        let s = Sampling {
            ignore_eos: true,
            ..Default::default()
        };
        let e = c.send(0, &prompt(), &s).await.expect_err("short");
        assert!(e.contains("expected exactly 3 output tokens"), "{e}");
    }
}
