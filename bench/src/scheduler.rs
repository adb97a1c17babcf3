//! `helios-bench scheduler`: the scheduler's decision time per decode step, in-process.
//!
//! `seqs` sequences share a system prompt (so the prefix cache holds blocks every one of them
//! references) and have their own tail, `context` positions each, all running. Each measured
//! step is what the step loop pays between two steps of the ranks: `schedule` (plan every
//! sequence's next token, allocate a block every 16 positions, build the StepPlan) and `apply`
//! (rank 0's answer: append the tokens, cache newly full blocks, check EOS and length). The
//! answer itself is made outside the timed region. Two modes: steps back to back, and with
//! overlap (the next step is planned while the previous one is unanswered, so decodes feed their
//! last token by reference).

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use helios_coordinator::block_manager::BlockManager;
use helios_coordinator::scheduler::{
    answer_with, Scheduler, SchedulerConfig, Sequence, SequenceParams,
};
use helios_proto::v1::StepPlan;
use serde_json::json;

#[derive(clap::Args)]
pub struct SchedulerArgs {
    /// Running sequences, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "256,1024")]
    seqs: Vec<usize>,
    /// Positions of each sequence when the measurement starts (the first half is shared).
    #[arg(long, default_value_t = 512)]
    context: usize,
    /// Decode steps measured.
    #[arg(long, default_value_t = 1000)]
    steps: usize,
    #[arg(long)]
    json: bool,
}

const BLOCK: usize = 16;

pub fn run(a: SchedulerArgs) -> Result<()> {
    if a.context < 2 || a.steps == 0 {
        bail!("--context must be at least 2 and --steps positive");
    }
    let mut rows = Vec::new();
    for &n in &a.seqs {
        for overlap in [false, true] {
            rows.push(measure(n, a.context, a.steps, overlap)?);
        }
    }
    if a.json {
        for r in &rows {
            println!("{}", r.json());
        }
        return Ok(());
    }
    println!(
        "Scheduler decision time per decode step (prefix caching on, context {} with the first half shared, {} steps)",
        a.context, a.steps
    );
    println!("| seqs | overlap | schedule µs | apply µs | total µs (mean) | p50 µs | p99 µs | µs per sequence |");
    println!("|---|---|---|---|---|---|---|---|");
    for r in &rows {
        println!(
            "| {} | {} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.3} |",
            r.seqs,
            if r.overlap { "yes" } else { "no" },
            r.schedule_us,
            r.apply_us,
            r.schedule_us + r.apply_us,
            r.p50_us,
            r.p99_us,
            (r.schedule_us + r.apply_us) / r.seqs as f64
        );
    }
    Ok(())
}

struct Row {
    seqs: usize,
    overlap: bool,
    schedule_us: f64,
    apply_us: f64,
    p50_us: f64,
    p99_us: f64,
}

impl Row {
    fn json(&self) -> serde_json::Value {
        json!({
            "seqs": self.seqs, "overlap": self.overlap, "schedule_us": self.schedule_us,
            "apply_us": self.apply_us, "p50_us": self.p50_us, "p99_us": self.p99_us,
        })
    }
}

fn answer(plan: &StepPlan) -> helios_proto::v1::StepResult {
    // Ordinary tokens, never a stop token.
    answer_with(plan, |s| {
        1000 + (s.seq_id as u32 * 7 + s.start_pos) % 20_000
    })
}

fn measure(seqs: usize, context: usize, steps: usize, overlap: bool) -> Result<Row> {
    let max_new = steps + 8;
    let per_seq = (context + max_new).div_ceil(BLOCK);
    let mut sched = Scheduler::new(
        BlockManager::new(seqs * per_seq + 64, BLOCK),
        SchedulerConfig {
            max_batch_tokens: 8192,
            max_running: seqs,
            max_waiting: seqs,
            prefix_caching: true,
        },
    );
    let shared = context / 2;
    for i in 0..seqs {
        let prompt: Vec<u32> = (0..shared as u32)
            .map(|j| 2000 + j)
            .chain((0..(context - shared) as u32).map(|j| 3000 + (i as u32 * 131 + j) % 30_000))
            .collect();
        let params = SequenceParams {
            max_new_tokens: max_new,
            ..Default::default()
        };
        sched.add(Sequence::new(i as u64, prompt, params))?;
    }
    // Prefill everything (chunked by the budget) until every sequence decodes.
    let mut warm = 0;
    loop {
        let plan = sched.schedule()?.context("nothing to run")?;
        let decode = plan.seqs.len() == seqs && plan.seqs.iter().all(|s| s.sample);
        sched.apply(answer(&plan))?;
        if decode {
            break;
        }
        warm += 1;
        if warm > 10 * seqs {
            bail!("the prefill never ended");
        }
    }
    let mut times = Vec::with_capacity(steps);
    let (mut scheduling, mut applying) = (Duration::ZERO, Duration::ZERO);
    // With overlap one step is always unanswered: the oldest is answered after the next is
    // planned, as the step loop does.
    let mut in_flight = if overlap { sched.schedule()? } else { None };
    for _ in 0..steps {
        let t = Instant::now();
        let plan = sched.schedule()?.context("nothing to decode")?;
        let planned = t.elapsed();
        let answered = match in_flight.as_mut() {
            Some(older) => answer(&std::mem::replace(older, plan)),
            None => answer(&plan),
        };
        let t = Instant::now();
        sched.apply(answered)?;
        let applied = t.elapsed();
        scheduling += planned;
        applying += applied;
        times.push((planned + applied).as_secs_f64() * 1e6);
    }
    times.sort_by(f64::total_cmp);
    let pct = |p: f64| times[((times.len() - 1) as f64 * p) as usize];
    let per = |d: Duration| d.as_secs_f64() * 1e6 / steps as f64;
    sched.audit()?;
    Ok(Row {
        seqs,
        overlap,
        schedule_us: per(scheduling),
        apply_us: per(applying),
        p50_us: pct(0.5),
        p99_us: pct(0.99),
    })
}
