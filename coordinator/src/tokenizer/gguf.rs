//! Rebuilding a Hugging Face [`tokenizers::Tokenizer`] from the metadata of a GGUF file.
//!
//! A GGUF file carries no `tokenizer.json`: llama.cpp stores the vocabulary, the merges, the token
//! types and the special-token ids as `tokenizer.ggml.*` metadata keys. This module turns those keys
//! back into the tokenizer the model was trained with, so the coordinator can serve a single `.gguf`
//! file without any sidecar files. The construction follows Hugging Face transformers' GGUF
//! converter (`transformers.integrations.gguf.gguf_tokenizer_mapping`), which is also the oracle the
//! tests compare against (`tests/reference/gguf_tokenize.py`), and llama.cpp where the two differ.
//!
//! Supported `tokenizer.ggml.model` values:
//!
//! * `gpt2`: byte-level BPE (SmolLM2, Llama 3, Qwen 2, StarCoder, ...). Vocabulary and merges come
//!   straight from the file. The pre-tokenizer is chosen from `tokenizer.ggml.pre`:
//!   * `smollm`, `starcoder`, `refact`, `command-r`, `codeshell`, `exaone`, `minerva`:
//!     `Sequence[Digits(individual_digits), ByteLevel(add_prefix_space=false, use_regex=true)]`,
//!     which is what these models' own `tokenizer.json` files use (every digit is its own piece);
//!   * the Llama 3 family (`llama3`, `llama-v3`, `llama-bpe`, `falcon3`, `dbrx`, `smaug-bpe`,
//!     `pixtral`, ...): the Llama 3 split regex, then `ByteLevel` without its own regex;
//!   * the Qwen 2 family (`qwen2`, `deepseek-r1-qwen`, ...): the Qwen 2 split regex, then `ByteLevel`;
//!   * `gpt-2`, `default`, a missing key, and any other value: plain GPT-2 `ByteLevel` with its
//!     built-in regex (a warning is logged for values not listed here, as their split rule may
//!     differ slightly from GPT-2's).
//!
//!   The decoder is `ByteLevel`.
//! * `llama`: SentencePiece BPE with scores (Llama 2, SOLAR, Mistral v0.1, ...). When the file has no
//!   merges (the usual case) they are derived from the scores exactly as transformers'
//!   `generate_merges` does; see [`merges_from_scores`]. The model uses `byte_fallback`, the
//!   normalizer is `Sequence[Prepend("▁"), Replace(" ", "▁")]` (the prepend is dropped when
//!   `tokenizer.ggml.add_space_prefix` is false) and the decoder is
//!   `Sequence[Replace("▁", " "), ByteFallback, Fuse, Strip(left 1)]`. This is the "legacy" Llama
//!   layout of the original `tokenizer.json` files; it prefixes a space to every run of text after a
//!   special token, which is also what llama.cpp does (transformers 5 prefixes only the first run).
//!
//! Any other model string (`t5`, `bert`, `rwkv`, ...) is rejected with an error naming it.
//!
//! Special tokens: tokens typed CONTROL (3) or UNKNOWN (2) become added *special* tokens, so text
//! such as `<|im_start|>` encodes to one id and `decode(.., skip_special_tokens)` drops them.
//! Tokens typed USER_DEFINED (4, e.g. `<think>`) become added tokens that are matched whole but are
//! *not* special: llama.cpp and transformers both print them on decode, so they are kept in output.

use std::collections::{HashMap, HashSet};
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use helios_gguf::Value;
use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::decoders::DecoderWrapper;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::normalizers::{Prepend, Replace, Sequence as NormalizerSequence};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence as PreTokenizerSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::{AddedToken, NormalizerWrapper, SplitDelimiterBehavior, Tokenizer};

/// `tokenizer.ggml.model`: which tokenizer family the file describes.
pub const KEY_MODEL: &str = "tokenizer.ggml.model";
/// `tokenizer.ggml.pre`: llama.cpp's name for the pre-tokenizer (split rule) of a BPE vocabulary.
pub const KEY_PRE: &str = "tokenizer.ggml.pre";
/// `tokenizer.ggml.tokens`: the vocabulary, indexed by token id.
pub const KEY_TOKENS: &str = "tokenizer.ggml.tokens";
/// `tokenizer.ggml.merges`: BPE merges as `"left right"` strings, best first.
pub const KEY_MERGES: &str = "tokenizer.ggml.merges";
/// `tokenizer.ggml.token_type`: one llama.cpp token type per token (see [`TokenType`]).
pub const KEY_TOKEN_TYPE: &str = "tokenizer.ggml.token_type";
/// `tokenizer.ggml.scores`: SentencePiece scores, one per token.
pub const KEY_SCORES: &str = "tokenizer.ggml.scores";
/// `tokenizer.ggml.bos_token_id`.
pub const KEY_BOS_ID: &str = "tokenizer.ggml.bos_token_id";
/// `tokenizer.ggml.eos_token_id`.
pub const KEY_EOS_ID: &str = "tokenizer.ggml.eos_token_id";
/// `tokenizer.ggml.eot_token_id`: llama.cpp's end-of-turn token, also a stop token.
pub const KEY_EOT_ID: &str = "tokenizer.ggml.eot_token_id";
/// `tokenizer.ggml.eom_token_id`: llama.cpp's end-of-message token, also a stop token.
pub const KEY_EOM_ID: &str = "tokenizer.ggml.eom_token_id";
/// `tokenizer.ggml.unknown_token_id`.
pub const KEY_UNK_ID: &str = "tokenizer.ggml.unknown_token_id";
/// `tokenizer.ggml.add_bos_token`: whether a BOS token is prepended when encoding.
pub const KEY_ADD_BOS: &str = "tokenizer.ggml.add_bos_token";
/// `tokenizer.ggml.add_space_prefix`: whether SentencePiece prefixes text with a space.
pub const KEY_ADD_SPACE_PREFIX: &str = "tokenizer.ggml.add_space_prefix";
/// `tokenizer.chat_template`: the model's Jinja chat template.
pub const KEY_CHAT_TEMPLATE: &str = "tokenizer.chat_template";

