//! The prompts of a load run, and how many tokens each should generate.
//!
//! - **Random, as token ids** (gRPC): `input_len` pseudo-random ids from the middle of the
//!   vocabulary (away from special and byte tokens at its ends), sent as `token_ids`, so the
//!   prompt length is exact by construction and no tokenizer is needed on the client.
//! - **Random, as text** (OpenAI HTTP, which takes text): random ids decoded with the model's
//!   tokenizer, re-encoded, and trimmed or extended until the text encodes to exactly
//!   `input_len` tokens the way the server will encode it (BOS included when the model adds
//!   one). vLLM's random dataset does the same round trip; without it a decoded prompt
//!   re-tokenizes to a different length (merges across the seams of random tokens).
//! - **ShareGPT** (`--dataset FILE`): a JSON list of `{"conversations": [{"from": "human" |
//!   "gpt", "value": ...}, ...]}`; the first human turn is the prompt, and the token count of
//!   the first gpt reply after it is the output length unless `--output-len` is given. As in
//!   vLLM, entries are shuffled with the seed and those whose prompt or reply is shorter than 4
//!   tokens, whose prompt is longer than 1,024 or whose prompt and reply together are longer
//!   than 2,048 are skipped; when more requests are asked for than entries remain, they repeat.
//!
//! Random prompts are made on demand, one per request index, from the seed: the same seed gives
//! the same prompts on any machine, a `--duration` run never runs out, and no two requests
//! share a prefix (which a server's prefix cache would reward). The workloads that do share
//! prefixes on purpose ([`super::chat`], [`super::shared_prefix`]) build on the same [`Random`]
//! source: a random message of exact length, alone or appended to a prefix whose tokens it
//! leaves as they are.

use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use helios_coordinator::tokenizer::TextTokenizer;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde_json::Value;

use super::shared_prefix::SharedPrefix;

/// Prompt ids are drawn from `MARGIN .. vocab - MARGIN`: special and byte tokens sit at the ends.
pub const MARGIN: u32 = 1000;

/// vLLM's ShareGPT filter: shortest prompt or reply, longest prompt, longest prompt + reply.
const SHAREGPT_MIN_LEN: usize = 4;
const SHAREGPT_MAX_PROMPT_LEN: usize = 1024;
const SHAREGPT_MAX_TOTAL_LEN: usize = 2048;

/// Round trips (decode, encode, adjust) tried per seed before moving to the next seed.
const ROUND_TRIPS: usize = 16;
/// Seeds tried for one random text prompt before giving up.
const SEEDS: u64 = 64;

/// What a request sends as its prompt.
#[derive(Debug, Clone, PartialEq)]
pub enum Input {
    Ids(Vec<u32>),
    Text(String),
}

/// One request's prompt and intended lengths.
#[derive(Debug, Clone)]
pub struct Prompt {
    pub input: Input,
    /// Prompt tokens as the client counts them (the server's own count is what the report uses).
    pub prompt_len: usize,
    /// Tokens to generate (`max_tokens`).
    pub output_len: usize,
    /// The conversation or user the request belongs to (gRPC `session_id`, OpenAI `user`): a
    /// router keeps a session's requests on one replica.
    pub session_id: Option<String>,
}

/// How random prompts are written: token ids (gRPC, exact by construction) or text that the
/// model's tokenizer encodes to an exact length (OpenAI HTTP, which takes text).
#[derive(Clone)]
pub enum Random {
    Ids { vocab: u32 },
    Text(Arc<TextTokenizer>),
}

impl Random {
    /// Ids in `MARGIN .. vocab - MARGIN` (`vocab` must exceed `2 * MARGIN`).
    pub fn ids(vocab: u32) -> Result<Self> {
        if vocab <= 2 * MARGIN + 1 {
            bail!("the vocabulary ({vocab} tokens) is too small for random prompts");
        }
        Ok(Random::Ids { vocab })
    }

