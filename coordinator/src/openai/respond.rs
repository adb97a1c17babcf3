//! A request's `GenerateResponse`s become OpenAI's answer: one JSON object, or a stream of
//! server-sent events.
//!
//! A stream is `data: {chunk}\n\n` per response that adds text or logprobs (a chat stream
//! starts with a chunk per choice whose delta is `role: "assistant"`); a choice's last carries
//! its `finish_reason`. With `n` > 1 the choices' chunks are interleaved as they come, each
//! naming its `index`, as OpenAI's are. Once every choice has finished: with
//! `stream_options.include_usage`, a chunk with `usage` (the prompt once, every choice's
//! tokens) and no choices; then `data: [DONE]`. An error after the stream started (the replica went down) is sent as
//! `data: {"error": {...}}`, then `data: [DONE]`.
//!
//! Finish reasons as OpenAI names them: `length`, or `stop` for an EOS token and a stop string
//! alike; `abort` (vLLM's name) for a request the server ended early while shutting down.
//!
//! The event stream owns the request's receiver: when the client goes away, hyper drops the
//! stream, and with it the receiver, which the step loop notices and frees the request.

use std::convert::Infallible;
use std::sync::Arc;

use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use futures::{stream, StreamExt};
use helios_proto::v1::{FinishReason, GenerateResponse};
use serde::Serialize;

use super::error::ApiError;
use super::logprobs;
use super::tool_calls::{self, CallParser, Piece};
use super::tools::{call_id, Tools};
use super::translate::LogprobsFormat;
use super::types::{
    ChatChoice, ChatChunk, ChatChunkChoice, ChatCompletion, ChatMessageOut, Completion,
    CompletionChoice, Delta, FunctionCall, FunctionDelta, ToolCall, ToolCallDelta, Usage,
};
use crate::error::ServeError;
use crate::output::{ResponseReceiver, ResponseStream};
use crate::tokenizer::TextTokenizer;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Completions,
    Chat,
}

/// Writes one request's answer.
pub struct Responder {
    pub endpoint: Endpoint,
    pub id: String,
    pub created: u64,
    pub model: String,
    pub logprobs: LogprobsFormat,
    pub include_usage: bool,
    pub tokenizer: Arc<TextTokenizer>,
    /// Per choice, characters of completion text streamed so far (the legacy `text_offset`).
    offsets: Vec<u32>,
    /// Choices whose last response was streamed.
    finished: usize,
    /// Completions' `echo`: the prompt text, put before each choice's first text.
    echo: Option<String>,
    /// Per choice, whether its echo was streamed.
    echoed: Vec<bool>,
    /// Tools whose calls the answer is parsed for, and per choice the parser of a stream.
    tools: Option<Tools>,
    parsers: Vec<CallParser>,
}

/// OpenAI's name of a finish reason; None until the last response.
pub fn finish_reason(code: i32) -> Option<&'static str> {
    match FinishReason::try_from(code).unwrap_or(FinishReason::Unspecified) {
        FinishReason::Unspecified => None,
        FinishReason::Length => Some("length"),
        FinishReason::Stop | FinishReason::Eos => Some("stop"),
        FinishReason::Cancelled => Some("abort"),
    }
}

fn usage(r: &GenerateResponse) -> Usage {
    let u = r.usage.unwrap_or_default();
    Usage {
        prompt_tokens: u.prompt_tokens,
        completion_tokens: u.completion_tokens,
        total_tokens: u.total_tokens,
    }
}

fn json(v: &impl Serialize) -> String {
    // Our response types hold strings, numbers and lists only.
    serde_json::to_string(v).unwrap_or_default()
}

impl Responder {
    pub fn new(
        endpoint: Endpoint,
        id: String,
        created: u64,
        model: String,
        logprobs: LogprobsFormat,
        include_usage: bool,
        tokenizer: Arc<TextTokenizer>,
    ) -> Self {
        Self {
            endpoint,
            id,
            created,
            model,
            logprobs,
            include_usage,
            tokenizer,
            offsets: vec![0],
            finished: 0,
            echo: None,
            echoed: vec![false],
            tools: None,
            parsers: Vec::new(),
        }
    }

