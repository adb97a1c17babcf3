//! Sampled tokens become what the client reads: text deltas (never a split UTF-8 character,
//! never a stop string), logprobs when asked, and on the last response the finish reason, usage
//! and timings.
//!
//! One [`RequestOutput`] per request lives in the step loop. Its channel holds at most
//! [`OUTPUT_BUFFER`] responses, and the step loop never waits on it: a client that stops
//! reading its stream (its transport's window full) fills it, and then its request is
//! **cancelled**, not paused: its KV blocks go back to everyone else at once, and the client,
//! if it ever reads again, gets what was queued and then RESOURCE_EXHAUSTED. Pausing would keep
//! its blocks held for as long as the client cares to stall. A client that reads keeps the
//! channel nearly empty: the step loop adds one response per step.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::Result;
use helios_proto::v1::{
    FinishReason as WireFinish, GenerateResponse, SampledLogprobs, TokenLogprob, Usage,
};
use tokio::sync::{mpsc, oneshot};

use crate::admission::Admitted;
use crate::detokenizer::Detokenizer;
use crate::error::ServeError;
use crate::request_trace::RequestTrace;
use crate::scheduler::{FinishReason, Sampled};
use crate::stop::StopMatcher;
use crate::tokenizer::TextTokenizer;

/// Responses queued for one request's client at most (one per step; see the module doc).
pub const OUTPUT_BUFFER: usize = 256;

type Item = Result<GenerateResponse, ServeError>;

/// The step loop's end of a request's channel: never waits.
#[derive(Debug)]
pub struct ResponseSender {
    tx: mpsc::Sender<Item>,
    overflowed: Arc<AtomicBool>,
}

/// The client's end of a request's channel.
#[derive(Debug)]
pub struct ResponseReceiver {
    rx: mpsc::Receiver<Item>,
    overflowed: Arc<AtomicBool>,
    /// The overflow was reported.
    told: bool,
}

/// A request's response channel (see [`OUTPUT_BUFFER`]).
pub fn response_channel() -> (ResponseSender, ResponseReceiver) {
    let (tx, rx) = mpsc::channel(OUTPUT_BUFFER);
    let overflowed = Arc::new(AtomicBool::new(false));
    let receiver = ResponseReceiver {
        rx,
        overflowed: overflowed.clone(),
        told: false,
    };
    (ResponseSender { tx, overflowed }, receiver)
}

impl ResponseSender {
    /// Queues `item`; true if that overflowed the channel (this response is lost, and the
    /// request is to be cancelled).
    fn send(&self, item: Item) -> bool {
        match self.tx.try_send(item) {
            Err(mpsc::error::TrySendError::Full(_)) => {
                !self.overflowed.swap(true, Ordering::AcqRel)
            }
            _ => false,
        }
    }

    /// The client left, or stopped reading.
    fn is_closed(&self) -> bool {
        self.tx.is_closed() || self.overflowed.load(Ordering::Acquire)
    }
}

impl ResponseReceiver {
    pub async fn recv(&mut self) -> Option<Item> {
        std::future::poll_fn(|cx| self.poll_recv(cx)).await
    }

    /// A response if one is queued now.
    pub fn try_recv(&mut self) -> Option<Item> {
        self.rx.try_recv().ok()
    }

    /// The next response; once the sender is gone after an overflow, RESOURCE_EXHAUSTED once.
    pub fn poll_recv(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Option<Item>> {
        use std::task::Poll;
        match self.rx.poll_recv(cx) {
            Poll::Ready(None) if self.overflowed.load(Ordering::Acquire) && !self.told => {
                self.told = true;
                Poll::Ready(Some(Err(ServeError::SlowClient(OUTPUT_BUFFER))))
            }
            other => other,
        }
    }
}

/// Where the logits of a request's first sampled token go, for a caller in this process that
/// asked for them (`helios logits`).
pub type LogitsSender = oneshot::Sender<Vec<f32>>;

/// Counts requests that have not ended; a request counts until its output is dropped.
#[derive(Debug, Clone, Default)]
pub struct InFlight(Arc<AtomicUsize>);

impl InFlight {
    pub fn count(&self) -> usize {
        self.0.load(Ordering::Acquire)
    }

