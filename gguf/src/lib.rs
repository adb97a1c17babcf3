//! A GGUF header reader that trusts nothing the file says.
//!
//! Both the worker (weights) and the coordinator (tokenizer metadata) read GGUF headers, and a
//! model file is input from outside: a corrupt or hostile file must give an error naming the
//! metadata key or tensor at fault, never a panic and never an allocation sized by a number read
//! from the file. So every count and length is checked against the bytes left in the file before
//! anything is allocated or looped over, tensor shapes and byte ranges are computed with checked
//! arithmetic, and every tensor's data must lie inside the file.
//!
//! The result is candle's [`Content`], the same type `candle_core::quantized::gguf_file` produces,
//! so code downstream of the header is unchanged. (candle's own reader bounds allocations too,
//! but its errors name neither key nor tensor and a `general.alignment` of 0 makes it divide by
//! zero.)

use std::collections::HashMap;
use std::fmt::Display;
use std::fs::File;
use std::io::{BufReader, Read};
use std::ops::Range;
use std::path::Path;

use anyhow::{bail, Context, Result};
use candle_core::quantized::GgmlDType;

pub use candle_core::quantized::gguf_file::{Content, TensorInfo, Value, VersionedMagic};

#[cfg(any(test, feature = "test-util"))]
pub mod test_util;

/// Longest string accepted (llama.cpp's `GGUF_MAX_STRING_LENGTH`).
pub const MAX_STRING_LEN: u64 = 1 << 30;
/// Most elements of one metadata array (llama.cpp's `GGUF_MAX_ARRAY_ELEMENTS`).
pub const MAX_ARRAY_LEN: u64 = 1 << 30;
/// Most dimensions of one tensor (ggml's `GGML_MAX_DIMS`).
pub const MAX_DIMS: u32 = 4;
/// Deepest nesting of arrays in arrays: bounds the reader's recursion.
const MAX_DEPTH: usize = 16;
/// Alignment of the tensor data when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// The metadata key that sets the alignment of the tensor data.
pub const KEY_ALIGNMENT: &str = "general.alignment";

/// GGUF metadata value types, as numbered in the file.
const T_U8: u32 = 0;
const T_I8: u32 = 1;
const T_U16: u32 = 2;
const T_I16: u32 = 3;
const T_U32: u32 = 4;
const T_I32: u32 = 5;
const T_F32: u32 = 6;
const T_BOOL: u32 = 7;
const T_STRING: u32 = 8;
const T_ARRAY: u32 = 9;
const T_U64: u32 = 10;
const T_I64: u32 = 11;
const T_F64: u32 = 12;

/// Reads the header of the GGUF file at `path`; errors name the file.
pub fn read_path(path: &Path) -> Result<Content> {
    let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let len = file
        .metadata()
        .with_context(|| format!("reading the size of {}", path.display()))?
        .len();
    read(BufReader::new(file), len)
        .with_context(|| format!("{}: not a readable GGUF file", path.display()))
}

/// Reads a GGUF header from `reader`, positioned at the start of a file of `file_len` bytes.
pub fn read<R: Read>(reader: R, file_len: u64) -> Result<Content> {
    let mut src = Source {
        reader,
        pos: 0,
        len: file_len,
        v1: false,
    };
    let magic = src.fixed::<4>().context("magic")?;
    if &magic != b"GGUF" {
        bail!("not a GGUF file (magic {magic:02x?}, expected \"GGUF\")");
    }
    let magic = match src.u32().context("version")? {
        1 => VersionedMagic::GgufV1,
        2 => VersionedMagic::GgufV2,
        3 => VersionedMagic::GgufV3,
        v => bail!("unsupported GGUF version {v} (1, 2 and 3 are)"),
    };
    src.v1 = magic == VersionedMagic::GgufV1;
    let tensor_count = src.count().context("tensor count")?;
    let kv_count = src.count().context("metadata count")?;
    // A metadata entry takes at least a key length, a type and one byte; a tensor entry a name
    // length, a dimension count, a type and an offset.
    let prefix = src.prefix_len();
    src.check_count(kv_count, prefix + 4 + 1, "metadata count")?;
    src.check_count(tensor_count, prefix + 4 + 4 + 8, "tensor count")?;

    let metadata = read_metadata(&mut src, kv_count)?;
    let tensor_infos = read_tensor_infos(&mut src, tensor_count)?;
    let alignment = alignment(&metadata)?;
    let tensor_data_offset = src
        .pos
        .div_ceil(alignment)
        .checked_mul(alignment)
        .with_context(|| format!("`{KEY_ALIGNMENT}` {alignment} puts the tensor data past 2^64"))?;
    let content = Content {
        magic,
        metadata,
        tensor_infos,
        tensor_data_offset,
    };
    for name in content.tensor_infos.keys() {
        tensor_range(&content, name, file_len)?;
    }
    Ok(content)
}

