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

/// The client's end of one choice's channel.
#[derive(Debug)]
struct ChoiceReceiver {
    rx: mpsc::Receiver<Item>,
    overflowed: Arc<AtomicBool>,
    /// The overflow was reported.
    told: bool,
    /// Its last response (or an error) came.
    done: bool,
}

/// The client's end of a request's channels, one per choice (one for most requests): the
/// choices' responses interleaved as they come, each with its `index`. The last response of
/// the last choice to finish carries the request's usage (the prompt once, every choice's
/// tokens); the other choices' last responses carry none.
#[derive(Debug)]
pub struct ResponseReceiver {
    choices: Vec<ChoiceReceiver>,
    /// The choice looked at first next time, so that no choice starves the others.
    next: usize,
    /// Over the choices that finished.
    usage: Usage,
    /// Choices [`collect`] returns: fewer than generated when it picks the best (`best_of`).
    keep: usize,
    /// The logprobs came only to pick the best by: [`collect`] drops them.
    strip_logprobs: bool,
}

/// One choice's channel (see [`OUTPUT_BUFFER`]).
fn choice_channel() -> (ResponseSender, ChoiceReceiver) {
    let (tx, rx) = mpsc::channel(OUTPUT_BUFFER);
    let overflowed = Arc::new(AtomicBool::new(false));
    let receiver = ChoiceReceiver {
        rx,
        overflowed: overflowed.clone(),
        told: false,
        done: false,
    };
    (ResponseSender { tx, overflowed }, receiver)
}

/// A request's response channel (one choice).
pub fn response_channel() -> (ResponseSender, ResponseReceiver) {
    let (tx, rx) = choice_channel();
    (tx, ResponseReceiver::of(vec![rx]))
}

