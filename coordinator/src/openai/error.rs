//! OpenAI-shaped errors: `{"error": {"message", "type", "param", "code"}}`, with the HTTP status
//! from which OpenAI's SDKs pick their exception (400 `BadRequestError`, 404 `NotFoundError`,
//! 429 `RateLimitError`, 5xx `InternalServerError`, ...).
//!
//! Every way a request can fail answers in this shape, so a client needs one error path: a
//! body that is not JSON, a field of the wrong type, a body over the limit, an unknown route or
//! model, and every [`ServeError`] of the front door, which gRPC clients get too (the same
//! admission, so the same messages). This is the one place the core's errors become HTTP's:
//!
//! | `ServeError` | HTTP |
//! |---|---|
//! | `InvalidArgument` | 400 `invalid_request_error`, `param` the field (OpenAI's name) |
//! | `QueueFull` | 429 `rate_limit_exceeded` |
//! | `DeadlineExceeded` | 504 `timeout` |
//! | `Starting`, `Draining`, `ReplicaDown`, `Recovering` | 503 `service_unavailable` |
//! | `Internal` | 500 |

use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::error::ServeError;

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

/// Admission names its fields as the gRPC API does; the OpenAI names of those whose names
/// differ (every other field is named alike).
const RENAMED: [(&str, &str); 2] = [("max_new_tokens", "max_tokens"), ("token_ids", "prompt")];

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

    /// 401 `invalid_api_key`, as OpenAI answers a missing or wrong key.
    pub fn unauthorized(presented: bool) -> Self {
        let message = if presented {
            "Incorrect API key provided."
        } else {
            "You didn't provide an API key: send `Authorization: Bearer <key>`."
        };
        let mut e = Self::new(StatusCode::UNAUTHORIZED, "invalid_request_error", message);
        e.code = Some("invalid_api_key");
        e
    }

    /// 408: the client did not send its request body within the read timeout.
    pub fn body_timeout(timeout: std::time::Duration) -> Self {
        let mut e = Self::new(
            StatusCode::REQUEST_TIMEOUT,
            "invalid_request_error",
            format!("the request body did not arrive within {timeout:?}"),
        );
        e.code = Some("timeout");
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

    /// The same error about `to` if it was about `from`.
    pub fn param_renamed(self, from: &str, to: &str) -> Self {
        if self.param.as_deref() == Some(from) {
            self.with_param(to)
        } else {
            self
        }
    }

    pub fn with_param(mut self, param: &str) -> Self {
        self.param = Some(param.to_string());
        self
    }

    /// The error of a [`ServeError`] (see the table above). A message that starts with a
    /// field renamed in OpenAI's API says the OpenAI name.
    pub fn from_serve(e: ServeError) -> Self {
        let unavailable = |message: String| {
            let mut e = Self::new(StatusCode::SERVICE_UNAVAILABLE, "server_error", message);
            e.code = Some("service_unavailable");
            e
        };
        match e {
            ServeError::InvalidArgument { field, message } => {
                let Some(field) = field else {
                    return Self::invalid(message);
                };
                match RENAMED.iter().find(|(grpc, _)| *grpc == field) {
                    Some((grpc, openai)) => {
                        Self::invalid_param(openai, message.replacen(grpc, openai, 1))
                    }
                    None => Self::invalid_param(field, message),
                }
            }
            ServeError::QueueFull(_) | ServeError::SlowClient(_) => {
                let mut e = Self::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    "rate_limit_error",
                    e.to_string(),
                );
                e.code = Some("rate_limit_exceeded");
                e
            }
            ServeError::DeadlineExceeded => {
                let mut e = Self::new(StatusCode::GATEWAY_TIMEOUT, "server_error", e.to_string());
                e.code = Some("timeout");
                e
            }
            ServeError::Starting
            | ServeError::Draining
            | ServeError::ReplicaDown(_)
            | ServeError::Recovering(_) => unavailable(e.to_string()),
            ServeError::Internal(message) => {
                Self::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", message)
            }
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

impl From<ServeError> for ApiError {
    fn from(e: ServeError) -> Self {
        Self::from_serve(e)
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
    fn serve_errors_map_to_http_statuses_and_name_the_field() {
        let e = ApiError::from(ServeError::invalid(
            "max_new_tokens",
            "max_new_tokens must be at least 1",
        ));
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        assert_eq!(e.message, "max_tokens must be at least 1");
        assert_eq!(e.param.as_deref(), Some("max_tokens"));
        let e = ApiError::from(ServeError::invalid("top_p", "top_p must be in (0, 1]"));
        assert_eq!(e.param.as_deref(), Some("top_p"));
        let e = ApiError::from(ServeError::invalid(
            "stop",
            "stop[0] must be 1 to 256 bytes long",
        ));
        assert_eq!(e.param.as_deref(), Some("stop"));
        let e = ApiError::from(ServeError::invalid(
            "token_ids",
            "token_ids: 99999 is outside the vocabulary (size 49152)",
        ));
        assert_eq!(
            e.message,
            "prompt: 99999 is outside the vocabulary (size 49152)"
        );
        let e = ApiError::from(ServeError::invalid(
            "prompt",
            "the prompt is 9000 tokens; ...",
        ));
        assert_eq!(e.clone().for_chat().param.as_deref(), Some("messages"));
        assert_eq!(e.param.as_deref(), Some("prompt"));
        let e = ApiError::from(ServeError::invalid_request("set only one of prompt, ..."));
        assert_eq!((e.status.as_u16(), e.param), (400, None));
        for (error, http, code) in [
            (ServeError::QueueFull(3), 429, Some("rate_limit_exceeded")),
            (ServeError::DeadlineExceeded, 504, Some("timeout")),
            (ServeError::Starting, 503, Some("service_unavailable")),
            (ServeError::Draining, 503, Some("service_unavailable")),
            (
                ServeError::ReplicaDown("x".into()),
                503,
                Some("service_unavailable"),
            ),
            (
                ServeError::Recovering("x".into()),
                503,
                Some("service_unavailable"),
            ),
            (ServeError::Internal("x".into()), 500, None),
        ] {
            let message = error.to_string();
            let e = ApiError::from(error);
            assert_eq!((e.status.as_u16(), e.code), (http, code), "{message}");
            assert_eq!(e.message, message);
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
