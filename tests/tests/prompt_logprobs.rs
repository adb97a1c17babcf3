//! Prompt logprobs (completions' `echo` with `logprobs`) through real worker processes at
//! tensor-parallel degree 2, against the independent NumPy reference: every prompt token's
//! logprob and the most likely tokens at its position, with the prompt read in chunks (each
//! chunk's last row scores the next chunk's first token), unary and streamed, when the prefix
//! cache holds the prompt (it is computed anyway), and for every choice of a request; and at tp 1
//! a prompt longer than the rows a rank computes logits for at once, in one chunk.

use helios_proto::v1::{
    FinishReason, GenerateRequest, GenerateResponse, GenerationParameters, SampledLogprobs,
};
use helios_tests::server::Process;
use helios_tests::{make_tiny_model, reference_all_logits};
use tempfile::TempDir;

/// Log-softmax of one row, in f64.
fn log_softmax(row: &[f64]) -> Vec<f64> {
    let max = row.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let z = row.iter().map(|v| (v - max).exp()).sum::<f64>().ln() + max;
    row.iter().map(|v| v - z).collect()
}

fn request(prompt: &[u32], params: GenerationParameters) -> GenerateRequest {
    GenerateRequest {
        token_ids: prompt.to_vec(),
        parameters: Some(params),
        ..Default::default()
    }
}

fn scored(n: Option<u32>) -> GenerationParameters {
    GenerationParameters {
        max_new_tokens: Some(3),
        ignore_eos: true,
        logprobs: Some(0),
        prompt_logprobs: Some(3),
        n,
        ..Default::default()
    }
}

/// `got` (one entry per prompt token, the first empty) against the reference's log-softmax at
/// every position (`want[k]` predicts token `k + 1`).
fn assert_matches_reference(got: &[SampledLogprobs], prompt: &[u32], want: &[Vec<f64>]) {
    assert_eq!(got.len(), prompt.len());
    assert!(got[0].sampled.is_none() && got[0].top.is_empty());
    for k in 1..prompt.len() {
        let lsm = &want[k - 1];
        let s = got[k].sampled.expect("a scored token");
        assert_eq!(s.token_id, prompt[k], "position {k}");
        let err = (s.logprob as f64 - lsm[prompt[k] as usize]).abs();
        assert!(
            err < 1e-4,
            "position {k}: {} vs {}",
            s.logprob,
            lsm[prompt[k] as usize]
        );
        let mut order: Vec<usize> = (0..lsm.len()).collect();
        order.sort_by(|&a, &b| lsm[b].total_cmp(&lsm[a]));
        assert_eq!(got[k].top.len(), 3);
        for (t, &id) in got[k].top.iter().zip(&order) {
            assert!(
                (t.logprob as f64 - lsm[id]).abs() < 1e-4,
                "position {k}: {t:?}"
            );
            // Equal ids unless the reference has a near-tie there.
            if (lsm[id] - lsm[t.token_id as usize]).abs() > 1e-5 {
                assert_eq!(t.token_id as usize, id, "position {k}");
            }
        }
    }
}

/// The same scores, and the same most likely tokens with the same logprobs.
fn assert_close(a: &[SampledLogprobs], b: &[SampledLogprobs]) {
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(b) {
        let top = |l: &SampledLogprobs| l.top.iter().map(|t| t.token_id).collect::<Vec<_>>();
        assert_eq!(top(x), top(y), "{x:?} vs {y:?}");
        for (tx, ty) in x.top.iter().zip(&y.top) {
            assert!((tx.logprob - ty.logprob).abs() < 1e-5, "{x:?} vs {y:?}");
        }
        assert_eq!(x.sampled.map(|s| s.token_id), y.sampled.map(|s| s.token_id));
        let (lx, ly) = (
            x.sampled.map_or(0.0, |s| s.logprob),
            y.sampled.map_or(0.0, |s| s.logprob),
        );
        assert!((lx - ly).abs() < 1e-5, "{x:?} vs {y:?}");
    }
}

