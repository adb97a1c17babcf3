//! The bytes a token stands for, read from its vocabulary entry: what a logprob shows of a token
//! (OpenAI's `bytes`) and what a grammar matches a token by (structured outputs) are the same.
//!
//! Decoding one token alone does not give them: with byte-level BPE (GPT-2, Llama 3, SmolLM2) a
//! token may be part of a UTF-8 character, which decodes to U+FFFD. The entry's spelling does:
//! byte-level entries write each byte as a character of GPT-2's table
//! ([`super::gguf::byte_to_unicode`]), SentencePiece entries a space as `▁` and, with byte
//! fallback, a lone byte as `<0xNN>`.

use std::collections::HashMap;

/// How a vocabulary spells bytes, read from the tokenizer's decoder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Spelling {
    ByteLevel,
    /// SentencePiece: `space` stands for a space; with `byte_fallback`, `<0xNN>` for a byte.
    Pieces {
        space: char,
        byte_fallback: bool,
    },
    /// Entries are their text.
    Plain,
}

/// Reads token entries as bytes (see the module docs).
#[derive(Debug, Clone)]
pub struct TokenSpeller {
    spelling: Spelling,
    unicode_to_byte: HashMap<char, u8>,
}

impl TokenSpeller {
    pub fn new(tok: &tokenizers::Tokenizer) -> Self {
        Self {
            spelling: spelling(tok),
            unicode_to_byte: (0..=255u8)
                .map(|b| (super::gguf::byte_to_unicode(b), b))
                .collect(),
        }
    }

    pub fn spelling(&self) -> Spelling {
        self.spelling
    }

    /// The bytes of vocabulary entry `entry`; empty when a byte-level entry holds a character
    /// outside the table (it cannot be decoded either).
    pub fn bytes(&self, entry: &str) -> Vec<u8> {
        match self.spelling {
            Spelling::ByteLevel => entry
                .chars()
                .map(|c| self.unicode_to_byte.get(&c).copied())
                .collect::<Option<Vec<u8>>>()
                .unwrap_or_default(),
            Spelling::Pieces {
                space,
                byte_fallback,
            } => {
                let hex = entry
                    .strip_prefix("<0x")
                    .and_then(|h| h.strip_suffix('>'))
                    .filter(|h| byte_fallback && h.len() == 2);
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(b) => vec![b],
                    None => entry.replace(space, " ").into_bytes(),
                }
            }
            Spelling::Plain => entry.as_bytes().to_vec(),
        }
    }
}

fn spelling(tok: &tokenizers::Tokenizer) -> Spelling {
    // The decoder's JSON: its types are public there, whatever the crate's accessors are.
    let Some(json) = tok.get_decoder().and_then(|d| serde_json::to_value(d).ok()) else {
        return Spelling::Plain;
    };
    let mut parts = vec![&json];
    if let Some(seq) = json.get("decoders").and_then(|d| d.as_array()) {
        parts.extend(seq.iter());
    }
    let of_type = |t: &str| parts.iter().find(|p| p["type"] == t);
    if of_type("ByteLevel").is_some() {
        return Spelling::ByteLevel;
    }
    if of_type("ByteFallback").is_some() {
        let space = parts
            .iter()
            .filter(|p| p["type"] == "Replace" && p["content"] == " ")
            .find_map(|p| p["pattern"]["String"].as_str()?.chars().next())
            .unwrap_or('▁');
        return Spelling::Pieces {
            space,
            byte_fallback: true,
        };
    }
    if let Some(m) = of_type("Metaspace") {
        let space = m["replacement"]
            .as_str()
            .and_then(|r| r.chars().next())
            .unwrap_or('▁');
        return Spelling::Pieces {
            space,
            byte_fallback: false,
        };
    }
    Spelling::Plain
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sentencepiece_spelling_maps_spaces_and_bytes() {
        let sp = |byte_fallback| TokenSpeller {
            spelling: Spelling::Pieces {
                space: '▁',
                byte_fallback,
            },
            unicode_to_byte: HashMap::new(),
        };
        assert_eq!(sp(true).bytes("▁Paris"), b" Paris");
        assert_eq!(sp(true).bytes("<0x0A>"), b"\n");
        assert_eq!(sp(true).bytes("<0xZZ>"), b"<0xZZ>");
        assert_eq!(sp(false).bytes("<0x0A>"), b"<0x0A>", "no byte fallback");
    }
}
