//! Compiles the protos with protox (pure Rust), so building needs no system `protoc`, and keeps
//! the encoded descriptor set for gRPC server reflection.
//!
//! Two sets: Helios' own protos (client and server stubs, and the reflection descriptor set),
//! and the vendored etcd v3 API (`etcd/`, client stubs only: Helios talks to etcd, it never
//! serves it; kept out of the reflection set, which describes only what Helios serves).
use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);

    let helios = ["helios/v1/worker.proto", "helios/v1/generate.proto"];
    for f in helios {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(helios, ["."])?;
    std::fs::write(out.join("helios_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure().compile_fds(fds)?;

    let etcd = [
        "etcd/api/etcdserverpb/rpc.proto",
        "etcd/api/mvccpb/kv.proto",
        "etcd/api/authpb/auth.proto",
    ];
    for f in etcd {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(etcd, ["."])?;
    tonic_prost_build::configure()
        .build_server(false)
        .compile_fds(fds)?;
    Ok(())
}
