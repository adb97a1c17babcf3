//! Incremental detokenization: the text that each new token adds, as it arrives.
//!
//! Decoding a token alone is wrong for byte-level BPE (a character can span tokens) and for
//! SentencePiece (a word's leading space depends on what precedes it). As in TGI and vLLM, the
//! text delta is the difference between decoding a short window of recent tokens with and
//! without the new ones; while the window ends in an incomplete UTF-8 character (decoded as
//! U+FFFD) nothing is emitted, so a character is never split. Each step decodes only the
//! window, not the whole output.

use anyhow::Result;

use crate::tokenizer::TextTokenizer;

#[derive(Debug, Default)]
pub struct Detokenizer {
    ids: Vec<u32>,
    /// Start of the context window decoded for the previous text.
    prefix_offset: usize,
    /// End of what has been emitted.
    read_offset: usize,
}

impl Detokenizer {
    /// Starts after `context` (e.g. the prompt), whose text is not emitted.
    pub fn new(context: &[u32]) -> Self {
        // A few tokens of context are enough to decide leading spaces.
        let keep = context.len().min(6);
        let ids = context[context.len() - keep..].to_vec();
        Self {
            prefix_offset: 0,
            read_offset: ids.len(),
            ids,
        }
    }

    /// Adds a token; returns the text it completes (possibly empty).
    pub fn push(&mut self, tok: &TextTokenizer, id: u32) -> Result<String> {
        self.ids.push(id);
        let prefix = tok.decode(&self.ids[self.prefix_offset..self.read_offset])?;
        let full = tok.decode(&self.ids[self.prefix_offset..])?;
        if full.len() > prefix.len()
            && !full.ends_with('\u{FFFD}')
            && full.is_char_boundary(prefix.len())
        {
            let delta = full[prefix.len()..].to_string();
            self.prefix_offset = self.read_offset;
            self.read_offset = self.ids.len();
            Ok(delta)
        } else {
            Ok(String::new())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tokenizer::tests::smollm2;

    #[test]
    fn deltas_concatenate_to_the_full_decode_and_never_split_characters() {
        let tok = smollm2();
        let prompt = tok.encode("Say:").unwrap();
        for text in [
            "café naïve 日本語のテキスト emoji 🦀🚀 done",
            "  spaced\n\n  lines\tand 12345",
        ] {
            let ids = tok.encode(text).unwrap();
            let mut d = Detokenizer::new(&prompt);
            let mut out = String::new();
            for &id in &ids {
                let delta = d.push(tok, id).unwrap();
                assert!(!delta.contains('\u{FFFD}'), "split character in {delta:?}");
                out.push_str(&delta);
            }
            assert_eq!(out, tok.decode(&ids).unwrap());
        }
    }
}