    /// Each choice's text starts with `prompt` (completions' `echo`).
    pub fn with_echo(mut self, prompt: Option<String>) -> Self {
        self.echo = prompt.filter(|_| self.endpoint == Endpoint::Completions);
        self
    }

    /// The echo choice `index` still owes, once.
    fn take_echo(&mut self, index: u32) -> Option<String> {
        let echo = self.echo.as_ref()?;
        let i = index as usize;
        if i >= self.echoed.len() {
            self.echoed.resize(i + 1, false);
        }
        (!std::mem::replace(&mut self.echoed[i], true)).then(|| echo.clone())
    }

    /// It answers a request of `n` choices (1 unless set).
    pub fn with_choices(mut self, n: usize) -> Self {
        self.offsets = vec![0; n.max(1)];
        self
    }

    /// Its chat answer is parsed for calls of `tools` (after [`Self::with_choices`]).
    pub fn with_tools(mut self, tools: Option<Tools>) -> Self {
        if let Some(t) = &tools {
            let parser = CallParser::new(t.names(), t.parallel);
            self.parsers = vec![parser; self.offsets.len()];
        }
        self.tools = tools;
        self
    }

    /// The whole answer of a request that was not streamed (`whole` as `output::collect`
    /// folds the responses: one choice, or several in `whole.choices`).
    pub fn whole(mut self, mut whole: GenerateResponse) -> String {
        let usage = usage(&whole);
        let choices = match std::mem::take(&mut whole.choices) {
            several if !several.is_empty() => several,
            _ => vec![whole],
        };
        match self.endpoint {
            Endpoint::Completions => {
                let choices = choices
                    .into_iter()
                    .map(|c| CompletionChoice {
                        index: c.index,
                        logprobs: self.legacy(&c),
                        finish_reason: finish_reason(c.finish_reason),
                        text: self.echo.clone().unwrap_or_default() + &c.text,
                    })
                    .collect();
                self.completion_chunk(choices, Some(usage))
            }
            Endpoint::Chat => {
                let choices = choices.into_iter().map(|c| self.chat_choice(c)).collect();
                json(&ChatCompletion {
                    id: self.id.clone(),
                    object: "chat.completion",
                    created: self.created,
                    model: self.model.clone(),
                    choices,
                    usage,
                })
            }
        }
    }

    /// One choice of a whole chat answer; with tools, its calls parsed out of the text.
    fn chat_choice(&self, c: GenerateResponse) -> ChatChoice {
        let logprobs = self.chat_logprobs(&c);
        let finish = finish_reason(c.finish_reason);
        let (content, tool_calls) = match &self.tools {
            None => (Some(c.text), Vec::new()),
            Some(t) => {
                let parsed = tool_calls::parse(t.names(), t.parallel, &c.text);
                let calls: Vec<ToolCall> = parsed
                    .calls
                    .into_iter()
                    .map(|(name, arguments)| ToolCall {
                        id: call_id(),
                        kind: "function",
                        function: FunctionCall { name, arguments },
                    })
                    .collect();
                let content = Some(parsed.content).filter(|c| !c.is_empty());
                (content, calls)
            }
        };
        ChatChoice {
            index: c.index,
            logprobs,
            finish_reason: tool_finish(finish, !tool_calls.is_empty()),
            message: ChatMessageOut {
                role: "assistant",
                content,
                tool_calls,
            },
        }
    }

    fn legacy(&mut self, r: &GenerateResponse) -> Option<super::types::CompletionLogprobs> {
        if self.logprobs != LogprobsFormat::Legacy {
            return None;
        }
        let i = r.index as usize;
        if i >= self.offsets.len() {
            self.offsets.resize(i + 1, 0);
        }
        let offset = &mut self.offsets[i];
        // A choice's first response holds its prompt's logprobs when it echoes the prompt.
        let prompt = match self.echo {
            Some(_) => &r.prompt_token_ids[..],
            None => &[],
        };
        Some(logprobs::completion(
            &self.tokenizer,
            prompt,
            &r.prompt_logprobs,
            &r.logprobs,
            offset,
        ))
    }

