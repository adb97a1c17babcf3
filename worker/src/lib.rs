//! The Helios worker: one tensor-parallel rank of a Llama-family model.
//!
//! The way of a step through this crate: [`service`] receives a `StepPlan` from the
//! coordinator, [`batch`] checks it and lays it out, [`model`] runs the sharded forward pass
//! (all-reducing through [`comm`] after attention and after the MLP of every layer, keys and
//! values going into [`kv_cache`]), and on rank 0 [`sampling`] picks each sequence's token
//! ([`prompt_logprobs`] scores the input tokens when asked).
//! [`weights`] loads this rank's slices of an HF or GGUF model, [`config`] its hyper-parameters.

pub mod batch;
pub mod block_tables;
pub mod comm;
pub mod config;
pub mod engine;
pub mod kernels;
pub mod kv_cache;
pub mod memory;
pub mod model;
pub mod prompt_logprobs;
pub mod sampling;
pub mod service;
pub mod vocab_parallel;
pub mod weights;
