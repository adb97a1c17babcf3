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

    /// Queues an admitted request, or answers it why not.
    pub fn add(&mut self, r: NewRequest) {
        let id = self.next_seq;
        self.next_seq += 1;
        let seq = Sequence::new(id, r.admitted.prompt_ids, r.admitted.params);
        match self.scheduler.add(seq) {
            Ok(()) => {
                tracing::debug!(request_id = r.output.request_id(), seq = id, "queued");
                self.outputs.insert(id, r.output);
            }
            Err(AddError::QueueFull(n)) => r.output.fail(ServeError::QueueFull(n)),
            Err(e) => r.output.fail(ServeError::invalid_request(e.to_string())),
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
    /// A request that was never queued here, moving on as it came.
    pub fn unqueued(from: u32, r: NewRequest) -> Self {
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
    }
}
