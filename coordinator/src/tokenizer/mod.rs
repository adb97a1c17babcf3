//! Text <-> token ids, and chat prompts, for the coordinator.
//!
//! The coordinator owns all text handling (workers only ever see token ids), so it needs the
//! model's exact tokenizer and chat template. Models come in two shapes:
//!
//! * a single `.gguf` file, which carries no `tokenizer.json`; the tokenizer is rebuilt from its
//!   `tokenizer.ggml.*` metadata ([`gguf`]), and the chat template is `tokenizer.chat_template`;
//! * a Hugging Face model directory: `tokenizer.json` (required), and optionally
//!   `tokenizer_config.json` (`chat_template`, `bos_token`, `eos_token`, `add_bos_token`),
//!   `chat_template.jinja` / `chat_template.json` (newer transformers save the template there),
//!   `generation_config.json` and `config.json` (`eos_token_id` / `bos_token_id`).
//!
//! Both end up as one [`TextTokenizer`] wrapping a [`tokenizers::Tokenizer`], so the rest of the
//! coordinator does not care where the model came from.
//!
//! BOS handling is explicit rather than left to a `tokenizer.json` post-processor: [`TextTokenizer::encode`]
//! prepends BOS exactly when the model asks for it (`tokenizer.ggml.add_bos_token`,
//! `add_bos_token` in `tokenizer_config.json`, or, failing both, whether the `tokenizer.json`
//! post-processor would add it), and never doubles a BOS the text (e.g. a rendered chat template)
//! already starts with. EOS ids are the union of every source, since models list stop tokens in
//! different files (e.g. `<|eot_id|>` only in `generation_config.json`).

mod bytes;
pub mod chat_template;
pub mod gguf;

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use helios_proto::LoadFormat;
use serde_json::Value as Json;

pub use bytes::{Spelling, TokenSpeller};
pub use chat_template::{ChatMessage, ChatTemplate};

/// The chat template slot of a model.
#[derive(Debug)]
enum TemplateSlot {
    /// The model ships no chat template.
    Missing,
    /// A compiled template (boxed: an environment is large and models without one are common).
    Ready(Box<ChatTemplate>),
    /// The model ships a template that minijinja cannot compile; the error is reported when a chat
    /// prompt is requested, so plain completions still work.
    Broken(String),
}

/// A model's tokenizer, special tokens and chat template.
pub struct TextTokenizer {
    tokenizer: tokenizers::Tokenizer,
    add_bos: bool,
    bos_token_id: Option<u32>,
    eos_token_ids: Vec<u32>,
    bos_token: Option<String>,
    eos_token: Option<String>,
    chat_template: TemplateSlot,
    vocab_size: usize,
    source: PathBuf,
    /// Read from the decoder when a token's bytes are first asked for.
    speller: std::sync::OnceLock<TokenSpeller>,
}

impl std::fmt::Debug for TextTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TextTokenizer")
            .field("source", &self.source)
            .field("vocab_size", &self.vocab_size)
            .field("add_bos", &self.add_bos)
            .field("bos_token_id", &self.bos_token_id)
            .field("eos_token_ids", &self.eos_token_ids)
            .field("has_chat_template", &self.has_chat_template())
            .finish()
    }
}

impl TextTokenizer {
    /// The bytes token `id` stands for (see [`bytes`]): its vocabulary entry read in the
    /// model's spelling, or, where that cannot be read (an added token), its text; empty for an
    /// id the vocabulary lacks.
    pub fn token_bytes(&self, id: u32) -> Vec<u8> {
        let Some(entry) = self.tokenizer.id_to_token(id) else {
            return Vec::new();
        };
        let speller = self
            .speller
            .get_or_init(|| TokenSpeller::new(&self.tokenizer));
        match speller.bytes(&entry) {
            b if b.is_empty() => entry.into_bytes(),
            b => b,
        }
    }

