//! Tool calls read back out of a model's text, incrementally, so that a streamed answer and a
//! whole one are the same calls with the same `arguments` strings.
//!
//! The format is Hermes/Qwen's, the one the fallback prompt asks for ([`super::tools`]) and
//! the one `tool_choice: "required"` enforces:
//!
//! ```text
//! <tool_call>
//! {"name": "get_weather", "arguments": {"city": "Paris"}}
//! </tool_call>
//! ```
//!
//! [`CallParser`] takes the text as it is generated, in pieces cut anywhere, and turns it into
//! [`Piece`]s: text outside the calls, the start of a call (its name), and the arguments' JSON
//! text as it arrives. What it emits depends only on the text, never on where it was cut
//! (property-tested below), and a whole answer is parsed by the same parser in one piece, so
//! the streamed argument deltas always concatenate to the whole answer's `arguments`.
//!
//! - Text that may still become `<tool_call>` is held back, so a call's tag never leaks into
//!   `content`.
//! - A call is committed once `{"name": "<declared tool>", "arguments": {` has been read:
//!   its arguments then stream as written (a call cut off by `max_tokens` keeps what it had).
//! - A call written otherwise (keys in another order, `parameters` for `arguments`,
//!   arguments as a JSON string) is held until `</tool_call>` and then parsed whole; its
//!   arguments are then compact JSON. Anything inside the tags that is not a call of a
//!   declared tool stays plain text, tags included.
//! - A whole output that is one JSON object with `name` and `arguments` is a call too (small
//!   models often drop the tags): an output starting with `{` is held back to its end.
//! - Without `parallel_tool_calls`, text after the first call is plain text.

use serde_json::Value;

const OPEN: &str = "<tool_call>";
const CLOSE: &str = "</tool_call>";

/// What the parser makes of the text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Piece {
    /// Text outside any call (`content`).
    Text(String),
    /// Call number `index` (from 0) of the tool `name` starts.
    Call { index: usize, name: String },
    /// More of call `index`'s arguments (JSON text).
    Args { index: usize, text: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Outside calls.
    Text,
    /// At the start of an output that begins with `{`: held to the end (a bare JSON call?).
    Bare,
    /// After `<tool_call>`, reading `{"name": ..., "arguments": `.
    Header,
    /// Inside a call not in the streamable shape: held until `</tool_call>`.
    Held,
    /// Inside the arguments object.
    Args {
        depth: u32,
        in_string: bool,
        escaped: bool,
    },
    /// After the arguments: `}` and `</tool_call>`.
    Tail,
}

/// Finds tool calls in text fed piece by piece (see the module doc).
#[derive(Debug, Clone)]
pub struct CallParser {
    names: Vec<String>,
    parallel: bool,
    state: State,
    /// Text read and not yet decided on.
    pending: String,
    /// Calls started so far.
    calls: usize,
    /// Whether anything but whitespace has been read (the bare-JSON rule applies before).
    started: bool,
}

/// How far the header of a call has been read.
enum Header {
    Incomplete,
    Mismatch,
    /// The tool's name, and the header's length in bytes (up to the arguments' `{`).
    Done(String, usize),
}

impl CallParser {
    /// A parser for calls of the tools `names`; several calls only with `parallel`.
    pub fn new(names: Vec<String>, parallel: bool) -> Self {
        Self {
            names,
            parallel,
            state: State::Text,
            pending: String::new(),
            calls: 0,
            started: false,
        }
    }

    /// How many calls were started.
    pub fn calls(&self) -> usize {
        self.calls
    }

    /// Reads more text; returns what can be decided now.
    pub fn push(&mut self, text: &str) -> Vec<Piece> {
        self.pending.push_str(text);
        let mut out = Vec::new();
        while self.step(&mut out) {}
        out
    }

    /// The text has ended: whatever was held back is decided.
    pub fn finish(&mut self) -> Vec<Piece> {
        let mut out = Vec::new();
        while self.step(&mut out) {}
        let rest = std::mem::take(&mut self.pending);
        match self.state {
            State::Text => text(&mut out, rest),
            State::Bare => {
                self.state = State::Text;
                self.started = true;
                match self.whole_call(rest.trim()) {
                    Some((name, args)) => self.call(&mut out, name, args),
                    None => {
                        // Not one call: read as ordinary text after all.
                        self.pending = rest;
                        out.extend(self.finish());
                    }
                }
            }
            State::Header | State::Held => text(&mut out, format!("{OPEN}{rest}")),
            State::Args { .. } | State::Tail => {}
        }
        self.state = State::Text;
        out
    }

    fn can_call(&self) -> bool {
        self.parallel || self.calls == 0
    }

