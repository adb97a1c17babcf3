//! Fuzzing a worker's Step stream with hostile step plans.
//!
//! The worker trusts its coordinator with the KV layout but checks every plan before any rank
//! runs it (`worker/src/batch.rs`): a plan it cannot run is answered in-band
//! (`StepResult.error`) and changes nothing; a plan of another generation ends the stream
//! FAILED_PRECONDITION. So, per case:
//!
//! * `plan:*`, a well-formed plan mutated field by field ([`Verdict`] as in
//!   [`super::generation`]): a `Bad` plan (a block past the cache, a position past the
//!   model's, a token past the vocabulary, an empty plan, a non-finite penalty, ...) must be
//!   refused in-band; a `Good` one (extreme sequence ids, NaN temperatures, duplicate ids,
//!   thousands of sequences, ...) must run; a plan of another generation must end the stream
//!   FAILED_PRECONDITION.
//! * `raw:*`, an encoded plan mangled: a result, FAILED_PRECONDITION, or tonic's refusal of
//!   an undecodable message (INTERNAL "failed to decode Protobuf message").
//! * `frame:*`, a valid plan and then a frame that lies, in one HTTP/2 request: one result,
//!   then tonic's refusal.
//!
//! Never: a stream that ends without answering a plan, any other status (INTERNAL from the
//! engine means the rank left its mesh and refuses every later step), a hang. After every
//! stream, Health must answer, initialized in the same generation.

use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use helios_proto::v1::worker_client::WorkerClient;
use helios_proto::v1::{
    HealthRequest, InitRequest, InitResponse, SamplingParams, SequenceStep, StepPlan, StepResult,
};
use prost::Message;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::client::Grpc;
use tonic::transport::Channel;
use tonic::{Code, Status};

use super::grpc::{frame, frame_with, outcome_name, tonic_refusal, RawClient, RawCodec};
use super::{mutate_bytes, FuzzConfig, FuzzTarget, Report, Rng, Verdict};

pub const STEP: &str = "/helios.v1.Worker/Step";
/// Plans per Step stream before the stream is closed and Health is asked.
const CASES_PER_STREAM: usize = 16;
/// Past it a step is a hang (a plan of thousands of tokens takes well under a second).
const STEP_TIMEOUT: Duration = Duration::from_secs(60);

/// What plans are checked against: the worker's model and KV cache, and its generation.
#[derive(Debug, Clone, Copy)]
pub struct WorkerShape {
    pub vocab_size: u32,
    pub max_positions: u32,
    pub num_blocks: u32,
    pub block_size: u32,
    pub generation: u64,
}

/// Inits the worker at `target` as the only rank of a replica of `model` with `num_blocks`
/// blocks of 16 positions, under `generation`.
pub async fn init(
    target: &FuzzTarget,
    model: &str,
    num_blocks: u32,
    generation: u64,
) -> Result<WorkerShape, Status> {
    let mut client = WorkerClient::new(RawClient::new(target, STEP_TIMEOUT).channel());
    let health = client
        .health(target.request(HealthRequest {}))
        .await?
        .into_inner();
    let req = InitRequest {
        rank: 0,
        world_size: 1,
        model_path: model.to_string(),
        peer_addrs: vec![health.comm_addr],
        num_kv_blocks: num_blocks,
        block_size: 16,
        generation,
        ..Default::default()
    };
    let InitResponse {
        num_kv_blocks,
        model,
    } = client.init(target.request(req)).await?.into_inner();
    let facts = model.ok_or_else(|| Status::internal("an InitResponse without model facts"))?;
    Ok(WorkerShape {
        vocab_size: facts.vocab_size,
        max_positions: facts.max_position_embeddings,
        num_blocks: num_kv_blocks,
        block_size: facts.block_size,
        generation,
    })
}

/// A fixed plan (a 3-token prompt, greedy) and its result: the same before and after fuzzing.
pub async fn reference_step(target: &FuzzTarget, generation: u64) -> Result<StepResult, Status> {
    let plan = StepPlan {
        step_id: 1,
        seqs: vec![SequenceStep {
            seq_id: 1,
            token_ids: vec![3, 4, 5],
            block_table: vec![0],
            sample: true,
            ..Default::default()
        }],
        finished_seq_ids: vec![1],
        generation,
        ..Default::default()
    };
    let mut client = WorkerClient::new(RawClient::new(target, STEP_TIMEOUT).channel());
    let req = target.request(tokio_stream::iter(vec![plan]));
    let mut results = client.step(req).await?.into_inner();
    results
        .next()
        .await
        .ok_or_else(|| Status::internal("the step stream ended without a result"))?
}

