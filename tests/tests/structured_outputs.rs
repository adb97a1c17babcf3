//! Structured outputs end to end on the default model (tp 1 and 3): JSON schemas through the
//! official `openai` package (`tests/reference/structured_client.py` records, validating each
//! answer with `jsonschema`; the checks are here), regexes and grammars over gRPC, streamed
//! and unary alike, unconstrained requests unchanged beside constrained ones, constrained ones
//! unchanged through preemption and a lost worker, and bad constraints refused while the server
//! serves on.

use std::time::Duration;

use helios_proto::v1::constraint::Kind;
use helios_proto::v1::{Constraint, FinishReason, GenerateRequest, GenerationParameters};
use helios_tests::recovery::{
    assert_same_streams, metric, metrics_text, run_streams, Answers, Running,
};
use helios_tests::server::{
    chat_request, model_info, prompt_request, send_signal, stream_all, Process,
};
use serde_json::Value;

/// The id `/v1/models` lists for the default model.
const MODEL: &str = "SmolLM2-135M-Instruct.Q4_1";

fn constrained(kind: Kind, temperature: f32, seed: u64) -> GenerationParameters {
    GenerationParameters {
        max_new_tokens: Some(48),
        temperature,
        seed: Some(seed),
        constraint: Some(Constraint { kind: Some(kind) }),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_schemas_through_the_openai_client_always_validate() {
    let server = Process::serve_default("1", &[]);
    let r = helios_tests::reference_json("structured_client.py", &[&server.http_url(), MODEL]);
    let constrained = r["constrained"].as_array().expect("constrained answers");
    assert_eq!(constrained.len(), 40, "20 schemas, greedy and sampled");
    for a in constrained {
        assert_eq!(a["finish_reason"], "stop", "{a}");
        assert_eq!(a["errors"], Value::Array(vec![]), "{a}");
    }
    // Sampling draws differ from greedy somewhere: the constraint does not pin the output.
    let texts = |t: f64| -> Vec<&str> {
        constrained
            .iter()
            .filter(|a| a["temperature"].as_f64() == Some(t))
            .filter_map(|a| a["text"].as_str())
            .collect()
    };
    assert_ne!(texts(0.0), texts(0.8));
    // Unconstrained requests in the same batch get exactly their answers alone.
    assert_eq!(r["batch_plain"], r["solo"]);
    assert_eq!(r["streamed"], r["unary"]);

    // Any object may nest without end: complete, it is an object; cut at max_tokens, it is
    // the start of one.
    let object = r["json_object"]["text"].as_str().expect("text");
    if r["json_object"]["finish_reason"] == "stop" {
        let v: Value = serde_json::from_str(object).expect(object);
        assert!(v.is_object(), "{v}");
    } else {
        assert!(object.starts_with('{'), "{object}");
    }
    let date = r["guided_regex"]["text"].as_str().expect("text");
    assert!(
        date.len() == 10
            && date.bytes().enumerate().all(|(i, b)| if i == 4 || i == 7 {
                b == b'-'
            } else {
                b.is_ascii_digit()
            }),
        "{date:?}"
    );
    let choice = r["guided_choice"]["text"].as_str().expect("text");
    assert!(choice == "yes" || choice == "no", "{choice:?}");
    let answer: Value =
        serde_json::from_str(r["structured_outputs_json"]["text"].as_str().expect("text"))
            .expect("structured_outputs.json gives JSON");
    assert!(["yes", "no", "maybe"].contains(&answer["answer"].as_str().unwrap_or("")));
    let year = r["completion_regex"].as_str().expect("text");
    assert!(
        year.len() == 6 && year.starts_with(' ') && year.ends_with('.'),
        "{year:?}"
    );

    // Each bad constraint: a 4xx naming what is wrong; the server answers on.
    let bad = r["bad"].as_object().expect("bad");
    for (name, param, words) in [
        ("invalid_schema", "response_format", "json_schema"),
        ("missing_schema", "response_format", "json_schema.schema"),
        ("bad_type", "response_format", "json_object"),
        ("bad_regex", "guided_regex", "regex"),
        ("bad_grammar", "guided_grammar", "grammar"),
        ("two_at_once", "guided_choice", "only one"),
        ("unsupported_keyword", "guided_json", "uniqueItems"),
    ] {
        let [status, error] = bad[name].as_array().expect("pair").as_slice() else {
            panic!("{name}: {}", bad[name]);
        };
        assert_eq!(status, 400, "{name}: {error}");
        assert_eq!(error["param"], param, "{name}: {error}");
        let message = error["message"].as_str().unwrap_or("");
        assert!(
            message.contains(words),
            "{name}: {message:?} lacks {words:?}"
        );
    }
    // The schema (30,000 properties) is over the bound on a constraint's size.
    let too_large = &bad["too_large"];
    assert_eq!(too_large[0], 400, "{too_large}");
    assert_eq!(too_large[1]["param"], "guided_json", "{too_large}");
    let message = too_large[1]["message"].as_str().unwrap_or("");
    assert!(message.contains("at most 262144"), "{message:?}");
    assert_eq!(r["after"], r["solo"][0]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn regexes_and_grammars_over_grpc_match_every_output() {
    let server = Process::serve_default("3", &[]);
    let mut client = server.client().await;
    let regex = Kind::Regex(r"(red|green|blue)( (red|green|blue)){0,3}\.".into());
    let grammar = Kind::Grammar(
        r#"start: "x = " NUM " " OP " " NUM
           NUM: /[1-9][0-9]{0,2}/
           OP: "+" | "-" | "*""#
            .into(),
    );
    let colors = ["red", "green", "blue"];
    let regex_ok = |t: &str| {
        t.strip_suffix('.').is_some_and(|w| {
            let words: Vec<&str> = w.split(' ').collect();
            (1..=4).contains(&words.len()) && words.iter().all(|c| colors.contains(c))
        })
    };
    let grammar_ok = |t: &str| {
        let parts: Vec<&str> = t.split(' ').collect();
        parts.len() == 5
            && parts[..2] == ["x", "="]
            && ["+", "-", "*"].contains(&parts[3])
            && [parts[2], parts[4]]
                .iter()
                .all(|n| n.parse::<u32>().is_ok_and(|n| (1..1000).contains(&n)))
    };
    let prompt = "Name some colors:";
    for (kind, ok) in [
        (regex, &regex_ok as &dyn Fn(&str) -> bool),
        (grammar, &grammar_ok),
    ] {
        for (temperature, seed) in [(0.0, 1), (1.0, 2), (1.0, 3)] {
            let req = prompt_request(prompt, constrained(kind.clone(), temperature, seed));
            let unary = client.generate(req.clone()).await.expect("generate");
            let unary = unary.into_inner();
            assert!(ok(&unary.text), "{:?}", unary.text);
            assert_eq!(
                unary.finish_reason,
                FinishReason::Eos as i32,
                "the constraint is complete"
            );
            let streamed = stream_all(&mut client, req).await.expect("stream");
            assert_eq!(streamed.text, unary.text, "streamed = unary");
            assert_eq!(streamed.token_ids, unary.token_ids);
        }
    }
    // Bad constraints: INVALID_ARGUMENT naming the problem; the server answers on.
    for (kind, words) in [
        (Kind::JsonSchema("{oops".into()), "not JSON"),
        (Kind::Regex("[z-a]".into()), "regex"),
        (Kind::Grammar("start: missing".into()), "grammar"),
        (Kind::JsonObject(false), "json_object"),
    ] {
        let req = chat_request("Hi", constrained(kind, 0.0, 1));
        let e = client.generate(req).await.expect_err(words);
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
        assert!(
            e.message().contains(words),
            "{:?} lacks {words:?}",
            e.message()
        );
    }
    let ok = client
        .generate(prompt_request(
            prompt,
            constrained(Kind::JsonObject(true), 0.0, 1),
        ))
        .await
        .expect("serves on");
    assert!(ok.into_inner().text.starts_with('{'));
}

/// A schema small enough to finish within a few dozen tokens.
const FOX: &str = r#"{"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 12},
    "legs": {"type": "integer", "minimum": 0, "maximum": 8},
    "color": {"enum": ["red", "grey", "white"]}
}, "required": ["name", "legs", "color"], "additionalProperties": false}"#;

fn fox_requests() -> Vec<GenerateRequest> {
    (0..8)
        .map(|i| {
            let (temperature, seed) = if i % 2 == 0 { (0.0, 1) } else { (0.8, i) };
            let mut p = constrained(Kind::JsonSchema(FOX.into()), temperature, seed);
            p.max_new_tokens = Some(64);
            prompt_request(&format!("Request {i}: describe a fox in JSON."), p)
        })
        .collect()
}

/// Every answer equals the request's answer alone, and one that completed its constraint is
/// JSON of the schema's shape.
fn assert_unchanged(got: &Answers, alone: &Answers) {
    assert_same_streams(got, alone);
    for g in got.iter().flatten() {
        if g.finish_reason == Some(FinishReason::Eos) {
            let v: Value = serde_json::from_str(&g.text).expect(&g.text);
            assert!(v["legs"].as_u64().is_some_and(|l| l <= 8), "{}", g.text);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn constrained_requests_keep_their_tokens_through_preemption_and_a_lost_worker() {
    // Eight streams of up to ~80 positions (5 blocks) each in 8 blocks: they preempt one
    // another, and are recomputed from their kept tokens.
    let flags = [
        "--num-kv-blocks",
        "8",
        "--max-batch-tokens",
        "32",
        "--recovery-timeout",
        "60",
    ];
    let server = Process::serve_default("3", &flags);
    let mut client = server.client().await;
    let mut alone = Vec::new();
    for r in fox_requests() {
        alone.push(stream_all(&mut client, r).await);
    }
    assert!(alone
        .iter()
        .flatten()
        .any(|a| a.finish_reason == Some(FinishReason::Eos)));
    let before = model_info(&mut client).await.preemptions_total;
    let together = run_streams(&client, fox_requests()).await;
    assert_unchanged(&together, &alone);
    let preemptions = model_info(&mut client).await.preemptions_total - before;
    assert!(
        preemptions > 0,
        "no preemption: the test no longer tests it"
    );

    // Again, rank 1 killed once every stream has answered: the replica requeues them, the
    // worker is respawned, and each constrained sequence goes on from its answered tokens.
    let workers = server.children();
    let run = Running::start(&client, fox_requests());
    run.wait_for(8, Duration::from_secs(120)).await;
    send_signal(workers[1], "-KILL");
    let disturbed = run.finish(Duration::from_secs(180)).await;
    assert_unchanged(&disturbed, &alone);
    let requeued = metric(
        &metrics_text(&server.http_url()),
        "helios_sequences_requeued_total{replica=\"0\"}",
    );
    assert!(requeued.unwrap_or(0.0) >= 1.0, "nothing was requeued");
}
