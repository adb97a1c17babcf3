//! What `GET /metrics` shows: the coordinator's Prometheus metrics, with vLLM's names under our
//! prefix (docs/architecture.md, "Observability").
//!
//! Who records what:
//! - a request's own numbers (queue time, time to first token, inter-token latency, end-to-end
//!   latency, its tokens, how it ended) are observed by its `RequestTrace` as they happen;
//! - step numbers (step duration, every rank's forward and all-reduce time, from the ranks'
//!   `StepResult`s) by the step loop as each answer comes back;
//! - gauges and the scheduler's cumulative counts (running, waiting, KV cache usage, prefix
//!   cache, preemptions, steps, worker up) are read at scrape time from each replica's
//!   [`ReplicaSnapshot`], which the step loop publishes anyway, so serving never pays for them;
//! - the router's choices and the requests moved off a lost replica, by the front door.
//!
//! Replica-level series carry a `replica` label (and `rank` for a rank's own), so one scrape
//! shows every replica behind the coordinator; a request's own numbers do not (a request may
//! move between replicas), and are the coordinator's whole.
//!
//! The text is Prometheus' format 0.0.4, or OpenMetrics 1.0 when the scraper asks for it
//! (`Accept: application/openmetrics-text`), as the Prometheus server does.

use std::sync::atomic::{AtomicU64, Ordering};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Metric, Registry, Unit};

use crate::replica::ReplicaSnapshot;
use crate::router::Reason;

/// vLLM's buckets for time to first token (seconds).
const TTFT_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
];
/// vLLM's buckets for the time between two tokens, with the GPU's milliseconds added.
const ITL_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5,
    5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
];
/// vLLM's buckets for request latencies (end to end, queueing), with short ones added.
const REQUEST_BUCKETS: &[f64] = &[
    0.01, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
    60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0,
];

/// Recoveries: a respawn and reload take about a second on CPU with a small model, minutes with
/// a large one.
const RECOVERY_BUCKETS: &[f64] = &[
    0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0,
];

