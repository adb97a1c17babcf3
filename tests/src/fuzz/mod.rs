//! Fuzzing over real sockets: generated and mutated input sent to a running `helios serve`
//! (gRPC and HTTP) and to a `helios-worker` (step plans), with the status every case must end
//! in.
//!
//! Everything is deterministic in one seed ([`FuzzConfig::seed`], printed by every report):
//! each case draws from its own generator, derived from the seed, the target and the case's
//! index ([`Rng::for_case`]), so a failure names the case that reproduces it whatever ran
//! before (`HELIOS_FUZZ_SEED=S`; the server's state may still differ, e.g. a worker's kept
//! block tables). Every run is bounded twice: in time and in cases ([`Budget`]); and every call
//! has a timeout, past which the case is a hang, which fails the run like a wrong status, a
//! broken connection or a server that exits.
//!
//! Targets: [`generation`] (the coordinator's gRPC API, well-formed hostile messages and raw
//! mutated frames), [`http`] (the OpenAI-compatible API over raw TCP) and [`worker`] (step
//! plans to a worker). Each returns a [`Report`]: cases per outcome and per generator, and the
//! failures.

pub mod generation;
pub mod grpc;
pub mod http;
pub mod worker;

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;
use std::time::{Duration, Instant};

use helios_proto::v1::generation_client::GenerationClient;
use helios_proto::v1::{GenerateRequest, GenerationParameters};

use crate::server::Process;

/// The seed a run uses when `HELIOS_FUZZ_SEED` is not set (fixed, so CI runs alike).
pub const DEFAULT_SEED: u64 = 0x4845_4c49_4f53_2026;
/// Seconds per target when `HELIOS_FUZZ_SECONDS` is not set.
pub const DEFAULT_SECONDS: u64 = 15;
/// Cases per target per second of budget when `HELIOS_FUZZ_CASES` is not set: a bound well
/// above what the CI machine reaches, so time is what usually ends a run, but a fast machine
/// still stops.
const CASES_PER_SECOND: usize = 500;
/// How many failures a target collects before it stops (a dead server fails every case).
const MAX_FAILURES: usize = 10;

/// How long and how hard to fuzz, and with which seed.
#[derive(Debug, Clone, Copy)]
pub struct FuzzConfig {
    pub seed: u64,
    /// Wall-clock budget per target.
    pub per_target: Duration,
    /// Case budget per target.
    pub max_cases: usize,
}

impl FuzzConfig {
    /// From `HELIOS_FUZZ_SEED` (decimal or `0x` hex), `HELIOS_FUZZ_SECONDS` (per target) and
    /// `HELIOS_FUZZ_CASES` (per target), with the defaults above.
    pub fn from_env() -> Self {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.trim().is_empty());
        let seed = var("HELIOS_FUZZ_SEED").map_or(DEFAULT_SEED, |v| {
            let v = v.trim();
            let parsed = match v.strip_prefix("0x") {
                Some(hex) => u64::from_str_radix(hex, 16),
                None => v.parse(),
            };
            parsed.unwrap_or_else(|e| panic!("HELIOS_FUZZ_SEED={v}: {e}"))
        });
        let seconds = var("HELIOS_FUZZ_SECONDS").map_or(DEFAULT_SECONDS, |v| {
            v.trim()
                .parse()
                .unwrap_or_else(|e| panic!("HELIOS_FUZZ_SECONDS={v}: {e}"))
        });
        let max_cases =
            var("HELIOS_FUZZ_CASES").map_or((seconds as usize).max(1) * CASES_PER_SECOND, |v| {
                v.trim()
                    .parse()
                    .unwrap_or_else(|e| panic!("HELIOS_FUZZ_CASES={v}: {e}"))
            });
        Self {
            seed,
            per_target: Duration::from_secs(seconds),
            max_cases,
        }
    }

    /// The budget of one target's run.
    pub fn budget(&self) -> Budget {
        Budget {
            deadline: Instant::now() + self.per_target,
            max_cases: self.max_cases,
            done: 0,
        }
    }
}

/// Where a target is and what every call to it carries: gRPC metadata (for example an
/// `authorization` header once workers check a cluster secret) sent with every call, well
/// formed or raw. Fuzzing with and without it is a second target value, not a second fuzzer.
#[derive(Debug, Clone, Default)]
pub struct FuzzTarget {
    /// `host:port`.
    pub addr: String,
    /// ASCII metadata (lower-case keys) added to every call.
    pub metadata: Vec<(String, String)>,
}

