//! Admission: a client's `GenerateRequest` becomes token ids and checked parameters, or a
//! [`ServeError::InvalidArgument`] that names the field at fault and says why.
//!
//! Everything that can be known before a request runs is checked here, so that nothing a
//! client sends can fail a step that other requests share: token ids are inside the
//! vocabulary, the sequence fits the model's length and the replica's KV cache, parameters are
//! in range. The limits follow vLLM's and OpenAI's where they exist.

use std::collections::HashMap;

use helios_proto::v1::constraint::Kind;
use helios_proto::v1::{
    ChatMessage as ProtoMessage, Constraint, GenerateRequest, GenerationParameters, SamplingParams,
};

use crate::constraint::ConstraintSpec;
use crate::error::ServeError;
use crate::scheduler::SequenceParams;
use crate::tokenizer::{ChatMessage, TextTokenizer};

/// Tokens generated when a request does not say (within the model's length).
pub const DEFAULT_MAX_NEW_TOKENS: usize = 256;
/// Most top logprobs a request may ask for (OpenAI's limit).
pub const MAX_LOGPROBS: u32 = 20;
/// Most stop strings per request by default (`--max-stop-strings`), and the longest stop
/// string in bytes.
pub const DEFAULT_MAX_STOP_STRINGS: usize = 16;
pub const MAX_STOP_BYTES: usize = 256;
/// Most choices one request may ask for (`n`, `best_of`; vLLM's bound).
pub const MAX_CHOICES: u32 = 128;
/// Most tokens one request's choices may generate together by default (`best_of` or `n` ×
/// `max_new_tokens`; `--max-choice-tokens`): one request must not take a replica's whole KV
/// cache and queue through many choices.
pub const DEFAULT_MAX_CHOICE_TOKENS: usize = 65536;
/// Most `logit_bias` entries one request may set (each is sent with every step it samples).
pub const MAX_LOGIT_BIAS_ENTRIES: usize = 1024;
/// The largest bias either way (OpenAI's range): ±100 all but bans or forces a token.
pub const MAX_LOGIT_BIAS: f32 = 100.0;

/// What the operator allows one request (`--max-prompt-tokens`, `--max-new-tokens`,
/// `--max-stop-strings`), within what the replicas can hold ([`Limits`]).
#[derive(Debug, Clone, Copy)]
pub struct RequestCaps {
    pub max_prompt_tokens: Option<usize>,
    pub max_new_tokens: Option<usize>,
    pub max_stop_strings: usize,
    /// `best_of` (or `n`) × `max_new_tokens` at most (`--max-choice-tokens`).
    pub max_choice_tokens: usize,
}

impl Default for RequestCaps {
    fn default() -> Self {
        Self {
            max_prompt_tokens: None,
            max_new_tokens: None,
            max_stop_strings: DEFAULT_MAX_STOP_STRINGS,
            max_choice_tokens: DEFAULT_MAX_CHOICE_TOKENS,
        }
    }
}

/// What the replica can hold.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_model_len: usize,
    pub vocab_size: usize,
    /// Positions the whole KV cache holds (blocks × block size).
    pub kv_capacity: usize,
}

/// A request that can run.
#[derive(Debug, Clone)]
pub struct Admitted {
    pub prompt_ids: Vec<u32>,
    /// Its constraint, to compile before it queues (`params.constraint` then holds it).
    pub constraint: Option<ConstraintSpec>,
    pub params: SequenceParams,
    pub stop: Vec<String>,
    /// None: no logprobs; Some(n): the sampled token's and the top n.
    pub logprobs: Option<u32>,
    /// Choices returned (`n`) and generated (`best_of`, at least `n`): with more generated,
    /// the `n` with the highest cumulative logprob are returned.
    pub n: usize,
    pub best_of: usize,
}

impl Admitted {
    /// Choice `i` of the request: choice 0 as admitted, choice i sampling as the same request
    /// with seed + i would (vLLM's convention), or unseeded as an independent draw.
    pub fn choice(&self, i: usize) -> Admitted {
        let mut c = self.clone();
        if let Some(seed) = &mut c.params.sampling.seed {
            *seed = seed.wrapping_add(i as u64);
        }
        c
    }

