//! When requests are sent: the shape of the load, and the loop that sends them.
//!
//! - **Closed loop** (`--concurrency N` without `--request-rate`): N clients, each sending its
//!   next request as soon as its last one finishes. It measures what the server does at a fixed
//!   number of requests in flight, but a slow server slows the load down with it.
//! - **Open loop** (`--request-rate R`): requests arrive on their own schedule whatever the
//!   server does, the gaps between arrivals drawn from a gamma distribution with shape
//!   `--burstiness` and mean 1/R (vLLM's definition: shape 1 is a Poisson process, smaller is
//!   burstier, larger is steadier). `--concurrency` then caps requests in flight: an arrival
//!   beyond the cap waits for a slot (its latency counts from when it is sent). A rate of `inf`
//!   sends everything at once.
//!
//! Either runs until a number of requests has been sent or until a duration has passed (no
//! request starts after it; those in flight finish and count).

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use rand::rngs::StdRng;
use rand::SeedableRng;
use rand_distr::{Distribution, Gamma};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio::time::Instant;

/// The shape of the load.
#[derive(Debug, Clone, PartialEq)]
pub enum Load {
    Closed {
        concurrency: usize,
    },
    Open {
        /// Requests per second (`f64::INFINITY`: all at once).
        rate: f64,
        burstiness: f64,
        max_concurrency: Option<usize>,
    },
}

/// When the load stops.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Until {
    Requests(usize),
    Elapsed(Duration),
}

/// Gaps between open-loop arrivals: gamma(shape = burstiness, scale = 1 / (rate · burstiness)),
/// whose mean is 1 / rate.
pub struct Gaps {
    gamma: Option<Gamma<f64>>,
    rng: StdRng,
}

impl Gaps {
    pub fn new(rate: f64, burstiness: f64, seed: u64) -> Result<Gaps> {
        if rate.is_nan() || rate <= 0.0 {
            bail!("--request-rate must be positive (or inf)");
        }
        if !(burstiness.is_finite() && burstiness > 0.0) {
            bail!("--burstiness must be a positive number");
        }
        let gamma = if rate.is_infinite() {
            None
        } else {
            Some(
                Gamma::new(burstiness, 1.0 / (rate * burstiness))
                    .context("--request-rate / --burstiness")?,
            )
        };
        Ok(Gaps {
            gamma,
            rng: StdRng::seed_from_u64(seed),
        })
    }

    pub fn next_gap(&mut self) -> Duration {
        self.gamma.as_ref().map_or(Duration::ZERO, |g| {
            Duration::from_secs_f64(g.sample(&mut self.rng))
        })
    }
}

