//! `--workload chat`: multi-turn conversations, each resending its whole history, the traffic
//! a prefix cache and session affinity are for.
//!
//! `--sessions S` conversations of `--turns T` turns. A session's first prompt is a random user
//! message of `--input-len` tokens; each later prompt is the previous prompt, the server's
//! answer to it, and a new random user message of `--input-len` tokens. So turn k+1 can only be
//! built, and is only sent, once turn k's answer is back: a session's turns run one after
//! another, back to back (no think time), while sessions run side by side under the run's load
//! ([`super::arrivals`]: `--concurrency` sessions at once, or sessions arriving at
//! `--request-rate` per second). Every request of session n carries the session id
//! `session-<n>`, so a router can keep the session on the replica that caches its history.
//!
//! Over gRPC the history is token ids, the answer's exactly as generated. Over OpenAI HTTP it is
//! text: the answer's text is appended, and each user message is text chosen so that it adds
//! exactly `--input-len` tokens without merging into the history before it (the history itself
//! may re-encode differently where an answer meets the prompt before it, as it would for any
//! client that resends text).
//!
//! User messages are drawn from the seed by (session, turn), so with greedy sampling (the
//! default) a run repeats exactly. A turn that fails ends its session: the turns after it are
//! not sent and count as failed, so a run always accounts for S × T requests.

use std::future::Future;
use std::sync::Arc;

use anyhow::{bail, Context, Result};

use super::client::{Record, Reply};
use super::dataset::{request_seed, Input, Prompt, Random};

/// The outcome of a turn after a failed one.
pub const NOT_SENT: &str = "not sent: an earlier turn of its session failed";

/// The session id of session `n`.
pub fn session_id(n: usize) -> String {
    format!("session-{n}")
}

/// The conversations of a chat run.
pub struct Chat {
    pub sessions: usize,
    pub turns: usize,
    /// Every turn carries its session's id (`session-<n>`); off, none does.
    pub session_ids: bool,
    seed: u64,
    input_len: usize,
    output_len: usize,
    random: Random,
}

impl Chat {
    pub fn new(
        random: Random,
        seed: u64,
        (sessions, turns): (usize, usize),
        input_len: usize,
        output_len: usize,
    ) -> Result<Self> {
        if sessions == 0 || turns == 0 {
            bail!("--sessions and --turns must be positive");
        }
        sessions
            .checked_mul(turns)
            .context("--sessions × --turns is too large")?;
        Ok(Chat {
            sessions,
            turns,
            session_ids: true,
            seed,
            input_len,
            output_len,
            random,
        })
    }

    /// The request index of a turn: a session's turns are consecutive, so the run's outcomes
    /// read session by session.
    pub fn request_index(&self, session: usize, turn: usize) -> usize {
        session * self.turns + turn
    }

    fn message_seed(&self, session: usize, turn: usize) -> u64 {
        request_seed(self.seed, 0, self.request_index(session, turn) as u64)
    }

    /// The first turn of `session`: a user message alone.
    pub fn first_turn(&self, session: usize) -> Result<Prompt> {
        Ok(Prompt {
            input: self
                .random
                .message(self.message_seed(session, 0), self.input_len)?,
            prompt_len: self.input_len,
            output_len: self.output_len,
            session_id: self.session_ids.then(|| session_id(session)),
        })
    }

    /// Turn `turn` (> 0) of `session`: the previous turn's prompt, its `answer`, and a new user
    /// message.
    pub fn next_turn(
        &self,
        session: usize,
        turn: usize,
        prev: &Prompt,
        answer: &Input,
    ) -> Result<Prompt> {
        let history = match (&prev.input, answer) {
            (Input::Ids(p), Input::Ids(a)) => Input::Ids([p.as_slice(), a].concat()),
            (Input::Text(p), Input::Text(a)) => Input::Text(format!("{p}{a}")),
            _ => bail!("an answer of another kind (ids or text) than its prompt"),
        };
        let (input, prompt_len) =
            self.random
                .extend(&history, self.message_seed(session, turn), self.input_len)?;
        Ok(Prompt {
            input,
            prompt_len,
            output_len: self.output_len,
            session_id: prev.session_id.clone(),
        })
    }

    /// Builds a turn's prompt on a blocking thread (a text prompt takes tokenizer round trips,
    /// which must not hold up the other sessions' streams).
    async fn build(
        self: Arc<Self>,
        session: usize,
        turn: usize,
        last: Option<(Prompt, Input)>,
    ) -> Result<Prompt, String> {
        tokio::task::spawn_blocking(move || match &last {
            None => self.first_turn(session),
            Some((prev, answer)) => self.next_turn(session, turn, prev, answer),
        })
        .await
        .map_err(|e| format!("building turn {turn} of {}: {e}", session_id(session)))?
        .map_err(|e| format!("building turn {turn} of {}: {e:#}", session_id(session)))
    }

