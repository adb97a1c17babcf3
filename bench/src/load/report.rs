//! The numbers of a load run, the way `vllm bench serve` reports them, so results compare
//! across tools: successful and failed requests, duration, request / output / total token
//! throughput, goodput under service-level objectives, and TTFT, TPOT, ITL and end-to-end
//! latency as mean, standard deviation, median, p90 and p99.
//!
//! Definitions (vLLM's): TTFT is from sending a request to its first token; TPOT is one
//! request's `(e2el - ttft) / (output_tokens - 1)` (requests with one output token have none);
//! ITL is every gap between two consecutive chunks of a stream, over all requests; throughputs
//! divide by the whole measured duration. Percentiles interpolate linearly between the closest
//! ranks (NumPy's default), so a figure over a handful of requests matches vLLM's.

use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::{json, Map, Value};

use super::client::Record;

/// One bound of `--slo`: a request is "good" when it meets every bound given.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Slo {
    pub ttft_ms: Option<f64>,
    pub tpot_ms: Option<f64>,
    pub e2el_ms: Option<f64>,
}

impl Slo {
    /// Parses `ttft:MS,tpot:MS,e2el:MS` (any subset, any order; several `--slo` flags add up).
    pub fn parse(specs: &[String]) -> Result<Option<Slo>> {
        let mut slo = Slo::default();
        let mut any = false;
        for part in specs
            .iter()
            .flat_map(|s| s.split([',', ' ']))
            .filter(|p| !p.is_empty())
        {
            let (key, ms) = part
                .split_once(':')
                .with_context(|| format!("--slo {part:?}: expected KEY:MILLISECONDS"))?;
            let ms: f64 = ms
                .trim()
                .parse()
                .with_context(|| format!("--slo {part:?}: {ms:?} is not a number"))?;
            if !(ms.is_finite() && ms > 0.0) {
                bail!("--slo {part:?}: the bound must be a positive number of milliseconds");
            }
            let slot = match key.trim() {
                "ttft" => &mut slo.ttft_ms,
                "tpot" => &mut slo.tpot_ms,
                "e2el" => &mut slo.e2el_ms,
                other => bail!("--slo: unknown metric {other:?} (ttft, tpot or e2el)"),
            };
            *slot = Some(ms);
            any = true;
        }
        Ok(any.then_some(slo))
    }

    /// Whether a request meets every bound.
    pub fn met_by(&self, r: &Record) -> bool {
        let within = |bound: Option<f64>, v: f64| bound.is_none_or(|b| v <= b);
        within(self.ttft_ms, ms(r.ttft))
            && within(self.tpot_ms, r.tpot().map_or(0.0, ms))
            && within(self.e2el_ms, ms(r.e2el))
    }

