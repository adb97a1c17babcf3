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

fn parse_header(data: &[u8]) -> Result<Vec<(String, Entry)>> {
    if data.len() < 8 {
        bail!(
            "file too short for a safetensors header ({} bytes)",
            data.len()
        );
    }
    let mut len8 = [0u8; 8];
    len8.copy_from_slice(&data[..8]);
    let header_len = u64::from_le_bytes(len8) as usize;
    let data_start = 8usize
        .checked_add(header_len)
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
        let dtype = match h.dtype.as_str() {
            "F32" => DType::F32,
            "F16" => DType::F16,
            "BF16" => DType::BF16,
            other => bail!("tensor {name}: unsupported dtype {other} (F32, F16, BF16 are)"),
        };
        let [a, b] = h.data_offsets;
        let numel: usize = h.shape.iter().product();
        if b < a || b - a != numel * dtype.size_in_bytes() {
            bail!(
                "tensor {name}: data range {a}..{b} does not hold shape {:?} of {}",
                h.shape,
                h.dtype
            );
        }
        let (start, end) = (data_start + a, data_start + b);
        if end > data.len() {
            bail!(
                "tensor {name} ends at byte {end} but the file has {} bytes (truncated?)",
                data.len()
            );
        }
        out.push((
            name,
            Entry {
                dtype,
                shape: h.shape,
                start,
                end,
            },
        ));
    }
    Ok(out)
}