/// A tiny model of `seed`, the reference's log-softmax at every position of `prompt` under
/// it, and `helios serve` on it with `flags`.
fn serve_tiny(seed: u64, prompt: &[u32], flags: &[&str]) -> (TempDir, Vec<Vec<f64>>, Process) {
    let dir = tempfile::tempdir().unwrap();
    make_tiny_model(dir.path(), seed, &[]).unwrap();
    let want = reference_all_logits(dir.path(), prompt)
        .unwrap()
        .iter()
        .map(|row| log_softmax(row))
        .collect();
    let mut args = vec!["--model", dir.path().to_str().unwrap()];
    args.extend_from_slice(flags);
    let server = Process::serve(&args);
    (dir, want, server)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prompt_longer_than_a_ranks_scoring_slice_is_scored_whole_at_tp_1() {
    // 300 rows in one chunk: more than the 256 a rank computes logits for at once.
    let prompt: Vec<u32> = (0..301).map(|i| (i * 53 + 5) % 300).collect();
    let flags = ["--tp", "1", "--max-batch-tokens", "512"];
    let (_dir, want, server) = serve_tiny(19, &prompt, &flags);
    let mut client = server.client().await;
    let r = client
        .generate(request(&prompt, scored(None)))
        .await
        .expect("generate")
        .into_inner();
    assert_matches_reference(&r.prompt_logprobs, &prompt, &want);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prompt_logprobs_match_the_reference_in_chunks_cached_streamed_and_per_choice() {
    let prompt: Vec<u32> = (0..29).map(|i| (i * 37 + 11) % 300).collect();
    // Chunks of 8: rows at chunk ends score the next chunk's first token.
    let flags = [
        "--tp",
        "2",
        "--max-batch-tokens",
        "8",
        "--threads-per-worker",
        "1",
    ];
    let (_dir, want, server) = serve_tiny(17, &prompt, &flags);
    let mut client = server.client().await;

    let unary = client
        .generate(request(&prompt, scored(None)))
        .await
        .expect("generate")
        .into_inner();
    assert_eq!(unary.prompt_token_ids, prompt);
    assert_matches_reference(&unary.prompt_logprobs, &prompt, &want);
    // The first generated token's logprob comes from the prompt's last position.
    let first = unary.logprobs[0].sampled.expect("logprob");
    let err = (first.logprob as f64 - want[prompt.len() - 1][first.token_id as usize]).abs();
    assert!(err < 1e-4, "first token: {first:?}");

    // Streamed: on the first response only. The prompt is now in the prefix cache, and it is
    // computed again anyway (the cache holds no logits).
    let mut stream = client
        .generate_stream(request(&prompt, scored(None)))
        .await
        .expect("stream")
        .into_inner();
    let mut responses: Vec<GenerateResponse> = Vec::new();
    while let Some(r) = stream.message().await.expect("a response") {
        responses.push(r);
    }
    assert_eq!(responses.len(), 3);
    assert_eq!(responses[0].prompt_token_ids, prompt);
    assert_close(&responses[0].prompt_logprobs, &unary.prompt_logprobs);
    assert!(responses[1..]
        .iter()
        .all(|r| r.prompt_logprobs.is_empty() && r.prompt_token_ids.is_empty()));
    assert_eq!(
        responses[2].finish_reason,
        FinishReason::Length as i32,
        "{responses:?}"
    );

    // Every choice carries them.
    let two = client
        .generate(request(&prompt, scored(Some(2))))
        .await
        .expect("n = 2")
        .into_inner();
    assert_eq!(two.choices.len(), 2);
    for c in &two.choices {
        assert_eq!(c.prompt_token_ids, prompt);
        assert_close(&c.prompt_logprobs, &unary.prompt_logprobs);
    }

    // Too many top logprobs: refused by name, and the server serves on.
    let mut bad = scored(None);
    bad.prompt_logprobs = Some(21);
    let e = client.generate(request(&prompt, bad)).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(e.message().contains("prompt_logprobs"), "{}", e.message());
    let plain = GenerationParameters {
        max_new_tokens: Some(2),
        ..Default::default()
    };
    let ok = client
        .generate(request(&prompt, plain))
        .await
        .expect("serves on")
        .into_inner();
    assert!(ok.prompt_logprobs.is_empty() && ok.prompt_token_ids.is_empty());
}