    /// Loads the tokenizer of a model.
    ///
    /// `path` is a `.gguf` file or an HF model directory (`tokenizer.json`, optional
    /// `tokenizer_config.json` for `chat_template` / `bos_token` / `eos_token` / `add_bos_token`,
    /// optional `generation_config.json` and `config.json` for EOS ids). A path to a
    /// `tokenizer.json` file is taken to mean its directory.
    pub fn from_model_path(path: &Path) -> Result<Self> {
        let meta = std::fs::metadata(path)
            .with_context(|| format!("model path {} is not accessible", path.display()))?;
        if meta.is_dir() {
            Self::from_hf_dir(path)
        } else if path.file_name().and_then(|n| n.to_str()) == Some("tokenizer.json") {
            let dir = match path.parent() {
                Some(p) if !p.as_os_str().is_empty() => p,
                _ => Path::new("."),
            };
            Self::from_hf_dir(dir)
        } else {
            Self::from_gguf(path)
        }
    }

    /// The tokenizer for serving `path` loaded as `format`: the model's own, or for dummy
    /// weights of a model that ships none (a lone `config.json`), a [`Self::placeholder`].
    pub fn for_serving(path: &Path, format: LoadFormat) -> Result<Self> {
        let config = if path.is_dir() {
            path.join("config.json")
        } else {
            path.to_path_buf()
        };
        let has_own = path.is_dir() && path.join("tokenizer.json").is_file();
        let is_config = config.file_name().is_some_and(|n| n == "config.json");
        match format {
            LoadFormat::Dummy if !has_own && is_config => Self::placeholder(&config),
            _ => Self::from_model_path(path),
        }
    }

    /// A stand-in for a model that ships no tokenizer (random weights from a `config.json`:
    /// `--load-format dummy`): its vocabulary is the words `w0` .. `w{V-1}` of the config's
    /// `vocab_size`, split on whitespace, any other word being `w0`; BOS/EOS come from the
    /// config's `bos_token_id` / `eos_token_id`. Enough to serve load over the real text path.
    pub fn placeholder(config_json: &Path) -> Result<Self> {
        let config = read_json_opt(config_json)?
            .with_context(|| format!("{} not found", config_json.display()))?;
        let vocab_size = config
            .get("vocab_size")
            .and_then(Json::as_u64)
            .filter(|&v| v > 0 && v <= u32::MAX as u64)
            .with_context(|| format!("{}: no valid vocab_size", config_json.display()))?
            as usize;
        let vocab: serde_json::Map<String, Json> = (0..vocab_size)
            .map(|i| (format!("w{i}"), Json::from(i)))
            .collect();
        let spec = serde_json::json!({
            "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
            "normalizer": null, "pre_tokenizer": {"type": "WhitespaceSplit"},
            "post_processor": null, "decoder": null,
            "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "w0"},
        });
        let tokenizer: tokenizers::Tokenizer = spec
            .to_string()
            .parse()
            .map_err(|e| anyhow!("{e}"))
            .context("building the placeholder tokenizer")?;
        let ids = |key: &str| json_ids(config.get(key).cloned());
        let bos_token_id = ids("bos_token_id").first().copied();
        let eos_token_ids = ids("eos_token_id");
        check_ids_in_vocab(config_json, bos_token_id, &eos_token_ids, vocab_size)?;
        Ok(Self {
            tokenizer,
            add_bos: bos_token_id.is_some(),
            bos_token_id,
            bos_token: bos_token_id.map(|i| format!("w{i}")),
            eos_token: eos_token_ids.first().map(|i| format!("w{i}")),
            eos_token_ids,
            chat_template: TemplateSlot::Missing,
            vocab_size,
            source: config_json.to_path_buf(),
            speller: Default::default(),
        })
    }