    /// Choices are chosen among (best_of > n): each streams its sampled tokens' logprobs,
    /// which pick the best.
    pub fn chooses(&self) -> bool {
        self.best_of > self.n
    }
}

fn invalid(field: &'static str, msg: impl Into<String>) -> ServeError {
    ServeError::invalid(field, msg)
}

/// The token ids a request's input stands for (the chat template applied to `messages`).
pub fn prompt_ids(
    tokenizer: &TextTokenizer,
    prompt: &str,
    messages: &[ProtoMessage],
    token_ids: &[u32],
) -> Result<Vec<u32>, ServeError> {
    let given = [
        !prompt.is_empty(),
        !messages.is_empty(),
        !token_ids.is_empty(),
    ];
    match given.iter().filter(|g| **g).count() {
        0 => {
            return Err(invalid(
                "prompt",
                "empty input: set one of prompt, messages or token_ids",
            ))
        }
        1 => {}
        _ => {
            return Err(ServeError::invalid_request(
                "set only one of prompt, messages and token_ids",
            ))
        }
    }
    if !token_ids.is_empty() {
        return Ok(token_ids.to_vec());
    }
    let text = if messages.is_empty() {
        prompt.to_string()
    } else {
        let messages: Vec<ChatMessage> = messages
            .iter()
            .map(|m| ChatMessage::new(m.role.clone(), m.content.clone()))
            .collect();
        if let Some(i) = messages.iter().position(|m| m.role.is_empty()) {
            return Err(invalid("messages", format!("messages[{i}].role is empty")));
        }
        tokenizer
            .apply_chat_template(&messages, true)
            .map_err(|e| invalid("messages", format!("messages: {e:#}")))?
    };
    let ids = tokenizer
        .encode(&text)
        .map_err(|e| invalid("prompt", format!("prompt: {e:#}")))?;
    if ids.is_empty() {
        return Err(invalid("prompt", "the prompt encodes to no tokens"));
    }
    Ok(ids)
}

/// Checks a request against the replica's `limits` and the operator's `caps`; the model's EOS
/// tokens end it unless ignored.
pub fn admit(
    tokenizer: &TextTokenizer,
    req: &GenerateRequest,
    limits: &Limits,
    caps: &RequestCaps,
) -> Result<Admitted, ServeError> {
    let ids = prompt_ids(tokenizer, &req.prompt, &req.messages, &req.token_ids)?;
    let room = check_prompt(&ids, limits, caps)?;
    let p = req.parameters.clone().unwrap_or_default();
    let (n, best_of) = choices(&p)?;
    let max_new_tokens = max_new_tokens(&p, ids.len(), room, best_of, limits, caps)?;
    check_choice_tokens(n, best_of, ids.len(), max_new_tokens, limits, caps)?;
    check_logit_bias(&p.logit_bias, limits.vocab_size)?;
    check_ranges(&p)?;
    check_stops(&p, limits, caps)?;
    let mut stop_token_ids = p.stop_token_ids.clone();
    if !p.ignore_eos {
        stop_token_ids.extend_from_slice(tokenizer.eos_token_ids());
    }
    Ok(Admitted {
        prompt_ids: ids,
        constraint: constraint_spec(p.constraint.as_ref())?,
        params: SequenceParams {
            max_new_tokens,
            sampling: SamplingParams {
                temperature: p.temperature,
                top_k: p.top_k as u32,
                top_p: p.top_p.unwrap_or(1.0),
                min_p: p.min_p,
                seed: p.seed,
                output_index: 0,
                repetition_penalty: p.repetition_penalty.unwrap_or(1.0),
                frequency_penalty: p.frequency_penalty,
                presence_penalty: p.presence_penalty,
                top_logprobs: p.logprobs.unwrap_or(0),
                // Choosing the best choices needs every sampled token's logprob.
                logprobs: p.logprobs.is_some() || best_of > n,
                logit_bias: p.logit_bias.clone(),
            },
            stop_token_ids,
            priority: req.priority,
            deadline: None,
            return_logits: false,
            constraint: None,
            prompt_logprobs: p.prompt_logprobs,
        },
        stop: p.stop,
        logprobs: p.logprobs,
        n,
        best_of,
    })
}

