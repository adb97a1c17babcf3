//! The gRPC front door: `helios.v1.Generation`, `grpc.health.v1` and server reflection (v1 and
//! v1alpha), so grpcurl and stock gRPC clients work without our .proto files.
//!
//! Everything here maps: a call to the [`FrontDoor`], a [`ServeError`] to a gRPC status (in
//! one place, [`status`]), the replica's snapshot to ModelInfo and health. Health is SERVING
//! while the replica serves (every rank is initialised before the server listens), NOT_SERVING
//! once it drains or goes down. On SIGINT or SIGTERM (see `crate::shutdown`) new requests are
//! refused (UNAVAILABLE), those in flight get a grace period to finish and are then ended with
//! finish reason CANCELLED, and the server returns once every stream is closed.

use std::time::{Duration, Instant};

use futures::StreamExt;
use helios_proto::telemetry;
use helios_proto::v1::generation_server::{Generation, GenerationServer};
use helios_proto::v1::{
    DetokenizeRequest, DetokenizeResponse, GenerateRequest, GenerateResponse, ModelInfoRequest,
    ModelInfoResponse, ReplicaStatus, TokenizeRequest, TokenizeResponse,
};
use tokio::net::TcpListener;
use tonic::{Request, Response, Status};
use tonic_health::ServingStatus;

use crate::error::ServeError;
use crate::front_door::{CallContext, FrontDoor, MAX_REQUEST_BYTES};
use crate::listener::{self, ApiOptions};
use crate::metrics::Metrics;
use crate::output::{collect, ResponseStream};
use crate::replica::{Replica, ReplicaSnapshot, ReplicaState};

/// The gRPC status of a [`ServeError`]: the one place the core's errors become gRPC's.
pub fn status(e: ServeError) -> Status {
    let message = e.to_string();
    match e {
        ServeError::InvalidArgument { .. } => Status::invalid_argument(message),
        ServeError::QueueFull(_) | ServeError::SlowClient(_) => Status::resource_exhausted(message),
        ServeError::Starting
        | ServeError::Draining
        | ServeError::ReplicaDown(_)
        | ServeError::Recovering(_) => Status::unavailable(message),
        ServeError::DeadlineExceeded => Status::deadline_exceeded(message),
        ServeError::Internal(_) => Status::internal(message),
    }
}

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
    let timeout = parse_grpc_timeout(v).ok_or_else(bad)?;
    Ok(Instant::now().checked_add(timeout))
}

