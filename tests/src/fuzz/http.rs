//! Fuzzing the OpenAI-compatible HTTP API over raw TCP, so that every byte is the test's.
//!
//! Generators and what each case must end in:
//!
//! * `json:*`: a valid completions or chat body, mutated as JSON (fields of the wrong type,
//!   extreme numbers, nulls, huge arrays, deep nesting, unknown and duplicate keys) and then
//!   perhaps as text (truncated, invalid UTF-8, trailing garbage), in a well-framed request:
//!   200 with a completion for a valid body, 4xx with OpenAI's error object
//!   (`{"error": {"message", "type", ...}}`) for a bad one. A wrong type in a typed field must
//!   be refused; an unmutated body must succeed.
//! * `header:*`: a valid body with hostile headers (huge values, hundreds of headers, odd
//!   content types, non-ASCII bytes, a bogus trace context): 2xx or 4xx; hyper's own refusals
//!   (431, 400) come without a JSON body, which is accepted here only.
//! * `framing:*`: malformed HTTP/1.1 (bad or conflicting Content-Length, a body shorter or
//!   longer than announced, chunked garbage, bad request lines, bare LFs, random bytes): an
//!   answer below 500, or the connection closed without one (hyper's answer to framing it
//!   cannot parse).
//!
//! Never: a 5xx (the server serves throughout, so not even 503), a hang.

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::{FuzzConfig, Report, Rng, Verdict};

/// An HTTP answer as it came off the wire.
#[derive(Debug, Clone)]
pub struct HttpAnswer {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    /// Dechunked when the answer was chunked.
    pub body: Vec<u8>,
}

impl HttpAnswer {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The body as JSON, if it is.
    pub fn json(&self) -> Option<Value> {
        serde_json::from_slice(&self.body).ok()
    }
}

/// Writes `request` to `addr` and reads until the server closes the connection (requests
/// say `Connection: close`). `Ok(None)`: closed (or reset) with no answer; `Err`: no end within
/// `timeout`, or bytes that are not an HTTP answer. `half_close` shuts our side down after
/// writing, for a request whose body is shorter than it announced.
pub fn exchange(
    addr: &str,
    request: &[u8],
    half_close: bool,
    timeout: Duration,
) -> Result<Option<HttpAnswer>, String> {
    let start = Instant::now();
    let mut s = TcpStream::connect(addr).map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    s.set_write_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    // The server may answer (431, 400) and close before reading all of a huge request: a
    // failed write is not the end, the answer may be waiting.
    let _ = s.write_all(request);
    if half_close {
        let _ = s.shutdown(std::net::Shutdown::Write);
    }
    let mut buf = Vec::new();
    let mut chunk = [0u8; 64 << 10];
    loop {
        match s.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return Err(format!(
                    "no end of the answer within {:?} (a hang); {} bytes so far",
                    start.elapsed(),
                    buf.len()
                ));
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            // A reset after (or instead of) the answer.
            Err(_) => break,
        }
        if start.elapsed() > timeout {
            return Err(format!("an answer still coming after {timeout:?} (a hang)"));
        }
    }
    if buf.is_empty() {
        return Ok(None);
    }
    parse_answer(&buf).map(Some)
}

/// Parses an HTTP/1.1 answer: status line, headers, body (by Content-Length, chunked, or to
/// the end). Interim answers (`100 Continue`) before it are skipped.
pub fn parse_answer(mut buf: &[u8]) -> Result<HttpAnswer, String> {
    while buf.starts_with(b"HTTP/1.1 1") {
        let end = buf
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .ok_or("an interim answer without an end")?;
        buf = &buf[end + 4..];
    }
    let end = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| {
            format!(
                "no end of headers in {:?}",
                String::from_utf8_lossy(&buf[..buf.len().min(200)])
            )
        })?;
    let head = String::from_utf8_lossy(&buf[..end]);
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .strip_prefix("HTTP/1.1 ")
        .and_then(|r| r.get(..3))
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("bad status line {status_line:?}"))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    let mut answer = HttpAnswer {
        status,
        headers,
        body: buf[end + 4..].to_vec(),
    };
    if answer
        .header("transfer-encoding")
        .is_some_and(|t| t.eq_ignore_ascii_case("chunked"))
    {
        answer.body = dechunk(&answer.body)?;
    } else if let Some(n) = answer
        .header("content-length")
        .and_then(|v| v.parse::<usize>().ok())
    {
        if answer.body.len() < n {
            return Err(format!(
                "a body of {} bytes of {n} announced",
                answer.body.len()
            ));
        }
        answer.body.truncate(n);
    }
    Ok(answer)
}

