use super::*;
use crate::tokenizer::tests::smollm2;

fn grammars(cache_entries: usize) -> Grammars {
    let tok = smollm2();
    let opts = GrammarOptions {
        cache_entries,
        ..GrammarOptions::default()
    };
    Grammars::new(tok, tok.vocab_size() + 3, opts).expect("builds")
}

/// Decodes under `c` as a sampler would: each step the allowed token that random scores
/// (seeded) rank best, until the constraint is complete or `max` tokens. Returns the text
/// before EOS and whether it completed.
fn run(g: &Grammars, c: &mut TokenConstraint, seed: u64, max: usize) -> (String, bool) {
    let tok = smollm2();
    let eos = tok.eos_token_ids()[0];
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::new();
    for _ in 0..max {
        let mask = c.allowed().expect("mask");
        assert_eq!(mask.len(), g.0.vocab_size.div_ceil(8));
        let allowed: Vec<u32> = (0..g.0.vocab_size as u32)
            .filter(|&t| mask[t as usize / 8] >> (t % 8) & 1 == 1)
            .collect();
        assert!(!allowed.is_empty(), "a mask allows something");
        assert!(
            allowed.iter().all(|&t| (t as usize) < tok.vocab_size()),
            "ids the tokenizer lacks are never allowed"
        );
        // xorshift: a different order each step; EOS only when it is the only choice, so the
        // outputs are not all minimal.
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let pick = allowed
            .iter()
            .copied()
            .filter(|&t| t != eos || allowed.len() == 1)
            .nth(state as usize % allowed.len().saturating_sub(1).max(1))
            .unwrap_or(allowed[0]);
        c.accept(pick)
            .unwrap_or_else(|e| panic!("{pick} after {out:?} ({allowed:?}): {e}"));
        if pick == eos {
            assert!(c.is_complete());
            return (tok.decode(&out).expect("decodes"), true);
        }
        out.push(pick);
        // Nothing can follow: the scheduler ends the sequence without an EOS.
        if c.is_complete() {
            return (tok.decode(&out).expect("decodes"), true);
        }
    }
    (tok.decode(&out).expect("decodes"), false)
}

#[test]
fn every_output_under_a_schema_is_json_of_that_shape() {
    let g = grammars(8);
    let schema = r#"{"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 6},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2}
    }, "required": ["name", "age", "tags"], "additionalProperties": false}"#;
    let spec = ConstraintSpec::JsonSchema(schema.into());
    for seed in 0..6 {
        let mut c = g.compile(&spec).expect("compiles");
        let (text, done) = run(&g, &mut c, seed, 200);
        assert!(done, "seed {seed}: incomplete {text:?}");
        let v: serde_json::Value = serde_json::from_str(&text).expect(&text);
        assert!(
            v["name"].as_str().is_some_and(|s| s.chars().count() <= 6),
            "{text}"
        );
        assert!(v["age"].as_u64().is_some_and(|a| a <= 120), "{text}");
        let tags = v["tags"].as_array().expect("tags");
        assert!(tags.len() <= 2 && tags.iter().all(|t| t == "a" || t == "b"));
        assert_eq!(v.as_object().map(|o| o.len()), Some(3), "{text}");
    }
}

#[test]
fn regexes_and_grammars_hold_for_every_output() {
    let g = grammars(8);
    let rx = ConstraintSpec::Regex(r"(yes|no), [0-9]{2,3}!".into());
    let lark = ConstraintSpec::Grammar(
        r#"start: "The answer is " NUM " " UNIT
           NUM: /[1-9][0-9]?/
           UNIT: "cm" | "m""#
            .into(),
    );
    for seed in 0..5 {
        let (text, done) = run(&g, &mut g.compile(&rx).expect("regex"), seed, 50);
        assert!(done, "{text:?}");
        let (word, rest) = text.split_once(", ").expect(&text);
        assert!(word == "yes" || word == "no", "{text}");
        let digits = rest.strip_suffix('!').expect(&text);
        assert!((2..=3).contains(&digits.len()) && digits.bytes().all(|b| b.is_ascii_digit()));

        let (text, done) = run(&g, &mut g.compile(&lark).expect("grammar"), seed, 50);
        assert!(done, "{text:?}");
        let rest = text.strip_prefix("The answer is ").expect(&text);
        let (num, unit) = rest.split_once(' ').expect(&text);
        assert!(
            num.parse::<u32>().is_ok_and(|n| (1..100).contains(&n)),
            "{text}"
        );
        assert!(unit == "cm" || unit == "m", "{text}");
    }
}