/// The longest token accepted, in bytes. Real vocabularies stay far below it; deriving merges
/// from scores costs the square of a token's length, so a file of megabyte-long tokens would
/// otherwise hold the coordinator for hours.
const MAX_TOKEN_LEN: usize = 4096;

/// The SentencePiece word-boundary marker (U+2581).
const SPIECE_UNDERLINE: &str = "\u{2581}";

/// `tokenizer.ggml.pre` values whose first split rule is one digit per piece.
const DIGIT_SPLIT_PRE: &[&str] = &[
    "smollm",
    "starcoder",
    "refact",
    "command-r",
    "codeshell",
    "exaone",
    "minerva",
];

/// `tokenizer.ggml.pre` values that use the Llama 3 split regex.
const LLAMA3_PRE: &[&str] = &[
    "llama3",
    "llama-v3",
    "llama-bpe",
    "falcon3",
    "falcon-h1",
    "pixtral",
    "midm-2.0",
    "lfm2",
    "dbrx",
    "smaug-bpe",
];

/// `tokenizer.ggml.pre` values that use the Qwen 2 split regex.
const QWEN2_PRE: &[&str] = &["qwen2", "deepseek-r1-qwen", "megrez"];

/// `tokenizer.ggml.pre` values for which plain GPT-2 `ByteLevel` splitting is exact.
const GPT2_PRE: &[&str] = &["gpt-2", "gpt2", "default"];

/// The Llama 3 pre-tokenizer split regex (as in its `tokenizer.json`).
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The Qwen 2 pre-tokenizer split regex (as in its `tokenizer.json`).
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// llama.cpp's token types (`tokenizer.ggml.token_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenType {
    /// 1: an ordinary vocabulary entry.
    Normal,
    /// 2: the unknown token.
    Unknown,
    /// 3: a control token such as `<s>` or `<|im_start|>`.
    Control,
    /// 4: a user-defined token, matched whole in text but printed on decode.
    UserDefined,
    /// 5: an unused slot.
    Unused,
    /// 6: a byte token such as `<0x0A>` (SentencePiece byte fallback).
    Byte,
    /// Any other value.
    Other(i64),
}

impl TokenType {
    fn from_i64(v: i64) -> Self {
        match v {
            1 => Self::Normal,
            2 => Self::Unknown,
            3 => Self::Control,
            4 => Self::UserDefined,
            5 => Self::Unused,
            6 => Self::Byte,
            other => Self::Other(other),
        }
    }
}

/// A tokenizer rebuilt from GGUF metadata, with what the file says about how to use it.
#[derive(Clone, Debug)]
pub struct GgufTokenizer {
    /// The tokenizer itself (no post-processor: BOS handling is left to the caller, see `add_bos`).
    pub tokenizer: Tokenizer,
    /// `tokenizer.ggml.model` as written in the file.
    pub model: String,
    /// `tokenizer.ggml.pre`, when present.
    pub pre: Option<String>,
    /// `tokenizer.ggml.bos_token_id`.
    pub bos_token_id: Option<u32>,
    /// `eos_token_id`, then `eot_token_id` and `eom_token_id` when present and different.
    pub eos_token_ids: Vec<u32>,
    /// `tokenizer.ggml.add_bos_token`; when absent, true for `llama` (SentencePiece) vocabularies,
    /// as llama.cpp and transformers assume, and false otherwise.
    pub add_bos: bool,
    /// The text of the BOS token, for chat templates.
    pub bos_token: Option<String>,
    /// The text of the first EOS token, for chat templates.
    pub eos_token: Option<String>,
    /// `tokenizer.chat_template`, when present.
    pub chat_template: Option<String>,
    /// Number of entries in `tokenizer.ggml.tokens`.
    pub vocab_size: usize,
}

/// Reads the metadata key/value section of a GGUF file (not the tensor data). The reader checks
/// every count and length against the file, so a hostile header is an error naming the key.
pub fn read_metadata(path: &Path) -> Result<HashMap<String, Value>> {
    Ok(helios_gguf::read_path(path)?.metadata)
}

/// Reads a GGUF file's metadata and builds its tokenizer; errors name the file.
pub fn load(path: &Path) -> Result<GgufTokenizer> {
    let metadata = read_metadata(path)?;
    tokenizer_from_metadata(&metadata)
        .with_context(|| format!("building the tokenizer described by {}", path.display()))
}