/// Sends requests `0, 1, 2, ...` with `send` under `load` until `until`, and returns what each
/// returned, in request order.
pub async fn drive<T, F, Fut>(load: &Load, until: Until, seed: u64, send: F) -> Result<Vec<T>>
where
    F: Fn(usize) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = T> + Send + 'static,
    T: Send + 'static,
{
    if let (Until::Elapsed(_), Load::Open { rate, .. }) = (until, load) {
        if rate.is_infinite() {
            bail!(
                "--request-rate inf sends everything at once: give --num-requests, not --duration"
            );
        }
    }
    let start = Instant::now();
    let mut tasks: JoinSet<Vec<(usize, T)>> = JoinSet::new();
    match load {
        Load::Closed { concurrency } => {
            let clients = match until {
                Until::Requests(n) => (*concurrency).min(n),
                Until::Elapsed(_) => *concurrency,
            };
            let next = Arc::new(AtomicUsize::new(0));
            for _ in 0..clients {
                let (next, send) = (next.clone(), send.clone());
                tasks.spawn(async move {
                    let mut done = Vec::new();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let over = match until {
                            Until::Requests(n) => i >= n,
                            Until::Elapsed(d) => start.elapsed() >= d,
                        };
                        if over {
                            return done;
                        }
                        done.push((i, send(i).await));
                    }
                });
            }
        }
        Load::Open {
            rate,
            burstiness,
            max_concurrency,
        } => {
            let mut gaps = Gaps::new(*rate, *burstiness, seed)?;
            let slots = max_concurrency.map(|c| Arc::new(Semaphore::new(c)));
            // Arrival times are kept from the start, not from each wake-up, so timer lateness
            // does not add up and lower the rate.
            let mut at = start;
            for i in 0.. {
                let over = match until {
                    Until::Requests(n) => i >= n,
                    Until::Elapsed(d) => at - start >= d,
                };
                if over {
                    break;
                }
                tokio::time::sleep_until(at).await;
                let (slots, send) = (slots.clone(), send.clone());
                tasks.spawn(async move {
                    // Never closed, so acquiring only fails if it is; then run without a slot.
                    let _slot = match slots {
                        Some(s) => s.acquire_owned().await.ok(),
                        None => None,
                    };
                    vec![(i, send(i).await)]
                });
                at += gaps.next_gap();
            }
        }
    }
    let mut all = Vec::new();
    while let Some(done) = tasks.join_next().await {
        all.extend(done.context("a request task panicked")?);
    }
    all.sort_by_key(|(i, _)| *i);
    Ok(all.into_iter().map(|(_, t)| t).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gaps_have_the_rate_as_mean_and_burstiness_as_shape() {
        for (rate, burstiness) in [(20.0, 1.0), (5.0, 0.5), (100.0, 4.0)] {
            let mut g = Gaps::new(rate, burstiness, 1).expect("gaps");
            let n = 20_000;
            let v: Vec<f64> = (0..n).map(|_| g.next_gap().as_secs_f64()).collect();
            let mean = v.iter().sum::<f64>() / n as f64;
            let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n as f64;
            // Gamma(k, θ): mean kθ = 1/rate, squared coefficient of variation 1/k.
            assert!(
                (mean * rate - 1.0).abs() < 0.05,
                "mean {mean} at rate {rate}"
            );
            let cv2 = var / (mean * mean);
            assert!(
                (cv2 * burstiness - 1.0).abs() < 0.1,
                "cv² {cv2} at burstiness {burstiness}"
            );
        }
        let mut inf = Gaps::new(f64::INFINITY, 1.0, 0).expect("inf");
        assert_eq!(inf.next_gap(), Duration::ZERO);
        assert!(Gaps::new(0.0, 1.0, 0).is_err());
        assert!(Gaps::new(1.0, 0.0, 0).is_err());
    }

    /// Runs `load` with a request that takes `work` and records the peak in flight.
    async fn run(load: Load, until: Until, work: Duration) -> (Vec<usize>, usize, Duration) {
        let in_flight = Arc::new(AtomicUsize::new(0));
        let peak = Arc::new(AtomicUsize::new(0));
        let (f, p) = (in_flight.clone(), peak.clone());
        let start = Instant::now();
        let out = drive(&load, until, 0, move |i| {
            let (f, p) = (f.clone(), p.clone());
            async move {
                let now = f.fetch_add(1, Ordering::SeqCst) + 1;
                p.fetch_max(now, Ordering::SeqCst);
                tokio::time::sleep(work).await;
                f.fetch_sub(1, Ordering::SeqCst);
                i
            }
        })
        .await
        .expect("drive");
        (out, peak.load(Ordering::SeqCst), start.elapsed())
    }

    #[tokio::test(start_paused = true)]
    async fn closed_loop_keeps_exactly_concurrency_in_flight() {
        let (out, peak, took) = run(
            Load::Closed { concurrency: 3 },
            Until::Requests(9),
            Duration::from_millis(100),
        )
        .await;
        assert_eq!(out, (0..9).collect::<Vec<_>>());
        assert_eq!(peak, 3);
        // Three waves of three.
        assert!(took >= Duration::from_millis(300) && took < Duration::from_millis(310));
    }

    #[tokio::test(start_paused = true)]
    async fn closed_loop_for_a_duration_starts_nothing_after_it() {
        let (out, peak, took) = run(
            Load::Closed { concurrency: 2 },
            Until::Elapsed(Duration::from_millis(250)),
            Duration::from_millis(100),
        )
        .await;
        // Waves start at 0, 100 and 200 ms; the one at 300 ms is past the end.
        assert_eq!(out.len(), 6);
        assert_eq!(peak, 2);
        assert!(took >= Duration::from_millis(300) && took < Duration::from_millis(310));
    }

    #[tokio::test(start_paused = true)]
    async fn open_loop_arrives_at_the_rate_whatever_the_server_does() {
        // 50/s for 2 s of arrivals, each request taking 1 s: about 50 in flight at once.
        let (out, peak, _) = run(
            Load::Open {
                rate: 50.0,
                burstiness: 1.0,
                max_concurrency: None,
            },
            Until::Elapsed(Duration::from_secs(2)),
            Duration::from_secs(1),
        )
        .await;
        assert!((70..=130).contains(&out.len()), "{} arrivals", out.len());
        assert!(peak > 25, "peak {peak}");
        assert_eq!(out, (0..out.len()).collect::<Vec<_>>());
    }

    #[tokio::test(start_paused = true)]
    async fn open_loop_respects_the_concurrency_cap() {
        let (out, peak, took) = run(
            Load::Open {
                rate: f64::INFINITY,
                burstiness: 1.0,
                max_concurrency: Some(4),
            },
            Until::Requests(8),
            Duration::from_millis(100),
        )
        .await;
        assert_eq!(out.len(), 8);
        assert_eq!(peak, 4);
        assert!(took >= Duration::from_millis(200) && took < Duration::from_millis(210));
    }

    #[tokio::test]
    async fn infinite_rate_needs_a_request_count() {
        let load = Load::Open {
            rate: f64::INFINITY,
            burstiness: 1.0,
            max_concurrency: None,
        };
        let r = drive(
            &load,
            Until::Elapsed(Duration::from_secs(1)),
            0,
            |i| async move { i },
        )
        .await;
        assert!(r.is_err());
    }
}