    /// One decision; false when more text is needed.
    fn step(&mut self, out: &mut Vec<Piece>) -> bool {
        match self.state {
            State::Text => self.step_text(out),
            State::Bare => false,
            State::Header => match header(&self.pending) {
                Header::Incomplete => false,
                Header::Done(name, len) if self.names.contains(&name) => {
                    self.pending.drain(..len);
                    out.push(Piece::Call {
                        index: self.calls,
                        name,
                    });
                    self.calls += 1;
                    self.state = State::Args {
                        depth: 0,
                        in_string: false,
                        escaped: false,
                    };
                    true
                }
                Header::Done(..) | Header::Mismatch => {
                    self.state = State::Held;
                    true
                }
            },
            State::Held => self.step_held(out),
            State::Args { .. } => self.step_args(out),
            State::Tail => self.step_tail(),
        }
    }

    fn step_text(&mut self, out: &mut Vec<Piece>) -> bool {
        if !self.can_call() {
            let all = std::mem::take(&mut self.pending);
            text(out, all);
            return false;
        }
        if !self.started {
            let t = self.pending.trim_start();
            if t.is_empty() {
                return false;
            }
            self.started = true;
            if t.starts_with('{') {
                self.state = State::Bare;
                return false;
            }
        }
        if let Some(at) = self.pending.find(OPEN) {
            let before: String = self.pending.drain(..at + OPEN.len()).collect();
            text(out, before[..at].to_string());
            self.state = State::Header;
            return true;
        }
        let keep = held_prefix(&self.pending, OPEN);
        let emit: String = self.pending.drain(..self.pending.len() - keep).collect();
        text(out, emit);
        false
    }

    fn step_held(&mut self, out: &mut Vec<Piece>) -> bool {
        let Some(at) = self.pending.find(CLOSE) else {
            return false;
        };
        let block: String = self.pending.drain(..at + CLOSE.len()).collect();
        let body = &block[..at];
        match self.whole_call(body.trim()) {
            Some((name, args)) => self.call(out, name, args),
            None => text(out, format!("{OPEN}{block}")),
        }
        self.state = State::Text;
        true
    }

    fn step_args(&mut self, out: &mut Vec<Piece>) -> bool {
        let State::Args {
            mut depth,
            mut in_string,
            mut escaped,
        } = self.state
        else {
            return false;
        };
        let mut end = None;
        for (i, c) in self.pending.char_indices() {
            if in_string {
                match (escaped, c) {
                    (true, _) => escaped = false,
                    (false, '\\') => escaped = true,
                    (false, '"') => in_string = false,
                    _ => {}
                }
                continue;
            }
            match c {
                '"' => in_string = true,
                '{' | '[' => depth += 1,
                '}' | ']' => depth = depth.saturating_sub(1),
                _ => {}
            }
            if depth == 0 {
                end = Some(i + c.len_utf8());
                break;
            }
        }
        let index = self.calls - 1;
        let take = end.unwrap_or(self.pending.len());
        let args: String = self.pending.drain(..take).collect();
        if !args.is_empty() {
            out.push(Piece::Args { index, text: args });
        }
        match end {
            Some(_) => {
                self.state = State::Tail;
                true
            }
            None => {
                self.state = State::Args {
                    depth,
                    in_string,
                    escaped,
                };
                false
            }
        }
    }

    /// After the arguments: the call object's `}` and `</tool_call>`, both optional; anything
    /// else is text again.
    fn step_tail(&mut self) -> bool {
        let s = self.pending.trim_start();
        let s = match s.strip_prefix('}') {
            Some(after) => after.trim_start(),
            None if s.is_empty() => return false,
            None => s,
        };
        if let Some(after) = s.strip_prefix(CLOSE) {
            let used = self.pending.len() - after.len();
            self.pending.drain(..used);
        } else if CLOSE.starts_with(s) {
            return false;
        } else {
            let used = self.pending.len() - s.len();
            self.pending.drain(..used);
        }
        self.state = State::Text;
        true
    }

    /// A call read whole: `{"name": <declared tool>, "arguments": {...}}` (or `parameters`,
    /// or the arguments as JSON text).
    fn whole_call(&self, body: &str) -> Option<(String, String)> {
        // Reached only from states entered while a call may still come.
        debug_assert!(self.can_call());
        let v: Value = serde_json::from_str(body).ok()?;
        let name = v.get("name")?.as_str()?;
        if !self.names.iter().any(|n| n == name) {
            return None;
        }
        let args = v.get("arguments").or_else(|| v.get("parameters"))?;
        let args = match args {
            Value::Object(_) => args.to_string(),
            Value::String(s) => match serde_json::from_str::<Value>(s) {
                Ok(Value::Object(_)) => s.clone(),
                _ => return None,
            },
            _ => return None,
        };
        Some((name.to_string(), args))
    }