fn dechunk(mut data: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    loop {
        let line_end = data
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or("a chunked body ends inside a chunk size")?;
        let size_text = String::from_utf8_lossy(&data[..line_end]);
        let size_text = size_text.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_text, 16)
            .map_err(|_| format!("bad chunk size {size_text:?}"))?;
        data = &data[line_end + 2..];
        if size == 0 {
            return Ok(out);
        }
        if data.len() < size + 2 {
            return Err("a chunked body ends inside a chunk".into());
        }
        out.extend_from_slice(&data[..size]);
        data = &data[size + 2..];
    }
}

/// A well-framed request: `method path`, `headers`, then `body` with its Content-Length.
pub fn request(method: &str, path: &str, headers: &[(String, String)], body: &[u8]) -> Vec<u8> {
    let mut r = format!("{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n")
        .into_bytes();
    for (k, v) in headers {
        r.extend_from_slice(k.as_bytes());
        r.extend_from_slice(b": ");
        r.extend_from_slice(v.as_bytes());
        r.extend_from_slice(b"\r\n");
    }
    r.extend_from_slice(format!("Content-Length: {}\r\n\r\n", body.len()).as_bytes());
    r.extend_from_slice(body);
    r
}

/// `GET path` (`/health`, `/metrics`): the answer, which must come.
pub fn get(addr: &str, path: &str) -> Result<HttpAnswer, String> {
    let req = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n");
    exchange(addr, req.as_bytes(), false, Duration::from_secs(30))?
        .ok_or_else(|| format!("GET {path}: the connection closed without an answer"))
}

/// One request to send and what may come back.
struct Case {
    kind: String,
    bytes: Vec<u8>,
    verdict: Verdict,
    /// Headers or framing the app may never see: hyper's bodiless 4xx is accepted.
    transport: bool,
    /// Framing hyper may not parse: a closed connection is accepted.
    may_close: bool,
    half_close: bool,
}

/// Runs the HTTP fuzzer against `addr` (`host:port` of the HTTP API) for `cfg`'s budget.
pub fn fuzz(addr: &str, cfg: &FuzzConfig) -> Report {
    let mut report = Report::new("http", cfg.seed);
    let mut budget = cfg.budget();
    while let Some(i) = budget.next_case() {
        let mut rng = Rng::for_case(cfg.seed, "http", i);
        let case = match rng.below(10) {
            0..=5 => json_case(&mut rng),
            6 | 7 => header_case(&mut rng),
            _ => framing_case(&mut rng),
        };
        let answer = exchange(addr, &case.bytes, case.half_close, Duration::from_secs(60));
        let outcome = judge(&case, answer).map_err(|e| {
            let sent = String::from_utf8_lossy(&case.bytes[..case.bytes.len().min(1500)]);
            format!("{e}\n    request: {sent:?}")
        });
        report.record(i, &case.kind, outcome);
        if report.should_stop() {
            break;
        }
    }
    report
}

fn judge(case: &Case, answer: Result<Option<HttpAnswer>, String>) -> Result<String, String> {
    let Some(a) = answer? else {
        return if case.may_close {
            Ok("closed".into())
        } else {
            Err("the connection closed without an answer".into())
        };
    };
    let outcome = a.status.to_string();
    if a.status >= 500 {
        return Err(format!("{} {}", a.status, String::from_utf8_lossy(&a.body)));
    }
    if (200..300).contains(&a.status) {
        if case.verdict == Verdict::Bad {
            return Err(format!("{} for an invalid request", a.status));
        }
        return check_success(&a).map(|()| outcome);
    }
    if case.verdict == Verdict::Good && !case.transport {
        return Err(format!(
            "{} for a valid request: {}",
            a.status,
            String::from_utf8_lossy(&a.body)
        ));
    }
    if openai_error(&a) {
        return Ok(outcome);
    }
    if case.transport && a.body.is_empty() {
        return Ok(format!("{outcome} (hyper)"));
    }
    Err(format!(
        "{} without an OpenAI error object: {:?}",
        a.status,
        String::from_utf8_lossy(&a.body[..a.body.len().min(300)])
    ))
}

/// `{"error": {"message": "...", "type": "...", ...}}`.
fn openai_error(a: &HttpAnswer) -> bool {
    a.json()
        .is_some_and(|v| v["error"]["message"].is_string() && v["error"]["type"].is_string())
}

