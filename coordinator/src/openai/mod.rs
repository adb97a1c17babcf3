//! The coordinator's HTTP API: OpenAI-compatible completions and chat completions (streamed as
//! server-sent events or not), the model list, and `/health`, served with axum beside the gRPC
//! API (`--http-port`, default 8080).
//!
//! An OpenAI request is translated into the gRPC API's `GenerateRequest` ([`translate`]) and
//! takes the same [`FrontDoor::generate`] path as a gRPC request: the same admission and
//! messages, the same scheduler, priorities and limits, the same cancellation when the client
//! goes away. Only the envelope differs: [`types`] (the JSON), [`body`] (reading it),
//! [`respond`] (answers and event streams), [`logprobs`], [`error`] (every failure in OpenAI's
//! error shape with its HTTP status).
//!
//! | route | |
//! |---|---|
//! | `POST /v1/completions` | `prompt` (a string or token ids) |
//! | `POST /v1/chat/completions` | `messages`, rendered with the model's chat template |
//! | `GET /v1/models`, `GET /v1/models/{id}` | the one model, under the id requests name it by |
//! | `GET /health` | 200 while serving; 503 while starting, draining, recovering or down |
//! | `GET /live` | 200 while the process answers, whatever its replicas' state (for liveness probes) |
//! | `GET /metrics` | Prometheus text (OpenMetrics when the scraper asks for it) |
//!
//! The model is named by its file name without `.gguf` (or its directory's name), e.g.
//! `SmolLM2-135M-Instruct.Q4_1`, or by the path the server was started with (what ModelInfo
//! reports); a request without `model` gets it too. Any other name is 404 `model_not_found`.
//!
//! Shutdown: the server drains with the gRPC server (see `shutdown::drain_on_signal`): while
//! requests in flight finish, new ones are answered 503 and `/health` says 503; then both stop.

pub mod body;
pub mod error;
pub mod logprobs;
pub mod respond;
pub mod structured;
pub mod tool_calls;
pub mod tools;
pub mod translate;
pub mod types;

