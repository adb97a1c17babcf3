//! The scheduler end to end on the default model: preemption that changes no request's tokens,
//! prefix caching across requests, priorities, the waiting-queue limit, deadlines and requests
//! that can never fit.

use std::time::{Duration, Instant};

use futures::future::join_all;
use futures::StreamExt;
use helios_proto::v1::generation_client::GenerationClient;
use helios_proto::v1::{ChatMessage, FinishReason, GenerateRequest, GenerationParameters};
use helios_tests::server::{long_request, model_info, prompt_request, stream_all, Process};
use tonic::transport::Channel;
use tonic::Code;

const QUESTIONS: [&str; 10] = [
    "Tell me a short story about a cat who learns to swim.",
    "What is the tallest mountain in Europe?",
    "List three colors and a fruit of each.",
    "Write a haiku about the sea.",
    "Why is the sky blue?",
    "Give me a recipe for pancakes.",
    "Translate 'good morning' into French, German and Spanish.",
    "What are the benefits of regular exercise for the heart?",
    "Describe a lighthouse at night.",
    "How do bees make honey?",
];

/// Request `i`: 40 tokens past EOS, greedy or seeded, some with a penalty (which reads the
/// context, so a recompute must rebuild it right).
fn long_mixed_request(i: usize) -> GenerateRequest {
    let seeded = i % 2 == 1;
    prompt_request(
        QUESTIONS[i % QUESTIONS.len()],
        GenerationParameters {
            max_new_tokens: Some(40),
            ignore_eos: true,
            temperature: if seeded { 0.9 } else { 0.0 },
            seed: seeded.then_some(7 + i as u64),
            presence_penalty: if i % 5 == 3 { 0.6 } else { 0.0 },
            ..Default::default()
        },
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cache_for_three_long_sequences_serves_twenty_with_preemptions_and_the_same_tokens() {
    // Prompts of 9-16 tokens + 40 generated: 4 blocks of 16 each at most, so 12 blocks hold
    // three whole sequences. Admission is optimistic: more start, and the newest are
    // preempted and recomputed when the running ones need blocks.
    let server = Process::serve_default("1", &["--num-kv-blocks", "12"]);
    let mut client = server.client().await;
    let reqs: Vec<GenerateRequest> = (0..20).map(long_mixed_request).collect();
    let mut alone = Vec::new();
    for r in &reqs {
        alone.push(stream_all(&mut client, r.clone()).await.expect("alone"));
    }
    let before = model_info(&mut client).await.preemptions_total;
    let together = join_all(reqs.iter().map(|r| {
        let mut c = client.clone();
        async move { stream_all(&mut c, r.clone()).await }
    }))
    .await;
    for (i, (got, want)) in together.into_iter().zip(&alone).enumerate() {
        let got = got.expect("together");
        assert_eq!(want.token_ids.len(), 40, "request {i} alone");
        assert_eq!(got.token_ids, want.token_ids, "request {i}: tokens");
        assert_eq!(got.text, want.text, "request {i}: text");
        assert_eq!(got.usage, want.usage, "request {i}: usage");
    }
    let info = model_info(&mut client).await;
    let preemptions = info.preemptions_total - before;
    eprintln!("20 requests in 12 blocks: {preemptions} preemptions");
    assert!(preemptions > 0, "nothing was preempted");
    assert_eq!(info.kv_blocks_free, info.kv_blocks_total, "blocks leaked");
    assert_eq!((info.requests_running, info.requests_waiting), (0, 0));
}

/// A system prompt of about 200 tokens.
fn system_prompt() -> String {
    "You are Helios, a careful assistant for a museum of lighthouses. Answer in plain words, \
     briefly, and never invent dates. The museum opens at nine and closes at five, every day \
     but Monday. Tickets cost eight euros for adults and three for children under twelve; \
     entry is free on the first Sunday of each month. The collection holds forty lenses, the \
     oldest from 1823, a working foghorn, and the logbooks of eleven keepers. Guided tours \
     leave from the main hall at ten, noon and three, and last one hour. The café on the \
     second floor serves soup, bread, cakes and tea. Dogs on a lead are welcome in the \
     garden but not inside. Photography without flash is allowed everywhere except the \
     archive room. If a visitor asks about anything else, say politely that you only know \
     about the museum, and suggest they ask at the front desk."
        .into()
}

fn with_system(question: &str) -> GenerateRequest {
    GenerateRequest {
        messages: vec![
            ChatMessage {
                role: "system".into(),
                content: system_prompt(),
            },
            ChatMessage {
                role: "user".into(),
                content: question.into(),
            },
        ],
        parameters: Some(GenerationParameters {
            max_new_tokens: Some(4),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Runs `questions` at once as unary calls; returns each answer's token ids and the mean time
/// to first token the server measured.
async fn wave(client: &GenerationClient<Channel>, questions: &[&str]) -> (Vec<Vec<u32>>, f64) {
    let answers = join_all(questions.iter().map(|q| {
        let mut c = client.clone();
        async move {
            c.generate(with_system(q))
                .await
                .expect("generate")
                .into_inner()
        }
    }))
    .await;
    let ttft: f64 = answers
        .iter()
        .map(|a| {
            a.timings
                .map_or(f64::NAN, |t| t.time_to_first_token_seconds)
        })
        .sum::<f64>()
        / answers.len() as f64;
    (answers.into_iter().map(|a| a.token_ids).collect(), ttft)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_wave_sharing_a_system_prompt_hits_the_cache_and_starts_sooner() {
    let server = Process::serve_default("1", &[]);
    let mut client = server.client().await;
    let mut ids = Vec::new();
    for q in &QUESTIONS[..2] {
        let req = helios_proto::v1::TokenizeRequest {
            messages: with_system(q).messages,
            ..Default::default()
        };
        ids.push(
            client
                .tokenize(req)
                .await
                .expect("tokenize")
                .into_inner()
                .token_ids,
        );
    }
    let shared = ids[0]
        .iter()
        .zip(&ids[1])
        .take_while(|(a, b)| a == b)
        .count();
    assert!(shared >= 170, "the shared prefix is {shared} tokens");
    let (_, first_ttft) = wave(&client, &QUESTIONS[..4]).await;
    let mid = model_info(&mut client).await;
    let (second, second_ttft) = wave(&client, &QUESTIONS[4..8]).await;
    let end = model_info(&mut client).await;
    let hits = end.prefix_cache_hit_tokens - mid.prefix_cache_hit_tokens;
    eprintln!(
        "TTFT: first wave {:.1} ms, second {:.1} ms; second-wave hits {hits} tokens, \
         hit ratio since start {:.2}",
        first_ttft * 1e3,
        second_ttft * 1e3,
        end.prefix_cache_hit_ratio
    );
    // The shared prefix's full blocks of 16, for each of the 4 requests.
    let want = 4 * (shared / 16 * 16) as u64;
    assert!(hits >= want, "second wave hit {hits} tokens, not {want}");
    assert!(end.prefix_cache_hit_ratio > 0.0);
    assert!(
        second_ttft < first_ttft,
        "second wave TTFT {second_ttft} s is not below the first's {first_ttft} s"
    );
    // The cached KV gives the answers a recompute gives: compare with a server that has
    // neither the prefix cache nor overlap.
    let plain = Process::serve_default("1", &["--no-prefix-caching", "--no-overlap"]);
    let (want, _) = wave(&plain.client().await, &QUESTIONS[4..8]).await;
    assert_eq!(second, want, "cached prefixes changed the answers");
    let info = model_info(&mut plain.client().await).await;
    assert_eq!(info.prefix_cache_hit_tokens, 0);
    assert!(info.steps_total > 0 && info.step_compute_seconds_total > 0.0);
}

/// Opens a stream and waits for its first response.
async fn started(
    client: &GenerationClient<Channel>,
    req: tonic::Request<GenerateRequest>,
) -> tonic::Streaming<helios_proto::v1::GenerateResponse> {
    let mut stream = client
        .clone()
        .generate_stream(req)
        .await
        .expect("stream")
        .into_inner();
    let first = stream.next().await.expect("a response").expect("ok");
    assert!(!first.token_ids.is_empty());
    stream
}

/// Waits until ModelInfo says `running` and `waiting`.
async fn until_queued(client: &mut GenerationClient<Channel>, running: u32, waiting: u32) {
    let limit = Instant::now() + Duration::from_secs(10);
    loop {
        let info = model_info(client).await;
        if (info.requests_running, info.requests_waiting) == (running, waiting) {
            return;
        }
        assert!(
            Instant::now() < limit,
            "never {running} running and {waiting} waiting: {info:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn with_timeout(req: GenerateRequest, timeout: Duration) -> tonic::Request<GenerateRequest> {
    let mut r = tonic::Request::new(req);
    r.set_timeout(timeout);
    r
}

fn short(prompt: &str, priority: i32) -> GenerateRequest {
    GenerateRequest {
        priority,
        ..prompt_request(
            prompt,
            GenerationParameters {
                max_new_tokens: Some(2),
                ignore_eos: true,
                ..Default::default()
            },
        )
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_deadlines_priorities_and_impossible_requests() {
    // One running request at a time, two waiting at most, 1,024 positions of KV.
    let server = Process::serve_default(
        "1",
        &[
            "--max-running",
            "1",
            "--max-waiting",
            "2",
            "--num-kv-blocks",
            "64",
        ],
    );
    let mut client = server.client().await;

    // Larger than the whole cache: refused at once, not queued.
    let t = Instant::now();
    let err = client
        .generate(long_request(1100))
        .await
        .expect_err("cannot fit");
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("KV"), "{}", err.message());
    assert!(t.elapsed() < Duration::from_secs(5));

    // One runs, two wait, the next is refused.
    let running = started(&client, tonic::Request::new(long_request(900))).await;
    let low = tokio::spawn({
        let mut c = client.clone();
        async move {
            (
                stream_all(&mut c, short("Say one.", 0)).await,
                Instant::now(),
            )
        }
    });
    until_queued(&mut client, 1, 1).await;
    let high = tokio::spawn({
        let mut c = client.clone();
        async move {
            (
                stream_all(&mut c, short("Say two.", -5)).await,
                Instant::now(),
            )
        }
    });
    until_queued(&mut client, 1, 2).await;
    let err = stream_all(&mut client, short("Say three.", 0))
        .await
        .expect_err("the queue is full");
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    // The running one leaves; the higher priority goes first though it came second.
    drop(running);
    let (low, high) = (low.await.expect("low"), high.await.expect("high"));
    assert_eq!(
        low.0.expect("low").finish_reason,
        Some(FinishReason::Length)
    );
    assert_eq!(
        high.0.expect("high").finish_reason,
        Some(FinishReason::Length)
    );
    assert!(high.1 < low.1, "priority -5 finished after priority 0");

    // A deadline that passes while waiting, one while running, and a unary one: each is
    // answered DEADLINE_EXCEEDED by the server, which frees what it held.
    let mut running = started(
        &client,
        with_timeout(long_request(900), Duration::from_millis(1500)),
    )
    .await;
    let waiting = client
        .clone()
        .generate_stream(with_timeout(
            short("Say four.", 0),
            Duration::from_millis(300),
        ))
        .await;
    let err = match waiting {
        Ok(s) => s
            .into_inner()
            .next()
            .await
            .expect("an answer")
            .expect_err("deadline"),
        Err(e) => e,
    };
    assert_eq!(err.code(), Code::DeadlineExceeded, "waiting: {err:?}");
    assert!(
        err.message().contains("deadline passed"),
        "{}",
        err.message()
    );
    let mut tokens = 1;
    let err = loop {
        match running.next().await.expect("the stream ends with an error") {
            Ok(r) => tokens += r.token_ids.len(),
            Err(e) => break e,
        }
    };
    assert_eq!(err.code(), Code::DeadlineExceeded, "running: {err:?}");
    assert!(
        tokens > 1 && tokens < 900,
        "{tokens} tokens before the deadline"
    );
    let err = client
        .generate(with_timeout(long_request(900), Duration::from_millis(500)))
        .await
        .expect_err("deadline");
    // A unary call races three timers: the server's answer (just before the deadline), tonic's
    // server timer and tonic's client timer (both CANCELLED "Timeout expired"; a stock gRPC
    // client reports DEADLINE_EXCEEDED itself). Whichever fires, the server frees the blocks.
    let ours = err.code() == Code::DeadlineExceeded;
    let tonics = err.code() == Code::Cancelled && err.message().contains("Timeout expired");
    assert!(ours || tonics, "unary: {err:?}");
    until_queued(&mut client, 0, 0).await;
    let info = model_info(&mut client).await;
    assert_eq!(info.kv_blocks_free, info.kv_blocks_total, "blocks leaked");
}
