//! The Helios coordinator: everything about requests, nothing about weights.
//!
//! A request's way: text becomes tokens in [`tokenizer`] (with the model's chat template), the
//! [`driver`] plans steps over the KV blocks that [`block_manager`] hands out, the
//! [`sharded_client`] sends each step to every worker rank (spawned by [`local_workers`]) and
//! brings back rank 0's sampled tokens, which the [`detokenizer`] turns back into text as they
//! arrive, [`stop`] watching for stop strings.

pub mod block_manager;
pub mod detokenizer;
pub mod driver;
pub mod local_workers;
pub mod sharded_client;
pub mod stop;
pub mod tokenizer;
