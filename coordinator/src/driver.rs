//! Drives a fixed set of requests to completion on a replica, without a server in front: the
//! engine benchmark and the test-only `helios logits` use it.
//!
//! Steps are planned by the same [`Scheduler`] the server uses; this only loops it and hands
//! each sampled token to a callback.

use anyhow::{bail, Context, Result};
use helios_proto::v1::{SamplingParams, SequenceStep, StepPlan};

use crate::scheduler::{FinishReason, Scheduler, Sequence, SequenceParams};
use crate::sharded_client::ShardedClient;

#[derive(Debug, Clone)]
pub struct Request {
    pub prompt_ids: Vec<u32>,
    pub max_new_tokens: usize,
    pub sampling: SamplingParams,
    /// Generation stops after emitting one of these (EOS unless ignored).
    pub stop_token_ids: Vec<u32>,
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
    pub finish_reason: FinishReason,
}

pub struct Driver<'a> {
    client: &'a mut ShardedClient,
    scheduler: Scheduler,
}

impl<'a> Driver<'a> {
    pub fn new(client: &'a mut ShardedClient, scheduler: Scheduler) -> Self {
        Self { client, scheduler }
    }

    /// Runs `reqs` together; `on_token(request index, token)` sees each token as it is sampled
    /// and may stop that request.
    pub async fn run(
        &mut self,
        reqs: Vec<Request>,
        mut on_token: impl FnMut(usize, u32) -> Control,
    ) -> Result<Vec<Output>> {
        let mut outputs: Vec<Output> = reqs
            .iter()
            .map(|_| Output {
                generated_ids: Vec::new(),
                finish_reason: FinishReason::Length,
            })
            .collect();
        for (i, req) in reqs.into_iter().enumerate() {
            if req.max_new_tokens == 0 {
                continue;
            }
            let params = SequenceParams {
                max_new_tokens: req.max_new_tokens,
                sampling: req.sampling,
                stop_token_ids: req.stop_token_ids,
                ..Default::default()
            };
            if let Err(e) = self
                .scheduler
                .add(Sequence::new(i as u64, req.prompt_ids, params))
            {
                self.scheduler.abort_all();
                return Err(e.into());
            }
        }
        let result = self.run_all(&mut outputs, &mut on_token).await;
        self.scheduler.abort_all();
        result.map(|()| outputs)
    }

    async fn run_all(
        &mut self,
        outputs: &mut [Output],
        on_token: &mut impl FnMut(usize, u32) -> Control,
    ) -> Result<()> {
        while let Some(plan) = self.scheduler.schedule()? {
            // Nobody here watches preemptions one by one.
            self.scheduler.take_preempted();
            let result = self.client.step(plan).await?;
            for s in self.scheduler.apply(result)? {
                let i = s.token.seq_id as usize;
                let out = &mut outputs[i];
                out.generated_ids.push(s.token.token_id);
                let control = on_token(i, s.token.token_id);
                match s.finish {
                    Some(reason) => out.finish_reason = reason,
                    None if control == Control::Stop => {
                        out.finish_reason = FinishReason::Stop;
                        self.scheduler.abort(i as u64);
                    }
                    None => {}
                }
            }
        }
        Ok(())
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
                    (prompt.len() - done).min(self.scheduler.max_batch_tokens())
                } else {
                    1
                };
                self.scheduler
                    .blocks_mut()
                    .context("teacher forcing needs an idle scheduler")?
                    .ensure(&mut table, done + n)?;
                let plan = StepPlan {
                    step_id: self.scheduler.next_step_id(),
                    seqs: vec![SequenceStep {
                        seq_id: 0,
                        token_ids: tokens[done..done + n].to_vec(),
                        start_pos: done as u32,
                        block_table: table.clone(),
                        ..Default::default()
                    }],
                    return_logits: true,
                    ..Default::default()
                };
                let mut r = self.client.step(plan).await?;
                done += n;
                if done >= prompt.len() {
                    rows.push(r.logits.pop().context("rank 0 returned no logits")?.values);
                }
            }
            Ok(())
        }
        .await;
        if let Some(blocks) = self.scheduler.blocks_mut() {
            blocks.release(&mut table);
        }
        out?;
        Ok(rows)
    }
}
