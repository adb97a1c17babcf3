//! Helios wire formats, generated from `proto/helios/v1/*.proto` at build time.

/// `helios.v1`: the coordinator <-> worker protocol.
pub mod v1 {
    tonic::include_proto!("helios.v1");
}