#[test]
fn a_json_object_is_any_object() {
    let g = grammars(8);
    for seed in 0..4 {
        let mut c = g.compile(&ConstraintSpec::JsonObject).expect("compiles");
        let (text, done) = run(&g, &mut c, seed, 300);
        if done {
            let v: serde_json::Value = serde_json::from_str(&text).expect(&text);
            assert!(v.is_object(), "{text}");
        } else {
            assert!(text.starts_with('{'), "{text}");
        }
    }
}

#[test]
fn bad_constraints_are_refused_naming_the_problem() {
    let g = grammars(8);
    let refused = |spec: ConstraintSpec, words: &str| {
        let e = g.compile(&spec).expect_err(words).to_string();
        assert!(e.contains(words), "{e:?} lacks {words:?}");
    };
    refused(ConstraintSpec::JsonSchema("{not json".into()), "not JSON");
    refused(
        ConstraintSpec::JsonSchema("[1]".into()),
        "object or a boolean",
    );
    refused(
        ConstraintSpec::JsonSchema(r#"{"type": "frobnicate"}"#.into()),
        "json_schema: Invalid type: frobnicate",
    );
    refused(ConstraintSpec::Regex("(unclosed".into()), "unclosed group");
    refused(
        ConstraintSpec::Grammar("start: undefined_rule".into()),
        "unknown name: \"undefined_rule\"",
    );
    // Too large for the grammar limits: refused in milliseconds.
    refused(ConstraintSpec::JsonSchema(wide_schema(30_000)), "too large");
}

/// An object schema with `n` string properties: its compile time grows with n².
fn wide_schema(n: usize) -> String {
    let props: Vec<String> = (0..n)
        .map(|i| format!(r#""p{i}": {{"type": "string"}}"#))
        .collect();
    format!(
        r#"{{"type": "object", "properties": {{{}}}}}"#,
        props.join(", ")
    )
}

#[test]
fn a_grammar_slower_than_the_bound_is_refused_and_not_cached() {
    let tok = smollm2();
    let opts = GrammarOptions {
        compile_timeout: Duration::from_millis(100),
        cache_entries: 8,
    };
    let g = Grammars::new(tok, tok.vocab_size(), opts).expect("builds");
    let spec = ConstraintSpec::JsonSchema(wide_schema(2_000));
    let e = g.compile(&spec).expect_err("too slow");
    assert!(matches!(e, GrammarError::TooSlow(_)), "{e}");
    assert_eq!(g.0.cache.len(), 0);
    // A small one still compiles.
    g.compile(&ConstraintSpec::Regex("[0-9]+".into()))
        .expect("compiles");
}

#[test]
fn the_cache_keeps_at_most_its_bound_and_copies_advance_alone() {
    let g = grammars(2);
    let specs: Vec<ConstraintSpec> = (0..4)
        .map(|i| ConstraintSpec::Regex(format!("x{{{i}}}y")))
        .collect();
    for s in &specs {
        g.compile(s).expect("compiles");
    }
    assert_eq!(g.0.cache.len(), 2);
    // Two matchers of one cached grammar: advancing one leaves the other at the start.
    let spec = ConstraintSpec::Regex("ab|ac".into());
    let mut one = g.compile(&spec).expect("compiles");
    let mut two = g.compile(&spec).expect("cached");
    let before = two.allowed().expect("mask");
    let (text, done) = run(&g, &mut one, 3, 10);
    assert!(done && (text == "ab" || text == "ac"), "{text}");
    assert_eq!(two.allowed().expect("mask"), before);
    let mut copy = two.clone();
    run(&g, &mut copy, 1, 10);
    assert_eq!(two.allowed().expect("mask"), before);
}