    /// Loads the tokenizer described by a GGUF file's metadata.
    fn from_gguf(path: &Path) -> Result<Self> {
        let g = gguf::load(path)?;
        let chat_template = TemplateSlot::from_source(g.chat_template, path);
        let vocab_size = g.vocab_size.max(full_vocab_size(&g.tokenizer));
        Ok(Self {
            tokenizer: g.tokenizer,
            add_bos: g.add_bos && g.bos_token_id.is_some(),
            bos_token_id: g.bos_token_id,
            eos_token_ids: g.eos_token_ids,
            bos_token: g.bos_token,
            eos_token: g.eos_token,
            chat_template,
            vocab_size,
            source: path.to_path_buf(),
            speller: Default::default(),
        })
    }

    /// Loads a Hugging Face model directory.
    fn from_hf_dir(dir: &Path) -> Result<Self> {
        let tokenizer_path = dir.join("tokenizer.json");
        if !tokenizer_path.is_file() {
            bail!(
                "{} has no tokenizer.json (SentencePiece-only tokenizer.model files are not \
                 supported; convert the tokenizer with transformers first)",
                dir.display()
            );
        }
        let tokenizer = tokenizers::Tokenizer::from_file(&tokenizer_path)
            .map_err(|e| anyhow!("{e}"))
            .with_context(|| format!("loading {}", tokenizer_path.display()))?;
        let tok_config = read_json_opt(&dir.join("tokenizer_config.json"))?;
        let gen_config = read_json_opt(&dir.join("generation_config.json"))?;
        let model_config = read_json_opt(&dir.join("config.json"))?;
        let field = |cfg: &Option<Json>, key: &str| cfg.as_ref().and_then(|c| c.get(key)).cloned();

        // Special-token texts, as tokenizer_config.json spells them (a string or an AddedToken
        // object with a `content` field).
        let token_text = |key: &str| -> Option<String> {
            match field(&tok_config, key)? {
                Json::String(s) => Some(s),
                Json::Object(o) => o.get("content")?.as_str().map(str::to_string),
                _ => None,
            }
        };
        let bos_text = token_text("bos_token");
        let eos_text = token_text("eos_token");

        let mut eos_token_ids = Vec::new();
        for cfg in [&gen_config, &model_config] {
            for id in json_ids(field(cfg, "eos_token_id")) {
                if !eos_token_ids.contains(&id) {
                    eos_token_ids.push(id);
                }
            }
        }
        if let Some(id) = eos_text.as_deref().and_then(|t| tokenizer.token_to_id(t)) {
            if !eos_token_ids.contains(&id) {
                eos_token_ids.push(id);
            }
        }

        let bos_token_id = bos_text
            .as_deref()
            .and_then(|t| tokenizer.token_to_id(t))
            .or_else(|| {
                json_ids(field(&gen_config, "bos_token_id"))
                    .first()
                    .copied()
            })
            .or_else(|| {
                json_ids(field(&model_config, "bos_token_id"))
                    .first()
                    .copied()
            });
        let vocab_size = full_vocab_size(&tokenizer);
        check_ids_in_vocab(dir, bos_token_id, &eos_token_ids, vocab_size)?;
        let bos_token = bos_text.or_else(|| bos_token_id.and_then(|id| tokenizer.id_to_token(id)));
        let eos_token = eos_text.or_else(|| {
            eos_token_ids
                .first()
                .and_then(|&id| tokenizer.id_to_token(id))
        });

        let add_bos = match field(&tok_config, "add_bos_token").and_then(|v| v.as_bool()) {
            Some(flag) => flag,
            None => post_processor_adds_bos(&tokenizer, bos_token_id),
        } && bos_token_id.is_some();

        let template = chat_template_from_dir(dir, tok_config.as_ref())?;
        let chat_template = TemplateSlot::from_source(template, dir);
        Ok(Self {
            tokenizer,
            add_bos,
            bos_token_id,
            eos_token_ids,
            bos_token,
            eos_token,
            chat_template,
            vocab_size,
            source: dir.to_path_buf(),
            speller: Default::default(),
        })
    }

