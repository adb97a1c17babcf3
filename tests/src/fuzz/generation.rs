//! Fuzzing the coordinator's gRPC API (`helios.v1.Generation`).
//!
//! Three generators:
//!
//! * `hostile`: well-formed `GenerateRequest`s (unary or streamed), `TokenizeRequest`s and
//!   `DetokenizeRequest`s whose fields come from pools of hostile values, each marked with
//!   what the API documents for it ([`Verdict`]): a request with a `Bad` field must be refused
//!   INVALID_ARGUMENT (OUT_OF_RANGE when it is over the 4 MiB message limit), one of only
//!   `Good` fields must succeed, the rest may do either. So a validation that goes missing
//!   fails the run, not only a crash. Some carry a hostile `grpc-timeout`.
//! * `raw:*`: a request encoded, then mangled ([`super::mutate_bytes`]), or raw bytes with
//!   invalid UTF-8 in a string field: OK, INVALID_ARGUMENT, or tonic's own refusal of an
//!   undecodable message (INTERNAL "failed to decode Protobuf message").
//! * `frame:*`: a valid message in frames that lie (compressed flag, lengths past the end,
//!   two messages, none, an unknown `grpc-encoding`): tonic's refusals or an answer.
//!
//! Never: UNKNOWN, UNAVAILABLE, INTERNAL from the service, a broken connection, a hang.

use bytes::Bytes;
use std::collections::HashMap;

use helios_proto::v1::{
    constraint, ChatMessage, Constraint, DetokenizeRequest, GenerateRequest, GenerateResponse,
    GenerationParameters, TokenizeRequest, TokenizeResponse,
};
use prost::Message;
use tonic::{Code, Status};

use super::grpc::{frame, frame_with, outcome_name, tonic_refusal, CallResult, RawClient};
use super::{mutate_bytes, FuzzConfig, FuzzTarget, Report, Rng, Verdict};

pub const GENERATE: &str = "/helios.v1.Generation/Generate";
pub const GENERATE_STREAM: &str = "/helios.v1.Generation/GenerateStream";
pub const TOKENIZE: &str = "/helios.v1.Generation/Tokenize";
pub const DETOKENIZE: &str = "/helios.v1.Generation/Detokenize";

/// The server's message limit (`front_door::MAX_REQUEST_BYTES`).
const MAX_MESSAGE: usize = 4 << 20;

/// What the generators need to know of the model.
#[derive(Debug, Clone, Copy)]
pub struct ModelShape {
    pub vocab_size: u32,
}

/// One call to make, and what may come back.
struct Case {
    kind: String,
    path: &'static str,
    body: Bytes,
    /// Sent as frames of ours (`frame:*`) rather than through the codec.
    framed: bool,
    verdict: Verdict,
    /// tonic's own refusals of undecodable bytes are accepted.
    raw: bool,
    metadata: Vec<(String, String)>,
    /// The call carries a short deadline: DEADLINE_EXCEEDED (or tonic's CANCELLED "Timeout
    /// expired") is accepted.
    deadline: bool,
}

/// Runs the gRPC fuzzer against `target` for `cfg`'s budget.
pub async fn fuzz(target: &FuzzTarget, model: ModelShape, cfg: &FuzzConfig) -> Report {
    let mut report = Report::new("grpc", cfg.seed);
    let client = RawClient::new(target, std::time::Duration::from_secs(60));
    let mut budget = cfg.budget();
    while let Some(i) = budget.next_case() {
        let mut rng = Rng::for_case(cfg.seed, "grpc", i);
        let case = make_case(&mut rng, model);
        let streaming = case.path == GENERATE_STREAM;
        let outcome = if case.framed {
            judge(
                &case,
                client
                    .frames(case.path, case.body.clone(), &case.metadata)
                    .await,
            )
        } else if streaming {
            let r = client
                .server_streaming(case.path, case.body.clone(), &case.metadata)
                .await;
            judge(&case, r)
        } else {
            let r = client
                .unary(case.path, case.body.clone(), &case.metadata)
                .await
                .map(|r| r.map(|m| vec![m]));
            judge(&case, r)
        };
        let outcome = outcome.map_err(|e| format!("{e}\n    {}: {}", case.path, describe(&case)));
        report.record(i, &case.kind, outcome);
        if report.should_stop() {
            break;
        }
    }
    report
}

