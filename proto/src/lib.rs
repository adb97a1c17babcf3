//! Helios wire formats, generated from `proto/helios/v1/*.proto` at build time.

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
}

/// The encoded `FileDescriptorSet` of every Helios proto, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/helios_descriptor.bin"));

pub mod telemetry;