/// Builds the tokenizer described by GGUF metadata (`tokenizer.ggml.*`, `tokenizer.chat_template`).
///
/// Takes the metadata map rather than a file so that tests (and other loaders) can construct it in
/// memory.
pub fn tokenizer_from_metadata(md: &HashMap<String, Value>) -> Result<GgufTokenizer> {
    let model = get_str(md, KEY_MODEL)?
        .with_context(|| format!("no `{KEY_MODEL}` in GGUF metadata"))?
        .to_string();
    let pre = get_str(md, KEY_PRE)?.map(str::to_string);
    let tokens = get_str_array(md, KEY_TOKENS)?
        .with_context(|| format!("no `{KEY_TOKENS}` in GGUF metadata"))?;
    if tokens.is_empty() {
        bail!("`{KEY_TOKENS}` is empty");
    }
    if let Some((i, t)) = tokens
        .iter()
        .enumerate()
        .find(|(_, t)| t.len() > MAX_TOKEN_LEN)
    {
        bail!(
            "`{KEY_TOKENS}`[{i}] is {} bytes long; a token may have at most {MAX_TOKEN_LEN}",
            t.len()
        );
    }
    let token_types = match get_int_array(md, KEY_TOKEN_TYPE)? {
        Some(types) => {
            if types.len() != tokens.len() {
                bail!(
                    "`{KEY_TOKEN_TYPE}` has {} entries but `{KEY_TOKENS}` has {}",
                    types.len(),
                    tokens.len()
                );
            }
            types.into_iter().map(TokenType::from_i64).collect()
        }
        None => vec![TokenType::Normal; tokens.len()],
    };
    let token_id = |key: &str| -> Result<Option<u32>> {
        match get_u32(md, key)? {
            Some(id) if (id as usize) < tokens.len() => Ok(Some(id)),
            Some(id) => bail!(
                "`{key}` = {id} is outside the vocabulary of {} tokens",
                tokens.len()
            ),
            None => Ok(None),
        }
    };
    let bos_token_id = token_id(KEY_BOS_ID)?;
    let mut eos_token_ids = Vec::new();
    for key in [KEY_EOS_ID, KEY_EOT_ID, KEY_EOM_ID] {
        if let Some(id) = token_id(key)? {
            if !eos_token_ids.contains(&id) {
                eos_token_ids.push(id);
            }
        }
    }
    let unk_token_id = token_id(KEY_UNK_ID)?;

    let tokenizer = match model.as_str() {
        "gpt2" => build_byte_level(md, &tokens, &token_types, pre.as_deref())?,
        "llama" => build_sentencepiece_bpe(md, &tokens, &token_types, unk_token_id)?,
        other => bail!(
            "unsupported GGUF tokenizer model `{other}` (`{KEY_MODEL}`); supported: \"gpt2\" \
             (byte-level BPE) and \"llama\" (SentencePiece BPE)"
        ),
    };

    let add_bos = get_bool(md, KEY_ADD_BOS)?.unwrap_or(model == "llama");
    let chat_template = get_str(md, KEY_CHAT_TEMPLATE)?.map(str::to_string);
    let text_of = |id: Option<u32>| id.map(|id| tokens[id as usize].clone());
    Ok(GgufTokenizer {
        tokenizer,
        model,
        pre,
        bos_token_id,
        bos_token: text_of(bos_token_id),
        eos_token: text_of(eos_token_ids.first().copied()),
        eos_token_ids,
        add_bos,
        chat_template,
        vocab_size: tokens.len(),
    })
}

/// Byte-level BPE (`tokenizer.ggml.model = "gpt2"`).
fn build_byte_level(
    md: &HashMap<String, Value>,
    tokens: &[String],
    token_types: &[TokenType],
    pre: Option<&str>,
) -> Result<Tokenizer> {
    let raw_merges = get_str_array(md, KEY_MERGES)?
        .with_context(|| format!("byte-level BPE needs `{KEY_MERGES}`, which is missing"))?;
    let merges = raw_merges
        .iter()
        .enumerate()
        .map(|(i, m)| {
            m.split_once(' ')
                .map(|(l, r)| (l.to_string(), r.to_string()))
                .with_context(|| {
                    format!("`{KEY_MERGES}`[{i}] ({m:?}) is not two tokens split by a space")
                })
        })
        .collect::<Result<Vec<_>>>()?;

    // Every real token of a byte-level vocabulary is spelled in the 256-character byte alphabet.
    // Some converters store a few tokens as plain UTF-8 instead; respell those (as transformers
    // does) so the model can reach them.
    let alphabet = ByteLevel::alphabet();
    let in_alphabet = |t: &str| t.chars().all(|c| alphabet.contains(&c));
    let spelled: Vec<String> = tokens
        .iter()
        .map(|t| {
            if in_alphabet(t) {
                t.clone()
            } else {
                respell_byte_level(t)
            }
        })
        .collect();
    let vocab = vocab_map(&spelled);
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .build()
        .map_err(|e| anyhow!("building byte-level BPE model from `{KEY_MERGES}`: {e}"))?;
    let mut tokenizer = Tokenizer::new(bpe);
    tokenizer.with_pre_tokenizer(Some(byte_level_pre_tokenizer(pre)?));
    tokenizer.with_decoder(Some(DecoderWrapper::ByteLevel(ByteLevel::default())));

    // A control token outside the byte alphabet is a converter mislabel; transformers skips those
    // and so do we.
    let special: Vec<AddedToken> = tokens
        .iter()
        .zip(token_types)
        .filter(|(t, ty)| {
            matches!(ty, TokenType::Control | TokenType::Unknown) && in_alphabet(t) && !t.is_empty()
        })
        .map(|(t, _)| AddedToken::from(t.clone(), true))
        .collect();
    let user: Vec<AddedToken> = spelled
        .iter()
        .zip(token_types)
        .filter(|(t, ty)| **ty == TokenType::UserDefined && !t.is_empty())
        .map(|(t, _)| AddedToken::from(t.clone(), false).normalized(false))
        .collect();
    add_tokens(&mut tokenizer, special, user)?;
    Ok(tokenizer)
}

