//! The OpenAI-compatible HTTP API of `helios serve`, end to end on the default model, with the
//! official `openai` Python package (and raw `httpx`) as the client
//! (`tests/reference/openai_client.py`, which records; the checks are here): the answers equal
//! what gRPC gives for the same request, streamed text equals unary text, usage is exact, bad
//! inputs get OpenAI-shaped errors with the right status, a client that leaves cancels its
//! request, and SIGTERM drains HTTP with gRPC.

use std::time::Duration;

use helios_proto::v1::{GenerationParameters, TokenizeRequest};
use helios_tests::server::{
    chat_request, model_info, prompt_request, stream_all, wait_until_idle, Process,
};
use serde_json::{json, Value};

/// The id `/v1/models` lists for the default model.
const MODEL: &str = "SmolLM2-135M-Instruct.Q4_1";
const PROMPT: &str = "The capital of France is";
const QUESTION: &str = "What is the capital of France? Answer in one sentence.";

/// Runs `openai_client.py MODE` against `server` and parses what it recorded.
fn client(mode: &str, server: &Process, config: Value) -> Value {
    let config = config.to_string();
    helios_tests::reference_json(
        "openai_client.py",
        &[mode, &server.http_url(), MODEL, &config],
    )
}

fn texts(v: &Value) -> Vec<&str> {
    v.as_array()
        .expect("an array")
        .iter()
        .map(|t| t.as_str().expect("a string"))
        .collect()
}

