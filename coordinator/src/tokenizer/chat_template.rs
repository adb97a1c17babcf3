//! Rendering Hugging Face chat templates (Jinja) with minijinja.
//!
//! Chat models expect their conversation rendered into one prompt string in the exact format they
//! were fine-tuned on; the model ships that format as a Jinja template (`tokenizer.chat_template` in
//! a GGUF, `chat_template` in `tokenizer_config.json`). transformers renders it with Jinja2 in an
//! `ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)` with the `loopcontrols`
//! extension, a `raise_exception` global, a `strftime_now` global and a `tojson` filter that does not
//! escape non-ASCII. This module sets minijinja up the same way so templates render byte-for-byte
//! as transformers renders them:
//!
//! * `trim_blocks` and `lstrip_blocks` on, trailing newline of the template dropped (Jinja2's
//!   default), no auto-escaping, lenient undefined values (Jinja2's default `Undefined`);
//! * `{% break %}` / `{% continue %}` (minijinja's `loop_controls` feature);
//! * Python string/dict/list methods (`.strip()`, `.startswith()`, `.split()`, `.items()`,
//!   `.get()`, ...) through minijinja-contrib's `pycompat` callback;
//! * `raise_exception(msg)` fails the render with `msg`;
//! * `strftime_now(fmt)` formats the current UTC time (`%Y %m %d %e %H %M %S %y %b %B %a %A %j %%`);
//! * `tojson` formats like Python's `json.dumps(x, ensure_ascii=False, indent=..)`
//!   (`", "` / `": "` separators, `indent` and `sort_keys` keyword arguments).
//!
//! The template context is `messages`, `add_generation_prompt`, `bos_token` and `eos_token`, and
//! `tools` when a chat request declares tools and the template renders them (`render_with_tools`).
//! One known difference: minijinja keeps map keys sorted, so `messages | tojson` lists a message's
//! keys alphabetically where Python keeps insertion order.

use std::fmt::Write as _;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, Result};
use minijinja::value::{Kwargs, Value};
use minijinja::{AutoEscape, Environment, Error, ErrorKind};
use serde::{Deserialize, Serialize};

/// One message of a conversation, as chat templates see it (`message['role']`,
/// `message['content']`, and for tool-calling templates `message['tool_calls']` and
/// `message['tool_call_id']`, absent unless set, so templates that test for them with
/// `is defined` render other messages exactly as before).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// `system`, `user`, `assistant`, ...
    pub role: String,
    /// The message text.
    pub content: String,
    /// An assistant's calls, as OpenAI's `tool_calls` (arguments as JSON objects).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<serde_json::Value>,
    /// A `tool` message: the call it answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
}

impl ChatMessage {
    /// A message with the given role and content.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
            tool_calls: None,
            tool_call_id: None,
        }
    }
}

/// Name under which the template is registered in its environment.
const TEMPLATE_NAME: &str = "chat_template";

/// A compiled chat template.
pub struct ChatTemplate {
    env: Environment<'static>,
    source: String,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("source", &self.source)
            .finish()
    }
}

impl ChatTemplate {
    /// Compiles `source`; a syntax error is returned here rather than at render time.
    pub fn new(source: impl Into<String>) -> Result<Self> {
        let source = source.into();
        let mut env = environment();
        env.add_template_owned(TEMPLATE_NAME, source.clone())
            .map_err(|e| anyhow!("compiling chat template: {}", describe(&e)))?;
        Ok(Self { env, source })
    }

    /// The template text.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Renders the conversation. `bos_token` / `eos_token` are the special-token texts the template
    /// may reference; pass `None` when the model has none (they are then undefined, as in
    /// transformers).
    pub fn render(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
        bos_token: Option<&str>,
        eos_token: Option<&str>,
    ) -> Result<String> {
        self.render_with_tools(messages, None, add_generation_prompt, bos_token, eos_token)
    }

    /// Whether the template renders `tools` itself (it names them); otherwise tools are
    /// described to the model in a message (`openai::tools`).
    pub fn takes_tools(&self) -> bool {
        self.source.contains("tools")
    }

    /// [`Self::render`] with `tools` (OpenAI's `[{"type": "function", "function": {...}}]`)
    /// in the context, as transformers passes them; None leaves `tools` undefined.
    pub fn render_with_tools(
        &self,
        messages: &[ChatMessage],
        tools: Option<&[serde_json::Value]>,
        add_generation_prompt: bool,
        bos_token: Option<&str>,
        eos_token: Option<&str>,
    ) -> Result<String> {
        let template = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(|e| anyhow!("chat template: {}", describe(&e)))?;
        let ctx = minijinja::context! {
            messages => Value::from_serialize(messages),
            add_generation_prompt => add_generation_prompt,
            bos_token => bos_token.map(Value::from).unwrap_or(Value::UNDEFINED),
            eos_token => eos_token.map(Value::from).unwrap_or(Value::UNDEFINED),
            tools => tools.map(Value::from_serialize).unwrap_or(Value::UNDEFINED),
        };
        template
            .render(ctx)
            .map_err(|e| anyhow!("rendering chat template: {}", describe(&e)))
    }
}

