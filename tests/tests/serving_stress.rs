//! Many requests at once on a small KV cache, some cancelled mid-stream, some invalid: every
//! accepted request ends with a finish reason or an error, usage matches what was streamed,
//! and afterwards every block is free.

use std::time::Duration;

use futures::future::join_all;
use futures::StreamExt;
use helios_proto::v1::{FinishReason, GenerateRequest, GenerationParameters};
use helios_tests::make_tiny_model;
use helios_tests::server::{model_info, Process};

/// A small deterministic generator (no dependency, same sequence every run).
struct Lcg(u64);

impl Lcg {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (self.0 >> 33) % n
    }
}

#[derive(Debug)]
enum Outcome {
    Finished {
        tokens: usize,
        usage: u32,
        reason: i32,
    },
    Cancelled,
    Refused(tonic::Code),
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_request_ends_and_no_block_leaks_under_churn() {
    let dir = tempfile::tempdir().expect("tempdir");
    make_tiny_model(dir.path(), 41, &[]).expect("tiny model");
    // 24 blocks of 16 = 384 positions: a few requests at a time, the rest wait their turn.
    let server = Process::serve(&[
        "--model",
        dir.path().to_str().expect("utf-8"),
        "--tp",
        "2",
        "--num-kv-blocks",
        "24",
        "--max-batch-tokens",
        "64",
    ]);
    let mut client = server.client().await;
    let total = model_info(&mut client).await.kv_blocks_total;
    let mut rng = Lcg(7);
    let requests: Vec<(GenerateRequest, Option<usize>, bool)> = (0..60)
        .map(|i| {
            let prompt_len = 1 + rng.below(120) as usize;
            let invalid = i % 10 == 9;
            let params = GenerationParameters {
                max_new_tokens: Some(1 + rng.below(100) as u32),
                temperature: if i % 2 == 0 { 0.0 } else { 0.9 },
                seed: Some(i),
                // Every tenth request is out of range (top_p 0): refused, costs nobody.
                top_p: invalid.then_some(0.0),
                ignore_eos: true,
                stop: if i % 7 == 3 {
                    vec!["e t".into()]
                } else {
                    vec![]
                },
                ..Default::default()
            };
            let req = GenerateRequest {
                token_ids: (0..prompt_len).map(|_| 3 + rng.below(290) as u32).collect(),
                parameters: Some(params),
                ..Default::default()
            };
            // A third of the valid ones are dropped after a few tokens.
            let cancel_after = (i % 3 == 1).then(|| 1 + rng.below(5) as usize);
            (req, cancel_after, invalid)
        })
        .collect();
    let outcomes = join_all(requests.iter().map(|(req, cancel_after, _)| {
        let mut c = client.clone();
        let req = req.clone();
        let cancel_after = *cancel_after;
        async move {
            let mut stream = match c.generate_stream(req).await {
                Ok(s) => s.into_inner(),
                Err(e) => return Outcome::Refused(e.code()),
            };
            let mut tokens = 0;
            while let Some(resp) = stream.next().await {
                let resp = resp.expect("an accepted request never errors here");
                tokens += resp.token_ids.len();
                if resp.finish_reason != FinishReason::Unspecified as i32 {
                    let usage = resp.usage.expect("usage").completion_tokens;
                    let reason = resp.finish_reason;
                    return Outcome::Finished {
                        tokens,
                        usage,
                        reason,
                    };
                }
                if cancel_after.is_some_and(|n| tokens >= n) {
                    return Outcome::Cancelled;
                }
            }
            panic!("a stream ended without a finish reason");
        }
    }))
    .await;
    let mut finished = 0;
    for (i, ((req, _, invalid), outcome)) in requests.iter().zip(&outcomes).enumerate() {
        let max_new = req.parameters.as_ref().and_then(|p| p.max_new_tokens);
        match outcome {
            Outcome::Refused(code) => {
                assert!(*invalid, "request {i} refused: {code:?}");
                assert_eq!(*code, tonic::Code::InvalidArgument);
            }
            Outcome::Finished {
                tokens,
                usage,
                reason,
            } => {
                assert!(!invalid, "request {i} should have been refused");
                assert_eq!(*tokens as u32, *usage, "request {i}");
                // EOS is ignored: only max_new_tokens or a stop string ends a request.
                if *reason == FinishReason::Length as i32 {
                    assert_eq!(Some(*usage), max_new, "request {i}");
                } else {
                    assert_eq!(*reason, FinishReason::Stop as i32, "request {i}");
                    assert!(Some(*usage) <= max_new, "request {i}");
                }
                finished += 1;
            }
            Outcome::Cancelled => assert!(!invalid),
        }
    }
    assert!(finished >= 30, "only {finished} finished");
    let idle = async {
        loop {
            let info = model_info(&mut client).await;
            if info.requests_running == 0 && info.requests_waiting == 0 {
                return info;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    let info = tokio::time::timeout(Duration::from_secs(20), idle)
        .await
        .expect("requests still running after every client left");
    assert_eq!(info.kv_blocks_free, total, "blocks leaked");
}
