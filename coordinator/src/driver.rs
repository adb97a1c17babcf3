//! Drives a fixed set of requests to completion on a replica: chunked prefill, then decode,
//! every running sequence in every step (iteration-level batching).
//!
//! This is the engine-level loop that `helios generate` and the engine benchmark use. Each step
//! fills a token budget: one decode token per sequence whose prompt is done, then chunks of the
//! prompts still being read. Blocks come from the coordinator's [`BlockAllocator`] and go back
//! when a sequence finishes.

use anyhow::{bail, Context, Result};
use helios_proto::v1::{SamplingParams, SequenceStep, StepPlan};

use crate::block_manager::BlockAllocator;
use crate::sharded_client::ShardedClient;

#[derive(Debug, Clone)]
pub struct Request {
    pub prompt_ids: Vec<u32>,
    pub max_new_tokens: usize,
    pub sampling: SamplingParams,
    /// Generation stops after emitting one of these (EOS unless ignored).
    pub stop_token_ids: Vec<u32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    Length,
    Eos,
    /// The caller stopped it (a stop string).
    Stop,
}

/// What the caller wants after seeing a token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    Continue,
    Stop,
}

#[derive(Debug, Clone)]
pub struct Output {
    pub generated_ids: Vec<u32>,
    pub logprobs: Vec<f32>,
    pub finish_reason: FinishReason,
}

struct Seq {
    req: Request,
    /// Prompt then generated tokens.
    tokens: Vec<u32>,
    /// Tokens whose KV is in the cache.
    computed: usize,
    table: Vec<u32>,
    logprobs: Vec<f32>,
    finished: Option<FinishReason>,
}

impl Seq {
    fn generated(&self) -> &[u32] {
        &self.tokens[self.req.prompt_ids.len()..]
    }
}

pub struct Driver<'a> {
    client: &'a mut ShardedClient,
    blocks: BlockAllocator,
    max_batch_tokens: usize,
    next_step: u64,
}

impl<'a> Driver<'a> {
    pub fn new(
        client: &'a mut ShardedClient,
        blocks: BlockAllocator,
        max_batch_tokens: usize,
    ) -> Self {
        Self {
            client,
            blocks,
            max_batch_tokens: max_batch_tokens.max(1),
            next_step: 0,
        }
    }

    /// Runs `reqs` together; `on_token(request index, token)` sees each token as it is sampled
    /// and may stop that request.
    pub async fn run(
        &mut self,
        reqs: Vec<Request>,
        mut on_token: impl FnMut(usize, u32) -> Control,
    ) -> Result<Vec<Output>> {
        let mut seqs: Vec<Seq> = Vec::with_capacity(reqs.len());
        for req in reqs {
            if req.prompt_ids.is_empty() {
                bail!("empty prompt");
            }
            let finished = (req.max_new_tokens == 0).then_some(FinishReason::Length);
            seqs.push(Seq {
                tokens: req.prompt_ids.clone(),
                req,
                computed: 0,
                table: Vec::new(),
                logprobs: Vec::new(),
                finished,
            });
        }
        let result = self.run_seqs(&mut seqs, &mut on_token).await;
        for s in &mut seqs {
            self.blocks.release(&mut s.table);
        }
        result?;
        Ok(seqs
            .into_iter()
            .map(|s| Output {
                generated_ids: s.generated().to_vec(),
                logprobs: s.logprobs,
                finish_reason: s.finished.unwrap_or(FinishReason::Length),
            })
            .collect())
    }

