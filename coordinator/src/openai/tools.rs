//! Tool calling on `/v1/chat/completions`, as OpenAI's API has it: `tools` (functions with a
//! JSON Schema for their parameters), `tool_choice`, `parallel_tool_calls`, and histories
//! with `tool` messages and assistant `tool_calls`.
//!
//! The serving path knows nothing of tools: they become chat messages and, when a call is
//! required, a grammar.
//!
//! - **Prompt**: a chat template that renders `tools` itself gets them (and the messages'
//!   `tool_calls`, `tool_call_id`) as transformers passes them; the OpenAI layer renders the
//!   prompt then ([`super::translate`]). Otherwise (SmolLM2's template, for one) the
//!   fallback: a system message listing the tools as JSON and asking for Hermes/Qwen's
//!   `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` (merged into the first system
//!   message when there is one); `tool` results become a user message of
//!   `<tool_response>...</tool_response>` blocks and an assistant's calls their
//!   `<tool_call>` text, which any template can take.
//! - **Enforcement**: `tool_choice: "required"` or a named function becomes a Lark grammar
//!   whose only outputs are one `<tool_call>` block of a declared tool (of the named one) with
//!   arguments that its `parameters` schema accepts (`%json`). One call, even with
//!   `parallel_tool_calls`: a free number of calls lets a small model call until
//!   `max_tokens`. `auto` is not constrained; calls are parsed from the text
//!   ([`super::tool_calls`]). `none`: the tools are left out of the prompt and nothing is
//!   parsed, so the model answers in text.
//! - A required call together with another structured output (`response_format`,
//!   `guided_*`) is refused: the output cannot be both.

use helios_proto::v1::constraint::Kind;
use helios_proto::v1::{ChatMessage, Constraint};
use serde_json::{json, Value};

use super::error::ApiError;
use super::types::ChatMessageIn;

/// One declared function.
#[derive(Debug, Clone, PartialEq)]
pub struct Tool {
    pub name: String,
    /// `{"type": "function", "function": {"name", "description"?, "parameters"}}`, as
    /// templates and the fallback prompt show it.
    pub spec: Value,
}

impl Tool {
    /// The parameters' JSON Schema (an empty object's when none was given).
    pub fn parameters(&self) -> &Value {
        &self.spec["function"]["parameters"]
    }
}

/// `tool_choice`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToolChoice {
    None,
    Auto,
    Required,
    Named(String),
}

/// A request's tools and how they may be used.
#[derive(Debug, Clone, PartialEq)]
pub struct Tools {
    pub list: Vec<Tool>,
    pub choice: ToolChoice,
    pub parallel: bool,
}

impl Tools {
    /// Whether the model is told of the tools and its answer parsed for calls.
    pub fn active(&self) -> bool {
        self.choice != ToolChoice::None
    }

    /// The declared names a call may name (only the named one's for a named choice).
    pub fn names(&self) -> Vec<String> {
        match &self.choice {
            ToolChoice::Named(n) => vec![n.clone()],
            _ => self.list.iter().map(|t| t.name.clone()).collect(),
        }
    }

    /// The tools as a template's `tools` sees them.
    pub fn specs(&self) -> Vec<Value> {
        self.list.iter().map(|t| t.spec.clone()).collect()
    }

    /// The grammar a required or named call is held to.
    pub fn constraint(&self) -> Option<Constraint> {
        let tools: Vec<&Tool> = match &self.choice {
            ToolChoice::None | ToolChoice::Auto => return None,
            ToolChoice::Required => self.list.iter().collect(),
            ToolChoice::Named(n) => self.list.iter().filter(|t| &t.name == n).collect(),
        };
        let mut lark = format!(
            "start: {} call {}\ncall: {}\n",
            Value::from("<tool_call>\n"),
            Value::from("\n</tool_call>"),
            (0..tools.len())
                .map(|i| format!("call_{i}"))
                .collect::<Vec<_>>()
                .join(" | ")
        );
        for (i, t) in tools.iter().enumerate() {
            lark.push_str(&format!("call_{i}: %json {}\n", call_schema(t)));
        }
        Some(Constraint {
            kind: Some(Kind::Grammar(lark)),
        })
    }
}