/// The byte range of tensor `name`'s data in a file of `file_len` bytes; an error when it does
/// not fit in the file (or in the address space).
pub fn tensor_range(content: &Content, name: &str, file_len: u64) -> Result<Range<usize>> {
    let info = content
        .tensor_infos
        .get(name)
        .with_context(|| format!("tensor `{name}` not found"))?;
    let size = tensor_size(info).with_context(|| format!("tensor `{name}`"))?;
    let start = content.tensor_data_offset.checked_add(info.offset);
    let end = start.and_then(|s| s.checked_add(size));
    match (start, end) {
        (Some(start), Some(end)) if end <= file_len => {
            let to_usize = |v: u64| usize::try_from(v).ok();
            match (to_usize(start), to_usize(end)) {
                (Some(s), Some(e)) => Ok(s..e),
                _ => {
                    bail!("tensor `{name}`: bytes {start}..{end} are beyond this platform's reach")
                }
            }
        }
        _ => bail!(
            "tensor `{name}`: its {size} bytes at offset {} (+ data start {}) run past the end \
             of the file ({file_len} bytes; truncated?)",
            info.offset,
            content.tensor_data_offset
        ),
    }
}

/// The number of bytes of a tensor's data: whole blocks of its type, computed without overflow.
pub fn tensor_size(info: &TensorInfo) -> Result<u64> {
    let dims = info.shape.dims();
    let dtype = info.ggml_dtype;
    tensor_size_of(dims.iter().map(|&d| d as u64), dtype)
}

/// [`tensor_size`] of dims (any order) and a type.
fn tensor_size_of(dims: impl Iterator<Item = u64>, dtype: GgmlDType) -> Result<u64> {
    let mut elems: u64 = 1;
    let mut shown = Vec::new();
    for d in dims {
        shown.push(d);
        elems = elems.checked_mul(d).with_context(|| {
            format!("the element count of shape {shown:?}... overflows 64 bits")
        })?;
    }
    let bs = dtype.block_size() as u64;
    if !elems.is_multiple_of(bs) {
        bail!("{elems} elements are not a whole number of {dtype:?} blocks of {bs}");
    }
    (elems / bs)
        .checked_mul(dtype.type_size() as u64)
        .with_context(|| format!("the byte size of {elems} {dtype:?} elements overflows 64 bits"))
}

/// `general.alignment`: a non-zero power of two (the tensor data offset is rounded up to it).
fn alignment(metadata: &HashMap<String, Value>) -> Result<u64> {
    let v = match metadata.get(KEY_ALIGNMENT) {
        None => return Ok(DEFAULT_ALIGNMENT),
        Some(Value::U8(v)) => u64::from(*v),
        Some(Value::U16(v)) => u64::from(*v),
        Some(Value::U32(v)) => u64::from(*v),
        Some(Value::U64(v)) => *v,
        Some(Value::I8(v)) => u64::try_from(*v).unwrap_or(0),
        Some(Value::I16(v)) => u64::try_from(*v).unwrap_or(0),
        Some(Value::I32(v)) => u64::try_from(*v).unwrap_or(0),
        Some(other) => bail!(
            "`{KEY_ALIGNMENT}` should be an integer, found {:?}",
            other.value_type()
        ),
    };
    if !v.is_power_of_two() {
        bail!("`{KEY_ALIGNMENT}` is {v}, not a power of two");
    }
    Ok(v)
}

