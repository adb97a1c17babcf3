//! The requests a replica holds: the scheduler's sequences and, by sequence id, the output each
//! streams to its client. The step loop owns one [`Requests`]; it is apart from the ranks so
//! that requests keep arriving, leaving and expiring while the ranks are being rebuilt.

use std::collections::HashMap;
use std::time::Instant;

use super::step_loop::NewRequest;
use super::Moved;
use crate::error::ServeError;
use crate::output::{InFlight, RequestOutput};
use crate::scheduler::{AddError, Departing, Scheduler, Sequence};

pub struct Requests {
    pub scheduler: Scheduler,
    pub outputs: HashMap<u64, RequestOutput>,
    next_seq: u64,
}

impl Requests {
    pub fn new(scheduler: Scheduler) -> Self {
        Self {
            scheduler,
            outputs: HashMap::new(),
            next_seq: 0,
        }
    }

    /// Queues an admitted request, one sequence per choice (all or none), or answers it why
    /// not. Choices after the first follow it: they take its prompt's blocks from the prefix
    /// cache once it has computed them.
    pub fn add(&mut self, choices: Vec<NewRequest>) {
        let first = self.next_seq;
        self.next_seq += choices.len() as u64;
        let mut seqs = Vec::with_capacity(choices.len());
        let mut outputs = Vec::with_capacity(choices.len());
        for (id, c) in (first..).zip(choices) {
            let seq = Sequence::new(id, c.admitted.prompt_ids, c.admitted.params);
            seqs.push(if id == first {
                seq
            } else {
                seq.following(first)
            });
            outputs.push((id, c.output));
        }
        let error = match self.scheduler.add_all(seqs) {
            Ok(()) => {
                for (id, output) in outputs {
                    tracing::debug!(request_id = output.request_id(), seq = id, "queued");
                    self.outputs.insert(id, output);
                }
                return;
            }
            Err(AddError::QueueFull(n)) => ServeError::QueueFull(n),
            Err(e) => ServeError::invalid_request(e.to_string()),
        };
        for (_, output) in outputs {
            output.fail(error.clone());
        }
    }

    /// Queues a request that comes from the lost replica `moved.from` with its tokens, as this
    /// replica's (`id`, counted in `in_flight`); or answers it why not.
    pub fn resume(&mut self, mut moved: Moved, id: u32, in_flight: &InFlight) {
        let seq = self.next_seq;
        self.next_seq += 1;
        moved.output.moved(moved.from, id, in_flight);
        match self.scheduler.add_resumed(seq, moved.departing) {
            Ok(()) => {
                self.outputs.insert(seq, moved.output);
            }
            Err(e) => moved
                .output
                .fail(ServeError::invalid_request(e.to_string())),
        }
    }

    /// Takes every request out to move it off this replica (`from`), which is lost.
    pub fn take_all(&mut self, from: u32) -> Vec<Moved> {
        let mut moved = Vec::new();
        for (id, departing) in self.scheduler.take_all() {
            if let Some(output) = self.outputs.remove(&id) {
                moved.push(Moved {
                    from,
                    departing,
                    output,
                });
            }
        }
        // Nothing else can be held; anything that is was never queued.
        for (_, out) in self.outputs.drain() {
            out.fail(ServeError::Internal("a request without a sequence".into()));
        }
        moved
    }

    /// Frees the blocks of every request whose client is gone or whose deadline passed.
    pub fn drop_gone(&mut self) {
        let gone: Vec<u64> = self
            .outputs
            .iter()
            .filter(|(_, o)| o.is_closed())
            .map(|(&id, _)| id)
            .collect();
        for id in gone {
            self.scheduler.abort(id);
            if let Some(out) = self.outputs.remove(&id) {
                tracing::debug!(
                    request_id = out.request_id(),
                    seq = id,
                    "client left; freeing its blocks"
                );
            }
        }
        for id in self.scheduler.expire(Instant::now()) {
            if let Some(out) = self.outputs.remove(&id) {
                tracing::debug!(
                    request_id = out.request_id(),
                    seq = id,
                    "deadline passed; freeing its blocks"
                );
                out.fail(ServeError::DeadlineExceeded);
            }
        }
    }

    /// Tells the requests the scheduler preempted: they wait again.
    pub fn note_preemptions(&mut self) {
        for id in self.scheduler.take_preempted() {
            if let Some(out) = self.outputs.get_mut(&id) {
                out.preempted();
            }
        }
    }

    /// Ends one request with `error` and frees its blocks.
    pub fn finish_with(&mut self, id: u64, error: ServeError) {
        self.scheduler.abort(id);
        if let Some(out) = self.outputs.remove(&id) {
            out.fail(error);
        }
    }

    /// Ends every request with `error` and frees every block.
    pub fn fail_all(&mut self, error: ServeError) {
        self.scheduler.abort_all();
        for (_, out) in self.outputs.drain() {
            out.fail(error.clone());
        }
    }

    /// Ends every request with finish reason CANCELLED (shutdown after its grace period).
    pub fn cancel_all(&mut self) {
        self.scheduler.abort_all();
        for (_, out) in self.outputs.drain() {
            out.cancel();
        }
    }
}

impl Moved {
    /// A request that was never queued here, moving on as it came: each choice on its own
    /// (they no longer wait for one another).
    pub fn unqueued(from: u32, choices: Vec<NewRequest>) -> Vec<Self> {
        choices
            .into_iter()
            .map(|r| {
                let prompt_len = r.admitted.prompt_ids.len();
                Self {
                    from,
                    departing: Departing {
                        tokens: r.admitted.prompt_ids,
                        prompt_len,
                        params: r.admitted.params,
                    },
                    output: r.output,
                }
            })
            .collect()
    }
}