    fn to_json(self) -> Value {
        json!({"ttft_ms": self.ttft_ms, "tpot_ms": self.tpot_ms, "e2el_ms": self.e2el_ms})
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Mean, standard deviation and percentiles of one latency, in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Stats {
    pub mean: f64,
    pub std: f64,
    pub median: f64,
    pub p90: f64,
    pub p99: f64,
}

impl Stats {
    /// `None` for no samples (no request completed, or none had a second token).
    pub fn of(mut samples: Vec<f64>) -> Option<Stats> {
        if samples.is_empty() {
            return None;
        }
        samples.sort_by(f64::total_cmp);
        let n = samples.len() as f64;
        let mean = samples.iter().sum::<f64>() / n;
        let var = samples.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n;
        Some(Stats {
            mean,
            std: var.sqrt(),
            median: percentile(&samples, 50.0),
            p90: percentile(&samples, 90.0),
            p99: percentile(&samples, 99.0),
        })
    }
}

/// The `p`-th percentile of sorted `v`, interpolating linearly between ranks (NumPy's default).
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    match sorted.len() {
        0 => f64::NAN,
        1 => sorted[0],
        n => {
            let pos = p.clamp(0.0, 100.0) / 100.0 * (n - 1) as f64;
            let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
            sorted[lo] + (sorted[hi] - sorted[lo]) * (pos - lo as f64)
        }
    }
}

/// What the run was, for the report's header (and its JSON, so results are self-describing).
pub struct RunInfo {
    /// One line saying what was run, above the text report.
    pub title: String,
    /// Settings as JSON fields: protocol, url, model, load shape, dataset, lengths.
    pub settings: Map<String, Value>,
    /// Server-side counters over the measured phase (gRPC only), as JSON fields, and lines of
    /// the text report.
    pub server: Option<(Map<String, Value>, Vec<String>)>,
}

/// The report of one measured phase.
pub struct Report {
    pub completed: usize,
    pub failed: usize,
    /// The first few distinct error messages, with how often each occurred.
    pub errors: Vec<(String, usize)>,
    pub duration: Duration,
    pub total_input_tokens: usize,
    pub total_output_tokens: usize,
    pub slo: Option<Slo>,
    pub good: usize,
    pub ttft: Option<Stats>,
    pub tpot: Option<Stats>,
    pub itl: Option<Stats>,
    pub e2el: Option<Stats>,
}

/// How many distinct error messages the report lists.
const ERRORS_LISTED: usize = 5;

impl Report {
    pub fn new(outcomes: &[Result<Record, String>], duration: Duration, slo: Option<Slo>) -> Self {
        let ok: Vec<&Record> = outcomes.iter().filter_map(|o| o.as_ref().ok()).collect();
        let mut errors: Vec<(String, usize)> = Vec::new();
        for e in outcomes.iter().filter_map(|o| o.as_ref().err()) {
            if let Some((_, n)) = errors.iter_mut().find(|(m, _)| m == e) {
                *n += 1;
            } else if errors.len() < ERRORS_LISTED {
                errors.push((e.clone(), 1));
            }
        }
        Report {
            completed: ok.len(),
            failed: outcomes.len() - ok.len(),
            errors,
            duration,
            total_input_tokens: ok.iter().map(|r| r.prompt_tokens).sum(),
            total_output_tokens: ok.iter().map(|r| r.output_tokens).sum(),
            slo,
            good: slo.map_or(0, |s| ok.iter().filter(|r| s.met_by(r)).count()),
            ttft: Stats::of(ok.iter().map(|r| ms(r.ttft)).collect()),
            tpot: Stats::of(ok.iter().filter_map(|r| r.tpot().map(ms)).collect()),
            itl: Stats::of(
                ok.iter()
                    .flat_map(|r| r.itl.iter().copied().map(ms))
                    .collect(),
            ),
            e2el: Stats::of(ok.iter().map(|r| ms(r.e2el)).collect()),
        }
    }

    fn per_s(&self, n: usize) -> f64 {
        let s = self.duration.as_secs_f64();
        if s > 0.0 {
            n as f64 / s
        } else {
            0.0
        }
    }

    pub fn request_throughput(&self) -> f64 {
        self.per_s(self.completed)
    }

    pub fn output_throughput(&self) -> f64 {
        self.per_s(self.total_output_tokens)
    }

    pub fn total_token_throughput(&self) -> f64 {
        self.per_s(self.total_input_tokens + self.total_output_tokens)
    }

    /// Requests per second that met every SLO bound (`None` without `--slo`).
    pub fn goodput(&self) -> Option<f64> {
        self.slo.map(|_| self.per_s(self.good))
    }

    /// One JSON object: the run's settings, then vLLM's field names
    /// (`completed`, `request_throughput`, `mean_ttft_ms`, `p99_itl_ms`, ...) and the same
    /// latencies grouped (`ttft_ms: {mean, std, median, p90, p99}`), then the server's counters.
    pub fn to_json(&self, info: &RunInfo) -> Value {
        let mut o = info.settings.clone();
        let mut put = |k: &str, v: Value| {
            o.insert(k.to_string(), v);
        };
        put("completed", json!(self.completed));
        put("failed", json!(self.failed));
        put(
            "errors",
            self.errors
                .iter()
                .map(|(m, n)| json!({"message": m, "count": n}))
                .collect(),
        );
        put("duration", json!(self.duration.as_secs_f64()));
        put("total_input_tokens", json!(self.total_input_tokens));
        put("total_output_tokens", json!(self.total_output_tokens));
        put("request_throughput", json!(self.request_throughput()));
        put("request_goodput", json!(self.goodput()));
        put("slo", self.slo.map_or(Value::Null, Slo::to_json));
        put("output_throughput", json!(self.output_throughput()));
        put(
            "total_token_throughput",
            json!(self.total_token_throughput()),
        );
        for (name, stats) in self.latencies() {
            let f = |pick: fn(&Stats) -> f64| stats.as_ref().map(pick);
            put(&format!("mean_{name}_ms"), json!(f(|s| s.mean)));
            put(&format!("std_{name}_ms"), json!(f(|s| s.std)));
            put(&format!("median_{name}_ms"), json!(f(|s| s.median)));
            put(&format!("p90_{name}_ms"), json!(f(|s| s.p90)));
            put(&format!("p99_{name}_ms"), json!(f(|s| s.p99)));
            // The same figures grouped, for scripts that prefer `r["ttft_ms"]["p99"]`.
            put(
                &format!("{name}_ms"),
                stats.as_ref().map_or(Value::Null, |s| {
                    json!({"mean": s.mean, "std": s.std, "median": s.median, "p90": s.p90, "p99": s.p99})
                }),
            );
        }
        if let Some((server, _)) = &info.server {
            o.extend(server.clone());
        }
        Value::Object(o)
    }

