//! One request as operators see it: its spans, its metrics and its log lines, kept beside its
//! output in the step loop and told of every turn of its life.
//!
//! - **Spans**: `request` (a child of the client's `traceparent`, if it sent one) with one
//!   child per phase: `queue` (arrival to its first step), `prefill` (to its first token),
//!   `decode` (to its last). A preempted request goes back to `queue`, then `prefill` again
//!   (the recompute). The request span ends with its prompt and output tokens, finish reason
//!   and preemptions as attributes. The step loop parents each step's span on the phase span
//!   of one request in it (see `step_loop`).
//! - **Metrics**: queue time, time to first token, inter-token latency and end-to-end latency;
//!   prompt tokens (once, at the first token, as vLLM counts them), generated tokens, and how
//!   the request ended (`helios_requests_finished_total`).
//! - **Logs**: a line when the request is accepted and one when it ends, each with its
//!   `request_id` (as is every other line about a request). Prompt text only with
//!   `--log-prompts`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use helios_proto::telemetry;
use helios_proto::v1::Timings;
use opentelemetry::trace::SpanContext;
use tracing::field::Empty;
use tracing::Span;

use crate::error::ServeError;
use crate::metrics::Metrics;

/// Where a request is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Queue,
    Prefill,
    Decode,
    Ended,
}

pub struct RequestTrace {
    request_id: String,
    metrics: Arc<Metrics>,
    span: Span,
    phase_span: Span,
    phase: Phase,
    /// The request span's context when it is exported (sampled): steps link to it.
    exported: Option<SpanContext>,
    prompt_tokens: u32,
    completion_tokens: u32,
    preemptions: u32,
    /// Times it went back to the queue because its replica lost a rank.
    requeues: u32,
    /// Times it moved to another replica because its own was lost.
    moves: u32,
    arrival: Instant,
    scheduled: Option<Instant>,
    first_token: Option<Instant>,
    last_token: Option<Instant>,
}

/// How a request came in, for its span and its first log line.
pub struct Arrival<'a> {
    pub request_id: String,
    /// The client's trace context (`traceparent`), if it sent one.
    pub parent: Option<opentelemetry::Context>,
    pub prompt_tokens: u32,
    pub max_new_tokens: usize,
    /// Logged only when set (`--log-prompts`).
    pub prompt_text: Option<&'a str>,
    pub arrival: Instant,
}

impl RequestTrace {
    pub fn start(a: Arrival<'_>, metrics: Arc<Metrics>) -> Self {
        let span = tracing::info_span!(
            parent: None,
            "request",
            otel.kind = "server",
            request_id = %a.request_id,
            prompt_tokens = a.prompt_tokens,
            max_new_tokens = a.max_new_tokens,
            output_tokens = Empty,
            finish_reason = Empty,
            preemptions = Empty,
            requeues = Empty,
            replica = Empty,
            moved = Empty,
            otel.status_code = Empty,
        );
        if let Some(parent) = a.parent {
            telemetry::set_parent(&span, parent);
        }
        let exported = telemetry::sampled_context(&span);
        let phase_span = tracing::info_span!(parent: &span, "queue");
        match a.prompt_text {
            Some(prompt) => tracing::info!(
                request_id = %a.request_id,
                prompt_tokens = a.prompt_tokens,
                max_new_tokens = a.max_new_tokens,
                prompt,
                "request received"
            ),
            None => tracing::info!(
                request_id = %a.request_id,
                prompt_tokens = a.prompt_tokens,
                max_new_tokens = a.max_new_tokens,
                "request received"
            ),
        }
        Self {
            request_id: a.request_id,
            metrics,
            span,
            phase_span,
            phase: Phase::Queue,
            exported,
            prompt_tokens: a.prompt_tokens,
            completion_tokens: 0,
            preemptions: 0,
            requeues: 0,
            moves: 0,
            arrival: a.arrival,
            scheduled: None,
            first_token: None,
            last_token: None,
        }
    }

    pub fn request_id(&self) -> &str {
        &self.request_id
    }

    pub fn prompt_tokens(&self) -> u32 {
        self.prompt_tokens
    }

    /// Tokens sent to the client so far.
    pub fn completion_tokens(&self) -> u32 {
        self.completion_tokens
    }

    /// The span a step this request takes part in should hang under (its current phase).
    pub fn phase_span(&self) -> &Span {
        &self.phase_span
    }

    /// The request span's context, when it is exported.
    pub fn exported(&self) -> Option<&SpanContext> {
        self.exported.as_ref()
    }

    /// Whether it is reading its prompt (its first, or a recompute after a preemption).
    pub fn in_prefill(&self) -> bool {
        self.phase == Phase::Prefill
    }

    fn enter(&mut self, phase: Phase) {
        self.phase = phase;
        self.phase_span = match phase {
            Phase::Queue => tracing::info_span!(parent: &self.span, "queue"),
            Phase::Prefill => tracing::info_span!(parent: &self.span, "prefill"),
            Phase::Decode => tracing::info_span!(parent: &self.span, "decode"),
            Phase::Ended => Span::none(),
        };
    }