/// A case's message for a failure message: decoded when it is well formed, else its bytes.
fn describe(case: &Case) -> String {
    let b = case.body.clone();
    let text = match case.path {
        _ if case.raw => format!("{:02x?}", &b[..b.len().min(200)]),
        TOKENIZE => format!("{:?}", TokenizeRequest::decode(b)),
        DETOKENIZE => format!("{:?}", DetokenizeRequest::decode(b)),
        _ => format!("{:?}", GenerateRequest::decode(b)),
    };
    let meta = format!("{:?}", case.metadata);
    meta.chars()
        .take(300)
        .chain(" ".chars())
        .chain(text.chars().take(1500))
        .collect()
}

fn make_case(rng: &mut Rng, model: ModelShape) -> Case {
    match rng.below(10) {
        0..=5 => hostile_case(rng, model),
        6..=8 => raw_case(rng, model),
        _ => frame_case(rng, model),
    }
}

/// Is `r` what `case` may end in? `Ok(outcome name)` or `Err(why not)`.
fn judge(case: &Case, r: CallResult<Vec<Bytes>>) -> Result<String, String> {
    match r? {
        Ok(messages) => {
            if case.verdict == Verdict::Bad {
                return Err("an invalid request succeeded".into());
            }
            check_answer(case.path, &messages)?;
            Ok("OK".into())
        }
        Err(status) => judge_status(case, &status).map(|()| outcome_name(&status)),
    }
}

fn judge_status(case: &Case, s: &Status) -> Result<(), String> {
    let oversize = case.body.len() > MAX_MESSAGE;
    let ok = match s.code() {
        Code::InvalidArgument => case.verdict != Verdict::Good || case.raw,
        // Sequential calls never fill the queue, but the API documents it as a refusal.
        Code::ResourceExhausted => true,
        Code::OutOfRange => (oversize || case.raw) && tonic_refusal(s),
        Code::Internal | Code::Unimplemented => case.raw && tonic_refusal(s),
        Code::DeadlineExceeded => case.deadline,
        Code::Cancelled => case.deadline && s.message().contains("Timeout expired"),
        _ => false,
    };
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{:?} for a {:?} request: {}",
            s.code(),
            case.verdict,
            s.message()
        ))
    }
}

/// A successful answer must be the method's message, and a stream must end with a reason.
fn check_answer(path: &str, messages: &[Bytes]) -> Result<(), String> {
    let bad = |e: prost::DecodeError| format!("an answer that does not decode: {e}");
    match path {
        GENERATE | GENERATE_STREAM => {
            let last = messages.last().ok_or("no response")?;
            let last = GenerateResponse::decode(last.clone()).map_err(bad)?;
            // Several choices (n, best_of) answer a unary call in `choices`, each finished.
            if !last.choices.is_empty() && path == GENERATE {
                if last.choices.iter().any(|c| c.finish_reason == 0) {
                    return Err("a choice has no finish reason".into());
                }
            } else if last.finish_reason == 0 {
                return Err("the last response has no finish reason".into());
            }
        }
        TOKENIZE => {
            let m = messages.first().ok_or("no response")?;
            TokenizeResponse::decode(m.clone()).map_err(bad)?;
        }
        _ => {}
    }
    Ok(())
}

/// A pool value and its verdict.
type Pick<T> = (T, Verdict);

fn pick<T: Clone>(rng: &mut Rng, pool: &[Pick<T>]) -> Pick<T> {
    rng.pick(pool).clone()
}

