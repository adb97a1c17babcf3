//! gRPC calls with bytes the test chooses: a raw-bytes codec for tonic (the message is ours,
//! the framing tonic's), and raw frames (framing ours too) sent through a tonic channel as an
//! HTTP/2 request. Both carry the target's metadata.
//!
//! tonic answers what it cannot decode itself, before any handler runs: a message prost
//! cannot parse (including invalid UTF-8 in a string field) is INTERNAL "failed to decode
//! Protobuf message", a frame over the server's limit OUT_OF_RANGE, a bad compressed flag or a
//! body that ends inside a frame INTERNAL "protocol error" / "Unexpected EOF", an unknown
//! `grpc-encoding` UNIMPLEMENTED. [`tonic_refusal`] recognises those by their messages, so
//! that a fuzzer accepts INTERNAL only for them and never from the service.

use std::time::Duration;

use bytes::{Buf, BufMut, Bytes};
use futures::StreamExt;
use http_body_util::BodyExt;
use tonic::client::Grpc;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::transport::Channel;
use tonic::{Code, Status};
use tower_service::Service;

use super::FuzzTarget;

/// Passes bytes through unchanged: what the caller encodes (or mangles) is the message.
#[derive(Debug, Clone, Copy, Default)]
pub struct RawCodec;

#[derive(Debug, Clone, Copy, Default)]
pub struct RawEncoder;

#[derive(Debug, Clone, Copy, Default)]
pub struct RawDecoder;

impl Codec for RawCodec {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = RawEncoder;
    type Decoder = RawDecoder;

    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }

    fn decoder(&mut self) -> RawDecoder {
        RawDecoder
    }
}

impl Encoder for RawEncoder {
    type Item = Bytes;
    type Error = Status;

    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for RawDecoder {
    type Item = Bytes;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }
}

/// What a call that returned came back with, or why it did not (a transport failure, a
/// timeout: both failures of the server under test).
pub type CallResult<T> = Result<Result<T, Status>, String>;

/// A connection to a target for raw calls.
#[derive(Clone)]
pub struct RawClient {
    channel: Channel,
    target: FuzzTarget,
    /// Past it a call is a hang.
    pub timeout: Duration,
}

impl RawClient {
    /// Connects to `target` (lazily: a server that went away shows in the calls).
    pub fn new(target: &FuzzTarget, timeout: Duration) -> Self {
        let channel = Channel::from_shared(target.url())
            .expect("target url")
            .connect_lazy();
        Self {
            channel,
            target: target.clone(),
            timeout,
        }
    }

    pub fn channel(&self) -> Channel {
        self.channel.clone()
    }

    /// `msg` (a message or a stream of them) as a request with the target's metadata.
    pub fn request_of<T>(&self, msg: T) -> tonic::Request<T> {
        self.target.request(msg)
    }

    /// A request for `body` with the target's metadata, then `extra`.
    fn request(&self, body: Bytes, extra: &[(String, String)]) -> tonic::Request<Bytes> {
        let mut req = self.target.request(body);
        for (k, v) in extra {
            if let (Ok(k), Ok(v)) = (
                k.parse::<tonic::metadata::MetadataKey<tonic::metadata::Ascii>>(),
                v.parse(),
            ) {
                req.metadata_mut().insert(k, v);
            }
        }
        req
    }

    /// A unary call of `path` (`/helios.v1.Generation/Generate`) with `body` as the message.
    pub async fn unary(
        &self,
        path: &'static str,
        body: Bytes,
        extra: &[(String, String)],
    ) -> CallResult<Bytes> {
        let mut grpc = Grpc::new(self.channel());
        let req = self.request(body, extra);
        let call = async {
            grpc.ready().await.map_err(|e| format!("not ready: {e}"))?;
            let path = http::uri::PathAndQuery::from_static(path);
            Ok(grpc
                .unary(req, path, RawCodec)
                .await
                .map(|r| r.into_inner()))
        };
        self.timed(call).await
    }

    /// A server-streaming call: every message of the stream, or the status it ended with.
    pub async fn server_streaming(
        &self,
        path: &'static str,
        body: Bytes,
        extra: &[(String, String)],
    ) -> CallResult<Vec<Bytes>> {
        let mut grpc = Grpc::new(self.channel());
        let req = self.request(body, extra);
        let call = async {
            grpc.ready().await.map_err(|e| format!("not ready: {e}"))?;
            let path = http::uri::PathAndQuery::from_static(path);
            let mut stream = match grpc.server_streaming(req, path, RawCodec).await {
                Ok(r) => r.into_inner(),
                Err(status) => return Ok(Err(status)),
            };
            let mut all = Vec::new();
            while let Some(item) = stream.next().await {
                match item {
                    Ok(m) => all.push(m),
                    Err(status) => return Ok(Err(status)),
                }
            }
            Ok(Ok(all))
        };
        self.timed(call).await
    }

