//! Model hyper-parameters, read from an HF `config.json` or from GGUF metadata.
//!
//! One struct serves both formats so that everything downstream (sharding, KV sizing, the
//! forward pass) is format-blind. `validate_tp` is the single place that decides whether a
//! tensor-parallel degree can split this model.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{bail, Context, Result};
use candle_core::quantized::gguf_file::Value;
use serde::Deserialize;

/// RoPE frequency scaling, as HF `rope_scaling` describes it.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// Positions divided by `factor` (Llama 2 long-context fine-tunes).
    Linear { factor: f64 },
    /// Llama 3.1's frequency-dependent scaling.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: f64,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub architecture: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: Option<RopeScaling>,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
}

/// The fields of an HF `config.json` that a Llama-family model uses.
#[derive(Debug, Deserialize)]
struct HfConfig {
    #[serde(default)]
    architectures: Vec<String>,
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    #[serde(default = "default_eps")]
    rms_norm_eps: f64,
    #[serde(default = "default_theta")]
    rope_theta: f64,
    rope_scaling: Option<serde_json::Value>,
    #[serde(default = "default_max_pos")]
    max_position_embeddings: usize,
    sliding_window: Option<usize>,
    #[serde(default)]
    tie_word_embeddings: bool,
}

fn default_eps() -> f64 {
    1e-6
}
fn default_theta() -> f64 {
    10_000.0
}
fn default_max_pos() -> usize {
    4096
}

/// Upper bounds on a config's sizes (see `ModelConfig::check`): far above any released model.
const MAX_VOCAB: usize = 1 << 24;
const MAX_WIDTH: usize = 1 << 20;
const MAX_COUNT: usize = 1 << 16;
const MAX_POSITIONS: usize = 1 << 24;
/// Positions × head_dim: the RoPE cos and sin tables hold half of this each (4 GiB of f32 at most).
const MAX_ROPE_TABLE: usize = 1 << 30;

/// Architectures whose weights and forward pass are the Llama layout.
const SUPPORTED_ARCHITECTURES: &[&str] = &["LlamaForCausalLM", "MistralForCausalLM"];

