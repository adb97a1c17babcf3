//! Hostile GGUF headers: each corrupts one field of a small valid file and expects an error that
//! names the field or tensor; the properties feed arbitrary and mutated bytes.

use std::io::Cursor;

use proptest::prelude::*;

use super::test_util::{assert_mentions, error_chain, string_payload, GgufBuilder};
use super::*;

fn parse(bytes: &[u8]) -> Result<Content> {
    read(Cursor::new(bytes), bytes.len() as u64)
}

/// The error of parsing `bytes`, with its whole context chain.
fn err_of(bytes: &[u8]) -> String {
    error_chain(parse(bytes))
}

#[test]
fn tiny_llama_reads_like_candle_does() {
    let bytes = GgufBuilder::tiny_llama().build();
    let ours = parse(&bytes).unwrap();
    let theirs =
        candle_core::quantized::gguf_file::Content::read(&mut Cursor::new(&bytes)).unwrap();
    assert_same(&ours, &theirs);
    let r = tensor_range(&ours, "token_embd.weight", bytes.len() as u64).unwrap();
    assert_eq!(r.len(), 8 * 4 * 4);
    assert_eq!(ours.tensor_infos["token_embd.weight"].shape.dims(), [4, 8]);
}

/// The default model's header reads the same through this reader and candle's.
#[test]
fn the_default_model_reads_like_candle_does() {
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        path.is_file(),
        "{} is missing: run scripts/fetch-model.sh",
        path.display()
    );
    let ours = read_path(&path).unwrap();
    let mut file = BufReader::new(File::open(&path).unwrap());
    let theirs = candle_core::quantized::gguf_file::Content::read(&mut file).unwrap();
    assert_same(&ours, &theirs);
}

fn assert_same(ours: &Content, theirs: &Content) {
    assert_eq!(ours.magic, theirs.magic);
    assert_eq!(ours.tensor_data_offset, theirs.tensor_data_offset);
    assert_eq!(ours.metadata.len(), theirs.metadata.len());
    for (k, v) in &theirs.metadata {
        assert_eq!(format!("{:?}", ours.metadata[k]), format!("{v:?}"), "{k}");
    }
    assert_eq!(ours.tensor_infos.len(), theirs.tensor_infos.len());
    for (k, t) in &theirs.tensor_infos {
        let o = &ours.tensor_infos[k];
        assert_eq!(
            (o.ggml_dtype, o.shape.dims(), o.offset),
            (t.ggml_dtype, t.shape.dims(), t.offset)
        );
    }
}

#[test]
fn version_1_files_read() {
    let mut b = GgufBuilder::tiny_llama();
    b.version = 1;
    let c = parse(&b.build()).unwrap();
    assert_eq!(c.magic, VersionedMagic::GgufV1);
    assert_eq!(c.tensor_infos["token_embd.weight"].shape.dims(), [4, 8]);
}

#[test]
fn tensor_dims_whose_product_overflows() {
    let mut b = GgufBuilder::tiny_llama();
    b.tensor_mut("token_embd.weight").dims = vec![1 << 32, 1 << 32, 2];
    assert_mentions(&err_of(&b.build()), &["token_embd.weight", "overflows"]);
}

#[test]
fn tensor_byte_size_that_overflows() {
    // 2^62 elements fit in 64 bits, their 2^64 bytes of F32 do not.
    let mut b = GgufBuilder::tiny_llama();
    b.tensor_mut("output_norm.weight").dims = vec![1 << 31, 1 << 31];
    assert_mentions(&err_of(&b.build()), &["output_norm.weight", "overflows"]);
}

#[test]
fn tensor_offset_past_the_end_of_the_file() {
    let mut b = GgufBuilder::tiny_llama();
    b.tensor_mut("token_embd.weight").offset = Some(1 << 20);
    assert_mentions(&err_of(&b.build()), &["token_embd.weight", "past the end"]);
    // An offset that overflows when the data start is added.
    b.tensor_mut("token_embd.weight").offset = Some(u64::MAX - 8);
    assert_mentions(&err_of(&b.build()), &["token_embd.weight", "past the end"]);
}

#[test]
fn truncated_tensor_data() {
    let bytes = GgufBuilder::tiny_llama().build();
    let msg = err_of(&bytes[..bytes.len() - 1]);
    assert_mentions(&msg, &["weight", "past the end", "truncated"]);
}

