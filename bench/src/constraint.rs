//! `helios-bench constraint`: what structured outputs cost, in-process on the default model's
//! tokenizer: each schema's compile time (no cache), the coordinator's mask per constrained
//! token, and a rank's cost of applying a mask to a sampled row.
//!
//! Masks are timed along walks through each schema: at every step a token the mask allows is
//! picked at random (EOS only when it is the only one), accepted, and the next mask timed, so
//! the states are the ones a sampler visits, deep inside strings and numbers included.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use helios_coordinator::constraint::{ConstraintSpec, GrammarOptions, Grammars};
use helios_coordinator::tokenizer::TextTokenizer;
use helios_proto::v1::{SamplingParams, SequenceStep};
use helios_worker::sampling::sample;

#[derive(clap::Args)]
pub struct ConstraintArgs {
    #[arg(long, default_value = "models/SmolLM2-135M-Instruct.Q4_1.gguf")]
    model: PathBuf,
    /// A JSON array of JSON Schemas.
    #[arg(long, default_value = "tests/reference/schemas.json")]
    schemas: PathBuf,
    /// Walks per schema, and tokens per walk at most.
    #[arg(long, default_value_t = 4)]
    walks: usize,
    #[arg(long, default_value_t = 64)]
    tokens: usize,
}

pub fn run(a: ConstraintArgs) -> Result<()> {
    let tok = TextTokenizer::from_model_path(&a.model)
        .with_context(|| format!("loading {}", a.model.display()))?;
    let text = std::fs::read_to_string(&a.schemas)
        .with_context(|| format!("reading {}", a.schemas.display()))?;
    let schemas: Vec<serde_json::Value> = serde_json::from_str(&text)?;
    let vocab = tok.vocab_size();
    let eos = tok.eos_token_ids().first().copied().unwrap_or(0);
    let opts = GrammarOptions {
        cache_entries: 0,
        ..GrammarOptions::default()
    };
    let start = Instant::now();
    let grammars = Grammars::new(&tok, vocab, opts)?;
    println!(
        "token trie for {vocab} tokens: {:.1} ms (once per server)",
        ms(start.elapsed())
    );
    let mut compiles = Vec::new();
    let mut masks = Vec::new();
    for (i, schema) in schemas.iter().enumerate() {
        let spec = ConstraintSpec::JsonSchema(schema.to_string());
        for walk in 0..a.walks {
            let t = Instant::now();
            let mut c = grammars
                .compile(&spec)
                .with_context(|| format!("schema {i}"))?;
            compiles.push(t.elapsed());
            let mut state = (i * 131 + walk * 7 + 1) as u64;
            let mut mask = c.allowed()?;
            for _ in 0..a.tokens {
                let allowed: Vec<u32> = (0..vocab as u32)
                    .filter(|&t| mask[t as usize / 8] >> (t % 8) & 1 == 1)
                    .filter(|&t| t != eos)
                    .collect();
                let Some(&pick) = allowed.get(xorshift(&mut state) as usize % allowed.len().max(1))
                else {
                    break; // only EOS: complete
                };
                c.accept(pick)?;
                if c.is_complete() {
                    break;
                }
                let t = Instant::now();
                mask = c.allowed()?;
                masks.push(t.elapsed());
            }
        }
    }
    report("compile + first mask", &mut compiles, "ms", ms);
    report("mask per token", &mut masks, "µs", us);
    rank_cost(vocab)
}

/// A rank's cost of a mask: greedy sampling of a whole row with and without one.
fn rank_cost(vocab: usize) -> Result<()> {
    let mut state = 9;
    let row: Vec<f32> = (0..vocab)
        .map(|_| (xorshift(&mut state) % 2000) as f32 / 100.0)
        .collect();
    let mut mask = vec![0u8; vocab.div_ceil(8)];
    for t in (0..vocab).step_by(3) {
        mask[t / 8] |= 1 << (t % 8);
    }
    let seq = |allowed: Vec<u8>| SequenceStep {
        sample: true,
        sampling: Some(SamplingParams::default()),
        allowed_tokens: allowed,
        ..Default::default()
    };
    for (name, s) in [
        ("greedy row", seq(Vec::new())),
        ("greedy row + mask", seq(mask)),
    ] {
        const CALLS: u32 = 2000;
        let t = Instant::now();
        for _ in 0..CALLS {
            std::hint::black_box(sample(&row, &s));
        }
        println!("{name:<24} {:>8.1} µs", us(t.elapsed() / CALLS));
    }
    Ok(())
}

fn report(name: &str, v: &mut [Duration], unit: &str, f: fn(Duration) -> f64) {
    v.sort_unstable();
    let at = |q: f64| {
        v.get(((v.len() as f64 - 1.0) * q) as usize)
            .copied()
            .unwrap_or_default()
    };
    println!(
        "{name:<24} n={:<6} p50 {:.1} {unit}  p90 {:.1} {unit}  p99 {:.1} {unit}  max {:.1} {unit}",
        v.len(),
        f(at(0.5)),
        f(at(0.9)),
        f(at(0.99)),
        f(at(1.0)),
    );
}

fn xorshift(s: &mut u64) -> u64 {
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    *s
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}
