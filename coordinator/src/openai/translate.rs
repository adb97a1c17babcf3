//! OpenAI requests become the gRPC API's `GenerateRequest`, which then takes the one serving
//! path (admission, scheduler, step loop) that gRPC requests take: ranges, lengths and the
//! vocabulary are checked there, with the same messages, not here.
//!
//! What is checked here is what only the OpenAI shape can get wrong: the several shapes of
//! `prompt`, `stop`, message `content` and `logit_bias` (string keys), `best_of` with `stream`,
//! and the features Helios does not have, which are refused rather than silently ignored:
//! several prompts, `suffix`, content parts other than text. Tools are read in
//! [`super::tools`]. Structured
//! outputs are read in [`super::structured`]. `n`, `best_of` and the bias values are checked by admission, as for gRPC.

use std::collections::HashMap;

use helios_proto::v1::{GenerateRequest, GenerationParameters};
use serde_json::Value;

use super::error::ApiError;
use super::structured;
use super::tools::{self, Tools};
use super::types::{ChatRequest, Common, CompletionRequest};
use crate::admission::{check_streamable, MAX_LOGPROBS};

/// Which logprobs format a response carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogprobsFormat {
    None,
    /// Completions: `tokens`, `token_logprobs`, `top_logprobs`, `text_offset`.
    Legacy,
    /// Chat: `content[{token, logprob, bytes, top_logprobs}]`.
    Chat,
}

/// A request for the serving path, and how to answer it.
#[derive(Debug)]
pub struct Translated {
    pub request: GenerateRequest,
    pub stream: bool,
    /// `stream_options.include_usage`: a last chunk with `usage` and no choices.
    pub include_usage: bool,
    pub logprobs: LogprobsFormat,
    /// The parameter that set a structured output constraint: errors about the constraint
    /// name it.
    pub constraint_param: Option<&'static str>,
    /// Choices the answer holds (`n`).
    pub choices: usize,
    /// Completions' `echo`: each choice's text starts with the prompt.
    pub echo: bool,
    /// Tools whose calls the answer is parsed for (`tool_choice` other than `none`).
    pub tools: Option<Tools>,
    /// With tools: the conversation and the tools for a chat template that renders them
    /// (then the prompt is rendered from these instead of the fallback's `messages`).
    pub templated: Option<(Vec<crate::tokenizer::ChatMessage>, Vec<Value>)>,
}

/// `/v1/completions`.
pub fn completion(
    req: CompletionRequest,
    common: Common,
    request_id: &str,
) -> Result<Translated, ApiError> {
    if req.suffix.as_deref().is_some_and(|s| !s.is_empty()) {
        return Err(ApiError::invalid_param("suffix", "suffix is not supported"));
    }
    if let Some(n) = req.logprobs.filter(|&n| n > MAX_LOGPROBS) {
        return Err(ApiError::invalid_param(
            "logprobs",
            format!("logprobs is {n}; at most {MAX_LOGPROBS}"),
        ));
    }
    let (prompt, token_ids) = prompt(req.prompt)?;
    let logprobs = match req.logprobs {
        Some(_) => LogprobsFormat::Legacy,
        None => LogprobsFormat::None,
    };
    let mut t = finish(
        common,
        request_id,
        GenerateRequest {
            prompt,
            token_ids,
            ..Default::default()
        },
        req.max_tokens,
        req.logprobs,
        logprobs,
    )?;
    t.echo = req.echo.unwrap_or(false);
    if let Some(p) = t.request.parameters.as_mut() {
        p.best_of = req.best_of;
        // The echoed prompt's tokens get logprobs too, as OpenAI's legacy API gives them.
        p.prompt_logprobs = req.logprobs.filter(|_| t.echo);
    }
    if t.stream {
        check_streamable(t.request.parameters.as_ref()).map_err(ApiError::from)?;
    }
    Ok(t)
}