    fn chat_logprobs(&self, r: &GenerateResponse) -> Option<super::types::ChatLogprobs> {
        (self.logprobs == LogprobsFormat::Chat)
            .then(|| logprobs::chat(&self.tokenizer, &r.logprobs))
    }

    fn chat_chunk(&self, choices: Vec<ChatChunkChoice>, usage: Option<Usage>) -> String {
        json(&ChatChunk {
            id: self.id.clone(),
            object: "chat.completion.chunk",
            created: self.created,
            model: self.model.clone(),
            choices,
            usage,
        })
    }

    fn completion_chunk(&self, choices: Vec<CompletionChoice>, usage: Option<Usage>) -> String {
        json(&Completion {
            id: self.id.clone(),
            object: "text_completion",
            created: self.created,
            model: self.model.clone(),
            choices,
            usage,
        })
    }

    /// What a stream starts with: a chat stream names every choice's role first, as OpenAI's
    /// does.
    pub fn opening(&self) -> Vec<String> {
        match self.endpoint {
            Endpoint::Completions => Vec::new(),
            Endpoint::Chat => (0..self.offsets.len() as u32)
                .map(|index| {
                    self.chat_chunk(
                        vec![ChatChunkChoice {
                            index,
                            delta: Delta {
                                role: Some("assistant"),
                                content: Some(String::new()),
                                ..Default::default()
                            },
                            logprobs: None,
                            finish_reason: None,
                        }],
                        None,
                    )
                })
                .collect(),
        }
    }

    /// The events (their `data`) one response of the stream makes: none while a token adds no
    /// text (a partial character, a possible stop string) unless logprobs were asked for.
    pub fn events(&mut self, item: Result<GenerateResponse, ServeError>) -> Vec<String> {
        let r = match item {
            Ok(r) => r,
            Err(e) => return vec![ApiError::from(e).to_json(), "[DONE]".into()],
        };
        let finish = finish_reason(r.finish_reason);
        let mut out = Vec::new();
        let has_logprobs = self.logprobs != LogprobsFormat::None && !r.logprobs.is_empty();
        let echo = self.take_echo(r.index);
        if self.endpoint == Endpoint::Chat && self.tools.is_some() {
            out = self.tool_chunks(&r, finish);
        } else if !r.text.is_empty() || has_logprobs || finish.is_some() || echo.is_some() {
            out.push(match self.endpoint {
                Endpoint::Completions => {
                    let choice = CompletionChoice {
                        index: r.index,
                        logprobs: self.legacy(&r),
                        text: echo.unwrap_or_default() + &r.text,
                        finish_reason: finish,
                    };
                    self.completion_chunk(vec![choice], None)
                }
                Endpoint::Chat => {
                    let choice = ChatChunkChoice {
                        index: r.index,
                        logprobs: self.chat_logprobs(&r),
                        delta: Delta {
                            content: (!r.text.is_empty()).then(|| r.text.clone()),
                            ..Default::default()
                        },
                        finish_reason: finish,
                    };
                    self.chat_chunk(vec![choice], None)
                }
            });
        }
        if finish.is_some() {
            self.finished += 1;
        }
        // The request's last response: every choice has finished (it carries the usage).
        if finish.is_some() && self.finished >= self.offsets.len() {
            if self.include_usage {
                let usage = Some(usage(&r));
                out.push(match self.endpoint {
                    Endpoint::Completions => self.completion_chunk(Vec::new(), usage),
                    Endpoint::Chat => self.chat_chunk(Vec::new(), usage),
                });
            }
            out.push("[DONE]".into());
        }
        out
    }

