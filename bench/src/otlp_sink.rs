//! `helios-bench otlp-sink`: an OTLP/gRPC trace endpoint that only counts what it is sent, so a
//! benchmark can measure what exporting spans costs a server without a collector installed.
//!
//! Prints `OTLP_SINK_READY http://HOST:PORT` once it listens; on SIGINT or SIGTERM it prints
//! one JSON line, `{"spans": N, "by_service": {"helios-coordinator": N, ...}, "by_name":
//! {"helios-coordinator/request": N, ...}}`, and exits.

use std::collections::BTreeMap;
use std::io::Write;
use std::sync::{Arc, Mutex};

use anyhow::Result;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{Request, Response, Status};

#[derive(clap::Args)]
pub struct SinkArgs {
    /// Port on 127.0.0.1 (0 picks a free one).
    #[arg(long, default_value_t = 0)]
    port: u16,
}

/// Spans received, by the sender's `service.name` and span name (`service/name`).
#[derive(Default, Clone)]
struct Counts(Arc<Mutex<BTreeMap<String, u64>>>);

#[tonic::async_trait]
impl TraceService for Counts {
    async fn export(
        &self,
        req: Request<ExportTraceServiceRequest>,
    ) -> Result<Response<ExportTraceServiceResponse>, Status> {
        let mut counts = self.0.lock().map_err(|_| Status::internal("poisoned"))?;
        for batch in req.into_inner().resource_spans {
            let service = batch
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|kv| kv.key == "service.name")
                .and_then(|kv| match kv.value.as_ref()?.value.as_ref()? {
                    Value::StringValue(s) => Some(s.clone()),
                    _ => None,
                })
                .unwrap_or_default();
            for span in batch.scope_spans.iter().flat_map(|s| &s.spans) {
                *counts
                    .entry(format!("{service}/{}", span.name))
                    .or_default() += 1;
            }
        }
        Ok(Response::new(ExportTraceServiceResponse::default()))
    }
}

pub async fn run(a: SinkArgs) -> Result<()> {
    let listener = TcpListener::bind(("127.0.0.1", a.port)).await?;
    println!("OTLP_SINK_READY http://{}", listener.local_addr()?);
    std::io::stdout().flush()?;
    let counts = Counts::default();
    let stop = async {
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
    };
    tonic::transport::Server::builder()
        .add_service(TraceServiceServer::new(counts.clone()))
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), stop)
        .await?;
    let by_name = counts.0.lock().map(|c| c.clone()).unwrap_or_default();
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
