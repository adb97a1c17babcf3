//! Several choices of one request (`n`, `best_of`) and `logit_bias`, end to end over gRPC on
//! the default model: each seeded choice is the same request with n = 1 and seed + i, streamed
//! choices interleave and equal the unary ones, the prompt is computed once (the other choices
//! take its blocks from the prefix cache), best_of returns the best by cumulative logprob, a
//! bias of +100 makes greedy say a token and -100 bans one, and bad input is INVALID_ARGUMENT
//! while the server serves on.

use std::collections::BTreeMap;

use futures::StreamExt;
use helios_proto::v1::generation_client::GenerationClient;
use helios_proto::v1::{FinishReason, GenerateRequest, GenerateResponse, GenerationParameters};
use helios_tests::recovery::{metric, metrics_text};
use helios_tests::server::{
    model_info, prompt_request, stream_all, tokenize, wait_until_idle, Process,
};
use tonic::transport::Channel;

/// Long enough for a few full 16-token blocks to share.
const PROMPT: &str = "Write a short story about a lighthouse keeper who finds a message in a \
                      bottle on a stormy night. The keeper has lived alone on the rock for \
                      twenty years, and the message is written in his own hand, dated tomorrow. \
                      Tell what he does next, and what the sea has to do with it.";

fn sampled(n: Option<u32>, seed: u64) -> GenerationParameters {
    GenerationParameters {
        max_new_tokens: Some(12),
        temperature: 0.9,
        seed: Some(seed),
        ignore_eos: true,
        logprobs: Some(0),
        n,
        ..Default::default()
    }
}

/// Each choice's responses, by index, in the order they came, and the order of indices.
#[derive(Debug, Default)]
struct Choices {
    by_index: BTreeMap<u32, Vec<GenerateResponse>>,
    order: Vec<u32>,
}

impl Choices {
    fn tokens(&self, i: u32) -> Vec<u32> {
        self.by_index[&i]
            .iter()
            .flat_map(|r| r.token_ids.clone())
            .collect()
    }

    fn text(&self, i: u32) -> String {
        self.by_index[&i].iter().map(|r| r.text.as_str()).collect()
    }
}

async fn stream_choices(
    client: &mut GenerationClient<Channel>,
    req: GenerateRequest,
) -> Result<Choices, tonic::Status> {
    let mut stream = client.generate_stream(req).await?.into_inner();
    let mut out = Choices::default();
    while let Some(resp) = stream.next().await {
        let resp = resp?;
        out.order.push(resp.index);
        out.by_index.entry(resp.index).or_default().push(resp);
    }
    Ok(out)
}