use std::future::Future;
use std::hash::{BuildHasher, Hasher};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::{Path as UrlPath, State};
use axum::http::{header, HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use helios_proto::telemetry;
use tokio::net::TcpListener;

use self::body::{BodyTimeout, JsonBody};
use self::error::ApiError;
use self::respond::{Endpoint, Responder};
use self::translate::Translated;
use self::types::{ChatRequest, Common, CompletionRequest, ModelCard, ModelList};
use crate::access::Access;
use crate::error::ServeError;
use crate::front_door::{CallContext, FrontDoor};
use crate::listener::{self, ApiOptions};
use crate::output::collect;
use crate::replica::ReplicaState;

/// What every handler shares.
#[derive(Clone)]
struct App {
    front: FrontDoor,
    model: Arc<ModelNames>,
}

/// The names a request may give the model, and its card.
#[derive(Debug)]
struct ModelNames {
    /// As the server was started (`--model`), as ModelInfo reports it.
    full: String,
    /// The file (or directory) name.
    file: String,
    card: ModelCard,
}

impl ModelNames {
    fn new(full: &str) -> Self {
        let file = Path::new(full)
            .file_name()
            .map_or_else(|| full.to_string(), |n| n.to_string_lossy().into_owned());
        let id = file.strip_suffix(".gguf").unwrap_or(&file).to_string();
        Self {
            full: full.to_string(),
            file,
            card: ModelCard {
                id,
                object: "model",
                created: unix_now(),
                owned_by: "helios",
                max_model_len: 0,
            },
        }
    }

    /// The model card, with the length the replicas allow now.
    fn card(&self, front: &FrontDoor) -> ModelCard {
        ModelCard {
            max_model_len: front.limits().map_or(0, |l| l.max_model_len as u32),
            ..self.card.clone()
        }
    }

    fn accepts(&self, name: &str) -> bool {
        [
            self.card.id.as_str(),
            self.file.as_str(),
            self.full.as_str(),
        ]
        .contains(&name)
    }

    /// Refuses a request for another model (404, as OpenAI answers).
    fn check(&self, requested: Option<&str>) -> Result<(), ApiError> {
        match requested {
            Some(name) if !self.accepts(name) => {
                Err(ApiError::model_not_found(name, &self.card.id))
            }
            _ => Ok(()),
        }
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// `PREFIX-` and 16 hex digits, unique within the process and unpredictable across processes.
fn new_id(prefix: &str) -> String {
    format!("{prefix}-{:016x}", random_u64())
}

/// A number no other call in this process gets and no one can predict: a counter through a
/// randomly keyed hash.
pub(super) fn random_u64() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(NEXT.fetch_add(1, Ordering::Relaxed));
    h.finish()
}

/// The HTTP API's routes over `front`, with `/health` and Prometheus' `/metrics`; further
/// endpoints are one more `.route(...)` here and share [`App`] and the error shape through the
/// fallbacks.
pub fn router(front: FrontDoor, opts: &ApiOptions) -> Router {
    let app = App {
        model: Arc::new(ModelNames::new(front.model_name())),
        front,
    };
    let access = Arc::new(opts.access.clone());
    Router::new()
        .route("/health", get(health))
        .route("/live", get(live))
        .route("/metrics", get(metrics))
        .route("/v1/models", get(models))
        .route("/v1/models/{*id}", get(model))
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .fallback(|method: Method, uri: Uri| async move {
            ApiError::no_route(method.as_str(), uri.path())
        })
        .method_not_allowed_fallback(|method: Method, uri: Uri| async move {
            ApiError::method_not_allowed(method.as_str(), uri.path())
        })
        .with_state(app)
        .layer(axum::middleware::from_fn_with_state(access, require_key))
        .layer(axum::Extension(BodyTimeout(opts.read_timeout)))
}

/// Serves the HTTP API on `listener` until `shutdown` resolves, then lets the requests in
/// flight finish (see the module doc for how that follows the gRPC server's drain).
///
/// hyper serves each connection (HTTP/1.1, or HTTP/2 by ALPN or prior knowledge) under
/// `opts`: headers must arrive within the read timeout (a slowloris client is closed, and
/// holds no more than its connection slot meanwhile), bodies too ([`body`]), and an HTTP/2
/// connection carries at most `max_streams_per_connection` requests at once.
pub async fn serve(
    listener: TcpListener,
    front: FrontDoor,
    opts: &ApiOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
    use hyper_util::server::conn::auto;
    use tokio_stream::StreamExt as _;

    let mut incoming = listener::accept(listener, opts.listen(&[b"h2", b"http/1.1"])?, "HTTP");
    let app = router(front, opts);
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(opts.read_timeout);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(opts.max_streams_per_connection);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        let conn = tokio::select! {
            c = incoming.next() => match c {
                Some(Ok(c)) => c,
                Some(Err(_)) => continue,
                None => break,
            },
            _ = &mut shutdown => break,
        };
        let service = hyper_util::service::TowerToHyperService::new(app.clone());
        let served = builder.serve_connection_with_upgrades(TokioIo::new(conn), service);
        let served = graceful.watch(served.into_owned());
        tokio::spawn(async move {
            if let Err(e) = served.await {
                tracing::debug!("an HTTP connection ended: {e}");
            }
        });
    }
    // Stop accepting (the port closes), then wait for the connections to finish.
    drop(incoming);
    graceful.shutdown().await;
    Ok(())
}

/// Refuses a request without a valid API key (see `crate::access`): 401 in OpenAI's shape.
async fn require_key(
    State(access): State<Arc<Access>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let authorization = req.headers().get(header::AUTHORIZATION);
    match access.check_http(req.uri().path(), authorization) {
        Ok(()) => next.run(req).await,
        Err(presented) => {
            let mut r = ApiError::unauthorized(presented).into_response();
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                http::HeaderValue::from_static("Bearer"),
            );
            r
        }
    }
}

/// 200 `{"status": "serving"}` while serving; otherwise 503 with the state's name
/// (`starting`, `draining`, `recovering`, `down`) and, when there is one, its `reason`.
async fn health(State(app): State<App>) -> Response {
    let state = app.front.state();
    let mut body = serde_json::json!({ "status": state.name() });
    if let Some(why) = state.reason() {
        body["reason"] = why.into();
    }
    let status = if state == ReplicaState::Serving {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(body)).into_response()
}

/// 200 `{"status": "alive", "state": ...}` whenever the server answers at all: a replica
/// recovering from a lost worker, or loading its model, is alive, and restarting the process
/// would only lose what it holds. (`/health` is the readiness answer.)
async fn live(State(app): State<App>) -> Response {
    let state = app.front.state();
    Json(serde_json::json!({ "status": "alive", "state": state.name() })).into_response()
}

/// Prometheus text, or OpenMetrics for a scraper that asks for it (the Prometheus server does).
async fn metrics(State(app): State<App>, headers: HeaderMap) -> Response {
    let openmetrics = headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains("application/openmetrics-text"));
    let (text, content_type) = app.front.metrics_text(openmetrics);
    ([(header::CONTENT_TYPE, content_type)], text).into_response()
}

async fn models(State(app): State<App>) -> Json<ModelList> {
    Json(ModelList {
        object: "list",
        data: vec![app.model.card(&app.front)],
    })
}

async fn model(State(app): State<App>, UrlPath(id): UrlPath<String>) -> Response {
    if app.model.accepts(&id) {
        Json(app.model.card(&app.front)).into_response()
    } else {
        ApiError::model_not_found(&id, &app.model.card.id).into_response()
    }
}

async fn completions(State(app): State<App>, headers: HeaderMap, body: JsonBody) -> Response {
    let id = new_id("cmpl");
    let answer = async {
        let req: CompletionRequest = body.view()?;
        let common: Common = body.view()?;
        app.model.check(req.model.as_deref())?;
        let t = translate::completion(req, common, &id)?;
        app.generate(Endpoint::Completions, id, t, &headers).await
    };
    answer.await.unwrap_or_else(IntoResponse::into_response)
}