/// `/v1/chat/completions`.
pub fn chat(req: ChatRequest, common: Common, request_id: &str) -> Result<Translated, ApiError> {
    let tools = tools::read(req.tools, req.tool_choice, req.parallel_tool_calls)?;
    let top = match (req.logprobs, req.top_logprobs) {
        (Some(true), top) => Some(top.unwrap_or(0)),
        (_, Some(_)) => {
            return Err(ApiError::invalid_param(
                "top_logprobs",
                "top_logprobs needs logprobs: true",
            ))
        }
        (_, None) => None,
    };
    if let Some(n) = top.filter(|&n| n > MAX_LOGPROBS) {
        return Err(ApiError::invalid_param(
            "top_logprobs",
            format!("top_logprobs is {n}; at most {MAX_LOGPROBS}"),
        ));
    }
    let messages = req
        .messages
        .ok_or_else(|| ApiError::invalid_param("messages", "messages is required"))?;
    if messages.is_empty() {
        return Err(ApiError::invalid_param("messages", "messages is empty"));
    }
    let templated = match tools.as_ref().filter(|t| t.active()) {
        Some(t) => Some((tools::template_messages(&messages, content)?, t.specs())),
        None => None,
    };
    let messages = tools::fallback_messages(messages, tools.as_ref(), content)?;
    let format = match top {
        Some(_) => LogprobsFormat::Chat,
        None => LogprobsFormat::None,
    };
    let mut t = finish(
        common,
        request_id,
        GenerateRequest {
            messages,
            ..Default::default()
        },
        req.max_completion_tokens.or(req.max_tokens),
        top,
        format,
    )?;
    with_tools(&mut t, tools)?;
    t.templated = templated;
    Ok(t)
}

/// A required or named call is enforced by its grammar, which leaves no room for another
/// structured output; the answer is parsed for calls unless `tool_choice` is `none`.
fn with_tools(t: &mut Translated, tools: Option<Tools>) -> Result<(), ApiError> {
    let Some(tools) = tools.filter(Tools::active) else {
        return Ok(());
    };
    if let Some(constraint) = tools.constraint() {
        if let Some(other) = t.constraint_param {
            return Err(ApiError::invalid_param(
                "tool_choice",
                format!(
                    "a required tool call is a structured output already; it cannot be combined with {other}"
                ),
            ));
        }
        if let Some(p) = t.request.parameters.as_mut() {
            p.constraint = Some(constraint);
        }
        t.constraint_param = Some("tools");
    }
    t.tools = Some(tools);
    Ok(())
}

/// The sampling fields and the rest of the request.
fn finish(
    c: Common,
    request_id: &str,
    input: GenerateRequest,
    max_tokens: Option<u32>,
    logprobs: Option<u32>,
    format: LogprobsFormat,
) -> Result<Translated, ApiError> {
    let (constraint_param, constraint) = structured::constraint(&c)?.unzip();
    let stream = c.stream.unwrap_or(false);
    let include_usage = c
        .stream_options
        .as_ref()
        .and_then(|o| o.include_usage)
        .unwrap_or(false);
    let parameters = GenerationParameters {
        max_new_tokens: max_tokens,
        temperature: c.temperature.unwrap_or(0.0),
        // vLLM's -1 means off, as our 0 does.
        top_k: c.top_k.map_or(0, |k| if k == -1 { 0 } else { k }),
        top_p: c.top_p,
        min_p: c.min_p.unwrap_or(0.0),
        repetition_penalty: c.repetition_penalty,
        frequency_penalty: c.frequency_penalty.unwrap_or(0.0),
        presence_penalty: c.presence_penalty.unwrap_or(0.0),
        seed: c.seed.map(|s| s as u64),
        stop: stop(c.stop)?,
        stop_token_ids: c.stop_token_ids.unwrap_or_default(),
        ignore_eos: c.ignore_eos.unwrap_or(false),
        logprobs,
        constraint,
        n: c.n,
        best_of: None,
        logit_bias: logit_bias(c.logit_bias)?,
        prompt_logprobs: None,
    };
    Ok(Translated {
        request: GenerateRequest {
            request_id: request_id.to_string(),
            parameters: Some(parameters),
            priority: c.priority.unwrap_or(0),
            session_id: c.user.unwrap_or_default(),
            ..input
        },
        stream,
        include_usage,
        logprobs: format,
        constraint_param,
        choices: c.n.unwrap_or(1) as usize,
        echo: false,
        tools: None,
        templated: None,
    })
}