/// The schema of one call of `t`: its name, then its arguments. `$defs` (and `definitions`)
/// move to the top, where the parameters' `#/$defs/...` references then find them.
fn call_schema(t: &Tool) -> Value {
    let mut arguments = t.parameters().clone();
    let mut wrapper = json!({
        "type": "object",
        "properties": {"name": {"const": t.name}},
        "required": ["name", "arguments"],
        "additionalProperties": false,
    });
    if let (Some(args), Some(top)) = (arguments.as_object_mut(), wrapper.as_object_mut()) {
        for key in ["$defs", "definitions"] {
            if let Some(defs) = args.remove(key) {
                top.insert(key.into(), defs);
            }
        }
    }
    wrapper["properties"]["arguments"] = arguments;
    wrapper["x-guidance"] = crate::constraint::json_format();
    wrapper
}

fn bad(param: &str, msg: impl Into<String>) -> ApiError {
    ApiError::invalid_param(param, msg)
}

/// Reads `tools`, `tool_choice` and `parallel_tool_calls`; None without tools.
pub fn read(
    tools: Option<Value>,
    choice: Option<Value>,
    parallel: Option<bool>,
) -> Result<Option<Tools>, ApiError> {
    let list = match tools {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(items)) => items
            .iter()
            .enumerate()
            .map(|(i, t)| tool(i, t))
            .collect::<Result<Vec<_>, _>>()?,
        Some(_) => return Err(bad("tools", "tools must be an array of functions")),
    };
    for (i, t) in list.iter().enumerate() {
        if list[..i].iter().any(|o| o.name == t.name) {
            return Err(bad(
                &format!("tools[{i}].function.name"),
                format!("tool {:?} is declared twice", t.name),
            ));
        }
    }
    let choice = tool_choice(choice, &list)?;
    if list.is_empty() {
        return Ok(None);
    }
    Ok(Some(Tools {
        list,
        choice,
        parallel: parallel.unwrap_or(true),
    }))
}

fn tool(i: usize, t: &Value) -> Result<Tool, ApiError> {
    let at = format!("tools[{i}]");
    if t.get("type").and_then(Value::as_str) != Some("function") {
        return Err(bad(
            &format!("{at}.type"),
            format!("{at}.type must be \"function\""),
        ));
    }
    let Some(f) = t.get("function").and_then(Value::as_object) else {
        return Err(bad(
            &format!("{at}.function"),
            format!("{at}.function must be an object"),
        ));
    };
    let name = f.get("name").and_then(Value::as_str).unwrap_or_default();
    if !valid_name(name) {
        return Err(bad(
            &format!("{at}.function.name"),
            format!("{at}.function.name must be 1 to 64 of a-z, A-Z, 0-9, _ and -"),
        ));
    }
    let mut function = serde_json::Map::new();
    function.insert("name".into(), name.into());
    match f.get("description") {
        None | Some(Value::Null) => {}
        Some(Value::String(d)) => {
            function.insert("description".into(), d.as_str().into());
        }
        Some(_) => {
            return Err(bad(
                &format!("{at}.function.description"),
                format!("{at}.function.description must be a string"),
            ))
        }
    }
    let parameters = match f.get("parameters") {
        None | Some(Value::Null) => json!({"type": "object", "properties": {}}),
        Some(p @ Value::Object(_)) => p.clone(),
        Some(_) => {
            return Err(bad(
                &format!("{at}.function.parameters"),
                format!("{at}.function.parameters must be a JSON Schema object"),
            ))
        }
    };
    function.insert("parameters".into(), parameters);
    Ok(Tool {
        name: name.to_string(),
        spec: json!({"type": "function", "function": function}),
    })
}

/// `^[a-zA-Z0-9_-]{1,64}$`, OpenAI's rule for function names.
fn valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

fn tool_choice(choice: Option<Value>, list: &[Tool]) -> Result<ToolChoice, ApiError> {
    let param = "tool_choice";
    let choice = match choice {
        None | Some(Value::Null) if list.is_empty() => ToolChoice::None,
        None | Some(Value::Null) => ToolChoice::Auto,
        Some(Value::String(s)) => match s.as_str() {
            "none" => ToolChoice::None,
            "auto" => ToolChoice::Auto,
            "required" => ToolChoice::Required,
            _ => {
                return Err(bad(
                    param,
                    "tool_choice must be \"none\", \"auto\", \"required\" or a function",
                ))
            }
        },
        Some(v) => {
            let name = (v.get("type").and_then(Value::as_str) == Some("function"))
                .then(|| v.get("function")?.get("name")?.as_str())
                .flatten()
                .ok_or_else(|| {
                    bad(
                        param,
                        "tool_choice must be {\"type\": \"function\", \"function\": {\"name\": ...}}",
                    )
                })?;
            if !list.iter().any(|t| t.name == name) {
                return Err(bad(
                    param,
                    format!("tool_choice names {name:?}, which is not in tools"),
                ));
            }
            ToolChoice::Named(name.to_string())
        }
    };
    if list.is_empty() && matches!(choice, ToolChoice::Required) {
        return Err(bad(param, "tool_choice \"required\" needs tools"));
    }
    Ok(choice)
}