async fn chat_completions(State(app): State<App>, headers: HeaderMap, body: JsonBody) -> Response {
    let id = new_id("chatcmpl");
    let answer = async {
        let req: ChatRequest = body.view()?;
        let common: Common = body.view()?;
        app.model.check(req.model.as_deref())?;
        let mut t = translate::chat(req, common, &id)?;
        app.render_tools(&mut t).await?;
        app.generate(Endpoint::Chat, id, t, &headers).await
    };
    answer.await.unwrap_or_else(IntoResponse::into_response)
}

impl App {
    /// The prompt as text, when the request echoes it: as given, or its token ids decoded.
    fn echo_text(&self, t: &Translated) -> Result<Option<String>, ApiError> {
        if !t.echo {
            return Ok(None);
        }
        let r = &t.request;
        if r.token_ids.is_empty() {
            return Ok(Some(r.prompt.clone()));
        }
        self.front
            .tokenizer()
            .decode(&r.token_ids)
            .map(Some)
            .map_err(|e| ApiError::invalid_param("prompt", format!("prompt: {e:#}")))
    }

    /// A chat template that renders tools itself gets them: the prompt is rendered here, with
    /// `tools` in its context, and sent as the request's prompt (the core knows no tools).
    /// On the blocking pool, as admission renders.
    async fn render_tools(&self, t: &mut Translated) -> Result<(), ApiError> {
        let tok = self.front.tokenizer();
        if !tok.chat_template_takes_tools() {
            return Ok(());
        }
        let Some((messages, tools)) = t.templated.take() else {
            return Ok(());
        };
        let prompt = tokio::task::spawn_blocking(move || {
            tok.apply_chat_template_with_tools(&messages, Some(&tools), true)
        })
        .await
        .map_err(|e| ApiError::from(ServeError::Internal(format!("rendering tools: {e}"))))?
        .map_err(|e| ApiError::invalid_param("messages", format!("messages: {e:#}")))?;
        t.request.messages.clear();
        t.request.prompt = prompt;
        Ok(())
    }

    /// The serving path, shared with gRPC; then the answer in the endpoint's shape.
    async fn generate(
        &self,
        endpoint: Endpoint,
        id: String,
        t: Translated,
        headers: &HeaderMap,
    ) -> Result<Response, ApiError> {
        let constraint_param = t.constraint_param;
        let error = |e: ServeError| {
            let e = match endpoint {
                Endpoint::Chat => ApiError::from(e).for_chat(),
                Endpoint::Completions => ApiError::from(e),
            };
            match constraint_param {
                Some(param) => e.param_renamed("constraint", param),
                None => e,
            }
        };
        let call = CallContext {
            deadline: None,
            trace_parent: telemetry::extract(&telemetry::HeaderExtractor(headers)),
        };
        let echo = self.echo_text(&t)?;
        let rx = self.front.generate(t.request, call).await.map_err(error)?;
        let responder = Responder::new(
            endpoint,
            id,
            unix_now(),
            self.model.card.id.clone(),
            t.logprobs,
            t.include_usage,
            self.front.tokenizer(),
        )
        .with_choices(t.choices)
        .with_echo(echo)
        .with_tools(t.tools);
        if t.stream {
            return Ok(responder.stream(rx));
        }
        // Dropping this future (the client left) drops `rx`, which cancels the request.
        let whole = collect(rx).await.map_err(error)?;
        let json = [(header::CONTENT_TYPE, "application/json")];
        Ok((json, responder.whole(whole)).into_response())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_model_is_named_by_its_file_stem_or_as_started() {
        let m = ModelNames::new("models/SmolLM2-135M-Instruct.Q4_1.gguf");
        assert_eq!(m.card.id, "SmolLM2-135M-Instruct.Q4_1");
        for ok in [
            "SmolLM2-135M-Instruct.Q4_1",
            "SmolLM2-135M-Instruct.Q4_1.gguf",
            "models/SmolLM2-135M-Instruct.Q4_1.gguf",
        ] {
            assert!(m.check(Some(ok)).is_ok(), "{ok}");
        }
        assert!(m.check(None).is_ok());
        let e = m.check(Some("gpt-4o")).unwrap_err();
        assert_eq!((e.status.as_u16(), e.code), (404, Some("model_not_found")));
        // A directory keeps its dots (no extension to strip).
        let d = ModelNames::new("/models/SOLAR-10.7B-Instruct-v1.0/");
        assert_eq!(d.card.id, "SOLAR-10.7B-Instruct-v1.0");
    }

    #[test]
    fn ids_are_unique() {
        let a = new_id("cmpl");
        let b = new_id("cmpl");
        assert!(a.starts_with("cmpl-") && a.len() == 21, "{a}");
        assert_ne!(a, b);
    }
}