/// Step-level times: 50 µs doubling up to ~6.5 s (a GPU decode step to a long CPU prefill).
fn step_buckets() -> impl Iterator<Item = f64> {
    exponential_buckets(50e-6, 2.0, 18)
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReplicaLabel {
    pub replica: u32,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RankLabel {
    pub replica: u32,
    pub rank: u32,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabel {
    pub replica: u32,
    /// Why the router chose it ([`Reason::name`]).
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FinishLabel {
    pub finish_reason: &'static str,
}

/// Every instrument; cheap to share (`Arc<Metrics>`), recorded from any task.
pub struct Metrics {
    registry: Registry,
    pub queue_time: Histogram,
    pub time_to_first_token: Histogram,
    pub inter_token_latency: Histogram,
    pub e2e_latency: Histogram,
    pub prompt_tokens: Counter,
    pub generation_tokens: Counter,
    /// Every request that was accepted ends here once, by how it ended.
    requests_finished: Family<FinishLabel, Counter>,
    routed: Family<RouteLabel, Counter>,
    moved: Family<ReplicaLabel, Counter>,
    /// The sum of `moved` over replicas (ModelInfo's total).
    moved_total: AtomicU64,
    replica: ReplicaFamilies,
}

/// The replica-level families, `{replica}`- or `{replica, rank}`-labelled.
struct ReplicaFamilies {
    step_duration: Family<ReplicaLabel, Histogram, fn() -> Histogram>,
    forward: Family<RankLabel, Histogram, fn() -> Histogram>,
    allreduce: Family<RankLabel, Histogram, fn() -> Histogram>,
    up: Family<RankLabel, Gauge>,
    // Read at scrape time (`ReplicaSnapshot`).
    requests_running: Family<ReplicaLabel, Gauge>,
    requests_waiting: Family<ReplicaLabel, Gauge>,
    kv_cache_usage: Family<ReplicaLabel, Gauge<f64, AtomicU64>>,
    prefix_cache_hit_ratio: Family<ReplicaLabel, Gauge<f64, AtomicU64>>,
    prefix_cache_queries: Family<ReplicaLabel, Counter>,
    prefix_cache_hits: Family<ReplicaLabel, Counter>,
    preemptions: Family<ReplicaLabel, Counter>,
    requeued: Family<ReplicaLabel, Counter>,
    steps: Family<ReplicaLabel, Counter>,
    /// Recoveries from a lost rank that rebuilt the replica, and how long each took.
    recoveries: Family<ReplicaLabel, Counter>,
    recovery_duration: Family<ReplicaLabel, Histogram, fn() -> Histogram>,
}

/// One replica's series that its step loop records into, made once: a step observes them
/// without a lookup.
pub struct ReplicaMetrics {
    step_duration: Histogram,
    ranks: Vec<RankSeries>,
    recoveries: Counter,
    recovery_duration: Histogram,
}

/// One rank's series of the `{replica, rank}`-labelled families.
struct RankSeries {
    forward: Histogram,
    allreduce: Histogram,
}

/// Registers `metric` as `helios_NAME` (with `_UNIT` appended when it has one) and returns it.
fn add<M: Metric + Clone>(
    r: &mut Registry,
    name: &str,
    help: &str,
    unit: Option<Unit>,
    metric: M,
) -> M {
    match unit {
        Some(unit) => r.register_with_unit(name, help, unit, metric.clone()),
        None => r.register(name, help, metric.clone()),
    }
    metric
}

impl Metrics {
    pub fn new() -> Self {
        let mut r = Registry::with_prefix("helios");
        let r = &mut r;
        let secs = || Some(Unit::Seconds);
        let histogram = |b: &[f64]| Histogram::new(b.iter().copied());
        let queue_time = add(
            r,
            "request_queue_time",
            "Time from arrival to a request's first scheduled step",
            secs(),
            histogram(REQUEST_BUCKETS),
        );
        let time_to_first_token = add(
            r,
            "time_to_first_token",
            "Time from arrival to a request's first generated token",
            secs(),
            histogram(TTFT_BUCKETS),
        );
        let inter_token_latency = add(
            r,
            "inter_token_latency",
            "Time between two consecutive generated tokens of a request",
            secs(),
            histogram(ITL_BUCKETS),
        );
        let e2e_latency = add(
            r,
            "e2e_request_latency",
            "Time from arrival to a request's last token, for requests that finished",
            secs(),
            histogram(REQUEST_BUCKETS),
        );
        let prompt_tokens = add(
            r,
            "prompt_tokens",
            "Prompt tokens of requests that produced their first token",
            None,
            Counter::default(),
        );
        let generation_tokens = add(
            r,
            "generation_tokens",
            "Tokens generated and sent to clients",
            None,
            Counter::default(),
        );
        let requests_finished = add(
            r,
            "requests_finished",
            "Accepted requests that ended, by how: length, eos, stop, cancelled (shutdown), \
             aborted (the client left), deadline, rejected, error",
            None,
            Family::default(),
        );
        let routed = add(
            r,
            "requests_routed",
            "Requests the router sent to a replica, by replica and why: cache (the longest \
             cached prefix), load (the least loaded), session (a session's replica), \
             round_robin, moved (off a lost replica)",
            None,
            Family::default(),
        );
        let moved = add(
            r,
            "requests_moved",
            "Requests moved off a replica that was lost (down, or recovering too long), by the \
             replica they left",
            None,
            Family::default(),
        );
        let replica = ReplicaFamilies::register(r);
        Self {
            queue_time,
            time_to_first_token,
            inter_token_latency,
            e2e_latency,
            prompt_tokens,
            generation_tokens,
            requests_finished,
            routed,
            moved,
            moved_total: AtomicU64::new(0),
            replica,
            registry: std::mem::take(r),
        }
    }

    /// The series replica `replica` of `world` ranks records its steps and recoveries into.
    pub fn replica(&self, replica: u32, world: usize) -> ReplicaMetrics {
        let f = &self.replica;
        let label = ReplicaLabel { replica };
        ReplicaMetrics {
            step_duration: f.step_duration.get_or_create(&label).clone(),
            ranks: (0..world as u32)
                .map(|rank| {
                    let label = RankLabel { replica, rank };
                    RankSeries {
                        forward: f.forward.get_or_create(&label).clone(),
                        allreduce: f.allreduce.get_or_create(&label).clone(),
                    }
                })
                .collect(),
            recoveries: f.recoveries.get_or_create(&label).clone(),
            recovery_duration: f.recovery_duration.get_or_create(&label).clone(),
        }
    }

    /// Counts a request routed to `replica`, and why.
    pub fn routed(&self, replica: u32, reason: Reason) {
        let reason = reason.name();
        self.routed
            .get_or_create(&RouteLabel { replica, reason })
            .inc();
    }

    /// Requests routed to `replica` since start, for any reason.
    pub fn routed_total(&self, replica: u32) -> u64 {
        Reason::ALL
            .iter()
            .filter_map(|r| {
                let reason = r.name();
                self.routed
                    .get(&RouteLabel { replica, reason })
                    .map(|c| c.get())
            })
            .sum()
    }

    /// Requests moved off `replica` since start.
    pub fn moved_out_total(&self, replica: u32) -> u64 {
        self.moved
            .get(&ReplicaLabel { replica })
            .map_or(0, |c| c.get())
    }

    /// Counts a request moved off `replica`.
    pub fn moved(&self, replica: u32) {
        self.moved.get_or_create(&ReplicaLabel { replica }).inc();
        self.moved_total.fetch_add(1, Ordering::Relaxed);
    }

    /// Requests moved off a lost replica since start, over every replica (those that left
    /// included, which is why the sum has a counter of its own).
    pub fn moved_total(&self) -> u64 {
        self.moved_total.load(Ordering::Relaxed)
    }

    /// Counts a request that ended, by how.
    pub fn finished(&self, reason: &'static str) {
        self.requests_finished
            .get_or_create(&FinishLabel {
                finish_reason: reason,
            })
            .inc();
    }

    /// The metrics as text: OpenMetrics when `openmetrics`, else Prometheus 0.0.4, with each
    /// replica's gauges and counts read from `replicas` (id, snapshot). Returns the text and
    /// its content type.
    pub fn render(
        &self,
        replicas: &[(u32, ReplicaSnapshot)],
        openmetrics: bool,
    ) -> (String, &'static str) {
        for (id, now) in replicas {
            self.replica.read(*id, now);
        }
        let mut text = String::new();
        // Writing into a String cannot fail.
        if openmetrics {
            let _ = prometheus_client::encoding::text::encode(&mut text, &self.registry);
            (
                text,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )
        } else {
            let _ = prometheus_client::encoding::prometheus_text::encode(&mut text, &self.registry);
            (text, "text/plain; version=0.0.4; charset=utf-8")
        }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl ReplicaFamilies {
    fn register(r: &mut Registry) -> Self {
        let secs = || Some(Unit::Seconds);
        fn steps() -> Histogram {
            Histogram::new(step_buckets())
        }
        fn recoveries() -> Histogram {
            Histogram::new(RECOVERY_BUCKETS.iter().copied())
        }
        Self {
            step_duration: add(
                r,
                "step_duration",
                "Time the slowest rank spent on a step",
                secs(),
                Family::new_with_constructor(steps),
            ),
            forward: add(
                r,
                "worker_forward_duration",
                "Time a rank spent on a step (its forward pass and sampling)",
                secs(),
                Family::new_with_constructor(steps),
            ),
            allreduce: add(
                r,
                "allreduce_duration",
                "Time a rank spent in collectives during a step (on CUDA, issuing them)",
                secs(),
                Family::new_with_constructor(steps),
            ),
            up: add(
                r,
                "worker_up",
                "1 while a rank takes steps, 0 once it is gone",
                None,
                Family::default(),
            ),
            requests_running: add(
                r,
                "requests_running",
                "Requests in the running batch",
                None,
                Family::default(),
            ),
            requests_waiting: add(
                r,
                "requests_waiting",
                "Requests waiting to be scheduled",
                None,
                Family::default(),
            ),
            kv_cache_usage: add(
                r,
                "kv_cache_usage_ratio",
                "Fraction of KV cache blocks in use by requests (0 to 1)",
                None,
                Family::default(),
            ),
            prefix_cache_hit_ratio: add(
                r,
                "prefix_cache_hit_ratio",
                "Prompt tokens found in the prefix cache over prompt tokens looked up, since start",
                None,
                Family::default(),
            ),
            prefix_cache_queries: add(
                r,
                "prefix_cache_queries",
                "Prompt tokens looked up in the prefix cache",
                None,
                Family::default(),
            ),
            prefix_cache_hits: add(
                r,
                "prefix_cache_hits",
                "Prompt tokens found in the prefix cache",
                None,
                Family::default(),
            ),
            preemptions: add(
                r,
                "preemptions",
                "Running requests preempted to free KV blocks",
                None,
                Family::default(),
            ),
            requeued: add(
                r,
                "sequences_requeued",
                "Running requests sent back to the queue (tokens kept) because the replica lost a rank",
                None,
                Family::default(),
            ),
            steps: add(
                r,
                "steps",
                "Steps the replica ran",
                None,
                Family::default(),
            ),
            recoveries: add(
                r,
                "recoveries",
                "Times the replica lost a rank and was rebuilt",
                None,
                Family::default(),
            ),
            recovery_duration: add(
                r,
                "recovery_duration",
                "Time from losing a rank to serving again",
                secs(),
                Family::new_with_constructor(recoveries),
            ),
        }
    }

    /// Sets replica `replica`'s scrape-time series from its snapshot.
    fn read(&self, replica: u32, now: &ReplicaSnapshot) {
        let label = ReplicaLabel { replica };
        let s = &now.scheduler;
        self.requests_running
            .get_or_create(&label)
            .set(s.running.into());
        self.requests_waiting
            .get_or_create(&label)
            .set(s.waiting.into());
        let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { 0.0 };
        let used = s.kv_blocks_total.saturating_sub(s.kv_blocks_free);
        self.kv_cache_usage
            .get_or_create(&label)
            .set(ratio(used.into(), s.kv_blocks_total.into()));
        self.prefix_cache_hit_ratio.get_or_create(&label).set(ratio(
            s.prefix_hit_tokens as f64,
            s.prefix_query_tokens as f64,
        ));
        // The scheduler's counts are cumulative already: the counters take their values.
        let store = |c: &Family<ReplicaLabel, Counter>, v: u64| {
            c.get_or_create(&label).inner().store(v, Ordering::Relaxed)
        };
        store(&self.prefix_cache_queries, s.prefix_query_tokens);
        store(&self.prefix_cache_hits, s.prefix_hit_tokens);
        store(&self.preemptions, s.preemptions);
        store(&self.requeued, s.requeued);
        store(&self.steps, now.steps.steps);
        for (rank, &up) in now.ranks_up.iter().enumerate() {
            let label = RankLabel {
                replica,
                rank: rank as u32,
            };
            self.up.get_or_create(&label).set(i64::from(up));
        }
    }
}

impl ReplicaMetrics {
    /// Records a recovery that rebuilt the replica in `took`.
    pub fn recovered(&self, took: std::time::Duration) {
        self.recoveries.inc();
        self.recovery_duration.observe(took.as_secs_f64());
    }

    /// Records one answered step: the slowest rank's time (`slowest_us`), and every rank's own.
    pub fn step(&self, slowest_us: u64, ranks: &[crate::sharded_client::RankTimes]) {
        let secs = |us: u64| us as f64 / 1e6;
        self.step_duration.observe(secs(slowest_us));
        for (series, t) in self.ranks.iter().zip(ranks) {
            series.forward.observe(secs(t.compute_us));
            series.allreduce.observe(secs(t.allreduce_us));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_design_and_counters_end_in_total() {
        let m = Metrics::new();
        let replica = m.replica(0, 2);
        m.prompt_tokens.inc_by(7);
        m.generation_tokens.inc_by(3);
        m.finished("length");
        m.time_to_first_token.observe(0.2);
        replica.recovered(std::time::Duration::from_millis(700));
        m.routed(1, Reason::Cache);
        m.routed(1, Reason::Session);
        m.moved(1);
        let now = ReplicaSnapshot {
            scheduler: crate::scheduler::SchedulerStats {
                running: 2,
                waiting: 1,
                kv_blocks_total: 10,
                kv_blocks_free: 6,
                prefix_query_tokens: 40,
                prefix_hit_tokens: 10,
                preemptions: 4,
                requeued: 5,
            },
            steps: crate::replica::StepTotals {
                steps: 9,
                ..Default::default()
            },
            ranks_up: vec![true, false],
            ..Default::default()
        };
        let (text, _) = m.render(&[(0, now.clone())], false);
        for line in [
            "helios_prompt_tokens_total 7",
            "helios_generation_tokens_total 3",
            "helios_requests_finished_total{finish_reason=\"length\"} 1",
            "helios_requests_running{replica=\"0\"} 2",
            "helios_requests_waiting{replica=\"0\"} 1",
            "helios_kv_cache_usage_ratio{replica=\"0\"} 0.4",
            "helios_prefix_cache_hit_ratio{replica=\"0\"} 0.25",
            "helios_preemptions_total{replica=\"0\"} 4",
            "helios_steps_total{replica=\"0\"} 9",
            "helios_sequences_requeued_total{replica=\"0\"} 5",
            "helios_recoveries_total{replica=\"0\"} 1",
            "helios_recovery_duration_seconds_bucket{replica=\"0\",le=\"1\"} 1",
            "helios_recovery_duration_seconds_bucket{replica=\"0\",le=\"0.5\"} 0",
            "helios_worker_up{replica=\"0\",rank=\"0\"} 1",
            "helios_worker_up{replica=\"0\",rank=\"1\"} 0",
            "helios_time_to_first_token_seconds_count 1",
            "helios_requests_routed_total{replica=\"1\",reason=\"cache\"} 1",
            "helios_requests_moved_total{replica=\"1\"} 1",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "{line} missing from\n{text}"
            );
        }
        assert_eq!(m.moved_total(), 1);
        assert_eq!((m.routed_total(1), m.routed_total(0)), (2, 0));
        assert_eq!((m.moved_out_total(1), m.moved_out_total(0)), (1, 0));
        let (om, content_type) = m.render(&[(0, now)], true);
        assert!(content_type.starts_with("application/openmetrics-text"));
        assert!(om.ends_with("# EOF\n"));
    }
}