/// The summed sampled-token logprobs of a response.
fn cumulative(r: &GenerateResponse) -> f64 {
    r.logprobs
        .iter()
        .filter_map(|l| l.sampled.as_ref())
        .map(|t| t.logprob as f64)
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_choices_share_the_prompt_and_equal_single_seeded_requests() {
    let server = Process::serve_default("1", &[]);
    let mut client = server.client().await;
    let prompt_len = tokenize(&mut client, PROMPT).await.expect("tokenize").len();
    let full_blocks = (prompt_len - 1) / 16;
    assert!(
        full_blocks >= 2,
        "the prompt ({prompt_len} tokens) spans blocks"
    );

    // n = 4 streamed, first on a fresh prompt: the other three take the prompt's blocks.
    let before = model_info(&mut client).await.prefix_cache_hit_tokens;
    let four = stream_choices(&mut client, prompt_request(PROMPT, sampled(Some(4), 7)))
        .await
        .expect("n = 4");
    let hits = model_info(&mut client).await.prefix_cache_hit_tokens - before;
    let shared = (4 - 1) * full_blocks as u64 * 16;
    assert!(
        hits >= shared && hits <= shared + full_blocks as u64 * 16,
        "{hits} prefix-cache hit tokens; the 3 further choices share {shared}"
    );
    assert_eq!(
        four.by_index.keys().copied().collect::<Vec<_>>(),
        [0, 1, 2, 3]
    );
    // Interleaved as they come, not one choice after another.
    let switches = four.order.windows(2).filter(|w| w[0] != w[1]).count();
    assert!(switches > 3, "choices interleave: {:?}", four.order);
    // Each choice is the same request with n = 1 and seed 7 + i.
    for i in 0..4u32 {
        let one = stream_all(
            &mut client,
            prompt_request(PROMPT, sampled(None, 7 + i as u64)),
        )
        .await
        .expect("n = 1");
        assert_eq!(four.tokens(i), one.token_ids, "choice {i}");
        assert_eq!(four.text(i), one.text, "choice {i}");
    }
    let distinct: std::collections::BTreeSet<Vec<u32>> = (0..4).map(|i| four.tokens(i)).collect();
    assert!(distinct.len() > 1, "different seeds, different draws");
    // Usage once, on the very last response: the prompt once, every choice's tokens.
    let last = four.order.last().copied().expect("responses");
    let usage = four.by_index[&last].last().and_then(|r| r.usage);
    assert_eq!(
        usage.map(|u| (u.prompt_tokens, u.completion_tokens)),
        Some((prompt_len as u32, 4 * 12))
    );
    let with_usage = four
        .by_index
        .values()
        .flatten()
        .filter(|r| r.usage.is_some());
    assert_eq!(with_usage.count(), 1);

    // Unary: the same choices, in index order.
    let whole = client
        .generate(prompt_request(PROMPT, sampled(Some(4), 7)))
        .await
        .expect("unary n = 4")
        .into_inner();
    assert_eq!(whole.choices.len(), 4);
    for (i, c) in whole.choices.iter().enumerate() {
        assert_eq!(c.index, i as u32);
        assert_eq!(c.token_ids, four.tokens(i as u32), "unary choice {i}");
        assert_eq!(c.finish_reason, FinishReason::Length as i32);
    }
    assert_eq!(whole.usage.map(|u| u.completion_tokens), Some(48));

    // best_of = 4, n = 2: the two of those four with the highest cumulative logprob.
    let mut ranked: Vec<&GenerateResponse> = whole.choices.iter().collect();
    ranked.sort_by(|a, b| cumulative(b).total_cmp(&cumulative(a)));
    let best = client
        .generate(prompt_request(
            PROMPT,
            GenerationParameters {
                best_of: Some(4),
                logprobs: None,
                ..sampled(Some(2), 7)
            },
        ))
        .await
        .expect("best_of")
        .into_inner();
    let got: Vec<&Vec<u32>> = best.choices.iter().map(|c| &c.token_ids).collect();
    let want: Vec<&Vec<u32>> = ranked[..2].iter().map(|c| &c.token_ids).collect();
    assert_eq!(got, want, "the best two, best first");
    assert!(
        best.choices.iter().all(|c| c.logprobs.is_empty()),
        "not asked for"
    );
    assert_eq!(best.usage.map(|u| u.completion_tokens), Some(48));

    let total = model_info(&mut client).await.kv_blocks_total;
    assert!(
        wait_until_idle(&mut client, total, std::time::Duration::from_secs(10))
            .await
            .is_some(),
        "every choice gave its blocks back"
    );

    // A client that leaves cancels every choice: each ends "aborted", not by its length.
    let aborted = || {
        let text = metrics_text(&server.http_url());
        metric(
            &text,
            "helios_requests_finished_total{finish_reason=\"aborted\"}",
        )
        .unwrap_or(0.0)
    };
    let aborted_before = aborted();
    let long = GenerationParameters {
        max_new_tokens: Some(1000),
        ..sampled(Some(4), 3)
    };
    let mut stream = client
        .generate_stream(prompt_request(PROMPT, long))
        .await
        .expect("n = 4, long")
        .into_inner();
    let mut seen = std::collections::BTreeSet::new();
    while seen.len() < 4 {
        let r = stream.message().await.expect("a response").expect("more");
        seen.insert(r.index);
    }
    // The replica's published numbers follow its steps: wait (bounded) to see all four run.
    let mut running = 0;
    for _ in 0..50 {
        running = model_info(&mut client).await.requests_running;
        if running == 4 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(running, 4, "every choice runs");
    drop(stream);
    assert!(
        wait_until_idle(&mut client, total, std::time::Duration::from_secs(10))
            .await
            .is_some(),
        "every choice was cancelled and gave its blocks back"
    );
    assert_eq!(aborted() - aborted_before, 4.0, "every choice was aborted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logit_bias_steers_greedy_and_bad_choices_are_refused() {
    let server = Process::serve_default("1", &[]);
    let mut client = server.client().await;
    let greedy = |bias: &[(u32, f32)]| GenerationParameters {
        max_new_tokens: Some(8),
        ignore_eos: true,
        logit_bias: bias.iter().copied().collect(),
        ..Default::default()
    };
    let prompt = "The capital of France is";
    let plain = stream_all(&mut client, prompt_request(prompt, greedy(&[])))
        .await
        .expect("greedy");
    // +100 on a token greedy never says: it says nothing else.
    let forced = (1000..)
        .find(|t| !plain.token_ids.contains(t))
        .unwrap_or(1000);
    let pushed = stream_all(
        &mut client,
        prompt_request(prompt, greedy(&[(forced, 100.0)])),
    )
    .await
    .expect("+100");
    assert_eq!(pushed.token_ids, vec![forced; 8]);
    // -100 on greedy's first token: it never comes.
    let banned = plain.token_ids[0];
    let steered = stream_all(
        &mut client,
        prompt_request(prompt, greedy(&[(banned, -100.0)])),
    )
    .await
    .expect("-100");
    assert!(
        !steered.token_ids.contains(&banned),
        "{:?}",
        steered.token_ids
    );
    // Reported logprobs stay those of the unbiased model: the forced token's first logprob
    // is far below 0.
    let with_lp = GenerationParameters {
        logprobs: Some(0),
        ..greedy(&[(forced, 100.0)])
    };
    let r = stream_all(&mut client, prompt_request(prompt, with_lp))
        .await
        .expect("logprobs");
    assert!(r.logprobs[0] < -1.0, "{:?}", r.logprobs);

    let vocab = model_info(&mut client).await.vocab_size;
    let p = GenerationParameters::default;
    for (params, field) in [
        (GenerationParameters { n: Some(0), ..p() }, "n is 0"),
        (
            GenerationParameters {
                n: Some(129),
                ..p()
            },
            "n is 129",
        ),
        (
            GenerationParameters {
                n: Some(3),
                best_of: Some(2),
                ..p()
            },
            "best_of (2) must be at least n (3)",
        ),
        (
            GenerationParameters {
                n: Some(128),
                max_new_tokens: Some(1000),
                ..p()
            },
            "n × max_new_tokens",
        ),
        (greedy(&[(5, 101.0)]), "logit_bias[5] is 101"),
        (greedy(&[(vocab, 1.0)]), "outside the vocabulary"),
    ] {
        let e = client
            .generate(prompt_request(prompt, params))
            .await
            .expect_err(field);
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
        assert!(
            e.message().contains(field),
            "{:?} lacks {field:?}",
            e.message()
        );
    }
    let streamed_best = GenerationParameters {
        best_of: Some(2),
        ..p()
    };
    let e = client
        .generate_stream(prompt_request(prompt, streamed_best))
        .await
        .expect_err("best_of streamed");
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(
        e.message().contains("cannot be streamed"),
        "{}",
        e.message()
    );
    // Still serving.
    let again = stream_all(&mut client, prompt_request(prompt, greedy(&[])))
        .await
        .expect("after");
    assert_eq!(again.token_ids, plain.token_ids);
}