/// Writes a token stored as plain UTF-8 in the byte-level alphabet.
fn respell_byte_level(token: &str) -> String {
    token.bytes().map(byte_to_unicode).collect()
}

/// GPT-2's `bytes_to_unicode`: printable bytes map to themselves, the rest to U+0100 onwards.
pub(crate) fn byte_to_unicode(b: u8) -> char {
    let printable = |b: u8| (b'!'..=b'~').contains(&b) || (0xA1..=0xAC).contains(&b) || b >= 0xAE;
    if printable(b) {
        return char::from(b);
    }
    let offset = (0..b).filter(|&x| !printable(x)).count() as u32;
    char::from_u32(256 + offset).unwrap_or('\u{FFFD}')
}

/// The pre-tokenizer for a byte-level vocabulary, per `tokenizer.ggml.pre`.
fn byte_level_pre_tokenizer(pre: Option<&str>) -> Result<PreTokenizerWrapper> {
    let with_regex = |regex: &str| -> Result<PreTokenizerWrapper> {
        let split = Split::new(
            SplitPattern::Regex(regex.to_string()),
            SplitDelimiterBehavior::Isolated,
            false,
        )
        .map_err(|e| anyhow!("compiling the split regex for pre-tokenizer {pre:?}: {e}"))?;
        Ok(PreTokenizerWrapper::Sequence(PreTokenizerSequence::new(
            vec![
                PreTokenizerWrapper::Split(split),
                PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, false, false)),
            ],
        )))
    };
    let plain = || PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, true));
    match pre {
        Some(p) if DIGIT_SPLIT_PRE.contains(&p) => {
            Ok(PreTokenizerWrapper::Sequence(PreTokenizerSequence::new(
                vec![PreTokenizerWrapper::Digits(Digits::new(true)), plain()],
            )))
        }
        Some(p) if LLAMA3_PRE.contains(&p) => with_regex(LLAMA3_SPLIT),
        Some(p) if QWEN2_PRE.contains(&p) => with_regex(QWEN2_SPLIT),
        None => Ok(plain()),
        Some(p) if GPT2_PRE.contains(&p) => Ok(plain()),
        Some(p) => {
            tracing::warn!(
                pre = p,
                "unknown GGUF pre-tokenizer type; using GPT-2 byte-level splitting, which may \
                 split some text differently from the model's own tokenizer"
            );
            Ok(plain())
        }
    }
}

/// SentencePiece BPE with scores (`tokenizer.ggml.model = "llama"`).
fn build_sentencepiece_bpe(
    md: &HashMap<String, Value>,
    tokens: &[String],
    token_types: &[TokenType],
    unk_token_id: Option<u32>,
) -> Result<Tokenizer> {
    let merges = match get_str_array(md, KEY_MERGES)? {
        Some(raw) => raw
            .iter()
            .enumerate()
            .map(|(i, m)| {
                m.split_once(' ')
                    .map(|(l, r)| (l.to_string(), r.to_string()))
                    .with_context(|| {
                        format!("`{KEY_MERGES}`[{i}] ({m:?}) is not two tokens split by a space")
                    })
            })
            .collect::<Result<Vec<_>>>()?,
        None => {
            let scores = get_f32_array(md, KEY_SCORES)?.with_context(|| {
                format!("a SentencePiece vocabulary without `{KEY_MERGES}` needs `{KEY_SCORES}`")
            })?;
            if scores.len() != tokens.len() {
                bail!(
                    "`{KEY_SCORES}` has {} entries but `{KEY_TOKENS}` has {}",
                    scores.len(),
                    tokens.len()
                );
            }
            // A NaN score has no place in the ranking (and would break the sort's total order).
            if let Some(i) = scores.iter().position(|s| s.is_nan()) {
                bail!("`{KEY_SCORES}`[{i}] is NaN");
            }
            merges_from_scores(tokens, &scores)
        }
    };
    let mut builder = BPE::builder()
        .vocab_and_merges(vocab_map(tokens), merges)
        .byte_fallback(true)
        .fuse_unk(true);
    if let Some(id) = unk_token_id {
        builder = builder.unk_token(tokens[id as usize].clone());
    }
    let bpe = builder
        .build()
        .map_err(|e| anyhow!("building SentencePiece BPE model from `{KEY_MERGES}`: {e}"))?;
    let mut tokenizer = Tokenizer::new(bpe);

    let add_space_prefix = get_bool(md, KEY_ADD_SPACE_PREFIX)?.unwrap_or(true);
    let replace_space = Replace::new(" ", SPIECE_UNDERLINE)
        .map_err(|e| anyhow!("building the space normalizer: {e}"))?;
    let normalizer = if add_space_prefix {
        NormalizerWrapper::Sequence(NormalizerSequence::new(vec![
            NormalizerWrapper::Prepend(Prepend::new(SPIECE_UNDERLINE.to_string())),
            NormalizerWrapper::Replace(replace_space),
        ]))
    } else {
        NormalizerWrapper::Replace(replace_space)
    };
    tokenizer
        .with_normalizer(Some(normalizer))
        .map_err(|e| anyhow!("setting the normalizer: {e}"))?;

    let underline_to_space =
        Replace::new(SPIECE_UNDERLINE, " ").map_err(|e| anyhow!("building the decoder: {e}"))?;
    let mut decoders = vec![
        DecoderWrapper::Replace(underline_to_space),
        DecoderWrapper::ByteFallback(ByteFallback::default()),
        DecoderWrapper::Fuse(Fuse::default()),
    ];
    if add_space_prefix {
        decoders.push(DecoderWrapper::Strip(Strip::new(' ', 1, 0)));
    }
    tokenizer.with_decoder(Some(DecoderWrapper::Sequence(DecoderSequence::new(
        decoders,
    ))));

    let special: Vec<AddedToken> = tokens
        .iter()
        .zip(token_types)
        .filter(|(t, ty)| matches!(ty, TokenType::Control | TokenType::Unknown) && !t.is_empty())
        .map(|(t, _)| AddedToken::from(t.clone(), true))
        .collect();
    let user: Vec<AddedToken> = tokens
        .iter()
        .zip(token_types)
        .filter(|(t, ty)| **ty == TokenType::UserDefined && !t.is_empty())
        .map(|(t, _)| AddedToken::from(t.clone(), false).normalized(false))
        .collect();
    add_tokens(&mut tokenizer, special, user)?;
    Ok(tokenizer)
}