    async fn run_seqs(
        &mut self,
        seqs: &mut [Seq],
        on_token: &mut impl FnMut(usize, u32) -> Control,
    ) -> Result<()> {
        loop {
            let (plan, members) = self.plan(seqs, false)?;
            if members.is_empty() {
                return Ok(());
            }
            let result = self.client.step(plan.clone()).await?;
            for (&i, step) in members.iter().zip(&plan.seqs) {
                seqs[i].computed += step.token_ids.len();
            }
            for t in result.tokens {
                let i = t.seq_id as usize;
                let s = &mut seqs[i];
                s.tokens.push(t.token_id);
                s.logprobs.push(t.logprob);
                let control = on_token(i, t.token_id);
                if s.req.stop_token_ids.contains(&t.token_id) {
                    s.finished = Some(FinishReason::Eos);
                } else if control == Control::Stop {
                    s.finished = Some(FinishReason::Stop);
                } else if s.generated().len() >= s.req.max_new_tokens {
                    s.finished = Some(FinishReason::Length);
                }
                if s.finished.is_some() {
                    self.blocks.release(&mut s.table);
                }
            }
        }
    }

    /// Teacher-forced logits: those after the whole prompt, then after each token of `cont`
    /// fed one at a time (`cont.len() + 1` rows, the last one predicting past `cont`).
    pub async fn teacher_forced_logits(
        &mut self,
        prompt: &[u32],
        cont: &[u32],
    ) -> Result<Vec<Vec<f32>>> {
        if prompt.is_empty() {
            bail!("empty prompt");
        }
        let tokens: Vec<u32> = prompt.iter().chain(cont).copied().collect();
        let mut table = Vec::new();
        let mut rows = Vec::with_capacity(cont.len() + 1);
        let out: Result<()> = async {
            let mut done = 0;
            while done < tokens.len() {
                // The prompt in budget-sized chunks, then one token per step.
                let n = if done < prompt.len() {
                    (prompt.len() - done).min(self.max_batch_tokens)
                } else {
                    1
                };
                self.blocks.ensure(&mut table, done + n)?;
                let plan = StepPlan {
                    step_id: self.next_step,
                    seqs: vec![SequenceStep {
                        seq_id: 0,
                        token_ids: tokens[done..done + n].to_vec(),
                        start_pos: done as u32,
                        block_table: table.clone(),
                        sample: false,
                        sampling: None,
                        context_token_ids: Vec::new(),
                    }],
                    return_logits: true,
                };
                self.next_step += 1;
                let mut r = self.client.step(plan).await?;
                done += n;
                if done >= prompt.len() {
                    rows.push(r.logits.pop().context("rank 0 returned no logits")?.values);
                }
            }
            Ok(())
        }
        .await;
        self.blocks.release(&mut table);
        out?;
        Ok(rows)
    }

    /// The next step: which sequences take part and with which tokens.
    fn plan(&mut self, seqs: &mut [Seq], return_logits: bool) -> Result<(StepPlan, Vec<usize>)> {
        let mut budget = self.max_batch_tokens;
        let mut plan = StepPlan {
            step_id: self.next_step,
            seqs: Vec::new(),
            return_logits,
        };
        self.next_step += 1;
        let mut members = Vec::new();
        // Decodes first (each needs one token), then prompt chunks.
        let order = (0..seqs.len())
            .filter(|&i| seqs[i].computed >= seqs[i].req.prompt_ids.len())
            .chain((0..seqs.len()).filter(|&i| seqs[i].computed < seqs[i].req.prompt_ids.len()));
        for i in order.collect::<Vec<_>>() {
            let s = &mut seqs[i];
            if s.finished.is_some() || budget == 0 {
                continue;
            }
            let n = (s.tokens.len() - s.computed).min(budget);
            self.blocks.ensure(&mut s.table, s.computed + n)?;
            budget -= n;
            let mut sampling = s.req.sampling;
            sampling.output_index = s.generated().len() as u32;
            plan.seqs.push(SequenceStep {
                seq_id: i as u64,
                token_ids: s.tokens[s.computed..s.computed + n].to_vec(),
                start_pos: s.computed as u32,
                block_table: s.table.clone(),
                sample: s.computed + n == s.tokens.len(),
                sampling: Some(sampling),
                context_token_ids: Vec::new(),
            });
            members.push(i);
        }
        Ok((plan, members))
    }
}