/// `{"error": {"message": str, "type": str, "param", "code"}}`, exactly those keys.
fn assert_openai_error(name: &str, body: &Value) {
    let e = body
        .get("error")
        .and_then(Value::as_object)
        .unwrap_or_else(|| panic!("{name}: no error object in {body}"));
    let mut keys: Vec<&str> = e.keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(keys, ["code", "message", "param", "type"], "{name}: {body}");
    assert!(
        e["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{name}: {body}"
    );
    assert!(e["type"].is_string(), "{name}: {body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openai_client_gets_what_grpc_gets() {
    let server = Process::serve_default("1", &[]);
    let mut grpc = server.client().await;
    let tokenize = |prompt: &str, chat: bool| {
        let mut req = TokenizeRequest::default();
        if chat {
            req.messages = chat_request(prompt, Default::default()).messages;
        } else {
            req.prompt = prompt.into();
        }
        req
    };
    let prompt_ids = grpc
        .tokenize(tokenize(PROMPT, false))
        .await
        .expect("tokenize")
        .into_inner()
        .token_ids;
    let chat_prompt_tokens = grpc
        .tokenize(tokenize(QUESTION, true))
        .await
        .expect("tokenize")
        .into_inner()
        .token_ids
        .len();
    let greedy = |max: u32| GenerationParameters {
        max_new_tokens: Some(max),
        ..Default::default()
    };
    let grpc_completion = stream_all(&mut grpc, prompt_request(PROMPT, greedy(16)))
        .await
        .expect("gRPC completion");
    let grpc_chat = stream_all(&mut grpc, chat_request(QUESTION, greedy(64)))
        .await
        .expect("gRPC chat");
    assert_eq!(grpc_chat.text, "The capital of France is Paris.");

    // The prompt and the first 4 greedy tokens, scored in one echo request.
    let scored_ids: Vec<u32> = prompt_ids
        .iter()
        .chain(&grpc_completion.token_ids[..4])
        .copied()
        .collect();
    let config = json!({"prompt": PROMPT, "question": QUESTION, "prompt_ids": prompt_ids,
        "scored_ids": scored_ids});
    let r = client("api", &server, config);

    assert_eq!(r["models"], json!([MODEL]));
    assert_eq!(r["model_retrieved"], MODEL);
    assert_eq!(r["health"], json!([200, {"status": "serving"}]));

    // Completions: the gRPC answer, unary and streamed, with exact usage.
    let c = &r["completion"];
    assert!(
        c["id"].as_str().is_some_and(|id| id.starts_with("cmpl-")),
        "{c}"
    );
    assert_eq!(c["object"], "text_completion");
    assert_eq!(c["model"], MODEL);
    assert_eq!(c["text"], grpc_completion.text.as_str());
    assert_eq!(c["finish_reason"], "length");
    let usage = json!({"prompt_tokens": prompt_ids.len(), "completion_tokens": 16,
        "total_tokens": prompt_ids.len() + 16});
    assert_eq!(c["usage"], usage);
    let s = &r["completion_stream"];
    assert_eq!(s["text"], c["text"], "streamed != unary (greedy)");
    assert_eq!(s["finish_reasons"], json!(["length"]));
    assert_eq!(s["usage"], usage);
    assert_eq!(s["usage_chunk_choices"], 0);
    assert_eq!(s["tokens"], 16, "one logprob entry per streamed token");
    assert_eq!(r["completion_from_ids"], c["text"]);
    let completion = c["text"].as_str().expect("text");
    assert_eq!(r["echo"], format!("{PROMPT}{completion}"));
    assert_eq!(r["echo_from_ids"], format!("{PROMPT}{completion}"));
    check_echo_logprobs(&r["echo_logprobs"], &r["completion"], prompt_ids.len());
    assert_eq!(
        r["echo_logprobs_stream"], r["echo_logprobs"],
        "streamed != unary (greedy)"
    );

    // Legacy logprobs: one entry per token, tokens spell the text, offsets follow them, the
    // greedy token is the most likely of its top 2.
    let lp = &c["logprobs"];
    let tokens = texts(&lp["tokens"]);
    assert_eq!(tokens.len(), 16);
    assert_eq!(tokens.concat(), grpc_completion.text);
    let offsets: Vec<u64> = lp["text_offset"]
        .as_array()
        .expect("text_offset")
        .iter()
        .filter_map(Value::as_u64)
        .collect();
    let mut at = 0;
    for (token, offset) in tokens.iter().zip(&offsets) {
        assert_eq!(*offset, at);
        at += token.chars().count() as u64;
    }
    let top = lp["top_logprobs"].as_array().expect("top_logprobs");
    for (i, (token, logprob)) in tokens
        .iter()
        .zip(lp["token_logprobs"].as_array().expect("token_logprobs"))
        .enumerate()
    {
        let pairs = top[i].as_array().expect("pairs");
        assert_eq!(pairs.len(), 2, "{i}: {pairs:?}");
        assert_eq!(pairs[0][0], *token, "{i}: greedy picks the most likely");
        assert_eq!(pairs[0][1], *logprob);
        assert!(logprob.as_f64().is_some_and(|l| l <= 0.0));
    }

    // Chat: the gRPC answer, unary and streamed; EOS is "stop".
    let ch = &r["chat"];
    assert!(ch["id"]
        .as_str()
        .is_some_and(|id| id.starts_with("chatcmpl-")));
    assert_eq!(ch["object"], "chat.completion");
    assert_eq!(ch["role"], "assistant");
    assert_eq!(ch["text"], grpc_chat.text.as_str());
    assert_eq!(ch["finish_reason"], "stop");
    let n = grpc_chat.token_ids.len();
    let chat_usage = json!({"prompt_tokens": chat_prompt_tokens, "completion_tokens": n,
        "total_tokens": chat_prompt_tokens + n});
    assert_eq!(ch["usage"], chat_usage);
    let cs = &r["chat_stream"];
    assert_eq!(cs["text"], ch["text"], "streamed != unary (greedy)");
    assert_eq!(cs["roles"], json!(["assistant"]));
    assert_eq!(cs["finish_reasons"], json!(["stop"]));
    assert_eq!(cs["usage"], chat_usage);
    assert_eq!(cs["tokens"], n, "one logprob entry per streamed token");
    assert_eq!(r["chat_stream_no_usage"]["usage"], Value::Null);
    assert_eq!(r["chat_stream_no_usage"]["text"], ch["text"]);
    assert_eq!(r["chat_parts"], ch["text"]);

    // Chat logprobs: bytes spell the text, top 3 sorted with the greedy token first.
    let entries = ch["logprobs"].as_array().expect("chat logprobs");
    assert_eq!(entries.len(), n);
    let bytes: Vec<u8> = entries
        .iter()
        .flat_map(|e| e["bytes"].as_array().expect("bytes").clone())
        .filter_map(|b| b.as_u64().map(|b| b as u8))
        .collect();
    assert!(String::from_utf8_lossy(&bytes).starts_with(&grpc_chat.text));
    for e in entries {
        let top = e["top"].as_array().expect("top");
        assert_eq!(top.len(), 3, "{e}");
        assert_eq!(top[0][0], e["token"], "{e}");
        let lps: Vec<f64> = top.iter().filter_map(|t| t[1].as_f64()).collect();
        assert!(lps.windows(2).all(|w| w[0] >= w[1]), "{e}");
    }

    // Stop strings (cut, never sent) and max_completion_tokens.
    assert_eq!(r["chat_stop"], json!(["The capital of France i", "stop"]));
    assert_eq!(r["chat_stop_stream"]["text"], "The capital of France i");
    assert_eq!(r["chat_stop_stream"]["finish_reasons"], json!(["stop"]));
    assert_eq!(r["chat_short"], json!(["length", 3]));

    // Seeded sampling: the same seed gives the same text, streamed or not.
    let seeded = texts(&r["seeded"]);
    assert!(!seeded[0].is_empty());
    assert_eq!(seeded[0], seeded[1], "seeded: streamed != unary");
    assert_ne!(seeded[2], "", "vLLM's extensions were refused");

    // The wire: text/event-stream, a role chunk first, usage after the finish, then [DONE].
    let raw = &r["raw_stream"];
    assert_eq!(raw["status"], 200);
    assert!(raw["content_type"]
        .as_str()
        .is_some_and(|t| t.starts_with("text/event-stream")));
    let events = texts(&raw["events"]);
    assert_eq!(events.last(), Some(&"[DONE]"));
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).expect("a JSON chunk"))
        .collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let usage_chunk = &chunks[chunks.len() - 1];
    assert_eq!(usage_chunk["choices"], json!([]));
    assert_eq!(usage_chunk["usage"], chat_usage);
    assert_eq!(
        chunks[chunks.len() - 2]["choices"][0]["finish_reason"],
        "stop"
    );
    let ids: Vec<&Value> = chunks.iter().map(|c| &c["id"]).collect();
    assert!(ids.iter().all(|id| *id == ids[0]), "one id per stream");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_inputs_get_openai_errors_and_the_server_serves_on() {
    let server = Process::serve_default("1", &[]);
    let r = client("bad", &server, json!({}));
    let cases = r["cases"].as_object().expect("cases");
    // (case, HTTP status, param, words in the message)
    let expected: [(&str, u16, Option<&str>, &str); 27] = [
        ("malformed_json", 400, None, "not valid JSON"),
        ("empty_body", 400, None, "empty"),
        ("not_an_object", 400, None, "JSON object"),
        ("max_tokens_ten", 400, Some("max_tokens"), "invalid type"),
        ("temperature_hot", 400, Some("temperature"), "invalid type"),
        ("messages_string", 400, Some("messages"), "invalid type"),
        ("unknown_model", 404, Some("model"), "gpt-4o"),
        ("unknown_model_chat", 404, Some("model"), "gpt-4o"),
        ("n_0", 400, Some("n"), "n is 0"),
        ("n_129_chat", 400, Some("n"), "1 to 128"),
        ("best_of_below_n", 400, Some("best_of"), "at least n (3)"),
        ("best_of_stream", 400, Some("best_of"), "cannot be streamed"),
        ("choice_tokens", 400, Some("n"), "n × max_new_tokens"),
        (
            "logit_bias_range",
            400,
            Some("logit_bias"),
            "logit_bias[5] is 150",
        ),
        (
            "logit_bias_unknown_id",
            400,
            Some("logit_bias"),
            "outside the vocabulary",
        ),
        ("logit_bias_key", 400, Some("logit_bias"), "not a token id"),
        ("two_prompts", 400, Some("prompt"), "2 prompts"),
        ("echo_logprobs_21", 400, Some("logprobs"), "at most 20"),
        ("body_5_mib", 400, None, "over the limit of 4 MiB"),
        (
            "negative_temperature",
            400,
            Some("temperature"),
            "temperature must be >= 0",
        ),
        (
            "negative_temperature_stream",
            400,
            Some("temperature"),
            "temperature",
        ),
        (
            "max_tokens_too_many",
            400,
            Some("max_tokens"),
            "max_tokens is 100000",
        ),
        ("top_logprobs_21", 400, Some("top_logprobs"), "at most 20"),
        (
            "image_part",
            400,
            Some("messages[0].content"),
            "only text parts",
        ),
        ("unknown_route", 404, None, "no endpoint"),
        ("wrong_method", 405, None, "does not take GET"),
        ("unknown_model_card", 404, Some("model"), "gpt-4o"),
    ];
    assert_eq!(cases.len(), expected.len(), "{cases:?}");
    for (name, status, param, words) in expected {
        let case = &cases[name];
        assert_eq!(case["status"], status, "{name}: {case}");
        let body = &case["body"];
        assert_openai_error(name, body);
        assert_eq!(body["error"]["param"].as_str(), param, "{name}: {body}");
        let message = body["error"]["message"].as_str().unwrap_or_default();
        assert!(
            message.contains(words),
            "{name}: {message:?} lacks {words:?}"
        );
        let kind = if status >= 500 {
            "server_error"
        } else {
            "invalid_request_error"
        };
        assert_eq!(body["error"]["type"], kind, "{name}");
    }
    assert_eq!(
        cases["unknown_model"]["body"]["error"]["code"],
        "model_not_found"
    );

    // The SDK raises its typed errors from them.
    assert_eq!(r["sdk"]["unknown_model"][0], "NotFoundError");
    assert_eq!(r["sdk"]["unknown_model"][1], 404);
    assert_eq!(r["sdk"]["n_0"][0], "BadRequestError");
    assert_eq!(r["sdk"]["n_0"][1], 400);

    // Still serving, and nothing is held.
    assert_eq!(r["after"], json!(["length", 4]));
    let mut grpc = server.client().await;
    let info = model_info(&mut grpc).await;
    assert_eq!(info.kv_blocks_free, info.kv_blocks_total);
    assert!(info.ready);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_leaves_cancels_its_request() {
    let server = Process::serve_default("1", &[]);
    let mut grpc = server.client().await;
    let total = model_info(&mut grpc).await.kv_blocks_total;
    // Two requests of 1500 tokens (tens of seconds here) whose clients leave after three
    // chunks and after one second.
    let r = client("disconnect", &server, json!({}));
    assert_eq!(r, json!({"chunks": 3, "unary_timed_out": true}));
    wait_until_idle(&mut grpc, total, Duration::from_secs(3))
        .await
        .expect("the requests of clients that left were not cancelled");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_http_with_grpc() {
    let mut server = Process::serve_default("1", &["--shutdown-grace", "1"]);
    let r = client("drain", &server, json!({"pid": server.pid()}));
    // During the drain: health and new requests say 503, in OpenAI's shape for the latter.
    assert_eq!(r["health"]["status"], 503, "{r}");
    assert_eq!(r["health"]["body"]["status"], "draining");
    assert_eq!(r["refused"]["status"], 503, "{r}");
    assert_openai_error("refused", &r["refused"]["body"]);
    assert_eq!(r["refused"]["body"]["error"]["code"], "service_unavailable");
    // The stream in flight outlived the grace period: ended early, with its usage, then [DONE].
    assert_eq!(r["finish_reasons"], json!(["abort"]), "{r}");
    assert_eq!(r["done"], true);
    let tokens = r["tokens"].as_u64().expect("tokens");
    assert!(tokens > 0 && tokens < 3000, "{tokens}");
    assert_eq!(r["usage"][0]["completion_tokens"], tokens);
    let exit = server
        .wait_exit(Duration::from_secs(10))
        .expect("the server did not exit after SIGTERM");
    assert!(exit.success(), "{exit:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openai_client_gets_several_choices_and_logit_bias() {
    let server = Process::serve_default("1", &[]);
    let mut grpc = server.client().await;
    let prompt_tokens = helios_tests::server::tokenize(&mut grpc, PROMPT)
        .await
        .expect("tokenize")
        .len();
    let forced = 1234;
    let config = json!({"prompt": PROMPT, "question": QUESTION, "forced": forced});
    let r = client("choices", &server, config);

    // n = 4, seeded: choice i is the request with n = 1 and seed + i; listed in index order.
    let four = r["four"].as_array().expect("four");
    let indices: Vec<u64> = four.iter().filter_map(|c| c["index"].as_u64()).collect();
    assert_eq!(indices, [0, 1, 2, 3]);
    let four_texts: Vec<&str> = four.iter().filter_map(|c| c["text"].as_str()).collect();
    assert_eq!(four_texts, texts(&r["singles"]));
    assert_eq!(
        r["four_usage"],
        json!({"prompt_tokens": prompt_tokens, "completion_tokens": 40,
            "total_tokens": prompt_tokens + 40})
    );

    // Streamed: chunks of the choices interleaved, each index's text the unary choice's, and
    // the usage once all have finished.
    let chunks = r["stream"].as_array().expect("stream");
    let mut streamed = vec![String::new(); 4];
    let mut order = Vec::new();
    for c in chunks {
        let i = c[0].as_u64().expect("index") as usize;
        streamed[i].push_str(c[1].as_str().unwrap_or_default());
        order.push(i);
    }
    assert_eq!(streamed, four_texts);
    let switches = order.windows(2).filter(|w| w[0] != w[1]).count();
    assert!(switches > 3, "interleaved: {order:?}");
    assert_eq!(r["stream_usage"], r["four_usage"]);
    let chat = r["chat_stream"].as_object().expect("chat");
    assert_eq!(chat.len(), 3, "{chat:?}");

    // best_of = 4, n = 2: the two with the highest cumulative logprob, best first.
    let mut ranked: Vec<(f64, &str)> = four
        .iter()
        .map(|c| {
            (
                c["logprob"].as_f64().unwrap_or(f64::NAN),
                c["text"].as_str().unwrap_or(""),
            )
        })
        .collect();
    ranked.sort_by(|a, b| b.0.total_cmp(&a.0));
    assert_eq!(
        r["best"],
        json!([[0, ranked[0].1], [1, ranked[1].1]]),
        "{ranked:?}"
    );

    // logit_bias {"1234": 100}: greedy says token 1234 four times.
    let token = grpc
        .detokenize(helios_proto::v1::DetokenizeRequest {
            token_ids: vec![forced; 4],
        })
        .await
        .expect("detokenize")
        .into_inner()
        .text;
    assert_eq!(r["biased"], token.as_str());
}

/// An echo with logprobs of the prompt and the first 4 greedy tokens of `completion` (its
/// prompt `p` tokens long), as lm-evaluation-harness scores a continuation: one entry per
/// token, the first null; the tokens spell the text; the continuation's logprobs are those
/// the tokens had when generated, and each is the most likely at its position (greedy).
fn check_echo_logprobs(e: &Value, completion: &Value, p: usize) {
    let tokens = texts(&e["tokens"]);
    let lps = e["token_logprobs"].as_array().expect("token_logprobs");
    let top = e["top_logprobs"].as_array().expect("top_logprobs");
    let offsets = e["text_offset"].as_array().expect("text_offset");
    assert_eq!(
        tokens.len(),
        p + 5,
        "prompt, 4 scored tokens and 1 generated"
    );
    assert_eq!(lps.len(), tokens.len());
    assert_eq!(offsets.len(), tokens.len());
    assert_eq!(tokens.concat(), e["text"].as_str().expect("text"));
    assert!(
        lps[0].is_null() && top[0].is_null(),
        "nothing scores the first token"
    );
    assert_eq!(offsets[0], 0);
    for (i, l) in lps.iter().enumerate().skip(1) {
        let l = l.as_f64().expect("a logprob");
        assert!(l <= 0.0 && l > -40.0, "{i}: {l}");
        let pairs = top[i].as_array().expect("top");
        assert!(matches!(pairs.len(), 1 | 2), "{i}: {pairs:?}");
        assert!(
            pairs.iter().any(|t| t[0] == tokens[i]),
            "{i}: the token itself is listed"
        );
    }
    let generated = completion["logprobs"]["token_logprobs"]
        .as_array()
        .expect("logprobs");
    for k in 0..4 {
        let (scored, want) = (lps[p + k].as_f64().unwrap(), generated[k].as_f64().unwrap());
        assert!(
            (scored - want).abs() < 2e-3,
            "continuation token {k}: scored {scored}, generated {want}"
        );
        let best = &top[p + k].as_array().expect("top")[0];
        assert_eq!(best[0], tokens[p + k], "token {k} is greedy");
    }
}
