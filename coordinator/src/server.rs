//! The coordinator's gRPC server: `helios.v1.Generation`, `grpc.health.v1` and server reflection
//! (v1 and v1alpha), so grpcurl and stock gRPC clients work without our .proto files.
//!
//! Health is SERVING from the moment the server listens (every rank is initialised by then)
//! until the replica goes down or the server drains, then NOT_SERVING. On SIGINT or SIGTERM new
//! requests are refused (UNAVAILABLE), those in flight get a grace period to finish and are then
//! ended with finish reason CANCELLED, and the server returns once every stream is closed.
//! [`drain_on_signal`] drives that drain for every listener of the process, so the HTTP API
//! (`crate::openai`) drains together with this server.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use helios_proto::telemetry;
use helios_proto::v1::generation_server::{Generation, GenerationServer};
use helios_proto::v1::{
    DetokenizeRequest, DetokenizeResponse, GenerateRequest, GenerateResponse, ModelInfoRequest,
    ModelInfoResponse, TokenizeRequest, TokenizeResponse,
};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tonic::transport::server::TcpIncoming;
use tonic::{Request, Response, Status};
use tonic_health::ServingStatus;

use crate::output::{collect, ResponseStream};
use crate::serving::{CallContext, Serving};
use crate::step_loop::ReplicaState;

/// The largest request message, as gRPC's default: a bigger one is refused by the transport.
pub const MAX_REQUEST_BYTES: usize = 4 << 20;

/// How much before a unary call's deadline it is answered (see `generate`): ahead of tonic's
/// server timer, and usually of a tonic client's own timer (started before the request left).
const UNARY_DEADLINE_MARGIN: Duration = Duration::from_millis(20);

/// The request's deadline from its `grpc-timeout` header (gRPC over HTTP/2: up to 8 digits and
/// a unit, H M S m u n), measured from now.
fn deadline_of<T>(req: &Request<T>) -> Result<Option<Instant>, Status> {
    let Some(v) = req.metadata().get("grpc-timeout") else {
        return Ok(None);
    };
    let bad = || Status::invalid_argument(format!("grpc-timeout: {v:?} is not a timeout"));
    let v = v.to_str().map_err(|_| bad())?;
    let (digits, unit) = v.split_at(v.len().saturating_sub(1));
    if digits.is_empty() || digits.len() > 8 {
        return Err(bad());
    }
    let n: u64 = digits.parse().map_err(|_| bad())?;
    let timeout = match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return Err(bad()),
    };
    Ok(Instant::now().checked_add(timeout))
}

/// The call's deadline and the client's trace context (W3C `traceparent` in the metadata).
fn call_context<T>(req: &Request<T>) -> Result<CallContext, Status> {
    Ok(CallContext {
        deadline: deadline_of(req)?,
        trace_parent: telemetry::extract(&telemetry::MetadataExtractor(req.metadata())),
    })
}

pub struct GenerationService {
    serving: Serving,
}

#[tonic::async_trait]
impl Generation for GenerationService {
    async fn generate(
        &self,
        req: Request<GenerateRequest>,
    ) -> Result<Response<GenerateResponse>, Status> {
        let call = call_context(&req)?;
        let deadline = call.deadline;
        let rx = self.serving.generate(req.into_inner(), call).await?;
        let Some(deadline) = deadline else {
            return Ok(Response::new(collect(rx).await?));
        };
        // tonic's own timer cancels a unary call at its deadline (CANCELLED, "Timeout
        // expired"); answer DEADLINE_EXCEEDED just before it. Dropping `rx` frees the blocks
        // either way.
        let early = deadline
            .checked_sub(UNARY_DEADLINE_MARGIN)
            .unwrap_or(deadline);
        tokio::select! {
            r = collect(rx) => Ok(Response::new(r?)),
            _ = tokio::time::sleep_until(early.into()) => Err(Status::deadline_exceeded(
                "the request's deadline passed before it finished",
            )),
        }
    }

    type GenerateStreamStream = ResponseStream;

    async fn generate_stream(
        &self,
        req: Request<GenerateRequest>,
    ) -> Result<Response<Self::GenerateStreamStream>, Status> {
        let call = call_context(&req)?;
        let rx = self.serving.generate(req.into_inner(), call).await?;
        Ok(Response::new(ResponseStream::new(rx)))
    }

    async fn tokenize(
        &self,
        req: Request<TokenizeRequest>,
    ) -> Result<Response<TokenizeResponse>, Status> {
        Ok(Response::new(
            self.serving.tokenize(req.into_inner()).await?,
        ))
    }

    async fn detokenize(
        &self,
        req: Request<DetokenizeRequest>,
    ) -> Result<Response<DetokenizeResponse>, Status> {
        Ok(Response::new(self.serving.detokenize(req.into_inner())?))
    }

