//! The Helios coordinator: everything about requests, nothing about weights.
//!
//! A request's way: text becomes tokens in [`tokenizer`] (with the model's chat template), the
//! [`driver`] plans steps over the KV blocks that [`block_manager`] hands out, the
//! [`sharded_client`] sends each step to every worker rank (spawned by [`local_workers`]) and
//! brings back rank 0's sampled tokens, which the tokenizer turns back into text.

pub mod block_manager;
pub mod driver;
pub mod local_workers;
pub mod sharded_client;
pub mod tokenizer;