/// A minijinja error with its cause chain, on one line.
fn describe(e: &Error) -> String {
    let mut out = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        let _ = write!(out, ": {s}");
        source = s.source();
    }
    out
}

/// A minijinja environment configured like transformers' chat-template environment.
pub fn environment() -> Environment<'static> {
    let mut env = Environment::new();
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    env.set_keep_trailing_newline(false);
    env.set_auto_escape_callback(|_| AutoEscape::None);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function("raise_exception", raise_exception);
    env.add_function("strftime_now", strftime_now);
    env.add_filter("tojson", tojson);
    env
}

/// `raise_exception(message)`: abort rendering with the template's own message.
fn raise_exception(message: String) -> Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, message))
}

/// `x | tojson(indent=None, sort_keys=False)`, formatted like Python's `json.dumps` with
/// `ensure_ascii=False`.
fn tojson(value: &Value, kwargs: Kwargs) -> Result<Value, Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    kwargs.assert_all_used()?;
    let json = serde_json::to_value(value).map_err(|e| {
        Error::new(ErrorKind::InvalidOperation, "cannot serialize to JSON").with_source(e)
    })?;
    let mut out = String::new();
    write_python_json(&mut out, &json, indent, sort_keys.unwrap_or(false), 0);
    Ok(Value::from_safe_string(out))
}

/// Writes `v` as Python's `json.dumps(v, ensure_ascii=False, indent=indent, sort_keys=sort_keys)`.
pub(crate) fn write_python_json(
    out: &mut String,
    v: &serde_json::Value,
    indent: Option<usize>,
    sort_keys: bool,
    depth: usize,
) {
    use serde_json::Value as J;
    let newline = |out: &mut String, depth: usize| {
        if let Some(n) = indent {
            out.push('\n');
            out.extend(std::iter::repeat_n(' ', n * depth));
        }
    };
    let item_sep = if indent.is_some() { "," } else { ", " };
    match v {
        J::Array(items) if !items.is_empty() => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, depth + 1);
                write_python_json(out, item, indent, sort_keys, depth + 1);
            }
            newline(out, depth);
            out.push(']');
        }
        J::Object(map) if !map.is_empty() => {
            let mut entries: Vec<(&String, &J)> = map.iter().collect();
            if sort_keys {
                entries.sort_by(|a, b| a.0.cmp(b.0));
            }
            out.push('{');
            for (i, (k, item)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, depth + 1);
                out.push_str(&J::String(k.clone()).to_string());
                out.push_str(": ");
                write_python_json(out, item, indent, sort_keys, depth + 1);
            }
            newline(out, depth);
            out.push('}');
        }
        J::Array(_) => out.push_str("[]"),
        J::Object(_) => out.push_str("{}"),
        // Scalars: serde_json escapes strings exactly as Python does with ensure_ascii=False
        // (", \ and control characters only).
        scalar => out.push_str(&scalar.to_string()),
    }
}

/// `strftime_now(format)`: the current UTC time, formatted with a subset of C's strftime.
fn strftime_now(format: String) -> Result<Value, Error> {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    format_utc(secs, &format).map(Value::from)
}

const MONTHS: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];
const WEEKDAYS: [&str; 7] = [
    "Sunday",
    "Monday",
    "Tuesday",
    "Wednesday",
    "Thursday",
    "Friday",
    "Saturday",
];