/// Health must answer, initialized, in `generation`.
pub async fn check_health(target: &FuzzTarget, generation: u64) -> Result<(), String> {
    let mut client = WorkerClient::new(RawClient::new(target, STEP_TIMEOUT).channel());
    let call = client.health(target.request(HealthRequest {}));
    let h = tokio::time::timeout(Duration::from_secs(30), call)
        .await
        .map_err(|_| "Health did not answer within 30 s".to_string())?
        .map_err(|s| format!("Health: {s}"))?
        .into_inner();
    if !h.initialized || h.generation != generation {
        return Err(format!(
            "Health says {h:?}, expected generation {generation}"
        ));
    }
    Ok(())
}

/// One plan to send and what may come back.
struct Case {
    kind: String,
    bytes: Bytes,
    verdict: Verdict,
    /// Of another generation: the stream must end FAILED_PRECONDITION.
    stale: bool,
    raw: bool,
    /// Sent as one request of frames (`frame:*`), not on the shared stream.
    framed: bool,
    step_id: Option<u64>,
}

/// Runs the step-plan fuzzer against the initialized worker at `target`.
pub async fn fuzz(target: &FuzzTarget, shape: WorkerShape, cfg: &FuzzConfig) -> Report {
    let mut report = Report::new("worker", cfg.seed);
    let client = RawClient::new(target, STEP_TIMEOUT);
    let mut budget = cfg.budget();
    let mut done = false;
    while !done && !report.should_stop() {
        let mut stream = None;
        for _ in 0..CASES_PER_STREAM {
            let Some(i) = budget.next_case() else {
                done = true;
                break;
            };
            let case = make_case(&mut Rng::for_case(cfg.seed, "worker", i), &shape);
            let outcome = if case.framed {
                judge_frames(&case, &client).await
            } else {
                run_on_stream(&case, &client, &mut stream).await
            };
            let outcome = outcome.map_err(|e| format!("{e}\n    plan: {}", describe(&case.bytes)));
            report.record(i, &case.kind, outcome);
            if report.should_stop() {
                break;
            }
        }
        drop(stream);
        if let Err(e) = check_health(target, shape.generation).await {
            report.fail(e);
            break;
        }
    }
    report
}

/// Runs the same cases against the worker at `stranger`, a target without the cluster's
/// token (none, or a wrong one): every call (Step with each plan, Init with the case's bytes
/// as its model path, Health) must be refused UNAUTHENTICATED. The caller then checks with the
/// token that nothing changed.
pub async fn fuzz_without_secret(
    stranger: &FuzzTarget,
    shape: WorkerShape,
    cfg: &FuzzConfig,
) -> Report {
    let name = if stranger.metadata.is_empty() {
        "worker, no token"
    } else {
        "worker, a wrong token"
    };
    let mut report = Report::new(name, cfg.seed);
    let mut client = WorkerClient::new(RawClient::new(stranger, STEP_TIMEOUT).channel());
    let mut budget = cfg.budget();
    while let Some(i) = budget.next_case() {
        let mut rng = Rng::for_case(cfg.seed, name, i);
        let case = make_case(&mut rng, &shape);
        let (call, answer) = match rng.below(3) {
            0 => {
                let plan = StepPlan::decode(case.bytes.clone()).unwrap_or_default();
                let req = stranger.request(tokio_stream::iter(vec![plan]));
                ("Step", timed(client.step(req)).await.map(|_| ()))
            }
            1 => {
                let init = InitRequest {
                    world_size: 1,
                    model_path: String::from_utf8_lossy(&case.bytes).into_owned(),
                    generation: shape.generation + 1 + rng.below(1000) as u64,
                    ..Default::default()
                };
                (
                    "Init",
                    timed(client.init(stranger.request(init))).await.map(|_| ()),
                )
            }
            _ => {
                let req = stranger.request(HealthRequest {});
                ("Health", timed(client.health(req)).await.map(|_| ()))
            }
        };
        let outcome = match answer {
            Err(s) if s.code() == Code::Unauthenticated => Ok("UNAUTHENTICATED".to_string()),
            Err(s) => Err(format!(
                "{call} refused otherwise: {:?}: {}",
                s.code(),
                s.message()
            )),
            Ok(()) => Err(format!("{call} without the cluster secret was served")),
        };
        report.record(i, call, outcome);
        if report.should_stop() {
            break;
        }
    }
    report
}

