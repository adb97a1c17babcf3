//! Reading a request body: at most [`MAX_BODY_BYTES`] (gRPC's limit), JSON, an object; then
//! typed views of it whose errors name the field at fault (`max_tokens: invalid type: string
//! "ten", expected u32`).
//!
//! The body is parsed once into a JSON value, and each typed view (the endpoint's own fields,
//! the shared sampling fields) is read from that value with `serde_path_to_error`, which keeps
//! the path of a wrong field (`#[serde(flatten)]` would lose it).
//!
//! axum's `Json` and `DefaultBodyLimit` answer a body over the limit with a bare 413 and stop
//! reading; this extractor answers 400 in OpenAI's shape like every other bad input, and reads
//! (and drops) the rest of an oversized body first, up to [`DRAIN_BYTES`]: most clients write
//! their whole body before they read, and a server that closes a connection with unread data
//! on it may reset it, so that the client sees a broken connection instead of the error.

use axum::body::Body;
use axum::extract::{FromRequest, Request};
use axum::http::header;
use futures::StreamExt;
use serde::de::DeserializeOwned;
use serde_json::Value;

use super::error::ApiError;

/// The largest request body, as the gRPC transport's largest message.
pub const MAX_BODY_BYTES: usize = crate::front_door::MAX_REQUEST_BYTES;
/// How much of an oversized body is read and dropped before the error is sent; a client that
/// announces more is answered at once (and its connection closed).
pub const DRAIN_BYTES: usize = 64 << 20;

/// How long a client may take to send its body (`--read-timeout`), as a request extension the
/// router adds; a body not read within it is answered 408.
#[derive(Debug, Clone, Copy)]
pub struct BodyTimeout(pub std::time::Duration);

/// A request body that is a JSON object.
#[derive(Debug)]
pub struct JsonBody(pub Value);

impl<S: Send + Sync> FromRequest<S> for JsonBody {
    type Rejection = ApiError;

    async fn from_request(req: Request, _: &S) -> Result<Self, ApiError> {
        let announced = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<usize>().ok());
        if announced.is_some_and(|n| n > DRAIN_BYTES) {
            return Err(too_large());
        }
        let timeout = req.extensions().get::<BodyTimeout>().copied();
        let read = read_limited(req.into_body(), announced);
        let bytes = match timeout {
            Some(BodyTimeout(t)) => tokio::time::timeout(t, read)
                .await
                .map_err(|_| ApiError::body_timeout(t))??,
            None => read.await?,
        };
        parse_object(&bytes).map(JsonBody)
    }
}

impl JsonBody {
    /// The body read as `T`; a field of the wrong type is a 400 that names it.
    pub fn view<T: DeserializeOwned>(&self) -> Result<T, ApiError> {
        serde_path_to_error::deserialize(&self.0).map_err(|e| {
            let path = e.path().to_string();
            let inner = e.into_inner();
            if path == "." {
                ApiError::invalid(format!("the request body: {inner}"))
            } else {
                ApiError::invalid_param(&path, format!("{path}: {inner}"))
            }
        })
    }
}

fn too_large() -> ApiError {
    ApiError::invalid(format!(
        "the request body is over the limit of {} MiB",
        MAX_BODY_BYTES >> 20
    ))
}

/// Reads `body` if it is at most [`MAX_BODY_BYTES`]; drains a larger one (see the module doc).
async fn read_limited(body: Body, announced: Option<usize>) -> Result<Vec<u8>, ApiError> {
    let mut data = body.into_data_stream();
    let mut buf = Vec::with_capacity(announced.unwrap_or(0).min(MAX_BODY_BYTES));
    let mut seen = 0usize;
    while let Some(chunk) = data.next().await {
        let chunk =
            chunk.map_err(|e| ApiError::invalid(format!("reading the request body: {e}")))?;
        seen = seen.saturating_add(chunk.len());
        if seen > DRAIN_BYTES {
            break;
        }
        if seen > MAX_BODY_BYTES {
            // Keep reading, but hold nothing.
            buf = Vec::new();
            continue;
        }
        buf.extend_from_slice(&chunk);
    }
    if seen > MAX_BODY_BYTES {
        return Err(too_large());
    }
    Ok(buf)
}

/// `bytes` as a JSON object.
fn parse_object(bytes: &[u8]) -> Result<Value, ApiError> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::invalid(
            "the request body is empty; send a JSON object",
        ));
    }
    let value: Value = serde_json::from_slice(bytes)
        .map_err(|e| ApiError::invalid(format!("the request body is not valid JSON: {e}")))?;
    if !value.is_object() {
        return Err(ApiError::invalid("the request body must be a JSON object"));
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::openai::types::{Common, CompletionRequest};

    fn body(json: &str) -> Result<JsonBody, ApiError> {
        parse_object(json.as_bytes()).map(JsonBody)
    }

    #[test]
    fn malformed_json_and_non_objects_are_refused() {
        for bad in [
            "",
            "  ",
            "{",
            "{\"model\": }",
            "[1, 2]",
            "\"text\"",
            "{} {}",
        ] {
            let e = body(bad).expect_err(bad);
            assert_eq!(e.status.as_u16(), 400, "{bad}");
            assert_eq!(e.kind, "invalid_request_error");
        }
    }

    #[test]
    fn a_wrong_type_names_its_field_in_either_view() {
        let b = body(r#"{"prompt": "x", "max_tokens": "ten"}"#).unwrap();
        let e = b.view::<CompletionRequest>().unwrap_err();
        assert_eq!(e.param.as_deref(), Some("max_tokens"));
        assert!(
            e.message.starts_with("max_tokens: invalid type"),
            "{}",
            e.message
        );
        assert!(
            b.view::<Common>().is_ok(),
            "max_tokens is not a common field"
        );

        let b = body(r#"{"temperature": "hot", "stop_token_ids": [1]}"#).unwrap();
        assert_eq!(
            b.view::<Common>().unwrap_err().param.as_deref(),
            Some("temperature")
        );
        let b = body(r#"{"stop_token_ids": [1, "a"]}"#).unwrap();
        assert_eq!(
            b.view::<Common>().unwrap_err().param.as_deref(),
            Some("stop_token_ids[1]")
        );
        // Unknown fields are ignored; integers are accepted where floats are expected.
        let b = body(r#"{"prompt": "x", "temperature": 1, "frobnicate": {"a": 1}}"#).unwrap();
        assert_eq!(b.view::<Common>().unwrap().temperature, Some(1.0));
    }

    #[tokio::test]
    async fn an_oversized_body_is_drained_and_refused() {
        let big = vec![b' '; MAX_BODY_BYTES + 1];
        let e = read_limited(Body::from(big), None).await.unwrap_err();
        assert!(
            e.message.contains("over the limit of 4 MiB"),
            "{}",
            e.message
        );
        let fits = vec![b' '; MAX_BODY_BYTES];
        assert_eq!(
            read_limited(Body::from(fits), None).await.unwrap().len(),
            MAX_BODY_BYTES
        );
    }
}