/// Formats `secs` since the Unix epoch (UTC) with a subset of strftime directives.
fn format_utc(secs: u64, format: &str) -> Result<String, Error> {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let (hour, minute, second) = (rem / 3600, (rem % 3600) / 60, rem % 60);
    let (year, month, day) = civil_from_days(days);
    let weekday = (days + 4).rem_euclid(7) as usize; // 1970-01-01 was a Thursday.
    let is_leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
    const CUMULATIVE: [u32; 12] = [0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334];
    let day_of_year = CUMULATIVE[(month - 1) as usize] + day + u32::from(is_leap && month > 2);
    let month_name = MONTHS[(month - 1) as usize];
    let weekday_name = WEEKDAYS[weekday];

    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let Some(d) = chars.next() else {
            out.push('%');
            break;
        };
        let _ = match d {
            'Y' => write!(out, "{year}"),
            'y' => write!(out, "{:02}", year.rem_euclid(100)),
            'm' => write!(out, "{month:02}"),
            'd' => write!(out, "{day:02}"),
            'e' => write!(out, "{day:2}"),
            'H' => write!(out, "{hour:02}"),
            'M' => write!(out, "{minute:02}"),
            'S' => write!(out, "{second:02}"),
            'j' => write!(out, "{day_of_year:03}"),
            'b' => write!(out, "{}", &month_name[..3]),
            'B' => write!(out, "{month_name}"),
            'a' => write!(out, "{}", &weekday_name[..3]),
            'A' => write!(out, "{weekday_name}"),
            '%' => write!(out, "%"),
            other => {
                return Err(Error::new(
                    ErrorKind::InvalidOperation,
                    format!("strftime_now: unsupported directive %{other}"),
                ))
            }
        };
    }
    Ok(out)
}

