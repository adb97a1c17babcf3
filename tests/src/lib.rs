//! Shared helpers for Helios' tests: the repo's reference scripts, tiny models, the default model
//! and the built binaries.
//!
//! The independent reference is `tests/reference/llama_ref.py` (NumPy, float64), which shares no
//! code with the engine. Python comes from `$HELIOS_PYTHON` (set by `scripts/test.sh` to its
//! virtual environment) or `python3`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use anyhow::{bail, Context, Result};

pub mod etcd;
pub mod fuzz;
pub mod otlp;
pub mod recovery;
pub mod server;
pub mod tls;

/// The cluster secret of the tests' workers and coordinators (`helios serve` makes its own).
pub const TEST_CLUSTER_SECRET: &str = "helios-test-cluster-secret-0123456789";

/// `helios-worker`, holding [`TEST_CLUSTER_SECRET`] (in its environment, as a coordinator
/// started by [`server::Process::helios_command`] does).
pub fn helios_worker() -> Command {
    let mut cmd = Command::new(binary("helios-worker"));
    cmd.env(helios_proto::auth::CLUSTER_SECRET_ENV, TEST_CLUSTER_SECRET);
    cmd
}

/// A free TCP port on `host` (bound, then let go: another process may take it before the
/// caller binds it, so callers that can retry do).
pub fn free_port(host: &str) -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind((host, 0))?.local_addr()?.port())
}

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ sits in the repo root")
        .to_path_buf()
}

pub fn python() -> Command {
    Command::new(std::env::var("HELIOS_PYTHON").unwrap_or_else(|_| "python3".into()))
}

/// Runs `tests/reference/observe.py ARGS` (what operators see: `/metrics` through Prometheus'
/// parsers, a traced HTTP completion) and parses what it prints.
pub fn observe(args: &[&str]) -> serde_json::Value {
    reference_json("observe.py", args)
}

/// Runs the client script `tests/reference/SCRIPT ARGS`, which must succeed, and parses the
/// JSON it prints (what it saw; the checks are the test's).
pub fn reference_json(script: &str, args: &[&str]) -> serde_json::Value {
    let mut cmd = python();
    cmd.arg(repo_root().join("tests/reference").join(script))
        .args(args);
    run_json(cmd).unwrap_or_else(|e| panic!("{script} {args:?}: {e:#}"))
}