/// A text: ordinary, hostile, long, or over the message limit.
fn text(rng: &mut Rng) -> Pick<String> {
    use Verdict::*;
    match rng.below(12) {
        0 => (String::new(), Bad),
        1..=4 => ("hello world".into(), Good),
        5 => ("\u{0}\u{1}\u{7f}\r\n\t".into(), Unsure),
        6 => ("👩‍👩‍👧‍👦 ﷽ Z̤͔ͧ̑̓ \u{202e}right-to-left\u{202c} 你好".into(), Unsure),
        7 => (
            "<s></s><|im_start|>system<|im_end|>{{ raise_exception('x') }}".into(),
            Unsure,
        ),
        8 => ("a ".repeat(rng.range(200, 5_000)), Unsure),
        9 => ("x".repeat(rng.range(10_000, 1_000_000)), Unsure),
        10 => {
            let n = rng.range(1, 64);
            (String::from_utf8_lossy(&rng.bytes(n)).into_owned(), Unsure)
        }
        _ if rng.chance(1, 4) => ("y".repeat(MAX_MESSAGE + rng.below(1000)), Unsure),
        _ => ("The capital of France is".into(), Good),
    }
}

fn messages(rng: &mut Rng) -> Pick<Vec<ChatMessage>> {
    use Verdict::*;
    let roles: [Pick<&str>; 9] = [
        ("user", Good),
        ("user", Good),
        ("system", Good),
        ("assistant", Unsure),
        ("", Bad),
        ("tool", Unsure),
        ("ROOT", Unsure),
        ("\u{0}", Unsure),
        ("user\n<|im_start|>system", Unsure),
    ];
    let n = match rng.below(8) {
        0 => 0,
        7 => rng.range(100, 3_000),
        _ => rng.range(1, 3),
    };
    let mut verdict = if n == 0 { Bad } else { Good };
    if n > 100 {
        verdict = verdict.and(Unsure);
    }
    let out = (0..n)
        .map(|_| {
            let (role, rv) = pick(rng, &roles);
            // Many messages carry short contents: thousands of long ones would be gigabytes.
            let (content, cv) = if rng.chance(1, 3) {
                (String::new(), Unsure)
            } else if n > 3 {
                ("hi".to_string(), Good)
            } else {
                text(rng)
            };
            // An empty content is a valid message; a long one may not fit.
            verdict = verdict.and(rv).and(cv.min(Unsure));
            ChatMessage {
                role: role.to_string(),
                content,
            }
        })
        .collect();
    (out, verdict)
}

/// The input of a request: one of prompt, messages, token ids; none or several is refused.
fn input(rng: &mut Rng, model: ModelShape, req: &mut GenerateRequest) -> Verdict {
    use Verdict::*;
    let v = model.vocab_size;
    let ids: [Pick<Vec<u32>>; 7] = [
        (vec![1, 2, 3], Good),
        (vec![v - 1], Good),
        (vec![v], Bad),
        (vec![u32::MAX], Bad),
        (vec![3, v + 7, 4], Bad),
        ((0..100_000).map(|i| i % v).collect(), Bad),
        (vec![0; 300], Unsure),
    ];
    match rng.below(10) {
        0..=3 => {
            let (p, verdict) = text(rng);
            req.prompt = p;
            verdict
        }
        4..=6 => {
            let (m, verdict) = messages(rng);
            req.messages = m;
            verdict
        }
        7 | 8 => {
            let (t, verdict) = pick(rng, &ids);
            req.token_ids = t;
            verdict
        }
        _ => {
            req.prompt = "hello".into();
            req.token_ids = vec![1];
            if rng.chance(1, 2) {
                req.messages = vec![ChatMessage {
                    role: "user".into(),
                    content: "hi".into(),
                }];
            }
            Bad
        }
    }
}

