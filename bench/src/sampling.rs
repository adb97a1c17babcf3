//! `helios-bench sampling`: what rank 0 spends choosing one token, per sampled sequence.
//!
//! The logits are real: the last-position logits of the default model after a short prompt
//! (one forward pass in-process), so top-p and min-p cut where a real distribution cuts. Each
//! case times [`helios_worker::sampling::sample`]; the last row times sorting the whole
//! vocabulary by logit, which is what the sampler did per token before it selected only the
//! candidates a draw can reach. One more row times what a rank computes per scored prompt
//! row (prompt logprobs) besides the lm_head.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use helios_proto::v1::{SamplingParams, SequenceStep, StepPlan};
use helios_worker::comm::SingleRank;
use helios_worker::engine::{Engine, EngineOptions};
use helios_worker::prompt_logprobs::share;
use helios_worker::sampling::sample;

#[derive(clap::Args)]
pub struct SamplingArgs {
    #[arg(long, default_value = "models/SmolLM2-135M-Instruct.Q4_1.gguf")]
    model: PathBuf,
    /// Calls per case (the mean is reported).
    #[arg(long, default_value_t = 500)]
    calls: usize,
}

pub fn run(a: SamplingArgs) -> Result<()> {
    let mut engine = Engine::load(&EngineOptions::cpu(&a.model), Box::new(SingleRank))
        .with_context(|| format!("loading {}", a.model.display()))?;
    let vocab = engine.facts().vocab_size as usize;
    let prompt = crate::prompt(24, 7, vocab);
    let plan = StepPlan {
        seqs: vec![SequenceStep {
            token_ids: prompt,
            block_table: vec![0, 1],
            ..Default::default()
        }],
        return_logits: true,
        ..Default::default()
    };
    let logits = engine.step(plan)?.logits.pop().context("no logits")?.values;
    let p = |temperature: f32| SamplingParams {
        temperature,
        seed: Some(1),
        ..Default::default()
    };
    let cases = [
        ("greedy", None),
        (
            "greedy + logprob",
            Some(SamplingParams {
                logprobs: true,
                ..p(0.0)
            }),
        ),
        ("temperature 0.8", Some(p(0.8))),
        (
            "temperature 0.8, top-k 40",
            Some(SamplingParams {
                top_k: 40,
                ..p(0.8)
            }),
        ),
        (
            "temperature 0.8, top-p 0.9",
            Some(SamplingParams {
                top_p: 0.9,
                ..p(0.8)
            }),
        ),
        (
            "temperature 0.8, min-p 0.05",
            Some(SamplingParams {
                min_p: 0.05,
                ..p(0.8)
            }),
        ),
    ];
    println!("vocabulary {vocab}, {} calls per case", a.calls);
    println!("| case | µs per sampled token |\n|---|---|");
    for (name, params) in cases {
        let mut seq = SequenceStep {
            sampling: params,
            ..Default::default()
        };
        let t = Instant::now();
        for i in 0..a.calls {
            if let Some(s) = seq.sampling.as_mut() {
                s.output_index = i as u32;
            }
            std::hint::black_box(sample(&logits, &seq));
        }
        println!(
            "| {name} | {:.1} |",
            t.elapsed().as_secs_f64() / a.calls as f64 * 1e6
        );
    }
    let t = Instant::now();
    for i in 0..a.calls {
        let target = (i * 7919 % vocab) as u32;
        std::hint::black_box(share(&logits, 0, target, 5));
    }
    println!(
        "| a scored prompt row's share at tp 1 (prompt logprobs, top 5) | {:.1} |",
        t.elapsed().as_secs_f64() / a.calls as f64 * 1e6
    );
    let t = Instant::now();
    for _ in 0..a.calls {
        let mut idx: Vec<usize> = (0..logits.len()).collect();
        idx.sort_by(|&x, &y| logits[y].total_cmp(&logits[x]).then(x.cmp(&y)));
        std::hint::black_box(idx);
    }
    println!(
        "| sorting the whole vocabulary (the old sampler's per-token cost) | {:.1} |",
        t.elapsed().as_secs_f64() / a.calls as f64 * 1e6
    );
    Ok(())
}