/// `call`'s answer; a hang is DEADLINE_EXCEEDED.
async fn timed<T>(call: impl std::future::Future<Output = Result<T, Status>>) -> Result<T, Status> {
    tokio::time::timeout(STEP_TIMEOUT, call)
        .await
        .unwrap_or_else(|_| Err(Status::deadline_exceeded("a hang")))
}

/// A Step stream with the raw codec: the sender of its plans and its results.
struct Stream {
    plans: mpsc::Sender<Bytes>,
    results: tonic::codec::Streaming<Bytes>,
}

async fn open(channel: Channel, client: &RawClient) -> Result<Stream, String> {
    let (tx, rx) = mpsc::channel(4);
    // As the coordinator reads results: a plan of thousands of sequences asking for logits
    // is answered with megabytes.
    let mut grpc =
        Grpc::new(channel).max_decoding_message_size(helios_proto::MAX_WORKER_MESSAGE_BYTES);
    grpc.ready().await.map_err(|e| format!("not ready: {e}"))?;
    let req = client.request_of(ReceiverStream::new(rx));
    let path = http::uri::PathAndQuery::from_static(STEP);
    let resp = tokio::time::timeout(STEP_TIMEOUT, grpc.streaming(req, path, RawCodec))
        .await
        .map_err(|_| "the Step stream did not open (a hang)".to_string())?
        .map_err(|s| format!("opening the Step stream: {s}"))?;
    Ok(Stream {
        plans: tx,
        results: resp.into_inner(),
    })
}

/// Sends the case's plan on the open stream (opening one if needed) and judges its answer;
/// a stream that ended is dropped, so the next case opens another.
async fn run_on_stream(
    case: &Case,
    client: &RawClient,
    stream: &mut Option<Stream>,
) -> Result<String, String> {
    if stream.is_none() {
        *stream = Some(open(client.channel(), client).await?);
    }
    let s = stream.as_mut().ok_or("no stream")?;
    s.plans
        .send(case.bytes.clone())
        .await
        .map_err(|_| "the Step stream closed before the plan was sent".to_string())?;
    let answer = tokio::time::timeout(STEP_TIMEOUT, s.results.next())
        .await
        .map_err(|_| format!("no answer within {STEP_TIMEOUT:?} (a hang)"))?;
    let verdict = match answer {
        Some(Ok(bytes)) => return judge_result(case, &bytes),
        Some(Err(status)) => judge_status(case, &status),
        None => Err("the stream ended without answering the plan".into()),
    };
    *stream = None;
    verdict
}

/// A case's plan for a failure message: the decoded plan, or the bytes.
fn describe(bytes: &[u8]) -> String {
    match StepPlan::decode(bytes) {
        Ok(p) => format!("{p:?}"),
        Err(_) => format!("{bytes:02x?}"),
    }
    .chars()
    .take(1500)
    .collect()
}

fn judge_result(case: &Case, bytes: &[u8]) -> Result<String, String> {
    let r = StepResult::decode(bytes).map_err(|e| format!("a result that does not decode: {e}"))?;
    if case.stale {
        return Err("a plan of another generation was answered".into());
    }
    if case.step_id.is_some_and(|id| id != r.step_id) {
        return Err(format!(
            "result of step {} for plan {:?}",
            r.step_id, case.step_id
        ));
    }
    match (r.error.is_empty(), case.verdict) {
        (true, Verdict::Bad) => Err("an invalid plan ran".into()),
        (false, Verdict::Good) => Err(format!("a valid plan was refused: {}", r.error)),
        (true, _) => Ok("ran".into()),
        (false, _) => Ok("refused in-band".into()),
    }
}

fn judge_status(case: &Case, s: &Status) -> Result<String, String> {
    let ok = match s.code() {
        Code::FailedPrecondition => (case.stale || case.raw) && s.message().contains("generation"),
        Code::Internal | Code::OutOfRange => case.raw && tonic_refusal(s),
        _ => false,
    };
    if ok {
        Ok(outcome_name(s))
    } else {
        Err(format!("{:?}: {}", s.code(), s.message()))
    }
}