/// The longest a sequence may grow (the model's length, or what the whole KV cache holds),
/// and how a message names that bound.
fn length_limit(limits: &Limits) -> (usize, &'static str) {
    let limit = limits.max_model_len.min(limits.kv_capacity);
    let what = if limits.kv_capacity < limits.max_model_len {
        "this replica's KV cache holds"
    } else {
        "this model's length allows"
    };
    (limit, what)
}

/// The prompt is within the operator's cap, the vocabulary and the length limit; returns the
/// room it leaves for new tokens (at least 1).
fn check_prompt(ids: &[u32], limits: &Limits, caps: &RequestCaps) -> Result<usize, ServeError> {
    if let Some(cap) = caps.max_prompt_tokens.filter(|&cap| ids.len() > cap) {
        return Err(invalid(
            "prompt",
            format!(
                "the prompt is {} tokens; this server takes prompts of at most {cap}",
                ids.len()
            ),
        ));
    }
    if let Some(bad) = ids.iter().find(|&&t| t as usize >= limits.vocab_size) {
        return Err(invalid(
            "token_ids",
            format!(
                "token_ids: {bad} is outside the vocabulary (size {})",
                limits.vocab_size
            ),
        ));
    }
    let (limit, what) = length_limit(limits);
    if ids.len() >= limit {
        return Err(invalid(
            "prompt",
            format!(
                "the prompt is {} tokens; {what} at most {} (the prompt plus at least one new token)",
                ids.len(),
                limit - 1
            ),
        ));
    }
    Ok(limit - ids.len())
}

/// `max_new_tokens` as asked, within the room the prompt leaves and the operator's cap; unset,
/// the default, shrunk to fit (several choices share what one request may hold).
fn max_new_tokens(
    p: &GenerationParameters,
    prompt_len: usize,
    room: usize,
    best_of: usize,
    limits: &Limits,
    caps: &RequestCaps,
) -> Result<usize, ServeError> {
    let cap = caps.max_new_tokens.unwrap_or(usize::MAX);
    let share = (caps.max_choice_tokens / best_of)
        .min(limits.kv_capacity.saturating_sub(prompt_len) / best_of)
        .max(1);
    let (limit, what) = length_limit(limits);
    match p.max_new_tokens {
        None if best_of > 1 => Ok(DEFAULT_MAX_NEW_TOKENS.min(room).min(cap).min(share)),
        None => Ok(DEFAULT_MAX_NEW_TOKENS.min(room).min(cap)),
        Some(n) if n as usize > cap => Err(invalid(
            "max_new_tokens",
            format!("max_new_tokens is {n}; this server generates at most {cap} tokens per request"),
        )),
        Some(0) => Err(invalid("max_new_tokens", "max_new_tokens must be at least 1")),
        Some(n) if n as usize > room => Err(invalid(
            "max_new_tokens",
            format!(
                "max_new_tokens is {n}, but the prompt ({prompt_len} tokens) leaves room for {room} ({what} {limit} tokens)"
            ),
        )),
        Some(n) => Ok(n as usize),
    }
}

/// The sampling parameters are in range; each message starts with the field it is about.
fn check_ranges(p: &GenerationParameters) -> Result<(), ServeError> {
    let check = |ok: bool, field: &'static str, msg: &str| {
        if ok {
            Ok(())
        } else {
            Err(invalid(field, msg))
        }
    };
    check(
        p.temperature.is_finite() && p.temperature >= 0.0,
        "temperature",
        "temperature must be >= 0 (0 = greedy)",
    )?;
    check(p.top_k >= 0, "top_k", "top_k must be >= 0 (0 = off)")?;
    let top_p = p.top_p.unwrap_or(1.0);
    check(
        top_p > 0.0 && top_p <= 1.0,
        "top_p",
        "top_p must be in (0, 1]",
    )?;
    check(
        (0.0..=1.0).contains(&p.min_p),
        "min_p",
        "min_p must be in [0, 1]",
    )?;
    let repetition = p.repetition_penalty.unwrap_or(1.0);
    check(
        repetition.is_finite() && repetition > 0.0,
        "repetition_penalty",
        "repetition_penalty must be > 0 (1 = off)",
    )?;
    check(
        (-2.0..=2.0).contains(&p.frequency_penalty),
        "frequency_penalty",
        "frequency_penalty must be in [-2, 2]",
    )?;
    check(
        (-2.0..=2.0).contains(&p.presence_penalty),
        "presence_penalty",
        "presence_penalty must be in [-2, 2]",
    )?;
    for (field, asked) in [
        ("logprobs", p.logprobs),
        ("prompt_logprobs", p.prompt_logprobs),
    ] {
        if let Some(n) = asked.filter(|&n| n > MAX_LOGPROBS) {
            return Err(invalid(
                field,
                format!("{field} is {n}; at most {MAX_LOGPROBS} top logprobs can be returned"),
            ));
        }
    }
    Ok(())
}