/// A `grpc-timeout` value (`TimeoutValue TimeoutUnit`: at most 8 digits, then one of `H M S m u
/// n`), or `None` when it is not one. Pure, so it can be tested on arbitrary input; the largest
/// value (99999999 hours) fits a `Duration` without overflow.
fn parse_grpc_timeout(v: &str) -> Option<Duration> {
    // The unit is one ASCII byte; anything else (including a multi-byte last character, where
    // splitting one byte off would cut the character) is not a timeout.
    if !v.is_char_boundary(v.len().saturating_sub(1)) {
        return None;
    }
    let (digits, unit) = v.split_at(v.len().saturating_sub(1));
    if digits.is_empty() || digits.len() > 8 {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// The call's deadline and the client's trace context (W3C `traceparent` in the metadata).
fn call_context<T>(req: &Request<T>) -> Result<CallContext, Status> {
    Ok(CallContext {
        deadline: deadline_of(req)?,
        trace_parent: telemetry::extract(&telemetry::MetadataExtractor(req.metadata())),
    })
}

pub struct GenerationService {
    front: FrontDoor,
}

/// A request's responses as gRPC streams them.
pub type GrpcResponseStream = futures::stream::Map<
    ResponseStream,
    fn(Result<GenerateResponse, ServeError>) -> Result<GenerateResponse, Status>,
>;

#[tonic::async_trait]
impl Generation for GenerationService {
    async fn generate(
        &self,
        req: Request<GenerateRequest>,
    ) -> Result<Response<GenerateResponse>, Status> {
        let call = call_context(&req)?;
        let deadline = call.deadline;
        let rx = self
            .front
            .generate(req.into_inner(), call)
            .await
            .map_err(status)?;
        let Some(deadline) = deadline else {
            return Ok(Response::new(collect(rx).await.map_err(status)?));
        };
        // tonic's own timer cancels a unary call at its deadline (CANCELLED, "Timeout
        // expired"); answer DEADLINE_EXCEEDED just before it. Dropping `rx` frees the blocks
        // either way.
        let early = deadline
            .checked_sub(UNARY_DEADLINE_MARGIN)
            .unwrap_or(deadline);
        let result = tokio::select! {
            r = collect(rx) => r,
            _ = tokio::time::sleep_until(early.into()) => Err(ServeError::DeadlineExceeded),
        };
        result.map(Response::new).map_err(status)
    }

    type GenerateStreamStream = GrpcResponseStream;

    async fn generate_stream(
        &self,
        req: Request<GenerateRequest>,
    ) -> Result<Response<Self::GenerateStreamStream>, Status> {
        let call = call_context(&req)?;
        crate::admission::check_streamable(req.get_ref().parameters.as_ref()).map_err(status)?;
        let rx = self
            .front
            .generate(req.into_inner(), call)
            .await
            .map_err(status)?;
        let to_grpc: fn(_) -> _ = |r: Result<_, ServeError>| r.map_err(status);
        Ok(Response::new(ResponseStream::new(rx).map(to_grpc)))
    }

    async fn tokenize(
        &self,
        req: Request<TokenizeRequest>,
    ) -> Result<Response<TokenizeResponse>, Status> {
        let req = req.into_inner();
        let token_ids = self
            .front
            .tokenize(req.prompt, req.messages)
            .await
            .map_err(status)?;
        Ok(Response::new(TokenizeResponse { token_ids }))
    }

    async fn detokenize(
        &self,
        req: Request<DetokenizeRequest>,
    ) -> Result<Response<DetokenizeResponse>, Status> {
        let text = self
            .front
            .detokenize(&req.into_inner().token_ids)
            .map_err(status)?;
        Ok(Response::new(DetokenizeResponse { text }))
    }

    async fn model_info(
        &self,
        _: Request<ModelInfoRequest>,
    ) -> Result<Response<ModelInfoResponse>, Status> {
        Ok(Response::new(model_info(&self.front)))
    }
}

/// ModelInfo: the model, each replica's snapshot, and their sums.
pub fn model_info(front: &FrontDoor) -> ModelInfoResponse {
    let replicas = front.replicas();
    let now: Vec<_> = replicas.iter().map(|r| (r, r.snapshot())).collect();
    let ratio = |a: u64, b: u64| if b == 0 { 0.0 } else { a as f64 / b as f64 };
    let secs = |us: u64| us as f64 / 1e6;
    let sum32 = |f: fn(&ReplicaSnapshot) -> u32| now.iter().map(|(_, s)| f(s)).sum::<u32>();
    let sum64 = |f: fn(&ReplicaSnapshot) -> u64| now.iter().map(|(_, s)| f(s)).sum::<u64>();
    let (hits, queries) = (
        sum64(|s| s.scheduler.prefix_hit_tokens),
        sum64(|s| s.scheduler.prefix_query_tokens),
    );
    let state = front.state();
    let mut info = ModelInfoResponse {
        model: front.model_name().to_string(),
        tensor_parallel_size: replicas.first().map_or(0, |r| r.world_size() as u32),
        kv_blocks_total: sum32(|s| s.scheduler.kv_blocks_total),
        kv_blocks_free: sum32(|s| s.scheduler.kv_blocks_free),
        requests_running: sum32(|s| s.scheduler.running),
        requests_waiting: sum32(|s| s.scheduler.waiting),
        ready: state == ReplicaState::Serving,
        prefix_cache_query_tokens: queries,
        prefix_cache_hit_tokens: hits,
        prefix_cache_hit_ratio: ratio(hits, queries),
        preemptions_total: sum64(|s| s.scheduler.preemptions),
        steps_total: sum64(|s| s.steps.steps),
        step_compute_seconds_total: secs(sum64(|s| s.steps.compute_us)),
        step_gap_seconds_total: secs(sum64(|s| s.steps.gap_us)),
        step_rank_wait_seconds_total: secs(sum64(|s| s.steps.rank_wait_us)),
        state: state.name().to_string(),
        state_reason: state.reason().unwrap_or_default().to_string(),
        requests_requeued_total: sum64(|s| s.scheduler.requeued),
        data_parallel_size: replicas.len() as u32,
        replicas: now
            .iter()
            .map(|(r, s)| replica_status(r, s, front.metrics()))
            .collect(),
        requests_moved_total: front.metrics().moved_total(),
        router_policy: front.router_options().policy.name().to_string(),
        ..Default::default()
    };
    if let Some(r) = replicas.first() {
        let facts = &r.info().facts;
        info.architecture = facts.architecture.clone();
        info.max_model_len = facts.max_position_embeddings;
        info.vocab_size = facts.vocab_size;
        info.dtype = facts.dtype.clone();
        info.kv_block_size = facts.block_size;
    }
    info
}

fn replica_status(r: &Replica, now: &ReplicaSnapshot, metrics: &Metrics) -> ReplicaStatus {
    let s = &now.scheduler;
    ReplicaStatus {
        id: r.id(),
        state: now.state.name().to_string(),
        state_reason: now.state.reason().unwrap_or_default().to_string(),
        tensor_parallel_size: r.world_size() as u32,
        kv_blocks_total: s.kv_blocks_total,
        kv_blocks_free: s.kv_blocks_free,
        requests_running: s.running,
        requests_waiting: s.waiting,
        prefix_cache_query_tokens: s.prefix_query_tokens,
        prefix_cache_hit_tokens: s.prefix_hit_tokens,
        requests_routed_total: metrics.routed_total(r.id()),
        requests_moved_out_total: metrics.moved_out_total(r.id()),
        preemptions_total: s.preemptions,
        requests_requeued_total: s.requeued,
    }
}

/// Serves `front` on `listener` until SIGINT or SIGTERM, then drains: health turns
/// NOT_SERVING, new requests are refused, requests in flight get up to `grace` to finish.
pub async fn serve(listener: TcpListener, front: FrontDoor, grace: Duration) -> anyhow::Result<()> {
    let drained = crate::shutdown::drain_on_signal(front.clone(), grace);
    serve_until(listener, front, &ApiOptions::default(), drained.wait()).await
}

/// Serves the gRPC API on `listener` until `shutdown` resolves; then the calls in flight end
/// and it returns. Health follows the replica's state (NOT_SERVING once draining or down).
pub async fn serve_until(
    listener: TcpListener,
    front: FrontDoor,
    opts: &ApiOptions,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    // gRPC is HTTP/2 only.
    let incoming = listener::accept(listener, opts.listen(&[b"h2"])?, "gRPC");
    let (health, health_service) = tonic_health::server::health_reporter();
    let mut snapshot = front.watch();
    tokio::spawn(async move {
        loop {
            let status = match *snapshot.borrow_and_update() {
                ReplicaState::Serving => ServingStatus::Serving,
                _ => ServingStatus::NotServing,
            };
            for name in ["", "helios.v1.Generation"] {
                health.set_service_status(name, status).await;
            }
            if snapshot.changed().await.is_err() {
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
    let generation = GenerationServer::new(GenerationService { front })
        .max_decoding_message_size(MAX_REQUEST_BYTES);
    tonic::transport::Server::builder()
        .max_concurrent_streams(opts.max_streams_per_connection)
        .layer(opts.access.grpc_layer())
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(generation)
        // Connections come without Nagle's algorithm: small messages (one token) do not wait.
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await?;
    Ok(())
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
    fn serve_errors_map_to_grpc_codes_with_their_messages() {
        use tonic::Code;
        for (e, code) in [
            (
                ServeError::invalid("top_p", "top_p must be in (0, 1]"),
                Code::InvalidArgument,
            ),
            (ServeError::QueueFull(7), Code::ResourceExhausted),
            (ServeError::Starting, Code::Unavailable),
            (ServeError::Draining, Code::Unavailable),
            (
                ServeError::ReplicaDown("rank 1: step stream ended".into()),
                Code::Unavailable,
            ),
            (
                ServeError::Recovering("rank 1 is back".into()),
                Code::Unavailable,
            ),
            (ServeError::DeadlineExceeded, Code::DeadlineExceeded),
            (
                ServeError::Internal("detokenizing: bad".into()),
                Code::Internal,
            ),
        ] {
            let message = e.to_string();
            let s = status(e);
            assert_eq!((s.code(), s.message()), (code, message.as_str()));
        }
        assert_eq!(
            status(ServeError::QueueFull(7)).message(),
            "the waiting queue is full (7 requests); retry later"
        );
        assert_eq!(
            status(ServeError::ReplicaDown("rank 1: step stream ended".into())).message(),
            "the replica is down: rank 1: step stream ended"
        );
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
        // The largest timeout neither overflows the parser nor the deadline.
        assert_eq!(
            parse_grpc_timeout("99999999H"),
            Some(Duration::from_secs(99_999_999 * 3600))
        );
        assert!(deadline_of(&with("99999999H")).is_ok());
        assert_eq!(parse_grpc_timeout("1é"), None);
    }

    /// Nanoseconds per unit, as u128 so the reference itself cannot overflow.
    fn unit_nanos(unit: char) -> Option<u128> {
        Some(match unit {
            'H' => 3_600_000_000_000,
            'M' => 60_000_000_000,
            'S' => 1_000_000_000,
            'm' => 1_000_000,
            'u' => 1_000,
            'n' => 1,
            _ => return None,
        })
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(256))]

        #[test]
        fn valid_timeouts_parse_exactly(
            n in 0..=99_999_999u64,
            unit in proptest::sample::select(vec!['H', 'M', 'S', 'm', 'u', 'n']),
            zeros in 0..3usize,
        ) {
            let digits = format!("{}{n}", "0".repeat(zeros));
            let v = format!("{digits}{unit}");
            let got = parse_grpc_timeout(&v);
            if digits.len() > 8 {
                proptest::prop_assert_eq!(got, None);
            } else {
                let nanos = u128::from(n) * unit_nanos(unit).unwrap();
                proptest::prop_assert_eq!(got.map(|d| d.as_nanos()), Some(nanos));
            }
        }

        #[test]
        fn arbitrary_strings_never_panic(v in "\\PC{0,12}|[0-9+-]{0,10}[HMSmunx]") {
            if let Some(d) = parse_grpc_timeout(&v) {
                // Only ≤ 8 digits (as `u64::from_str` reads them) and a known unit get here.
                let unit = v.chars().last().unwrap();
                let digits = &v[..v.len() - 1];
                proptest::prop_assert!(!digits.is_empty() && digits.len() <= 8, "{v:?}");
                let n: u64 = digits.parse().unwrap();
                let nanos = u128::from(n) * unit_nanos(unit).unwrap();
                proptest::prop_assert_eq!(d.as_nanos(), nanos);
            }
            if let Ok(value) = v.parse::<tonic::metadata::MetadataValue<_>>() {
                let mut req = Request::new(());
                req.metadata_mut().insert("grpc-timeout", value);
                let _ = deadline_of(&req);
            }
        }
    }
}
