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

    use proptest::prelude::*;

    /// All events of `stream` fed in pieces cut at `cuts` (positions, any order, any count).
    fn parse_in_pieces(stream: &[u8], cuts: &[usize]) -> Vec<String> {
        let mut at: Vec<usize> = cuts.iter().map(|c| c % (stream.len() + 1)).collect();
        at.extend([0, stream.len()]);
        at.sort_unstable();
        let mut p = SseParser::default();
        let mut got = Vec::new();
        for w in at.windows(2) {
            got.extend(p.push(&stream[w[0]..w[1]]));
        }
        got.extend(p.finish());
        got
    }

    /// One event as a server might write it: comment and field lines around 1-3 `data` lines,
    /// LF or CRLF line ends; returns the bytes and the payload the parser should give.
    fn event() -> impl Strategy<Value = (String, String)> {
        let line = "[^\r\n]{0,20}";
        (
            proptest::collection::vec(line, 1..4),
            any::<bool>(),
            any::<bool>(),
            any::<bool>(),
        )
            .prop_map(|(lines, crlf, comment, space)| {
                let nl = if crlf { "\r\n" } else { "\n" };
                let mut text = String::new();
                if comment {
                    text.push_str(&format!(": keep-alive{nl}event: x{nl}"));
                }
                for l in &lines {
                    let sep = if space { " " } else { "" };
                    text.push_str(&format!("data:{sep}{l}{nl}"));
                }
                text.push_str(nl);
                // With no space after the colon, a payload that starts with one keeps it only
                // after the first: the parser strips exactly one.
                let payload: Vec<&str> = lines
                    .iter()
                    .map(|l| {
                        if space {
                            l.as_str()
                        } else {
                            l.strip_prefix(' ').unwrap_or(l)
                        }
                    })
                    .collect();
                (text, payload.join("\n"))
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn any_split_gives_the_same_events(
            events in proptest::collection::vec(event(), 0..6),
            cuts in proptest::collection::vec(any::<usize>(), 0..12),
        ) {
            let stream: String = events.iter().map(|(t, _)| t.as_str()).collect();
            let expected: Vec<String> = events.into_iter().map(|(_, p)| p).collect();
            prop_assert_eq!(&parse_in_pieces(stream.as_bytes(), &[]), &expected);
            prop_assert_eq!(parse_in_pieces(stream.as_bytes(), &cuts), expected);
        }

        #[test]
        fn arbitrary_bytes_never_panic_and_splits_agree(
            bytes in proptest::collection::vec(any::<u8>(), 0..256),
            cuts in proptest::collection::vec(any::<usize>(), 0..8),
        ) {
            let whole = parse_in_pieces(&bytes, &[]);
            prop_assert_eq!(parse_in_pieces(&bytes, &cuts), whole);
        }
    }
}
