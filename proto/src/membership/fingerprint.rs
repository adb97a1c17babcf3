//! A cheap content fingerprint of a model, so that the ranks of one replica can check they
//! load the same weights even when their paths differ (other machines, other mounts).
//!
//! It is a *fingerprint*, not a checksum: it hashes each weight file's size and a sample of
//! its content (the first MiB, the last MiB and 16 evenly spaced 64 KiB windows; all of it
//! when the file is smaller than that), about 3 MiB per file whatever its size. Hashing every
//! byte of a 20 GB model would cost minutes of disk reads at every worker start; the sample
//! still tells apart different models, quantizations, shards and truncated copies, which is
//! what it is for. It is not a defence against someone crafting a look-alike file.
//!
//! The hash is 64-bit FNV-1a, written out here so the value is the same in every build and on
//! every machine (std's `DefaultHasher` promises neither). Each piece is framed with its
//! length, so no two different inputs concatenate to the same stream.
//!
//! For a Hugging Face directory it covers `config.json`, `model.safetensors.index.json` if
//! present, and the name, size and sampled content of every `*.safetensors` file, in sorted
//! order; for a single file (GGUF, one safetensors file) that file.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use anyhow::{bail, Context, Result};

/// The version tag of the format: bump it if what is hashed changes.
const FORMAT: &str = "fp1";

const HEAD_BYTES: u64 = 1 << 20;
const TAIL_BYTES: u64 = 1 << 20;
const WINDOWS: u64 = 16;
const WINDOW_BYTES: u64 = 64 << 10;

/// 64-bit FNV-1a: tiny, well known, and stable everywhere.
struct Fnv1a(u64);

impl Fnv1a {
    fn new() -> Fnv1a {
        Fnv1a(0xcbf2_9ce4_8422_2325)
    }

    fn bytes(&mut self, data: &[u8]) {
        for &b in data {
            self.0 ^= u64::from(b);
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }

    fn u64(&mut self, v: u64) {
        self.bytes(&v.to_le_bytes());
    }

    /// A length-prefixed piece.
    fn piece(&mut self, data: &[u8]) {
        self.u64(data.len() as u64);
        self.bytes(data);
    }
}

/// `fp1-<16 hex digits>`: the fingerprint of the model at `path` (a file, or a Hugging Face
/// model directory). Errors name the path that could not be read.
pub fn model_fingerprint(path: &Path) -> Result<String> {
    let meta = std::fs::metadata(path)
        .with_context(|| format!("fingerprinting the model {}", path.display()))?;
    let mut h = Fnv1a::new();
    h.piece(FORMAT.as_bytes());
    if meta.is_dir() {
        directory(&mut h, path)?;
    } else {
        h.piece(b"file");
        sampled_file(&mut h, path)?;
    }
    Ok(format!("{FORMAT}-{:016x}", h.0))
}

fn directory(h: &mut Fnv1a, dir: &Path) -> Result<()> {
    h.piece(b"dir");
    let config = dir.join("config.json");
    if !config.is_file() {
        bail!(
            "fingerprinting the model {}: no config.json (not a Hugging Face model directory)",
            dir.display()
        );
    }
    whole_file(h, "config.json", &config)?;
    let index = dir.join("model.safetensors.index.json");
    if index.is_file() {
        whole_file(h, "model.safetensors.index.json", &index)?;
    }
    let mut shards = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let entry = entry.with_context(|| format!("listing {}", dir.display()))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.ends_with(".safetensors") {
            shards.push(name);
        }
    }
    shards.sort();
    for name in shards {
        h.piece(name.as_bytes());
        sampled_file(h, &dir.join(&name))?;
    }
    Ok(())
}

fn whole_file(h: &mut Fnv1a, name: &str, path: &Path) -> Result<()> {
    let data = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    h.piece(name.as_bytes());
    h.piece(&data);
    Ok(())
}

/// The (offset, length) windows sampled from a file of `size` bytes.
fn windows(size: u64) -> Vec<(u64, u64)> {
    if size <= HEAD_BYTES + TAIL_BYTES + WINDOWS * WINDOW_BYTES {
        return vec![(0, size)];
    }
    let mut w = vec![(0, HEAD_BYTES)];
    // Evenly spaced between the head and the tail, the first right after the head, the last
    // right before the tail.
    let span = size - HEAD_BYTES - TAIL_BYTES - WINDOW_BYTES;
    for i in 0..WINDOWS {
        w.push((HEAD_BYTES + span * i / (WINDOWS - 1), WINDOW_BYTES));
    }
    w.push((size - TAIL_BYTES, TAIL_BYTES));
    w
}

