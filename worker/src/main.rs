//! `helios-worker`: serves one rank of a model to a coordinator.
//!
//! Started by `helios serve`/`helios generate` (one child process per rank) or by hand / by
//! Kubernetes with static addresses. Prints one line to stdout once it listens:
//! `HELIOS_WORKER_READY grpc=HOST:PORT comm=HOST:PORT`.

use std::io::Write;

use anyhow::{bail, Context, Result};
use candle_core::Device;
use clap::Parser;
use helios_proto::telemetry::{LogDefault, LogFormat, Telemetry};
use helios_proto::v1::worker_server::WorkerServer;
use helios_worker::comm::TcpListenerSlot;
use helios_worker::service::WorkerService;
use tonic::transport::server::TcpIncoming;

#[derive(Parser, Debug)]
#[command(
    name = "helios-worker",
    about = "One tensor-parallel rank of a Helios replica"
)]
struct Args {
    /// gRPC address to serve the coordinator on (port 0: any free port).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: String,
    /// Address for the peer-to-peer all-reduce (port 0: any free port).
    #[arg(long, default_value = "127.0.0.1:0")]
    comm_listen: String,
    /// `cpu` or `cuda:N`.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Exit when standard input closes: set by a coordinator that spawns this worker, so the
    /// worker never outlives it.
    #[arg(long)]
    exit_with_stdin: bool,
    /// `text` or `json` (one object per line) on stderr; `RUST_LOG` filters.
    #[arg(long, default_value = "text")]
    log_format: LogFormat,
}

fn parse_device(s: &str) -> Result<Device> {
    if s == "cpu" {
        return Ok(Device::Cpu);
    }
    if let Some(n) = s.strip_prefix("cuda:") {
        let n: usize = n.parse().with_context(|| format!("bad device {s:?}"))?;
        return Device::new_cuda(n).with_context(|| format!("opening {s}"));
    }
    bail!("unknown device {s:?} (cpu or cuda:N)")
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    // Spans go out over OTLP only when OTEL_EXPORTER_OTLP_ENDPOINT is set (helios_proto::telemetry).
    let telemetry = Telemetry::init("helios-worker", args.log_format, LogDefault::Server)?;
    let device = parse_device(&args.device)?;
    let slot = TcpListenerSlot::bind(&args.comm_listen)?;
    let comm_addr = slot.local_addr()?;
    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    let grpc_addr = listener.local_addr()?;
    let service = WorkerService::new(slot, device)?;
    println!("HELIOS_WORKER_READY grpc={grpc_addr} comm={comm_addr}");
    std::io::stdout().flush()?;
    if args.exit_with_stdin {
        let flush = telemetry.flusher();
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut std::io::stdin(), &mut std::io::sink());
            flush();
            std::process::exit(0);
        });
    }
    tonic::transport::Server::builder()
        .add_service(
            WorkerServer::new(service)
                .max_decoding_message_size(helios_proto::MAX_WORKER_MESSAGE_BYTES)
                .max_encoding_message_size(helios_proto::MAX_WORKER_MESSAGE_BYTES),
        )
        .serve_with_incoming_shutdown(
            TcpIncoming::from(listener).with_nodelay(Some(true)),
            async {
                let _ = tokio::signal::ctrl_c().await;
            },
        )
        .await?;
    Ok(())
}
