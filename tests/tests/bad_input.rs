//! Broken models and impossible settings: each is a clear error naming the culprit and a
//! non-zero exit, never a panic.

use std::path::Path;

use helios_tests::{default_model, helios, make_tiny_model};

/// Runs `helios generate` on `model`; it must fail cleanly with every word of `words` in stderr.
fn fails_with(model: &Path, tp: &str, words: &[&str]) {
    let (ok, _, stderr) = helios(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--tp",
        tp,
        "--prompt",
        "hello",
        "--max-new-tokens",
        "2",
    ]);
    assert!(!ok, "should fail: {model:?}");
    assert!(!stderr.contains("panicked"), "panic:\n{stderr}");
    for w in words {
        assert!(stderr.contains(w), "stderr should mention {w:?}:\n{stderr}");
    }
}

fn tiny(seed: u64) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    make_tiny_model(dir.path(), seed, &[]).unwrap();
    dir
}

fn edit_config(dir: &Path, f: impl FnOnce(&mut serde_json::Value)) {
    let p = dir.join("config.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(&p, v.to_string()).unwrap();
}

fn truncate(path: &Path, keep: u64) {
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.set_len(keep).unwrap();
}

#[test]
fn missing_model() {
    fails_with(
        Path::new("/nonexistent/model.gguf"),
        "1",
        &["/nonexistent/model.gguf"],
    );
}

#[test]
fn truncated_safetensors_shard() {
    let dir = tiny(11);
    let shard = dir.path().join("model-00002-of-00002.safetensors");
    let len = std::fs::metadata(&shard).unwrap().len();
    truncate(&shard, len / 2);
    fails_with(
        dir.path(),
        "1",
        &["model-00002-of-00002.safetensors", "truncated"],
    );
}

#[test]
fn truncated_gguf() {
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("cut.gguf");
    std::fs::copy(default_model(), &copy).unwrap();
    truncate(&copy, 40 << 20);
    fails_with(&copy, "1", &["cut.gguf", "truncated"]);
}

#[test]
fn unknown_architecture() {
    let dir = tiny(12);
    edit_config(dir.path(), |v| {
        v["architectures"] = serde_json::json!(["FalconForCausalLM"])
    });
    fails_with(dir.path(), "1", &["config.json", "FalconForCausalLM"]);
}

#[test]
fn tensor_of_the_wrong_shape() {
    let dir = tiny(13);
    edit_config(dir.path(), |v| {
        v["intermediate_size"] = serde_json::json!(128)
    });
    fails_with(
        dir.path(),
        "1",
        &[
            "model.layers.0.mlp.gate_proj.weight",
            "[160, 64]",
            "[128, 64]",
        ],
    );
}

#[test]
fn tp_that_does_not_divide_the_heads() {
    let dir = tiny(14);
    fails_with(dir.path(), "3", &["tp 3", "valid tp values: 1, 2, 4"]);
}
