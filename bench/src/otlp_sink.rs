//! `helios-bench otlp-sink`: an OTLP/gRPC trace endpoint that counts what it is sent, so a
//! benchmark can measure what exporting spans costs a server without a collector installed.
//!
//! Prints `OTLP_SINK_READY http://HOST:PORT` once it listens; on SIGINT or SIGTERM it prints
//! one JSON line, `{"spans": N, "by_service": {"helios-coordinator": N, ...}, "by_name":
//! {"helios-coordinator/request": N, ...}}`, and exits.
//!
//! The receiver is the end-to-end tests' ([`helios_tests::otlp`]), so the benchmark counts the
//! spans exactly as the tests decode and check them.

use std::collections::BTreeMap;
use std::io::Write;

use anyhow::Result;
use helios_tests::otlp::OtlpReceiver;

#[derive(clap::Args)]
pub struct SinkArgs {
    /// Port on 127.0.0.1 (0 picks a free one).
    #[arg(long, default_value_t = 0)]
    port: u16,
}

pub async fn run(a: SinkArgs) -> Result<()> {
    let receiver = OtlpReceiver::bind(a.port).await?;
    println!("OTLP_SINK_READY {}", receiver.endpoint);
    std::io::stdout().flush()?;
    stopped().await;
    // Spans received, by the sender's `service.name` and span name (`service/name`).
    let mut by_name: BTreeMap<String, u64> = BTreeMap::new();
    for span in receiver.shutdown().await? {
        *by_name
            .entry(format!("{}/{}", span.service, span.name))
            .or_default() += 1;
    }
    let mut by_service: BTreeMap<&str, u64> = BTreeMap::new();
    for (key, n) in &by_name {
        let service = key.split_once('/').map_or(key.as_str(), |(s, _)| s);
        *by_service.entry(service).or_default() += n;
    }
    let spans: u64 = by_name.values().sum();
    println!(
        "{}",
        serde_json::json!({ "spans": spans, "by_service": by_service, "by_name": by_name })
    );
    Ok(())
}

/// Returns on SIGTERM or SIGINT (on SIGINT alone where SIGTERM cannot be watched).
async fn stopped() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        },
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
