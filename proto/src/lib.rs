//! Helios wire formats, generated from `proto/helios/v1/*.proto` at build time; the etcd v3
//! client stubs (`proto/etcd/`) and the cluster membership built on them ([`membership`]).

/// `helios.v1`: the client API (`Generation`) and the coordinator <-> worker protocol (`Worker`).
pub mod v1 {
    tonic::include_proto!("helios.v1");
}

impl v1::SamplingParams {
    /// A repetition penalty is set (0, what an unset field reads as, and 1 both mean off).
    pub fn repetition_penalized(&self) -> bool {
        self.repetition_penalty != 0.0 && self.repetition_penalty != 1.0
    }

    /// Any penalty is set: rank 0 needs the sequence's tokens (`context_token_ids`) to sample.
    /// The coordinator decides by this what a step carries, the worker what it checks.
    pub fn penalized(&self) -> bool {
        self.repetition_penalized() || self.frequency_penalty != 0.0 || self.presence_penalty != 0.0
    }

    /// The scores differ from the logits before any decoding rule: a penalty or a logit bias.
    /// Rank 0 then samples from a modified copy (the raw logits still give the logprobs).
    pub fn reshaped(&self) -> bool {
        self.penalized() || !self.logit_bias.is_empty()
    }
}

/// Positions per KV-cache block, when not configured (vLLM's default): the coordinator's block
/// manager and every rank's cache agree on it at Init.
pub const DEFAULT_BLOCK_SIZE: u32 = 16;

/// Each rank's KV-cache budget when not configured, in MiB.
pub const DEFAULT_KV_CACHE_MIB: u64 = 256;

/// The largest message either side of `helios.v1.Worker` accepts. A step plan or result is
/// tiny (tens of bytes per sequence), but one that returns logits carries a whole vocabulary
/// row per sequence: ample room for a large batch of those.
pub const MAX_WORKER_MESSAGE_BYTES: usize = 256 << 20;

/// The encoded `FileDescriptorSet` of every Helios proto, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/helios_descriptor.bin"));

pub mod auth;
mod load_format;
pub mod membership;
pub mod signal;
pub mod telemetry;

pub use load_format::LoadFormat;

/// The etcd v3 API (client stubs only), generated from the protos vendored in `proto/etcd/`:
/// what [`membership`] speaks to etcd, without a system `protoc`.
pub mod etcd {
    /// `etcdserverpb`: the KV, Watch and Lease services (and the rest of etcd's v3 API).
    pub mod etcdserverpb {
        tonic::include_proto!("etcdserverpb");
    }
    /// `mvccpb`: a stored key-value and a watch event.
    pub mod mvccpb {
        tonic::include_proto!("mvccpb");
    }
    /// `authpb`: users and roles (the generated `etcdserverpb` refers to it).
    pub mod authpb {
        tonic::include_proto!("authpb");
    }
}
