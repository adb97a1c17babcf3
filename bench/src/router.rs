//! `helios-bench router`: the router's decision time per request, in-process.
//!
//! `replicas` prefix indexes each hold the block hashes of `prefixes` cached prompts of
//! `prompt_len` tokens (as a replica's block manager mirrors them), all different. Each
//! measured request is what the front door pays to choose a replica: hash the prompt's full
//! blocks, look them up in every replica's index, weigh the matches against load, and pick
//! (`Router::choose` over views like `front_door::route` builds). Half the requests are prompts
//! one replica holds whole, half are prompts none holds; loads vary so that the balance
//! threshold is exercised too.

use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use helios_coordinator::prefix_index::{prompt_hashes, PrefixIndex};
use helios_coordinator::router::{
    Accepts, Policy, Reason, ReplicaView, RouteRequest, Router, RouterOptions, DEFAULT_BALANCE,
};
use serde_json::json;

#[derive(clap::Args)]
pub struct RouterArgs {
    #[arg(long, default_value_t = 8)]
    replicas: usize,
    /// Prompts cached on each replica.
    #[arg(long, default_value_t = 10_000)]
    prefixes: usize,
    /// Tokens per prompt (cached and asked for).
    #[arg(long, default_value_t = 512)]
    prompt_len: usize,
    #[arg(long, default_value_t = 16)]
    block_size: usize,
    /// Requests measured.
    #[arg(long, default_value_t = 20_000)]
    requests: usize,
    #[arg(long)]
    json: bool,
}

/// Prompt `n`'s tokens: distinct for every `n` from the first block on.
fn prompt(n: usize, len: usize) -> Vec<u32> {
    (0..len)
        .map(|i| (n as u32).wrapping_mul(7919) ^ (i as u32).wrapping_mul(104_729))
        .collect()
}

pub fn run(a: RouterArgs) -> Result<()> {
    if a.replicas == 0 || a.requests == 0 || a.prompt_len < a.block_size {
        bail!("--replicas and --requests must be positive, --prompt-len at least a block");
    }
    let built = Instant::now();
    let indexes = cached_prompts(&a);
    let built = built.elapsed();
    let (mut times, cache_choices) = measure(&a, &indexes);
    times.sort_unstable();
    let at = |q: f64| times[((times.len() - 1) as f64 * q) as usize];
    let mean = times.iter().sum::<Duration>() / times.len() as u32;
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    if a.json {
        println!(
            "{}",
            json!({
                "replicas": a.replicas, "prefixes_per_replica": a.prefixes,
                "prompt_len": a.prompt_len, "block_size": a.block_size,
                "requests": a.requests, "cache_choices": cache_choices,
                "mean_us": us(mean), "p50_us": us(at(0.5)), "p99_us": us(at(0.99)),
                "max_us": us(at(1.0)),
            })
        );
        return Ok(());
    }
    println!(
        "{} replicas × {} cached prompts of {} tokens ({} block hashes each; built in {built:.1?})",
        a.replicas,
        a.prefixes,
        a.prompt_len,
        indexes[0].len()
    );
    println!(
        "{} requests ({cache_choices} routed for their cache): mean {:.2} µs, p50 {:.2} µs, \
         p99 {:.2} µs, max {:.2} µs per decision",
        a.requests,
        us(mean),
        us(at(0.5)),
        us(at(0.99)),
        us(at(1.0))
    );
    Ok(())
}

/// Each replica's index, holding its own `prefixes` prompts.
fn cached_prompts(a: &RouterArgs) -> Vec<PrefixIndex> {
    (0..a.replicas)
        .map(|r| {
            let index = PrefixIndex::default();
            for p in 0..a.prefixes {
                for h in prompt_hashes(&prompt(r * a.prefixes + p, a.prompt_len), a.block_size) {
                    index.insert(h);
                }
            }
            index
        })
        .collect()
}

/// Every request's decision time, and how many were routed for their cache.
fn measure(a: &RouterArgs, indexes: &[PrefixIndex]) -> (Vec<Duration>, usize) {
    let router = Router::new(
        RouterOptions {
            policy: Policy::CacheAware,
            balance: DEFAULT_BALANCE,
            failover_after: None,
        },
        a.block_size,
    );
    let asked: Vec<Vec<u32>> = (0..a.requests)
        .map(|i| {
            // Even: a prompt some replica holds; odd: one nobody holds.
            let n = if i % 2 == 0 {
                (i * 31) % (a.replicas * a.prefixes)
            } else {
                a.replicas * a.prefixes + i
            };
            prompt(n, a.prompt_len)
        })
        .collect();
    let mut times = Vec::with_capacity(a.requests);
    let mut cache_choices = 0;
    for (i, p) in asked.iter().enumerate() {
        let t = Instant::now();
        let views: Vec<ReplicaView<'_>> = indexes
            .iter()
            .enumerate()
            .map(|(r, index)| ReplicaView {
                id: r as u32,
                accepts: Accepts::Serving,
                load: (i + r) % 12,
                kv_blocks_free: 1000,
                prefixes: index,
            })
            .collect();
        let chosen = router.choose(
            &views,
            RouteRequest {
                prompt: p,
                session: None,
                moving: false,
            },
        );
        times.push(t.elapsed());
        if matches!(chosen, Some((_, Reason::Cache))) {
            cache_choices += 1;
        }
    }
    (times, cache_choices)
}