/// A `frame:*` case: one answered plan, then tonic's refusal of the lying frame.
async fn judge_frames(case: &Case, client: &RawClient) -> Result<String, String> {
    match client.frames(STEP, case.bytes.clone(), &[]).await? {
        Ok(results) => Err(format!(
            "the stream ended OK after {} results, its last frame unanswered",
            results.len()
        )),
        Err(s) if tonic_refusal(&s) => Ok(outcome_name(&s)),
        Err(s) => Err(format!("{:?}: {}", s.code(), s.message())),
    }
}

fn make_case(rng: &mut Rng, shape: &WorkerShape) -> Case {
    let step_id = rng.next_u64();
    let (mut plan, verdict, stale, kind) = hostile_plan(rng, shape);
    plan.step_id = step_id;
    match rng.below(10) {
        0..=6 => Case {
            kind: kind.into(),
            bytes: plan.encode_to_vec().into(),
            verdict,
            stale,
            raw: false,
            framed: false,
            step_id: Some(step_id),
        },
        7 | 8 => {
            let mut bytes = plan.encode_to_vec();
            let name = mutate_bytes(rng, &mut bytes);
            Case {
                kind: format!("raw:{name}"),
                bytes: bytes.into(),
                verdict: Verdict::Unsure,
                stale: false,
                raw: true,
                framed: false,
                step_id: None,
            }
        }
        _ => lying_frames(rng, shape),
    }
}

/// A valid plan's frame followed by one that lies.
fn lying_frames(rng: &mut Rng, shape: &WorkerShape) -> Case {
    let plan = valid_plan(rng, shape, 1).encode_to_vec();
    let mut body = frame(&plan);
    let len = plan.len() as u32;
    let what = match rng.below(4) {
        0 => {
            body.extend(frame_with(1, len, &plan));
            "compressed"
        }
        1 => {
            body.extend(frame_with(0, len + rng.range(1, 100) as u32, &plan));
            "long"
        }
        2 => {
            body.extend(frame_with(0, u32::MAX, &plan));
            "huge"
        }
        _ => {
            body.extend([0, 0]);
            "header"
        }
    };
    Case {
        kind: format!("frame:{what}"),
        bytes: body.into(),
        verdict: Verdict::Unsure,
        stale: false,
        raw: true,
        framed: true,
        step_id: None,
    }
}

/// `n` fresh sequences of 1 to 8 tokens from position 0, each in its own block, sampled
/// greedily: a plan the worker must run.
fn valid_plan(rng: &mut Rng, shape: &WorkerShape, n: usize) -> StepPlan {
    let seqs = (0..n)
        .map(|_| SequenceStep {
            seq_id: rng.next_u64(),
            token_ids: (0..rng.range(1, 8))
                .map(|_| rng.below(shape.vocab_size as usize) as u32)
                .collect(),
            block_table: vec![rng.below(shape.num_blocks as usize) as u32],
            sample: rng.chance(3, 4),
            ..Default::default()
        })
        .collect();
    StepPlan {
        seqs,
        generation: shape.generation,
        ..Default::default()
    }
}

/// A plan with 1 to 3 mutations: the plan, its verdict, whether it is of another
/// generation, and the first mutation's name.
fn hostile_plan(rng: &mut Rng, shape: &WorkerShape) -> (StepPlan, Verdict, bool, &'static str) {
    let n = rng.range(1, 4);
    let mut plan = valid_plan(rng, shape, n);
    let (mut verdict, mut stale, mut kind) = (Verdict::Good, false, "plan:valid");
    let n = if rng.chance(1, 8) { 0 } else { rng.range(1, 3) };
    for j in 0..n {
        let (v, name) = mutate_plan(rng, shape, &mut plan, j == 0);
        if name == "plan:generation" {
            stale = true;
        }
        if j == 0 {
            kind = name;
        }
        verdict = verdict.and(v);
    }
    (plan, verdict, stale, kind)
}