/// Generation parameters, each field left alone or drawn from its pool.
fn parameters(rng: &mut Rng, model: ModelShape) -> Pick<GenerationParameters> {
    use Verdict::*;
    let mut p = GenerationParameters {
        max_new_tokens: Some(8),
        ..Default::default()
    };
    let mut v = float_fields(rng, &mut p);
    let field = |rng: &mut Rng| rng.chance(1, 3);
    if field(rng) {
        let pool = [
            (None, Good),
            (Some(0), Bad),
            (Some(1), Good),
            (Some(64), Good),
        ];
        let more = [(Some(1_000_000_000), Bad), (Some(u32::MAX), Bad)];
        let values = if rng.chance(1, 3) {
            &more[..]
        } else {
            &pool[..]
        };
        let (x, xv) = pick(rng, values);
        (p.max_new_tokens, v) = (x, v.and(xv));
    }
    if field(rng) {
        let pool = [
            (0, Good),
            (1, Good),
            (i32::MAX, Good),
            (-1, Bad),
            (i32::MIN, Bad),
        ];
        let (x, xv) = pick(rng, &pool);
        (p.top_k, v) = (x, v.and(xv));
    }
    if field(rng) {
        let any = rng.next_u64();
        p.seed = *rng.pick(&[None, Some(0), Some(u64::MAX), Some(any)]);
    }
    if field(rng) {
        let (x, xv) = stop_strings(rng);
        (p.stop, v) = (x, v.and(xv));
    }
    if field(rng) {
        let n = model.vocab_size;
        let pool = [
            (vec![1], Good),
            (vec![n - 1], Good),
            ((0..10_000).map(|i| i % n).collect(), Good),
            (vec![n], Bad),
            (vec![u32::MAX], Bad),
        ];
        let (x, xv) = pick(rng, &pool);
        (p.stop_token_ids, v) = (x, v.and(xv));
    }
    p.ignore_eos = rng.chance(1, 3);
    // Logprobs of sampled and of prompt tokens: unset, 0, or up to 20 most likely tokens.
    let top_logprobs = [
        (None, Good),
        (Some(0), Good),
        (Some(20), Good),
        (Some(21), Bad),
        (Some(1_000_000), Bad),
        (Some(u32::MAX), Bad),
    ];
    if field(rng) {
        let (x, xv) = pick(rng, &top_logprobs);
        (p.logprobs, v) = (x, v.and(xv));
    }
    if field(rng) {
        let (x, xv) = pick(rng, &top_logprobs);
        (p.prompt_logprobs, v) = (x, v.and(xv));
    }
    v = v.and(choice_fields(rng, &mut p));
    if field(rng) {
        let (x, xv) = logit_bias(rng, model);
        (p.logit_bias, v) = (x, v.and(xv));
    }
    if field(rng) {
        let (x, xv) = constraint(rng);
        (p.constraint, v) = (Some(x), v.and(xv));
    }
    (p, v)
}

/// `n` and `best_of`: whether several choices fit depends on the KV cache and the call
/// (`best_of` is not streamed), which the generator does not model; out of range is refused.
fn choice_fields(rng: &mut Rng, p: &mut GenerationParameters) -> Verdict {
    use Verdict::*;
    let mut v = Good;
    if rng.chance(1, 4) {
        let pool = [
            (None, Good),
            (Some(1), Good),
            (Some(2), Unsure),
            (Some(0), Bad),
            (Some(129), Bad),
            (Some(u32::MAX), Bad),
        ];
        let (x, xv) = pick(rng, &pool);
        (p.n, v) = (x, v.and(xv));
    }
    if rng.chance(1, 6) {
        let pool = [
            (None, Good),
            (Some(2), Unsure),
            (Some(0), Bad),
            (Some(1000), Bad),
        ];
        let (x, xv) = pick(rng, &pool);
        (p.best_of, v) = (x, v.and(xv));
    }
    v
}