fn run_json(mut cmd: Command) -> Result<serde_json::Value> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    serde_json::from_slice(&out.stdout).with_context(|| {
        format!(
            "parsing the output of {cmd:?}: {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

/// `make_tiny_model` flags for a tiny model that splits three ways (6 heads, 3 KV heads), as
/// the recovery and cluster tests' tp-3 replicas need.
pub const TP3_MODEL: [&str; 8] = [
    "--hidden",
    "48",
    "--heads",
    "6",
    "--kv-heads",
    "3",
    "--intermediate",
    "96",
];

/// Writes a tiny random Llama (HF format, two shards) into `dir`; `extra` are flags of
/// `make_tiny_model.py` (`--tie`, `--heads 8`, ...).
pub fn make_tiny_model(dir: &Path, seed: u64, extra: &[&str]) -> Result<()> {
    let mut cmd = python();
    cmd.arg(repo_root().join("tests/reference/make_tiny_model.py"))
        .arg(dir)
        .args(["--seed", &seed.to_string()])
        .args(extra);
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

pub fn ids_arg(ids: &[u32]) -> String {
    ids.iter()
        .map(|i| i.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

/// Runs `llama_ref.py COMMAND --model MODEL ARGS...` and parses its JSON.
fn llama_ref(command: &str, model: &Path, args: &[&str]) -> Result<serde_json::Value> {
    let mut cmd = python();
    cmd.arg(repo_root().join("tests/reference/llama_ref.py"))
        .args([command, "--model"])
        .arg(model)
        .args(args);
    run_json(cmd)
}

fn field<T: serde::de::DeserializeOwned>(v: &serde_json::Value, key: &str) -> Result<T> {
    serde_json::from_value(v[key].clone()).with_context(|| format!("reference field {key}"))
}

/// The reference's last-position logits.
pub fn reference_logits(model: &Path, ids: &[u32]) -> Result<Vec<f64>> {
    field(
        &llama_ref("logits", model, &["--ids", &ids_arg(ids)])?,
        "logits",
    )
}

/// The reference's logits at every position of `ids`.
pub fn reference_all_logits(model: &Path, ids: &[u32]) -> Result<Vec<Vec<f64>>> {
    let args = ["--ids", &ids_arg(ids), "--all-positions"];
    field(&llama_ref("logits", model, &args)?, "logits")
}

/// The reference's greedy continuation: (generated ids, top-1/top-2 logit gap at each step).
pub fn reference_generate(model: &Path, ids: &[u32], n: usize) -> Result<(Vec<u32>, Vec<f64>)> {
    let n = n.to_string();
    let v = llama_ref(
        "generate",
        model,
        &["--ids", &ids_arg(ids), "--max-new-tokens", &n],
    )?;
    Ok((field(&v, "generated_ids")?, field(&v, "top2_gaps")?))
}

/// Teacher-forced reference: per continuation token, (argmax, top-2 gap) of the distribution
/// that predicts it.
pub fn reference_score(model: &Path, prompt: &[u32], cont: &[u32]) -> Result<(Vec<u32>, Vec<f64>)> {
    let args = ["--ids", &ids_arg(prompt), "--continuation", &ids_arg(cont)];
    let v = llama_ref("score", model, &args)?;
    Ok((field(&v, "argmax")?, field(&v, "top2_gaps")?))
}

/// `helios generate --json` on the default model with the question every test asks, as one
/// chat message; `extra` adds or sets flags.
pub fn generate_capital_of_france(
    tp: &str,
    max_new_tokens: &str,
    extra: &[&str],
) -> serde_json::Value {
    let model = default_model();
    let mut args = vec![
        "generate",
        "--model",
        model.to_str().expect("utf-8 path"),
        "--tp",
        tp,
        "--chat",
        "--prompt",
        "What is the capital of France?",
        "--max-new-tokens",
        max_new_tokens,
        "--json",
    ];
    args.extend_from_slice(extra);
    helios_json(&args)
}

/// The default model; fails (never skips) when it is missing.
pub fn default_model() -> PathBuf {
    let p = repo_root().join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        p.exists(),
        "{} is missing: run scripts/fetch-model.sh",
        p.display()
    );
    p
}

/// Path of a workspace binary (`helios`, `helios-worker`), built once per test process.
pub fn binary(name: &str) -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    let dir = BUILT.get_or_init(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new(cargo)
            .current_dir(repo_root())
            .args([
                "build",
                "--bins",
                "-p",
                "helios-coordinator",
                "-p",
                "helios-worker",
            ])
            .status()
            .expect("running cargo build");
        assert!(status.success(), "cargo build --bins failed");
        // tests run from target/<profile>/deps/; binaries live one level up.
        let exe = std::env::current_exe().expect("test executable");
        exe.parent()
            .and_then(Path::parent)
            .expect("target/<profile>")
            .to_path_buf()
    });
    dir.join(name)
}

/// Largest relative error of `got` against `want`, relative to the largest |want|.
pub fn max_rel_err(got: &[f32], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len(), "length mismatch");
    let scale = want.iter().fold(0f64, |m, v| m.max(v.abs())).max(1e-12);
    got.iter()
        .zip(want)
        .map(|(g, w)| (*g as f64 - w).abs() / scale)
        .fold(0.0, f64::max)
}

/// Runs the `helios` CLI; returns (exit success, stdout, stderr).
pub fn helios(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(binary("helios"))
        .args(args)
        .env("HELIOS_WORKER_BIN", binary("helios-worker"))
        .output()
        .expect("running helios");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs the `helios` CLI, which must succeed, and parses its JSON output.
pub fn helios_json(args: &[&str]) -> serde_json::Value {
    let (ok, stdout, stderr) = helios(args);
    assert!(ok, "helios {args:?} failed:\n{stderr}");
    serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("bad JSON from helios {args:?}: {e}\n{stdout}"))
}
