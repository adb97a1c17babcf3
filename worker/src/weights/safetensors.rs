//! HF safetensors directories: `config.json` plus `model.safetensors` or shards listed in
//! `model.safetensors.index.json`, memory-mapped.
//!
//! The format is parsed here (an 8-byte header length, a JSON header, raw little-endian data)
//! rather than through a crate, so that every failure names the file and tensor, a truncated file
//! is caught before any read, and a rank copies nothing but its own slice out of the mapping.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use memmap2::Mmap;
use serde::Deserialize;

use super::{check_shape, slice_rows, LoadOptions, Split};
use crate::config::ModelConfig;

pub struct SafetensorsWeights {
    pub config: ModelConfig,
    files: Vec<MappedFile>,
    /// Tensor name -> (index into `files`, entry).
    index: HashMap<String, (usize, Entry)>,
}

struct MappedFile {
    path: PathBuf,
    mmap: Mmap,
}

#[derive(Debug, Clone)]
struct Entry {
    dtype: DType,
    shape: Vec<usize>,
    /// Absolute byte range in the file.
    start: usize,
    end: usize,
}

#[derive(Deserialize)]
struct HeaderEntry {
    dtype: String,
    shape: Vec<usize>,
    data_offsets: [usize; 2],
}

impl SafetensorsWeights {
    pub fn open(dir: &Path) -> Result<Self> {
        let config = ModelConfig::from_hf_dir(dir)?;
        let mut weights = Self {
            config,
            files: Vec::new(),
            index: HashMap::new(),
        };
        for path in shard_paths(dir)? {
            weights.add_file(path)?;
        }
        Ok(weights)
    }