/// A 2xx is a completion (JSON with choices) or an event stream that ends with `[DONE]`.
fn check_success(a: &HttpAnswer) -> Result<(), String> {
    let text = String::from_utf8_lossy(&a.body);
    if a.header("content-type")
        .is_some_and(|c| c.starts_with("text/event-stream"))
    {
        return if text.trim_end().ends_with("data: [DONE]") {
            Ok(())
        } else {
            Err(format!(
                "an event stream without [DONE]: {:?}",
                &text[text.len().saturating_sub(300)..]
            ))
        };
    }
    match a.json() {
        Some(v) if v["choices"].is_array() => Ok(()),
        Some(_) | None => Err(format!(
            "a {} that is not a completion: {text:.300}",
            a.status
        )),
    }
}

/// A valid body for the endpoint at `path`.
fn base_body(chat: bool) -> Value {
    if chat {
        json!({"messages": [{"role": "user", "content": "hello world"}], "max_tokens": 4, "temperature": 0})
    } else {
        json!({"prompt": "hello world", "max_tokens": 4, "temperature": 0})
    }
}

/// Fields that deserialize into numbers: any other JSON type there must be refused.
const NUMERIC: [&str; 11] = [
    "max_tokens",
    "temperature",
    "top_p",
    "n",
    "seed",
    "top_k",
    "min_p",
    "repetition_penalty",
    "frequency_penalty",
    "presence_penalty",
    "priority",
];
const OTHER_FIELDS: [&str; 12] = [
    "prompt",
    "messages",
    "stop",
    "stream",
    "stream_options",
    "logprobs",
    "top_logprobs",
    "model",
    "user",
    "stop_token_ids",
    "logit_bias",
    "ignore_eos",
];

/// A hostile JSON value and whether a numeric field holding it must be refused.
fn hostile_value(rng: &mut Rng) -> (Value, bool) {
    match rng.below(16) {
        0 => (Value::Null, false),
        1 => (json!(true), true),
        2 => (json!("ten"), true),
        3 => (json!("NaN"), true),
        4 => (json!("Infinity"), true),
        5 => (json!(-1), false),
        6 => (json!(1e300), false),
        7 => (json!(u64::MAX), false),
        8 => (json!(i64::MIN), false),
        9 => (json!(1.5), false),
        10 => (json!([]), true),
        11 => (json!({}), true),
        12 => (json!([1, "a", null, {"b": []}]), true),
        13 => (
            Value::Array(vec![json!(7); rng.range(1_000, 100_000)]),
            true,
        ),
        14 => (json!("x".repeat(rng.range(1, 1 << 20))), true),
        _ => (json!(0), false),
    }
}

/// A completions or chat body with JSON-level mutations, then text-level ones.
fn json_case(rng: &mut Rng) -> Case {
    let chat = rng.chance(1, 2);
    let mut body = base_body(chat);
    let mut verdict = Verdict::Good;
    let mut kind = "json:valid";
    if rng.chance(1, 8) {
        body["stream"] = json!(true);
        if rng.chance(1, 2) {
            body["stream_options"] = json!({"include_usage": true});
        }
    }
    let mutations = if rng.chance(1, 8) { 0 } else { rng.range(1, 3) };
    let mut touched = Vec::new();
    for _ in 0..mutations {
        let v = mutate_json(rng, &mut body, chat, &mut touched);
        kind = v.1;
        verdict = verdict.and(v.0);
    }
    let mut text = body.to_string().into_bytes();
    if rng.chance(1, 4) {
        let replaced;
        (kind, replaced) = mutate_text(rng, &mut text);
        // A body replaced whole owes nothing to the JSON mutations before.
        verdict = if replaced {
            Verdict::Unsure
        } else {
            verdict.and(Verdict::Unsure)
        };
    }
    let path = if chat {
        "/v1/chat/completions"
    } else {
        "/v1/completions"
    };
    let headers = [("Content-Type".to_string(), "application/json".to_string())];
    Case {
        kind: format!("{kind}:{}", if chat { "chat" } else { "completions" }),
        bytes: request("POST", path, &headers, &text),
        verdict,
        transport: false,
        may_close: false,
        half_close: false,
    }
}