impl ModelConfig {
    /// Reads `dir/config.json`.
    pub fn from_hf_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        // The error names the field that does not parse (`hidden_size: invalid value ...`).
        let hf: HfConfig =
            serde_path_to_error::deserialize(&mut serde_json::Deserializer::from_str(&text))
                .with_context(|| format!("parsing {}", path.display()))?;
        let architecture = match hf.architectures.first() {
            Some(a) if SUPPORTED_ARCHITECTURES.contains(&a.as_str()) => a.clone(),
            Some(a) => bail!(
                "{}: unsupported architecture {a:?} (supported: {})",
                path.display(),
                SUPPORTED_ARCHITECTURES.join(", ")
            ),
            None => bail!("{}: no `architectures` entry", path.display()),
        };
        let rope_scaling = match &hf.rope_scaling {
            None | Some(serde_json::Value::Null) => None,
            Some(v) => Some(
                parse_hf_rope_scaling(v)
                    .with_context(|| format!("{}: rope_scaling", path.display()))?,
            ),
        };
        // Mistral's sliding window only differs from full attention past the window, so a
        // context capped at the window is exact without a sliding-window kernel.
        let max_position_embeddings = match hf.sliding_window {
            Some(w) if w > 0 => hf.max_position_embeddings.min(w),
            _ => hf.max_position_embeddings,
        };
        let cfg = Self {
            architecture,
            vocab_size: hf.vocab_size,
            hidden_size: hf.hidden_size,
            intermediate_size: hf.intermediate_size,
            num_layers: hf.num_hidden_layers,
            num_heads: hf.num_attention_heads,
            num_kv_heads: hf.num_key_value_heads.unwrap_or(hf.num_attention_heads),
            head_dim: hf
                .head_dim
                .unwrap_or(hf.hidden_size / hf.num_attention_heads.max(1)),
            rms_norm_eps: hf.rms_norm_eps,
            rope_theta: hf.rope_theta,
            rope_scaling,
            max_position_embeddings,
            tie_word_embeddings: hf.tie_word_embeddings,
        };
        cfg.check().with_context(|| path.display().to_string())?;
        Ok(cfg)
    }

    /// Reads the `llama.*` keys of a GGUF file's metadata.
    pub fn from_gguf(
        path: &Path,
        md: &HashMap<String, Value>,
        vocab_rows: usize,
        has_output: bool,
    ) -> Result<Self> {
        let ctx = || path.display().to_string();
        let arch = md
            .get("general.architecture")
            .and_then(|v| v.to_string().ok())
            .cloned()
            .unwrap_or_default();
        if arch != "llama" {
            bail!(
                "{}: unsupported GGUF architecture {arch:?} (supported: llama)",
                ctx()
            );
        }
        // A key that is absent may have a default; one that is present must be an integer.
        let get_opt = |k: &str| -> Result<Option<usize>> {
            let Some(v) = md.get(k) else { return Ok(None) };
            let n = v
                .to_u64()
                .with_context(|| format!("{}: metadata {k} is not an integer", ctx()))?;
            let n = usize::try_from(n)
                .with_context(|| format!("{}: metadata {k} = {n} is too large", ctx()))?;
            Ok(Some(n))
        };
        let get_u = |k: &str| -> Result<usize> {
            get_opt(k)?.with_context(|| format!("{}: missing metadata {k}", ctx()))
        };
        let get_f = |k: &str, default: f64| -> f64 {
            md.get(k)
                .and_then(|v| v.to_f32().map(f64::from).or_else(|_| v.to_f64()).ok())
                .unwrap_or(default)
        };
        let hidden_size = get_u("llama.embedding_length")?;
        let num_heads = get_u("llama.attention.head_count")?;
        let num_kv_heads = get_opt("llama.attention.head_count_kv")?.unwrap_or(num_heads);
        let head_dim =
            get_opt("llama.attention.key_length")?.unwrap_or(hidden_size / num_heads.max(1));
        let rope_scaling = match md
            .get("llama.rope.scaling.type")
            .and_then(|v| v.to_string().ok())
            .map(String::as_str)
        {
            Some("linear") => Some(RopeScaling::Linear {
                factor: get_f("llama.rope.scaling.factor", 1.0),
            }),
            Some("none") | None => None,
            Some(other) => bail!("{}: unsupported rope scaling {other:?}", ctx()),
        };
        let cfg = Self {
            architecture: "llama".to_string(),
            vocab_size: vocab_rows,
            hidden_size,
            intermediate_size: get_u("llama.feed_forward_length")?,
            num_layers: get_u("llama.block_count")?,
            num_heads,
            num_kv_heads,
            head_dim,
            rms_norm_eps: get_f("llama.attention.layer_norm_rms_epsilon", 1e-5),
            rope_theta: get_f("llama.rope.freq_base", 10_000.0),
            rope_scaling,
            max_position_embeddings: get_opt("llama.context_length")?.unwrap_or(4096),
            tie_word_embeddings: !has_output,
        };
        cfg.check()
            .with_context(|| format!("{}: llama.* metadata", ctx()))?;
        Ok(cfg)
    }

    /// Refuses sizes no real model has before anything is sized from them: the RoPE tables, the
    /// KV cache and the `u32` fields of the model facts are computed from these numbers, and
    /// `config.json` or GGUF metadata is input from outside.
    fn check(&self) -> Result<()> {
        let bounds = [
            ("vocab_size", self.vocab_size, MAX_VOCAB),
            ("hidden_size", self.hidden_size, MAX_WIDTH),
            ("intermediate_size", self.intermediate_size, MAX_WIDTH),
            ("head_dim", self.head_dim, MAX_WIDTH),
            ("num_hidden_layers", self.num_layers, MAX_COUNT),
            ("num_attention_heads", self.num_heads, MAX_COUNT),
            ("num_key_value_heads", self.num_kv_heads, MAX_COUNT),
            (
                "max_position_embeddings",
                self.max_position_embeddings,
                MAX_POSITIONS,
            ),
        ];
        for (name, v, max) in bounds {
            if v == 0 || v > max {
                bail!("{name} is {v}; it must be between 1 and {max}");
            }
        }
        if !self.num_heads.is_multiple_of(self.num_kv_heads) {
            bail!(
                "{} query heads are not a multiple of {} KV heads",
                self.num_heads,
                self.num_kv_heads
            );
        }
        if !self.head_dim.is_multiple_of(2) {
            bail!("head_dim {} must be even for RoPE", self.head_dim);
        }
        // Both bounded above, so the product cannot overflow.
        let rope = self.max_position_embeddings * self.head_dim;
        if rope > MAX_ROPE_TABLE {
            bail!(
                "max_position_embeddings {} × head_dim {} = {rope} RoPE table entries, more than \
                 {MAX_ROPE_TABLE}",
                self.max_position_embeddings,
                self.head_dim
            );
        }
        self.check_floats()
    }

    /// NaN, infinite or non-positive constants would silently poison every logit.
    fn check_floats(&self) -> Result<()> {
        let mut floats = vec![
            ("rms_norm_eps", self.rms_norm_eps, true),
            ("rope_theta", self.rope_theta, false),
        ];
        match &self.rope_scaling {
            None => {}
            Some(RopeScaling::Linear { factor }) => {
                floats.push(("rope_scaling.factor", *factor, false))
            }
            Some(RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            }) => floats.extend([
                ("rope_scaling.factor", *factor, false),
                ("rope_scaling.low_freq_factor", *low_freq_factor, false),
                ("rope_scaling.high_freq_factor", *high_freq_factor, false),
                (
                    "rope_scaling.original_max_position_embeddings",
                    *original_max_position_embeddings,
                    false,
                ),
            ]),
        }
        for (name, v, zero_ok) in floats {
            if !v.is_finite() || v < 0.0 || (v == 0.0 && !zero_ok) {
                bail!("{name} is {v}; it must be a finite positive number");
            }
        }
        Ok(())
    }

    /// The number of column slices row-parallel layers are kept in: the largest valid tp when
    /// `tp` divides it (so tp 1 and that tp add the same partial sums in the same order and give
    /// bit-identical results), else `tp` itself.
    pub fn reduce_parts(&self, tp: usize) -> usize {
        let max_tp = (1..=self.num_kv_heads)
            .rev()
            .find(|&d| {
                self.num_heads.is_multiple_of(d)
                    && self.num_kv_heads.is_multiple_of(d)
                    && self.intermediate_size.is_multiple_of(d)
            })
            .unwrap_or(1);
        if max_tp.is_multiple_of(tp) {
            max_tp
        } else {
            tp
        }
    }

    /// Whether `tp` ranks can split this model Megatron-style: whole query and KV heads, and
    /// whole MLP columns, on every rank.
    pub fn validate_tp(&self, tp: usize) -> Result<()> {
        if tp == 0 {
            bail!("tensor-parallel degree must be at least 1");
        }
        if !self.num_heads.is_multiple_of(tp)
            || !self.num_kv_heads.is_multiple_of(tp)
            || !self.intermediate_size.is_multiple_of(tp)
        {
            let ok: Vec<String> = (1..=self.num_kv_heads)
                .filter(|d| {
                    self.num_heads.is_multiple_of(*d)
                        && self.num_kv_heads.is_multiple_of(*d)
                        && self.intermediate_size.is_multiple_of(*d)
                })
                .map(|d| d.to_string())
                .collect();
            bail!(
                "tp {tp} does not divide this model's {} query heads, {} KV heads and MLP width {}; \
                 valid tp values: {}",
                self.num_heads,
                self.num_kv_heads,
                self.intermediate_size,
                ok.join(", ")
            );
        }
        Ok(())
    }
}

