//! The bytes each token stands for, which a grammar engine needs to know which tokens can
//! continue a text: llguidance walks a trie of them (`TokTrie`) to compute a mask.
//!
//! A tokenizer's vocabulary holds token *strings* in its model's own spelling, so the bytes
//! depend on the decoder:
//! - byte-level BPE (GPT-2, SmolLM2, Llama 3): each character stands for one byte through
//!   GPT-2's byte-to-unicode table;
//! - SentencePiece with byte fallback (Llama 2, SOLAR): `▁` is a space and `<0xNN>` is byte NN;
//! - anything else (the placeholder tokenizer of dummy weights): the string's UTF-8.
//!
//! Special tokens (`<|im_end|>`, `</s>`) start with `TokTrie::SPECIAL_TOKEN_MARKER`, so that
//! no text can spell them: a grammar allows them only by name, and EOS when it is complete.

use std::collections::HashMap;

use anyhow::{bail, Result};
use llguidance::toktrie::TokTrie;

/// How the tokenizer's decoder turns token strings into bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Spelling {
    ByteLevel,
    /// SentencePiece: this character is a space, `<0xNN>` a byte.
    ByteFallback(char),
    Plain,
}

/// Token `id`'s bytes for ids `0 .. vocab_size` (the model's; ids the tokenizer lacks get no
/// bytes, so a grammar never allows them).
pub fn token_bytes(tok: &tokenizers::Tokenizer, vocab_size: usize) -> Result<Vec<Vec<u8>>> {
    let spelling = spelling(tok)?;
    let specials: HashMap<u32, String> = tok
        .get_added_tokens_decoder()
        .into_iter()
        .filter(|(_, t)| t.special)
        .map(|(id, t)| (id, t.content))
        .collect();
    let unicode_to_byte: HashMap<char, u8> = byte_to_unicode()
        .into_iter()
        .enumerate()
        .map(|(b, c)| (c, b as u8))
        .collect();
    let mut out = Vec::with_capacity(vocab_size);
    for id in 0..vocab_size as u32 {
        let bytes = if let Some(name) = specials.get(&id) {
            let mut b = vec![TokTrie::SPECIAL_TOKEN_MARKER];
            b.extend_from_slice(name.as_bytes());
            b
        } else if let Some(s) = tok.id_to_token(id) {
            spell(&s, spelling, &unicode_to_byte)
        } else {
            Vec::new()
        };
        out.push(bytes);
    }
    Ok(out)
}

fn spelling(tok: &tokenizers::Tokenizer) -> Result<Spelling> {
    // The decoder's JSON: its types are public there, whatever the crate's accessors are.
    let Some(decoder) = tok.get_decoder() else {
        return Ok(Spelling::Plain);
    };
    let json = serde_json::to_value(decoder)?;
    let mut parts = vec![&json];
    if let Some(seq) = json.get("decoders").and_then(|d| d.as_array()) {
        parts.extend(seq.iter());
    }
    let of_type = |t: &str| parts.iter().find(|p| p["type"] == t);
    if of_type("ByteLevel").is_some() {
        return Ok(Spelling::ByteLevel);
    }
    if of_type("ByteFallback").is_some() {
        let space = parts
            .iter()
            .filter(|p| p["type"] == "Replace" && p["content"] == " ")
            .find_map(|p| p["pattern"]["String"].as_str()?.chars().next())
            .unwrap_or('▁');
        return Ok(Spelling::ByteFallback(space));
    }
    if of_type("Metaspace").is_some() {
        bail!("a Metaspace decoder without byte fallback is not supported for structured outputs");
    }
    Ok(Spelling::Plain)
}

fn spell(s: &str, spelling: Spelling, unicode_to_byte: &HashMap<char, u8>) -> Vec<u8> {
    match spelling {
        // A character outside the table cannot be decoded either: the token gets no bytes.
        Spelling::ByteLevel => s
            .chars()
            .map(|c| unicode_to_byte.get(&c).copied())
            .collect::<Option<Vec<u8>>>()
            .unwrap_or_default(),
        Spelling::ByteFallback(space) => {
            let hex = s
                .strip_prefix("<0x")
                .and_then(|h| h.strip_suffix('>'))
                .filter(|h| h.len() == 2);
            match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                Some(b) => vec![b],
                None => s.replace(space, " ").into_bytes(),
            }
        }
        Spelling::Plain => s.as_bytes().to_vec(),
    }
}

/// GPT-2's table: byte `b` is written as character `table[b]` (printable bytes as themselves,
/// the others from U+0100 on, in order).
fn byte_to_unicode() -> Vec<char> {
    let printable = |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || b >= 174;
    let mut next = 256;
    (0..256u32)
        .map(|b| {
            let c = if printable(b) {
                b
            } else {
                next += 1;
                next - 1
            };
            char::from_u32(c).unwrap_or('\u{FFFD}')
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tokenizer::tests::smollm2;

    /// Every ordinary token's bytes are what decoding it alone gives, where that is whole
    /// UTF-8 (a token may hold part of a character).
    #[test]
    fn smollm2_tokens_spell_their_text() {
        let tok = smollm2();
        let vocab = tok.vocab_size();
        let bytes = token_bytes(tok.inner(), vocab).expect("spells");
        assert_eq!(bytes.len(), vocab);
        let mut checked = 0;
        for id in (0..vocab as u32).step_by(97) {
            let b = &bytes[id as usize];
            if b.first() == Some(&TokTrie::SPECIAL_TOKEN_MARKER) {
                continue;
            }
            if let Ok(text) = std::str::from_utf8(b) {
                assert_eq!(tok.decode(&[id]).expect("decodes"), text, "token {id}");
                checked += 1;
            }
        }
        assert!(checked > 400, "{checked}");
        let eos = tok.eos_token_ids()[0] as usize;
        assert_eq!(bytes[eos][0], TokTrie::SPECIAL_TOKEN_MARKER);
        // " Paris" is one token with its space.
        let ids = tok.encode(" Paris").expect("encodes");
        assert_eq!(ids.len(), 1);
        assert_eq!(bytes[ids[0] as usize], b" Paris");
    }

    #[test]
    fn sentencepiece_spelling_maps_spaces_and_bytes() {
        let map = HashMap::new();
        let sp = Spelling::ByteFallback('▁');
        assert_eq!(spell("▁Paris", sp, &map), b" Paris");
        assert_eq!(spell("<0x0A>", sp, &map), b"\n");
        assert_eq!(spell("<0xZZ>", sp, &map), b"<0xZZ>");
        let table = byte_to_unicode();
        assert_eq!(table[b' ' as usize], 'Ġ');
        assert_eq!(table[b'\n' as usize], 'Ċ');
        assert_eq!(table[b'A' as usize], 'A');
    }
}