/// One JSON-level mutation of `body`: its verdict and name. A field an earlier mutation set
/// (`touched`) is neither set again nor deleted, so no mutation undoes another's verdict.
fn mutate_json(
    rng: &mut Rng,
    body: &mut Value,
    chat: bool,
    touched: &mut Vec<String>,
) -> (Verdict, &'static str) {
    let obj = body.as_object_mut().expect("an object");
    match rng.below(6) {
        0 | 1 => {
            let field = *rng.pick(&NUMERIC);
            if touched.iter().any(|t| t == field) {
                return (Verdict::Good, "json:none");
            }
            touched.push(field.to_string());
            let (v, bad) = hostile_value(rng);
            obj.insert(field.into(), v);
            (
                if bad { Verdict::Bad } else { Verdict::Unsure },
                "json:numeric",
            )
        }
        2 => {
            let field = *rng.pick(&OTHER_FIELDS);
            obj.insert(field.into(), hostile_value(rng).0);
            (Verdict::Unsure, "json:field")
        }
        3 => {
            let field = if chat { "messages" } else { "prompt" };
            obj.insert(field.into(), hostile_input(rng, chat));
            (Verdict::Unsure, "json:input")
        }
        4 => {
            let keys: Vec<String> = obj
                .keys()
                .filter(|k| !touched.contains(k))
                .cloned()
                .collect();
            if let Some(k) = keys.get(rng.below(keys.len().max(1))) {
                obj.remove(k);
            }
            (Verdict::Unsure, "json:delete")
        }
        _ => {
            obj.insert(format!("unknown_{}", rng.below(100)), hostile_value(rng).0);
            (Verdict::Good, "json:unknown")
        }
    }
}

/// A hostile `prompt` (completions) or `messages` (chat).
fn hostile_input(rng: &mut Rng, chat: bool) -> Value {
    if chat {
        let role = *rng.pick(&[
            "user",
            "system",
            "assistant",
            "developer",
            "tool",
            "",
            "ROOT",
        ]);
        match rng.below(6) {
            0 => json!([]),
            1 => json!([{"role": role}]),
            2 => {
                json!([{"role": role, "content": [{"type": "text", "text": "hi"}, {"type": "image_url"}]}])
            }
            3 => json!([{"role": 7, "content": "hi"}]),
            4 => Value::Array(vec![
                json!({"role": "user", "content": "hi"});
                rng.range(100, 10_000)
            ]),
            _ => json!([{"role": role, "content": hostile_value(rng).0}]),
        }
    } else {
        match rng.below(6) {
            0 => json!([1, 2, 3]),
            1 => json!([1, 4_294_967_295u64, -1]),
            2 => json!(["a", "b"]),
            3 => json!([[1, 2], [3]]),
            4 => json!(""),
            _ => hostile_value(rng).0,
        }
    }
}

/// One text-level mutation of a serialized body; its name, and whether it replaced the body.
fn mutate_text(rng: &mut Rng, text: &mut Vec<u8>) -> (&'static str, bool) {
    match rng.below(7) {
        0 => {
            text.truncate(rng.below(text.len().max(1)));
            ("text:truncate", false)
        }
        1 => {
            let at = rng.below(text.len() + 1);
            text.splice(at..at, [0xff, 0xc3, 0x28, 0xed, 0xa0, 0x80]);
            ("text:utf8", false)
        }
        2 => {
            // Inside a string value: invalid UTF-8 that JSON's syntax does not catch.
            let s = b"{\"prompt\": \"\xff\xfe\", \"max_tokens\": 4}";
            *text = s.to_vec();
            ("text:utf8-string", true)
        }
        3 => {
            let depth = rng.range(100, 10_000);
            let nest = format!("{}{}", "[".repeat(depth), "]".repeat(depth));
            *text = format!("{{\"prompt\": \"hi\", \"stop\": {nest}}}").into_bytes();
            ("text:deep", true)
        }
        4 => {
            let dup = b"{\"max_tokens\": \"x\", \"max_tokens\": 4, ".to_vec();
            text.splice(0..1, dup);
            ("text:duplicate", false)
        }
        5 => {
            let tails: [&[u8]; 4] = [b"}", b" garbage", b"\x00", b"{}"];
            let tail = *rng.pick(&tails);
            text.extend_from_slice(tail);
            ("text:trailing", false)
        }
        _ => {
            let lit = *rng.pick(&["NaN", "Infinity", "-Infinity", "1e999", "-0", "0x10", "01"]);
            *text = format!("{{\"prompt\": \"hi\", \"max_tokens\": 2, \"temperature\": {lit}}}")
                .into_bytes();
            ("text:literal", true)
        }
    }
}