    fn enter(&self) -> InFlightGuard {
        self.0.fetch_add(1, Ordering::AcqRel);
        InFlightGuard(self.0.clone())
    }
}

struct InFlightGuard(Arc<AtomicUsize>);

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

pub struct RequestOutput {
    _in_flight: InFlightGuard,
    tx: ResponseSender,
    detok: Detokenizer,
    stops: StopMatcher,
    logprobs: Option<u32>,
    /// Its spans, metrics and log lines; its id, token counts and timings.
    trace: RequestTrace,
    logits: Option<LogitsSender>,
}

impl RequestOutput {
    pub fn new(
        tx: ResponseSender,
        req: &Admitted,
        trace: RequestTrace,
        in_flight: &InFlight,
    ) -> Self {
        Self {
            _in_flight: in_flight.enter(),
            tx,
            detok: Detokenizer::new(&req.prompt_ids),
            stops: StopMatcher::new(req.stop.clone()),
            logprobs: req.logprobs,
            trace,
            logits: None,
        }
    }

    /// Sends the logits of its first sampled token to `logits` (the request must ask the
    /// ranks for them: `SequenceParams::return_logits`).
    pub fn with_logits(mut self, logits: LogitsSender) -> Self {
        self.logits = Some(logits);
        self
    }

    pub fn request_id(&self) -> &str {
        self.trace.request_id()
    }

    pub fn trace(&self) -> &RequestTrace {
        &self.trace
    }

    /// It was preempted: it waits again.
    pub fn preempted(&mut self) {
        self.trace.preempted();
    }

    /// Its replica lost a rank: it waits again, to be recomputed.
    pub fn requeued(&mut self) {
        self.trace.requeued();
    }

    /// The router chose replica `replica` for it.
    pub fn routed(&mut self, replica: u32) {
        self.trace.routed(replica);
    }

    /// Its replica was lost: it moves from `from` to `to`, and counts as `to`'s in flight.
    pub fn moved(&mut self, from: u32, to: u32, in_flight: &InFlight) {
        self._in_flight = in_flight.enter();
        self.trace.moved(from, to);
    }

    /// The client went away (cancelled, disconnected, or its deadline passed).
    pub fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }

    /// A step that reads the request's prompt from its start was planned: its first (its
    /// queueing ends) or the recompute after a preemption.
    pub fn mark_scheduled(&mut self, now: Instant) {
        self.trace.scheduled(now);
    }

    /// Streams one sampled token; returns how the request ended, if it did (the scheduler's
    /// reason, or a stop string found in the text).
    pub fn push(&mut self, tokenizer: &TextTokenizer, s: Sampled) -> Result<Option<FinishReason>> {
        let now = Instant::now();
        self.trace.token(now);
        if let (Some(row), Some(to)) = (s.logits, self.logits.take()) {
            let _ = to.send(row);
        }
        let delta = self.detok.push(tokenizer, s.token.token_id)?;
        let matched = self.stops.push(&delta);
        let mut text = matched.emit;
        let finish = if matched.stopped {
            Some(FinishReason::Stop)
        } else {
            s.finish
        };
        if finish.is_some() && !matched.stopped {
            text.push_str(&self.stops.finish());
        }
        let logprobs = self.logprobs.map(|_| SampledLogprobs {
            sampled: Some(TokenLogprob {
                token_id: s.token.token_id,
                logprob: s.token.logprob,
            }),
            top: s.token.top_logprobs,
        });
        let mut resp = GenerateResponse {
            request_id: self.trace.request_id().to_string(),
            text,
            token_ids: vec![s.token.token_id],
            logprobs: logprobs.into_iter().collect(),
            ..Default::default()
        };
        if let Some(reason) = finish {
            self.close(&mut resp, wire_finish(reason), now);
        }
        // A client that left, or stopped reading, is noticed before the next step.
        if self.tx.send(Ok(resp)) {
            tracing::warn!(
                request_id = self.trace.request_id(),
                "the client is not reading its stream ({OUTPUT_BUFFER} responses wait for it); \
                 cancelling the request"
            );
        }
        Ok(finish)
    }

    /// Makes `resp` the last response: finish reason, usage, timings.
    fn close(&mut self, resp: &mut GenerateResponse, reason: WireFinish, now: Instant) {
        resp.finish_reason = reason as i32;
        resp.usage = Some(Usage {
            prompt_tokens: self.trace.prompt_tokens(),
            completion_tokens: self.trace.completion_tokens(),
            total_tokens: self.trace.prompt_tokens() + self.trace.completion_tokens(),
        });
        resp.timings = Some(self.trace.timings(now));
        self.trace.finished(finish_name(reason), now);
    }

    /// Ends the request early (server shutdown): the held-back text, then CANCELLED.
    pub fn cancel(mut self) {
        let mut resp = GenerateResponse {
            request_id: self.trace.request_id().to_string(),
            text: self.stops.finish(),
            ..Default::default()
        };
        self.close(&mut resp, WireFinish::Cancelled, Instant::now());
        self.tx.send(Ok(resp));
    }

    /// Ends the request with an error.
    pub fn fail(mut self, error: ServeError) {
        self.trace.failed(&error);
        self.tx.send(Err(error));
    }
}

