//! Helios wire formats, generated from `proto/helios/v1/*.proto` at build time.

/// `helios.v1`: the client API (`Generation`) and the coordinator <-> worker protocol (`Worker`).
pub mod v1 {
    tonic::include_proto!("helios.v1");
}

/// The encoded `FileDescriptorSet` of every Helios proto, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/helios_descriptor.bin"));