/// A valid completions body with hostile headers.
fn header_case(rng: &mut Rng) -> Case {
    let body = base_body(false).to_string().into_bytes();
    let mut headers = vec![("Content-Type".to_string(), "application/json".to_string())];
    let kind = match rng.below(7) {
        0 => {
            headers.push(("X-Big".into(), "v".repeat(rng.range(8 << 10, 1 << 20))));
            "header:huge"
        }
        1 => {
            for i in 0..rng.range(50, 2_000) {
                headers.push((format!("X-H{i}"), "1".into()));
            }
            "header:many"
        }
        2 => {
            let ct = *rng.pick(&[
                "text/plain",
                "application/xml",
                "",
                "application/json; charset=latin1",
                "multipart/form-data; boundary=x",
            ]);
            headers[0].1 = ct.into();
            "header:content-type"
        }
        3 => {
            let tp = *rng.pick(&[
                "garbage",
                "00-zz-zz-01",
                "ff-ffffffffffffffffffffffffffffffff-ffffffffffffffff-ff",
                "",
            ]);
            headers.push(("traceparent".into(), tp.into()));
            headers.push(("tracestate".into(), "=,=,=".repeat(100)));
            "header:trace"
        }
        4 => {
            headers.push((
                "X-Bytes".into(),
                String::from_utf8_lossy(&[0xc3, 0xa9, 0x80]).into_owned(),
            ));
            "header:non-ascii"
        }
        5 => {
            headers.push(("Expect".into(), "100-continue".into()));
            "header:expect"
        }
        _ => {
            headers.push((
                "Accept".into(),
                "application/openmetrics-text;;;,*/*;q=nan".into(),
            ));
            headers.push(("Authorization".into(), "Bearer \u{1}".into()));
            "header:odd"
        }
    };
    Case {
        kind: kind.into(),
        bytes: request("POST", "/v1/completions", &headers, &body),
        verdict: Verdict::Good,
        transport: true,
        may_close: false,
        half_close: false,
    }
}

/// Malformed HTTP/1.1.
fn framing_case(rng: &mut Rng) -> Case {
    let body = base_body(false).to_string();
    let n = body.len();
    let head = "POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nContent-Type: application/json\r\n";
    let mut half_close = false;
    let (kind, bytes): (&str, Vec<u8>) = match rng.below(10) {
        0 => {
            let cl = *rng.pick(&["abc", "-1", "1, 2", "+5", "99999999999999999999999", " "]);
            ("framing:content-length", format!("{head}Content-Length: {cl}\r\n\r\n{body}").into_bytes())
        }
        1 => ("framing:two-lengths", format!("{head}Content-Length: {n}\r\nContent-Length: {}\r\n\r\n{body}", n + 3).into_bytes()),
        2 => ("framing:short-length", format!("{head}Content-Length: {}\r\n\r\n{body}", rng.below(n)).into_bytes()),
        3 => {
            half_close = true;
            ("framing:long-length", format!("{head}Content-Length: {}\r\n\r\n{body}", n + rng.range(1, 1 << 20)).into_bytes())
        }
        4 => {
            half_close = true;
            let chunks = *rng.pick(&["zz\r\nabc\r\n0\r\n\r\n", "5\r\nabc\r\n0\r\n\r\n", "ffffffffffffffff\r\nabc", "3;x=\u{1}\r\nabc\r\n0\r\n\r\n", "3\r\n{}}\r\n", "-1\r\n\r\n"]);
            ("framing:chunked", format!("{head}Transfer-Encoding: chunked\r\n\r\n{chunks}").into_bytes())
        }
        5 => ("framing:length-and-chunked", format!("{head}Content-Length: {n}\r\nTransfer-Encoding: chunked\r\n\r\n{body}").into_bytes()),
        6 => {
            let line = *rng.pick(&["FOO / HTTP/1.1", "GET / HTTP/9.9", "GET /", "GET\u{0} / HTTP/1.1", " / HTTP/1.1", "POST /v1/completions HTTP/1.1 extra"]);
            ("framing:request-line", format!("{line}\r\nHost: x\r\nConnection: close\r\n\r\n").into_bytes())
        }
        7 => {
            let path = format!("/v1/{}", "a".repeat(rng.range(1 << 10, 200 << 10)));
            ("framing:long-uri", format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").into_bytes())
        }
        8 => ("framing:bare-lf", format!("POST /v1/completions HTTP/1.1\nHost: x\nConnection: close\nContent-Length: {n}\n\n{body}").into_bytes()),
        _ => {
            half_close = true;
            let n = rng.range(1, 4096);
            ("framing:random", rng.bytes(n))
        }
    };
    Case {
        kind: kind.into(),
        bytes,
        verdict: Verdict::Unsure,
        transport: true,
        may_close: true,
        half_close,
    }
}
