//! The gRPC generation API of `helios serve`, end to end on the default model: batching that
//! changes nothing, cancellation, finish reasons, usage, the health and reflection services.

use std::time::Duration;

use futures::future::join_all;
use futures::StreamExt;
use helios_proto::v1::{
    DetokenizeRequest, FinishReason, GenerateRequest, GenerationParameters, TokenizeRequest,
};
use helios_tests::server::{
    chat_request, long_request, model_info, prompt_request, stream_all, stream_started, tokenize,
    wait_until_idle, Process,
};

const PROMPTS: [&str; 8] = [
    "Tell me a short story about a cat who learns to swim.",
    "What is 2+2?",
    "List three colors.",
    "Write a haiku about the sea.",
    "Explain in detail, step by step, why the sky is blue during the day and red at sunset, \
     as you would to a curious ten-year-old who keeps asking why.",
    "Hi",
    "Translate 'good morning' into French, German and Spanish.",
    "What are the benefits of regular exercise for the heart?",
];

/// Request `i` of the mix: greedy and seeded sampling, penalties, logprobs, chat and plain.
fn mixed_request(i: usize) -> GenerateRequest {
    let sampled = i % 2 == 1;
    let params = GenerationParameters {
        max_new_tokens: Some(4 + (i as u32 * 5) % 21),
        temperature: if sampled { 0.8 } else { 0.0 },
        seed: sampled.then_some(1000 + i as u64),
        top_k: if i % 4 == 1 { 40 } else { 0 },
        top_p: (i % 4 == 3).then_some(0.9),
        min_p: if i % 8 == 5 { 0.05 } else { 0.0 },
        repetition_penalty: (i % 8 == 2).then_some(1.3),
        presence_penalty: if i % 8 == 6 { 0.5 } else { 0.0 },
        frequency_penalty: if i % 8 == 7 { 0.4 } else { 0.0 },
        logprobs: i.is_multiple_of(3).then_some(2),
        ignore_eos: i.is_multiple_of(5),
        ..Default::default()
    };
    let prompt = PROMPTS[i % PROMPTS.len()];
    if i % 3 == 1 {
        chat_request(prompt, params)
    } else {
        prompt_request(prompt, params)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thirty_two_concurrent_streams_each_get_what_they_get_alone() {
    // A small step budget, so that prompts are read in chunks beside other sequences' decodes.
    let server = Process::serve_default("1", &["--max-batch-tokens", "48"]);
    let mut client = server.client().await;
    let reqs: Vec<GenerateRequest> = (0..32).map(mixed_request).collect();
    let mut alone = Vec::new();
    for r in &reqs {
        alone.push(stream_all(&mut client, r.clone()).await.expect("alone"));
    }
    // While they run, watch how many run at once: the point is that they share steps.
    let mut watcher = client.clone();
    let peak = tokio::spawn(async move {
        let mut peak = 0;
        loop {
            peak = peak.max(model_info(&mut watcher).await.requests_running);
            if peak >= 16 {
                return peak;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    });
    let together = join_all(reqs.iter().map(|r| {
        let mut c = client.clone();
        async move { stream_all(&mut c, r.clone()).await }
    }))
    .await;
    let peak = tokio::time::timeout(Duration::from_secs(1), peak).await;
    assert!(
        matches!(peak, Ok(Ok(p)) if p >= 16),
        "the requests never ran together: {peak:?}"
    );
    for (i, (got, want)) in together.into_iter().zip(&alone).enumerate() {
        let got = got.expect("together");
        assert!(!want.token_ids.is_empty(), "request {i} generated nothing");
        assert_eq!(got.token_ids, want.token_ids, "request {i}: tokens");
        assert_eq!(got.text, want.text, "request {i}: text");
        assert_eq!(got.finish_reason, want.finish_reason, "request {i}");
        assert_eq!(got.usage, want.usage, "request {i}: usage");
        assert_eq!(got.logprobs.len(), want.logprobs.len(), "request {i}");
        for (a, b) in got.logprobs.iter().zip(&want.logprobs) {
            assert!((a - b).abs() < 1e-4, "request {i}: logprob {a} vs {b}");
        }
    }
    // Penalties change what a request generates (so the mix really exercised them).
    let mut plain = mixed_request(2);
    if let Some(p) = plain.parameters.as_mut() {
        p.repetition_penalty = None;
    }
    let plain = stream_all(&mut client, plain).await.expect("plain");
    assert_ne!(
        plain.token_ids, alone[2].token_ids,
        "repetition penalty had no effect"
    );
    let info = model_info(&mut client).await;
    assert_eq!(info.kv_blocks_free, info.kv_blocks_total, "blocks leaked");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_stream_frees_its_blocks_and_spares_the_others() {
    let server = Process::serve_default("1", &["--num-kv-blocks", "128"]);
    let mut client = server.client().await;
    let total = model_info(&mut client).await.kv_blocks_total;
    assert_eq!(total, 128);
    let short = prompt_request(
        "Name a fruit.",
        GenerationParameters {
            max_new_tokens: Some(24),
            ignore_eos: true,
            ..Default::default()
        },
    );
    let short_alone = stream_all(&mut client, short.clone()).await.expect("alone");

    // A long request: if it were not freed on cancel, it would hold its blocks for seconds.
    let (mut stream, _) = stream_started(&mut client, long_request(1500), 3).await;
    assert!(model_info(&mut client).await.kv_blocks_free < total);
    let mut c = client.clone();
    let other = tokio::spawn(async move { stream_all(&mut c, short).await });
    for _ in 0..2 {
        stream.next().await.expect("a token").expect("ok");
    }
    drop(stream);
    let other = other.await.expect("task").expect("the other stream");
    assert_eq!(other, short_alone, "the other stream was affected");
    wait_until_idle(&mut client, total, Duration::from_secs(3))
        .await
        .expect("the cancelled request's blocks were not freed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finish_reasons_usage_logprobs_and_stop_strings() {
    let server = Process::serve_default("1", &[]);
    let mut client = server.client().await;
    let question = "What is the capital of France? Answer in one sentence.";
    let greedy = |max: u32| GenerationParameters {
        max_new_tokens: Some(max),
        logprobs: Some(5),
        ..Default::default()
    };
    let prompt_tokens = client
        .tokenize(TokenizeRequest {
            messages: chat_request(question, greedy(1)).messages,
            ..Default::default()
        })
        .await
        .expect("tokenize")
        .into_inner()
        .token_ids
        .len() as u32;

    // EOS, with exact usage, and the unary call agrees with the stream.
    let full = stream_all(&mut client, chat_request(question, greedy(64)))
        .await
        .expect("stream");
    assert_eq!(full.finish_reason, Some(FinishReason::Eos));
    assert_eq!(full.text, "The capital of France is Paris.");
    let usage = full.usage.expect("usage on the last response");
    assert_eq!(usage.prompt_tokens, prompt_tokens);
    assert_eq!(usage.completion_tokens as usize, full.token_ids.len());
    assert_eq!(
        usage.total_tokens,
        usage.prompt_tokens + usage.completion_tokens
    );
    assert_eq!(
        full.responses,
        full.token_ids.len(),
        "one response per token"
    );
    let unary = client
        .generate(chat_request(question, greedy(64)))
        .await
        .expect("unary")
        .into_inner();
    assert_eq!(unary.text, full.text);
    assert_eq!(unary.token_ids, full.token_ids);
    assert_eq!(unary.finish_reason, FinishReason::Eos as i32);
    assert!(unary
        .timings
        .is_some_and(|t| t.total_seconds >= t.time_to_first_token_seconds
            && t.time_to_first_token_seconds >= t.queue_seconds
            && t.queue_seconds >= 0.0));
    // Greedy: the sampled token is the most likely one; top lists are sorted, 5 long.
    for l in &unary.logprobs {
        let sampled = l.sampled.as_ref().expect("sampled logprob");
        assert_eq!(l.top.len(), 5);
        assert_eq!(l.top[0].token_id, sampled.token_id);
        assert!(l.top.windows(2).all(|w| w[0].logprob >= w[1].logprob));
        assert!(sampled.logprob <= 0.0);
    }

    // max_new_tokens.
    let short = stream_all(&mut client, chat_request(question, greedy(3)))
        .await
        .expect("short");
    assert_eq!(short.finish_reason, Some(FinishReason::Length));
    assert_eq!(short.token_ids, full.token_ids[..3]);
    assert_eq!(short.usage.map(|u| u.completion_tokens), Some(3));

    // "s Par" starts inside the token " is" and ends inside " Paris": cut, never sent.
    let mut p = greedy(64);
    p.stop = vec!["s Par".into()];
    let stopped = stream_all(&mut client, chat_request(question, p))
        .await
        .expect("stop");
    assert_eq!(stopped.text, "The capital of France i");
    assert_eq!(stopped.finish_reason, Some(FinishReason::Stop));
    assert!(stopped.token_ids.len() < full.token_ids.len());
    assert_eq!(
        stopped.usage.map(|u| u.completion_tokens as usize),
        Some(stopped.token_ids.len())
    );

    // A stop token id ends generation after that token, like EOS.
    let mut p = greedy(64);
    p.stop_token_ids = vec![full.token_ids[2]];
    let by_id = stream_all(&mut client, chat_request(question, p))
        .await
        .expect("stop id");
    assert_eq!(by_id.finish_reason, Some(FinishReason::Eos));
    assert_eq!(by_id.token_ids, full.token_ids[..3]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_invalid_argument_and_the_server_serves_on() {
    let server = Process::serve_default("1", &[]);
    let mut client = server.client().await;
    let info = model_info(&mut client).await;
    let p = GenerationParameters::default;
    let hello = |params: GenerationParameters| prompt_request("Hello", params);
    let cases: Vec<(GenerateRequest, &str)> = vec![
        (GenerateRequest::default(), "empty input"),
        (
            GenerateRequest {
                token_ids: vec![1; info.max_model_len as usize],
                ..Default::default()
            },
            "the prompt is 8192 tokens",
        ),
        (
            hello(GenerationParameters {
                max_new_tokens: Some(0),
                ..p()
            }),
            "max_new_tokens must be at least 1",
        ),
        (
            hello(GenerationParameters {
                max_new_tokens: Some(100_000),
                ..p()
            }),
            "max_new_tokens is 100000",
        ),
        (
            hello(GenerationParameters {
                temperature: -1.0,
                ..p()
            }),
            "temperature",
        ),
        (
            hello(GenerationParameters {
                top_p: Some(0.0),
                ..p()
            }),
            "top_p",
        ),
        (
            hello(GenerationParameters {
                top_p: Some(1.01),
                ..p()
            }),
            "top_p",
        ),
        (hello(GenerationParameters { top_k: -5, ..p() }), "top_k"),
        (
            GenerateRequest {
                token_ids: vec![1, 2, info.vocab_size],
                ..Default::default()
            },
            "49152 is outside the vocabulary",
        ),
        (
            hello(GenerationParameters {
                logprobs: Some(21),
                ..p()
            }),
            "at most 20",
        ),
        (
            hello(GenerationParameters {
                stop: (0..1000).map(|i| format!("stop{i}")).collect(),
                ..p()
            }),
            "1000 stop strings",
        ),
    ];
    for (req, words) in cases {
        let e = client.generate_stream(req.clone()).await.expect_err(words);
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{words}: {e:?}");
        assert!(
            e.message().contains(words),
            "{:?} should say {words:?}",
            e.message()
        );
        let e = client.generate(req).await.expect_err(words);
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{words}: {e:?}");
    }
    // Over the transport's 4 MiB message limit: refused before it reaches the coordinator.
    let huge = prompt_request(&"a".repeat(5 << 20), p());
    let e = client.generate(huge).await.expect_err("5 MiB message");
    assert!(
        matches!(
            e.code(),
            tonic::Code::OutOfRange | tonic::Code::ResourceExhausted
        ),
        "{e:?}"
    );
    // Still serving, and nothing is held.
    let ok = stream_all(
        &mut client,
        hello(GenerationParameters {
            max_new_tokens: Some(4),
            ..p()
        }),
    )
    .await
    .expect("a good request after the bad ones");
    assert_eq!(ok.token_ids.len(), 4);
    let after = model_info(&mut client).await;
    assert_eq!(after.kv_blocks_free, after.kv_blocks_total);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_reflection_tokenize_and_model_info() {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::HealthCheckRequest;

    let server = Process::serve_default("1", &[]);
    let channel = server.channel().await;
    let mut health = HealthClient::new(channel.clone());
    for service in ["", "helios.v1.Generation"] {
        let status = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .expect("health")
            .into_inner()
            .status;
        assert_eq!(status, ServingStatus::Serving as i32, "{service:?}");
    }

    // The same questions to both reflection versions (grpcurl and grpcio use either).
    macro_rules! ask_reflection {
        ($v:ident) => {{
            use tonic_reflection::pb::$v::server_reflection_client::ServerReflectionClient;
            use tonic_reflection::pb::$v::server_reflection_request::MessageRequest;
            use tonic_reflection::pb::$v::server_reflection_response::MessageResponse;
            use tonic_reflection::pb::$v::ServerReflectionRequest;
            let ask = |m: MessageRequest| ServerReflectionRequest {
                host: String::new(),
                message_request: Some(m),
            };
            let reqs = [
                ask(MessageRequest::ListServices(String::new())),
                ask(MessageRequest::FileContainingSymbol(
                    "helios.v1.Generation".into(),
                )),
            ];
            let mut c = ServerReflectionClient::new(channel.clone());
            let answers: Vec<_> = c
                .server_reflection_info(tokio_stream::iter(reqs))
                .await
                .expect(stringify!($v))
                .into_inner()
                .map(|a| a.expect("ok").message_response)
                .collect()
                .await;
            match &answers[..] {
                [Some(MessageResponse::ListServicesResponse(l)), Some(MessageResponse::FileDescriptorResponse(f))] => (
                    l.service.iter().map(|s| s.name.clone()).collect::<Vec<_>>(),
                    f.file_descriptor_proto.len(),
                ),
                other => panic!("unexpected reflection answers {other:?}"),
            }
        }};
    }
    for (services, descriptors) in [ask_reflection!(v1), ask_reflection!(v1alpha)] {
        for name in ["helios.v1.Generation", "grpc.health.v1.Health"] {
            assert!(
                services.iter().any(|s| s == name),
                "{name} not in {services:?}"
            );
        }
        assert!(descriptors >= 1, "no descriptor for helios.v1.Generation");
    }

    let mut client = server.client().await;
    let ids = tokenize(&mut client, "Hello world, héllo wörld")
        .await
        .expect("tokenize");
    assert!(ids.len() >= 4);
    let text = client
        .detokenize(DetokenizeRequest { token_ids: ids })
        .await
        .expect("detokenize")
        .into_inner()
        .text;
    assert_eq!(text, "Hello world, héllo wörld");
    let e = client
        .detokenize(DetokenizeRequest {
            token_ids: vec![u32::MAX],
        })
        .await
        .expect_err("out of vocabulary");
    assert_eq!(e.code(), tonic::Code::InvalidArgument);

    let info = model_info(&mut client).await;
    assert_eq!(info.architecture, "llama");
    assert_eq!(info.tensor_parallel_size, 1);
    assert_eq!(info.max_model_len, 8192);
    assert_eq!(info.vocab_size, 49152);
    assert_eq!(info.kv_block_size, 16);
    assert!(info.kv_blocks_total > 0);
    assert_eq!(info.kv_blocks_free, info.kv_blocks_total);
    assert!(info.ready);
    assert!(info.model.ends_with("SmolLM2-135M-Instruct.Q4_1.gguf"));
}

#[test]
fn a_stock_grpcio_client_finds_and_calls_the_api_by_reflection() {
    let server = Process::serve_default("1", &[]);
    let v = helios_tests::reference_json(
        "reflection_client.py",
        &[server.addr.as_str(), "The capital of France is", "8"],
    );
    let services = v["services"].as_array().expect("services");
    assert!(services.iter().any(|s| s == "helios.v1.Generation"), "{v}");
    assert_eq!(v["token_ids"].as_array().map(Vec::len), Some(8), "{v}");
    assert_eq!(v["finish_reason"], "FINISH_REASON_LENGTH");
    assert!(!v["text"].as_str().unwrap_or("").is_empty(), "{v}");
    assert_eq!(v["text"], v["stream_text"]);
}