impl FuzzTarget {
    pub fn new(addr: impl Into<String>) -> Self {
        Self {
            addr: addr.into(),
            metadata: Vec::new(),
        }
    }

    /// This target with `key: value` on every call.
    pub fn with_metadata(mut self, key: &str, value: &str) -> Self {
        self.metadata.push((key.to_string(), value.to_string()));
        self
    }

    /// `http://ADDR`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Adds the target's metadata to a tonic request (a key or value tonic refuses is a bug
    /// of the test that set it, so it panics).
    pub fn apply<T>(&self, req: &mut tonic::Request<T>) {
        for (k, v) in &self.metadata {
            let key: tonic::metadata::MetadataKey<tonic::metadata::Ascii> = k
                .parse()
                .unwrap_or_else(|e| panic!("metadata key {k:?}: {e}"));
            let value = v
                .parse()
                .unwrap_or_else(|e| panic!("metadata value {v:?}: {e}"));
            req.metadata_mut().insert(key, value);
        }
    }

    /// `msg` as a tonic request carrying the target's metadata.
    pub fn request<T>(&self, msg: T) -> tonic::Request<T> {
        let mut req = tonic::Request::new(msg);
        self.apply(&mut req);
        req
    }
}

/// A small, fast, seedable generator (SplitMix64): no dependency, and the same numbers on
/// every platform, so a seed reproduces a run anywhere.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// The generator of case `index` of `target` in a run seeded with `seed`.
    pub fn for_case(seed: u64, target: &str, index: usize) -> Self {
        let mut h = seed ^ 0xcbf2_9ce4_8422_2325;
        for b in target.bytes() {
            h = (h ^ b as u64).wrapping_mul(0x0100_0000_01b3);
        }
        let mut r = Rng(h ^ (index as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
        r.next_u64();
        r
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n > 0`).
    pub fn below(&mut self, n: usize) -> usize {
        assert!(n > 0, "below(0)");
        (self.next_u64() % n as u64) as usize
    }

    /// Uniform in `lo..=hi`.
    pub fn range(&mut self, lo: usize, hi: usize) -> usize {
        lo + self.below(hi - lo + 1)
    }

    /// True with probability `num / den`.
    pub fn chance(&mut self, num: usize, den: usize) -> bool {
        self.below(den) < num
    }

    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }

    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next_u64() as u8).collect()
    }

    /// Some interesting number: small, a power of two (and neighbours), or an extreme.
    pub fn interesting_u64(&mut self) -> u64 {
        match self.below(6) {
            0 => self.below(4) as u64,
            1 => {
                let p = 1u64 << self.below(64);
                p.wrapping_add(self.below(3) as u64).wrapping_sub(1)
            }
            2 => u64::MAX - self.below(3) as u64,
            3 => u32::MAX as u64 - self.below(3) as u64,
            4 => i64::MAX as u64 + self.below(3) as u64,
            _ => self.next_u64(),
        }
    }
}

/// Mutates `data` in place with one of the classic byte-level mutations: flip a bit, set a
/// byte, insert or delete a run, truncate, duplicate a slice, splice a random varint. Returns
/// the mutation's name (for the report).
pub fn mutate_bytes(rng: &mut Rng, data: &mut Vec<u8>) -> &'static str {
    if data.is_empty() {
        let n = rng.range(1, 8);
        data.extend(rng.bytes(n));
        return "grow";
    }
    let at = rng.below(data.len());
    match rng.below(8) {
        0 => {
            data[at] ^= 1 << rng.below(8);
            "flip"
        }
        1 => {
            data[at] = *rng.pick(&[0x00, 0xff, 0x7f, 0x80, 0xc0, 0xfe]);
            "set"
        }
        2 => {
            let n = rng.range(1, 16);
            let run = rng.bytes(n);
            data.splice(at..at, run);
            "insert"
        }
        3 => {
            let end = (at + rng.range(1, 16)).min(data.len());
            data.drain(at..end);
            "delete"
        }
        4 => {
            data.truncate(at);
            "truncate"
        }
        5 => {
            let end = (at + rng.range(1, 32)).min(data.len());
            let copy = data[at..end].to_vec();
            let to = rng.below(data.len() + 1);
            data.splice(to..to, copy);
            "duplicate"
        }
        6 => {
            let v = varint(rng.interesting_u64());
            data.splice(at..at, v);
            "varint"
        }
        _ => {
            // A field key with a random field number and wire type (3 and 4 are the
            // deprecated groups, 6 and 7 do not exist), then a length past the end.
            let key = ((rng.range(1, 20) as u64) << 3) | rng.below(8) as u64;
            let mut v = varint(key);
            v.extend(varint(rng.interesting_u64()));
            data.splice(at..at, v);
            "field"
        }
    }
}

/// `v` as a protobuf varint.
pub fn varint(mut v: u64) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let b = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(b);
            return out;
        }
        out.push(b | 0x80);
    }
}

/// Bounds a run in time and in cases.
#[derive(Debug)]
pub struct Budget {
    deadline: Instant,
    max_cases: usize,
    done: usize,
}

impl Budget {
    /// The index of the next case, or `None` when the time or the cases are spent.
    pub fn next_case(&mut self) -> Option<usize> {
        if self.done >= self.max_cases || Instant::now() >= self.deadline {
            return None;
        }
        self.done += 1;
        Some(self.done - 1)
    }
}

/// What one target's run saw.
#[derive(Debug)]
pub struct Report {
    pub target: &'static str,
    pub seed: u64,
    pub cases: usize,
    pub elapsed: Duration,
    /// Cases per outcome (`OK`, `INVALID_ARGUMENT`, `400`, `refused in-band`, ...).
    pub outcomes: BTreeMap<String, usize>,
    /// Cases per generator (`hostile`, `raw:flip`, ...).
    pub kinds: BTreeMap<String, usize>,
    /// `case N (kind): what was wrong`, at most [`MAX_FAILURES`].
    pub failures: Vec<String>,
    started: Instant,
    /// When the previous case ended.
    last: Instant,
    /// `HELIOS_FUZZ_VERBOSE` set: every case is printed with its time.
    verbose: bool,
}

impl Report {
    pub fn new(target: &'static str, seed: u64) -> Self {
        Self {
            target,
            seed,
            cases: 0,
            elapsed: Duration::ZERO,
            outcomes: BTreeMap::new(),
            kinds: BTreeMap::new(),
            failures: Vec::new(),
            started: Instant::now(),
            last: Instant::now(),
            verbose: std::env::var_os("HELIOS_FUZZ_VERBOSE").is_some(),
        }
    }

    /// Counts case `index` of generator `kind` that ended in `outcome`; `Err(why)` is a failure.
    pub fn record(&mut self, index: usize, kind: &str, outcome: Result<String, String>) {
        self.cases += 1;
        *self.kinds.entry(kind.to_string()).or_default() += 1;
        if self.verbose {
            let ms = self.last.elapsed().as_millis();
            eprintln!(
                "fuzz {}: case {index} ({kind}) {ms} ms: {outcome:?}",
                self.target
            );
        }
        self.last = Instant::now();
        match outcome {
            Ok(o) => *self.outcomes.entry(o).or_default() += 1,
            Err(why) => {
                *self.outcomes.entry("FAILURE".into()).or_default() += 1;
                let why: String = why.chars().take(2500).collect();
                eprintln!("fuzz {}: case {index} ({kind}) FAILED: {why}", self.target);
                self.failures.push(format!("case {index} ({kind}): {why}"));
            }
        }
        self.elapsed = self.started.elapsed();
    }

    /// A failure found outside a case (a check between cases).
    pub fn fail(&mut self, why: String) {
        eprintln!("fuzz {}: FAILED: {why}", self.target);
        *self.outcomes.entry("FAILURE".into()).or_default() += 1;
        self.failures.push(why);
    }

    /// Whether the run must stop (too many failures: the server is probably gone).
    pub fn should_stop(&self) -> bool {
        self.failures.len() >= MAX_FAILURES
    }

    /// Panics, naming the seed and the failures, if there was any.
    pub fn assert_clean(&self) {
        assert!(
            self.failures.is_empty(),
            "fuzz {} (HELIOS_FUZZ_SEED={:#x}) failed:\n{}",
            self.target,
            self.seed,
            self.failures.join("\n")
        );
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "fuzz {}: {} cases in {:.1} s (seed {:#x}), {} failures",
            self.target,
            self.cases,
            self.elapsed.as_secs_f64(),
            self.seed,
            self.failures.len()
        )?;
        writeln!(f, "  outcomes:")?;
        for (o, n) in &self.outcomes {
            writeln!(f, "    {n:>7}  {o}")?;
        }
        writeln!(f, "  generators:")?;
        for (k, n) in &self.kinds {
            writeln!(f, "    {n:>7}  {k}")?;
        }
        Ok(())
    }
}

/// One value of a field a generator chose, and whether the server must accept it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Verdict {
    /// Documented as valid.
    Good,
    /// Valid or not depending on things the generator does not model (the chat template, how
    /// many tokens a text makes).
    Unsure,
    /// Documented as invalid: the request must be refused.
    Bad,
}

impl Verdict {
    /// The verdict of a request with both values: the worse.
    pub fn and(self, other: Verdict) -> Verdict {
        self.max(other)
    }
}

/// A chat template in the style of ChatML that, like many real ones, refuses roles it does not
/// know (`raise_exception`).
const CHAT_TEMPLATE: &str = "{%- for m in messages -%}\
{%- if m['role'] not in ['system', 'user', 'assistant'] -%}\
{{ raise_exception('unknown role: ' + m['role']) }}{%- endif -%}\
<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{%- endfor -%}\
{%- if add_generation_prompt -%}<|im_start|>assistant\n{%- endif -%}";

/// Writes a tiny random model (see [`crate::make_tiny_model`]) with a chat template into
/// `dir`: its steps take milliseconds, so a fuzz run spends its time on many cases, and chat
/// requests reach the template instead of being refused for want of one.
pub fn tiny_chat_model(dir: &Path, seed: u64) -> anyhow::Result<()> {
    crate::make_tiny_model(dir, seed, &[])?;
    let config = serde_json::json!({ "chat_template": CHAT_TEMPLATE });
    std::fs::write(dir.join("tokenizer_config.json"), config.to_string())?;
    Ok(())
}

/// The greedy continuation a fuzz run compares before and after: 8 tokens of a fixed prompt.
pub async fn greedy_probe(server: &Process) -> Result<Vec<u32>, String> {
    let req = GenerateRequest {
        prompt: "hello world".into(),
        parameters: Some(GenerationParameters {
            max_new_tokens: Some(8),
            ignore_eos: true,
            ..Default::default()
        }),
        ..Default::default()
    };
    let call = async {
        let mut client = GenerationClient::connect(format!("http://{}", server.addr))
            .await
            .map_err(|e| format!("connecting: {e}"))?;
        client
            .generate(req)
            .await
            .map_err(|s| format!("Generate: {s}"))
    };
    let resp = tokio::time::timeout(Duration::from_secs(60), call)
        .await
        .map_err(|_| "the probe Generate did not answer within 60 s".to_string())??;
    Ok(resp.into_inner().token_ids)
}

/// After a target's run: the server still runs, `/health` says 200, and the probe gives the
/// tokens it gave before the run. Failures go to `report`.
pub async fn check_serving(server: &mut Process, before: &[u32], report: &mut Report) {
    if !server.is_running() {
        report.fail("the server exited".into());
        return;
    }
    match greedy_probe(server).await {
        Ok(after) if after == before => {}
        Ok(after) => report.fail(format!(
            "the probe gave {after:?}, before the run {before:?}"
        )),
        Err(e) => report.fail(e),
    }
    if let Some(addr) = server.http_addr.clone() {
        let health = tokio::task::spawn_blocking(move || http::get(&addr, "/health")).await;
        match health {
            Ok(Ok(a)) if a.status == 200 => {}
            Ok(Ok(a)) => report.fail(format!("/health answered {}", a.status)),
            Ok(Err(e)) => report.fail(format!("/health: {e}")),
            Err(e) => report.fail(format!("/health task: {e}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cases_are_reproducible_and_distinct() {
        let a: Vec<u64> = (0..4)
            .map(|i| Rng::for_case(7, "t", i).next_u64())
            .collect();
        let b: Vec<u64> = (0..4)
            .map(|i| Rng::for_case(7, "t", i).next_u64())
            .collect();
        assert_eq!(a, b);
        assert_ne!(a[0], a[1]);
        assert_ne!(
            Rng::for_case(7, "t", 0).next_u64(),
            Rng::for_case(7, "u", 0).next_u64()
        );
    }

    #[test]
    fn varints_round_trip_through_prost() {
        for v in [0, 1, 127, 128, 300, u32::MAX as u64, u64::MAX] {
            let mut buf = varint(v);
            let got = prost::encoding::decode_varint(&mut buf.as_slice()).expect("varint");
            assert_eq!(got, v);
            buf.clear();
        }
    }

    #[test]
    fn budgets_stop_on_cases() {
        let cfg = FuzzConfig {
            seed: 1,
            per_target: Duration::from_secs(60),
            max_cases: 3,
        };
        let mut b = cfg.budget();
        let n = std::iter::from_fn(|| b.next_case()).count();
        assert_eq!(n, 3);
    }
}
