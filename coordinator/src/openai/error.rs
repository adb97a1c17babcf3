//! OpenAI-shaped errors: `{"error": {"message", "type", "param", "code"}}`, with the HTTP status
//! from which OpenAI's SDKs pick their exception (400 `BadRequestError`, 404 `NotFoundError`,
//! 429 `RateLimitError`, 5xx `InternalServerError`, ...).
//!
//! Every way a request can fail answers in this shape, so a client needs one error path: a
//! body that is not JSON, a field of the wrong type, a body over the limit, an unknown route or
//! model, and every gRPC status of the [`Serving`](crate::serving::Serving) path that gRPC
//! clients get (the same admission, so the same messages):
//!
//! | gRPC status | HTTP |
//! |---|---|
//! | INVALID_ARGUMENT, OUT_OF_RANGE | 400 `invalid_request_error` |
//! | NOT_FOUND | 404 |
//! | RESOURCE_EXHAUSTED (the waiting queue is full) | 429 |
//! | DEADLINE_EXCEEDED | 504 |
//! | UNAVAILABLE (draining, replica down) | 503 |
//! | anything else | 500 |

use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use tonic::{Code, Status};

#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    /// OpenAI's `type`.
    pub kind: &'static str,
    /// The request field at fault, when one is.
    pub param: Option<String>,
    pub code: Option<&'static str>,
}

#[derive(Serialize)]
struct Envelope<'a> {
    error: Detail<'a>,
}

#[derive(Serialize)]
struct Detail<'a> {
    message: &'a str,
    #[serde(rename = "type")]
    kind: &'a str,
    param: Option<&'a str>,
    code: Option<&'a str>,
}

/// Admission names its fields as the gRPC API does; the first word of its message says which.
/// The OpenAI names of the fields whose names differ.
const RENAMED: [(&str, &str); 2] = [("max_new_tokens", "max_tokens"), ("token_ids", "prompt")];
/// Fields whose names the APIs share.
const SHARED: [&str; 10] = [
    "temperature",
    "top_k",
    "top_p",
    "min_p",
    "repetition_penalty",
    "frequency_penalty",
    "presence_penalty",
    "logprobs",
    "stop_token_ids",
    "messages",
];

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            kind,
            param: None,
            code: None,
        }
    }

    /// 400: the request can never succeed as it is.
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
    }

    /// 400 about one field.
    pub fn invalid_param(param: &str, message: impl Into<String>) -> Self {
        Self::invalid(message).with_param(param)
    }

    /// 404 `model_not_found`, as OpenAI answers.
    pub fn model_not_found(model: &str, served: &str) -> Self {
        let mut e = Self::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            format!("The model `{model}` does not exist; this server serves `{served}`."),
        );
        e.param = Some("model".into());
        e.code = Some("model_not_found");
        e
    }

    /// 404 for a path that is not an endpoint.
    pub fn no_route(method: &str, path: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            format!("no endpoint {method} {path}; see GET /v1/models, POST /v1/completions, POST /v1/chat/completions"),
        )
    }

    /// 405 for a known path asked with the wrong method.
    pub fn method_not_allowed(method: &str, path: &str) -> Self {
        Self::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "invalid_request_error",
            format!("{path} does not take {method}"),
        )
    }

    pub fn with_param(mut self, param: &str) -> Self {
        self.param = Some(param.to_string());
        self
    }

    /// The error of a gRPC status from the serving path (see the table above).
    pub fn from_status(s: &Status) -> Self {
        let message = s.message().to_string();
        match s.code() {
            Code::InvalidArgument | Code::OutOfRange => {
                let mut message = message;
                let first = message
                    .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                    .next()
                    .unwrap_or_default()
                    .to_string();
                let mut param = SHARED.contains(&first.as_str()).then(|| first.clone());
                if let Some((grpc, openai)) = RENAMED.iter().find(|(g, _)| *g == first) {
                    message = message.replacen(grpc, openai, 1);
                    param = Some(openai.to_string());
                } else if message.contains("stop string") || first == "stop" {
                    param = Some("stop".into());
                } else if message.starts_with("the prompt") || message.starts_with("empty input") {
                    param = Some("prompt".into());
                }
                let mut e = Self::invalid(message);
                e.param = param;
                e
            }
            Code::NotFound => Self::new(StatusCode::NOT_FOUND, "invalid_request_error", message),
            Code::ResourceExhausted => {
                let mut e = Self::new(StatusCode::TOO_MANY_REQUESTS, "rate_limit_error", message);
                e.code = Some("rate_limit_exceeded");
                e
            }
            Code::DeadlineExceeded => {
                let mut e = Self::new(StatusCode::GATEWAY_TIMEOUT, "server_error", message);
                e.code = Some("timeout");
                e
            }
            Code::Unavailable => {
                let mut e = Self::new(StatusCode::SERVICE_UNAVAILABLE, "server_error", message);
                e.code = Some("service_unavailable");
                e
            }
            _ => Self::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", message),
        }
    }

    /// For chat: the input field at fault is `messages`, not `prompt`.
    pub fn for_chat(mut self) -> Self {
        if self.param.as_deref() == Some("prompt") {
            self.param = Some("messages".into());
        }
        self
    }

    /// The JSON body, also sent as an SSE event when a stream fails after it started.
    pub fn to_json(&self) -> String {
        let body = Envelope {
            error: Detail {
                message: &self.message,
                kind: self.kind,
                param: self.param.as_deref(),
                code: self.code,
            },
        };
        // Serializing strings and options cannot fail.
        serde_json::to_string(&body).unwrap_or_default()
    }
}