/// One mutation of `plan`: its verdict and name. Those that replace sequences whole come
/// `first` only, so that they never undo an earlier mutation (and its verdict).
fn mutate_plan(
    rng: &mut Rng,
    shape: &WorkerShape,
    plan: &mut StepPlan,
    first: bool,
) -> (Verdict, &'static str) {
    use Verdict::*;
    if plan.seqs.is_empty() {
        return (Bad, "plan:empty");
    }
    let i = rng.below(plan.seqs.len());
    let bs = shape.block_size;
    let mut m = rng.below(17);
    if !first && (m == 8 || m == 15) {
        m = 13;
    }
    match m {
        0 => {
            // An id another plan used may have a table, or a sampled token, that a sequence
            // appending or feeding (refused for want of one) would find: those keep theirs.
            let s = &plan.seqs[i];
            if !s.append_blocks && !s.feed_sampled {
                plan.seqs[i].seq_id = *rng.pick(&[0, u64::MAX, plan.seqs[0].seq_id]);
            }
            (Good, "plan:seq-id")
        }
        1..=6 => mutate_layout(rng, shape, plan, i, m),
        7 => {
            plan.generation = *rng.pick(&[0, shape.generation + 1, u64::MAX]);
            (Good, "plan:generation")
        }
        8 => many_sequences(rng, shape, plan),
        9 => {
            let s = &mut plan.seqs[i];
            s.sampling = Some(odd_sampling(rng, s.sampling.take().unwrap_or_default()));
            s.sample = true;
            (Good, "plan:sampling")
        }
        10 => bad_penalty(rng, shape, &mut plan.seqs[i]),
        11 => {
            plan.seqs[i].append_blocks = true;
            plan.seqs[i].seq_id = rng.next_u64();
            (Bad, "plan:append-to-unknown")
        }
        12 => {
            // A fresh id: rank 0 sampled nothing for it, whatever ran before.
            let s = &mut plan.seqs[i];
            s.feed_sampled = true;
            s.seq_id = rng.next_u64();
            if rng.chance(1, 2) {
                s.token_ids.clear();
            }
            (Bad, "plan:feed-unsampled")
        }
        13 | 14 => mutate_extras(rng, plan, m),
        16 => prompt_scoring(rng, shape, &mut plan.seqs[i]),
        _ => {
            // The longest sequence the model takes, from position 0.
            let s = &mut plan.seqs[i];
            s.token_ids = (0..shape.max_positions)
                .map(|t| t % shape.vocab_size)
                .collect();
            s.block_table = (0..shape.max_positions.div_ceil(bs))
                .map(|b| b % shape.num_blocks)
                .collect();
            s.start_pos = 0;
            (Good, "plan:longest")
        }
    }
}

/// The mutations of a sequence's KV layout and input, all refused: a block past the cache,
/// a position past the model's, a table too short, a token past the vocabulary, no tokens,
/// no sequences.
fn mutate_layout(
    rng: &mut Rng,
    shape: &WorkerShape,
    plan: &mut StepPlan,
    i: usize,
    m: usize,
) -> (Verdict, &'static str) {
    use Verdict::*;
    let bs = shape.block_size;
    match m {
        1 => {
            plan.seqs[i].block_table[0] =
                *rng.pick(&[shape.num_blocks, u32::MAX, shape.num_blocks + 1]);
            (Bad, "plan:block-past-cache")
        }
        2 => {
            let s = &mut plan.seqs[i];
            s.start_pos = *rng.pick(&[
                shape.max_positions,
                u32::MAX,
                u32::MAX - 1,
                shape.max_positions - s.token_ids.len() as u32 + 1,
            ]);
            (Bad, "plan:position-past-max")
        }
        3 => {
            // Within the model, beyond the one block the table gives.
            plan.seqs[i].start_pos = bs * rng.range(1, 4) as u32;
            (Bad, "plan:table-too-short")
        }
        4 => {
            let s = &mut plan.seqs[i];
            let t = *rng.pick(&[shape.vocab_size, u32::MAX, shape.vocab_size + 1]);
            match s.token_ids.len() {
                0 => s.token_ids.push(t),
                n => s.token_ids[rng.below(n)] = t,
            }
            (Bad, "plan:token-past-vocab")
        }
        5 => {
            plan.seqs[i].token_ids.clear();
            (Bad, "plan:no-tokens")
        }
        _ => {
            plan.seqs.clear();
            (Bad, "plan:empty")
        }
    }
}