/// `logit_bias`: token ids as string keys (OpenAI's JSON shape), numbers as biases; their
/// ranges are admission's to check.
fn logit_bias(b: Option<serde_json::Map<String, Value>>) -> Result<HashMap<u32, f32>, ApiError> {
    let bad = |msg: String| ApiError::invalid_param("logit_bias", msg);
    b.unwrap_or_default()
        .into_iter()
        .map(|(key, v)| {
            let id = key
                .trim()
                .parse::<u32>()
                .map_err(|_| bad(format!("logit_bias: key {key:?} is not a token id")))?;
            let bias = v
                .as_f64()
                .ok_or_else(|| bad(format!("logit_bias[{key}] is {v}, not a number")))?;
            Ok((id, bias as f32))
        })
        .collect()
}

/// A completions `prompt`: (text, token ids), one of them set.
fn prompt(p: Option<Value>) -> Result<(String, Vec<u32>), ApiError> {
    let bad = |msg: &str| ApiError::invalid_param("prompt", msg);
    let shapes =
        "prompt must be a string, an array of token ids, or an array holding one of either";
    let one_only = |n: usize| {
        bad(&format!(
            "{n} prompts: one prompt per request (batched prompts are not supported; n asks for several completions of one)"
        ))
    };
    match p {
        None | Some(Value::Null) => Err(bad("prompt is required")),
        Some(Value::String(s)) => Ok((s, Vec::new())),
        Some(Value::Array(items)) => match items.first() {
            None => Err(bad("prompt is empty")),
            Some(Value::String(_)) | Some(Value::Array(_)) if items.len() > 1 => {
                Err(one_only(items.len()))
            }
            Some(Value::String(s)) => Ok((s.clone(), Vec::new())),
            Some(Value::Array(ids)) => Ok((String::new(), token_ids(ids)?)),
            Some(Value::Number(_)) => Ok((String::new(), token_ids(&items)?)),
            Some(_) => Err(bad(shapes)),
        },
        Some(_) => Err(bad(shapes)),
    }
}

fn token_ids(items: &[Value]) -> Result<Vec<u32>, ApiError> {
    if items.is_empty() {
        return Err(ApiError::invalid_param("prompt", "prompt is empty"));
    }
    items
        .iter()
        .map(|v| {
            v.as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .ok_or_else(|| {
                    ApiError::invalid_param(
                        "prompt",
                        format!("prompt: {v} is not a token id (an integer >= 0)"),
                    )
                })
        })
        .collect()
}

/// `stop`: a string or an array of strings.
fn stop(s: Option<Value>) -> Result<Vec<String>, ApiError> {
    let bad = || ApiError::invalid_param("stop", "stop must be a string or an array of strings");
    match s {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::String(s)) => Ok(vec![s]),
        Some(Value::Array(items)) => items
            .into_iter()
            .map(|v| match v {
                Value::String(s) => Ok(s),
                _ => Err(bad()),
            })
            .collect(),
        Some(_) => Err(bad()),
    }
}

