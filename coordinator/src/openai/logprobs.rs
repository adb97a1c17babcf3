//! Logprobs in OpenAI's two formats, from the gRPC API's `SampledLogprobs` (token ids).
//!
//! A token is shown as its text. With byte-level BPE (GPT-2, Llama 3, SmolLM2) a token can be
//! part of a UTF-8 character, so its exact bytes are read from the token's vocabulary entry
//! (`TextTokenizer::token_bytes`, as structured outputs read them) rather than by decoding it
//! alone, which would give U+FFFD; the chat format's `bytes` field carries them, and `token` shows them
//! lossily. Special tokens (EOS) show as their text, as in vLLM.

use helios_proto::v1::{SampledLogprobs, TokenLogprob};

use super::types::{
    ChatLogprobs, ChatTokenLogprob, ChatTopLogprob, CompletionLogprobs, TopLogprobMap,
};
use crate::tokenizer::TextTokenizer;

fn text_of(tok: &TextTokenizer, id: u32) -> (String, Vec<u8>) {
    let bytes = tok.token_bytes(id);
    (String::from_utf8_lossy(&bytes).into_owned(), bytes)
}

fn sampled(l: &SampledLogprobs) -> TokenLogprob {
    l.sampled.unwrap_or_default()
}

/// The legacy completions format for tokens whose text starts at `offset` characters into the
/// answer; `offset` moves past them: an echoed prompt's tokens (`ids`, with their
/// `prompt_logprobs` as the gRPC API gives them, the first without a logprob, which shows as
/// `null`; none without echo), then the generated tokens' (`generated`). `top_logprobs` holds
/// the top N and, as OpenAI's, the token itself even when it is not among them.
pub fn completion(
    tok: &TextTokenizer,
    ids: &[u32],
    prompt_logprobs: &[SampledLogprobs],
    generated: &[SampledLogprobs],
    offset: &mut u32,
) -> CompletionLogprobs {
    let mut out = CompletionLogprobs::default();
    for (k, &id) in ids.iter().enumerate() {
        let scored = prompt_logprobs.get(k).filter(|l| l.sampled.is_some());
        push(&mut out, tok, id, scored, offset);
    }
    for l in generated {
        push(&mut out, tok, sampled(l).token_id, Some(l), offset);
    }
    out
}

/// One token's entry: its text, its logprob and the top N (both `null` without `l`).
fn push(
    out: &mut CompletionLogprobs,
    tok: &TextTokenizer,
    id: u32,
    l: Option<&SampledLogprobs>,
    offset: &mut u32,
) {
    let (token, _) = text_of(tok, id);
    let top = l.map(|l| {
        let mut top: Vec<(String, f32)> = l
            .top
            .iter()
            .map(|t| (text_of(tok, t.token_id).0, t.logprob))
            .collect();
        if !l.top.iter().any(|t| t.token_id == id) {
            top.push((token.clone(), sampled(l).logprob));
        }
        TopLogprobMap(top)
    });
    out.text_offset.push(*offset);
    *offset += token.chars().count() as u32;
    out.tokens.push(token);
    out.token_logprobs.push(l.map(|l| sampled(l).logprob));
    out.top_logprobs.push(top);
}

/// The chat format: each token with its bytes and its top N alternatives.
pub fn chat(tok: &TextTokenizer, logprobs: &[SampledLogprobs]) -> ChatLogprobs {
    let content = logprobs
        .iter()
        .map(|l| {
            let s = sampled(l);
            let (token, bytes) = text_of(tok, s.token_id);
            let top_logprobs = l
                .top
                .iter()
                .map(|t| {
                    let (token, bytes) = text_of(tok, t.token_id);
                    ChatTopLogprob {
                        token,
                        logprob: t.logprob,
                        bytes,
                    }
                })
                .collect();
            ChatTokenLogprob {
                token,
                logprob: s.logprob,
                bytes,
                top_logprobs,
            }
        })
        .collect();
    ChatLogprobs { content }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tokenizer::tests::smollm2;

    #[test]
    fn token_bytes_join_to_the_text_even_across_split_characters() {
        let tok = smollm2();
        for text in ["Hello, world!", " café 日本語 🦀 done\n", "<|im_end|>"] {
            let ids = tok.encode(text).unwrap();
            let bytes: Vec<u8> = ids.iter().flat_map(|&id| tok.token_bytes(id)).collect();
            assert_eq!(String::from_utf8(bytes).unwrap(), text);
        }
        // The crab is four bytes over more than one token: each piece alone is not UTF-8.
        let crab = tok.encode("🦀").unwrap();
        assert!(crab.len() > 1);
        assert!(String::from_utf8(tok.token_bytes(crab[0])).is_err());
    }

    #[test]
    fn both_formats_have_one_entry_per_token() {
        let tok = smollm2();
        let ids = tok.encode(" Paris is").unwrap();
        let lp = |id: u32, logprob: f32| TokenLogprob {
            token_id: id,
            logprob,
        };
        let logprobs: Vec<SampledLogprobs> = ids
            .iter()
            .map(|&id| SampledLogprobs {
                sampled: Some(lp(id, -0.5)),
                top: vec![lp(ids[0], -0.1), lp(ids[1], -2.0)],
            })
            .collect();
        let mut offset = 3;
        let c = completion(tok, &[], &[], &logprobs, &mut offset);
        assert_eq!(c.tokens.concat(), " Paris is");
        assert_eq!(c.text_offset, [3, 9]);
        assert_eq!(offset, 12);
        assert_eq!(c.token_logprobs, [Some(-0.5), Some(-0.5)]);
        // The sampled token is always in top_logprobs; here it is among the top 2.
        assert_eq!(c.top_logprobs[0].as_ref().unwrap().0.len(), 2);
        let chat = chat(tok, &logprobs);
        assert_eq!(chat.content.len(), 2);
        assert_eq!(chat.content[0].bytes, b" Paris");
        assert_eq!(chat.content[1].top_logprobs[1].token, " is");
    }

    #[test]
    fn an_echoed_prompt_comes_first_its_first_token_without_a_logprob() {
        let tok = smollm2();
        let prompt = tok.encode("The capital").unwrap();
        let answer = tok.encode(" is").unwrap();
        let lp = |id: u32, logprob: f32| SampledLogprobs {
            sampled: Some(TokenLogprob {
                token_id: id,
                logprob,
            }),
            top: vec![],
        };
        // As the gRPC API gives them: one per prompt token, the first without `sampled`.
        let scored: Vec<SampledLogprobs> = std::iter::once(SampledLogprobs::default())
            .chain(prompt[1..].iter().map(|&id| lp(id, -3.0)))
            .collect();
        let generated = vec![lp(answer[0], -0.25)];
        let mut offset = 0;
        let c = completion(tok, &prompt, &scored, &generated, &mut offset);
        assert_eq!(c.tokens.concat(), "The capital is");
        assert_eq!(c.tokens.len(), prompt.len() + 1);
        assert_eq!(c.token_logprobs[0], None);
        assert!(c.top_logprobs[0].is_none());
        assert!(c.token_logprobs[1..prompt.len()]
            .iter()
            .all(|&l| l == Some(-3.0)));
        assert_eq!(c.token_logprobs.last(), Some(&Some(-0.25)));
        assert_eq!(c.text_offset[0], 0);
        assert_eq!(offset, "The capital is".len() as u32);
        // JSON: the first entry's logprob and top are null, as OpenAI's.
        let json = serde_json::to_value(&c).unwrap();
        assert!(json["token_logprobs"][0].is_null());
        assert!(json["top_logprobs"][0].is_null());
    }
}