/// The fallback system prompt: the tools as JSON and the format of a call.
pub fn system_prompt(tools: &Tools) -> String {
    let mut s = String::from(
        "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n\
         You are provided with function signatures within <tools></tools> XML tags:\n<tools>",
    );
    for t in &tools.list {
        s.push('\n');
        s.push_str(&spaced(&t.spec));
    }
    s.push_str(
        "\n</tools>\n\nFor each function call, return a json object with function name and \
         arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n\
         {\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call>",
    );
    if !tools.parallel {
        s.push_str("\n\nCall at most one function.");
    }
    s
}

/// The fallback rendering of a conversation: `tool` messages and assistant `tool_calls` as
/// text (see the module doc), and, with `tools`, the system prompt that lists them.
/// `content` reads a message's content (`messages[i].content`).
pub fn fallback_messages(
    messages: Vec<ChatMessageIn>,
    tools: Option<&Tools>,
    content: impl Fn(usize, Option<Value>) -> Result<String, ApiError>,
) -> Result<Vec<ChatMessage>, ApiError> {
    let mut out: Vec<ChatMessage> = Vec::with_capacity(messages.len() + 1);
    let mut last_was_tool = false;
    for (i, m) in messages.into_iter().enumerate() {
        let calls = calls_text(i, m.tool_calls.as_ref())?;
        let text = content(i, m.content)?;
        let is_tool = m.role == "tool";
        if is_tool {
            let block = format!("<tool_response>\n{text}\n</tool_response>");
            match out.last_mut() {
                Some(prev) if last_was_tool => {
                    prev.content.push('\n');
                    prev.content.push_str(&block);
                }
                _ => out.push(ChatMessage {
                    role: "user".into(),
                    content: block,
                }),
            }
        } else {
            let content = match (text.is_empty(), calls.is_empty()) {
                (_, true) => text,
                (true, false) => calls,
                (false, false) => format!("{text}\n{calls}"),
            };
            out.push(ChatMessage {
                role: role(m.role),
                content,
            });
        }
        last_was_tool = is_tool;
    }
    if let Some(tools) = tools.filter(|t| t.active()) {
        let prompt = system_prompt(tools);
        match out.first_mut() {
            Some(first) if first.role == "system" => {
                first.content = format!("{}\n\n{prompt}", first.content);
            }
            _ => out.insert(
                0,
                ChatMessage {
                    role: "system".into(),
                    content: prompt,
                },
            ),
        }
    }
    Ok(out)
}

/// The conversation as a template that renders tools sees it (transformers' shape, as vLLM
/// passes it): roles, text, assistant `tool_calls` with their arguments as JSON objects, and
/// `tool_call_id`. Checked as [`fallback_messages`] checks it.
pub fn template_messages(
    messages: &[ChatMessageIn],
    content: impl Fn(usize, Option<Value>) -> Result<String, ApiError>,
) -> Result<Vec<crate::tokenizer::ChatMessage>, ApiError> {
    messages
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let calls = history_calls(i, m.tool_calls.as_ref())?;
            let mut out = crate::tokenizer::ChatMessage::new(
                role(m.role.clone()),
                content(i, m.content.clone())?,
            );
            if !calls.is_empty() {
                let ids = m.tool_calls.as_ref().and_then(Value::as_array);
                let calls: Vec<Value> = calls
                    .into_iter()
                    .enumerate()
                    .map(|(j, c)| {
                        let id = ids
                            .and_then(|ids| ids.get(j)?.get("id")?.as_str())
                            .map_or_else(call_id, String::from);
                        json!({"id": id, "type": "function", "function": c})
                    })
                    .collect();
                out.tool_calls = Some(Value::Array(calls));
            }
            out.tool_call_id = m.tool_call_id.clone();
            Ok(out)
        })
        .collect()
}

/// OpenAI's newer name for the system role, which chat templates do not know.
pub fn role(role: String) -> String {
    if role == "developer" {
        "system".into()
    } else {
        role
    }
}

