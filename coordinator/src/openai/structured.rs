//! Structured outputs as OpenAI and vLLM clients ask for them, into the gRPC API's
//! `Constraint`:
//! - OpenAI's `response_format`: `{"type": "text"}` (none), `{"type": "json_object"}`, or
//!   `{"type": "json_schema", "json_schema": {"name", "schema", "strict"}}`. The schema is
//!   enforced whether `strict` is set or not, as vLLM does;
//! - vLLM's `guided_json` (a schema, as an object or JSON text), `guided_regex`,
//!   `guided_grammar` and `guided_choice` (one of these strings), and their newer form
//!   `structured_outputs: {"json" | "regex" | "grammar" | "choice": ...}`.
//!
//! At most one of these may be set: two constraints at once are a 400 naming both.

use helios_proto::v1::constraint::Kind;
use helios_proto::v1::Constraint;
use serde_json::Value;

use super::error::ApiError;
use super::types::Common;

/// The one constraint `c` asks for, if any, and the parameter that asked (the serving path's
/// errors about it name that parameter).
pub fn constraint(c: &Common) -> Result<Option<(&'static str, Constraint)>, ApiError> {
    let mut found: Vec<(&'static str, Kind)> = Vec::new();
    if let Some(f) = &c.response_format {
        if let Some(kind) = response_format(f)? {
            found.push(("response_format", kind));
        }
    }
    if let Some(v) = &c.guided_json {
        found.push(("guided_json", json_schema("guided_json", v)?));
    }
    if let Some(rx) = &c.guided_regex {
        found.push(("guided_regex", Kind::Regex(rx.clone())));
    }
    if let Some(g) = &c.guided_grammar {
        found.push(("guided_grammar", Kind::Grammar(g.clone())));
    }
    if let Some(choices) = &c.guided_choice {
        found.push(("guided_choice", choice("guided_choice", choices)?));
    }
    if let Some(so) = &c.structured_outputs {
        found.extend(structured_outputs(so)?);
    }
    match found.len() {
        0 => Ok(None),
        1 => Ok(found
            .pop()
            .map(|(param, kind)| (param, Constraint { kind: Some(kind) }))),
        _ => {
            let names: Vec<&str> = found.iter().map(|(n, _)| *n).collect();
            Err(ApiError::invalid_param(
                names[1],
                format!(
                    "only one structured output constraint at a time; got {}",
                    names.join(" and ")
                ),
            ))
        }
    }
}

fn response_format(f: &Value) -> Result<Option<Kind>, ApiError> {
    let bad = |msg: &str| ApiError::invalid_param("response_format", msg);
    match f.get("type").and_then(Value::as_str) {
        Some("text") => Ok(None),
        Some("json_object") => Ok(Some(Kind::JsonObject(true))),
        Some("json_schema") => {
            let schema = f
                .get("json_schema")
                .and_then(|j| j.get("schema"))
                .ok_or_else(|| bad("response_format json_schema needs json_schema.schema"))?;
            json_schema("response_format", schema).map(Some)
        }
        _ => Err(bad(
            "response_format type must be \"text\", \"json_object\" or \"json_schema\"",
        )),
    }
}

/// A schema given as an object (or a boolean), or as JSON text.
fn json_schema(field: &str, v: &Value) -> Result<Kind, ApiError> {
    match v {
        Value::String(text) => Ok(Kind::JsonSchema(text.clone())),
        Value::Object(_) | Value::Bool(_) => Ok(Kind::JsonSchema(v.to_string())),
        _ => Err(ApiError::invalid_param(
            field,
            format!("{field} must be a JSON Schema (an object) or its JSON text"),
        )),
    }
}

/// One of `choices`, exactly: a grammar of string literals (JSON strings are Lark's).
fn choice(field: &str, choices: &[String]) -> Result<Kind, ApiError> {
    if choices.is_empty() {
        return Err(ApiError::invalid_param(field, format!("{field} is empty")));
    }
    let literals: Vec<String> = choices
        .iter()
        .map(|c| Value::from(c.as_str()).to_string())
        .collect();
    Ok(Kind::Grammar(format!("start: {}", literals.join(" | "))))
}

fn structured_outputs(so: &Value) -> Result<Vec<(&'static str, Kind)>, ApiError> {
    let field = "structured_outputs";
    let Some(o) = so.as_object() else {
        return Err(ApiError::invalid_param(
            field,
            "structured_outputs must be an object",
        ));
    };
    let text = |k: &str| -> Result<Option<String>, ApiError> {
        match o.get(k) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(_) => Err(ApiError::invalid_param(
                field,
                format!("structured_outputs.{k} must be a string"),
            )),
        }
    };
    let mut out = Vec::new();
    if let Some(v) = o.get("json").filter(|v| !v.is_null()) {
        out.push(("structured_outputs", json_schema(field, v)?));
    }
    if let Some(rx) = text("regex")? {
        out.push(("structured_outputs", Kind::Regex(rx)));
    }
    if let Some(g) = text("grammar")? {
        out.push(("structured_outputs", Kind::Grammar(g)));
    }
    if let Some(c) = o.get("choice").filter(|v| !v.is_null()) {
        let choices: Vec<String> = serde_json::from_value(c.clone()).map_err(|_| {
            ApiError::invalid_param(
                field,
                "structured_outputs.choice must be an array of strings",
            )
        })?;
        out.push(("structured_outputs", choice(field, &choices)?));
    }
    if o.get("json_object").and_then(Value::as_bool) == Some(true) {
        out.push(("structured_outputs", Kind::JsonObject(true)));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn common(json: &str) -> Common {
        serde_json::from_str(json).expect("a Common")
    }

    fn kind(json: &str) -> Option<(&'static str, Kind)> {
        constraint(&common(json))
            .expect("accepted")
            .map(|(param, c)| (param, c.kind.expect("a kind")))
    }

    #[test]
    fn each_way_of_asking_becomes_its_constraint() {
        assert_eq!(kind(r#"{}"#), None);
        assert_eq!(kind(r#"{"response_format": {"type": "text"}}"#), None);
        assert_eq!(
            kind(r#"{"response_format": {"type": "json_object"}}"#),
            Some(("response_format", Kind::JsonObject(true)))
        );
        let schema = r#"{"type":"object"}"#;
        let from_format = format!(
            r#"{{"response_format": {{"type": "json_schema", "json_schema": {{"name": "x", "schema": {schema}, "strict": true}}}}}}"#
        );
        assert_eq!(
            kind(&from_format),
            Some(("response_format", Kind::JsonSchema(schema.into())))
        );
        // vLLM's guided_json: an object, or its JSON text as given.
        assert_eq!(
            kind(&format!(r#"{{"guided_json": {schema}}}"#)),
            Some(("guided_json", Kind::JsonSchema(schema.into())))
        );
        assert_eq!(
            kind(r#"{"guided_json": "{\"type\": \"array\"}"}"#),
            Some((
                "guided_json",
                Kind::JsonSchema(r#"{"type": "array"}"#.into())
            ))
        );
        assert_eq!(
            kind(r#"{"guided_regex": "[0-9]+"}"#),
            Some(("guided_regex", Kind::Regex("[0-9]+".into())))
        );
        // A choice is a grammar of its strings, quoted as JSON (and so as Lark) quotes them.
        assert_eq!(
            kind(r#"{"guided_choice": ["yes", "a \"b\""]}"#),
            Some((
                "guided_choice",
                Kind::Grammar(r#"start: "yes" | "a \"b\"""#.into())
            ))
        );
        assert_eq!(
            kind(r#"{"structured_outputs": {"regex": "a+"}}"#),
            Some(("structured_outputs", Kind::Regex("a+".into())))
        );
        assert_eq!(
            kind(r#"{"structured_outputs": {"choice": ["x"]}}"#),
            Some(("structured_outputs", Kind::Grammar(r#"start: "x""#.into())))
        );
    }

    #[test]
    fn two_constraints_or_bad_shapes_are_refused_by_name() {
        for (json, param) in [
            (
                r#"{"guided_regex": "a", "guided_grammar": "start: \"a\""}"#,
                "guided_grammar",
            ),
            (
                r#"{"response_format": {"type": "json_object"}, "guided_regex": "a"}"#,
                "guided_regex",
            ),
            (
                r#"{"response_format": {"type": "yaml"}}"#,
                "response_format",
            ),
            (
                r#"{"response_format": {"type": "json_schema"}}"#,
                "response_format",
            ),
            (r#"{"guided_json": 5}"#, "guided_json"),
            (r#"{"guided_choice": []}"#, "guided_choice"),
            (r#"{"structured_outputs": "json"}"#, "structured_outputs"),
            (
                r#"{"structured_outputs": {"choice": [1]}}"#,
                "structured_outputs",
            ),
        ] {
            let e = constraint(&common(json)).expect_err(json);
            assert_eq!(e.param.as_deref(), Some(param), "{json}: {}", e.message);
        }
    }
}
