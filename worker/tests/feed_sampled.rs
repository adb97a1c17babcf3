//! Feeding the token rank 0 sampled in the previous step (`SequenceStep.feed_sampled`), at one
//! rank and at two joined over TCP: the coordinator plans ahead without the token, and the
//! ranks must compute exactly what they would with it, penalties included; plans that cannot
//! be fed are refused by every rank alike, without a rank left waiting in a collective and
//! without losing the tokens the next plan may still feed.

use std::path::Path;
use std::sync::mpsc;
use std::time::Duration;

use helios_proto::v1::{SamplingParams, SequenceStep, StepPlan, StepResult};
use helios_tests::make_tiny_model;
use helios_worker::batch::InvalidPlan;
use helios_worker::comm::test_support::local_mesh;
use helios_worker::comm::{Communicator, SingleRank};
use helios_worker::engine::{Engine, EngineOptions};

const BLOCK_SIZE: usize = 16;
const BLOCKS_PER_SEQ: u32 = 4;

/// A rank's answer: its result, or why it refused the plan (`Err(Some(_))`) or failed
/// (`Err(None)`, with the reason on stderr).
type Answer = Result<StepResult, Option<String>>;

/// `world` engines on threads, each stepping the plans it is sent, as behind the gRPC service.
struct Ranks {
    plans: Vec<mpsc::Sender<StepPlan>>,
    answers: Vec<mpsc::Receiver<Answer>>,
}

impl Ranks {
    fn start(model: &Path, world: usize) -> Ranks {
        let (mut plans, mut answers) = (Vec::new(), Vec::new());
        for seat in local_mesh(world).unwrap() {
            let rank = seat.rank();
            let (plan_tx, plan_rx) = mpsc::channel::<StepPlan>();
            let (answer_tx, answer_rx) = mpsc::channel();
            let model = model.to_path_buf();
            std::thread::spawn(move || {
                let comm: Box<dyn Communicator> = if world == 1 {
                    Box::new(SingleRank)
                } else {
                    Box::new(seat.join().unwrap())
                };
                let mut opts = EngineOptions::cpu(&model);
                opts.block_size = BLOCK_SIZE;
                opts.num_kv_blocks = Some(64);
                let mut engine = Engine::load(&opts, comm).unwrap();
                for plan in plan_rx {
                    let answer = engine.step(plan).map_err(|e| match e.downcast_ref() {
                        Some(InvalidPlan(why)) => Some(why.clone()),
                        None => {
                            eprintln!("rank {rank}: {e:#}");
                            None
                        }
                    });
                    if answer_tx.send(answer).is_err() {
                        return;
                    }
                }
            });
            plans.push(plan_tx);
            answers.push(answer_rx);
        }
        Ranks { plans, answers }
    }

    /// Steps `plan` on every rank; rank 0's answer, once every rank answered alike (a rank
    /// that took another path than its peers would leave them waiting: a timeout here).
    fn step(&self, plan: StepPlan) -> Result<StepResult, String> {
        for p in &self.plans {
            p.send(plan.clone()).unwrap();
        }
        let answers: Vec<Answer> = self
            .answers
            .iter()
            .enumerate()
            .map(|(rank, a)| {
                a.recv_timeout(Duration::from_secs(120))
                    .unwrap_or_else(|e| panic!("rank {rank} did not answer: {e}"))
            })
            .collect();
        for (rank, a) in answers.iter().enumerate().skip(1) {
            match (a, &answers[0]) {
                (Ok(_), Ok(_)) => {}
                (Err(Some(a)), Err(Some(b))) => assert_eq!(a, b, "rank {rank} refused otherwise"),
                _ => panic!("rank {rank} answered {a:?}, rank 0 {:?}", answers[0]),
            }
        }
        answers
            .into_iter()
            .next()
            .unwrap()
            .map_err(|e| e.unwrap_or_else(|| panic!("rank 0 failed")))
    }
}

/// One sequence as the test's coordinator sees it: prompt, the output it has seen, its blocks.
struct Seq {
    id: u64,
    prompt: Vec<u32>,
    out: Vec<u32>,
    first_block: u32,
    sampling: Option<SamplingParams>,
}

impl Seq {
    fn new(id: u64, prompt_len: u32, sampling: Option<SamplingParams>) -> Seq {
        Seq {
            id,
            prompt: (0..prompt_len)
                .map(|i| (i * 37 + id as u32 * 11 + 5) % 300)
                .collect(),
            out: Vec::new(),
            first_block: id as u32 * BLOCKS_PER_SEQ,
            sampling,
        }
    }