/// An assistant message's `tool_calls` checked: `[{id?, type: "function", function: {name,
/// arguments: JSON text}}]`. Returns them as `{"name", "arguments"}` objects (arguments
/// parsed when they are JSON).
pub fn history_calls(i: usize, calls: Option<&Value>) -> Result<Vec<Value>, ApiError> {
    let param = format!("messages[{i}].tool_calls");
    let items = match calls {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Array(items)) => items,
        Some(_) => return Err(bad(&param, format!("{param} must be an array"))),
    };
    items
        .iter()
        .enumerate()
        .map(|(j, c)| {
            let f = c.get("function");
            let name = f.and_then(|f| f.get("name")).and_then(Value::as_str);
            let args = f.and_then(|f| f.get("arguments"));
            match (name, args) {
                (Some(name), Some(Value::String(a))) => {
                    let args = serde_json::from_str(a).unwrap_or_else(|_| Value::from(a.as_str()));
                    Ok(json!({"name": name, "arguments": args}))
                }
                (Some(name), Some(a @ Value::Object(_))) => {
                    Ok(json!({"name": name, "arguments": a}))
                }
                _ => Err(bad(
                    &param,
                    format!("{param}[{j}] must be {{\"type\": \"function\", \"function\": {{\"name\": ..., \"arguments\": ...}}}}"),
                )),
            }
        })
        .collect()
}

/// An assistant's calls as the `<tool_call>` blocks the fallback asks for.
fn calls_text(i: usize, calls: Option<&Value>) -> Result<String, ApiError> {
    Ok(history_calls(i, calls)?
        .iter()
        .map(|c| format!("<tool_call>\n{}\n</tool_call>", spaced(c)))
        .collect::<Vec<_>>()
        .join("\n"))
}

/// JSON as models are shown and write it (`", "`, `": "`; Python's `json.dumps`), as the
/// enforced calls are written too.
fn spaced(v: &Value) -> String {
    let mut out = String::new();
    crate::tokenizer::chat_template::write_python_json(&mut out, v, None, false, 0);
    out
}