    fn call(&mut self, out: &mut Vec<Piece>, name: String, args: String) {
        let index = self.calls;
        self.calls += 1;
        out.push(Piece::Call { index, name });
        out.push(Piece::Args { index, text: args });
    }
}

fn text(out: &mut Vec<Piece>, s: String) {
    if !s.is_empty() {
        out.push(Piece::Text(s));
    }
}

/// The length of the longest end of `s` that `tag` starts with (held back: it may become
/// the tag). `tag` is ASCII, so the cut is on a character boundary.
fn held_prefix(s: &str, tag: &str) -> usize {
    (1..tag.len())
        .rev()
        .find(|&k| s.ends_with(&tag[..k]))
        .unwrap_or(0)
}

/// Reads `{"name": "<string>", "arguments": ` up to the `{` that opens the arguments.
fn header(s: &str) -> Header {
    let mut c = Cursor { s, at: 0 };
    let parsed = (|| {
        for lit in ["{", "\"name\"", ":"] {
            c.ws();
            c.lit(lit)?;
        }
        c.ws();
        let name = c.string()?;
        for lit in [",", "\"arguments\"", ":"] {
            c.ws();
            c.lit(lit)?;
        }
        c.ws();
        match c.rest().chars().next() {
            None => Err(Header::Incomplete),
            Some('{') => Ok(name),
            Some(_) => Err(Header::Mismatch),
        }
    })();
    match parsed {
        Ok(name) => Header::Done(name, c.at),
        Err(h) => h,
    }
}

struct Cursor<'a> {
    s: &'a str,
    at: usize,
}

impl Cursor<'_> {
    fn rest(&self) -> &str {
        &self.s[self.at..]
    }

    fn ws(&mut self) {
        let rest = self.rest();
        self.at += rest.len() - rest.trim_start().len();
    }

    fn lit(&mut self, lit: &str) -> Result<(), Header> {
        let rest = self.rest();
        if rest.starts_with(lit) {
            self.at += lit.len();
            Ok(())
        } else if lit.starts_with(rest) {
            Err(Header::Incomplete)
        } else {
            Err(Header::Mismatch)
        }
    }

    /// A JSON string (a tool name: short, so a longer one is no header).
    fn string(&mut self) -> Result<String, Header> {
        let rest = self.rest();
        if rest.is_empty() {
            return Err(Header::Incomplete);
        }
        if !rest.starts_with('"') {
            return Err(Header::Mismatch);
        }
        let mut escaped = false;
        for (i, ch) in rest.char_indices().skip(1) {
            if i > 256 {
                return Err(Header::Mismatch);
            }
            match (escaped, ch) {
                (true, _) => escaped = false,
                (false, '\\') => escaped = true,
                (false, '"') => {
                    let name = serde_json::from_str(&rest[..=i]).map_err(|_| Header::Mismatch)?;
                    self.at += i + 1;
                    return Ok(name);
                }
                _ => {}
            }
        }
        Err(Header::Incomplete)
    }
}

/// A whole answer's text outside the calls, and its calls as (name, arguments).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Parsed {
    pub content: String,
    pub calls: Vec<(String, String)>,
}

/// Parses a whole answer (the same parser a stream uses, fed at once).
pub fn parse(names: Vec<String>, parallel: bool, text: &str) -> Parsed {
    let mut p = CallParser::new(names, parallel);
    let mut pieces = p.push(text);
    pieces.extend(p.finish());
    gather(pieces)
}