    fn add_file(&mut self, path: PathBuf) -> Result<()> {
        let file = File::open(&path).with_context(|| format!("opening {}", path.display()))?;
        // SAFETY: the mapping is read-only; a model file changed under a running worker is
        // outside what we support (as in every mmap-based loader).
        let mmap =
            unsafe { Mmap::map(&file) }.with_context(|| format!("mapping {}", path.display()))?;
        let entries = parse_header(&mmap).with_context(|| format!("reading {}", path.display()))?;
        let file_idx = self.files.len();
        for (name, entry) in entries {
            self.index.insert(name, (file_idx, entry));
        }
        self.files.push(MappedFile { path, mmap });
        Ok(())
    }

    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    fn entry(&self, name: &str) -> Result<(&MappedFile, &Entry)> {
        match self.index.get(name) {
            Some((f, e)) => Ok((&self.files[*f], e)),
            None => bail!(
                "tensor {name} not found in the safetensors files ({})",
                self.files
                    .iter()
                    .map(|f| f.path.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }
    }

    /// This rank's part of a 2-D matrix.
    pub fn matrix(
        &self,
        name: &str,
        shape: [usize; 2],
        split: Split,
        opts: &LoadOptions,
    ) -> Result<Tensor> {
        let (file, e) = self.entry(name)?;
        check_shape(&file.path, name, &e.shape, &shape)?;
        let [rows, cols] = shape;
        let elem = e.dtype.size_in_bytes();
        let (r, c) = (split.rows(rows), split.cols(cols));
        let bytes = slice_rows(
            &file.mmap[e.start..e.end],
            cols * elem,
            r.clone(),
            c.start * elem..c.end * elem,
        );
        to_tensor(&bytes, e.dtype, &[r.len(), c.len()], opts)
            .with_context(|| format!("{}: tensor {name}", file.path.display()))
    }

    pub fn dense(&self, name: &str, shape: &[usize], opts: &LoadOptions) -> Result<Tensor> {
        let (file, e) = self.entry(name)?;
        check_shape(&file.path, name, &e.shape, shape)?;
        to_tensor(&file.mmap[e.start..e.end], e.dtype, shape, opts)
            .with_context(|| format!("{}: tensor {name}", file.path.display()))
    }
}

fn to_tensor(bytes: &[u8], dtype: DType, shape: &[usize], opts: &LoadOptions) -> Result<Tensor> {
    let t = Tensor::from_raw_buffer(bytes, dtype, shape, &Device::Cpu)?;
    Ok(t.to_dtype(opts.dtype)?.to_device(&opts.device)?)
}

/// The safetensors files of an HF directory, from the index when there is one.
fn shard_paths(dir: &Path) -> Result<Vec<PathBuf>> {
    let index = dir.join("model.safetensors.index.json");
    if index.exists() {
        #[derive(Deserialize)]
        struct Index {
            weight_map: HashMap<String, String>,
        }
        let text = std::fs::read_to_string(&index)
            .with_context(|| format!("reading {}", index.display()))?;
        let idx: Index =
            serde_json::from_str(&text).with_context(|| format!("parsing {}", index.display()))?;
        let mut files: Vec<String> = idx.weight_map.into_values().collect();
        files.sort();
        files.dedup();
        // A shard is a file of this directory: an index naming `../x` or `/etc/x` would make
        // the worker map a file outside the model.
        if let Some(bad) = files.iter().find(|f| !is_plain_file_name(f)) {
            bail!(
                "{}: weight_map names shard {bad:?}, which is not a file name in the directory",
                index.display()
            );
        }
        return Ok(files.into_iter().map(|f| dir.join(f)).collect());
    }
    let single = dir.join("model.safetensors");
    if single.exists() {
        return Ok(vec![single]);
    }
    bail!(
        "{}: no model.safetensors nor model.safetensors.index.json",
        dir.display()
    )
}

/// A name with exactly one normal path component (no `/`, `..`, root or prefix).
fn is_plain_file_name(name: &str) -> bool {
    let mut parts = Path::new(name).components();
    matches!(
        (parts.next(), parts.next()),
        (Some(std::path::Component::Normal(_)), None)
    )
}

/// Reads the header of a safetensors file held in `data`; every tensor's byte range is checked
/// to hold exactly its shape and to lie inside the file, with arithmetic that cannot overflow.
fn parse_header(data: &[u8]) -> Result<Vec<(String, Entry)>> {
    if data.len() < 8 {
        bail!(
            "file too short for a safetensors header ({} bytes)",
            data.len()
        );
    }
    let mut len8 = [0u8; 8];
    len8.copy_from_slice(&data[..8]);
    let header_len = u64::from_le_bytes(len8);
    let data_start = usize::try_from(header_len)
        .ok()
        .and_then(|n| n.checked_add(8))
        .filter(|&e| e <= data.len())
        .with_context(|| {
            format!(
                "header claims {header_len} bytes but the file has {} (truncated?)",
                data.len()
            )
        })?;
    let header: HashMap<String, serde_json::Value> =
        serde_json::from_slice(&data[8..data_start]).context("parsing the JSON header")?;
    let mut out = Vec::new();
    for (name, v) in header {
        if name == "__metadata__" {
            continue;
        }
        let h: HeaderEntry =
            serde_json::from_value(v).with_context(|| format!("header entry of tensor {name}"))?;
        let entry =
            entry_of(&h, data_start, data.len()).with_context(|| format!("tensor {name}"))?;
        out.push((name, entry));
    }
    Ok(out)
}

/// Checks one header entry against the file: a known dtype, a shape whose byte size is exactly
/// its data range, and that range inside the file's `file_len` bytes.
fn entry_of(h: &HeaderEntry, data_start: usize, file_len: usize) -> Result<Entry> {
    let dtype = match h.dtype.as_str() {
        "F32" => DType::F32,
        "F16" => DType::F16,
        "BF16" => DType::BF16,
        other => bail!("unsupported dtype {other} (F32, F16, BF16 are)"),
    };
    let bytes = h
        .shape
        .iter()
        .try_fold(dtype.size_in_bytes(), |acc, &d| acc.checked_mul(d))
        .with_context(|| format!("the byte size of shape {:?} overflows", h.shape))?;
    let [a, b] = h.data_offsets;
    if b < a || b - a != bytes {
        bail!(
            "data range {a}..{b} does not hold shape {:?} of {} ({bytes} bytes)",
            h.shape,
            h.dtype
        );
    }
    match (data_start.checked_add(a), data_start.checked_add(b)) {
        (Some(start), Some(end)) if end <= file_len => Ok(Entry {
            dtype,
            shape: h.shape.clone(),
            start,
            end,
        }),
        _ => bail!(
            "data range {a}..{b} after the {data_start}-byte header runs past the end of the \
             file ({file_len} bytes; truncated?)"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A safetensors file: the JSON header as given, then `data_len` zero bytes.
    fn file(header: &serde_json::Value, data_len: usize) -> Vec<u8> {
        let h = header.to_string();
        let mut out = (h.len() as u64).to_le_bytes().to_vec();
        out.extend_from_slice(h.as_bytes());
        out.resize(out.len() + data_len, 0);
        out
    }

    /// One F32 tensor `w` of shape [2, 3] at bytes 0..24, with `field` replaced by `value`.
    fn one_tensor(field: &str, value: serde_json::Value) -> serde_json::Value {
        let mut t = serde_json::json!({"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]});
        t[field] = value;
        serde_json::json!({ "__metadata__": {"format": "pt"}, "w": t })
    }

    fn err_of(bytes: &[u8]) -> String {
        helios_gguf::test_util::error_chain(parse_header(bytes))
    }

    #[test]
    fn a_valid_file_parses() {
        let bytes = file(&one_tensor("dtype", "F32".into()), 24);
        let entries = parse_header(&bytes).unwrap();
        let (name, e) = &entries[0];
        assert_eq!((name.as_str(), e.shape.as_slice()), ("w", &[2, 3][..]));
        assert_eq!(e.end - e.start, 24);
        assert_eq!(e.end, bytes.len());
    }

    #[test]
    fn header_length_past_the_end() {
        let mut bytes = file(&one_tensor("dtype", "F32".into()), 24);
        let too_long = bytes.len() as u64;
        bytes[..8].copy_from_slice(&too_long.to_le_bytes());
        assert!(err_of(&bytes).contains("truncated"));
        bytes[..8].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(err_of(&bytes).contains("header claims 18446744073709551615 bytes"));
        assert!(err_of(&[1, 2, 3]).contains("too short"));
    }

    #[test]
    fn data_offsets_past_the_end_or_reversed() {
        let past = one_tensor("data_offsets", serde_json::json!([24, 48]));
        let msg = err_of(&file(&past, 24));
        assert!(
            msg.contains("tensor w") && msg.contains("past the end"),
            "{msg}"
        );
        let reversed = one_tensor("data_offsets", serde_json::json!([24, 0]));
        let msg = err_of(&file(&reversed, 24));
        assert!(msg.contains("tensor w") && msg.contains("24..0"), "{msg}");
        // Offsets that overflow once the header length is added.
        let max = usize::MAX as u64;
        let huge = one_tensor("data_offsets", serde_json::json!([max - 24, max]));
        let mut t = huge;
        t["w"]["shape"] = serde_json::json!([6]);
        let msg = err_of(&file(&t, 24));
        assert!(
            msg.contains("tensor w") && msg.contains("past the end"),
            "{msg}"
        );
    }

    #[test]
    fn shape_products_that_overflow_or_do_not_match() {
        let overflow = one_tensor("shape", serde_json::json!([1u64 << 32, 1u64 << 32, 4]));
        let msg = err_of(&file(&overflow, 24));
        assert!(
            msg.contains("tensor w") && msg.contains("overflows"),
            "{msg}"
        );
        let mismatch = one_tensor("shape", serde_json::json!([2, 4]));
        let msg = err_of(&file(&mismatch, 24));
        assert!(
            msg.contains("tensor w") && msg.contains("does not hold shape [2, 4]"),
            "{msg}"
        );
        // The same bytes read as 2-byte elements are twice as many elements.
        let dtype = one_tensor("dtype", "BF16".into());
        let msg = err_of(&file(&dtype, 24));
        assert!(
            msg.contains("tensor w") && msg.contains("12 bytes"),
            "{msg}"
        );
        let unknown = one_tensor("dtype", "I64".into());
        assert!(err_of(&file(&unknown, 24)).contains("unsupported dtype I64"));
        let negative = one_tensor("shape", serde_json::json!([-1, 3]));
        assert!(err_of(&file(&negative, 24)).contains("header entry of tensor w"));
    }

    #[test]
    fn garbage_headers_are_errors() {
        let mut bytes = 9u64.to_le_bytes().to_vec();
        bytes.extend_from_slice(b"{not json");
        assert!(err_of(&bytes).contains("parsing the JSON header"));
    }

    #[test]
    fn shards_outside_the_directory_are_refused() {
        assert!(is_plain_file_name("model-00001-of-00002.safetensors"));
        for bad in ["../secret", "/etc/passwd", "a/b.safetensors", "..", "", "."] {
            assert!(!is_plain_file_name(bad), "{bad}");
        }
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("model.safetensors.index.json"),
            r#"{"weight_map": {"w": "../../outside.safetensors"}}"#,
        )
        .unwrap();
        let msg = format!("{:#}", shard_paths(dir.path()).unwrap_err());
        assert!(
            msg.contains("outside.safetensors") && msg.contains("index.json"),
            "{msg}"
        );
    }
}