/// Stop strings within the operator's count and our length bound; stop tokens in the
/// vocabulary.
fn check_stops(
    p: &GenerationParameters,
    limits: &Limits,
    caps: &RequestCaps,
) -> Result<(), ServeError> {
    if p.stop.len() > caps.max_stop_strings {
        return Err(invalid(
            "stop",
            format!(
                "{} stop strings; at most {} are allowed",
                p.stop.len(),
                caps.max_stop_strings
            ),
        ));
    }
    if let Some(i) = p
        .stop
        .iter()
        .position(|s| s.is_empty() || s.len() > MAX_STOP_BYTES)
    {
        return Err(invalid(
            "stop",
            format!("stop[{i}] must be 1 to {MAX_STOP_BYTES} bytes long"),
        ));
    }
    if let Some(bad) = p
        .stop_token_ids
        .iter()
        .find(|&&t| t as usize >= limits.vocab_size)
    {
        return Err(invalid(
            "stop_token_ids",
            format!(
                "stop_token_ids: {bad} is outside the vocabulary (size {})",
                limits.vocab_size
            ),
        ));
    }
    Ok(())
}

/// The most bytes a constraint's text may have (a schema, a regex or a grammar).
pub const MAX_CONSTRAINT_BYTES: usize = 256 * 1024;

/// What a request's `constraint` asks for; an empty one is refused.
fn constraint_spec(c: Option<&Constraint>) -> Result<Option<ConstraintSpec>, ServeError> {
    let Some(c) = c else { return Ok(None) };
    let spec = match &c.kind {
        None => {
            return Err(invalid(
                "constraint",
                "constraint: set one of json_schema, json_object, regex or grammar",
            ))
        }
        Some(Kind::JsonSchema(s)) => ConstraintSpec::JsonSchema(s.clone()),
        Some(Kind::JsonObject(true)) => ConstraintSpec::JsonObject,
        Some(Kind::JsonObject(false)) => {
            return Err(invalid(
                "constraint",
                "constraint: json_object must be true when it is the one set",
            ))
        }
        Some(Kind::Regex(s)) => ConstraintSpec::Regex(s.clone()),
        Some(Kind::Grammar(s)) => ConstraintSpec::Grammar(s.clone()),
    };
    let len = match &spec {
        ConstraintSpec::JsonSchema(s) | ConstraintSpec::Regex(s) | ConstraintSpec::Grammar(s) => {
            s.len()
        }
        ConstraintSpec::JsonObject => 0,
    };
    if len > MAX_CONSTRAINT_BYTES {
        return Err(invalid(
            "constraint",
            format!(
                "constraint: {} is {len} bytes; at most {MAX_CONSTRAINT_BYTES}",
                spec.field()
            ),
        ));
    }
    Ok(Some(spec))
}

/// `n` and `best_of` (unset: 1 and `n`), each in 1..=[`MAX_CHOICES`], `best_of` >= `n`.
fn choices(p: &GenerationParameters) -> Result<(usize, usize), ServeError> {
    let n = p.n.unwrap_or(1);
    let best_of = p.best_of.unwrap_or(n);
    for (field, v) in [("n", n), ("best_of", best_of)] {
        if v == 0 || v > MAX_CHOICES {
            return Err(invalid(
                field,
                format!("{field} is {v}; it must be 1 to {MAX_CHOICES}"),
            ));
        }
    }
    if best_of < n {
        return Err(invalid(
            "best_of",
            format!("best_of ({best_of}) must be at least n ({n}): n of the best_of are returned"),
        ));
    }
    Ok((n as usize, best_of as usize))
}

