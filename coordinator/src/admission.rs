//! Admission: a client's `GenerateRequest` becomes token ids and checked parameters, or a
//! [`ServeError::InvalidArgument`] that names the field at fault and says why.
//!
//! Everything that can be known before a request runs is checked here, so that nothing a
//! client sends can fail a step that other requests share: token ids are inside the
//! vocabulary, the sequence fits the model's length and the replica's KV cache, parameters are
//! in range. The limits follow vLLM's and OpenAI's where they exist.

use helios_proto::v1::constraint::Kind;
use helios_proto::v1::{ChatMessage as ProtoMessage, Constraint, GenerateRequest, SamplingParams};

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

/// What the operator allows one request (`--max-prompt-tokens`, `--max-new-tokens`,
/// `--max-stop-strings`), within what the replicas can hold ([`Limits`]).
#[derive(Debug, Clone, Copy)]
pub struct RequestCaps {
    pub max_prompt_tokens: Option<usize>,
    pub max_new_tokens: Option<usize>,
    pub max_stop_strings: usize,
}

impl Default for RequestCaps {
    fn default() -> Self {
        Self {
            max_prompt_tokens: None,
            max_new_tokens: None,
            max_stop_strings: DEFAULT_MAX_STOP_STRINGS,
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
            .map(|m| ChatMessage {
                role: m.role.clone(),
                content: m.content.clone(),
            })
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
    let limit = limits.max_model_len.min(limits.kv_capacity);
    let what = if limits.kv_capacity < limits.max_model_len {
        "this replica's KV cache holds"
    } else {
        "this model's length allows"
    };
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
    let room = limit - ids.len();
    let p = req.parameters.clone().unwrap_or_default();
    let cap = caps.max_new_tokens.unwrap_or(usize::MAX);
    let max_new_tokens = match p.max_new_tokens {
        None => DEFAULT_MAX_NEW_TOKENS.min(room).min(cap),
        Some(n) if n as usize > cap => {
            return Err(invalid(
                "max_new_tokens",
                format!("max_new_tokens is {n}; this server generates at most {cap} tokens per request"),
            ))
        }
        Some(0) => return Err(invalid("max_new_tokens", "max_new_tokens must be at least 1")),
        Some(n) if n as usize > room => {
            return Err(invalid(
                "max_new_tokens",
                format!(
                "max_new_tokens is {n}, but the prompt ({} tokens) leaves room for {room} ({what} {limit} tokens)",
                ids.len()
            )))
        }
        Some(n) => n as usize,
    };
    // Each message starts with the field it is about.
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
    if let Some(n) = p.logprobs.filter(|&n| n > MAX_LOGPROBS) {
        return Err(invalid(
            "logprobs",
            format!("logprobs is {n}; at most {MAX_LOGPROBS} top logprobs can be returned"),
        ));
    }
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
                top_p,
                min_p: p.min_p,
                seed: p.seed,
                output_index: 0,
                repetition_penalty: repetition,
                frequency_penalty: p.frequency_penalty,
                presence_penalty: p.presence_penalty,
                top_logprobs: p.logprobs.unwrap_or(0),
                logprobs: p.logprobs.is_some(),
            },
            stop_token_ids,
            priority: req.priority,
            deadline: None,
            return_logits: false,
            constraint: None,
        },
        stop: p.stop,
        logprobs: p.logprobs,
    })
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
    fn the_operators_caps_are_enforced_and_named() {
        let tok = smollm2();
        let caps = RequestCaps {
            max_prompt_tokens: Some(3),
            max_new_tokens: Some(5),
            max_stop_strings: 1,
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