    /// Text of exact length in `tokenizer`'s tokens.
    pub fn text(tokenizer: Arc<TextTokenizer>) -> Result<Self> {
        let vocab = tokenizer.vocab_size();
        if vocab <= 2 * MARGIN as usize + 1 {
            bail!("the tokenizer's vocabulary ({vocab} tokens) is too small for random prompts");
        }
        Ok(Random::Text(tokenizer))
    }

    /// A prompt of exactly `len` tokens drawn from `seed` (text: the model's BOS included).
    pub fn message(&self, seed: u64, len: usize) -> Result<Input> {
        Ok(match self {
            Random::Ids { vocab } => Input::Ids(random_ids(seed, len, *vocab as usize)),
            Random::Text(tokenizer) => Input::Text(exact_text(tokenizer, seed, len)?),
        })
    }

    /// `prefix` followed by exactly `len` more tokens drawn from `seed`, and the whole prompt's
    /// length in tokens. The prefix's own tokens stay the first ones (text: the message is
    /// chosen so that nothing merges across the seam), so a prefix cache can reuse them.
    pub fn extend(&self, prefix: &Input, seed: u64, len: usize) -> Result<(Input, usize)> {
        match (self, prefix) {
            (Random::Ids { vocab }, Input::Ids(ids)) => {
                let mut all = ids.clone();
                all.extend(random_ids(seed, len, *vocab as usize));
                let n = all.len();
                Ok((Input::Ids(all), n))
            }
            (Random::Text(tokenizer), Input::Text(text)) => {
                let prefix_ids = tokenizer.encode(text)?;
                let tail = text_after(tokenizer, text, &prefix_ids, seed, len)?;
                Ok((Input::Text(format!("{text}{tail}")), prefix_ids.len() + len))
            }
            _ => bail!("a prompt of token ids and one of text cannot be joined"),
        }
    }

    /// Tokens the model adds before any text (its BOS), 0 for ids.
    fn bos(&self) -> Result<usize> {
        match self {
            Random::Ids { .. } => Ok(0),
            Random::Text(tokenizer) => Ok(tokenizer.encode("")?.len()),
        }
    }
}

/// Where prompts come from.
pub enum Dataset {
    /// A fresh random prompt of `input_len` tokens per request.
    Random {
        seed: u64,
        input_len: usize,
        output_len: usize,
        random: Random,
    },
    /// Filtered, shuffled ShareGPT entries; requests cycle through them.
    ShareGpt { entries: Vec<Prompt> },
    /// A few random system prompts, each request one of them and a random suffix.
    SharedPrefix(SharedPrefix),
}

impl Dataset {
    /// Random prompts of exactly `input_len` tokens written as `random` says.
    pub fn random(seed: u64, input_len: usize, output_len: usize, random: Random) -> Result<Self> {
        let bos = random.bos()?;
        if input_len <= bos {
            bail!("--input-len {input_len} leaves no room for text after the model's BOS token");
        }
        Ok(Dataset::Random {
            seed,
            input_len,
            output_len,
            random,
        })
    }