/// Registers special and user-defined tokens so the text of each is matched whole.
fn add_tokens(
    tokenizer: &mut Tokenizer,
    special: Vec<AddedToken>,
    user_defined: Vec<AddedToken>,
) -> Result<()> {
    tokenizer
        .add_special_tokens(special)
        .map_err(|e| anyhow!("adding special tokens: {e}"))?;
    tokenizer
        .add_tokens(user_defined)
        .map_err(|e| anyhow!("adding user-defined tokens: {e}"))?;
    Ok(())
}

/// token -> id; on a duplicated token the last id wins (as a Python dict comprehension does).
fn vocab_map(tokens: &[String]) -> Vocab {
    tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), i as u32))
        .collect()
}

/// Derives BPE merges from SentencePiece scores, as transformers' `generate_merges` does.
///
/// For every token (in vocabulary order, each distinct token once), every split into two pieces
/// that are both in the vocabulary is a merge, scored with the whole token's score; the splits of one
/// token are ordered by the ids of (left, right). All merges are then stably sorted by (score, left
/// length, right length), highest first, lengths in characters. Applying these merges
/// greedily by rank reproduces SentencePiece's "merge the best-scoring adjacent pair" algorithm.
pub fn merges_from_scores(tokens: &[String], scores: &[f32]) -> Vec<(String, String)> {
    let mut ids: HashMap<&str, u32> = HashMap::with_capacity(tokens.len());
    let mut last_score: HashMap<&str, f32> = HashMap::with_capacity(tokens.len());
    for (i, (t, &s)) in tokens.iter().zip(scores).enumerate() {
        ids.insert(t.as_str(), i as u32);
        last_score.insert(t.as_str(), s);
    }
    let mut seen: HashSet<&str> = HashSet::with_capacity(tokens.len());
    let mut merges: Vec<(&str, &str, f32)> = Vec::new();
    let mut local: Vec<(&str, &str, u32, u32)> = Vec::new();
    for token in tokens {
        let token = token.as_str();
        if !seen.insert(token) {
            continue;
        }
        let score = last_score.get(token).copied().unwrap_or(0.0);
        local.clear();
        for (idx, _) in token.char_indices().skip(1) {
            let (l, r) = token.split_at(idx);
            if let (Some(&il), Some(&ir)) = (ids.get(l), ids.get(r)) {
                local.push((l, r, il, ir));
            }
        }
        local.sort_by_key(|&(_, _, il, ir)| (il, ir));
        merges.extend(local.iter().map(|&(l, r, _, _)| (l, r, score)));
    }
    merges.sort_by(|a, b| {
        b.2.partial_cmp(&a.2)
            .unwrap_or(std::cmp::Ordering::Equal)
            .then_with(|| b.0.chars().count().cmp(&a.0.chars().count()))
            .then_with(|| b.1.chars().count().cmp(&a.1.chars().count()))
    });
    merges
        .into_iter()
        .map(|(l, r, _)| (l.to_string(), r.to_string()))
        .collect()
}

// ---- typed access to metadata values ------------------------------------------------------------

fn get_str<'a>(md: &'a HashMap<String, Value>, key: &str) -> Result<Option<&'a str>> {
    match md.get(key) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.as_str())),
        Some(v) => bail!("`{key}` should be a string, found {:?}", v.value_type()),
    }
}

fn get_bool(md: &HashMap<String, Value>, key: &str) -> Result<Option<bool>> {
    match md.get(key) {
        None => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(v) => match as_i64(v) {
            Some(i) => Ok(Some(i != 0)),
            None => bail!("`{key}` should be a bool, found {:?}", v.value_type()),
        },
    }
}

fn get_u32(md: &HashMap<String, Value>, key: &str) -> Result<Option<u32>> {
    match md.get(key) {
        None => Ok(None),
        Some(v) => {
            let i = as_i64(v).with_context(|| {
                format!("`{key}` should be an integer, found {:?}", v.value_type())
            })?;
            // Some converters write -1 for "no such token".
            if i < 0 {
                return Ok(None);
            }
            u32::try_from(i)
                .map(Some)
                .map_err(|_| anyhow!("`{key}` = {i} does not fit a token id"))
        }
    }
}

