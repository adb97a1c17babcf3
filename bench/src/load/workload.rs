//! What the requests of a run are (`--workload`), and the flags that shape each kind.
//!
//! - `random` (the default): independent prompts, random or from `--dataset`; no two share a
//!   prefix, so the numbers are those of a server without any cache help.
//! - `chat` ([`super::chat`]): `--sessions` conversations of `--turns` turns, each turn
//!   resending the history; session ids `session-<n>`.
//! - `shared-prefix` ([`super::shared_prefix`]): `--system-prompts` system prompts of
//!   `--system-prompt-len` tokens, each request one of them and a random user message; with
//!   `--users U`, session ids `user-<i % U>`.
//!
//! The last two are the traffic a prefix cache and a cache-aware router are for; the report's
//! prefix-cache hit ratio (gRPC) says how much of the prompts the server did not recompute.
//! A flag of another workload than the one chosen is refused rather than ignored.

use anyhow::{bail, Result};
use serde_json::{json, Map, Value};

const DEFAULT_SESSIONS: usize = 8;
const DEFAULT_TURNS: usize = 4;
const DEFAULT_SYSTEM_PROMPTS: usize = 4;
const DEFAULT_SYSTEM_PROMPT_LEN: usize = 256;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum WorkloadKind {
    /// Independent prompts (random, or --dataset).
    Random,
    /// Multi-turn conversations that resend their history.
    Chat,
    /// A few system prompts shared by many requests.
    SharedPrefix,
}

#[derive(clap::Args, Clone, Debug)]
pub struct WorkloadArgs {
    /// What the requests are: `random` (independent prompts), `chat` (--sessions conversations
    /// of --turns turns, each resending the history and the server's answers; --concurrency and
    /// --request-rate then count sessions) or `shared-prefix` (one of --system-prompts system
    /// prompts, round robin, plus --input-len random tokens per request).
    #[arg(long, value_enum, default_value_t = WorkloadKind::Random)]
    pub workload: WorkloadKind,
    /// chat: conversations, each with the session id `session-<n>` [default: 8].
    #[arg(long)]
    pub sessions: Option<usize>,
    /// chat: turns per conversation; the run sends sessions × turns requests [default: 4].
    #[arg(long)]
    pub turns: Option<usize>,
    /// shared-prefix: distinct system prompts (1: one hot prefix) [default: 4].
    #[arg(long)]
    pub system_prompts: Option<usize>,
    /// shared-prefix: tokens per system prompt [default: 256].
    #[arg(long)]
    pub system_prompt_len: Option<usize>,
    /// shared-prefix: request i carries the session id `user-<i % U>` [default: no session id].
    #[arg(long)]
    pub users: Option<usize>,
    /// chat: send no session ids, so that the router's policy alone places every turn (to
    /// compare policies without session affinity).
    #[arg(long)]
    pub no_session_ids: bool,
}

/// A validated workload.
#[derive(Clone, Debug, PartialEq)]
pub enum Workload {
    Random,
    Chat {
        sessions: usize,
        turns: usize,
        /// Every turn carries its session's id.
        session_ids: bool,
    },
    SharedPrefix {
        system_prompts: usize,
        system_prompt_len: usize,
        users: Option<usize>,
    },
}

impl WorkloadArgs {
    pub fn workload(&self) -> Result<Workload> {
        let chat = [("--sessions", self.sessions), ("--turns", self.turns)];
        let shared = [
            ("--system-prompts", self.system_prompts),
            ("--system-prompt-len", self.system_prompt_len),
            ("--users", self.users),
        ];
        let (mine, theirs): (&[_], Vec<_>) = match self.workload {
            WorkloadKind::Random => (&[], chat.iter().chain(&shared).collect()),
            WorkloadKind::Chat => (&chat, shared.iter().collect()),
            WorkloadKind::SharedPrefix => (&shared, chat.iter().collect()),
        };
        if let Some((flag, _)) = theirs.iter().find(|(_, v)| v.is_some()) {
            bail!(
                "{flag} does not apply to --workload {}",
                self.workload.name()
            );
        }
        if self.no_session_ids && self.workload != WorkloadKind::Chat {
            bail!(
                "--no-session-ids does not apply to --workload {}",
                self.workload.name()
            );
        }
        if let Some((flag, _)) = mine.iter().find(|(_, v)| *v == Some(0)) {
            bail!("{flag} must be positive");
        }
        Ok(match self.workload {
            WorkloadKind::Random => Workload::Random,
            WorkloadKind::Chat => Workload::Chat {
                sessions: self.sessions.unwrap_or(DEFAULT_SESSIONS),
                turns: self.turns.unwrap_or(DEFAULT_TURNS),
                session_ids: !self.no_session_ids,
            },
            WorkloadKind::SharedPrefix => Workload::SharedPrefix {
                system_prompts: self.system_prompts.unwrap_or(DEFAULT_SYSTEM_PROMPTS),
                system_prompt_len: self.system_prompt_len.unwrap_or(DEFAULT_SYSTEM_PROMPT_LEN),
                users: self.users,
            },
        })
    }
}

impl WorkloadKind {
    pub fn name(self) -> &'static str {
        match self {
            WorkloadKind::Random => "random",
            WorkloadKind::Chat => "chat",
            WorkloadKind::SharedPrefix => "shared-prefix",
        }
    }
}

impl Workload {
    pub fn kind(&self) -> WorkloadKind {
        match self {
            Workload::Random => WorkloadKind::Random,
            Workload::Chat { .. } => WorkloadKind::Chat,
            Workload::SharedPrefix { .. } => WorkloadKind::SharedPrefix,
        }
    }