    /// Reads a ShareGPT file and keeps up to `needed` usable entries (see the module doc).
    pub fn sharegpt(
        path: &Path,
        tokenizer: &TextTokenizer,
        output_len: Option<usize>,
        needed: usize,
        seed: u64,
    ) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading the dataset {}", path.display()))?;
        let json: Value = serde_json::from_str(&text)
            .with_context(|| format!("{} is not JSON", path.display()))?;
        let list = json.as_array().with_context(|| {
            format!(
                "{}: expected a JSON list of {{\"conversations\": [...]}} (ShareGPT)",
                path.display()
            )
        })?;
        let mut pairs: Vec<(&str, &str)> = list.iter().filter_map(first_exchange).collect();
        pairs.shuffle(&mut StdRng::seed_from_u64(seed));
        let mut entries = Vec::new();
        for (prompt, reply) in pairs {
            if entries.len() >= needed {
                break;
            }
            let prompt_len = tokenizer.encode(prompt)?.len();
            let reply_len = match output_len {
                Some(n) => n,
                None => content_len(tokenizer, reply)?,
            };
            let too_short = prompt_len < SHAREGPT_MIN_LEN
                || (output_len.is_none() && reply_len < SHAREGPT_MIN_LEN);
            let too_long = prompt_len > SHAREGPT_MAX_PROMPT_LEN
                || prompt_len + reply_len > SHAREGPT_MAX_TOTAL_LEN;
            if too_short || too_long {
                continue;
            }
            entries.push(Prompt {
                input: Input::Text(prompt.to_string()),
                prompt_len,
                output_len: reply_len,
                session_id: None,
            });
        }
        if entries.is_empty() {
            bail!(
                "{}: no usable conversation (a human turn of {SHAREGPT_MIN_LEN}..={SHAREGPT_MAX_PROMPT_LEN} \
                 tokens followed by a gpt reply of at least {SHAREGPT_MIN_LEN}, both within \
                 {SHAREGPT_MAX_TOTAL_LEN})",
                path.display()
            );
        }
        Ok(Dataset::ShareGpt { entries })
    }

    /// Where the prompts' tokens come from: `random` (shared prefixes included) or `sharegpt`.
    pub fn name(&self) -> &'static str {
        match self {
            Dataset::Random { .. } | Dataset::SharedPrefix(_) => "random",
            Dataset::ShareGpt { .. } => "sharegpt",
        }
    }

    /// The prompt of measured request `i`.
    pub fn prompt(&self, i: u64) -> Result<Prompt> {
        self.make(i, 0)
    }

    /// The prompt of warm-up request `i` (random prompts: drawn apart from the measured ones,
    /// so the warm-up leaves nothing in a prefix cache that the measured phase could reuse).
    pub fn warmup_prompt(&self, i: u64) -> Result<Prompt> {
        self.make(i, WARMUP_SALT)
    }

    fn make(&self, i: u64, salt: u64) -> Result<Prompt> {
        match self {
            Dataset::Random {
                seed,
                input_len,
                output_len,
                random,
            } => Ok(Prompt {
                input: random.message(request_seed(*seed, salt, i), *input_len)?,
                prompt_len: *input_len,
                output_len: *output_len,
                session_id: None,
            }),
            Dataset::SharedPrefix(s) => s.prompt(i, salt),
            Dataset::ShareGpt { entries } => {
                let n = entries.len() as u64;
                // Warm-up takes entries from the end of the shuffled list.
                let k = if salt == 0 { i % n } else { n - 1 - i % n };
                Ok(entries[k as usize].clone())
            }
        }
    }
}

/// The first human turn of a ShareGPT entry and the first gpt reply after it.
fn first_exchange(entry: &Value) -> Option<(&str, &str)> {
    let turns = entry.get("conversations")?.as_array()?;
    fn role(t: &Value) -> &str {
        t.get("from").and_then(Value::as_str).unwrap_or_default()
    }
    fn value(t: &Value) -> Option<&str> {
        t.get("value").and_then(Value::as_str)
    }
    let h = turns
        .iter()
        .position(|t| matches!(role(t), "human" | "user"))?;
    let reply = turns[h + 1..]
        .iter()
        .find(|t| matches!(role(t), "gpt" | "assistant" | "chatgpt"))?;
    Some((value(&turns[h])?, value(reply)?))
}

/// Tokens of `text` without the BOS the tokenizer may add (a reply is generated, not prompted).
fn content_len(tokenizer: &TextTokenizer, text: &str) -> Result<usize> {
    let ids = tokenizer.encode(text)?;
    let bos = tokenizer.encode("")?.len();
    Ok(ids.len().saturating_sub(bos))
}

/// The salt of warm-up requests' seeds: drawn apart from the measured ones.
pub const WARMUP_SALT: u64 = 1 << 63;

/// A distinct seed per (run seed, phase, request).
pub fn request_seed(seed: u64, salt: u64, i: u64) -> u64 {
    seed ^ salt.wrapping_add(i.wrapping_mul(0x9E37_79B9_7F4A_7C15))
}