#[test]
fn metadata_array_length_2_pow_60() {
    let mut payload = 4u32.to_le_bytes().to_vec(); // u32 elements
    payload.extend_from_slice(&(1u64 << 60).to_le_bytes());
    let b = GgufBuilder::tiny_llama().kv_raw("tokenizer.ggml.token_type", 9, payload);
    assert_mentions(
        &err_of(&b.build()),
        &[
            "tokenizer.ggml.token_type",
            "array length 1152921504606846976",
        ],
    );
}

#[test]
fn metadata_array_longer_than_the_file() {
    // Under the absolute cap, but more u64s than the file has bytes for.
    let mut payload = 10u32.to_le_bytes().to_vec();
    payload.extend_from_slice(&1_000_000u64.to_le_bytes());
    let b = GgufBuilder::tiny_llama().kv_raw("tokenizer.ggml.scores", 9, payload);
    assert_mentions(
        &err_of(&b.build()),
        &["tokenizer.ggml.scores", "cannot fit"],
    );
}

#[test]
fn string_length_past_the_end() {
    let mut payload = 5000u64.to_le_bytes().to_vec();
    payload.extend_from_slice(b"llama");
    let b = GgufBuilder::tiny_llama().kv_raw("general.name", 8, payload);
    assert_mentions(
        &err_of(&b.build()),
        &["general.name", "string length 5000", "past the end"],
    );
    let mut payload = (1u64 << 62).to_le_bytes().to_vec();
    payload.extend_from_slice(b"llama");
    let b = GgufBuilder::tiny_llama().kv_raw("general.name", 8, payload);
    assert_mentions(&err_of(&b.build()), &["general.name", "exceeds the limit"]);
}

#[test]
fn a_string_in_an_array_past_the_end() {
    let mut payload = 8u32.to_le_bytes().to_vec();
    payload.extend_from_slice(&2u64.to_le_bytes());
    payload.extend_from_slice(&string_payload("a"));
    payload.extend_from_slice(&(1u64 << 40).to_le_bytes());
    let b = GgufBuilder::tiny_llama().kv_raw("tokenizer.ggml.tokens", 9, payload);
    assert_mentions(
        &err_of(&b.build()),
        &["tokenizer.ggml.tokens", "element #1", "string length"],
    );
}

#[test]
fn tensor_count_2_pow_40() {
    let mut b = GgufBuilder::tiny_llama();
    b.tensor_count = Some(1 << 40);
    assert_mentions(
        &err_of(&b.build()),
        &["tensor count 1099511627776", "cannot fit"],
    );
}

#[test]
fn metadata_count_u64_max() {
    let mut b = GgufBuilder::tiny_llama();
    b.kv_count = Some(u64::MAX);
    assert_mentions(&err_of(&b.build()), &["metadata count", "cannot fit"]);
}

#[test]
fn alignment_zero_or_not_a_power_of_two() {
    for v in [0u32, 3, 48] {
        let b = GgufBuilder::tiny_llama().kv(KEY_ALIGNMENT, Value::U32(v));
        assert_mentions(&err_of(&b.build()), &[KEY_ALIGNMENT, "not a power of two"]);
    }
    let b = GgufBuilder::tiny_llama().kv(KEY_ALIGNMENT, Value::String("32".into()));
    assert_mentions(
        &err_of(&b.build()),
        &[KEY_ALIGNMENT, "should be an integer"],
    );
}

#[test]
fn bad_types_are_named() {
    let b = GgufBuilder::tiny_llama().kv_raw("general.flag", 7, vec![2]);
    assert_mentions(&err_of(&b.build()), &["general.flag", "bool value 2"]);
    let b = GgufBuilder::tiny_llama().kv_raw("general.odd", 13, vec![0; 8]);
    assert_mentions(
        &err_of(&b.build()),
        &["general.odd", "unknown value type 13"],
    );
    let mut b = GgufBuilder::tiny_llama();
    b.tensor_mut("output_norm.weight").ty = 99;
    assert_mentions(
        &err_of(&b.build()),
        &["output_norm.weight", "unsupported tensor type 99"],
    );
}

#[test]
fn tensor_shapes_that_are_not_whole_blocks() {
    // Q4_0 (blocks of 32): 16 × 4 elements are 2 blocks, but a row of 16 is half a block.
    let mut b = GgufBuilder::tiny_llama();
    let t = b.tensor_mut("token_embd.weight");
    (t.ty, t.dims) = (2, vec![16, 4]);
    assert_mentions(
        &err_of(&b.build()),
        &["token_embd.weight", "not whole Q4_0 blocks"],
    );
    let t = b.tensor_mut("token_embd.weight");
    t.dims = vec![5, 1];
    assert_mentions(
        &err_of(&b.build()),
        &["token_embd.weight", "not a whole number"],
    );
}