    async fn model_info(
        &self,
        _: Request<ModelInfoRequest>,
    ) -> Result<Response<ModelInfoResponse>, Status> {
        Ok(Response::new(self.serving.model_info()))
    }
}

/// Serves `serving` on `listener` until SIGINT or SIGTERM, then drains: health turns
/// NOT_SERVING, new requests are refused, requests in flight get up to `grace` to finish.
pub async fn serve(listener: TcpListener, serving: Serving, grace: Duration) -> anyhow::Result<()> {
    let drained = drain_on_signal(serving.clone(), grace);
    serve_until(listener, serving, drained.wait()).await
}

/// Resolves once a shutdown signal came and the replica drained: every listener of the process
/// (gRPC, HTTP) stops on it, so they drain together: meanwhile they keep accepting, and refuse
/// new requests (UNAVAILABLE, 503) while those in flight finish.
#[derive(Clone)]
pub struct Drained(watch::Receiver<bool>);

impl Drained {
    pub async fn wait(mut self) {
        // An error means the drain task is gone (the runtime is shutting down): stop too.
        let _ = self.0.wait_for(|done| *done).await;
    }
}

/// Watches for SIGINT or SIGTERM; on one, drains `serving` (new requests refused, those in
/// flight get up to `grace`, then are cancelled) and resolves the [`Drained`].
pub fn drain_on_signal(serving: Serving, grace: Duration) -> Drained {
    let (done, rx) = watch::channel(false);
    let signal = shutdown_signal();
    tokio::spawn(async move {
        signal.await;
        tracing::info!("shutting down; waiting up to {grace:?} for requests in flight");
        serving.drain(grace).await;
        let _ = done.send(true);
    });
    Drained(rx)
}

/// Serves the gRPC API on `listener` until `shutdown` resolves; then the calls in flight end
/// and it returns. Health follows the replica's state (NOT_SERVING once draining or down).
pub async fn serve_until(
    listener: TcpListener,
    serving: Serving,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let (health, health_service) = tonic_health::server::health_reporter();
    let mut state = serving.state();
    tokio::spawn(async move {
        loop {
            let status = match &*state.borrow_and_update() {
                ReplicaState::Serving => ServingStatus::Serving,
                ReplicaState::Draining | ReplicaState::Down(_) => ServingStatus::NotServing,
            };
            for name in ["", "helios.v1.Generation"] {
                health.set_service_status(name, status).await;
            }
            if state.changed().await.is_err() {
                return;
            }
        }
    });
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(helios_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .with_service_name("helios.v1.Generation")
            .with_service_name("grpc.health.v1.Health")
    };
    let reflection_v1 = reflection().build_v1()?;
    let reflection_v1alpha = reflection().build_v1alpha()?;
    let generation = GenerationServer::new(GenerationService { serving })
        .max_decoding_message_size(MAX_REQUEST_BYTES);
    tonic::transport::Server::builder()
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(generation)
        // Small messages (one token) must not wait for Nagle's algorithm.
        .serve_with_incoming_shutdown(
            TcpIncoming::from(listener).with_nodelay(Some(true)),
            shutdown,
        )
        .await?;
    Ok(())
}

/// Binds `addr` (port 0 picks a free port; the bound address is on the listener).
pub async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    Ok(TcpListener::bind(addr).await?)
}

/// Registers for SIGINT and SIGTERM at once (so that a signal right after the ready line is
/// caught, not fatal) and resolves on the first of them.
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let signals = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        );
        async move {
            match signals {
                (Ok(mut term), Ok(mut int)) => {
                    tokio::select! {
                        _ = term.recv() => {}
                        _ = int.recv() => {}
                    }
                }
                _ => tokio::signal::ctrl_c().await.unwrap_or(()),
            }
        }
    }
    #[cfg(not(unix))]
    async {
        let _ = tokio::signal::ctrl_c().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(timeout: &str) -> Request<()> {
        let mut r = Request::new(());
        r.metadata_mut()
            .insert("grpc-timeout", timeout.parse().expect("ascii"));
        r
    }

    #[test]
    fn grpc_timeouts_become_deadlines() {
        let left = |t: &str| {
            deadline_of(&with(t))
                .expect("valid")
                .expect("a deadline")
                .saturating_duration_since(Instant::now())
        };
        assert!(left("2S") > Duration::from_millis(1900) && left("2S") <= Duration::from_secs(2));
        assert!(left("1H") > Duration::from_secs(3599));
        assert!(left("250m") <= Duration::from_millis(250));
        assert!(left("99999999n") <= Duration::from_millis(100));
        assert!(deadline_of(&Request::new(())).expect("none").is_none());
        for bad in ["", "S", "12", "5x", "123456789S", "-1S", "1.5S"] {
            let e = deadline_of(&with(bad)).expect_err(bad);
            assert_eq!(e.code(), tonic::Code::InvalidArgument, "{bad}");
        }
    }
}