/// `len` pseudo-random ids in `MARGIN .. vocab - MARGIN` (splitmix64: the same prompts for the
/// same seed, on any machine and any version of `rand`).
pub fn random_ids(seed: u64, len: usize, vocab: usize) -> Vec<u32> {
    let span = vocab as u64 - 2 * u64::from(MARGIN);
    let mut state = seed;
    (0..len)
        .map(|_| {
            state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            MARGIN + (z % span) as u32
        })
        .collect()
}

/// Text that `tokenizer` encodes to exactly `len` tokens (BOS included if the model adds it).
pub fn exact_text(tokenizer: &TextTokenizer, seed: u64, len: usize) -> Result<String> {
    let bos = tokenizer.encode("")?;
    let target = len
        .checked_sub(bos.len())
        .filter(|&n| n > 0)
        .with_context(|| format!("a prompt of {len} tokens leaves no room after BOS"))?;
    text_after(tokenizer, "", &bos, seed, target)
        .with_context(|| format!("could not build a text prompt of exactly {len} tokens"))
}

/// Text that, after `prefix` (which encodes to `prefix_ids`), adds exactly `len` tokens and
/// leaves the prefix's tokens as they are.
///
/// Random ids decode to text that re-encodes differently (neighbouring pieces merge), so the
/// ids are adjusted to the re-encoding, cut or extended by the difference, and decoded again
/// until the length holds; a seed that does not settle, or whose text merges with the end of
/// the prefix, is replaced by the next.
fn text_after(
    tokenizer: &TextTokenizer,
    prefix: &str,
    prefix_ids: &[u32],
    seed: u64,
    len: usize,
) -> Result<String> {
    let vocab = tokenizer.vocab_size();
    for attempt in 0..SEEDS {
        let mut draw = attempt.wrapping_mul(0xD1B5_4A32_D192_ED03) ^ seed;
        let mut ids = random_ids(draw, len, vocab);
        for _ in 0..ROUND_TRIPS {
            let text = tokenizer.decode(&ids)?;
            let encoded = tokenizer.encode(&format!("{prefix}{text}"))?;
            // The seam merged: another seed.
            let Some(own) = encoded.strip_prefix(prefix_ids) else {
                break;
            };
            if own.len() == len {
                return Ok(text);
            }
            // Work on the ids the text really encodes to.
            ids = own.to_vec();
            if ids.len() > len {
                ids.truncate(len);
            } else {
                draw = draw.wrapping_add(1);
                ids.extend(random_ids(draw, len - ids.len(), vocab));
            }
        }
    }
    bail!(
        "no text of exactly {len} tokens found after a prefix of {} (seed {seed})",
        prefix_ids.len()
    )
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::io::Write;
    use std::path::PathBuf;

    /// The default model's tokenizer (`scripts/fetch-model.sh` fetches the model).
    pub(crate) fn tokenizer() -> Arc<TextTokenizer> {
        let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../models/SmolLM2-135M-Instruct.Q4_1.gguf");
        assert!(
            path.exists(),
            "{} is missing: run scripts/fetch-model.sh",
            path.display()
        );
        Arc::new(TextTokenizer::from_model_path(&path).expect("loading the tokenizer"))
    }

    #[test]
    fn random_ids_are_exact_in_range_and_reproducible() {
        let ids = random_ids(7, 500, 49152);
        assert_eq!(ids.len(), 500);
        assert!(ids.iter().all(|&t| (MARGIN..49152 - MARGIN).contains(&t)));
        assert_eq!(ids, random_ids(7, 500, 49152));
        assert_ne!(ids, random_ids(8, 500, 49152));

        let d = Dataset::random(3, 16, 8, Random::ids(49152).expect("vocab")).expect("dataset");
        let (a, b, w) = (
            d.prompt(0).expect("p0"),
            d.prompt(1).expect("p1"),
            d.warmup_prompt(0).expect("w0"),
        );
        assert_eq!((a.prompt_len, a.output_len), (16, 8));
        assert!(matches!(&a.input, Input::Ids(ids) if ids.len() == 16));
        assert_ne!(a.input, b.input);
        assert_ne!(a.input, w.input);
        assert_eq!(a.input, d.prompt(0).expect("again").input);
        assert!(Random::ids(1500).is_err());
    }

    #[test]
    fn random_text_encodes_to_exactly_the_asked_length() {
        let tok = tokenizer();
        for len in [2, 3, 16, 64, 200, 1000] {
            let random = Random::text(tok.clone()).expect("vocab");
            let d = Dataset::random(11, len, 4, random).expect("dataset");
            for i in 0..8 {
                let p = d.prompt(i).expect("prompt");
                let Input::Text(text) = &p.input else {
                    panic!("text expected")
                };
                assert_eq!(tok.encode(text).expect("encode").len(), len, "{text:?}");
                assert_eq!(p.prompt_len, len);
            }
        }
    }

    #[test]
    fn sharegpt_takes_first_exchanges_and_filters_like_vllm() {
        let tok = tokenizer();
        let long = "word ".repeat(1100);
        let file = serde_json::json!([
            {"id": "a", "conversations": [
                {"from": "human", "value": "What is the capital of France? Answer briefly."},
                {"from": "gpt", "value": "The capital of France is Paris, a city on the Seine."},
                {"from": "human", "value": "And of Germany?"}]},
            {"id": "system-first", "conversations": [
                {"from": "system", "value": "You are helpful."},
                {"from": "human", "value": "Tell me a joke about computers, please."},
                {"from": "gpt", "value": "Why did the computer go to the doctor? It had a virus."}]},
            {"id": "short-reply", "conversations": [
                {"from": "human", "value": "Say yes or no, nothing else please."},
                {"from": "gpt", "value": "Yes"}]},
            {"id": "long-prompt", "conversations": [
                {"from": "human", "value": long},
                {"from": "gpt", "value": "That is a lot of words indeed, my friend."}]},
            {"id": "no-reply", "conversations": [{"from": "human", "value": "Hello there friend"}]},
            {"id": "not-a-conversation"}
        ]);
        let mut f = tempfile::NamedTempFile::new().expect("temp file");
        write!(f, "{file}").expect("write");

        let d = Dataset::sharegpt(f.path(), &tok, None, 100, 0).expect("dataset");
        let Dataset::ShareGpt { entries } = &d else {
            panic!("sharegpt expected")
        };
        let mut prompts: Vec<String> = entries
            .iter()
            .map(|e| match &e.input {
                Input::Text(t) => t.clone(),
                Input::Ids(_) => panic!("text expected"),
            })
            .collect();
        prompts.sort();
        assert_eq!(
            prompts,
            [
                "Tell me a joke about computers, please.",
                "What is the capital of France? Answer briefly."
            ]
        );
        for e in entries {
            let Input::Text(t) = &e.input else {
                unreachable!()
            };
            assert_eq!(e.prompt_len, tok.encode(t).expect("encode").len());
            assert!(e.output_len >= SHAREGPT_MIN_LEN);
        }
        let capital = entries
            .iter()
            .find(|e| e.input == Input::Text(prompts[1].clone()))
            .expect("the capital question");
        let reply = "The capital of France is Paris, a city on the Seine.";
        assert_eq!(
            capital.output_len,
            content_len(&tok, reply).expect("encode")
        );

        // A fixed output length replaces the replies' and lifts the short-reply filter.
        let d = Dataset::sharegpt(f.path(), &tok, Some(7), 100, 0).expect("dataset");
        let Dataset::ShareGpt { entries } = &d else {
            panic!("sharegpt expected")
        };
        assert_eq!(entries.len(), 3);
        assert!(entries.iter().all(|e| e.output_len == 7));
        // Requests cycle through the entries.
        assert_eq!(
            d.prompt(0).expect("p0").input,
            d.prompt(3).expect("p3").input
        );

        // At most `needed` entries are kept.
        let d = Dataset::sharegpt(f.path(), &tok, None, 1, 0).expect("dataset");
        assert!(matches!(&d, Dataset::ShareGpt { entries } if entries.len() == 1));

        let mut bad = tempfile::NamedTempFile::new().expect("temp file");
        write!(bad, "{{\"conversations\": []}}").expect("write");
        assert!(Dataset::sharegpt(bad.path(), &tok, None, 10, 0).is_err());
    }
}