fn read_metadata<R: Read>(src: &mut Source<R>, count: u64) -> Result<HashMap<String, Value>> {
    let mut metadata = HashMap::new();
    for i in 0..count {
        let key = src
            .string()
            .with_context(|| format!("metadata entry #{i}: key"))?;
        let value = src
            .u32()
            .and_then(|ty| src.value(ty, 0))
            .with_context(|| format!("metadata `{key}`"))?;
        if metadata.contains_key(&key) {
            bail!("metadata `{key}` appears twice");
        }
        metadata.insert(key, value);
    }
    Ok(metadata)
}

fn read_tensor_infos<R: Read>(
    src: &mut Source<R>,
    count: u64,
) -> Result<HashMap<String, TensorInfo>> {
    let mut infos = HashMap::new();
    for i in 0..count {
        let name = src
            .string()
            .with_context(|| format!("tensor entry #{i}: name"))?;
        let info = src
            .tensor_info()
            .with_context(|| format!("tensor `{name}`"))?;
        if infos.contains_key(&name) {
            bail!("tensor `{name}` appears twice");
        }
        infos.insert(name, info);
    }
    Ok(infos)
}

/// The ggml tensor types candle can hold (ggml's numbering).
fn ggml_dtype(v: u32) -> Result<GgmlDType> {
    Ok(match v {
        0 => GgmlDType::F32,
        1 => GgmlDType::F16,
        2 => GgmlDType::Q4_0,
        3 => GgmlDType::Q4_1,
        6 => GgmlDType::Q5_0,
        7 => GgmlDType::Q5_1,
        8 => GgmlDType::Q8_0,
        9 => GgmlDType::Q8_1,
        10 => GgmlDType::Q2K,
        11 => GgmlDType::Q3K,
        12 => GgmlDType::Q4K,
        13 => GgmlDType::Q5K,
        14 => GgmlDType::Q6K,
        15 => GgmlDType::Q8K,
        30 => GgmlDType::BF16,
        other => bail!("unsupported tensor type {other}"),
    })
}

/// A reader that knows how many bytes the file has left.
struct Source<R> {
    reader: R,
    pos: u64,
    len: u64,
    /// GGUF v1 writes counts and lengths as u32, later versions as u64.
    v1: bool,
}

impl<R: Read> Source<R> {
    fn remaining(&self) -> u64 {
        self.len.saturating_sub(self.pos)
    }

    fn prefix_len(&self) -> u64 {
        if self.v1 {
            4
        } else {
            8
        }
    }

    /// Fails unless `count` items of at least `min_size` bytes each fit in what is left.
    fn check_count(&self, count: u64, min_size: u64, what: impl Display) -> Result<()> {
        let left = self.remaining();
        if count.checked_mul(min_size).is_none_or(|n| n > left) {
            bail!(
                "{what} {count} cannot fit in the {left} bytes left in the file \
                 (each takes at least {min_size})"
            );
        }
        Ok(())
    }

    fn read_into(&mut self, buf: &mut [u8]) -> Result<()> {
        let n = buf.len() as u64;
        if n > self.remaining() {
            bail!(
                "needs {n} bytes at offset {} but the file ends at {}",
                self.pos,
                self.len
            );
        }
        self.reader
            .read_exact(buf)
            .with_context(|| format!("reading {n} bytes at offset {}", self.pos))?;
        self.pos += n;
        Ok(())
    }