    /// POSTs `body` (gRPC frames or not) to `path` as an HTTP/2 request with the target's
    /// metadata and `headers` (which replace the defaults `content-type: application/grpc`
    /// and `te: trailers` when they name them). The frames of the answer's body, and its
    /// status from the trailers (or the headers, for a trailers-only answer).
    pub async fn frames(
        &self,
        path: &str,
        body: Bytes,
        headers: &[(String, String)],
    ) -> CallResult<Vec<Bytes>> {
        let uri = format!("{}{path}", self.target.url());
        let mut req = http::Request::post(uri)
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(tonic::body::Body::new(http_body_util::Full::new(body)))
            .map_err(|e| format!("building the request: {e}"))?;
        let all = self.target.metadata.iter().chain(headers);
        for (k, v) in all {
            if let (Ok(k), Ok(v)) = (
                http::HeaderName::from_bytes(k.as_bytes()),
                http::HeaderValue::from_str(v),
            ) {
                req.headers_mut().insert(k, v);
            }
        }
        let mut channel = self.channel();
        let call = async move {
            futures::future::poll_fn(|cx| channel.poll_ready(cx))
                .await
                .map_err(|e| format!("not ready: {e}"))?;
            let resp = channel
                .call(req)
                .await
                .map_err(|e| format!("transport: {e:?}"))?;
            let (parts, body) = resp.into_parts();
            let collected = body
                .collect()
                .await
                .map_err(|e| format!("reading the answer: {e:?}"))?;
            let trailers = collected.trailers().cloned();
            let data = collected.to_bytes();
            let status = trailers
                .as_ref()
                .and_then(Status::from_header_map)
                .or_else(|| Status::from_header_map(&parts.headers))
                .ok_or_else(|| format!("HTTP {} without grpc-status", parts.status))?;
            if status.code() != Code::Ok {
                return Ok(Err(status));
            }
            Ok(Ok(split_frames(&data)?))
        };
        self.timed(call).await
    }

    async fn timed<T>(
        &self,
        call: impl std::future::Future<Output = CallResult<T>>,
    ) -> CallResult<T> {
        tokio::time::timeout(self.timeout, call)
            .await
            .map_err(|_| format!("no answer within {:?} (a hang)", self.timeout))?
    }
}

/// `msg` in a gRPC frame: flag 0 (not compressed), its length, the bytes.
pub fn frame(msg: &[u8]) -> Vec<u8> {
    frame_with(0, msg.len() as u32, msg)
}

/// A frame that may lie: any compressed flag, any length.
pub fn frame_with(flag: u8, len: u32, msg: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(5 + msg.len());
    out.push(flag);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(msg);
    out
}

/// The messages of a response body made of gRPC frames.
pub fn split_frames(mut data: &[u8]) -> Result<Vec<Bytes>, String> {
    let mut out = Vec::new();
    while !data.is_empty() {
        if data.len() < 5 {
            return Err(format!("a {}-byte frame header", data.len()));
        }
        let len = u32::from_be_bytes([data[1], data[2], data[3], data[4]]) as usize;
        if data[0] != 0 || data.len() < 5 + len {
            return Err(format!("a bad frame: flag {}, length {len}", data[0]));
        }
        out.push(Bytes::copy_from_slice(&data[5..5 + len]));
        data = &data[5 + len..];
    }
    Ok(out)
}

/// Whether `status` is one tonic itself answers for bytes it could not take (see the module
/// docs), rather than one of the service's.
pub fn tonic_refusal(status: &Status) -> bool {
    let m = status.message();
    match status.code() {
        Code::Internal => [
            "failed to decode Protobuf message",
            "protocol error",
            "Unexpected EOF decoding stream",
            "Missing request message",
            "Error decompressing",
        ]
        .iter()
        .any(|s| m.contains(s)),
        Code::OutOfRange => m.contains("decoded message length too large"),
        Code::Unimplemented => m.contains("grpc-encoding") || m.contains("isn't supported"),
        _ => false,
    }
}

/// The name a report counts a status under: its code, and for tonic's own refusals a hint of
/// why.
pub fn outcome_name(status: &Status) -> String {
    let code = format!("{:?}", status.code());
    if tonic_refusal(status) {
        let why = status.message().split(':').next().unwrap_or_default();
        format!(
            "{code} (tonic: {})",
            why.chars().take(40).collect::<String>()
        )
    } else {
        code
    }
}