    /// Runs `session`'s turns one after another: `send(request index, prompt)` sends one and
    /// waits for its answer. Returns one outcome per turn, in turn order, each also given to
    /// `finished` (whether it succeeded) as soon as it is known.
    pub async fn run_session<F, Fut, G>(
        self: Arc<Self>,
        session: usize,
        send: F,
        finished: G,
    ) -> Vec<Result<Record, String>>
    where
        F: Fn(usize, Prompt) -> Fut,
        Fut: Future<Output = Result<Reply, String>>,
        G: Fn(bool),
    {
        let mut outcomes = Vec::with_capacity(self.turns);
        let mut last = None;
        for turn in 0..self.turns {
            let sent = match self.clone().build(session, turn, last.take()).await {
                Ok(prompt) => send(self.request_index(session, turn), prompt.clone())
                    .await
                    .map(|reply| (prompt, reply)),
                Err(e) => Err(e),
            };
            finished(sent.is_ok());
            match sent {
                Ok((prompt, reply)) => {
                    outcomes.push(Ok(reply.record));
                    last = Some((prompt, reply.answer));
                }
                Err(e) => {
                    outcomes.push(Err(e));
                    break;
                }
            }
        }
        for _ in outcomes.len()..self.turns {
            finished(false);
            outcomes.push(Err(NOT_SENT.to_string()));
        }
        outcomes
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::load::dataset::tests::tokenizer;
    use std::sync::Mutex;
    use std::time::Duration;

    const VOCAB: u32 = 49152;

    fn chat(seed: u64, sessions: usize, turns: usize) -> Arc<Chat> {
        let random = Random::ids(VOCAB).expect("random");
        Arc::new(Chat::new(random, seed, (sessions, turns), 8, 3).expect("chat"))
    }

    fn ids(input: &Input) -> &[u32] {
        match input {
            Input::Ids(ids) => ids,
            Input::Text(_) => panic!("ids expected"),
        }
    }

    fn record() -> Record {
        Record {
            ttft: Duration::from_millis(1),
            itl: Vec::new(),
            e2el: Duration::from_millis(2),
            prompt_tokens: 0,
            output_tokens: 3,
        }
    }

    /// A fake server: answers request `i` with ids `[i, i, i]` (or fails it, for `fail`), and
    /// logs what it was sent and when each request started and ended.
    #[derive(Default)]
    struct Server {
        sent: Mutex<Vec<(usize, Prompt)>>,
        events: Mutex<Vec<String>>,
        finished: Mutex<Vec<bool>>,
    }

    async fn run(
        chat: &Arc<Chat>,
        session: usize,
        fail: Option<usize>,
    ) -> (Arc<Server>, Vec<Result<Record, String>>) {
        let server = Arc::new(Server::default());
        let (s, f) = (server.clone(), server.clone());
        let out = chat
            .clone()
            .run_session(
                session,
                move |i, prompt| {
                    let s = s.clone();
                    async move {
                        s.events.lock().expect("lock").push(format!("start {i}"));
                        s.sent.lock().expect("lock").push((i, prompt));
                        tokio::time::sleep(Duration::from_millis(5)).await;
                        s.events.lock().expect("lock").push(format!("end {i}"));
                        if fail == Some(i) {
                            return Err("HTTP 503".to_string());
                        }
                        Ok(Reply {
                            record: record(),
                            answer: Input::Ids(vec![i as u32 + 1; 3]),
                        })
                    }
                },
                move |ok| f.finished.lock().expect("lock").push(ok),
            )
            .await;
        (server, out)
    }

    #[tokio::test]
    async fn without_session_ids_no_turn_names_its_session() {
        let random = Random::ids(VOCAB).expect("random");
        let mut chat = Chat::new(random, 7, (3, 4), 8, 3).expect("chat");
        chat.session_ids = false;
        let (server, out) = run(&Arc::new(chat), 2, None).await;
        assert!(out.iter().all(Result::is_ok));
        let sent = server.sent.lock().expect("lock").clone();
        assert_eq!(sent.len(), 4);
        assert!(sent.iter().all(|(_, p)| p.session_id.is_none()), "{sent:?}");
    }

    #[tokio::test]
    async fn each_turn_resends_the_history_and_the_answer() {
        let chat = chat(7, 3, 4);
        let (server, out) = run(&chat, 2, None).await;
        assert_eq!(out.len(), 4);
        assert!(out.iter().all(Result::is_ok));
        assert_eq!(*server.finished.lock().expect("lock"), vec![true; 4]);
        let sent = server.sent.lock().expect("lock").clone();
        // Session 2's turns are requests 8..12, sent one after another.
        assert_eq!(
            sent.iter().map(|(i, _)| *i).collect::<Vec<_>>(),
            [8, 9, 10, 11]
        );
        let events = server.events.lock().expect("lock").clone();
        assert_eq!(
            events,
            ["start 8", "end 8", "start 9", "end 9", "start 10", "end 10", "start 11", "end 11"]
        );
        for (_, p) in &sent {
            assert_eq!(p.session_id.as_deref(), Some("session-2"));
            assert_eq!(p.output_len, 3);
            assert_eq!(ids(&p.input).len(), p.prompt_len);
        }
        assert_eq!(sent[0].1.prompt_len, 8);
        for k in 1..sent.len() {
            let (prev_i, prev) = &sent[k - 1];
            let now = ids(&sent[k].1.input);
            // Previous prompt, then the server's answer to it, then 8 new tokens.
            let mut expected = ids(&prev.input).to_vec();
            expected.extend([*prev_i as u32 + 1; 3]);
            assert_eq!(now[..expected.len()], expected[..], "turn {k}");
            assert_eq!(now.len(), expected.len() + 8);
            assert_ne!(now[expected.len()..], ids(&sent[0].1.input)[..]);
        }
    }

    #[tokio::test]
    async fn sessions_are_deterministic_from_the_seed_and_distinct() {
        let prompts = |chat: Arc<Chat>, session| async move {
            let (server, _) = run(&chat, session, None).await;
            let sent = server.sent.lock().expect("lock").clone();
            sent.into_iter().map(|(_, p)| p.input).collect::<Vec<_>>()
        };
        let a = prompts(chat(7, 2, 3), 0).await;
        assert_eq!(a, prompts(chat(7, 2, 3), 0).await);
        assert_ne!(a[0], prompts(chat(8, 2, 3), 0).await[0]);
        // Another session starts from another user message.
        let b = prompts(chat(7, 2, 3), 1).await;
        assert_ne!(ids(&a[0])[0], ids(&b[0])[0]);
    }

    #[tokio::test]
    async fn a_failed_turn_ends_its_session() {
        let chat = chat(1, 1, 4);
        let (server, out) = run(&chat, 0, Some(1)).await;
        assert_eq!(server.sent.lock().expect("lock").len(), 2);
        assert!(out[0].is_ok());
        assert_eq!(out[1], Err("HTTP 503".to_string()));
        assert_eq!(
            out[2..],
            [Err(NOT_SENT.to_string()), Err(NOT_SENT.to_string())]
        );
        assert_eq!(
            *server.finished.lock().expect("lock"),
            [true, false, false, false]
        );
        assert!(Chat::new(Random::ids(VOCAB).expect("random"), 0, (0, 4), 8, 3).is_err());
        assert!(Chat::new(Random::ids(VOCAB).expect("random"), 0, (2, 0), 8, 3).is_err());
    }

    #[test]
    fn text_turns_append_the_answer_text_and_exactly_the_new_message() {
        let tok = tokenizer();
        let random = Random::text(tok.clone()).expect("random");
        let chat = Chat::new(random, 3, (2, 3), 16, 4).expect("chat");
        let first = chat.first_turn(1).expect("turn 0");
        let Input::Text(first_text) = &first.input else {
            panic!("text expected")
        };
        assert_eq!(tok.encode(first_text).expect("encode").len(), 16);
        let answer = " The answer is 42, of course.";
        let second = chat
            .next_turn(1, 1, &first, &Input::Text(answer.into()))
            .expect("turn 1");
        let Input::Text(second_text) = &second.input else {
            panic!("text expected")
        };
        let history = format!("{first_text}{answer}");
        assert!(second_text.starts_with(&history), "{second_text:?}");
        let history_ids = tok.encode(&history).expect("encode");
        let ids = tok.encode(second_text).expect("encode");
        assert_eq!(ids[..history_ids.len()], history_ids[..]);
        assert_eq!(ids.len(), history_ids.len() + 16);
        assert_eq!(second.prompt_len, ids.len());
        assert_eq!(second.session_id.as_deref(), Some("session-1"));
        // The same seed, the same conversation.
        let again = chat
            .next_turn(1, 1, &first, &Input::Text(answer.into()))
            .expect("turn 1");
        assert_eq!(again.input, second.input);
    }
}
