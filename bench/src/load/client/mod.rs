//! Sending one request and timing it as its client sees it, over either protocol:
//! [`grpc`] (`helios.v1.Generation/GenerateStream`) or [`openai`] (`POST /v1/completions` with
//! `stream: true`, which Helios' HTTP API, vLLM, llama.cpp's server and others speak).
//!
//! Every request yields a [`Record`] (time to the first token, every gap between streamed
//! chunks, end-to-end latency, and the prompt and output tokens the server reports in its
//! usage) or an error message: a refused request, a broken stream or, with `--ignore-eos`, a
//! wrong number of output tokens counts as failed, never as a crash of the run. With the record
//! comes the answer itself ([`Reply`]), which the next turn of a chat session resends.

pub mod grpc;
pub mod openai;
pub mod sse;

use std::time::{Duration, Instant};

use super::dataset::{Input, Prompt};

/// One completed request.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    /// From sending the request to its first streamed token.
    pub ttft: Duration,
    /// Gaps between consecutive streamed chunks (a chunk may carry more than one token).
    pub itl: Vec<Duration>,
    /// From sending the request to the end of its stream.
    pub e2el: Duration,
    pub prompt_tokens: usize,
    pub output_tokens: usize,
}

impl Record {
    /// Time per output token after the first; `None` with a single output token.
    pub fn tpot(&self) -> Option<Duration> {
        (self.output_tokens > 1)
            .then(|| self.e2el.saturating_sub(self.ttft) / (self.output_tokens as u32 - 1).max(1))
    }
}

/// A completed request and what the server generated: token ids over gRPC, text over OpenAI
/// HTTP.
#[derive(Debug, Clone, PartialEq)]
pub struct Reply {
    pub record: Record,
    pub answer: Input,
}

/// Sampling settings sent with every request.
#[derive(Debug, Clone, Default)]
pub struct Sampling {
    pub temperature: f32,
    pub top_p: Option<f32>,
    pub top_k: Option<u32>,
    pub seed: Option<u64>,
    /// Generate exactly `max_tokens`, past end-of-sequence; a request that ends otherwise fails.
    pub ignore_eos: bool,
    /// Structured outputs (gRPC): this fraction of the requests, evenly spread, is held to
    /// this regex.
    pub constrained: Option<(f64, String)>,
    /// gRPC: prompt logprobs with this many most likely tokens.
    pub prompt_logprobs: Option<u32>,
}

impl Sampling {
    /// The regex request `i` is held to, if any: request i is constrained when
    /// `floor((i + 1) · fraction)` passes an integer, which spreads them evenly.
    pub fn constraint_of(&self, i: usize) -> Option<&str> {
        let (f, rx) = self.constrained.as_ref()?;
        ((((i + 1) as f64) * f).floor() > ((i as f64) * f).floor()).then_some(rx.as_str())
    }
}

/// The server under load.
pub enum Client {
    Grpc(grpc::Grpc),
    OpenAi(openai::OpenAi),
}

impl Client {
    /// Sends request `i` and times it.
    pub async fn send(
        &self,
        i: usize,
        prompt: &Prompt,
        sampling: &Sampling,
    ) -> Result<Reply, String> {
        let reply = match self {
            Client::Grpc(c) => c.send(i, prompt, sampling).await?,
            Client::OpenAi(c) => c.send(prompt, sampling).await?,
        };
        let output_tokens = reply.record.output_tokens;
        if sampling.ignore_eos && output_tokens != prompt.output_len {
            return Err(format!(
                "expected exactly {} output tokens (--ignore-eos), got {output_tokens}",
                prompt.output_len
            ));
        }
        Ok(reply)
    }

    /// The served model's name.
    pub fn model(&self) -> &str {
        match self {
            Client::Grpc(c) => &c.info.model,
            Client::OpenAi(c) => &c.model,
        }
    }
}

/// Timestamps of one stream as it arrives.
pub struct Clock {
    sent: Instant,
    first: Option<Instant>,
    last: Option<Instant>,
    itl: Vec<Duration>,
    /// Chunks that carried tokens.
    pub chunks: usize,
}

impl Clock {
    /// Starts the clock: call right before sending.
    pub fn start() -> Clock {
        Clock {
            sent: Instant::now(),
            first: None,
            last: None,
            itl: Vec::new(),
            chunks: 0,
        }
    }

    /// A chunk carrying one or more tokens arrived now.
    pub fn chunk(&mut self) {
        let now = Instant::now();
        match self.last {
            None => self.first = Some(now),
            Some(last) => self.itl.push(now - last),
        }
        self.last = Some(now);
        self.chunks += 1;
    }

    /// The stream ended now.
    pub fn finish(self, prompt_tokens: usize, output_tokens: usize) -> Result<Record, String> {
        let first = self.first.ok_or("the stream ended without a token")?;
        Ok(Record {
            ttft: first - self.sent,
            itl: self.itl,
            e2el: self.sent.elapsed(),
            prompt_tokens,
            output_tokens,
        })
    }
}

/// At most `n` characters of `s`, for error messages that quote a server's answer.
pub fn clip(s: &str, n: usize) -> String {
    match s.char_indices().nth(n) {
        Some((at, _)) => format!("{}…", &s[..at]),
        None => s.to_string(),
    }
}
