//! The bytes each token stands for, which a grammar engine needs to know which tokens can
//! continue a text: llguidance walks a trie of them (`TokTrie`) to compute a mask. They are
//! read from the vocabulary's entries in the model's spelling (`crate::tokenizer::TokenSpeller`,
//! which logprobs use too); a Metaspace vocabulary without byte fallback cannot spell every
//! byte, and is refused.
//!
//! Special tokens (`<|im_end|>`, `</s>`) start with `TokTrie::SPECIAL_TOKEN_MARKER`, so that
//! no text can spell them: a grammar allows them only by name, and EOS when it is complete.

use std::collections::HashMap;

use anyhow::{bail, Result};
use llguidance::toktrie::TokTrie;

use crate::tokenizer::{Spelling, TokenSpeller};

/// Token `id`'s bytes for ids `0 .. vocab_size` (the model's; ids the tokenizer lacks get no
/// bytes, so a grammar never allows them).
pub fn token_bytes(tok: &tokenizers::Tokenizer, vocab_size: usize) -> Result<Vec<Vec<u8>>> {
    let speller = TokenSpeller::new(tok);
    if let Spelling::Pieces {
        byte_fallback: false,
        ..
    } = speller.spelling()
    {
        bail!("a Metaspace decoder without byte fallback is not supported for structured outputs");
    }
    let specials: HashMap<u32, String> = tok
        .get_added_tokens_decoder()
        .into_iter()
        .filter(|(_, t)| t.special)
        .map(|(id, t)| (id, t.content))
        .collect();
    let mut out = Vec::with_capacity(vocab_size);
    for id in 0..vocab_size as u32 {
        let bytes = if let Some(name) = specials.get(&id) {
            let mut b = vec![TokTrie::SPECIAL_TOKEN_MARKER];
            b.extend_from_slice(name.as_bytes());
            b
        } else if let Some(s) = tok.id_to_token(id) {
            speller.bytes(&s)
        } else {
            Vec::new()
        };
        out.push(bytes);
    }
    Ok(out)
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
}
