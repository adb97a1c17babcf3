//! Stop strings, matched across token boundaries and never emitted.
//!
//! Text is streamed as it is decoded, but a tail that could still turn into a stop string is
//! held back until it either does (generation stops; the stop string and anything after it
//! are dropped) or cannot any more (the tail is released).

#[derive(Debug, Default)]
pub struct StopMatcher {
    stops: Vec<String>,
    held: String,
}

/// What a piece of text does to the stream.
#[derive(Debug, PartialEq, Eq)]
pub struct Matched {
    /// Text safe to emit now.
    pub emit: String,
    /// A stop string was found: emit `emit`, then end the sequence.
    pub stopped: bool,
}

impl StopMatcher {
    pub fn new(stops: Vec<String>) -> Self {
        Self {
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            held: String::new(),
        }
    }

    pub fn push(&mut self, delta: &str) -> Matched {
        self.held.push_str(delta);
        let first_stop = self
            .stops
            .iter()
            .filter_map(|s| self.held.find(s.as_str()))
            .min();
        if let Some(at) = first_stop {
            let emit = self.held[..at].to_string();
            self.held.clear();
            return Matched {
                emit,
                stopped: true,
            };
        }
        // Hold back the longest tail that is the start of some stop string.
        let keep = self
            .held
            .char_indices()
            .map(|(i, _)| i)
            .find(|&i| {
                let tail = &self.held[i..];
                self.stops.iter().any(|s| s.starts_with(tail))
            })
            .unwrap_or(self.held.len());
        let emit = self.held[..keep].to_string();
        self.held.drain(..keep);
        Matched {
            emit,
            stopped: false,
        }
    }

    /// The held-back tail, once generation ended for another reason.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.held)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], pieces: &[&str]) -> (String, bool) {
        let mut m = StopMatcher::new(stops.iter().map(|s| s.to_string()).collect());
        let mut out = String::new();
        for p in pieces {
            let r = m.push(p);
            out.push_str(&r.emit);
            if r.stopped {
                return (out, true);
            }
        }
        out.push_str(&m.finish());
        (out, false)
    }

    #[test]
    fn a_stop_string_split_across_pieces_ends_the_text_unemitted() {
        assert_eq!(
            run(&["\n\nUser:"], &["Paris.", "\n", "\nUs", "er: hi"]),
            ("Paris.".into(), true)
        );
        assert_eq!(run(&["STOP"], &["abcST", "OPdef"]), ("abc".into(), true));
    }

    #[test]
    fn near_misses_are_released() {
        assert_eq!(
            run(&["STOP"], &["ST", "ART", " ok"]),
            ("START ok".into(), false)
        );
        assert_eq!(run(&["end"], &["the e"]), ("the e".into(), false));
    }

    #[test]
    fn the_earliest_of_several_stops_wins_and_multibyte_text_is_safe() {
        assert_eq!(run(&["b", "é"], &["aéb"]), ("a".into(), true));
        assert_eq!(run(&["日本x"], &["日本", "語"]), ("日本語".into(), false));
    }
}