/// `call_` and 24 hex digits, unpredictable.
pub fn call_id() -> String {
    let (a, b) = (super::random_u64(), super::random_u64());
    format!("call_{a:016x}{:08x}", b as u32)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::constraint::{ConstraintSpec, GrammarOptions, Grammars};
    use crate::openai::tool_calls;
    use crate::tokenizer::tests::smollm2;

    fn tools(choice: Value, parallel: Option<bool>) -> Result<Option<Tools>, ApiError> {
        let list = json!([
            {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                    "unit": {"$ref": "#/$defs/unit"}}, "required": ["city", "unit"],
                    "additionalProperties": false, "$defs": {"unit": {"enum": ["C", "F"]}}}}},
            {"type": "function", "function": {"name": "add",
                "parameters": {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99},
                    "b": {"type": "integer", "minimum": 0, "maximum": 99}}, "required": ["a", "b"],
                    "additionalProperties": false}}},
            {"type": "function", "function": {"name": "now"}},
        ]);
        read(Some(list), Some(choice), parallel)
    }

    #[test]
    fn tools_and_tool_choice_are_read_and_checked() {
        let t = tools(json!("auto"), None).unwrap().unwrap();
        assert_eq!(t.names(), ["get_weather", "add", "now"]);
        assert!(t.parallel && t.active() && t.constraint().is_none());
        assert_eq!(
            *t.list[2].parameters(),
            json!({"type": "object", "properties": {}})
        );
        let t = tools(
            json!({"type": "function", "function": {"name": "add"}}),
            Some(false),
        );
        let t = t.unwrap().unwrap();
        assert_eq!((t.names(), t.parallel), (vec!["add".to_string()], false));
        assert!(!tools(json!("none"), None).unwrap().unwrap().active());
        // No tools: nothing to do, and nothing to require.
        assert_eq!(read(None, Some(json!("auto")), None).unwrap(), None);
        assert_eq!(read(Some(json!([])), None, None).unwrap(), None);
        let f = |name: &str| json!({"type": "function", "function": {"name": name}});
        for (list, choice, param) in [
            (json!({}), json!("auto"), "tools"),
            (
                json!([{"type": "retrieval"}]),
                json!("auto"),
                "tools[0].type",
            ),
            (
                json!([{"type": "function"}]),
                json!("auto"),
                "tools[0].function",
            ),
            (json!([f("a b")]), json!("auto"), "tools[0].function.name"),
            (json!([f("")]), json!("auto"), "tools[0].function.name"),
            (
                json!([f(&"x".repeat(65))]),
                json!("auto"),
                "tools[0].function.name",
            ),
            (
                json!([f("a"), f("a")]),
                json!("auto"),
                "tools[1].function.name",
            ),
            (
                json!([{"type": "function", "function": {"name": "a", "parameters": "x"}}]),
                json!("auto"),
                "tools[0].function.parameters",
            ),
            (json!([f("a")]), json!("always"), "tool_choice"),
            (
                json!([f("a")]),
                json!({"type": "function", "function": {"name": "b"}}),
                "tool_choice",
            ),
            (json!([f("a")]), json!({"type": "function"}), "tool_choice"),
            (json!([]), json!("required"), "tool_choice"),
        ] {
            let e = read(Some(list.clone()), Some(choice.clone()), None).expect_err("bad");
            assert_eq!(e.status.as_u16(), 400);
            assert_eq!(
                e.param.as_deref(),
                Some(param),
                "{list} {choice}: {}",
                e.message
            );
        }
    }

    /// Decodes under `spec` picking allowed tokens by a seeded walk until it completes.
    fn walk(spec: &ConstraintSpec, seed: u64) -> String {
        let tok = smollm2();
        let eos = tok.eos_token_ids()[0];
        let vocab = tok.vocab_size() + 3;
        let g = Grammars::new(tok, vocab, GrammarOptions::default()).unwrap();
        let mut c = g.compile(spec).expect("compiles");
        let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let mut out = Vec::new();
        for _ in 0..400 {
            let mask = c.allowed().expect("mask");
            let allowed: Vec<u32> = (0..vocab as u32)
                .filter(|&t| mask[t as usize / 8] >> (t % 8) & 1 == 1 && t != eos)
                .collect();
            if allowed.is_empty() || c.is_complete() {
                break;
            }
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            // Short tokens first half the time, so strings end.
            let pick = if state.is_multiple_of(2) {
                allowed[state as usize / 2 % allowed.len()]
            } else {
                *allowed
                    .iter()
                    .min_by_key(|&&t| (tok.decode(&[t]).map_or(99, |s| s.len()), t))
                    .unwrap()
            };
            c.accept(pick).expect("accepts an allowed token");
            out.push(pick);
        }
        assert!(c.is_complete(), "completes: {:?}", tok.decode(&out));
        tok.decode(&out).unwrap()
    }

    #[test]
    fn a_required_call_is_one_call_of_a_declared_tool_with_valid_arguments() {
        for (choice, allowed) in [
            (json!("required"), vec!["get_weather", "add", "now"]),
            (
                json!({"type": "function", "function": {"name": "get_weather"}}),
                vec!["get_weather"],
            ),
            (
                json!({"type": "function", "function": {"name": "add"}}),
                vec!["add"],
            ),
        ] {
            let t = tools(choice, None).unwrap().unwrap();
            let Some(Kind::Grammar(lark)) = t.constraint().and_then(|c| c.kind) else {
                panic!("a grammar");
            };
            for seed in 0..3 {
                let text = walk(&ConstraintSpec::Grammar(lark.clone()), seed);
                assert!(text.starts_with("<tool_call>\n{\"name\": \""), "{text}");
                let p = tool_calls::parse(t.names(), t.parallel, &text);
                assert_eq!((p.content.as_str(), p.calls.len()), ("", 1), "{text}");
                let (name, args) = &p.calls[0];
                assert!(allowed.contains(&name.as_str()), "{text}");
                let args: Value = serde_json::from_str(args).expect("arguments are JSON");
                let tool = t.list.iter().find(|x| &x.name == name).unwrap();
                let props = tool.parameters()["properties"].as_object().unwrap();
                let obj = args.as_object().unwrap();
                assert!(obj.keys().all(|k| props.contains_key(k)), "{text}");
                if name == "get_weather" {
                    assert!(
                        ["C", "F"].contains(&obj["unit"].as_str().unwrap()),
                        "{text}"
                    );
                }
                if name == "add" {
                    assert!(obj["a"].as_u64().unwrap() <= 99, "{text}");
                }
            }
        }
    }

    fn msg(v: Value) -> ChatMessageIn {
        serde_json::from_value(v).unwrap()
    }

    fn plain(i: usize, c: Option<Value>) -> Result<String, ApiError> {
        let _ = i;
        Ok(c.and_then(|c| c.as_str().map(String::from))
            .unwrap_or_default())
    }

    #[test]
    fn the_fallback_renders_tools_results_and_calls_as_text() {
        let t = tools(json!("auto"), None).unwrap().unwrap();
        let history = || {
            vec![
                msg(json!({"role": "user", "content": "Weather in Paris?"})),
                msg(json!({"role": "assistant", "content": null, "tool_calls": [
                    {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}},
                    {"id": "call_2", "type": "function", "function": {"name": "now", "arguments": "{}"}}]})),
                msg(json!({"role": "tool", "tool_call_id": "call_1", "content": "18 C"})),
                msg(json!({"role": "tool", "tool_call_id": "call_2", "content": "noon"})),
            ]
        };
        let out = fallback_messages(history(), Some(&t), plain).unwrap();
        let roles: Vec<&str> = out.iter().map(|m| m.role.as_str()).collect();
        assert_eq!(roles, ["system", "user", "assistant", "user"]);
        assert!(out[0].content.starts_with("# Tools"));
        assert!(out[0].content.contains(&spaced(&t.list[0].spec)));
        assert!(out[0].content.contains("<tool_call>"));
        assert_eq!(
            out[2].content,
            "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>\n\
             <tool_call>\n{\"name\": \"now\", \"arguments\": {}}\n</tool_call>"
        );
        assert_eq!(
            out[3].content,
            "<tool_response>\n18 C\n</tool_response>\n<tool_response>\nnoon\n</tool_response>"
        );
        // A system message takes the tools after its own text; `none` leaves them out.
        let mut with_system = history();
        with_system.insert(0, msg(json!({"role": "developer", "content": "Be brief."})));
        let out = fallback_messages(with_system, Some(&t), plain).unwrap();
        assert_eq!(out[0].role, "system");
        assert!(out[0].content.starts_with("Be brief.\n\n# Tools"));
        assert_eq!(out.len(), 4);
        let none = tools(json!("none"), None).unwrap().unwrap();
        let out = fallback_messages(history(), Some(&none), plain).unwrap();
        assert_eq!(out[0].role, "user");
        // The default model's template takes the result.
        let tok = smollm2();
        let msgs: Vec<crate::tokenizer::ChatMessage> =
            fallback_messages(history(), Some(&t), plain)
                .unwrap()
                .into_iter()
                .map(|m| crate::tokenizer::ChatMessage::new(m.role, m.content))
                .collect();
        let prompt = tok.apply_chat_template(&msgs, true).unwrap();
        assert!(prompt.contains("<tool_response>\n18 C"), "{prompt}");
        // Bad calls in the history name the message.
        let bad = vec![msg(
            json!({"role": "assistant", "tool_calls": [{"type": "function"}]}),
        )];
        let e = fallback_messages(bad, None, plain).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("messages[0].tool_calls"));
    }

    #[test]
    fn a_template_that_renders_tools_gets_them_and_the_calls_as_objects() {
        let t = tools(json!("auto"), None).unwrap().unwrap();
        let history = vec![
            msg(json!({"role": "developer", "content": "Be brief."})),
            msg(json!({"role": "assistant", "content": null, "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": "{\"a\": 1}"}}]})),
            msg(json!({"role": "tool", "tool_call_id": "call_1", "content": "2"})),
        ];
        let msgs = template_messages(&history, plain).unwrap();
        assert_eq!(
            msgs[0],
            crate::tokenizer::ChatMessage::new("system", "Be brief.")
        );
        assert_eq!(
            msgs[1].tool_calls,
            Some(
                json!([{"id": "call_1", "type": "function", "function": {"name": "add", "arguments": {"a": 1}}}])
            )
        );
        assert_eq!(msgs[2].tool_call_id.as_deref(), Some("call_1"));
        let template = crate::tokenizer::ChatTemplate::new(
            "{% for t in tools %}{{ t.function.name }} {% endfor %}|{% for m in messages %}\
             {% for c in m.tool_calls or [] %}{{ c.function.name }}({{ c.function.arguments.a }}){% endfor %}\
             {{ m.tool_call_id or '' }}:{{ m.content }};{% endfor %}",
        )
        .unwrap();
        let out = template
            .render_with_tools(&msgs, Some(&t.specs()), false, None, None)
            .unwrap();
        assert_eq!(out, "get_weather add now |:Be brief.;add(1):;call_1:2;");
    }

    #[test]
    fn call_ids_differ() {
        let (a, b) = (call_id(), call_id());
        assert!(a.starts_with("call_") && a.len() == 29, "{a}");
        assert_ne!(a, b);
    }
}