/// A logit bias: ids in and out of the vocabulary, values in and out of [-100, 100], too many.
fn logit_bias(rng: &mut Rng, model: ModelShape) -> Pick<HashMap<u32, f32>> {
    use Verdict::*;
    let n = model.vocab_size;
    let one = |id: u32, b: f32| HashMap::from([(id, b)]);
    match rng.below(8) {
        0 => (one(1, 5.0), Good),
        1 => (one(n - 1, -100.0), Good),
        2 => (one(0, 100.0), Good),
        3 => (one(n, 1.0), Bad),
        4 => (one(u32::MAX, 1.0), Bad),
        5 => (one(1, 100.5), Bad),
        6 => (
            one(1, *rng.pick(&[f32::NAN, f32::INFINITY, f32::NEG_INFINITY])),
            Bad,
        ),
        _ => ((0..2000).map(|i| (i % n, 1.0)).collect(), Unsure),
    }
}

/// A structured output constraint: valid ones (whether they compile for the model's tokenizer
/// is not modelled), and ones that can never compile.
fn constraint(rng: &mut Rng) -> Pick<Constraint> {
    use constraint::Kind;
    use Verdict::*;
    let (kind, v) = rng
        .pick(&[
            (Kind::Regex("[a-z]{1,6}".into()), Unsure),
            (Kind::JsonObject(true), Unsure),
            (Kind::JsonSchema(r#"{"type": "integer"}"#.into()), Unsure),
            (Kind::Grammar("start: \"yes\" | \"no\"".into()), Unsure),
            (Kind::Regex("(".into()), Bad),
            (Kind::Regex("a{1000000000}".into()), Unsure),
            (Kind::JsonSchema("{".into()), Bad),
            (Kind::JsonSchema(r#"{"type": "no such type"}"#.into()), Bad),
            (Kind::Grammar("start: undefined_rule".into()), Bad),
            (Kind::Regex("x".repeat(300 * 1024)), Bad),
        ])
        .clone();
    (Constraint { kind: Some(kind) }, v)
}

/// Where a float field of [`GenerationParameters`] is, and the values the API documents as
/// valid and invalid for it.
type FloatField = (
    fn(&mut GenerationParameters) -> &mut f32,
    &'static [f32],
    &'static [f32],
);

/// The float fields: each left alone or set from its good or its bad values.
fn float_fields(rng: &mut Rng, p: &mut GenerationParameters) -> Verdict {
    const NAN: f32 = f32::NAN;
    const INF: f32 = f32::INFINITY;
    let fields: [FloatField; 6] = [
        (
            |p| &mut p.temperature,
            &[0.0, -0.0, 0.7, 2.0, f32::MIN_POSITIVE, 1e30, f32::MAX],
            &[-1.0, NAN, INF, -INF],
        ),
        (
            |p| p.top_p.get_or_insert(1.0),
            &[1.0, 0.5, 1e-30],
            &[0.0, -0.5, 1.000_001, NAN, INF],
        ),
        (|p| &mut p.min_p, &[0.0, -0.0, 0.05, 1.0], &[1.5, -1.0, NAN]),
        (
            |p| p.repetition_penalty.get_or_insert(1.0),
            &[1.0, 1.3, 1e-30, 1e30],
            &[0.0, -1.0, NAN, INF],
        ),
        (
            |p| &mut p.frequency_penalty,
            &[0.0, 2.0, -2.0, 0.5],
            &[2.5, -2.01, NAN, -INF],
        ),
        (
            |p| &mut p.presence_penalty,
            &[0.0, 2.0, -2.0],
            &[3.0, NAN, INF],
        ),
    ];
    let mut v = Verdict::Good;
    for (place, good, bad) in fields {
        if !rng.chance(1, 3) {
            continue;
        }
        *place(p) = if rng.chance(1, 2) {
            *rng.pick(good)
        } else {
            v = Verdict::Bad;
            *rng.pick(bad)
        };
    }
    v
}

fn stop_strings(rng: &mut Rng) -> Pick<Vec<String>> {
    use Verdict::*;
    let s = |n: usize| vec!["\n".to_string(); n];
    match rng.below(8) {
        0 => (s(1), Good),
        1 => (s(16), Good),
        2 => (s(17), Bad),
        3 => (s(10_000), Bad),
        4 => (vec![String::new()], Bad),
        5 => (vec!["x".repeat(256)], Good),
        6 => (vec!["x".repeat(257)], Bad),
        _ => (vec!["\u{0}".into(), "é".into(), "👩‍👩‍👧‍👦".into()], Good),
    }
}

/// A short string, an empty one, or a long one: ids and session names.
fn label(rng: &mut Rng) -> String {
    match rng.below(4) {
        0 => String::new(),
        1 => format!("s-{}", rng.next_u64()),
        2 => "\u{0}é👩‍👩‍👧‍👦\n".repeat(rng.range(1, 50)),
        _ => "z".repeat(rng.range(1, 200_000)),
    }
}

/// A well-formed request of some kind, encoded, and its verdict.
fn hostile_message(rng: &mut Rng, model: ModelShape) -> (&'static str, Vec<u8>, Verdict) {
    match rng.below(10) {
        0 => {
            let (prompt, v) = text(rng);
            let (messages, mv) = if rng.chance(1, 3) {
                messages(rng)
            } else {
                (vec![], Verdict::Good)
            };
            // Exactly one of the two; both empty is refused.
            let verdict = match (prompt.is_empty(), messages.is_empty()) {
                (false, true) => v,
                (true, false) => mv,
                _ => Verdict::Bad,
            };
            (
                TOKENIZE,
                TokenizeRequest { prompt, messages }.encode_to_vec(),
                verdict,
            )
        }
        1 => {
            let n = model.vocab_size;
            let pool: [Pick<Vec<u32>>; 5] = [
                (vec![], Verdict::Good),
                (vec![1, 2, 3, n - 1], Verdict::Good),
                ((0..100_000).map(|i| i % n).collect(), Verdict::Good),
                (vec![2, n], Verdict::Bad),
                (vec![u32::MAX], Verdict::Bad),
            ];
            let (token_ids, v) = pick(rng, &pool);
            (
                DETOKENIZE,
                DetokenizeRequest { token_ids }.encode_to_vec(),
                v,
            )
        }
        _ => {
            let (req, v) = hostile_generate(rng, model);
            let path = if rng.chance(1, 2) {
                GENERATE
            } else {
                GENERATE_STREAM
            };
            (path, req.encode_to_vec(), v)
        }
    }
}

/// A `GenerateRequest` with hostile fields, and its verdict.
pub fn hostile_generate(rng: &mut Rng, model: ModelShape) -> (GenerateRequest, Verdict) {
    let mut req = GenerateRequest::default();
    let mut v = input(rng, model, &mut req);
    if rng.chance(9, 10) {
        let (p, pv) = parameters(rng, model);
        req.parameters = Some(p);
        v = v.and(pv);
    }
    if rng.chance(1, 3) {
        req.priority = *rng.pick(&[i32::MIN, i32::MAX, -1, 0, 1]);
    }
    if rng.chance(1, 3) {
        req.session_id = label(rng);
    }
    if rng.chance(1, 4) {
        req.request_id = label(rng);
    }
    (req, v)
}

fn hostile_case(rng: &mut Rng, model: ModelShape) -> Case {
    let (path, body, mut verdict) = hostile_message(rng, model);
    let mut metadata = Vec::new();
    let mut deadline = false;
    if path == GENERATE || path == GENERATE_STREAM {
        match rng.below(8) {
            0 => {
                let t = rng.pick(&["", "S", "-1S", "1.5S", "123456789S", "9x", "99999999"]);
                metadata.push(("grpc-timeout".into(), t.to_string()));
                verdict = Verdict::Bad;
            }
            1 => {
                let t = rng.pick(&["1n", "1u", "1m", "20m", "99999999H"]);
                metadata.push(("grpc-timeout".into(), t.to_string()));
                deadline = true;
            }
            2 => {
                let long = "f".repeat(8000);
                let zero = "00-00000000000000000000000000000000-0000000000000000-01";
                let tp = rng
                    .pick(&["00-zz-zz-01", "", zero, long.as_str()])
                    .to_string();
                metadata.push(("traceparent".into(), tp));
            }
            _ => {}
        }
    }
    Case {
        kind: format!(
            "hostile{}",
            path.rsplit('/')
                .next()
                .map(|m| format!(":{m}"))
                .unwrap_or_default()
        ),
        path,
        body: body.into(),
        framed: false,
        verdict: if deadline {
            verdict.and(Verdict::Unsure)
        } else {
            verdict
        },
        raw: false,
        metadata,
        deadline,
    }
}

/// A request encoded, then mangled; or a string field holding invalid UTF-8.
fn raw_case(rng: &mut Rng, model: ModelShape) -> Case {
    let (path, mut body, _) = hostile_message(rng, model);
    let kind = if rng.chance(1, 6) {
        // Field 2 (prompt) of a GenerateRequest / field 1 of a TokenizeRequest: a
        // length-delimited string with bytes that are not UTF-8.
        let bad = [0xff, 0xfe, 0xc3, 0x28, 0xed, 0xa0, 0x80];
        let key = if path == TOKENIZE { 0x0a } else { 0x12 };
        body.push(key);
        body.push(bad.len() as u8);
        body.extend_from_slice(&bad);
        "raw:utf8".to_string()
    } else {
        let n = rng.range(1, 4);
        let names: Vec<&str> = (0..n).map(|_| mutate_bytes(rng, &mut body)).collect();
        format!("raw:{}", names[0])
    };
    Case {
        kind,
        path,
        body: body.into(),
        framed: false,
        verdict: Verdict::Unsure,
        raw: true,
        metadata: Vec::new(),
        deadline: false,
    }
}

/// A valid small request in frames that lie.
fn frame_case(rng: &mut Rng, model: ModelShape) -> Case {
    let req = GenerateRequest {
        token_ids: vec![1, 2, 3 % model.vocab_size],
        parameters: Some(GenerationParameters {
            max_new_tokens: Some(2),
            ..Default::default()
        }),
        ..Default::default()
    };
    let msg = req.encode_to_vec();
    let len = msg.len() as u32;
    let mut metadata = Vec::new();
    let (what, body) = match rng.below(9) {
        0 => ("compressed", frame_with(1, len, &msg)),
        1 => ("flag", frame_with(rng.range(2, 255) as u8, len, &msg)),
        2 => ("long", frame_with(0, len + rng.range(1, 1000) as u32, &msg)),
        3 => ("huge", frame_with(0, u32::MAX, &msg)),
        4 => (
            "short",
            frame_with(0, len.saturating_sub(rng.range(1, 3) as u32), &msg),
        ),
        5 => ("empty", Vec::new()),
        6 => ("header", frame(&msg)[..rng.range(1, 4)].to_vec()),
        7 => {
            let mut two = frame(&msg);
            two.extend(frame(&msg));
            ("two", two)
        }
        _ => {
            let enc = rng.pick(&["gzip", "zstd", "deflate", "bogus", ""]);
            metadata.push(("grpc-encoding".into(), enc.to_string()));
            ("encoding", frame_with(1, len, &msg))
        }
    };
    if rng.chance(1, 4) {
        let ct = rng.pick(&[
            "application/grpc+proto",
            "application/grpc+json",
            "text/plain",
        ]);
        metadata.push(("content-type".into(), ct.to_string()));
    }
    Case {
        kind: format!("frame:{what}"),
        path: GENERATE,
        body: body.into(),
        framed: true,
        verdict: Verdict::Unsure,
        raw: true,
        metadata,
        deadline: false,
    }
}