    /// A step that reads its prompt from the start was planned: the first one, or the
    /// recompute after a preemption.
    pub fn scheduled(&mut self, now: Instant) {
        if self.scheduled.is_none() {
            self.scheduled = Some(now);
            self.metrics
                .queue_time
                .observe(now.duration_since(self.arrival).as_secs_f64());
        }
        if self.phase == Phase::Queue {
            self.enter(Phase::Prefill);
        }
    }

    /// It gave its blocks back and waits again.
    /// Its replica lost a rank: it waits again, its tokens kept, to be recomputed.
    pub fn requeued(&mut self) {
        self.requeues += 1;
        tracing::info!(request_id = %self.request_id, "requeued: the replica lost a rank");
        if self.phase != Phase::Ended {
            self.enter(Phase::Queue);
        }
    }

    /// The router chose replica `replica` for it (at arrival, or after a move).
    pub fn routed(&mut self, replica: u32) {
        self.span.record("replica", replica);
    }

    /// Its replica was lost: it moves to `to` with its tokens, waits there and is recomputed.
    pub fn moved(&mut self, from: u32, to: u32) {
        self.moves += 1;
        self.span.record("replica", to);
        tracing::info!(
            request_id = %self.request_id,
            from,
            to,
            "moved to another replica: its own was lost"
        );
        if self.phase != Phase::Ended {
            self.enter(Phase::Queue);
        }
    }

    pub fn preempted(&mut self) {
        self.preemptions += 1;
        tracing::debug!(request_id = %self.request_id, "preempted");
        if self.phase != Phase::Ended {
            self.enter(Phase::Queue);
        }
    }

    /// A token was sent to the client.
    pub fn token(&mut self, now: Instant) {
        self.completion_tokens += 1;
        self.metrics.generation_tokens.inc();
        match self.last_token {
            None => {
                self.first_token = Some(now);
                self.metrics
                    .time_to_first_token
                    .observe(now.duration_since(self.arrival).as_secs_f64());
                self.metrics.prompt_tokens.inc_by(self.prompt_tokens.into());
            }
            Some(last) => self
                .metrics
                .inter_token_latency
                .observe(now.duration_since(last).as_secs_f64()),
        }
        self.last_token = Some(now);
        if self.phase == Phase::Prefill {
            self.enter(Phase::Decode);
        }
    }

    /// Its timings for the last response.
    pub fn timings(&self, now: Instant) -> Timings {
        let secs = |t: Option<Instant>| t.unwrap_or(now).duration_since(self.arrival);
        Timings {
            queue_seconds: secs(self.scheduled).as_secs_f64(),
            time_to_first_token_seconds: secs(self.first_token).as_secs_f64(),
            total_seconds: secs(Some(now)).as_secs_f64(),
        }
    }

    /// It ended with a finish reason (`length`, `eos`, `stop`, `cancelled`).
    pub fn finished(&mut self, reason: &'static str, now: Instant) {
        let e2e = now.duration_since(self.arrival);
        self.metrics.e2e_latency.observe(e2e.as_secs_f64());
        self.end(reason, e2e, None);
    }

    /// It ended with an error.
    pub fn failed(&mut self, error: &ServeError) {
        self.end(error.finish_label(), self.arrival.elapsed(), Some(error));
    }

    fn end(&mut self, reason: &'static str, e2e: Duration, error: Option<&ServeError>) {
        if self.phase == Phase::Ended {
            return;
        }
        self.enter(Phase::Ended);
        self.metrics.finished(reason);
        let span = &self.span;
        span.record("output_tokens", self.completion_tokens);
        span.record("finish_reason", reason);
        span.record("preemptions", self.preemptions);
        span.record("requeues", self.requeues);
        span.record("moved", self.moves > 0);
        let ttft_ms = self
            .first_token
            .map(|t| t.duration_since(self.arrival).as_secs_f64() * 1e3);
        match error {
            None => tracing::info!(
                request_id = %self.request_id,
                finish_reason = reason,
                prompt_tokens = self.prompt_tokens,
                output_tokens = self.completion_tokens,
                preemptions = self.preemptions,
                moves = self.moves,
                ttft_ms,
                e2e_ms = e2e.as_secs_f64() * 1e3,
                "request finished"
            ),
            Some(error) => {
                span.record("otel.status_code", "ERROR");
                tracing::warn!(
                    request_id = %self.request_id,
                    finish_reason = reason,
                    %error,
                    output_tokens = self.completion_tokens,
                    "request failed"
                );
            }
        }
    }
}

impl Drop for RequestTrace {
    /// Dropped without an ending: the client went away (or its stream was closed).
    fn drop(&mut self) {
        if self.phase != Phase::Ended {
            self.end("aborted", self.arrival.elapsed(), None);
        }
    }
}
