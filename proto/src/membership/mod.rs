//! Cluster membership through etcd: workers claim a (replica, rank) under a lease, the
//! coordinator watches who holds which rank.
//!
//! # Key layout
//!
//! ```text
//! /helios/{cluster}/replicas/{replica}/ranks/{rank}  ->  JSON WorkerRecord
//! ```
//!
//! One key per rank, so claiming one is a single "create if absent" transaction and no two
//! workers can hold it; the replica level lets several replicas share a cluster (and one
//! coordinator watch only its own replica's prefix); the cluster level lets several Helios
//! deployments share one etcd. See [`key`] for the exact rules.
//!
//! # Pieces
//!
//! - [`RankKey`]: the key layout, its prefixes, and parsing keys back.
//! - [`WorkerRecord`]: what a worker publishes about itself; [`instance_id`] tells processes
//!   apart.
//! - [`model_fingerprint`]: a cheap, sampled content fingerprint of a model, so ranks can
//!   check they load the same weights.
//! - [`EtcdClient`]: a thin etcd v3 client over the vendored API ([`crate::etcd`]).
//! - [`claim`] → [`Registration`]: the worker side, kept alive through etcd outages.
//! - [`ClusterWatch`]: the coordinator side, a live rank → record view that survives outages.
//!
//! Both long-lived sides run a tokio task and publish what they see through
//! `tokio::sync::watch`, so callers read the latest state without locks and can wait for
//! changes.

mod backoff;
pub mod client;
pub mod cluster_watch;
pub mod connect;
pub mod fingerprint;
pub mod key;
pub mod record;
pub mod registration;

pub use client::{
    is_auth_refused, AuthRefused, CreateOutcome, EtcdClient, Lease, WatchBatch, DEFAULT_RPC_TIMEOUT,
};
pub use cluster_watch::{ClusterWatch, Members};
pub use connect::{EtcdArgs, EtcdConnect, EtcdCredentials, EtcdTls, ETCD_PASSWORD_ENV};
pub use fingerprint::model_fingerprint;
pub use key::{validate_cluster, KeyError, RankKey};
pub use record::{instance_id, WorkerRecord};
pub use registration::{
    claim, claim_with_retry, ClaimError, Registration, RegistrationState, CLAIM_RETRY_FOR,
};
