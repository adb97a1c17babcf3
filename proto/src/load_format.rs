//! Where workers take the weights from (`--load-format`, `InitRequest.load_format`): one enum
//! for the coordinator's flag, the wire and the worker's loader.

use anyhow::{bail, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LoadFormat {
    /// The model's files: a `.gguf` file or an HF directory of safetensors.
    #[default]
    Auto,
    /// Random weights of the shapes the model's `config.json` gives (benchmarks, profiling and
    /// memory checks without the weights), as vLLM's dummy format.
    Dummy,
}

impl LoadFormat {
    /// The name on the wire and the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::Dummy => "dummy",
        }
    }

    /// [`Self::as_str`]'s names; empty (a coordinator that does not send one) is `auto`.
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "" | "auto" => Ok(Self::Auto),
            "dummy" => Ok(Self::Dummy),
            other => bail!("unknown load format {other:?} (auto or dummy)"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_read_back_and_unknown_ones_are_refused() {
        for f in [LoadFormat::Auto, LoadFormat::Dummy] {
            assert_eq!(LoadFormat::parse(f.as_str()).unwrap(), f);
        }
        assert_eq!(LoadFormat::parse("").unwrap(), LoadFormat::Auto);
        assert!(LoadFormat::parse("pt").is_err());
    }
}
