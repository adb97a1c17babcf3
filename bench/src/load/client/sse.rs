//! Server-sent events, just enough of them for OpenAI streaming: bytes arrive in arbitrary
//! pieces; complete events come out as their `data` payloads (several `data:` lines of one
//! event joined with newlines). Comments (`:`) and other fields (`event:`, `id:`) are skipped,
//! as OpenAI-compatible servers put everything in `data`.

/// Splits a byte stream into event payloads.
#[derive(Default)]
pub struct SseParser {
    /// Bytes after the last complete line.
    partial: Vec<u8>,
    /// `data` lines of the event being read.
    data: Vec<String>,
}

impl SseParser {
    /// Feeds `bytes`; returns the payloads of the events they complete.
    pub fn push(&mut self, bytes: &[u8]) -> Vec<String> {
        self.partial.extend_from_slice(bytes);
        let mut events = Vec::new();
        while let Some(nl) = self.partial.iter().position(|&b| b == b'\n') {
            let mut line: Vec<u8> = self.partial.drain(..=nl).collect();
            line.pop();
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            self.line(&String::from_utf8_lossy(&line), &mut events);
        }
        events
    }

    /// The stream ended: an event not closed by a blank line still counts (some servers end
    /// without one).
    pub fn finish(&mut self) -> Vec<String> {
        let mut events = Vec::new();
        if !self.partial.is_empty() {
            let rest = std::mem::take(&mut self.partial);
            self.line(
                String::from_utf8_lossy(&rest).trim_end_matches('\r'),
                &mut events,
            );
        }
        self.line("", &mut events);
        events
    }

    fn line(&mut self, line: &str, events: &mut Vec<String>) {
        if line.is_empty() {
            if !self.data.is_empty() {
                events.push(self.data.join("\n"));
                self.data.clear();
            }
        } else if let Some(v) = line.strip_prefix("data:") {
            self.data.push(v.strip_prefix(' ').unwrap_or(v).to_string());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_split_across_pieces_and_lines() {
        let mut p = SseParser::default();
        let mut got = Vec::new();
        let stream = b": keep-alive\r\n\r\ndata: {\"a\":1}\r\n\r\ndata:{\"b\":2}\n\nevent: x\ndata: one\ndata: two\n\ndata: [DONE]";
        for piece in stream.chunks(5) {
            got.extend(p.push(piece));
        }
        got.extend(p.finish());
        assert_eq!(got, ["{\"a\":1}", "{\"b\":2}", "one\ntwo", "[DONE]"]);
    }

    #[test]
    fn multibyte_text_split_inside_a_character_survives() {
        let mut p = SseParser::default();
        let event = "data: {\"text\":\"café ☕\"}\n\n".as_bytes();
        let mut got = Vec::new();
        for b in event {
            got.extend(p.push(std::slice::from_ref(b)));
        }
        assert_eq!(got, ["{\"text\":\"café ☕\"}"]);
        assert!(p.finish().is_empty());
    }
}