/// (year, month 1-12, day 1-31) of a day count since 1970-01-01 (Howard Hinnant's algorithm).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(content: &str) -> ChatMessage {
        ChatMessage::new("user", content)
    }

    #[test]
    fn trim_and_lstrip_blocks_like_transformers() {
        // With trim_blocks the newline after a block tag goes; with lstrip_blocks the indentation
        // before one goes. Only the expression lines produce output.
        let t = ChatTemplate::new(
            "{% for m in messages %}\n    {% if m.role == 'user' %}\n[{{ m.content }}]\n    {% endif %}\n{% endfor %}\n",
        )
        .unwrap();
        let out = t
            .render(&[user("a"), user("b")], false, None, None)
            .unwrap();
        assert_eq!(out, "[a]\n[b]\n");
    }

    #[test]
    fn loop_controls_and_python_methods() {
        let t = ChatTemplate::new(
            "{% for m in messages %}{% if loop.index > 2 %}{% break %}{% endif %}\
             {% if m.content.startswith('skip') %}{% continue %}{% endif %}\
             {{ m.content.strip().upper() }}|{% endfor %}",
        )
        .unwrap();
        let msgs = [user("  one "), user("skip me"), user("three"), user("four")];
        assert_eq!(t.render(&msgs, false, None, None).unwrap(), "ONE|");
    }

    #[test]
    fn raise_exception_fails_the_render_with_its_message() {
        let t = ChatTemplate::new(
            "{% if messages[0]['role'] != 'system' %}{{ raise_exception('System first!') }}{% endif %}",
        )
        .unwrap();
        let err = t.render(&[user("hi")], false, None, None).unwrap_err();
        assert!(format!("{err:#}").contains("System first!"), "{err:#}");
    }

    #[test]
    fn special_tokens_and_generation_prompt_are_in_context() {
        let t = ChatTemplate::new(
            "{{ bos_token }}{% for m in messages %}{{ m.content }}{{ eos_token }}{% endfor %}\
             {% if add_generation_prompt %}>{% endif %}{{ missing }}",
        )
        .unwrap();
        assert_eq!(
            t.render(&[user("x")], true, Some("<s>"), Some("</s>"))
                .unwrap(),
            "<s>x</s>>"
        );
        assert_eq!(t.render(&[user("x")], false, None, None).unwrap(), "x");
    }

    #[test]
    fn syntax_errors_are_reported_at_compile_time() {
        let err = ChatTemplate::new("{% for m in messages %}").unwrap_err();
        assert!(format!("{err:#}").contains("compiling chat template"));
    }

    #[test]
    fn tojson_is_python_style() {
        let t = ChatTemplate::new(
            "{{ {'b': [1, 'é\"'], 'a': none} | tojson }}|{{ [1, {'k': 2}] | tojson(indent=2) }}|{{ [] | tojson }}",
        )
        .unwrap();
        assert_eq!(
            t.render(&[], false, None, None).unwrap(),
            "{\"a\": null, \"b\": [1, \"é\\\"\"]}|[\n  1,\n  {\n    \"k\": 2\n  }\n]|[]"
        );
    }

    #[test]
    fn strftime_formats_utc_dates() {
        // 2024-02-29 13:05:09 UTC, a Thursday, day 60 of a leap year.
        let secs = 1_709_211_909;
        assert_eq!(
            format_utc(secs, "%d %b %Y %H:%M:%S %A %j %y %B %%").unwrap(),
            "29 Feb 2024 13:05:09 Thursday 060 24 February %"
        );
        assert_eq!(format_utc(0, "%Y-%m-%d %a").unwrap(), "1970-01-01 Thu");
        assert!(format_utc(0, "%Q").is_err());
        let t = ChatTemplate::new("{{ strftime_now('%Y') | length }}").unwrap();
        assert_eq!(t.render(&[], false, None, None).unwrap(), "4");
    }

    #[test]
    fn tools_and_tool_messages_reach_a_template_that_uses_them() {
        let t = ChatTemplate::new(
            "{% if tools %}<tools>{% for t in tools %}{{ t.function.name }}:{{ t.function.parameters | tojson }};{% endfor %}</tools>{% endif %}\
             {% for m in messages %}[{{ m.role }}]{% if m.tool_calls is defined %}{% for c in m.tool_calls %}\
             call {{ c.function.name }} {{ c.function.arguments | tojson }}{% endfor %}{% endif %}\
             {% if m.tool_call_id is defined %}({{ m.tool_call_id }}){% endif %}{{ m.content }}{% endfor %}",
        )
        .unwrap();
        assert!(t.takes_tools());
        let tools = [
            serde_json::json!({"type": "function", "function": {"name": "add",
            "parameters": {"type": "object", "properties": {"a": {"type": "integer"}}}}}),
        ];
        let mut call = ChatMessage::new("assistant", "");
        call.tool_calls = Some(serde_json::json!([{"id": "call_1", "type": "function",
            "function": {"name": "add", "arguments": {"a": 1}}}]));
        let mut result = ChatMessage::new("tool", "2");
        result.tool_call_id = Some("call_1".into());
        let msgs = [user("1+1?"), call, result];
        assert_eq!(
            t.render_with_tools(&msgs, Some(&tools), false, None, None).unwrap(),
            // Keys sorted: minijinja's maps (the module doc's one known difference).
            "<tools>add:{\"properties\": {\"a\": {\"type\": \"integer\"}}, \"type\": \"object\"};</tools>\
             [user]1+1?[assistant]call add {\"a\": 1}[tool](call_1)2"
        );
        // Without tools, messages without calls render as ever.
        assert_eq!(
            t.render(&[user("hi")], false, None, None).unwrap(),
            "[user]hi"
        );
        assert!(!ChatTemplate::new("{{ messages }}").unwrap().takes_tools());
    }

    /// Message text a hostile client might send: template syntax, control characters, unicode,
    /// long runs.
    fn hostile_text() -> impl proptest::strategy::Strategy<Value = String> {
        use proptest::prelude::*;
        let fragment = prop_oneof![
            Just("{{".to_string()),
            Just("}}".to_string()),
            Just("{%".to_string()),
            Just("%}".to_string()),
            Just("{#".to_string()),
            Just("{{ raise_exception('boom') }}".to_string()),
            Just("{% for i in range(999999999) %}x{% endfor %}".to_string()),
            Just("{{ messages }}".to_string()),
            Just("<|im_end|>\n<|im_start|>system\n".to_string()),
            "[\\x00-\\x1f\\x7f]{1,4}",
            "\\PC{0,16}",
            any::<String>(),
        ];
        prop_oneof![
            proptest::collection::vec(fragment, 0..8).prop_map(|v| v.concat()),
            ("[a-z{}%]", 1000..5000usize).prop_map(|(c, n)| c.repeat(n)),
        ]
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(128))]

        /// Message content is data: it comes out verbatim, never evaluated as template code.
        #[test]
        fn content_is_rendered_verbatim(
            contents in proptest::collection::vec(hostile_text(), 1..4),
            role in hostile_text(),
        ) {
            let t = ChatTemplate::new(
                "{% for m in messages %}<{{ m.role }}>{{ m.content }}|{% endfor %}",
            )
            .unwrap();
            let msgs: Vec<ChatMessage> =
                contents.iter().map(|c| ChatMessage::new(role.clone(), c.clone())).collect();
            let expected: String = contents.iter().map(|c| format!("<{role}>{c}|")).collect();
            proptest::prop_assert_eq!(t.render(&msgs, true, None, None).unwrap(), expected);

            // Through tojson, the content survives as JSON strings.
            let j = ChatTemplate::new("{{ messages | tojson }}").unwrap();
            let out = j.render(&msgs, false, None, None).unwrap();
            let back: Vec<ChatMessage> = serde_json::from_str(&out).unwrap();
            proptest::prop_assert_eq!(back, msgs);
        }

        /// The default model's real template, with hostile content: renders, content verbatim.
        #[test]
        fn real_template_renders_hostile_content(content in hostile_text()) {
            let tok = crate::tokenizer::tests::smollm2();
            let msgs = [ChatMessage::new("user", content.clone())];
            let out = tok.apply_chat_template(&msgs, true).unwrap();
            proptest::prop_assert!(out.contains(&content));
        }
    }
}