/// Extras every plan may carry: logits, finished ids, a trace context (garbage here).
fn mutate_extras(rng: &mut Rng, plan: &mut StepPlan, m: usize) -> (Verdict, &'static str) {
    match m {
        13 => {
            plan.return_logits = true;
            plan.finished_seq_ids = (0..rng.range(0, 1000)).map(|_| rng.next_u64()).collect();
            (Verdict::Good, "plan:logits-and-finished")
        }
        _ => {
            plan.trace_context.insert(
                "traceparent".into(),
                "00-zz-\u{0}-01".repeat(rng.range(1, 100)),
            );
            plan.trace_context
                .insert(String::new(), "x".repeat(rng.range(0, 10_000)));
            (Verdict::Good, "plan:trace-context")
        }
    }
}

/// Prompt logprobs asked of a sequence: within the bounds they run; too many most likely
/// tokens, or a next prompt token outside the vocabulary, are refused; a next token without
/// scoring is ignored.
fn prompt_scoring(
    rng: &mut Rng,
    shape: &WorkerShape,
    s: &mut SequenceStep,
) -> (Verdict, &'static str) {
    match rng.below(4) {
        0 => {
            s.prompt_logprobs = Some(*rng.pick(&[0, 5, 256]));
            s.next_prompt_token = Some(rng.below(shape.vocab_size as usize) as u32);
            (Verdict::Good, "plan:prompt-logprobs")
        }
        1 => {
            s.prompt_logprobs = Some(*rng.pick(&[257, u32::MAX]));
            (Verdict::Bad, "plan:prompt-logprobs-top")
        }
        2 => {
            s.prompt_logprobs = Some(1);
            s.next_prompt_token = Some(*rng.pick(&[shape.vocab_size, u32::MAX]));
            (Verdict::Bad, "plan:next-prompt-token")
        }
        _ => {
            s.prompt_logprobs = None;
            s.next_prompt_token = Some(u32::MAX);
            (Verdict::Good, "plan:next-token-unscored")
        }
    }
}

/// Thousands of one-token sequences, sharing blocks: heavy but valid.
fn many_sequences(
    rng: &mut Rng,
    shape: &WorkerShape,
    plan: &mut StepPlan,
) -> (Verdict, &'static str) {
    let n = rng.range(1_000, 4_000);
    plan.seqs = (0..n)
        .map(|k| SequenceStep {
            seq_id: k as u64,
            token_ids: vec![(k as u32) % shape.vocab_size],
            block_table: vec![(k as u32) % shape.num_blocks],
            sample: k % 2 == 0,
            ..Default::default()
        })
        .collect();
    (Verdict::Good, "plan:many-sequences")
}

/// Sampling values the coordinator never sends but the sampler must survive; the penalties
/// of `p` (which plan validation judges) stay.
fn odd_sampling(rng: &mut Rng, p: SamplingParams) -> SamplingParams {
    let f = |rng: &mut Rng| {
        *rng.pick(&[
            f32::NAN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            -1.0,
            0.0,
            1e-45,
            f32::MAX,
            0.5,
        ])
    };
    SamplingParams {
        temperature: f(rng),
        top_k: *rng.pick(&[0, 1, u32::MAX]),
        top_p: f(rng),
        min_p: f(rng),
        seed: Some(rng.next_u64()),
        top_logprobs: *rng.pick(&[0, 20, u32::MAX]),
        logprobs: rng.chance(1, 2),
        ..p
    }
}

/// A penalty the worker refuses: non-finite, a negative repetition penalty, a context past
/// the vocabulary or shorter than the output it claims.
fn bad_penalty(
    rng: &mut Rng,
    shape: &WorkerShape,
    s: &mut SequenceStep,
) -> (Verdict, &'static str) {
    let mut p = SamplingParams {
        repetition_penalty: 1.2,
        ..Default::default()
    };
    s.sample = true;
    s.context_token_ids = s.token_ids.clone();
    match rng.below(4) {
        0 => p.repetition_penalty = *rng.pick(&[f32::NAN, f32::INFINITY, -1.0]),
        1 => p.frequency_penalty = *rng.pick(&[f32::NAN, f32::NEG_INFINITY]),
        2 => s
            .context_token_ids
            .push(*rng.pick(&[shape.vocab_size, u32::MAX])),
        _ => p.output_index = s.context_token_ids.len() as u32 + rng.range(1, 1000) as u32,
    }
    s.sampling = Some(p);
    (Verdict::Bad, "plan:bad-penalty")
}