fn parse_hf_rope_scaling(v: &serde_json::Value) -> Result<RopeScaling> {
    let kind = v
        .get("rope_type")
        .or_else(|| v.get("type"))
        .and_then(|t| t.as_str())
        .unwrap_or("");
    let num = |k: &str| -> Result<f64> {
        v.get(k)
            .and_then(|x| x.as_f64())
            .with_context(|| format!("missing number {k}"))
    };
    match kind {
        "linear" => Ok(RopeScaling::Linear {
            factor: num("factor")?,
        }),
        "llama3" => Ok(RopeScaling::Llama3 {
            factor: num("factor")?,
            low_freq_factor: num("low_freq_factor")?,
            high_freq_factor: num("high_freq_factor")?,
            original_max_position_embeddings: num("original_max_position_embeddings")?,
        }),
        other => bail!("unsupported rope_scaling type {other:?} (supported: linear, llama3)"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> ModelConfig {
        ModelConfig {
            architecture: "LlamaForCausalLM".into(),
            vocab_size: 100,
            hidden_size: 64,
            intermediate_size: 160,
            num_layers: 2,
            num_heads: 8,
            num_kv_heads: 4,
            head_dim: 8,
            rms_norm_eps: 1e-5,
            rope_theta: 10_000.0,
            rope_scaling: None,
            max_position_embeddings: 128,
            tie_word_embeddings: false,
        }
    }

    #[test]
    fn tp_must_divide_heads() {
        let cfg = tiny();
        assert!(cfg.validate_tp(1).is_ok());
        assert!(cfg.validate_tp(2).is_ok());
        assert!(cfg.validate_tp(4).is_ok());
        let err = cfg.validate_tp(3).unwrap_err().to_string();
        assert!(err.contains("valid tp values: 1, 2, 4"), "{err}");
        assert!(cfg.validate_tp(0).is_err());
        assert_eq!(cfg.reduce_parts(1), 4);
        assert_eq!(cfg.reduce_parts(2), 4);
        assert_eq!(cfg.reduce_parts(4), 4);
    }

    /// `config.json` of `tiny()` with `field` set to `value`; the error of loading it.
    fn hf_config_err(field: &str, value: serde_json::Value) -> String {
        let mut json = serde_json::json!({
            "architectures": ["LlamaForCausalLM"], "vocab_size": 100, "hidden_size": 64,
            "intermediate_size": 160, "num_hidden_layers": 2, "num_attention_heads": 8,
            "num_key_value_heads": 4, "head_dim": 128, "max_position_embeddings": 128
        });
        json[field] = value;
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("config.json"), json.to_string()).unwrap();
        match ModelConfig::from_hf_dir(dir.path()) {
            Ok(c) => panic!("{field}: accepted {c:?}"),
            Err(e) => format!("{e:#}"),
        }
    }

    #[test]
    fn absurd_hf_configs_are_refused_naming_the_field() {
        let cases: [(&str, serde_json::Value, &str); 10] = [
            (
                "hidden_size",
                (1u64 << 40).into(),
                "hidden_size is 1099511627776",
            ),
            ("num_attention_heads", 0.into(), "num_attention_heads is 0"),
            (
                "num_key_value_heads",
                3.into(),
                "not a multiple of 3 KV heads",
            ),
            ("vocab_size", 0.into(), "vocab_size is 0"),
            (
                "num_hidden_layers",
                (1u64 << 33).into(),
                "num_hidden_layers is 8589934592",
            ),
            ("head_dim", 7.into(), "head_dim 7 must be even"),
            (
                "max_position_embeddings",
                (1u64 << 24).into(),
                "RoPE table entries",
            ),
            ("rope_theta", (-1.0).into(), "rope_theta is -1"),
            ("hidden_size", (-5).into(), "hidden_size"),
            (
                "rope_scaling",
                serde_json::json!({"type": "linear", "factor": 0.0}),
                "rope_scaling.factor is 0",
            ),
        ];
        for (field, value, expected) in cases {
            let err = hf_config_err(field, value);
            assert!(err.contains(expected), "{field}: {err}");
            assert!(err.contains("config.json"), "{field}: {err}");
        }
    }

    #[test]
    fn unknown_architecture_is_named() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("config.json"),
            r#"{"architectures":["GPT2LMHeadModel"],"vocab_size":10,"hidden_size":8,
                "intermediate_size":8,"num_hidden_layers":1,"num_attention_heads":2}"#,
        )
        .unwrap();
        let err = format!("{:#}", ModelConfig::from_hf_dir(dir.path()).unwrap_err());
        assert!(err.contains("GPT2LMHeadModel"), "{err}");
        assert!(err.contains("config.json"), "{err}");
    }
}