/// Every choice generates up to `max_new_tokens`: together within the operator's cap, and,
/// the prompt held once, within the whole KV cache.
fn check_choice_tokens(
    n: usize,
    best_of: usize,
    prompt: usize,
    max_new_tokens: usize,
    limits: &Limits,
    caps: &RequestCaps,
) -> Result<(), ServeError> {
    if best_of == 1 {
        return Ok(());
    }
    let (field, count) = if best_of > n {
        ("best_of", best_of)
    } else {
        ("n", n)
    };
    let tokens = best_of.saturating_mul(max_new_tokens);
    if tokens > caps.max_choice_tokens {
        return Err(invalid(
            field,
            format!(
                "{field} × max_new_tokens = {count} × {max_new_tokens} = {tokens} tokens; this \
                 server generates at most {} per request",
                caps.max_choice_tokens
            ),
        ));
    }
    if prompt.saturating_add(tokens) > limits.kv_capacity {
        return Err(invalid(
            field,
            format!(
                "{count} choices of up to {max_new_tokens} tokens after a {prompt}-token prompt \
                 need {} KV positions; this replica's KV cache holds {}",
                prompt + tokens,
                limits.kv_capacity
            ),
        ));
    }
    Ok(())
}

/// At most [`MAX_LOGIT_BIAS_ENTRIES`] entries, each a token id of the vocabulary and a finite
/// bias within ±[`MAX_LOGIT_BIAS`]. The lowest offending id is named, so the message does not
/// depend on the map's order.
fn check_logit_bias(bias: &HashMap<u32, f32>, vocab_size: usize) -> Result<(), ServeError> {
    if bias.len() > MAX_LOGIT_BIAS_ENTRIES {
        return Err(invalid(
            "logit_bias",
            format!(
                "logit_bias has {} entries; at most {MAX_LOGIT_BIAS_ENTRIES} are allowed",
                bias.len()
            ),
        ));
    }
    let bad = bias
        .iter()
        .filter(|(&t, b)| t as usize >= vocab_size || !b.is_finite() || b.abs() > MAX_LOGIT_BIAS)
        .min_by_key(|(&t, _)| t);
    match bad {
        Some((&t, _)) if t as usize >= vocab_size => Err(invalid(
            "logit_bias",
            format!("logit_bias: token {t} is outside the vocabulary (size {vocab_size})"),
        )),
        Some((&t, b)) => Err(invalid(
            "logit_bias",
            format!(
                "logit_bias[{t}] is {b}; a bias must be in [-{MAX_LOGIT_BIAS}, {MAX_LOGIT_BIAS}]"
            ),
        )),
        None => Ok(()),
    }
}