#[test]
fn too_many_dimensions_and_duplicates() {
    let mut b = GgufBuilder::tiny_llama();
    b.tensor_mut("output_norm.weight").dims = vec![1, 1, 1, 1, 8];
    assert_mentions(&err_of(&b.build()), &["output_norm.weight", "5 dimensions"]);
    let mut b = GgufBuilder::tiny_llama();
    b.tensor_mut("output_norm.weight").name = "token_embd.weight".into();
    assert_mentions(&err_of(&b.build()), &["token_embd.weight", "appears twice"]);
    let mut b = GgufBuilder::tiny_llama();
    b.kvs.push(b.kvs[0].clone());
    assert_mentions(
        &err_of(&b.build()),
        &["general.architecture", "appears twice"],
    );
}

#[test]
fn deeply_nested_arrays() {
    let mut payload = Vec::new();
    for _ in 0..100 {
        payload.extend_from_slice(&9u32.to_le_bytes());
        payload.extend_from_slice(&1u64.to_le_bytes());
    }
    payload.extend_from_slice(&[0; 16]);
    let b = GgufBuilder::tiny_llama().kv_raw("general.deep", 9, payload);
    assert_mentions(&err_of(&b.build()), &["general.deep", "nested deeper"]);
}

#[test]
fn not_gguf_and_unknown_versions() {
    assert_mentions(&err_of(b""), &["magic", "file ends"]);
    assert_mentions(&err_of(b"GGML\x03\0\0\0"), &["not a GGUF file"]);
    let mut b = GgufBuilder::tiny_llama();
    b.version = 7;
    assert_mentions(&err_of(&b.build()), &["unsupported GGUF version 7"]);
}

#[test]
fn every_truncation_is_an_error() {
    let bytes = GgufBuilder::tiny_llama().build();
    for n in 0..bytes.len() {
        assert!(
            parse(&bytes[..n]).is_err(),
            "a file cut at {n} bytes was accepted"
        );
    }
}

/// Mutations of a valid file: byte flips, 64-bit fields overwritten with extreme values, a cut.
#[derive(Debug, Clone)]
enum Mutation {
    Flip(usize, u8),
    Word(usize, u64),
    Truncate(usize),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    let extreme = prop_oneof![
        Just(0u64),
        Just(u64::MAX),
        Just(1u64 << 60),
        Just(1u64 << 32),
        Just(u64::from(u32::MAX)),
        any::<u64>(),
    ];
    prop_oneof![
        (any::<usize>(), 1..=255u8).prop_map(|(i, x)| Mutation::Flip(i, x)),
        (any::<usize>(), extreme).prop_map(|(i, v)| Mutation::Word(i, v)),
        any::<usize>().prop_map(Mutation::Truncate),
    ]
}

fn apply(bytes: &mut Vec<u8>, m: &Mutation) {
    let len = bytes.len();
    match *m {
        Mutation::Flip(i, x) => bytes[i % len] ^= x,
        Mutation::Word(i, v) => {
            let at = i % (len - 8);
            bytes[at..at + 8].copy_from_slice(&v.to_le_bytes());
        }
        Mutation::Truncate(i) => bytes.truncate(i % len),
    }
}

/// A valid file with a bit of everything: strings, arrays of strings and numbers, tensors.
fn rich_file() -> Vec<u8> {
    let strings = (0..5).map(|i| Value::String(format!("t{i}"))).collect();
    GgufBuilder::tiny_llama()
        .kv("tokenizer.ggml.tokens", Value::Array(strings))
        .kv(
            "tokenizer.ggml.scores",
            Value::Array(vec![Value::F32(0.5); 5]),
        )
        .kv("general.alignment", Value::U32(32))
        .kv("general.flag", Value::Bool(true))
        .build()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = parse(&bytes);
        let mut with_magic = b"GGUF\x03\0\0\0".to_vec();
        with_magic.extend_from_slice(&bytes);
        let _ = parse(&with_magic);
    }

    #[test]
    fn mutated_files_never_panic(ms in proptest::collection::vec(mutation(), 1..4)) {
        let mut bytes = rich_file();
        for m in &ms {
            if bytes.len() > 8 {
                apply(&mut bytes, m);
            }
        }
        if let Ok(c) = parse(&bytes) {
            // Whatever is accepted has every tensor inside the file.
            for name in c.tensor_infos.keys() {
                let r = tensor_range(&c, name, bytes.len() as u64).unwrap();
                prop_assert!(r.end <= bytes.len());
            }
        }
    }
}
