//! A one-line progress bar on stderr while a run goes (requests done and failed, time), redrawn
//! in place a few times a second. Only on a terminal, and never with `--json`, so it cannot mix
//! into output a program reads.

use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Counts shared with the request tasks.
#[derive(Default)]
pub struct Counts {
    pub done: AtomicUsize,
    pub failed: AtomicUsize,
    stop: AtomicBool,
}

impl Counts {
    pub fn record(&self, ok: bool) {
        self.done.fetch_add(1, Ordering::Relaxed);
        if !ok {
            self.failed.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// What the bar fills towards.
#[derive(Clone, Copy)]
pub enum Goal {
    Requests(usize),
    Elapsed(Duration),
}

pub struct Progress {
    pub counts: Arc<Counts>,
    ticker: Option<tokio::task::JoinHandle<()>>,
}

impl Progress {
    /// Starts drawing when `enabled` and stderr is a terminal.
    pub fn start(label: &'static str, goal: Goal, enabled: bool) -> Progress {
        let counts = Arc::new(Counts::default());
        let ticker = (enabled && std::io::stderr().is_terminal()).then(|| {
            let counts = counts.clone();
            tokio::spawn(async move {
                let start = Instant::now();
                loop {
                    let stop = counts.stop.load(Ordering::Relaxed);
                    draw(label, goal, &counts, start.elapsed(), stop);
                    if stop {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            })
        });
        Progress { counts, ticker }
    }

    /// Draws the final state and ends the line.
    pub async fn finish(self) {
        self.counts.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.ticker {
            let _ = t.await;
        }
    }
}

fn draw(label: &str, goal: Goal, c: &Counts, elapsed: Duration, last: bool) {
    const WIDTH: usize = 30;
    let done = c.done.load(Ordering::Relaxed);
    let failed = c.failed.load(Ordering::Relaxed);
    let secs = elapsed.as_secs_f64();
    let (fraction, status) = match goal {
        Goal::Requests(n) => (
            done as f64 / n.max(1) as f64,
            format!("{done}/{n} requests ({failed} failed), {secs:.1} s"),
        ),
        Goal::Elapsed(d) => (
            secs / d.as_secs_f64().max(1e-9),
            format!(
                "{secs:.1}/{:.1} s, {done} requests ({failed} failed)",
                d.as_secs_f64()
            ),
        ),
    };
    let filled = (fraction.clamp(0.0, 1.0) * WIDTH as f64) as usize;
    let mut err = std::io::stderr().lock();
    let _ = write!(
        err,
        "\r\x1b[2K{label} [{}{}] {status}",
        "#".repeat(filled),
        ".".repeat(WIDTH - filled)
    );
    if last {
        let _ = writeln!(err);
    }
    let _ = err.flush();
}