    /// The chunks one response of a chat stream with tools makes: its text through the
    /// choice's parser, as content and call deltas (none while text is held back), logprobs
    /// on the first, the finish reason on the last.
    fn tool_chunks(&mut self, r: &GenerateResponse, finish: Option<&'static str>) -> Vec<String> {
        let (pieces, called) = match self.parsers.get_mut(r.index as usize) {
            Some(p) => {
                let mut pieces = p.push(&r.text);
                if finish.is_some() {
                    pieces.extend(p.finish());
                }
                (pieces, p.calls() > 0)
            }
            None => (vec![Piece::Text(r.text.clone())], false),
        };
        let mut deltas = deltas(pieces);
        let has_logprobs = self.logprobs != LogprobsFormat::None && !r.logprobs.is_empty();
        if deltas.is_empty() && (has_logprobs || finish.is_some()) {
            deltas.push(Delta::default());
        }
        let mut logprobs = self.chat_logprobs(r);
        let last = deltas.len().saturating_sub(1);
        let finish = tool_finish(finish, called);
        deltas
            .into_iter()
            .enumerate()
            .map(|(k, delta)| {
                let choice = ChatChunkChoice {
                    index: r.index,
                    delta,
                    logprobs: logprobs.take(),
                    finish_reason: if k == last { finish } else { None },
                };
                self.chat_chunk(vec![choice], None)
            })
            .collect()
    }

    /// The SSE response over a request's receiver (see the module doc).
    pub fn stream(mut self, rx: ResponseReceiver) -> Response {
        let opening = self.opening();
        let events = stream::iter(opening)
            .chain(
                ResponseStream::new(rx)
                    .map(move |item| stream::iter(self.events(item)))
                    .flatten(),
            )
            .map(|data| Ok::<_, Infallible>(Event::default().data(data)));
        Sse::new(events).into_response()
    }
}