impl From<Status> for ApiError {
    fn from(s: Status) -> Self {
        Self::from_status(&s)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let json = [(header::CONTENT_TYPE, "application/json")];
        (self.status, json, self.to_json()).into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_statuses_map_to_http_statuses_and_name_the_field() {
        let e = ApiError::from(Status::invalid_argument(
            "max_new_tokens must be at least 1",
        ));
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        assert_eq!(e.message, "max_tokens must be at least 1");
        assert_eq!(e.param.as_deref(), Some("max_tokens"));
        let e = ApiError::from(Status::invalid_argument("top_p must be in (0, 1]"));
        assert_eq!(e.param.as_deref(), Some("top_p"));
        let e = ApiError::from(Status::invalid_argument(
            "stop[0] must be 1 to 256 bytes long",
        ));
        assert_eq!(e.param.as_deref(), Some("stop"));
        let e = ApiError::from(Status::invalid_argument("the prompt is 9000 tokens; ..."));
        assert_eq!(e.clone().for_chat().param.as_deref(), Some("messages"));
        assert_eq!(e.param.as_deref(), Some("prompt"));
        for (code, http) in [
            (Code::NotFound, 404),
            (Code::ResourceExhausted, 429),
            (Code::DeadlineExceeded, 504),
            (Code::Unavailable, 503),
            (Code::Internal, 500),
            (Code::Cancelled, 500),
        ] {
            let e = ApiError::from(Status::new(code, "x"));
            assert_eq!(e.status.as_u16(), http, "{code:?}");
        }
    }

    #[test]
    fn the_body_has_the_openai_shape() {
        let e = ApiError::model_not_found("gpt-4", "SmolLM2");
        let v: serde_json::Value = serde_json::from_str(&e.to_json()).unwrap();
        assert_eq!(v["error"]["type"], "invalid_request_error");
        assert_eq!(v["error"]["code"], "model_not_found");
        assert_eq!(v["error"]["param"], "model");
        assert!(v["error"]["message"].as_str().unwrap().contains("gpt-4"));
        let v: serde_json::Value =
            serde_json::from_str(&ApiError::invalid("bad").to_json()).unwrap();
        assert_eq!(v["error"]["param"], serde_json::Value::Null);
        assert_eq!(v["error"]["code"], serde_json::Value::Null);
    }
}