/// Folds pieces into content and calls.
pub fn gather(pieces: Vec<Piece>) -> Parsed {
    let mut out = Parsed::default();
    for piece in pieces {
        match piece {
            Piece::Text(t) => out.content.push_str(&t),
            Piece::Call { name, .. } => out.calls.push((name, String::new())),
            Piece::Args { index, text } => {
                if let Some(call) = out.calls.get_mut(index) {
                    call.1.push_str(&text);
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names() -> Vec<String> {
        vec!["get_weather".into(), "add".into()]
    }

    /// Fed in two pieces cut at every byte (on character boundaries), and in single
    /// characters: always what the whole text gives.
    fn parse_every_way(text: &str, parallel: bool) -> Parsed {
        let whole = parse(names(), parallel, text);
        for cut in (0..=text.len()).filter(|&i| text.is_char_boundary(i)) {
            let mut p = CallParser::new(names(), parallel);
            let mut pieces = p.push(&text[..cut]);
            pieces.extend(p.push(&text[cut..]));
            pieces.extend(p.finish());
            assert_eq!(gather(pieces), whole, "cut at {cut} of {text:?}");
        }
        let mut p = CallParser::new(names(), parallel);
        let mut pieces: Vec<Piece> = text.chars().flat_map(|c| p.push(&c.to_string())).collect();
        pieces.extend(p.finish());
        assert_eq!(gather(pieces), whole, "char by char: {text:?}");
        whole
    }

    fn call(name: &str, args: &str) -> (String, String) {
        (name.into(), args.into())
    }

    #[test]
    fn calls_are_found_however_the_text_is_cut() {
        let text = "Let me check.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris \\\"}\\\" é\", \"days\": [1, {\"x\": 2}]}}\n</tool_call>\n<tool_call>{\"name\":\"add\",\"arguments\":{\"a\":1,\"b\":2}}</tool_call> done";
        let p = parse_every_way(text, true);
        assert_eq!(p.content, "Let me check.\n\n done");
        assert_eq!(
            p.calls,
            [
                call(
                    "get_weather",
                    "{\"city\": \"Paris \\\"}\\\" é\", \"days\": [1, {\"x\": 2}]}"
                ),
                call("add", "{\"a\":1,\"b\":2}"),
            ]
        );
        // Not parallel: the second block is text.
        let p = parse_every_way(text, false);
        assert_eq!(p.calls.len(), 1);
        assert!(
            p.content.ends_with(
                "<tool_call>{\"name\":\"add\",\"arguments\":{\"a\":1,\"b\":2}}</tool_call> done"
            ),
            "{}",
            p.content
        );
    }

    #[test]
    fn the_enforced_shape_parses_to_one_call_and_no_content() {
        let p = parse_every_way(
            "<tool_call>\n{\"name\": \"add\", \"arguments\": {\"a\": 1, \"b\": 2}}\n</tool_call>",
            true,
        );
        assert_eq!(p.content, "");
        assert_eq!(p.calls, [call("add", "{\"a\": 1, \"b\": 2}")]);
    }

    #[test]
    fn other_shapes_are_parsed_whole() {
        // Keys in another order, `parameters`, arguments as JSON text.
        for (text, args) in [
            (
                "<tool_call>{\"arguments\": {\"a\": 1}, \"name\": \"add\"}</tool_call>",
                "{\"a\":1}",
            ),
            (
                "<tool_call>{\"name\": \"add\", \"parameters\": {\"a\": 1}}</tool_call>",
                "{\"a\":1}",
            ),
            (
                "<tool_call>{\"name\": \"add\", \"arguments\": \"{\\\"a\\\": 1}\"}</tool_call>",
                "{\"a\": 1}",
            ),
            (
                "  {\"name\": \"add\", \"arguments\": {\"a\": 1}}\n",
                "{\"a\":1}",
            ),
        ] {
            let p = parse_every_way(text, true);
            assert_eq!(p.calls, [call("add", args)], "{text}");
            assert_eq!(p.content, "", "{text}");
        }
    }

    #[test]
    fn what_is_not_a_call_stays_text() {
        for text in [
            "a < b and <tool_ is not a tag",
            "<tool_call>{\"name\": \"unknown\", \"arguments\": {}}</tool_call>",
            "<tool_call>not json</tool_call> after",
            "<tool_call>{\"name\": \"add\"",
            "{\"name\": \"add\", \"arguments\": {}} and more",
            "{\"answer\": 42}",
            "{ unfinished",
            "<tool_call>{\"name\": \"add\", \"arguments\": [1]}</tool_call>",
            "",
            "   ",
        ] {
            let p = parse_every_way(text, true);
            assert_eq!(p.calls, [], "{text}");
            assert_eq!(p.content, text);
        }
    }

    #[test]
    fn a_cut_off_call_keeps_its_arguments_so_far() {
        let p = parse_every_way(
            "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Par",
            true,
        );
        assert_eq!(p.calls, [call("get_weather", "{\"city\": \"Par")]);
        assert_eq!(p.content, "");
    }

    #[test]
    fn text_after_a_call_without_the_closing_tag_is_content() {
        let p = parse_every_way(
            "<tool_call>{\"name\": \"add\", \"arguments\": {}} OK </tool_",
            true,
        );
        assert_eq!(p.calls, [call("add", "{}")]);
        assert_eq!(p.content, "OK </tool_");
    }

    #[test]
    fn the_tag_is_held_back_while_it_may_come() {
        let mut p = CallParser::new(names(), true);
        assert_eq!(p.push("Hi <tool"), [Piece::Text("Hi ".into())]);
        assert_eq!(p.push("_call>"), []);
        assert_eq!(
            p.push("{\"name\": \"add\", \"arguments\": {\"a\""),
            [
                Piece::Call {
                    index: 0,
                    name: "add".into()
                },
                Piece::Args {
                    index: 0,
                    text: "{\"a\"".into()
                }
            ]
        );
        assert_eq!(p.calls(), 1);
    }
}
