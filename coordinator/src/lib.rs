//! The Helios coordinator: everything about requests, nothing about weights.
//!
//! A request's way: a front door, the gRPC server ([`grpc`]), the OpenAI-compatible HTTP API
//! ([`openai`]) or the CLI, hands it to the [`front_door`], where [`admission`] turns text into
//! tokens (with the model's chat template, [`tokenizer`]) and checks its parameters, and which
//! hands it to the replica the [`router`] chooses among the [`replicas`] (the one holding the
//! longest cached prefix of the prompt, [`prefix_index`], within a load balance). There it waits in the [`scheduler`] until the KV cache can hold
//! it; the replica's step loop plans each step over the blocks [`block_manager`] hands out, and
//! the [`sharded_client`] sends it to every worker rank (found through [`membership`]: spawned
//! here, listed, or registered in etcd) and brings back rank 0's sampled tokens; a rank that is
//! lost is replaced and the replica rebuilt without losing a request (`replica::recovery`). [`output`] turns them back into text as they arrive
//! (the [`detokenizer`], with [`stop`] watching for stop strings) and streams it to the client.
//! Anything that goes wrong is a [`error::ServeError`], which each front door maps to its
//! transport in one place.
//! Along the way its [`request_trace`] keeps its spans, [`metrics`] and log lines (`/metrics`
//! shows the metrics; `helios_proto::telemetry` exports the spans). [`shutdown`] binds the
//! listeners and drains them together. The architecture and its reasons:
//! `docs/architecture.md`.

pub mod access;
pub mod admission;
pub mod block_manager;
pub mod constraint;
pub mod detokenizer;
pub mod error;
pub mod front_door;
pub mod grpc;
pub mod listener;
pub mod membership;
pub mod metrics;
pub mod openai;
pub mod output;
pub mod prefix_index;
pub mod replica;
pub mod replicas;
pub mod request_trace;
pub mod router;
pub mod scheduler;
pub mod sharded_client;
pub mod shutdown;
pub mod stop;
pub mod tokenizer;