    /// Token ids of `text`. Special-token texts in `text` (e.g. `<|im_start|>`) become their ids.
    /// Adds BOS only when the model says `add_bos`, and not when the text already starts with it.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let encoding = self
            .tokenizer
            .encode_fast(text, false)
            .map_err(|e| anyhow!("tokenizing {} bytes of text: {e}", text.len()))?;
        let mut ids = encoding.get_ids().to_vec();
        if let (true, Some(bos)) = (self.add_bos, self.bos_token_id) {
            if ids.first() != Some(&bos) {
                ids.insert(0, bos);
            }
        }
        Ok(ids)
    }

    /// Text of `ids`, skipping special tokens.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.tokenizer
            .decode(ids, true)
            .map_err(|e| anyhow!("detokenizing {} ids: {e}", ids.len()))
    }

    /// Renders a conversation with the model's chat template (see [`chat_template`]).
    pub fn apply_chat_template(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String> {
        self.apply_chat_template_with_tools(messages, None, add_generation_prompt)
    }

    /// Whether the model's chat template renders `tools` itself.
    pub fn chat_template_takes_tools(&self) -> bool {
        matches!(&self.chat_template, TemplateSlot::Ready(t) if t.takes_tools())
    }

    /// [`Self::apply_chat_template`] with OpenAI's `tools` in the template's context.
    pub fn apply_chat_template_with_tools(
        &self,
        messages: &[ChatMessage],
        tools: Option<&[serde_json::Value]>,
        add_generation_prompt: bool,
    ) -> Result<String> {
        match &self.chat_template {
            TemplateSlot::Ready(t) => t
                .render_with_tools(
                    messages,
                    tools,
                    add_generation_prompt,
                    self.bos_token.as_deref(),
                    self.eos_token.as_deref(),
                )
                .with_context(|| format!("chat template of {}", self.source.display())),
            TemplateSlot::Broken(e) => bail!(
                "the chat template of {} cannot be used: {e}",
                self.source.display()
            ),
            TemplateSlot::Missing => bail!(
                "{} has no chat template; send a plain prompt instead of chat messages",
                self.source.display()
            ),
        }
    }

    /// Whether the model ships a chat template (even one that failed to compile).
    pub fn has_chat_template(&self) -> bool {
        !matches!(self.chat_template, TemplateSlot::Missing)
    }

    /// Token ids that end generation.
    pub fn eos_token_ids(&self) -> &[u32] {
        &self.eos_token_ids
    }

    /// The BOS token id, if the model has one.
    pub fn bos_token_id(&self) -> Option<u32> {
        self.bos_token_id
    }

    /// Vocabulary size, including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// The underlying Hugging Face tokenizer (e.g. for incremental detokenization).
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.tokenizer
    }
}

impl TemplateSlot {
    fn from_source(source: Option<String>, origin: &Path) -> Self {
        match source {
            None => Self::Missing,
            Some(s) => match ChatTemplate::new(s) {
                Ok(t) => Self::Ready(Box::new(t)),
                Err(e) => {
                    tracing::warn!(
                        model = %origin.display(),
                        error = %format!("{e:#}"),
                        "chat template does not compile; chat requests will fail"
                    );
                    Self::Broken(format!("{e:#}"))
                }
            },
        }
    }
}

/// Number of ids the tokenizer can produce: the largest id + 1 (covers holes and duplicates).
fn full_vocab_size(tokenizer: &tokenizers::Tokenizer) -> usize {
    let max_id = tokenizer
        .get_vocab(true)
        .values()
        .copied()
        .max()
        .map_or(0, |m| m as usize + 1);
    max_id.max(tokenizer.get_vocab_size(true))
}

/// BOS and EOS ids from the JSON configs must name tokens: an id past the vocabulary could never
/// be sampled (generation would not stop) nor prepended meaningfully.
fn check_ids_in_vocab(dir: &Path, bos: Option<u32>, eos: &[u32], vocab_size: usize) -> Result<()> {
    let outside = |id: u32| id as usize >= vocab_size;
    if let Some(id) = bos.filter(|&id| outside(id)) {
        bail!(
            "{}: bos_token_id {id} is outside the vocabulary of {vocab_size} tokens",
            dir.display()
        );
    }
    if let Some(id) = eos.iter().copied().find(|&id| outside(id)) {
        bail!(
            "{}: eos_token_id {id} (generation_config.json / config.json) is outside the \
             vocabulary of {vocab_size} tokens",
            dir.display()
        );
    }
    Ok(())
}