/// How a finish reason reads in metrics, logs and `helios generate --json`: the proto name
/// without its prefix.
pub fn finish_name(reason: WireFinish) -> &'static str {
    match reason {
        WireFinish::Length => "length",
        WireFinish::Eos => "eos",
        WireFinish::Stop => "stop",
        WireFinish::Cancelled => "cancelled",
        WireFinish::Unspecified => "unspecified",
    }
}

pub fn wire_finish(reason: FinishReason) -> WireFinish {
    match reason {
        FinishReason::Length => WireFinish::Length,
        FinishReason::Eos => WireFinish::Eos,
        FinishReason::Stop => WireFinish::Stop,
    }
}

/// A request's responses as a stream that always ends with a finish reason or an error: if
/// the sending side vanished without either (a bug in the step loop), the client is told so
/// instead of seeing a stream that simply stops.
pub struct ResponseStream {
    rx: ResponseReceiver,
    ended: bool,
}

impl ResponseStream {
    pub fn new(rx: ResponseReceiver) -> Self {
        Self { rx, ended: false }
    }
}

impl futures::Stream for ResponseStream {
    type Item = Result<GenerateResponse, ServeError>;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        use std::task::Poll;
        if self.ended {
            return Poll::Ready(None);
        }
        match self.rx.poll_recv(cx) {
            Poll::Ready(Some(item)) => {
                let last = match &item {
                    Ok(r) => r.finish_reason != WireFinish::Unspecified as i32,
                    Err(_) => true,
                };
                self.ended = last;
                Poll::Ready(Some(item))
            }
            Poll::Ready(None) => {
                self.ended = true;
                Poll::Ready(Some(Err(ServeError::Internal(
                    "the request ended without a finish reason (the server lost it)".into(),
                ))))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

/// Folds a stream's responses into the one answer of the unary `Generate`.
pub async fn collect(mut rx: ResponseReceiver) -> Result<GenerateResponse, ServeError> {
    let mut whole = GenerateResponse::default();
    while let Some(resp) = rx.recv().await {
        let resp = resp?;
        whole.request_id = resp.request_id;
        whole.text.push_str(&resp.text);
        whole.token_ids.extend(resp.token_ids);
        whole.logprobs.extend(resp.logprobs);
        if resp.finish_reason != WireFinish::Unspecified as i32 {
            whole.finish_reason = resp.finish_reason;
            whole.usage = resp.usage;
            whole.timings = resp.timings;
            return Ok(whole);
        }
    }
    Err(ServeError::Internal(
        "the request ended without a finish reason".into(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;

    fn response(finish: WireFinish) -> Result<GenerateResponse, ServeError> {
        Ok(GenerateResponse {
            finish_reason: finish as i32,
            ..Default::default()
        })
    }

    #[test]
    fn a_stream_that_stops_without_a_finish_reason_ends_in_an_error() {
        let (tx, rx) = response_channel();
        tx.send(response(WireFinish::Unspecified));
        drop(tx);
        let items: Vec<_> = futures::executor::block_on(ResponseStream::new(rx).collect());
        assert_eq!(items.len(), 2);
        assert!(items[0].is_ok());
        let e = items[1].as_ref().unwrap_err();
        assert!(matches!(e, ServeError::Internal(_)), "{e:?}");

        let (tx, rx) = response_channel();
        tx.send(response(WireFinish::Unspecified));
        tx.send(response(WireFinish::Eos));
        drop(tx);
        let items: Vec<_> = futures::executor::block_on(ResponseStream::new(rx).collect());
        assert_eq!(items.len(), 2);
        assert!(items.iter().all(Result::is_ok));
    }

    #[test]
    fn a_client_that_stops_reading_is_cut_off_and_told_so() {
        let (tx, rx) = response_channel();
        for _ in 0..OUTPUT_BUFFER {
            assert!(!tx.send(response(WireFinish::Unspecified)));
        }
        assert!(!tx.is_closed());
        // The next response finds the buffer full: the request is to end, once.
        assert!(tx.send(response(WireFinish::Unspecified)));
        assert!(!tx.send(response(WireFinish::Eos)));
        assert!(tx.is_closed());
        drop(tx);
        let items: Vec<_> = futures::executor::block_on(ResponseStream::new(rx).collect());
        assert_eq!(items.len(), OUTPUT_BUFFER + 1);
        assert!(items[..OUTPUT_BUFFER].iter().all(Result::is_ok));
        let last = items[OUTPUT_BUFFER].as_ref().unwrap_err();
        assert_eq!(last, &ServeError::SlowClient(OUTPUT_BUFFER));
    }
}
