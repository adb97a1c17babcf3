//! Structured outputs: a request's JSON Schema, regex or grammar becomes, at every token it
//! samples, the set of tokens that keep its output valid.
//!
//! - **Where**: the coordinator holds each constrained sequence's matcher (llguidance's Earley
//!   parser over the token trie, [`vocabulary`]). A plan carries the sequence's allowed tokens
//!   as a bitset (`SequenceStep.allowed_tokens`); every rank forbids the others in its
//!   vocabulary slice before sampling reads it, so greedy and top-k still gather only each
//!   slice's best. Workers stay stateless about sequences.
//! - **When**: a grammar is compiled at admission, on the blocking pool, within a time bound
//!   and llguidance's own limits (grammar size, lexer states, work per mask), so the step loop
//!   never compiles; a grammar that fails is INVALID_ARGUMENT naming the problem. Compiled
//!   parsers are kept in a bounded in-memory cache ([`GrammarCache`]); nothing goes to disk.
//! - **State**: the matcher has consumed exactly the sequence's answered tokens. Preemption
//!   and recovery keep those tokens and drop unanswered ones, so they need nothing; a sequence
//!   moved to another replica takes its matcher along ([`TokenConstraint`] clones deeply).
//!   With overlap the next step is planned before the last token is known, which a mask
//!   cannot wait for: the scheduler plans no step while a constrained sequence's token is on
//!   its way back (at most one step in flight then).
//! - **Cost**: a request without a constraint carries no mask and pays nothing.

mod cache;
pub mod vocabulary;

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Result};
use llguidance::api::{ParserLimits, TopLevelGrammar};
use llguidance::toktrie::{ApproximateTokEnv, TokRxInfo, TokTrie, TokenizerEnv};
use llguidance::{Matcher, ParserFactory, TokenParser};

use crate::tokenizer::TextTokenizer;

pub use cache::{GrammarCache, Permits};

/// What a request's output must be.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ConstraintSpec {
    /// A JSON Schema, as JSON text.
    JsonSchema(String),
    /// Any JSON object.
    JsonObject,
    Regex(String),
    /// A Lark-style grammar (llguidance's dialect).
    Grammar(String),
}

impl ConstraintSpec {
    /// The request field it came from, for error messages.
    pub fn field(&self) -> &'static str {
        match self {
            Self::JsonSchema(_) | Self::JsonObject => "json_schema",
            Self::Regex(_) => "regex",
            Self::Grammar(_) => "grammar",
        }
    }

    fn grammar(&self) -> Result<TopLevelGrammar> {
        let options = json_format();
        Ok(match self {
            Self::JsonSchema(text) => {
                let mut schema: serde_json::Value = serde_json::from_str(text)
                    .map_err(|e| anyhow!("the schema is not JSON: {e}"))?;
                if let Some(o) = schema.as_object_mut() {
                    o.insert("x-guidance".into(), options);
                } else if !schema.is_boolean() {
                    return Err(anyhow!("a JSON Schema is an object or a boolean"));
                }
                TopLevelGrammar::from_json_schema(schema)
            }
            Self::JsonObject => TopLevelGrammar::from_json_schema(
                serde_json::json!({"type": "object", "x-guidance": options}),
            ),
            Self::Regex(rx) => TopLevelGrammar::from_regex(rx),
            Self::Grammar(lark) => TopLevelGrammar::from_lark(lark.clone()),
        })
    }
}

/// The operator's bounds on grammars (`--grammar-compile-timeout`, `--grammar-cache-size`).
#[derive(Debug, Clone, Copy)]
pub struct GrammarOptions {
    /// A grammar that takes longer to compile is refused.
    pub compile_timeout: Duration,
    /// Compiled grammars kept for reuse (0: none).
    pub cache_entries: usize,
}

impl Default for GrammarOptions {
    fn default() -> Self {
        Self {
            compile_timeout: Duration::from_secs(DEFAULT_COMPILE_TIMEOUT_SECS),
            cache_entries: DEFAULT_CACHE_ENTRIES,
        }
    }
}

pub const DEFAULT_COMPILE_TIMEOUT_SECS: u64 = 10;
pub const DEFAULT_CACHE_ENTRIES: usize = 256;
/// Grammars compiled at once (a cache hit needs no compile).
pub const CONCURRENT_COMPILES: usize = 2;

/// Compiles constraints for one tokenizer; shared by every request (cheap to clone).
#[derive(Clone)]
pub struct Grammars(Arc<GrammarsInner>);

struct GrammarsInner {
    factory: ParserFactory,
    cache: GrammarCache,
    /// Compiles run at most this many at once: a compile cannot be stopped midway, so many
    /// slow schemas at once would take every core from the steps.
    compiling: Permits,
    opts: GrammarOptions,
    /// The model's vocabulary (masks cover it; the tokenizer's may be smaller).
    vocab_size: usize,
}

/// Why a constraint was refused.
#[derive(Debug, thiserror::Error)]
pub enum GrammarError {
    #[error("{0}")]
    Invalid(String),
    #[error("the constraint did not compile within {0:?} (this server's bound)")]
    TooSlow(Duration),
}

/// How a schema's JSON is written (llguidance's `x-guidance` options): compact separators
/// with one space, as models write JSON, and no free whitespace, which would let a model pad
/// forever. Options a client put in a schema are replaced; tool calls are written alike.
pub fn json_format() -> serde_json::Value {
    serde_json::json!({
        "whitespace_flexible": false,
        "item_separator": ", ",
        "key_separator": ": ",
    })
}

