//! An in-memory GGUF writer for tests: it writes a small valid file, and lets a test set any
//! field (counts, lengths, types, dimensions, offsets) to a hostile value.

use crate::Value;

/// The error of `result`, which must be one, with its whole context chain.
pub fn error_chain<T>(result: anyhow::Result<T>) -> String {
    match result {
        Ok(_) => panic!("hostile input was accepted"),
        Err(e) => format!("{e:#}"),
    }
}

/// Asserts that `msg` names every one of `parts`.
pub fn assert_mentions(msg: &str, parts: &[&str]) {
    for p in parts {
        assert!(msg.contains(p), "{p:?} missing from: {msg}");
    }
}

/// A metadata entry: a value written properly, or a type id and payload bytes written as given.
#[derive(Debug, Clone)]
pub enum Kv {
    Value(String, Value),
    Raw(String, u32, Vec<u8>),
}

/// A tensor entry and its data.
#[derive(Debug, Clone)]
pub struct TensorEntry {
    pub name: String,
    /// In ggml order: the innermost (contiguous) dimension first.
    pub dims: Vec<u64>,
    /// ggml type id (0 = F32, 3 = Q4_1, ...).
    pub ty: u32,
    /// The offset written into the header; `None`: where the data really is.
    pub offset: Option<u64>,
    pub data: Vec<u8>,
}

/// A GGUF file under construction.
#[derive(Debug, Clone)]
pub struct GgufBuilder {
    pub version: u32,
    /// Written instead of the real number of tensors / metadata entries.
    pub tensor_count: Option<u64>,
    pub kv_count: Option<u64>,
    pub kvs: Vec<Kv>,
    pub tensors: Vec<TensorEntry>,
}

impl Default for GgufBuilder {
    fn default() -> Self {
        Self {
            version: 3,
            tensor_count: None,
            kv_count: None,
            kvs: Vec::new(),
            tensors: Vec::new(),
        }
    }
}