/// A message's `content`: a string, text parts (joined with newlines, as vLLM does), or null
/// (an assistant turn that only called tools).
pub(super) fn content(i: usize, c: Option<Value>) -> Result<String, ApiError> {
    let param = format!("messages[{i}].content");
    let bad = |msg: String| ApiError::invalid_param(&param, msg);
    match c {
        None | Some(Value::Null) => Ok(String::new()),
        Some(Value::String(s)) => Ok(s),
        Some(Value::Array(parts)) => {
            let mut texts = Vec::with_capacity(parts.len());
            for (j, part) in parts.iter().enumerate() {
                match (part.get("type").and_then(Value::as_str), part.get("text")) {
                    (Some("text"), Some(Value::String(t))) => texts.push(t.as_str()),
                    (Some("text"), _) => {
                        return Err(bad(format!("{param}[{j}].text must be a string")))
                    }
                    (Some(other), _) => {
                        return Err(bad(format!(
                            "{param}[{j}]: only text parts are supported, not {other:?}"
                        )))
                    }
                    (None, _) => {
                        return Err(bad(format!(
                            "{param}[{j}] must be an object with a \"type\""
                        )))
                    }
                }
            }
            Ok(texts.join("\n"))
        }
        Some(_) => Err(bad(format!(
            "{param} must be a string or an array of content parts"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::openai::body::JsonBody;

    fn body(json: &str) -> JsonBody {
        JsonBody(serde_json::from_str(json).expect("test JSON"))
    }

    fn completion_of(json: &str) -> Result<Translated, ApiError> {
        let b = body(json);
        completion(b.view()?, b.view()?, "cmpl-1")
    }

    fn chat_of(json: &str) -> Result<Translated, ApiError> {
        let b = body(json);
        chat(b.view()?, b.view()?, "chatcmpl-1")
    }

    fn params(t: &Translated) -> &GenerationParameters {
        t.request.parameters.as_ref().expect("parameters")
    }

    #[test]
    fn every_completion_field_reaches_the_generate_request() {
        let t = completion_of(
            r#"{"model": "m", "prompt": "Once", "max_tokens": 7, "temperature": 0.5,
                "top_p": 0.9, "seed": -1, "stop": "\n", "logprobs": 3, "n": 1, "echo": false,
                "presence_penalty": 0.25, "frequency_penalty": -0.5, "stream": true,
                "stream_options": {"include_usage": true}, "user": "u", "top_k": 40,
                "min_p": 0.05, "repetition_penalty": 1.1, "ignore_eos": true, "priority": -2,
                "stop_token_ids": [2], "some_future_field": {"x": 1}}"#,
        )
        .unwrap();
        let r = &t.request;
        assert_eq!(
            (r.prompt.as_str(), r.request_id.as_str()),
            ("Once", "cmpl-1")
        );
        assert_eq!(r.priority, -2);
        let p = params(&t);
        assert_eq!(p.max_new_tokens, Some(7));
        assert_eq!(
            (p.temperature, p.top_p, p.top_k, p.min_p),
            (0.5, Some(0.9), 40, 0.05)
        );
        assert_eq!(p.seed, Some(u64::MAX));
        assert_eq!(p.stop, ["\n"]);
        assert_eq!(p.logprobs, Some(3));
        assert_eq!((p.presence_penalty, p.frequency_penalty), (0.25, -0.5));
        assert_eq!(p.repetition_penalty, Some(1.1));
        assert!(p.ignore_eos);
        assert_eq!(p.stop_token_ids, [2]);
        assert!(t.stream && t.include_usage);
        assert_eq!(t.logprobs, LogprobsFormat::Legacy);
    }

    #[test]
    fn defaults_are_the_grpc_defaults() {
        let t = completion_of(r#"{"prompt": "x", "top_k": -1, "stop": null}"#).unwrap();
        let p = params(&t);
        assert_eq!(p, &GenerationParameters::default());
        assert!(!t.stream && !t.include_usage);
        assert_eq!(t.logprobs, LogprobsFormat::None);
    }

    #[test]
    fn prompts_come_as_text_or_token_ids_one_at_a_time() {
        let input =
            |json: &str| completion_of(json).map(|t| (t.request.prompt, t.request.token_ids));
        assert_eq!(input(r#"{"prompt": ["a"]}"#).unwrap(), ("a".into(), vec![]));
        assert_eq!(
            input(r#"{"prompt": [1, 2]}"#).unwrap(),
            (String::new(), vec![1, 2])
        );
        assert_eq!(
            input(r#"{"prompt": [[3]]}"#).unwrap(),
            (String::new(), vec![3])
        );
        for (bad, words) in [
            (r#"{}"#, "prompt is required"),
            (r#"{"prompt": []}"#, "prompt is empty"),
            (r#"{"prompt": ["a", "b"]}"#, "2 prompts"),
            (r#"{"prompt": [[1], [2]]}"#, "2 prompts"),
            (r#"{"prompt": [1, -2]}"#, "-2 is not a token id"),
            (r#"{"prompt": [1, "a"]}"#, "\"a\" is not a token id"),
            (r#"{"prompt": 5}"#, "prompt must be"),
            (r#"{"prompt": [{"a": 1}]}"#, "prompt must be"),
        ] {
            let e = input(bad).expect_err(bad);
            assert_eq!(e.status.as_u16(), 400);
            assert_eq!(e.param.as_deref(), Some("prompt"), "{bad}");
            assert!(e.message.contains(words), "{bad}: {}", e.message);
        }
    }

    #[test]
    fn echo_with_logprobs_asks_for_the_prompts_logprobs() {
        let prompt_logprobs = |body: &str| {
            let v: Value = serde_json::from_str(body).unwrap();
            let req: CompletionRequest = serde_json::from_value(v.clone()).unwrap();
            let common: Common = serde_json::from_value(v).unwrap();
            let t = completion(req, common, "id").unwrap();
            t.request.parameters.unwrap().prompt_logprobs
        };
        assert_eq!(
            prompt_logprobs(r#"{"prompt": "x", "echo": true, "logprobs": 3}"#),
            Some(3)
        );
        assert_eq!(prompt_logprobs(r#"{"prompt": "x", "echo": true}"#), None);
        assert_eq!(prompt_logprobs(r#"{"prompt": "x", "logprobs": 3}"#), None);
    }

    #[test]
    fn unsupported_features_are_refused_by_name() {
        for (bad, param) in [
            (r#"{"prompt": "x", "n": -1}"#, "n"),
            (
                r#"{"prompt": "x", "best_of": 3, "stream": true}"#,
                "best_of",
            ),
            (r#"{"prompt": "x", "suffix": "end"}"#, "suffix"),
            (
                r#"{"prompt": "x", "logit_bias": {"a": -100}}"#,
                "logit_bias",
            ),
            (
                r#"{"prompt": "x", "logit_bias": {"7": "up"}}"#,
                "logit_bias",
            ),
            (r#"{"prompt": "x", "logit_bias": [1]}"#, "logit_bias"),
            (r#"{"prompt": "x", "logprobs": 21}"#, "logprobs"),
            (r#"{"prompt": "x", "stop": [1]}"#, "stop"),
            (r#"{"prompt": "x", "max_tokens": "ten"}"#, "max_tokens"),
            (r#"{"prompt": "x", "stream": "yes"}"#, "stream"),
            (
                r#"{"prompt": "x", "stream_options": {"include_usage": 1}}"#,
                "stream_options.include_usage",
            ),
        ] {
            let e = completion_of(bad).expect_err(bad);
            assert_eq!(e.status.as_u16(), 400, "{bad}");
            assert_eq!(e.param.as_deref(), Some(param), "{bad}: {}", e.message);
        }
    }

    #[test]
    fn choices_and_logit_bias_reach_the_generate_request() {
        let t = completion_of(
            r#"{"prompt": "x", "n": 2, "best_of": 3, "logit_bias": {"50256": -100, " 7": 2.5}}"#,
        )
        .unwrap();
        let p = params(&t);
        assert_eq!((p.n, p.best_of, t.choices), (Some(2), Some(3), 2));
        let bias: std::collections::BTreeMap<u32, f32> =
            p.logit_bias.iter().map(|(&k, &v)| (k, v)).collect();
        assert_eq!(bias, [(7, 2.5), (50256, -100.0)].into());
        // Streamed, n choices are fine; only choosing among more (best_of > n) is not.
        assert!(completion_of(r#"{"prompt": "x", "n": 3, "stream": true}"#).is_ok());
        assert!(completion_of(r#"{"prompt": "x", "n": 3, "best_of": 3, "stream": true}"#).is_ok());
        let t = chat_of(r#"{"messages": [{"role": "user", "content": "x"}], "n": 4}"#).unwrap();
        assert_eq!((params(&t).n, t.choices), (Some(4), 4));
    }

    #[test]
    fn chat_messages_logprobs_and_token_limits() {
        let t = chat_of(
            r#"{"messages": [{"role": "developer", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": "there"}]},
                {"role": "assistant", "content": null}],
                "max_tokens": 9, "max_completion_tokens": 5, "logprobs": true, "top_logprobs": 2}"#,
        )
        .unwrap();
        let m: Vec<(&str, &str)> = t
            .request
            .messages
            .iter()
            .map(|m| (m.role.as_str(), m.content.as_str()))
            .collect();
        assert_eq!(
            m,
            [
                ("system", "Be brief."),
                ("user", "Hi\nthere"),
                ("assistant", "")
            ]
        );
        assert_eq!(
            params(&t).max_new_tokens,
            Some(5),
            "max_completion_tokens wins"
        );
        assert_eq!(params(&t).logprobs, Some(2));
        assert_eq!(t.logprobs, LogprobsFormat::Chat);
        let t = chat_of(r#"{"messages": [{"role": "user", "content": "x"}], "max_tokens": 9, "logprobs": true}"#).unwrap();
        assert_eq!(params(&t).max_new_tokens, Some(9));
        assert_eq!(params(&t).logprobs, Some(0));
        let t = chat_of(r#"{"messages": [{"role": "user", "content": "x"}], "logprobs": false}"#)
            .unwrap();
        assert_eq!(params(&t).logprobs, None);
        assert_eq!(t.logprobs, LogprobsFormat::None);
    }

    #[test]
    fn bad_chat_requests_name_the_field() {
        let user = r#"[{"role": "user", "content": "x"}]"#;
        for (bad, param) in [
            (r#"{}"#.to_string(), "messages"),
            (r#"{"messages": []}"#.to_string(), "messages"),
            (r#"{"messages": "hello"}"#.to_string(), "messages"),
            (r#"{"messages": [{"content": "x"}]}"#.to_string(), "messages[0]"),
            (r#"{"messages": [{"role": 1, "content": "x"}]}"#.to_string(), "messages[0].role"),
            (r#"{"messages": [{"role": "user", "content": 5}]}"#.to_string(), "messages[0].content"),
            (
                r#"{"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}"#.to_string(),
                "messages[0].content",
            ),
            (format!(r#"{{"messages": {user}, "top_logprobs": 2}}"#), "top_logprobs"),
            (format!(r#"{{"messages": {user}, "logprobs": true, "top_logprobs": 21}}"#), "top_logprobs"),
            (format!(r#"{{"messages": {user}, "logprobs": 2}}"#), "logprobs"),
            (format!(r#"{{"messages": {user}, "n": "two"}}"#), "n"),
            (format!(r#"{{"messages": {user}, "tools": [{{"type": "function"}}]}}"#), "tools[0].function"),
            (
                format!(r#"{{"messages": {user}, "response_format": {{"type": "xml"}}}}"#),
                "response_format",
            ),
            (
                format!(r#"{{"messages": {user}, "response_format": {{"type": "json_schema"}}}}"#),
                "response_format",
            ),
            (
                format!(r#"{{"messages": {user}, "guided_regex": "a", "guided_json": {{}}}}"#),
                "guided_regex",
            ),
            (format!(r#"{{"messages": {user}, "guided_choice": []}}"#), "guided_choice"),
            (
                format!(r#"{{"messages": {user}, "structured_outputs": {{"regex": 5}}}}"#),
                "structured_outputs",
            ),
        ] {
            let e = chat_of(&bad).expect_err(&bad);
            assert_eq!(e.status.as_u16(), 400, "{bad}");
            assert_eq!(e.param.as_deref(), Some(param), "{bad}: {}", e.message);
        }
    }
}