fn as_i64(v: &Value) -> Option<i64> {
    Some(match v {
        Value::U8(x) => i64::from(*x),
        Value::I8(x) => i64::from(*x),
        Value::U16(x) => i64::from(*x),
        Value::I16(x) => i64::from(*x),
        Value::U32(x) => i64::from(*x),
        Value::I32(x) => i64::from(*x),
        Value::U64(x) => i64::try_from(*x).ok()?,
        Value::I64(x) => *x,
        _ => return None,
    })
}

fn get_array<'a>(md: &'a HashMap<String, Value>, key: &str) -> Result<Option<&'a [Value]>> {
    match md.get(key) {
        None => Ok(None),
        Some(Value::Array(a)) => Ok(Some(a.as_slice())),
        Some(v) => bail!("`{key}` should be an array, found {:?}", v.value_type()),
    }
}

fn get_str_array(md: &HashMap<String, Value>, key: &str) -> Result<Option<Vec<String>>> {
    let Some(items) = get_array(md, key)? else {
        return Ok(None);
    };
    items
        .iter()
        .enumerate()
        .map(|(i, v)| match v {
            Value::String(s) => Ok(s.clone()),
            other => bail!(
                "`{key}`[{i}] should be a string, found {:?}",
                other.value_type()
            ),
        })
        .collect::<Result<Vec<_>>>()
        .map(Some)
}

fn get_int_array(md: &HashMap<String, Value>, key: &str) -> Result<Option<Vec<i64>>> {
    let Some(items) = get_array(md, key)? else {
        return Ok(None);
    };
    items
        .iter()
        .enumerate()
        .map(|(i, v)| {
            as_i64(v).with_context(|| {
                format!(
                    "`{key}`[{i}] should be an integer, found {:?}",
                    v.value_type()
                )
            })
        })
        .collect::<Result<Vec<_>>>()
        .map(Some)
}

