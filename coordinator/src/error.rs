//! What can go wrong with a request, in serving terms.
//!
//! The core (admission, the [front door](crate::front_door), replicas, the step loop, a
//! request's output) speaks only [`ServeError`]. Each front door maps it to its transport in
//! exactly one place: `grpc.rs` to a gRPC status, `openai/error.rs` to an OpenAI-shaped error
//! with its HTTP status. A request the server ends early while shutting down is not an error:
//! it gets its text so far and the finish reason `cancelled`.

/// Why a request was refused or did not finish.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ServeError {
    /// The request can never succeed as sent. `field` is the request field at fault, spelled
    /// as in the gRPC API (`max_new_tokens`, `stop`, `token_ids`...), when one is; the message
    /// starts with it where it names it.
    #[error("{message}")]
    InvalidArgument {
        field: Option<&'static str>,
        message: String,
    },
    /// The waiting queue is full; the request may succeed later.
    #[error("the waiting queue is full ({0} requests); retry later")]
    QueueFull(usize),
    /// The replica's workers are still loading the model.
    #[error("the replica is starting (its workers are loading the model)")]
    Starting,
    /// The server is shutting down: requests in flight finish, new ones are refused.
    #[error("the server is shutting down")]
    Draining,
    /// The replica lost a rank (or its step loop) and cannot serve.
    #[error("the replica is down: {0}")]
    ReplicaDown(String),
    /// The replica is rebuilding itself after losing a rank; it will serve again.
    #[error("the replica is recovering: {0}")]
    Recovering(String),
    /// The request's deadline passed, wherever it was (waiting or running).
    #[error("the request's deadline passed before it finished")]
    DeadlineExceeded,
    /// The client stopped reading its stream: this many responses waited for it, so the
    /// request was cancelled (its KV blocks freed for others).
    #[error("the client did not read its stream ({0} responses waited for it); the request was cancelled")]
    SlowClient(usize),
    /// A fault of the server's own (a step that failed, a bug); the message says which.
    #[error("{0}")]
    Internal(String),
}

impl ServeError {
    /// An invalid request, about `field`.
    pub fn invalid(field: &'static str, message: impl Into<String>) -> Self {
        Self::InvalidArgument {
            field: Some(field),
            message: message.into(),
        }
    }

    /// An invalid request, about no one field.
    pub fn invalid_request(message: impl Into<String>) -> Self {
        Self::InvalidArgument {
            field: None,
            message: message.into(),
        }
    }

    /// How it reads in `helios_requests_finished_total{finish_reason}` and the request's log
    /// line: refused before it could run, timed out, or failed.
    pub fn finish_label(&self) -> &'static str {
        match self {
            Self::DeadlineExceeded => "deadline",
            Self::InvalidArgument { .. } | Self::QueueFull(_) => "rejected",
            Self::SlowClient(_) => "aborted",
            Self::Starting
            | Self::Draining
            | Self::ReplicaDown(_)
            | Self::Recovering(_)
            | Self::Internal(_) => "error",
        }
    }
}