    fn penalized(&self) -> bool {
        self.sampling.as_ref().is_some_and(|p| p.penalized())
    }

    /// The whole prompt, sampling its first output token.
    fn prefill(&self) -> SequenceStep {
        SequenceStep {
            seq_id: self.id,
            token_ids: self.prompt.clone(),
            block_table: (self.first_block..self.first_block + BLOCKS_PER_SEQ).collect(),
            sample: true,
            sampling: self.sampling.clone(),
            context_token_ids: if self.penalized() {
                self.prompt.clone()
            } else {
                Vec::new()
            },
            ..Default::default()
        }
    }

    /// A decode of the latest output token, given as `how` says.
    fn decode(&self, how: Input) -> SequenceStep {
        let seen = self.prompt.len() + self.out.len();
        let fed = how == Input::Fed;
        let mut context = Vec::new();
        if self.penalized() {
            context.extend(&self.prompt);
            context.extend(&self.out[..self.out.len() - usize::from(how != Input::Sent)]);
        }
        SequenceStep {
            seq_id: self.id,
            token_ids: if fed {
                Vec::new()
            } else {
                vec![*self.out.last().unwrap()]
            },
            start_pos: (seen - 1) as u32,
            append_blocks: true,
            sample: true,
            sampling: self.sampling.clone().map(|p| SamplingParams {
                output_index: self.out.len() as u32,
                ..p
            }),
            context_token_ids: context,
            feed_sampled: fed,
            ..Default::default()
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Input {
    /// In `token_ids` and the context, as without overlap.
    Sent,
    /// Left to rank 0 (`feed_sampled`): in neither.
    Fed,
    /// In `token_ids` but not in the context: what rank 0 would sample from had it not added
    /// the fed token to the context.
    SentNotInContext,
}

fn plan(step_id: u64, seqs: Vec<SequenceStep>) -> StepPlan {
    StepPlan {
        step_id,
        seqs,
        return_logits: true,
        ..Default::default()
    }
}

/// Greedy, greedy with every penalty, and seeded sampling with a presence penalty. The tiny
/// random model seldom wants a token it has just produced, so a positive penalty on it would
/// seldom change a choice; negative ones (more of the same, which the API allows) make the
/// latest token, the one that is fed, matter.
fn three_seqs() -> Vec<Seq> {
    let penalties = SamplingParams {
        repetition_penalty: 1.1,
        frequency_penalty: -1.0,
        presence_penalty: -3.0,
        ..Default::default()
    };
    let seeded = SamplingParams {
        temperature: 0.9,
        seed: Some(7),
        presence_penalty: -4.0,
        ..Default::default()
    };
    vec![
        Seq::new(0, 9, None),
        Seq::new(1, 21, Some(penalties)),
        Seq::new(2, 14, Some(seeded)),
    ]
}

/// One step's logits, by sequence id.
type StepLogits = Vec<(u64, Vec<f32>)>;

/// Prefills [`three_seqs`] and decodes `n` steps, each token given as `how` says; the outputs,
/// and each step's logits by sequence.
fn generate(ranks: &Ranks, how: Input, n: usize) -> (Vec<Vec<u32>>, Vec<StepLogits>) {
    let mut seqs = three_seqs();
    let mut logits = Vec::new();
    for step in 0..=n {
        let steps = seqs
            .iter()
            .map(|s| {
                if step == 0 {
                    s.prefill()
                } else {
                    s.decode(how)
                }
            })
            .collect();
        let r = ranks.step(plan(step as u64, steps)).expect("the plan runs");
        assert_eq!(r.tokens.len(), seqs.len());
        for (s, t) in seqs.iter_mut().zip(&r.tokens) {
            assert_eq!(t.seq_id, s.id);
            s.out.push(t.token_id);
        }
        logits.push(r.logits.into_iter().map(|l| (l.seq_id, l.values)).collect());
    }
    (seqs.into_iter().map(|s| s.out).collect(), logits)
}

fn bits(step_logits: &[StepLogits]) -> Vec<Vec<(u64, Vec<u32>)>> {
    step_logits
        .iter()
        .map(|step| {
            step.iter()
                .map(|(id, v)| (*id, v.iter().map(|x| x.to_bits()).collect()))
                .collect()
        })
        .collect()
}

fn fed_tokens_match_sent_tokens(world: usize) {
    let dir = tempfile::tempdir().unwrap();
    make_tiny_model(dir.path(), 4, &[]).unwrap();
    let ranks = Ranks::start(dir.path(), world);
    let (sent_out, sent_logits) = generate(&ranks, Input::Sent, 10);
    let (fed_out, fed_logits) = generate(&ranks, Input::Fed, 10);
    assert_eq!(fed_out, sent_out, "tp {world}: the outputs differ");
    // Bit for bit: the same computation, the same token on every rank (a rank fed another
    // token would change the all-reduced hidden states, so rank 0's logits).
    assert!(
        bits(&fed_logits) == bits(&sent_logits),
        "tp {world}: the logits differ"
    );
    // The penalties of the penalized sequences read the fed token: without it in the context
    // they sample otherwise, so the comparison above covers rank 0 adding it.
    let (stale_out, _) = generate(&ranks, Input::SentNotInContext, 10);
    assert_eq!(stale_out[0], sent_out[0]);
    for i in [1, 2] {
        assert_ne!(
            stale_out[i], sent_out[i],
            "tp {world}: sequence {i}'s penalties never changed a token, so the test shows nothing"
        );
    }
}

#[test]
fn fed_tokens_match_sent_tokens_at_tp_1() {
    fed_tokens_match_sent_tokens(1);
}

#[test]
fn fed_tokens_match_sent_tokens_at_tp_2() {
    fed_tokens_match_sent_tokens(2);
}

fn refused_feeds_change_nothing(world: usize) {
    let dir = tempfile::tempdir().unwrap();
    make_tiny_model(dir.path(), 5, &[]).unwrap();
    let ranks = Ranks::start(dir.path(), world);
    let mut a = Seq::new(0, 12, None);
    let mut b = Seq::new(1, 20, None);
    // Step 0: `a` samples; `b` is a prefill chunk that does not.
    let mut chunk = b.prefill();
    chunk.token_ids.truncate(8);
    chunk.sample = false;
    let r = ranks.step(plan(0, vec![a.prefill(), chunk])).unwrap();
    a.out.push(r.tokens[0].token_id);

    let refused = |plan: StepPlan, words: &str| {
        let why = ranks.step(plan).expect_err("the plan is refused");
        assert!(
            why.contains(words),
            "tp {world}: {why:?} should say {words:?}"
        );
    };
    let mut with_tokens = a.decode(Input::Fed);
    with_tokens.token_ids = vec![5];
    refused(
        plan(1, vec![with_tokens]),
        "sequence 0 feeds its sampled token but also sends 1 tokens",
    );
    // `b` sampled nothing in step 0; nor did a sequence rank 0 never saw. `a` could be fed, but
    // the plan is refused whole.
    let mut b_fed = b.decode(Input::Fed);
    b_fed.start_pos = 8;
    refused(
        plan(2, vec![a.decode(Input::Fed), b_fed]),
        "sequence 1 feeds the token sampled for it in the previous step",
    );
    let mut unknown = Seq::new(3, 0, None).prefill();
    unknown.feed_sampled = true;
    refused(plan(3, vec![unknown]), "sequence 3 feeds the token");

    // Nothing of that changed the engines: `a`'s token from step 0 is still there to feed.
    let r = ranks.step(plan(4, vec![a.decode(Input::Fed)])).unwrap();
    a.out.push(r.tokens[0].token_id);
    // Step 5 samples `b` only, so `a`'s token of step 4 is gone: only the previous step feeds.
    let mut rest = b.prefill();
    rest.token_ids.drain(..8);
    rest.start_pos = 8;
    rest.block_table.clear();
    rest.append_blocks = true;
    let r = ranks.step(plan(5, vec![rest])).unwrap();
    b.out.push(r.tokens[0].token_id);
    refused(
        plan(6, vec![a.decode(Input::Fed)]),
        "sequence 0 feeds the token",
    );
    let r = ranks.step(plan(7, vec![b.decode(Input::Fed)])).unwrap();
    assert_eq!(r.tokens.len(), 1);
}

#[test]
fn refused_feeds_change_nothing_at_tp_1() {
    refused_feeds_change_nothing(1);
}

#[test]
fn refused_feeds_change_nothing_at_tp_2() {
    refused_feeds_change_nothing(2);
}