impl Grammars {
    /// Builds the token trie of `tok` (with its first EOS token as the end token a complete
    /// grammar allows) for a model of `vocab_size` tokens.
    pub fn new(tok: &TextTokenizer, vocab_size: usize, opts: GrammarOptions) -> Result<Self> {
        let eos = tok.eos_token_ids().first().copied().unwrap_or(0);
        let words = vocabulary::token_bytes(tok.inner(), vocab_size)?;
        let info = TokRxInfo::new(vocab_size as u32, eos);
        let env: Arc<dyn TokenizerEnv + Sync> =
            Arc::new(ApproximateTokEnv::new(TokTrie::from(&info, &words)));
        let mut factory = ParserFactory::new_simple(&env)?;
        factory.quiet();
        *factory.limits_mut() = ParserLimits {
            // Errors name the grammar's problem, never the tokens generated so far.
            verbose_errors: false,
            ..ParserLimits::default()
        };
        Ok(Self(Arc::new(GrammarsInner {
            factory,
            cache: GrammarCache::new(opts.cache_entries),
            compiling: Permits::new(CONCURRENT_COMPILES),
            opts,
            vocab_size,
        })))
    }

    /// A fresh matcher for `spec`, from the cache or compiled now (blocking: call it off the
    /// async runtime), with its first mask computed, so that the step loop starts warm.
    pub fn compile(&self, spec: &ConstraintSpec) -> Result<TokenConstraint, GrammarError> {
        let inner = &self.0;
        let start = Instant::now();
        let parser = match inner.cache.get(spec) {
            Some(p) => p,
            None => {
                let _permit = inner
                    .compiling
                    .acquire(inner.opts.compile_timeout)
                    .ok_or(GrammarError::TooSlow(inner.opts.compile_timeout))?;
                let parser = self.create_parser(spec)?;
                if start.elapsed() > inner.opts.compile_timeout {
                    return Err(GrammarError::TooSlow(inner.opts.compile_timeout));
                }
                if inner.cache.keeps() {
                    inner.cache.insert(spec.clone(), parser.deep_clone());
                }
                parser
            }
        };
        let mut c = TokenConstraint {
            matcher: Matcher::new(Ok(parser)),
            next: None,
            vocab_size: inner.vocab_size,
        };
        let mask = c.allowed().map_err(|e| invalid(spec, e))?;
        if !mask.iter().any(|&b| b != 0) {
            return Err(invalid(spec, "it allows no token to start the output"));
        }
        c.next = Some(mask);
        Ok(c)
    }
}

impl Grammars {
    /// Compiles on a thread of its own with a large stack: the schema compiler recurses over
    /// the schema, and a stack overflow would abort the whole server, not fail one request.
    fn create_parser(&self, spec: &ConstraintSpec) -> Result<TokenParser, GrammarError> {
        let (me, owned) = (self.clone(), spec.clone());
        let compile = move || -> Result<TokenParser, GrammarError> {
            let grammar = owned.grammar().map_err(|e| invalid(&owned, e))?;
            me.0.factory
                .create_parser(grammar)
                .map_err(|e| invalid(&owned, e))
        };
        std::thread::Builder::new()
            .name("grammar-compile".into())
            .stack_size(COMPILE_STACK_BYTES)
            .spawn(compile)
            .map_err(|e| GrammarError::Invalid(format!("no thread to compile on: {e}")))?
            .join()
            .map_err(|_| invalid(spec, "the compiler failed on it"))?
    }
}

/// The compile thread's stack (address space; only what is touched is memory).
const COMPILE_STACK_BYTES: usize = 256 << 20;

fn invalid(spec: &ConstraintSpec, e: impl fmt::Display) -> GrammarError {
    GrammarError::Invalid(format!("{}: {e}", spec.field()))
}

/// One sequence's constraint: which tokens may come next, given those it has accepted.
pub struct TokenConstraint {
    matcher: Matcher,
    /// The first state's mask, computed at admission (off the step loop) and handed to the
    /// first step that samples.
    next: Option<Vec<u8>>,
    vocab_size: usize,
}

impl TokenConstraint {
    /// The tokens allowed next, as `SequenceStep.allowed_tokens` carries them. A complete
    /// grammar allows only EOS.
    pub fn allowed(&mut self) -> Result<Vec<u8>> {
        // The mask compiled at admission is handed over once; later states compute their own.
        if let Some(m) = self.next.take() {
            return Ok(m);
        }
        let vob = self.matcher.compute_mask_or_eos()?;
        let n = self.vocab_size.div_ceil(8);
        let mut bytes: Vec<u8> = vob
            .as_slice()
            .iter()
            .flat_map(|w| w.to_le_bytes())
            .take(n)
            .collect();
        bytes.resize(n, 0);
        // Bits past the vocabulary (the last byte's padding) stay clear.
        if let Some(last) = bytes.last_mut() {
            let used = self.vocab_size % 8;
            if used != 0 {
                *last &= (1u8 << used) - 1;
            }
        }
        Ok(bytes)
    }

    /// Advances past a sampled token.
    pub fn accept(&mut self, token: u32) -> Result<()> {
        self.next = None;
        self.matcher.consume_token(token)
    }

    /// Whether the output is complete (its EOS was accepted): nothing may follow.
    pub fn is_complete(&self) -> bool {
        self.matcher.is_stopped()
    }
}

impl Clone for TokenConstraint {
    /// A deep copy: the copy advances on its own.
    fn clone(&self) -> Self {
        Self {
            matcher: self.matcher.deep_clone(),
            next: self.next.clone(),
            vocab_size: self.vocab_size,
        }
    }
}

impl fmt::Debug for TokenConstraint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenConstraint")
            .field("complete", &self.is_complete())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests;
