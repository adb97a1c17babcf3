//! The Helios coordinator: everything about requests, nothing about weights.
//!
//! A request's way: the [`server`] (gRPC), the OpenAI-compatible HTTP API ([`openai`]) or the
//! CLI hands it to [`serving`], where [`admission`] turns text into tokens (with the model's
//! chat template, [`tokenizer`]) and checks its parameters. It then waits in the [`scheduler`]
//! until the KV cache can hold it; the [`step_loop`] plans each step over the blocks
//! [`block_manager`] hands out, and the [`sharded_client`] sends it to every worker rank
//! (spawned by [`local_workers`]) and brings back rank 0's sampled tokens. [`output`] turns them
//! back into text as they arrive (the [`detokenizer`], with [`stop`] watching for stop strings)
//! and streams it to the client.
//! Along the way its [`request_trace`] keeps its spans, [`metrics`] and log lines (`/metrics`
//! shows the metrics; `helios_proto::telemetry` exports the spans).
//! [`driver`] runs a fixed batch without a server, for benchmarks and tests.

pub mod admission;
pub mod block_manager;
pub mod detokenizer;
pub mod driver;
pub mod local_workers;
pub mod metrics;
pub mod openai;
pub mod output;
pub mod request_trace;
pub mod scheduler;
pub mod server;
pub mod serving;
pub mod sharded_client;
pub mod step_loop;
pub mod stop;
pub mod tokenizer;