    fn fixed<const N: usize>(&mut self) -> Result<[u8; N]> {
        let mut b = [0u8; N];
        self.read_into(&mut b)?;
        Ok(b)
    }

    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.fixed()?))
    }

    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.fixed()?))
    }

    /// A count or length: u32 in v1, u64 later.
    fn count(&mut self) -> Result<u64> {
        if self.v1 {
            self.u32().map(u64::from)
        } else {
            self.u64()
        }
    }

    fn string(&mut self) -> Result<String> {
        let len = self.count()?;
        if len > MAX_STRING_LEN {
            bail!("string length {len} exceeds the limit of {MAX_STRING_LEN}");
        }
        if len > self.remaining() {
            bail!(
                "string length {len} runs past the end of the file ({} bytes left)",
                self.remaining()
            );
        }
        // In bounds of the file, so the allocation is bounded by what was really stored.
        let mut v = vec![0u8; len as usize];
        self.read_into(&mut v)?;
        // As candle: strings should not be NUL-terminated but some are, and some are not UTF-8.
        while v.last() == Some(&0) {
            v.pop();
        }
        Ok(String::from_utf8_lossy(&v).into_owned())
    }

    fn value(&mut self, ty: u32, depth: usize) -> Result<Value> {
        Ok(match ty {
            T_U8 => Value::U8(self.fixed::<1>()?[0]),
            T_I8 => Value::I8(i8::from_le_bytes(self.fixed()?)),
            T_U16 => Value::U16(u16::from_le_bytes(self.fixed()?)),
            T_I16 => Value::I16(i16::from_le_bytes(self.fixed()?)),
            T_U32 => Value::U32(self.u32()?),
            T_I32 => Value::I32(i32::from_le_bytes(self.fixed()?)),
            T_F32 => Value::F32(f32::from_le_bytes(self.fixed()?)),
            T_U64 => Value::U64(self.u64()?),
            T_I64 => Value::I64(i64::from_le_bytes(self.fixed()?)),
            T_F64 => Value::F64(f64::from_le_bytes(self.fixed()?)),
            T_BOOL => match self.fixed::<1>()?[0] {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => bail!("bool value {b} is neither 0 nor 1"),
            },
            T_STRING => Value::String(self.string()?),
            T_ARRAY => self.array(depth)?,
            other => bail!("unknown value type {other}"),
        })
    }

    fn array(&mut self, depth: usize) -> Result<Value> {
        if depth >= MAX_DEPTH {
            bail!("arrays nested deeper than {MAX_DEPTH}");
        }
        let ty = self.u32().context("array element type")?;
        let len = self.count().context("array length")?;
        let min_size = match ty {
            T_U8 | T_I8 | T_BOOL => 1,
            T_U16 | T_I16 => 2,
            T_U32 | T_I32 | T_F32 => 4,
            T_U64 | T_I64 | T_F64 => 8,
            T_STRING => self.prefix_len(),
            T_ARRAY => 4 + self.prefix_len(),
            other => bail!("unknown array element type {other}"),
        };
        if len > MAX_ARRAY_LEN {
            bail!("array length {len} exceeds the limit of {MAX_ARRAY_LEN}");
        }
        self.check_count(len, min_size, "array length")?;
        // No capacity up front: the vector grows only with elements actually read.
        let mut items = Vec::new();
        for i in 0..len {
            let item = self
                .value(ty, depth + 1)
                .with_context(|| format!("element #{i}"))?;
            items.push(item);
        }
        Ok(Value::Array(items))
    }

    fn tensor_info(&mut self) -> Result<TensorInfo> {
        let n_dims = self.u32().context("dimension count")?;
        if n_dims > MAX_DIMS {
            bail!("{n_dims} dimensions, at most {MAX_DIMS} are allowed");
        }
        // ggml order: the innermost (contiguous) dimension first.
        let mut dims = Vec::with_capacity(n_dims as usize);
        for _ in 0..n_dims {
            dims.push(if self.v1 {
                u64::from(self.u32()?)
            } else {
                self.u64()?
            });
        }
        let ty = self.u32().context("type")?;
        let ggml_dtype = ggml_dtype(ty)?;
        let offset = self.u64().context("offset")?;
        tensor_size_of(dims.iter().copied(), ggml_dtype)?;
        let bs = ggml_dtype.block_size() as u64;
        if let Some(&inner) = dims.first() {
            if !inner.is_multiple_of(bs) {
                bail!("rows of {inner} elements are not whole {ggml_dtype:?} blocks of {bs}");
            }
        }
        let mut shape = Vec::with_capacity(dims.len());
        for &d in dims.iter().rev() {
            shape.push(usize::try_from(d).with_context(|| format!("dimension {d} too large"))?);
        }
        Ok(TensorInfo {
            ggml_dtype,
            shape: shape.into(),
            offset,
        })
    }
}

#[cfg(test)]
mod tests;