fn get_f32_array(md: &HashMap<String, Value>, key: &str) -> Result<Option<Vec<f32>>> {
    let Some(items) = get_array(md, key)? else {
        return Ok(None);
    };
    items
        .iter()
        .enumerate()
        .map(|(i, v)| match v {
            Value::F32(x) => Ok(*x),
            Value::F64(x) => Ok(*x as f32),
            other => match as_i64(other) {
                Some(x) => Ok(x as f32),
                None => bail!(
                    "`{key}`[{i}] should be a number, found {:?}",
                    other.value_type()
                ),
            },
        })
        .collect::<Result<Vec<_>>>()
        .map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;
    use helios_gguf::test_util::{assert_mentions, error_chain};

    /// A tiny SentencePiece-style vocabulary: `<unk>`, `<s>`, `</s>`, the 256 byte tokens, a few
    /// scored pieces that can spell "hello" and "world", and a user-defined `<tool>`.
    fn synthetic_spm_metadata() -> HashMap<String, Value> {
        let mut toks: Vec<(String, f32, i32)> = vec![
            ("<unk>".into(), 0.0, 2),
            ("<s>".into(), 0.0, 3),
            ("</s>".into(), 0.0, 3),
        ];
        toks.extend((0..=255u8).map(|b| (format!("<0x{b:02X}>"), 0.0, 6)));
        let pieces: [(&str, f32); 19] = [
            ("▁", -100.0),
            ("h", -101.0),
            ("e", -102.0),
            ("l", -103.0),
            ("o", -104.0),
            ("w", -105.0),
            ("r", -106.0),
            ("d", -107.0),
            ("ll", -1.0),
            ("▁h", -2.0),
            ("or", -3.0),
            ("▁w", -4.0),
            ("ld", -5.0),
            ("▁he", -6.0),
            ("llo", -7.0),
            ("▁hello", -8.0),
            ("▁wor", -9.0),
            ("▁world", -10.0),
            ("he", -11.0),
        ];
        toks.extend(pieces.iter().map(|&(p, s)| (p.to_string(), s, 1)));
        toks.push(("<tool>".into(), 0.0, 4));

        let mut md = HashMap::new();
        md.insert(KEY_MODEL.into(), Value::String("llama".into()));
        md.insert(
            KEY_TOKENS.into(),
            Value::Array(toks.iter().map(|t| Value::String(t.0.clone())).collect()),
        );
        md.insert(
            KEY_SCORES.into(),
            Value::Array(toks.iter().map(|t| Value::F32(t.1)).collect()),
        );
        md.insert(
            KEY_TOKEN_TYPE.into(),
            Value::Array(toks.iter().map(|t| Value::I32(t.2)).collect()),
        );
        md.insert(KEY_BOS_ID.into(), Value::U32(1));
        md.insert(KEY_EOS_ID.into(), Value::U32(2));
        md.insert(KEY_UNK_ID.into(), Value::U32(0));
        md
    }

    fn tokens_of(md: &HashMap<String, Value>) -> Vec<String> {
        get_str_array(md, KEY_TOKENS).unwrap().unwrap()
    }

    #[test]
    fn spm_merges_follow_transformers_generate_merges() {
        let md = synthetic_spm_metadata();
        let tokens = tokens_of(&md);
        let scores = get_f32_array(&md, KEY_SCORES).unwrap().unwrap();
        let merges = merges_from_scores(&tokens, &scores);
        // Produced by transformers 5.24.0 `tokenization_utils_base.generate_merges(vocab,
        // dict(zip(tokens, scores)))` on the same vocabulary.
        let expected = [
            ("l", "l"),
            ("▁", "h"),
            ("o", "r"),
            ("▁", "w"),
            ("l", "d"),
            ("▁h", "e"),
            ("▁", "he"),
            ("ll", "o"),
            ("▁he", "llo"),
            ("▁w", "or"),
            ("▁wor", "ld"),
            ("h", "e"),
        ];
        let got: Vec<(&str, &str)> = merges
            .iter()
            .map(|(l, r)| (l.as_str(), r.as_str()))
            .collect();
        assert_eq!(got, expected);
    }

    #[test]
    fn spm_synthetic_vocab_encodes_to_expected_pieces_and_decodes_back() {
        let g = tokenizer_from_metadata(&synthetic_spm_metadata()).unwrap();
        assert_eq!(g.model, "llama");
        assert!(
            g.add_bos,
            "SentencePiece vocabularies add BOS unless told otherwise"
        );
        assert_eq!(g.bos_token_id, Some(1));
        assert_eq!(g.eos_token_ids, vec![2]);
        assert_eq!(g.bos_token.as_deref(), Some("<s>"));
        assert_eq!(g.eos_token.as_deref(), Some("</s>"));
        assert_eq!(g.vocab_size, 279);

        let tok = &g.tokenizer;
        let text = "hello world é<tool>!";
        let enc = tok.encode(text, false).unwrap();
        // Expected ids/pieces computed with the Python `tokenizers` library on the same pipeline
        // (BPE(byte_fallback) with the merges above, Prepend+Replace normalizer).
        assert_eq!(
            enc.get_tokens(),
            ["▁hello", "▁world", "▁", "<0xC3>", "<0xA9>", "<tool>", "▁", "<0x21>"]
        );
        assert_eq!(enc.get_ids(), [274, 276, 259, 198, 172, 278, 259, 36]);
        // Byte fallback reassembles "é"; the user-defined token is printed; the space prefix
        // SentencePiece adds after an added token (as llama.cpp does) shows up before "!".
        assert_eq!(
            tok.decode(enc.get_ids(), true).unwrap(),
            "hello world é<tool> !"
        );

        let plain = tok.encode("hello world", false).unwrap();
        assert_eq!(plain.get_ids(), [274, 276]);
        assert_eq!(tok.decode(plain.get_ids(), true).unwrap(), "hello world");

        // Control tokens are matched whole and skipped on decode.
        let with_bos = tok.encode("<s>hello</s>", false).unwrap();
        assert_eq!(with_bos.get_ids(), [1, 274, 2]);
        assert_eq!(tok.decode(with_bos.get_ids(), true).unwrap(), "hello");
    }

    #[test]
    fn spm_without_space_prefix_neither_prepends_nor_strips() {
        let mut md = synthetic_spm_metadata();
        md.insert(KEY_ADD_SPACE_PREFIX.into(), Value::Bool(false));
        md.insert(KEY_ADD_BOS.into(), Value::Bool(false));
        let g = tokenizer_from_metadata(&md).unwrap();
        assert!(!g.add_bos);
        let enc = g.tokenizer.encode(" hello", false).unwrap();
        assert_eq!(enc.get_tokens(), ["▁hello"]);
        assert_eq!(g.tokenizer.decode(enc.get_ids(), true).unwrap(), " hello");
    }

    #[test]
    fn unknown_model_is_a_clear_error() {
        let mut md = synthetic_spm_metadata();
        md.insert(KEY_MODEL.into(), Value::String("rwkv".into()));
        let err = tokenizer_from_metadata(&md).unwrap_err();
        let msg = format!("{err:#}");
        assert!(msg.contains("rwkv") && msg.contains("unsupported"), "{msg}");
    }

    #[test]
    fn malformed_metadata_is_an_error_not_a_panic() {
        let mut md = synthetic_spm_metadata();
        md.remove(KEY_TOKENS);
        assert!(format!("{:#}", tokenizer_from_metadata(&md).unwrap_err()).contains(KEY_TOKENS));

        let mut md = synthetic_spm_metadata();
        md.insert(KEY_SCORES.into(), Value::Array(vec![Value::F32(0.0)]));
        assert!(format!("{:#}", tokenizer_from_metadata(&md).unwrap_err()).contains(KEY_SCORES));

        let mut md = synthetic_spm_metadata();
        md.insert(KEY_BOS_ID.into(), Value::U32(100_000));
        assert!(format!("{:#}", tokenizer_from_metadata(&md).unwrap_err()).contains(KEY_BOS_ID));

        let mut md = synthetic_spm_metadata();
        md.insert(KEY_MODEL.into(), Value::String("gpt2".into()));
        assert!(format!("{:#}", tokenizer_from_metadata(&md).unwrap_err()).contains(KEY_MERGES));
    }

    /// A three-token byte-level vocabulary with one merge.
    fn tiny_bpe_metadata() -> HashMap<String, Value> {
        let strings =
            |v: &[&str]| Value::Array(v.iter().map(|s| Value::String(s.to_string())).collect());
        HashMap::from([
            (KEY_MODEL.to_string(), Value::String("gpt2".into())),
            (KEY_TOKENS.to_string(), strings(&["a", "b", "ab"])),
            (KEY_MERGES.to_string(), strings(&["a b"])),
            (KEY_EOS_ID.to_string(), Value::U32(2)),
        ])
    }

    fn err_of(md: &HashMap<String, Value>) -> String {
        error_chain(tokenizer_from_metadata(md))
    }

    #[test]
    fn hostile_tokenizer_metadata_names_the_key() {
        let g = tokenizer_from_metadata(&tiny_bpe_metadata()).unwrap();
        assert_eq!(g.tokenizer.encode("ab", false).unwrap().get_ids(), [2]);

        let mut md = tiny_bpe_metadata();
        md.insert(
            KEY_TOKENS.into(),
            Value::Array(vec![Value::U32(1), Value::U32(2)]),
        );
        assert_mentions(
            &err_of(&md),
            &["`tokenizer.ggml.tokens`[0] should be a string", "U32"],
        );
        md.insert(KEY_TOKENS.into(), Value::String("a b ab".into()));
        assert_mentions(
            &err_of(&md),
            &["`tokenizer.ggml.tokens` should be an array"],
        );

        let mut md = tiny_bpe_metadata();
        md.insert(
            KEY_MERGES.into(),
            Value::Array(vec![Value::String("ab".into())]),
        );
        assert_mentions(
            &err_of(&md),
            &["`tokenizer.ggml.merges`[0]", "not two tokens"],
        );
        md.insert(
            KEY_MERGES.into(),
            Value::Array(vec![Value::String("x y".into())]),
        );
        assert_mentions(&err_of(&md), &["tokenizer.ggml.merges"]);
        md.insert(KEY_MERGES.into(), Value::U8(1));
        assert_mentions(
            &err_of(&md),
            &["`tokenizer.ggml.merges` should be an array"],
        );

        let mut md = tiny_bpe_metadata();
        md.insert(KEY_EOS_ID.into(), Value::U64(u64::MAX));
        assert_mentions(&err_of(&md), &["tokenizer.ggml.eos_token_id"]);
        md.insert(KEY_EOS_ID.into(), Value::U32(3));
        assert_mentions(
            &err_of(&md),
            &["`tokenizer.ggml.eos_token_id` = 3 is outside"],
        );
        md.insert(KEY_EOS_ID.into(), Value::String("2".into()));
        assert_mentions(
            &err_of(&md),
            &["`tokenizer.ggml.eos_token_id` should be an integer"],
        );

        let mut md = tiny_bpe_metadata();
        md.insert(
            KEY_TOKEN_TYPE.into(),
            Value::Array(vec![Value::F32(1.0); 3]),
        );
        assert_mentions(
            &err_of(&md),
            &["`tokenizer.ggml.token_type`[0] should be an integer"],
        );

        let mut md = tiny_bpe_metadata();
        let long = Value::String("a".repeat(MAX_TOKEN_LEN + 1));
        md.insert(KEY_TOKENS.into(), Value::Array(vec![long]));
        assert_mentions(
            &err_of(&md),
            &["`tokenizer.ggml.tokens`[0] is 4097 bytes long"],
        );
    }

    #[test]
    fn nan_scores_are_refused() {
        let mut md = synthetic_spm_metadata();
        let mut scores = get_f32_array(&md, KEY_SCORES).unwrap().unwrap();
        scores[7] = f32::NAN;
        md.insert(
            KEY_SCORES.into(),
            Value::Array(scores.into_iter().map(Value::F32).collect()),
        );
        assert_mentions(&err_of(&md), &["`tokenizer.ggml.scores`[7] is NaN"]);
    }

    #[test]
    fn hostile_gguf_headers_name_the_key_and_file() {
        use helios_gguf::test_util::GgufBuilder;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hostile.gguf");
        // The tokens array claims 2^60 strings.
        let mut payload = 8u32.to_le_bytes().to_vec();
        payload.extend_from_slice(&(1u64 << 60).to_le_bytes());
        let b = GgufBuilder::tiny_llama()
            .kv(KEY_MODEL, Value::String("gpt2".into()))
            .kv_raw(KEY_TOKENS, 9, payload);
        std::fs::write(&path, b.build()).unwrap();
        let msg = format!("{:#}", load(&path).unwrap_err());
        assert_mentions(&msg, &["hostile.gguf", KEY_TOKENS, "array length"]);

        // A well-formed file whose tokens are numbers.
        let numbers = Value::Array(vec![Value::I32(1); 3]);
        let b = GgufBuilder::tiny_llama()
            .kv(KEY_MODEL, Value::String("gpt2".into()))
            .kv(KEY_TOKENS, numbers);
        std::fs::write(&path, b.build()).unwrap();
        let msg = format!("{:#}", load(&path).unwrap_err());
        assert_mentions(
            &msg,
            &[
                "hostile.gguf",
                "`tokenizer.ggml.tokens`[0] should be a string",
            ],
        );
    }

    #[test]
    fn byte_to_unicode_matches_gpt2_alphabet() {
        let alphabet = ByteLevel::alphabet();
        let mapped: HashSet<char> = (0..=255u8).map(byte_to_unicode).collect();
        assert_eq!(mapped.len(), 256);
        assert!(mapped.iter().all(|c| alphabet.contains(c)));
        assert_eq!(byte_to_unicode(b' '), 'Ġ');
        assert_eq!(byte_to_unicode(b'\n'), 'Ċ');
        assert_eq!(respell_byte_level("é"), "Ã©");
    }
}
