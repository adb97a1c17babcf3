//! `helios-bench allreduce`: the CPU all-reduce's latency per call, over the TCP mesh and over
//! shared memory (`helios_worker::comm::ShmCommunicator`).
//!
//! The ranks are threads of this process, meshed over 127.0.0.1 as the communicator's tests
//! mesh them (`comm::test_support`); each all-reduce is what a worker calls after attention and
//! after the MLP: `all_reduce_sum` of an f32 tensor, its conversions included. For every world
//! size, transport and message size, every rank makes `--warmup` calls, then `--calls` timed
//! ones; rank 0's times are reported (a collective ends on every rank within a wake-up).

use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Result};
use candle_core::{Device, Tensor};
use helios_worker::comm::test_support::on_local_mesh;
use helios_worker::comm::{Communicator, ShmCommunicator, ShmOptions};
use serde_json::json;

#[derive(clap::Args)]
pub struct AllreduceArgs {
    /// Message sizes in KiB, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,4,16,64")]
    sizes_kb: Vec<usize>,
    /// World sizes (ranks), comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "2,3")]
    world: Vec<usize>,
    #[arg(long, value_delimiter = ',', default_value = "tcp,shm")]
    transport: Vec<Transport>,
    /// Timed calls per case.
    #[arg(long, default_value_t = 2000)]
    calls: usize,
    /// Untimed calls before them.
    #[arg(long, default_value_t = 200)]
    warmup: usize,
    #[arg(long)]
    json: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Transport {
    Tcp,
    Shm,
}

impl Transport {
    fn name(self) -> &'static str {
        match self {
            Transport::Tcp => "tcp",
            Transport::Shm => "shm",
        }
    }
}

pub fn run(a: AllreduceArgs) -> Result<()> {
    if a.calls == 0 || a.world.contains(&0) || a.sizes_kb.contains(&0) {
        bail!("--calls, --world and --sizes-kb must be positive");
    }
    let mut rows = Vec::new();
    for &world in &a.world {
        for &transport in &a.transport {
            for (&kb, mut times) in a.sizes_kb.iter().zip(measure(&a, world, transport)?) {
                times.sort_unstable();
                let us =
                    |q: f64| times[((times.len() - 1) as f64 * q) as usize].as_secs_f64() * 1e6;
                rows.push((world, transport, kb, us(0.5), us(0.9)));
            }
        }
    }
    if a.json {
        let rows: Vec<_> = rows
            .iter()
            .map(|&(world, t, kb, p50, p90)| {
                json!({"world": world, "transport": t.name(), "size_kb": kb,
                       "median_us": p50, "p90_us": p90})
            })
            .collect();
        println!(
            "{}",
            json!({"calls": a.calls, "warmup": a.warmup, "results": rows})
        );
        return Ok(());
    }
    println!(
        "f32 all_reduce_sum, ranks as threads of one process; {} calls after {} warm-up, rank 0's time per call\n",
        a.calls, a.warmup
    );
    println!("| world | transport | size | median µs | p90 µs |");
    println!("|---:|---|---:|---:|---:|");
    for (world, t, kb, p50, p90) in rows {
        println!(
            "| {world} | {} | {kb} KiB | {p50:.1} | {p90:.1} |",
            t.name()
        );
    }
    Ok(())
}

/// Rank 0's time per call, by message size, for one world size and transport.
fn measure(a: &AllreduceArgs, world: usize, transport: Transport) -> Result<Vec<Vec<Duration>>> {
    let opts = ShmOptions {
        enabled: true,
        ..ShmOptions::from_env()
    };
    let (sizes, calls, warmup) = (a.sizes_kb.clone(), a.calls, a.warmup);
    let by_rank = on_local_mesh(world, move |_, tcp| -> Result<Vec<Vec<Duration>>> {
        let mut comm: Box<dyn Communicator> = match transport {
            Transport::Tcp => Box::new(tcp),
            Transport::Shm => {
                let shm = ShmCommunicator::attach_with(tcp, &opts)?;
                ensure!(
                    shm.is_shared_memory(),
                    "shared memory did not attach on this host"
                );
                Box::new(shm)
            }
        };
        let mut by_size = Vec::new();
        for &kb in &sizes {
            let x = Tensor::from_vec(vec![1f32; kb * 256], kb * 256, &Device::Cpu)?;
            comm.barrier()?;
            for _ in 0..warmup {
                comm.all_reduce_sum(&x)?;
            }
            let mut times = Vec::with_capacity(calls);
            for _ in 0..calls {
                let t = Instant::now();
                comm.all_reduce_sum(&x)?;
                times.push(t.elapsed());
            }
            by_size.push(times);
        }
        Ok(by_size)
    })?;
    let mut by_rank = by_rank.into_iter().collect::<Result<Vec<_>>>()?;
    Ok(by_rank.swap_remove(0))
}