fn sampled_file(h: &mut Fnv1a, path: &Path) -> Result<()> {
    let mut read = || -> Result<()> {
        let mut f = File::open(path)?;
        let size = f.metadata()?.len();
        h.u64(size);
        let mut buf = Vec::new();
        for (offset, len) in windows(size) {
            buf.resize(len as usize, 0);
            f.seek(SeekFrom::Start(offset))?;
            f.read_exact(&mut buf)?;
            h.u64(offset);
            h.piece(&buf);
        }
        Ok(())
    };
    read().with_context(|| format!("reading {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| {
                (i as u64)
                    .wrapping_mul(2654435761)
                    .wrapping_add(seed as u64) as u8
            })
            .collect()
    }

    fn fp_of(bytes: &[u8]) -> String {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.gguf");
        std::fs::write(&p, bytes).unwrap();
        model_fingerprint(&p).unwrap()
    }

    #[test]
    fn fnv1a_matches_the_reference_values() {
        // From the FNV reference test vectors.
        let mut h = Fnv1a::new();
        assert_eq!(h.0, 0xcbf29ce484222325);
        h.bytes(b"a");
        assert_eq!(h.0, 0xaf63dc4c8601ec8c);
        let mut h = Fnv1a::new();
        h.bytes(b"foobar");
        assert_eq!(h.0, 0x85944171f73967e8);
    }

    #[test]
    fn windows_cover_head_tail_and_spread() {
        assert_eq!(windows(10), vec![(0, 10)]);
        let size = 100 << 20;
        let w = windows(size);
        assert_eq!(w.len(), 18);
        assert_eq!(w[0], (0, HEAD_BYTES));
        assert_eq!(w[1], (HEAD_BYTES, WINDOW_BYTES));
        assert_eq!(w[16], (size - TAIL_BYTES - WINDOW_BYTES, WINDOW_BYTES));
        assert_eq!(w[17], (size - TAIL_BYTES, TAIL_BYTES));
    }

    #[test]
    fn same_bytes_same_fingerprint_changed_sample_different() {
        let big = data(8 << 20, 1);
        let fp = fp_of(&big);
        assert!(fp.starts_with("fp1-") && fp.len() == 20, "{fp}");
        assert_eq!(fp_of(&big), fp, "same bytes, another file");

        // One byte inside a sampled middle window.
        let (offset, _) = windows(big.len() as u64)[8];
        let mut changed = big.clone();
        changed[offset as usize + 100] ^= 1;
        assert_ne!(fp_of(&changed), fp);

        // One byte in the head, one in the tail.
        let mut changed = big.clone();
        changed[10] ^= 1;
        assert_ne!(fp_of(&changed), fp);
        let mut changed = big.clone();
        let last = changed.len() - 1;
        changed[last] ^= 1;
        assert_ne!(fp_of(&changed), fp);

        // A different size (same prefix).
        assert_ne!(fp_of(&big[..big.len() - 1]), fp);
        // Small files are hashed whole.
        assert_ne!(fp_of(b"abc"), fp_of(b"abd"));
    }

    #[test]
    fn directories_cover_config_and_shards() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::write(d.join("config.json"), b"{\"a\":1}").unwrap();
        std::fs::write(d.join("model-00001.safetensors"), data(5000, 1)).unwrap();
        std::fs::write(d.join("model-00002.safetensors"), data(5000, 2)).unwrap();
        std::fs::write(d.join("README.md"), b"ignored").unwrap();
        let fp = model_fingerprint(d).unwrap();
        assert_eq!(model_fingerprint(d).unwrap(), fp);

        std::fs::write(d.join("README.md"), b"still ignored").unwrap();
        assert_eq!(model_fingerprint(d).unwrap(), fp);

        std::fs::write(d.join("model-00002.safetensors"), data(5000, 3)).unwrap();
        let fp2 = model_fingerprint(d).unwrap();
        assert_ne!(fp2, fp);

        std::fs::write(d.join("config.json"), b"{\"a\":2}").unwrap();
        let fp3 = model_fingerprint(d).unwrap();
        assert_ne!(fp3, fp2);

        std::fs::write(d.join("model.safetensors.index.json"), b"{}").unwrap();
        assert_ne!(model_fingerprint(d).unwrap(), fp3);

        std::fs::remove_file(d.join("config.json")).unwrap();
        let e = model_fingerprint(d).unwrap_err().to_string();
        assert!(e.contains("config.json"), "{e}");
    }

    #[test]
    fn a_missing_path_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("no-such-model.gguf");
        let e = format!("{:#}", model_fingerprint(&missing).unwrap_err());
        assert!(e.contains("no-such-model.gguf"), "{e}");
    }
}