/// `tool_calls` for an answer that called tools and ended by itself.
fn tool_finish(finish: Option<&'static str>, called: bool) -> Option<&'static str> {
    match finish {
        Some("stop") if called => Some("tool_calls"),
        other => other,
    }
}

/// The parser's pieces as deltas: text as `content`, a call's start with its id, type and
/// name (and empty `arguments`), then its arguments; neighbours of a kind merged.
fn deltas(pieces: Vec<Piece>) -> Vec<Delta> {
    let mut out: Vec<Delta> = Vec::new();
    for piece in pieces {
        match piece {
            Piece::Text(t) => match out.last_mut().and_then(|d| d.content.as_mut()) {
                Some(content) => content.push_str(&t),
                None => out.push(Delta {
                    content: Some(t),
                    ..Default::default()
                }),
            },
            Piece::Call { index, name } => out.push(Delta {
                tool_calls: vec![ToolCallDelta {
                    index: index as u32,
                    id: Some(call_id()),
                    kind: Some("function"),
                    function: FunctionDelta {
                        name: Some(name),
                        arguments: String::new(),
                    },
                }],
                ..Default::default()
            }),
            Piece::Args { index, text } => {
                let more = out
                    .last_mut()
                    .and_then(|d| d.tool_calls.last_mut())
                    .filter(|c| c.index == index as u32 && c.id.is_none());
                match more {
                    Some(c) => c.function.arguments.push_str(&text),
                    None => out.push(Delta {
                        tool_calls: vec![ToolCallDelta {
                            index: index as u32,
                            id: None,
                            kind: None,
                            function: FunctionDelta {
                                name: None,
                                arguments: text,
                            },
                        }],
                        ..Default::default()
                    }),
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use helios_proto::v1::{SampledLogprobs, TokenLogprob, Usage as WireUsage};

    fn tokenizer() -> Arc<TextTokenizer> {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../models/SmolLM2-135M-Instruct.Q4_1.gguf");
        Arc::new(TextTokenizer::from_model_path(&path).expect("the default model"))
    }

    fn responder(endpoint: Endpoint, logprobs: LogprobsFormat, usage: bool) -> Responder {
        let id = "x-1".to_string();
        Responder::new(endpoint, id, 7, "m".into(), logprobs, usage, tokenizer())
    }

    fn token(id: u32, text: &str, finish: FinishReason) -> Result<GenerateResponse, ServeError> {
        let last = finish != FinishReason::Unspecified;
        Ok(GenerateResponse {
            text: text.into(),
            token_ids: vec![id],
            logprobs: vec![SampledLogprobs {
                sampled: Some(TokenLogprob {
                    token_id: id,
                    logprob: -0.25,
                }),
                top: vec![],
            }],
            finish_reason: finish as i32,
            usage: last.then_some(WireUsage {
                prompt_tokens: 5,
                completion_tokens: 3,
                total_tokens: 8,
            }),
            ..Default::default()
        })
    }

    fn parse(events: &[String]) -> Vec<serde_json::Value> {
        events
            .iter()
            .filter(|e| *e != "[DONE]")
            .map(|e| serde_json::from_str(e).expect("JSON"))
            .collect()
    }

    #[test]
    fn a_chat_stream_opens_with_the_role_and_ends_with_usage_then_done() {
        let mut r = responder(Endpoint::Chat, LogprobsFormat::None, true);
        let mut events = r.opening();
        events.extend(r.events(token(1, "Hel", FinishReason::Unspecified)));
        // A token that adds no text (half a character) makes no event without logprobs.
        events.extend(r.events(token(2, "", FinishReason::Unspecified)));
        events.extend(r.events(token(3, "lo", FinishReason::Eos)));
        assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
        let v = parse(&events);
        assert_eq!(v.len(), 4, "{events:?}");
        assert_eq!(v[0]["choices"][0]["delta"]["role"], "assistant");
        assert_eq!(v[0]["object"], "chat.completion.chunk");
        assert_eq!(v[1]["choices"][0]["delta"]["content"], "Hel");
        assert_eq!(v[1]["choices"][0]["finish_reason"], serde_json::Value::Null);
        assert_eq!(v[2]["choices"][0]["delta"]["content"], "lo");
        assert_eq!(v[2]["choices"][0]["finish_reason"], "stop");
        assert!(v[2].get("usage").is_none());
        assert_eq!(v[3]["choices"].as_array().map(Vec::len), Some(0));
        assert_eq!(v[3]["usage"]["total_tokens"], 8);
    }

    #[test]
    fn a_completion_stream_with_logprobs_has_one_chunk_per_token() {
        let mut r = responder(Endpoint::Completions, LogprobsFormat::Legacy, false);
        assert!(r.opening().is_empty());
        let mut events = Vec::new();
        for (i, text) in ["A", "", "B"].iter().enumerate() {
            events.extend(r.events(token(300 + i as u32, text, FinishReason::Unspecified)));
        }
        events.extend(r.events(token(303, "", FinishReason::Length)));
        let v = parse(&events);
        assert_eq!(v.len(), 4, "{events:?}");
        assert_eq!(v[3]["choices"][0]["finish_reason"], "length");
        assert!(v
            .iter()
            .all(|c| c["object"] == "text_completion" && c.get("usage").is_none()));
        let offsets: Vec<u64> = v
            .iter()
            .map(|c| {
                c["choices"][0]["logprobs"]["text_offset"][0]
                    .as_u64()
                    .unwrap()
            })
            .collect();
        assert!(offsets.windows(2).all(|w| w[0] <= w[1]), "{offsets:?}");
    }

    #[test]
    fn several_choices_stream_by_index_and_end_once_all_have_finished() {
        let mut r = responder(Endpoint::Chat, LogprobsFormat::None, true).with_choices(2);
        let mut events = r.opening();
        let mut tok = |index: u32, text: &str, finish| {
            let mut t = token(index, text, finish).unwrap();
            t.index = index;
            r.events(Ok(t))
        };
        events.extend(tok(1, "B", FinishReason::Unspecified));
        events.extend(tok(0, "A", FinishReason::Eos));
        assert_ne!(events.last().map(String::as_str), Some("[DONE]"));
        events.extend(tok(1, "b", FinishReason::Length));
        assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
        let v = parse(&events);
        let indices: Vec<Option<u64>> = v
            .iter()
            .map(|c| c["choices"][0]["index"].as_u64())
            .collect();
        assert_eq!(indices[..5], [0, 1, 1, 0, 1].map(Some));
        assert_eq!(v[0]["choices"][0]["delta"]["role"], "assistant");
        assert_eq!(v[1]["choices"][0]["delta"]["role"], "assistant");
        assert_eq!(v[5]["choices"].as_array().map(Vec::len), Some(0));
        assert_eq!(v.len(), 6, "one usage chunk, after the last choice");
        // Whole: every choice, usage at the top.
        let r = responder(Endpoint::Completions, LogprobsFormat::None, false).with_choices(2);
        let choices = (0..2)
            .map(|i| GenerateResponse {
                index: i,
                text: format!("t{i}"),
                finish_reason: FinishReason::Length as i32,
                ..Default::default()
            })
            .collect();
        let whole = GenerateResponse {
            choices,
            ..token(0, "", FinishReason::Unspecified).unwrap()
        };
        let v: serde_json::Value = serde_json::from_str(&r.whole(whole)).unwrap();
        assert_eq!(v["choices"][1]["text"], "t1");
        assert_eq!(v["choices"][1]["index"], 1);
        assert_eq!(v["choices"][1]["finish_reason"], "length");
    }

    #[test]
    fn an_error_after_the_start_is_an_error_event_then_done() {
        let mut r = responder(Endpoint::Completions, LogprobsFormat::None, true);
        let events = r.events(Err(ServeError::ReplicaDown("rank 1".into())));
        assert_eq!(events.len(), 2);
        assert_eq!(events[1], "[DONE]");
        let v = parse(&events);
        assert_eq!(v[0]["error"]["code"], "service_unavailable");
        assert!(v[0]["error"]["message"]
            .as_str()
            .unwrap()
            .contains("rank 1"));
    }

    #[test]
    fn whole_answers_carry_usage_and_finish_reasons() {
        let r = responder(Endpoint::Chat, LogprobsFormat::Chat, false);
        let whole = token(1, "Hi", FinishReason::Stop).unwrap();
        let v: serde_json::Value = serde_json::from_str(&r.whole(whole)).unwrap();
        assert_eq!(v["object"], "chat.completion");
        assert_eq!(v["choices"][0]["message"]["content"], "Hi");
        assert_eq!(v["choices"][0]["message"]["role"], "assistant");
        assert_eq!(v["choices"][0]["finish_reason"], "stop");
        assert_eq!(v["choices"][0]["logprobs"]["content"][0]["logprob"], -0.25);
        assert_eq!(v["usage"]["prompt_tokens"], 5);
        let r = responder(Endpoint::Completions, LogprobsFormat::None, false);
        let whole = token(1, "Hi", FinishReason::Cancelled).unwrap();
        let v: serde_json::Value = serde_json::from_str(&r.whole(whole)).unwrap();
        assert_eq!(v["choices"][0]["text"], "Hi");
        assert_eq!(v["choices"][0]["finish_reason"], "abort");
        assert_eq!(v["choices"][0]["logprobs"], serde_json::Value::Null);
        assert_eq!(v["usage"]["completion_tokens"], 3);
    }

    #[test]
    fn an_echo_starts_every_choice_once_streamed_or_whole() {
        let echo = || Some("Once upon".to_string());
        let mut r = responder(Endpoint::Completions, LogprobsFormat::None, false)
            .with_choices(2)
            .with_echo(echo());
        let mut tok = |index: u32, text: &str, finish| {
            let mut t = token(1, text, finish).unwrap();
            t.index = index;
            r.events(Ok(t))
        };
        // A first token with no text of its own still carries the echo.
        let mut events = tok(1, "", FinishReason::Unspecified);
        events.extend(tok(0, " a", FinishReason::Unspecified));
        events.extend(tok(1, " time", FinishReason::Stop));
        events.extend(tok(0, " time", FinishReason::Stop));
        let text = |i: u64| -> String {
            parse(&events)
                .iter()
                .flat_map(|c| c["choices"].as_array().cloned().unwrap_or_default())
                .filter(|c| c["index"] == i)
                .map(|c| c["text"].as_str().unwrap_or("").to_string())
                .collect()
        };
        assert_eq!(text(0), "Once upon a time");
        assert_eq!(text(1), "Once upon time");
        let whole = token(1, " a time", FinishReason::Stop).unwrap();
        let r = responder(Endpoint::Completions, LogprobsFormat::None, false).with_echo(echo());
        let v: serde_json::Value = serde_json::from_str(&r.whole(whole)).unwrap();
        assert_eq!(v["choices"][0]["text"], "Once upon a time");
        // Chat has no echo.
        let r = responder(Endpoint::Chat, LogprobsFormat::None, false).with_echo(echo());
        let whole = token(1, "Hi", FinishReason::Stop).unwrap();
        let v: serde_json::Value = serde_json::from_str(&r.whole(whole)).unwrap();
        assert_eq!(v["choices"][0]["message"]["content"], "Hi");
    }

    #[test]
    fn a_streamed_call_is_deltas_that_add_up_to_the_whole_answer() {
        let tools = super::super::tools::read(
            Some(serde_json::json!([{"type": "function", "function": {"name": "add"}}])),
            None,
            None,
        )
        .unwrap();
        let text = "Sure. <tool_call>\n{\"name\": \"add\", \"arguments\": {\"a\": 1, \"b\": 22}}\n</tool_call>";
        let whole =
            responder(Endpoint::Chat, LogprobsFormat::None, false).with_tools(tools.clone());
        let w: serde_json::Value =
            serde_json::from_str(&whole.whole(token(1, text, FinishReason::Eos).unwrap())).unwrap();
        let m = &w["choices"][0]["message"];
        assert_eq!(w["choices"][0]["finish_reason"], "tool_calls");
        assert_eq!(m["content"], "Sure. ");
        assert_eq!(m["tool_calls"][0]["type"], "function");
        assert_eq!(m["tool_calls"][0]["function"]["name"], "add");
        assert_eq!(
            m["tool_calls"][0]["function"]["arguments"],
            "{\"a\": 1, \"b\": 22}"
        );
        assert!(m["tool_calls"][0]["id"]
            .as_str()
            .unwrap()
            .starts_with("call_"));
        // Streamed three bytes at a time.
        let mut r = responder(Endpoint::Chat, LogprobsFormat::None, false).with_tools(tools);
        let mut events = r.opening();
        let bytes = text.as_bytes();
        for (k, piece) in bytes.chunks(3).enumerate() {
            let last = (k + 1) * 3 >= bytes.len();
            let finish = if last {
                FinishReason::Eos
            } else {
                FinishReason::Unspecified
            };
            events.extend(r.events(token(1, std::str::from_utf8(piece).unwrap(), finish)));
        }
        let v = parse(&events);
        let (mut content, mut args, mut names) = (String::new(), String::new(), Vec::new());
        for c in &v[1..] {
            let d = &c["choices"][0]["delta"];
            content.push_str(d["content"].as_str().unwrap_or(""));
            if let Some(call) = d["tool_calls"].get(0) {
                assert_eq!(call["index"], 0);
                if let Some(name) = call["function"]["name"].as_str() {
                    assert_eq!(call["function"]["arguments"], "");
                    assert!(call["id"].as_str().unwrap().starts_with("call_"));
                    names.push(name.to_string());
                }
                args.push_str(call["function"]["arguments"].as_str().unwrap());
            }
        }
        assert!(
            !content.contains('<'),
            "the tag is never content: {content:?}"
        );
        assert_eq!(
            (content.as_str(), names),
            ("Sure. ", vec!["add".to_string()])
        );
        assert_eq!(
            args,
            m["tool_calls"][0]["function"]["arguments"]
                .as_str()
                .unwrap()
        );
        assert_eq!(
            v.last().unwrap()["choices"][0]["finish_reason"],
            "tool_calls"
        );
        assert!(v.len() > 4, "the arguments come in pieces: {events:?}");
    }
}