    /// The run's settings for the report: the workload's name and its parameters (null where
    /// they do not apply, so every report has the same fields).
    pub fn settings(&self) -> Map<String, Value> {
        let (sessions, turns, session_ids) = match self {
            Workload::Chat {
                sessions,
                turns,
                session_ids,
            } => (Some(sessions), Some(turns), Some(session_ids)),
            _ => (None, None, None),
        };
        let (system_prompts, system_prompt_len, users) = match self {
            Workload::SharedPrefix {
                system_prompts,
                system_prompt_len,
                users,
            } => (Some(system_prompts), Some(system_prompt_len), *users),
            _ => (None, None, None),
        };
        let v = json!({
            "workload": self.kind().name(),
            "sessions": sessions,
            "turns": turns,
            "session_ids": session_ids,
            "system_prompts": system_prompts,
            "system_prompt_len": system_prompt_len,
            "users": users,
        });
        match v {
            Value::Object(m) => m,
            _ => Map::new(),
        }
    }
}

/// The workload part of the report's title, from its settings: `chat: 8 sessions × 4 turns,
/// 64 in per turn / 64 out`; `None` for `random`, which the title describes as before.
pub fn describe(s: &Map<String, Value>) -> Option<String> {
    let v = |k: &str| match s.get(k) {
        Some(Value::Null) | None => "-".to_string(),
        Some(other) => other.to_string(),
    };
    match s.get("workload").and_then(Value::as_str) {
        Some("chat") => Some(format!(
            "chat: {} sessions × {} turns, {} in per turn / {} out{}",
            v("sessions"),
            v("turns"),
            v("input_len"),
            v("output_len"),
            if s.get("session_ids") == Some(&Value::Bool(false)) {
                ", no session ids"
            } else {
                ""
            }
        )),
        Some("shared-prefix") => Some(format!(
            "shared-prefix: {} system prompt{} of {} tokens + {} in / {} out, {}",
            v("system_prompts"),
            if v("system_prompts") == "1" { "" } else { "s" },
            v("system_prompt_len"),
            v("input_len"),
            v("output_len"),
            match s.get("users") {
                Some(Value::Number(n)) => format!("{n} users (session ids)"),
                _ => "no session ids".to_string(),
            }
        )),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: WorkloadArgs,
    }

    fn workload(args: &[&str]) -> Result<Workload> {
        Cli::try_parse_from(std::iter::once("w").chain(args.iter().copied()))
            .map_err(anyhow::Error::from)
            .and_then(|c| c.args.workload())
    }

    #[test]
    fn workloads_parse_with_their_defaults_and_refuse_foreign_flags() {
        assert_eq!(workload(&[]).expect("default"), Workload::Random);
        assert_eq!(
            workload(&["--workload", "chat"]).expect("chat"),
            Workload::Chat {
                sessions: 8,
                turns: 4,
                session_ids: true,
            }
        );
        assert_eq!(
            workload(&["--workload", "chat", "--sessions", "2", "--turns", "6"]).expect("chat"),
            Workload::Chat {
                sessions: 2,
                turns: 6,
                session_ids: true,
            }
        );
        assert_eq!(
            workload(&["--workload", "shared-prefix"]).expect("shared-prefix"),
            Workload::SharedPrefix {
                system_prompts: 4,
                system_prompt_len: 256,
                users: None
            }
        );
        assert_eq!(
            workload(&[
                "--workload",
                "shared-prefix",
                "--system-prompts",
                "1",
                "--system-prompt-len",
                "512",
                "--users",
                "10"
            ])
            .expect("shared-prefix"),
            Workload::SharedPrefix {
                system_prompts: 1,
                system_prompt_len: 512,
                users: Some(10)
            }
        );
        assert_eq!(
            workload(&["--workload", "chat", "--no-session-ids"]).expect("chat"),
            Workload::Chat {
                sessions: 8,
                turns: 4,
                session_ids: false,
            }
        );
        for bad in [
            &["--workload", "chat", "--users", "3"][..],
            &["--workload", "shared-prefix", "--no-session-ids"],
            &["--workload", "shared-prefix", "--turns", "3"],
            &["--sessions", "3"],
            &["--workload", "chat", "--sessions", "0"],
            &["--workload", "shared-prefix", "--system-prompt-len", "0"],
            &["--workload", "shared-prefix", "--users", "0"],
            &["--workload", "multi-turn"],
        ] {
            assert!(workload(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn settings_name_the_workload_and_describe_it() {
        let w = Workload::SharedPrefix {
            system_prompts: 1,
            system_prompt_len: 300,
            users: Some(5),
        };
        let mut s = w.settings();
        assert_eq!(s["workload"], "shared-prefix");
        assert_eq!(s["system_prompts"], 1);
        assert_eq!(s["system_prompt_len"], 300);
        assert_eq!(s["users"], 5);
        assert!(s["sessions"].is_null() && s["turns"].is_null());
        s.insert("input_len".into(), json!(32));
        s.insert("output_len".into(), json!(16));
        assert_eq!(
            describe(&s).expect("described"),
            "shared-prefix: 1 system prompt of 300 tokens + 32 in / 16 out, 5 users (session ids)"
        );

        let mut s = Workload::Chat {
            sessions: 3,
            turns: 2,
            session_ids: true,
        }
        .settings();
        assert_eq!(
            (s["workload"].as_str(), &s["sessions"], &s["turns"]),
            (Some("chat"), &json!(3), &json!(2))
        );
        assert!(s["users"].is_null());
        s.insert("input_len".into(), json!(64));
        s.insert("output_len".into(), json!(8));
        assert_eq!(
            describe(&s).expect("described"),
            "chat: 3 sessions × 2 turns, 64 in per turn / 8 out"
        );
        assert_eq!(describe(&Workload::Random.settings()), None);
    }
}