/// Whether `tokenizer.json`'s post-processor prepends BOS (used when `add_bos_token` is unset).
fn post_processor_adds_bos(tokenizer: &tokenizers::Tokenizer, bos: Option<u32>) -> bool {
    let Some(bos) = bos else { return false };
    let with = tokenizer.encode_fast("a", true);
    let without = tokenizer.encode_fast("a", false);
    match (with, without) {
        (Ok(w), Ok(wo)) => w.get_ids().first() == Some(&bos) && wo.get_ids().first() != Some(&bos),
        _ => false,
    }
}

/// Reads a JSON file if it exists; a file that exists but does not parse is an error.
fn read_json_opt(path: &Path) -> Result<Option<Json>> {
    if !path.is_file() {
        return Ok(None);
    }
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text)
        .map(Some)
        .with_context(|| format!("parsing {}", path.display()))
}

/// Token ids from a config value that is an integer or a list of integers.
fn json_ids(v: Option<Json>) -> Vec<u32> {
    match v {
        Some(Json::Number(n)) => n
            .as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .into_iter()
            .collect(),
        Some(Json::Array(items)) => items
            .iter()
            .filter_map(|n| n.as_u64().and_then(|n| u32::try_from(n).ok()))
            .collect(),
        _ => Vec::new(),
    }
}

/// The chat template of an HF directory: `tokenizer_config.json`'s `chat_template` (a string, or a
/// list of `{name, template}` from which "default" is taken), else `chat_template.jinja`, else
/// `chat_template.json`'s `chat_template`.
fn chat_template_from_dir(dir: &Path, tok_config: Option<&Json>) -> Result<Option<String>> {
    if let Some(v) = tok_config.and_then(|c| c.get("chat_template")) {
        let config_path = dir.join("tokenizer_config.json");
        return template_from_json(v)
            .with_context(|| format!("`chat_template` in {}", config_path.display()));
    }
    let jinja = dir.join("chat_template.jinja");
    if jinja.is_file() {
        return std::fs::read_to_string(&jinja)
            .map(Some)
            .with_context(|| format!("reading {}", jinja.display()));
    }
    let json_path = dir.join("chat_template.json");
    if let Some(j) = read_json_opt(&json_path)? {
        if let Some(v) = j.get("chat_template") {
            return template_from_json(v)
                .with_context(|| format!("`chat_template` in {}", json_path.display()));
        }
    }
    Ok(None)
}