/// A request whose response is streamed cannot choose among its choices (`best_of` > `n`):
/// the best are known only once all have finished (OpenAI refuses it too).
pub fn check_streamable(p: Option<&GenerationParameters>) -> Result<(), ServeError> {
    let (n, best_of) = p.map_or((None, None), |p| (p.n, p.best_of));
    if best_of.is_some_and(|b| b > n.unwrap_or(1)) {
        return Err(invalid(
            "best_of",
            "best_of > n cannot be streamed: the best n are known only once every choice has \
             finished (ask without streaming)",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tokenizer::tests::smollm2;
    use helios_proto::v1::GenerationParameters;

    const LIMITS: Limits = Limits {
        max_model_len: 64,
        vocab_size: 49152,
        kv_capacity: 1024,
    };

    fn req(prompt: &str, p: GenerationParameters) -> GenerateRequest {
        GenerateRequest {
            prompt: prompt.into(),
            parameters: Some(p),
            ..Default::default()
        }
    }

    fn refused(r: GenerateRequest, words: &str) {
        let tok = smollm2();
        let e = admit(tok, &r, &LIMITS, &RequestCaps::default()).expect_err(words);
        let ServeError::InvalidArgument { message, .. } = e else {
            panic!("{e:?} is not an invalid argument");
        };
        assert!(message.contains(words), "{message:?} lacks {words:?}");
    }

    #[test]
    fn defaults_fit_the_room_left() {
        let tok = smollm2();
        let a = admit(
            tok,
            &req("Hello there", Default::default()),
            &LIMITS,
            &RequestCaps::default(),
        )
        .unwrap();
        assert_eq!(a.params.max_new_tokens, 64 - a.prompt_ids.len());
        assert_eq!(a.params.sampling.top_p, 1.0);
        assert_eq!(a.params.sampling.repetition_penalty, 1.0);
        assert_eq!(a.params.stop_token_ids, tok.eos_token_ids());
        assert_eq!(a.logprobs, None);
    }

    #[test]
    fn out_of_range_parameters_are_named() {
        let p = GenerationParameters::default;
        refused(req("", p()), "empty input");
        let both = GenerateRequest {
            prompt: "a".into(),
            token_ids: vec![1],
            ..Default::default()
        };
        refused(both, "only one");
        let long = "word ".repeat(100);
        refused(req(&long, p()), "at most 63");
        for (params, words) in [
            (
                GenerationParameters {
                    max_new_tokens: Some(0),
                    ..p()
                },
                "at least 1",
            ),
            (
                GenerationParameters {
                    max_new_tokens: Some(1000),
                    ..p()
                },
                "leaves room",
            ),
            (
                GenerationParameters {
                    temperature: -0.5,
                    ..p()
                },
                "temperature",
            ),
            (
                GenerationParameters {
                    temperature: f32::NAN,
                    ..p()
                },
                "temperature",
            ),
            (
                GenerationParameters {
                    top_p: Some(0.0),
                    ..p()
                },
                "top_p",
            ),
            (
                GenerationParameters {
                    top_p: Some(1.5),
                    ..p()
                },
                "top_p",
            ),
            (GenerationParameters { top_k: -1, ..p() }, "top_k"),
            (GenerationParameters { min_p: 2.0, ..p() }, "min_p"),
            (
                GenerationParameters {
                    repetition_penalty: Some(0.0),
                    ..p()
                },
                "repetition_penalty",
            ),
            (
                GenerationParameters {
                    presence_penalty: 3.0,
                    ..p()
                },
                "presence_penalty",
            ),
            (
                GenerationParameters {
                    logprobs: Some(21),
                    ..p()
                },
                "at most 20",
            ),
            (
                GenerationParameters {
                    stop: vec!["x".into(); 1000],
                    ..p()
                },
                "1000 stop strings",
            ),
            (
                GenerationParameters {
                    stop: vec![String::new()],
                    ..p()
                },
                "stop[0]",
            ),
            (
                GenerationParameters {
                    stop_token_ids: vec![49152],
                    ..p()
                },
                "outside the vocabulary",
            ),
        ] {
            refused(req("Hello", params), words);
        }
        let ids = GenerateRequest {
            token_ids: vec![1, 2, 1 << 20],
            ..Default::default()
        };
        refused(ids, "1048576 is outside the vocabulary");
    }

    #[test]
    fn choices_and_logit_bias_are_checked_and_named() {
        let p = GenerationParameters::default;
        let bias = |entries: &[(u32, f32)]| GenerationParameters {
            logit_bias: entries.iter().copied().collect(),
            ..p()
        };
        for (params, field, words) in [
            (GenerationParameters { n: Some(0), ..p() }, "n", "n is 0"),
            (
                GenerationParameters {
                    n: Some(129),
                    ..p()
                },
                "n",
                "1 to 128",
            ),
            (
                GenerationParameters {
                    n: Some(3),
                    best_of: Some(2),
                    ..p()
                },
                "best_of",
                "at least n (3)",
            ),
            (
                GenerationParameters {
                    n: Some(100),
                    max_new_tokens: Some(11),
                    ..p()
                },
                "n",
                "KV cache holds 1024",
            ),
            (
                bias(&[(49152, 1.0)]),
                "logit_bias",
                "token 49152 is outside",
            ),
            (bias(&[(5, 100.5)]), "logit_bias", "logit_bias[5] is 100.5"),
            (bias(&[(5, f32::NAN)]), "logit_bias", "logit_bias[5]"),
            (
                bias(&(0..1025).map(|t| (t, 1.0)).collect::<Vec<_>>()),
                "logit_bias",
                "1025 entries",
            ),
        ] {
            let e = admit(
                smollm2(),
                &req("Hello", params),
                &LIMITS,
                &RequestCaps::default(),
            )
            .expect_err(words);
            let ServeError::InvalidArgument { field: f, message } = &e else {
                panic!("{e:?}");
            };
            assert_eq!(*f, Some(field), "{message}");
            assert!(message.contains(words), "{message:?} lacks {words:?}");
        }
        let caps = RequestCaps {
            max_choice_tokens: 30,
            ..Default::default()
        };
        let four = GenerationParameters {
            n: Some(2),
            best_of: Some(4),
            max_new_tokens: Some(8),
            seed: Some(u64::MAX),
            ..bias(&[(3, -100.0), (7, 100.0)])
        };
        let e = admit(smollm2(), &req("Hi", four.clone()), &LIMITS, &caps).unwrap_err();
        assert!(
            e.to_string()
                .contains("best_of × max_new_tokens = 4 × 8 = 32"),
            "{e}"
        );
        let a = admit(
            smollm2(),
            &req("Hi", four),
            &LIMITS,
            &RequestCaps::default(),
        )
        .unwrap();
        assert_eq!((a.n, a.best_of), (2, 4));
        assert!(a.params.sampling.logprobs, "the best are chosen by logprob");
        assert_eq!(a.params.sampling.logit_bias.len(), 2);
        // Choice i is seeded seed + i, wrapping.
        let seeds: Vec<_> = (0..3).map(|i| a.choice(i).params.sampling.seed).collect();
        assert_eq!(seeds, [Some(u64::MAX), Some(0), Some(1)]);
        // Unset, max_new_tokens shrinks so that every choice fits the cap.
        let many = GenerationParameters { n: Some(8), ..p() };
        let a = admit(smollm2(), &req("Hi", many), &LIMITS, &caps).unwrap();
        assert_eq!(a.params.max_new_tokens, 30 / 8);
        assert!(check_streamable(Some(&GenerationParameters {
            best_of: Some(2),
            ..p()
        }))
        .is_err());
        assert!(check_streamable(Some(&GenerationParameters { n: Some(2), ..p() })).is_ok());
    }

    #[test]
    fn the_operators_caps_are_enforced_and_named() {
        let tok = smollm2();
        let caps = RequestCaps {
            max_prompt_tokens: Some(3),
            max_new_tokens: Some(5),
            max_stop_strings: 1,
            max_choice_tokens: 8,
        };
        let admit_with =
            |prompt: &str, p: GenerationParameters| admit(tok, &req(prompt, p), &LIMITS, &caps);
        let a = admit_with("Hi", Default::default()).unwrap();
        assert_eq!(a.params.max_new_tokens, 5, "the default is capped too");
        let long = admit_with("one two three four five six", Default::default()).unwrap_err();
        assert!(long.to_string().contains("prompts of at most 3"), "{long}");
        let many = GenerationParameters {
            max_new_tokens: Some(6),
            ..Default::default()
        };
        let e = admit_with("Hi", many).unwrap_err();
        assert!(e.to_string().contains("at most 5 tokens"), "{e}");
        let stops = GenerationParameters {
            stop: vec!["a".into(), "b".into()],
            ..Default::default()
        };
        let e = admit_with("Hi", stops).unwrap_err();
        assert!(e.to_string().contains("at most 1 are allowed"), "{e}");
    }

    #[test]
    fn the_kv_cache_bounds_the_length_too() {
        let tok = smollm2();
        let small = Limits {
            kv_capacity: 16,
            ..LIMITS
        };
        let a = admit(
            tok,
            &req("Hi", Default::default()),
            &small,
            &RequestCaps::default(),
        )
        .unwrap();
        assert_eq!(a.prompt_ids.len() + a.params.max_new_tokens, 16);
        let e = admit(
            tok,
            &req(&"word ".repeat(40), Default::default()),
            &small,
            &RequestCaps::default(),
        )
        .unwrap_err();
        assert!(e.to_string().contains("KV cache holds at most 15"), "{e}");
        assert!(
            matches!(
                e,
                ServeError::InvalidArgument {
                    field: Some("prompt"),
                    ..
                }
            ),
            "{e:?}"
        );
    }
}
