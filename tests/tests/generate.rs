//! `helios generate` end to end: stop strings and finish reasons.

use helios_tests::{generate_capital_of_france, helios_json};

fn generate(max_new_tokens: &str, extra: &[&str]) -> serde_json::Value {
    let mut flags = vec!["--dequantize"];
    flags.extend_from_slice(extra);
    generate_capital_of_france("1", max_new_tokens, &flags)
}

#[test]
fn a_stop_string_ends_the_text_before_it() {
    let plain = generate("24", &[]);
    assert_eq!(plain["text"], "The capital of France is Paris.");
    assert_eq!(plain["finish_reason"], "eos");
    // "s Par" starts inside the token " is" and ends inside " Paris": matched across token
    // boundaries, cut, never sent.
    let stopped = generate("24", &["--stop", "s Par"]);
    assert_eq!(stopped["text"], "The capital of France i");
    assert_eq!(stopped["finish_reason"], "stop");
    let n = stopped["generated_ids"].as_array().unwrap().len();
    assert!(
        n < plain["generated_ids"].as_array().unwrap().len(),
        "generation went on"
    );
}

#[test]
fn max_new_tokens_gives_length() {
    let out = generate("3", &[]);
    assert_eq!(out["finish_reason"], "length");
    assert_eq!(out["generated_ids"].as_array().unwrap().len(), 3);
    assert_eq!(out["logprobs"].as_array().unwrap().len(), 3);
}

#[test]
fn an_hf_directory_generates_what_the_reference_generates() {
    let dir = tempfile::tempdir().unwrap();
    helios_tests::make_tiny_model(dir.path(), 21, &[]).unwrap();
    let out = helios_json(&[
        "generate",
        "--model",
        dir.path().to_str().unwrap(),
        "--tp",
        "2",
        "--prompt",
        "hello world",
        "--max-new-tokens",
        "8",
        "--ignore-eos",
        "--json",
    ]);
    let prompt: Vec<u32> = serde_json::from_value(out["prompt_ids"].clone()).unwrap();
    let got: Vec<u32> = serde_json::from_value(out["generated_ids"].clone()).unwrap();
    assert!(!prompt.is_empty());
    let (want, _) = helios_tests::reference_generate(dir.path(), &prompt, 8).unwrap();
    assert_eq!(got, want);
}