    fn latencies(&self) -> [(&'static str, Option<Stats>); 4] {
        [
            ("ttft", self.ttft),
            ("tpot", self.tpot),
            ("itl", self.itl),
            ("e2el", self.e2el),
        ]
    }

    /// The text report, laid out as `vllm bench serve` prints it.
    pub fn to_text(&self, info: &RunInfo) -> String {
        use std::fmt::Write;
        let mut s = String::new();
        let mut line = |label: &str, value: String| {
            let _ = writeln!(s, "{label:<40} {value}");
        };
        let mut out = format!("{}\n", info.title);
        let _ = writeln!(out, "{:=^50}", " Serving Benchmark Result ");
        line("Successful requests:", self.completed.to_string());
        line("Failed requests:", self.failed.to_string());
        line(
            "Benchmark duration (s):",
            format!("{:.2}", self.duration.as_secs_f64()),
        );
        line("Total input tokens:", self.total_input_tokens.to_string());
        line(
            "Total generated tokens:",
            self.total_output_tokens.to_string(),
        );
        line(
            "Request throughput (req/s):",
            format!("{:.2}", self.request_throughput()),
        );
        if let Some(g) = self.goodput() {
            line("Request goodput (req/s):", format!("{g:.2}"));
        }
        line(
            "Output token throughput (tok/s):",
            format!("{:.2}", self.output_throughput()),
        );
        line(
            "Total token throughput (tok/s):",
            format!("{:.2}", self.total_token_throughput()),
        );
        out.push_str(&s);
        let titles = [
            ("TTFT", "Time to First Token"),
            ("TPOT", "Time per Output Token (excl. 1st token)"),
            ("ITL", "Inter-token Latency"),
            ("E2EL", "End-to-end Latency"),
        ];
        for ((_, stats), (short, title)) in self.latencies().into_iter().zip(titles) {
            let _ = writeln!(out, "{:-^50}", title);
            let v = |pick: fn(&Stats) -> f64| {
                stats
                    .as_ref()
                    .map_or("-".to_string(), |s| format!("{:.2}", pick(s)))
            };
            for (label, value) in [
                ("Mean", v(|s| s.mean)),
                ("Median", v(|s| s.median)),
                ("P90", v(|s| s.p90)),
                ("P99", v(|s| s.p99)),
            ] {
                let _ = writeln!(out, "{:<40} {value}", format!("{label} {short} (ms):"));
            }
        }
        if let Some((_, lines)) = &info.server {
            let _ = writeln!(out, "{:-^50}", "Server (ModelInfo, measured phase)");
            for l in lines {
                let _ = writeln!(out, "{l}");
            }
        }
        let _ = writeln!(out, "{}", "=".repeat(50));
        if !self.errors.is_empty() {
            let _ = writeln!(out, "Errors (first {} distinct):", self.errors.len());
            for (m, n) in &self.errors {
                let _ = writeln!(out, "  {n} x {m}");
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(ttft_ms: u64, itl_ms: &[u64], output_tokens: usize) -> Record {
        let ttft = Duration::from_millis(ttft_ms);
        let itl: Vec<Duration> = itl_ms.iter().map(|&m| Duration::from_millis(m)).collect();
        Record {
            ttft,
            e2el: ttft + itl.iter().sum::<Duration>(),
            itl,
            prompt_tokens: 10,
            output_tokens,
        }
    }

    #[test]
    fn percentiles_interpolate_like_numpy() {
        let v: Vec<f64> = (1..=10).map(f64::from).collect();
        // numpy.percentile(range(1, 11), [50, 90, 99]) = [5.5, 9.1, 9.91]
        assert!((percentile(&v, 50.0) - 5.5).abs() < 1e-12);
        assert!((percentile(&v, 90.0) - 9.1).abs() < 1e-12);
        assert!((percentile(&v, 99.0) - 9.91).abs() < 1e-12);
        assert_eq!(percentile(&[3.0], 99.0), 3.0);
        assert_eq!(percentile(&v, 0.0), 1.0);
        assert_eq!(percentile(&v, 100.0), 10.0);
    }

    #[test]
    fn stats_are_ordered_and_exact() {
        let s = Stats::of(vec![4.0, 1.0, 3.0, 2.0]).expect("samples");
        assert_eq!(s.mean, 2.5);
        assert_eq!(s.median, 2.5);
        assert!((s.std - 1.25f64.sqrt()).abs() < 1e-12);
        assert!(s.median <= s.p90 && s.p90 <= s.p99);
        assert!(Stats::of(Vec::new()).is_none());
    }

    #[test]
    fn slo_parsing() {
        let slo = Slo::parse(&["ttft:500,tpot:50".into(), "e2el:2000".into()])
            .expect("parses")
            .expect("some");
        assert_eq!(
            slo,
            Slo {
                ttft_ms: Some(500.0),
                tpot_ms: Some(50.0),
                e2el_ms: Some(2000.0)
            }
        );
        assert_eq!(Slo::parse(&[]).expect("empty"), None);
        for bad in ["ttft", "ttft:x", "ttft:-1", "itl:5", "ttft:0"] {
            assert!(Slo::parse(&[bad.into()]).is_err(), "{bad}");
        }
    }

    #[test]
    fn report_counts_goodput_and_latencies() {
        // TTFT 100 ms, then 3 gaps of 10 ms: TPOT 10 ms, E2EL 130 ms.
        let fast = record(100, &[10, 10, 10], 4);
        // TTFT 300 ms, TPOT 50 ms.
        let slow = record(300, &[50, 50, 50], 4);
        // One output token: no TPOT, no ITL.
        let single = record(200, &[], 1);
        let outcomes = vec![
            Ok(fast),
            Ok(slow),
            Ok(single),
            Err("HTTP 503: busy".to_string()),
            Err("HTTP 503: busy".to_string()),
        ];
        let slo = Slo::parse(&["ttft:250,tpot:20".into()]).expect("parses");
        let r = Report::new(&outcomes, Duration::from_secs(2), slo);
        assert_eq!((r.completed, r.failed), (3, 2));
        assert_eq!(r.errors, vec![("HTTP 503: busy".to_string(), 2)]);
        assert_eq!(r.total_input_tokens, 30);
        assert_eq!(r.total_output_tokens, 9);
        assert_eq!(r.request_throughput(), 1.5);
        assert_eq!(r.output_throughput(), 4.5);
        assert_eq!(r.total_token_throughput(), 19.5);
        // fast and single meet ttft <= 250 and tpot <= 20; slow misses both.
        assert_eq!(r.good, 2);
        assert_eq!(r.goodput(), Some(1.0));
        let tpot = r.tpot.expect("tpot");
        assert!((tpot.mean - 30.0).abs() < 1e-9, "{tpot:?}");
        let itl = r.itl.expect("itl");
        assert!((itl.mean - 30.0).abs() < 1e-9 && (itl.median - 30.0).abs() < 1e-9);
        let e2el = r.e2el.expect("e2el");
        assert!((e2el.median - 200.0).abs() < 1e-9);

        let info = RunInfo {
            title: String::new(),
            settings: Map::new(),
            server: None,
        };
        let j = r.to_json(&info);
        assert_eq!(j["completed"], 3);
        assert_eq!(j["failed"], 2);
        assert_eq!(j["request_goodput"], 1.0);
        assert!(j["p99_ttft_ms"].as_f64().expect("p99") > 0.0);
        assert_eq!(j["p99_ttft_ms"], j["ttft_ms"]["p99"]);
        assert_eq!(j["mean_e2el_ms"], j["e2el_ms"]["mean"]);
        let text = r.to_text(&info);
        assert!(text.contains("Request goodput (req/s):"), "{text}");
        assert!(text.contains("P99 ITL (ms):"), "{text}");
    }

    #[test]
    fn nothing_completed_gives_null_latencies() {
        let r = Report::new(&[Err("x".to_string())], Duration::from_secs(1), None);
        let j = r.to_json(&RunInfo {
            title: String::new(),
            settings: Map::new(),
            server: None,
        });
        assert_eq!(j["completed"], 0);
        assert!(j["mean_ttft_ms"].is_null() && j["ttft_ms"].is_null());
        assert!(j["request_goodput"].is_null());
    }
}