/// The channels of a request's `n` choices (at least one), in index order, and their one
/// receiver.
pub fn response_channels(n: usize) -> (Vec<ResponseSender>, ResponseReceiver) {
    let (senders, receivers) = (0..n.max(1)).map(|_| choice_channel()).unzip();
    (senders, ResponseReceiver::of(receivers))
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

impl ChoiceReceiver {
    /// The next response; once the sender is gone after an overflow, RESOURCE_EXHAUSTED once.
    fn poll_recv(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Option<Item>> {
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

impl ResponseReceiver {
    fn of(choices: Vec<ChoiceReceiver>) -> Self {
        let keep = choices.len();
        Self {
            choices,
            next: 0,
            usage: Usage::default(),
            keep,
            strip_logprobs: false,
        }
    }

    /// [`collect`] returns only the `keep` choices with the highest cumulative logprob (best
    /// first), without logprobs unless `logprobs` (the client asked for them).
    pub fn keeping_best(mut self, keep: usize, logprobs: bool) -> Self {
        self.keep = keep.clamp(1, self.choices.len());
        self.strip_logprobs = !logprobs;
        self
    }

    /// Every choice has sent its last response.
    pub fn is_finished(&self) -> bool {
        self.choices.iter().all(|c| c.done)
    }

    pub async fn recv(&mut self) -> Option<Item> {
        std::future::poll_fn(|cx| self.poll_recv(cx)).await
    }

    /// A response if one is queued now.
    pub fn try_recv(&mut self) -> Option<Item> {
        let waker = futures::task::noop_waker();
        match self.poll_recv(&mut std::task::Context::from_waker(&waker)) {
            std::task::Poll::Ready(item) => item,
            std::task::Poll::Pending => None,
        }
    }

    /// The next response of any choice, looking at each in turn from where it last stopped;
    /// `None` once every choice finished, or when one ended without a finish reason (the
    /// stream then reports it: [`ResponseStream`]).
    pub fn poll_recv(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Option<Item>> {
        use std::task::Poll;
        let n = self.choices.len();
        let mut waiting = false;
        for k in 0..n {
            let i = (self.next + k) % n;
            let c = &mut self.choices[i];
            if c.done {
                continue;
            }
            match c.poll_recv(cx) {
                Poll::Ready(Some(Ok(resp))) => {
                    self.next = (i + 1) % n;
                    return Poll::Ready(Some(Ok(self.account(i, resp))));
                }
                Poll::Ready(Some(Err(e))) => {
                    c.done = true;
                    return Poll::Ready(Some(Err(e)));
                }
                Poll::Ready(None) => return Poll::Ready(None),
                Poll::Pending => waiting = true,
            }
        }
        if waiting {
            Poll::Pending
        } else {
            Poll::Ready(None)
        }
    }

    /// Notes choice `i`'s response: a last one adds its tokens to the usage, which only the
    /// request's very last response carries.
    fn account(&mut self, i: usize, mut resp: GenerateResponse) -> GenerateResponse {
        if resp.finish_reason == WireFinish::Unspecified as i32 {
            return resp;
        }
        self.choices[i].done = true;
        if let Some(u) = resp.usage {
            self.usage.prompt_tokens = u.prompt_tokens;
            self.usage.completion_tokens += u.completion_tokens;
            self.usage.total_tokens = self.usage.prompt_tokens + self.usage.completion_tokens;
        }
        resp.usage = self.is_finished().then_some(self.usage);
        resp
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
    /// Which of its request's choices it is (every response says so).
    index: u32,
    /// The prompt, when its logprobs were asked for: they go out with the first token.
    prompt_ids: Option<Vec<u32>>,
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
            // Choosing the best choices reads every sampled token's logprob.
            logprobs: if req.chooses() {
                Some(req.logprobs.unwrap_or(0))
            } else {
                req.logprobs
            },
            trace,
            logits: None,
            index: 0,
            prompt_ids: req.params.prompt_logprobs.map(|_| req.prompt_ids.clone()),
        }
    }

    /// It streams choice `index` of its request.
    pub fn with_index(mut self, index: u32) -> Self {
        self.index = index;
        self
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
            index: self.index,
            ..Default::default()
        };
        if let (Some(scores), Some(ids)) = (s.prompt_logprobs, self.prompt_ids.take()) {
            // The first prompt token has nothing before it to be scored by.
            resp.prompt_logprobs = std::iter::once(SampledLogprobs::default())
                .chain(scores)
                .collect();
            resp.prompt_token_ids = ids;
        }
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
            index: self.index,
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
                self.ended = item.is_err() || self.rx.is_finished();
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

/// Folds a stream's responses into the one answer of the unary `Generate`: with one choice,
/// its whole text and tokens; with several, each choice whole in `choices` (the best ones only,
/// best first, when it was asked to pick: [`ResponseReceiver::keeping_best`]) and the
/// request's usage at the top.
pub async fn collect(mut rx: ResponseReceiver) -> Result<GenerateResponse, ServeError> {
    let generated = rx.choices.len();
    let mut choices: Vec<GenerateResponse> = (0..generated)
        .map(|i| GenerateResponse {
            index: i as u32,
            ..Default::default()
        })
        .collect();
    let mut usage = None;
    while let Some(resp) = rx.recv().await {
        let resp = resp?;
        let whole = choices
            .get_mut(resp.index as usize)
            .ok_or_else(|| ServeError::Internal(format!("a response of choice {}", resp.index)))?;
        whole.request_id = resp.request_id;
        whole.text.push_str(&resp.text);
        whole.token_ids.extend(resp.token_ids);
        whole.logprobs.extend(resp.logprobs);
        if whole.prompt_token_ids.is_empty() {
            whole.prompt_token_ids = resp.prompt_token_ids;
            whole.prompt_logprobs = resp.prompt_logprobs;
        }
        if resp.finish_reason != WireFinish::Unspecified as i32 {
            whole.finish_reason = resp.finish_reason;
            whole.timings = resp.timings;
            usage = resp.usage.or(usage);
        }
        if rx.is_finished() {
            return Ok(whole_answer(choices, usage, rx.keep, rx.strip_logprobs));
        }
    }
    Err(ServeError::Internal(
        "the request ended without a finish reason".into(),
    ))
}

/// The answer of every choice collected: one choice as it is; several listed in `choices`,
/// reduced to the best `keep` by cumulative logprob when fewer are kept than were generated.
fn whole_answer(
    mut choices: Vec<GenerateResponse>,
    usage: Option<Usage>,
    keep: usize,
    strip_logprobs: bool,
) -> GenerateResponse {
    if choices.len() == 1 {
        let mut only = choices.remove(0);
        only.usage = usage;
        return only;
    }
    if keep < choices.len() {
        let score = |c: &GenerateResponse| -> f64 {
            c.logprobs
                .iter()
                .filter_map(|l| l.sampled.as_ref())
                .map(|t| t.logprob as f64)
                .sum()
        };
        // Best first; equal scores keep index order.
        choices.sort_by(|a, b| score(b).total_cmp(&score(a)));
        choices.truncate(keep);
        for (i, c) in choices.iter_mut().enumerate() {
            c.index = i as u32;
            if strip_logprobs {
                c.logprobs.clear();
            }
        }
    }
    GenerateResponse {
        request_id: choices[0].request_id.clone(),
        usage,
        choices,
        ..Default::default()
    }
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

    fn choice_response(index: u32, text: &str, logprob: f32, last: bool) -> Item {
        Ok(GenerateResponse {
            index,
            request_id: "r".into(),
            text: text.into(),
            token_ids: vec![index],
            logprobs: vec![SampledLogprobs {
                sampled: Some(TokenLogprob {
                    token_id: index,
                    logprob,
                }),
                top: vec![],
            }],
            finish_reason: if last {
                WireFinish::Length
            } else {
                WireFinish::Unspecified
            } as i32,
            usage: last.then_some(Usage {
                prompt_tokens: 5,
                completion_tokens: 2,
                total_tokens: 7,
            }),
            ..Default::default()
        })
    }

    #[test]
    fn choices_interleave_and_the_last_response_counts_the_prompt_once() {
        let (tx, rx) = response_channels(3);
        for (i, tx) in tx.iter().enumerate() {
            let i = i as u32;
            tx.send(choice_response(i, "a", -1.0, false));
            tx.send(choice_response(i, "b", -1.0, true));
        }
        let items: Vec<GenerateResponse> =
            futures::executor::block_on(ResponseStream::new(rx).collect::<Vec<_>>())
                .into_iter()
                .map(Result::unwrap)
                .collect();
        let order: Vec<u32> = items.iter().map(|r| r.index).collect();
        assert_eq!(order, [0, 1, 2, 0, 1, 2], "each choice in turn");
        let usages: Vec<Option<Usage>> = items.iter().map(|r| r.usage).collect();
        let total = Usage {
            prompt_tokens: 5,
            completion_tokens: 6,
            total_tokens: 11,
        };
        assert_eq!(usages, [None, None, None, None, None, Some(total)]);
    }

    #[test]
    fn best_of_keeps_the_choices_with_the_highest_cumulative_logprob() {
        let (tx, rx) = response_channels(3);
        for (i, lp) in [(0, -2.0), (1, -0.5), (2, -1.0)] {
            tx[i].send(choice_response(i as u32, "x", lp, false));
            tx[i].send(choice_response(i as u32, "y", lp, true));
        }
        let whole = futures::executor::block_on(collect(rx.keeping_best(2, false))).unwrap();
        let kept: Vec<(u32, u32, usize)> = whole
            .choices
            .iter()
            .map(|c| (c.index, c.token_ids[0], c.logprobs.len()))
            .collect();
        assert_eq!(
            kept,
            [(0, 1, 0), (1, 2, 0)],
            "best first, renumbered, no logprobs"
        );
        assert_eq!(whole.choices[0].text, "xy");
        assert_eq!(whole.usage.map(|u| u.completion_tokens), Some(6));
        // Without choosing, every choice in index order.
        let (tx, rx) = response_channels(2);
        tx[1].send(choice_response(1, "q", -1.0, true));
        tx[0].send(choice_response(0, "p", -1.0, true));
        let whole = futures::executor::block_on(collect(rx)).unwrap();
        let texts: Vec<&str> = whole.choices.iter().map(|c| c.text.as_str()).collect();
        assert_eq!(texts, ["p", "q"]);
        assert_eq!(whole.choices[1].logprobs.len(), 1);
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