/// Bytes of a string (u64 length) for a raw payload.
pub fn string_payload(s: &str) -> Vec<u8> {
    let mut out = (s.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(s.as_bytes());
    out
}

impl GgufBuilder {
    /// A tiny but complete llama model: what the worker needs to open it (config keys, a
    /// `token_embd.weight` of 4 tokens × 8 F32, `output_norm.weight`).
    pub fn tiny_llama() -> Self {
        let u = |k: &str, v: u32| Kv::Value(k.into(), Value::U32(v));
        Self {
            kvs: vec![
                Kv::Value("general.architecture".into(), Value::String("llama".into())),
                u("llama.embedding_length", 8),
                u("llama.attention.head_count", 2),
                u("llama.attention.head_count_kv", 2),
                u("llama.feed_forward_length", 16),
                u("llama.block_count", 1),
                u("llama.context_length", 32),
            ],
            ..Self::default()
        }
        .tensor_f32("token_embd.weight", &[8, 4])
        .tensor_f32("output_norm.weight", &[8])
    }

    /// Adds (or replaces) a metadata entry.
    pub fn kv(mut self, key: &str, value: Value) -> Self {
        self.kvs.retain(|kv| kv_key(kv) != key);
        self.kvs.push(Kv::Value(key.into(), value));
        self
    }

    /// Adds (or replaces) a metadata entry written as the given type id and payload bytes.
    pub fn kv_raw(mut self, key: &str, ty: u32, payload: Vec<u8>) -> Self {
        self.kvs.retain(|kv| kv_key(kv) != key);
        self.kvs.push(Kv::Raw(key.into(), ty, payload));
        self
    }

    /// Adds an F32 tensor of zeros; `dims` in ggml order.
    pub fn tensor_f32(mut self, name: &str, dims: &[u64]) -> Self {
        let n: u64 = dims.iter().product();
        self.tensors.push(TensorEntry {
            name: name.into(),
            dims: dims.to_vec(),
            ty: 0,
            offset: None,
            data: vec![0; n as usize * 4],
        });
        self
    }

    /// The tensor entry called `name`, to corrupt.
    pub fn tensor_mut(&mut self, name: &str) -> &mut TensorEntry {
        self.tensors
            .iter_mut()
            .find(|t| t.name == name)
            .expect("the test names a tensor it added")
    }

    /// The file's bytes (tensor data aligned to 32 bytes).
    pub fn build(&self) -> Vec<u8> {
        let mut w = Writer {
            out: Vec::new(),
            v1: self.version == 1,
        };
        w.out.extend_from_slice(b"GGUF");
        w.u32(self.version);
        w.count(self.tensor_count.unwrap_or(self.tensors.len() as u64));
        w.count(self.kv_count.unwrap_or(self.kvs.len() as u64));
        for kv in &self.kvs {
            match kv {
                Kv::Value(k, v) => {
                    w.string(k);
                    w.u32(type_id(v));
                    w.value(v);
                }
                Kv::Raw(k, ty, payload) => {
                    w.string(k);
                    w.u32(*ty);
                    w.out.extend_from_slice(payload);
                }
            }
        }
        let mut data = Vec::new();
        for t in &self.tensors {
            w.string(&t.name);
            w.u32(t.dims.len() as u32);
            for &d in &t.dims {
                w.count(d);
            }
            w.u32(t.ty);
            w.u64(t.offset.unwrap_or(data.len() as u64));
            data.extend_from_slice(&t.data);
            data.resize(data.len().div_ceil(32) * 32, 0);
        }
        w.out.resize(w.out.len().div_ceil(32) * 32, 0);
        w.out.extend_from_slice(&data);
        w.out
    }
}

fn kv_key(kv: &Kv) -> &str {
    match kv {
        Kv::Value(k, _) | Kv::Raw(k, _, _) => k,
    }
}

/// The GGUF type id of a value.
pub fn type_id(v: &Value) -> u32 {
    match v {
        Value::U8(_) => 0,
        Value::I8(_) => 1,
        Value::U16(_) => 2,
        Value::I16(_) => 3,
        Value::U32(_) => 4,
        Value::I32(_) => 5,
        Value::F32(_) => 6,
        Value::Bool(_) => 7,
        Value::String(_) => 8,
        Value::Array(_) => 9,
        Value::U64(_) => 10,
        Value::I64(_) => 11,
        Value::F64(_) => 12,
    }
}

struct Writer {
    out: Vec<u8>,
    v1: bool,
}

impl Writer {
    fn u32(&mut self, v: u32) {
        self.out.extend_from_slice(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.out.extend_from_slice(&v.to_le_bytes());
    }
    fn count(&mut self, v: u64) {
        if self.v1 {
            self.u32(v as u32)
        } else {
            self.u64(v)
        }
    }
    fn string(&mut self, s: &str) {
        self.count(s.len() as u64);
        self.out.extend_from_slice(s.as_bytes());
    }
    fn value(&mut self, v: &Value) {
        match v {
            Value::U8(x) => self.out.push(*x),
            Value::I8(x) => self.out.extend_from_slice(&x.to_le_bytes()),
            Value::U16(x) => self.out.extend_from_slice(&x.to_le_bytes()),
            Value::I16(x) => self.out.extend_from_slice(&x.to_le_bytes()),
            Value::U32(x) => self.u32(*x),
            Value::I32(x) => self.out.extend_from_slice(&x.to_le_bytes()),
            Value::F32(x) => self.out.extend_from_slice(&x.to_le_bytes()),
            Value::U64(x) => self.u64(*x),
            Value::I64(x) => self.out.extend_from_slice(&x.to_le_bytes()),
            Value::F64(x) => self.out.extend_from_slice(&x.to_le_bytes()),
            Value::Bool(x) => self.out.push(u8::from(*x)),
            Value::String(s) => self.string(s),
            Value::Array(items) => {
                self.u32(items.first().map_or(4, type_id));
                self.count(items.len() as u64);
                for item in items {
                    self.value(item);
                }
            }
        }
    }
}