/// A `chat_template` value: a string, null, or a list of `{name, template}` (pick "default").
fn template_from_json(v: &Json) -> Result<Option<String>> {
    match v {
        Json::Null => Ok(None),
        Json::String(s) => Ok(Some(s.clone())),
        Json::Array(items) => {
            let mut names = Vec::new();
            for item in items {
                let name = item.get("name").and_then(Json::as_str);
                let template = item.get("template").and_then(Json::as_str);
                match (name, template) {
                    (Some("default"), Some(t)) => return Ok(Some(t.to_string())),
                    (Some(n), Some(_)) => names.push(n.to_string()),
                    _ => bail!("a list entry is not an object with string `name` and `template`"),
                }
            }
            bail!("a list of named templates ({names:?}) without one named \"default\"")
        }
        _ => bail!("expected a string or a list of {{name, template}} objects"),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::sync::OnceLock;

    const SMOLLM2: &str = "models/SmolLM2-135M-Instruct.Q4_1.gguf";

    /// The default model; the tests fail (not skip) when it is missing.
    fn smollm2_path() -> PathBuf {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("..")
            .join(SMOLLM2);
        assert!(
            path.is_file(),
            "{} is missing: run `bash scripts/fetch-model.sh` in the repository root first",
            path.display()
        );
        path
    }

    pub(crate) fn smollm2() -> &'static TextTokenizer {
        static TOKENIZER: OnceLock<TextTokenizer> = OnceLock::new();
        TOKENIZER.get_or_init(|| {
            TextTokenizer::from_model_path(&smollm2_path()).expect("loading the SmolLM2 tokenizer")
        })
    }

    const ROUND_TRIP_TEXTS: [&str; 7] = [
        "Hello, world! The quick brown fox.",
        "café naïve",
        "日本語のテキスト",
        "emoji 🦀🚀",
        "  multiple   spaces\n\nnewlines\t\ttabs",
        "12345",
        "",
    ];

    #[test]
    fn smollm2_round_trips_text() {
        let tok = smollm2();
        for text in ROUND_TRIP_TEXTS {
            let ids = tok.encode(text).unwrap();
            assert_eq!(tok.decode(&ids).unwrap(), text, "ids {ids:?}");
        }
    }

    /// The rendered SmolLM2 prompt for one user question (see `smollm2_chat_template_...`).
    const SMOLLM2_PROMPT: &str =
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, \
        trained by Hugging Face<|im_end|>\n<|im_start|>user\nWhat is the capital of France?\
        <|im_end|>\n<|im_start|>assistant\n";

    #[test]
    fn smollm2_ids_match_reference_tokenizer() {
        // Golden ids produced once with
        //   python3 tests/reference/gguf_tokenize.py \
        //       --gguf models/SmolLM2-135M-Instruct.Q4_1.gguf --texts-json texts.json
        // (transformers 5.24.0, tokenizers 0.23.3, gguf 0.19.0), texts.json holding these texts.
        let cases: [(&str, &[u32]); 10] = [
            ("Hello, world!", &[19556, 28, 905, 17]),
            ("café naïve", &[83, 1939, 2756, 15486, 46494]),
            (
                "日本語のテキスト",
                &[
                    23274, 115, 40993, 179, 120, 248, 26453, 11100, 224, 10391, 251, 10391, 134,
                    11100, 226,
                ],
            ),
            (
                "emoji 🦀🚀",
                &[391, 33777, 15107, 116, 218, 10813, 244, 218],
            ),
            (
                "  multiple   spaces\n\nnewlines\t\ttabs",
                &[
                    216, 2701, 256, 5600, 198, 198, 2241, 5110, 197, 197, 100, 7366,
                ],
            ),
            ("12345", &[33, 34, 35, 36, 37]),
            ("<|im_start|>user\nHi<|im_end|>", &[1, 4093, 198, 26843, 2]),
            (
                "The year 2024 had 366 days.",
                &[
                    504, 713, 216, 34, 32, 34, 36, 761, 216, 35, 38, 38, 2009, 30,
                ],
            ),
            ("don't stop", &[12420, 982, 2853]),
            (
                SMOLLM2_PROMPT,
                &[
                    1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28,
                    7018, 411, 407, 19712, 8182, 2, 198, 1, 4093, 198, 1780, 314, 260, 3575, 282,
                    4649, 47, 2, 198, 1, 520, 9531, 198,
                ],
            ),
        ];
        let tok = smollm2();
        for (text, expected) in cases {
            assert_eq!(tok.encode(text).unwrap(), expected, "text {text:?}");
        }
    }

    #[test]
    fn smollm2_digits_split_one_by_one() {
        let tok = smollm2();
        let ids = tok.encode("12345").unwrap();
        assert_eq!(ids.len(), 5);
        for (id, digit) in ids.iter().zip(["1", "2", "3", "4", "5"]) {
            assert_eq!(tok.decode(&[*id]).unwrap(), digit);
        }
    }

    #[test]
    fn smollm2_special_tokens_and_metadata() {
        let tok = smollm2();
        assert_eq!(tok.encode("<|im_start|>").unwrap(), [1]);
        assert_eq!(tok.encode("<|im_end|>").unwrap(), [2]);
        assert_eq!(tok.bos_token_id(), Some(1));
        assert_eq!(tok.eos_token_ids(), [2]);
        assert_eq!(tok.vocab_size(), 49152);
        assert_eq!(tok.inner().get_vocab_size(true), 49152);
        // add_bos_token is false: nothing is prepended.
        assert_eq!(tok.encode("Hello, world!").unwrap()[0], 19556);
        // Special tokens are skipped on decode.
        assert_eq!(tok.decode(&[1, 4093, 198, 26843, 2]).unwrap(), "user\nHi");
    }

    #[test]
    fn smollm2_chat_template_renders_exactly() {
        let tok = smollm2();
        assert!(tok.has_chat_template());
        let messages = [ChatMessage::new("user", "What is the capital of France?")];
        // The template inserts SmolLM's default system message when the first message is not a
        // system message; this string is what transformers' apply_chat_template renders.
        assert_eq!(
            tok.apply_chat_template(&messages, true).unwrap(),
            SMOLLM2_PROMPT
        );
        let without_prompt = tok.apply_chat_template(&messages, false).unwrap();
        assert_eq!(
            without_prompt,
            SMOLLM2_PROMPT.trim_end_matches("<|im_start|>assistant\n")
        );
        let with_system = [
            ChatMessage::new("system", "Be brief."),
            ChatMessage::new("user", "Hi"),
        ];
        assert_eq!(
            tok.apply_chat_template(&with_system, true).unwrap(),
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n\
             <|im_start|>assistant\n"
        );
    }

    #[test]
    fn hf_directory_with_configs() {
        let dir = tempfile::tempdir().unwrap();
        smollm2()
            .inner()
            .save(dir.path().join("tokenizer.json"), false)
            .unwrap();
        let write = |name: &str, json: serde_json::Value| {
            std::fs::write(dir.path().join(name), json.to_string()).unwrap();
        };
        write(
            "tokenizer_config.json",
            serde_json::json!({
                "bos_token": {"content": "<|im_start|>", "special": true},
                "eos_token": "<|im_end|>",
                "add_bos_token": true,
                "chat_template": [
                    {"name": "tool_use", "template": "TOOLS"},
                    {"name": "default", "template": "{{ bos_token }}{% for m in messages %}{{ m.content }}{{ eos_token }}{% endfor %}"}
                ]
            }),
        );
        write(
            "generation_config.json",
            serde_json::json!({"eos_token_id": [0, 2]}),
        );
        write(
            "config.json",
            serde_json::json!({"eos_token_id": 2, "bos_token_id": 1}),
        );

        let tok = TextTokenizer::from_model_path(dir.path()).unwrap();
        assert_eq!(tok.eos_token_ids(), [0, 2]);
        assert_eq!(tok.bos_token_id(), Some(1));
        assert_eq!(tok.vocab_size(), 49152);
        // add_bos_token is honoured, and a BOS already at the start is not doubled.
        assert_eq!(
            tok.encode("Hello, world!").unwrap(),
            [1, 19556, 28, 905, 17]
        );
        assert_eq!(tok.encode("<|im_start|>user").unwrap(), [1, 4093]);
        assert_eq!(
            tok.apply_chat_template(&[ChatMessage::new("user", "x")], false)
                .unwrap(),
            "<|im_start|>x<|im_end|>"
        );
        // A path to tokenizer.json means its directory.
        let via_file = TextTokenizer::from_model_path(&dir.path().join("tokenizer.json")).unwrap();
        assert_eq!(via_file.eos_token_ids(), [0, 2]);
    }

    #[test]
    fn hf_directory_without_template_or_tokenizer() {
        let dir = tempfile::tempdir().unwrap();
        let err = TextTokenizer::from_model_path(dir.path()).unwrap_err();
        assert!(format!("{err:#}").contains("no tokenizer.json"), "{err:#}");

        smollm2()
            .inner()
            .save(dir.path().join("tokenizer.json"), false)
            .unwrap();
        let tok = TextTokenizer::from_model_path(dir.path()).unwrap();
        assert!(!tok.has_chat_template());
        assert_eq!(tok.eos_token_ids(), [] as [u32; 0]);
        let err = tok
            .apply_chat_template(&[ChatMessage::new("user", "x")], true)
            .unwrap_err();
        assert!(format!("{err:#}").contains("no chat template"), "{err:#}");

        std::fs::write(dir.path().join("tokenizer_config.json"), "{not json").unwrap();
        let err = TextTokenizer::from_model_path(dir.path()).unwrap_err();
        assert!(
            format!("{err:#}").contains("tokenizer_config.json"),
            "{err:#}"
        );
    }

    #[test]
    fn hostile_hf_tokenizer_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let tokenizer_json = dir.path().join("tokenizer.json");
        for garbage in [&b"{not json"[..], b"\xff\xfe\x00", b"{\"model\": 7}", b"[]"] {
            std::fs::write(&tokenizer_json, garbage).unwrap();
            let err = TextTokenizer::from_model_path(dir.path()).unwrap_err();
            assert!(format!("{err:#}").contains("tokenizer.json"), "{err:#}");
        }

        smollm2().inner().save(&tokenizer_json, false).unwrap();
        std::fs::write(
            dir.path().join("generation_config.json"),
            r#"{"eos_token_id": [2, 4000000000]}"#,
        )
        .unwrap();
        let err = format!(
            "{:#}",
            TextTokenizer::from_model_path(dir.path()).unwrap_err()
        );
        assert!(err.contains("eos_token_id 4000000000"), "{err}");
        std::fs::write(
            dir.path().join("generation_config.json"),
            r#"{"bos_token_id": 49152}"#,
        )
        .unwrap();
        let err = format!(
            "{:#}",
            TextTokenizer::from_model_path(dir.path()).unwrap_err()
        );
        assert!(err.contains("bos_token_id 49152"), "{err}");
    }

    #[test]
    fn broken_template_fails_only_chat_requests() {
        let dir = tempfile::tempdir().unwrap();
        smollm2()
            .inner()
            .save(dir.path().join("tokenizer.json"), false)
            .unwrap();
        std::fs::write(
            dir.path().join("chat_template.jinja"),
            "{% for m in messages %}",
        )
        .unwrap();
        let tok = TextTokenizer::from_model_path(dir.path()).unwrap();
        assert!(tok.has_chat_template());
        assert_eq!(tok.encode("Hi").unwrap(), [26843]);
        let err = tok.apply_chat_template(&[], true).unwrap_err();
        assert!(format!("{err:#}").contains("cannot be used"), "{err:#}");
    }

    #[test]
    fn bad_paths_and_files_are_errors_naming_the_file() {
        let missing = Path::new("/nonexistent/helios/model.gguf");
        let err = TextTokenizer::from_model_path(missing).unwrap_err();
        assert!(
            format!("{err:#}").contains("/nonexistent/helios/model.gguf"),
            "{err:#}"
        );

        let dir = tempfile::tempdir().unwrap();
        let garbage = dir.path().join("garbage.gguf");
        std::fs::write(&garbage, b"this is not a gguf file at all").unwrap();
        let err = TextTokenizer::from_model_path(&garbage).unwrap_err();
        assert!(format!("{err:#}").contains("garbage.gguf"), "{err:#}");

        // The first 64 KiB of the real file: the header is cut off inside the token list.
        let truncated = dir.path().join("truncated.gguf");
        let bytes = std::fs::read(smollm2_path()).unwrap();
        std::fs::write(&truncated, &bytes[..64 * 1024]).unwrap();
        let err = TextTokenizer::from_model_path(&truncated).unwrap_err();
        assert!(format!("{err:#}").contains("truncated.gguf"), "{err:#}");

        let empty = dir.path().join("empty.gguf");
        std::fs::write(&empty, b"").unwrap();
        let err = TextTokenizer::from_model_path(&empty).unwrap_err();
        assert!(format!("{err:#}").contains("empty.gguf"), "{err:#}");
    }
}
