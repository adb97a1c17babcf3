//! The gRPC protocol: `helios.v1.Generation/GenerateStream`, one stream per request, and
//! `ModelInfo` before and after the measured phase for the server's own step counters (how long
//! the workers computed, and waited between steps, and how much of the prompts the prefix cache
//! served), which only Helios reports.
//!
//! A request's prompt goes as token ids (or text, for ShareGPT) with its session id, if any; the
//! generated ids come back with the timings, for a chat's next turn.
//!
//! Requests spread over several HTTP/2 connections (one per client in a closed loop), so a
//! single connection's flow control is not what gets measured.

use anyhow::{Context, Result};
use helios_proto::auth::{client_endpoint, Authorize};
use helios_proto::v1::generation_client::GenerationClient;
use helios_proto::v1::{
    constraint, Constraint, FinishReason, GenerateRequest, GenerationParameters, ModelInfoRequest,
    ModelInfoResponse,
};
use serde_json::{json, Map, Value};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use super::{Clock, Reply, Sampling};
use crate::load::dataset::{Input, Prompt};

/// How to reach a server that wants TLS and an API key.
#[derive(Debug, Clone, Default)]
pub struct Access {
    pub tls_ca: Option<std::path::PathBuf>,
    pub api_key: Option<String>,
}

/// A client that sends `--api-key`, if given, with every call.
type Client = GenerationClient<InterceptedService<Channel, Authorize>>;

pub struct Grpc {
    clients: Vec<Client>,
    /// ModelInfo at connection time (model name, vocabulary, tensor-parallel size).
    pub info: ModelInfoResponse,
}

fn status(s: tonic::Status) -> String {
    format!("gRPC {:?}: {}", s.code(), s.message())
}

impl Grpc {
    /// Opens `connections` connections to `url` (`host:port`, `http://host:port`, or
    /// `https://host:port` trusting `access.tls_ca`), each call carrying `access.api_key`.
    pub async fn connect(url: &str, connections: usize, access: &Access) -> Result<Grpc> {
        let endpoint = client_endpoint(url, access.tls_ca.as_deref())?;
        let auth = Authorize::api_key(access.api_key.as_deref())?;
        let mut clients = Vec::with_capacity(connections);
        for _ in 0..connections.max(1) {
            let channel = endpoint
                .connect()
                .await
                .with_context(|| format!("connecting to {}", endpoint.uri()))?;
            clients.push(GenerationClient::with_interceptor(channel, auth.clone()));
        }
        let mut g = Grpc {
            clients,
            info: ModelInfoResponse::default(),
        };
        g.info = g.model_info().await?;
        Ok(g)
    }

    pub async fn model_info(&self) -> Result<ModelInfoResponse> {
        let mut c = self.clients[0].clone();
        c.model_info(ModelInfoRequest {})
            .await
            .map_err(|s| anyhow::anyhow!(status(s)))
            .context("ModelInfo")
            .map(tonic::Response::into_inner)
    }

    pub async fn send(&self, i: usize, prompt: &Prompt, s: &Sampling) -> Result<Reply, String> {
        let mut client = self.clients[i % self.clients.len()].clone();
        let (prompt_text, token_ids) = match &prompt.input {
            Input::Ids(ids) => (String::new(), ids.clone()),
            Input::Text(t) => (t.clone(), Vec::new()),
        };
        let req = GenerateRequest {
            request_id: format!("bench-{i}"),
            prompt: prompt_text,
            token_ids,
            parameters: Some(GenerationParameters {
                max_new_tokens: Some(prompt.output_len.try_into().unwrap_or(u32::MAX)),
                temperature: s.temperature,
                top_p: s.top_p,
                top_k: s.top_k.map_or(0, |k| k.try_into().unwrap_or(i32::MAX)),
                seed: s.seed,
                ignore_eos: s.ignore_eos,
                constraint: s.constraint_of(i).map(|rx| Constraint {
                    kind: Some(constraint::Kind::Regex(rx.into())),
                }),
                prompt_logprobs: s.prompt_logprobs,
                ..Default::default()
            }),
            session_id: prompt.session_id.clone().unwrap_or_default(),
            ..Default::default()
        };
        let mut clock = Clock::start();
        let mut stream = client
            .generate_stream(req)
            .await
            .map_err(status)?
            .into_inner();
        let mut answer = Vec::new();
        while let Some(resp) = stream.message().await.map_err(status)? {
            if !resp.token_ids.is_empty() {
                clock.chunk();
                answer.extend_from_slice(&resp.token_ids);
            }
            let tokens = answer.len();
            if resp.finish_reason != FinishReason::Unspecified as i32 {
                let usage = resp.usage.unwrap_or_default();
                if s.ignore_eos && resp.finish_reason != FinishReason::Length as i32 {
                    return Err(format!(
                        "finished with {:?} after {tokens} tokens despite --ignore-eos",
                        FinishReason::try_from(resp.finish_reason)
                            .unwrap_or(FinishReason::Unspecified)
                    ));
                }
                if usage.completion_tokens as usize != tokens {
                    return Err(format!(
                        "streamed {tokens} tokens but usage says {}",
                        usage.completion_tokens
                    ));
                }
                let record = clock.finish(usage.prompt_tokens as usize, tokens)?;
                return Ok(Reply {
                    record,
                    answer: Input::Ids(answer),
                });
            }
        }
        Err("the stream ended without a finish reason".into())
    }
}

/// The server's step counters over the measured phase (ModelInfo before and after).
pub struct StepCounters {
    steps: u64,
    compute_s: f64,
    gap_s: f64,
    rank_wait_s: f64,
    preemptions: u64,
    /// Prompt tokens looked up in the prefix cache, and those found there.
    prefix_queries: u64,
    prefix_hits: u64,
}

impl StepCounters {
    pub fn between(a: &ModelInfoResponse, b: &ModelInfoResponse) -> Self {
        Self {
            steps: b.steps_total.saturating_sub(a.steps_total),
            compute_s: b.step_compute_seconds_total - a.step_compute_seconds_total,
            gap_s: b.step_gap_seconds_total - a.step_gap_seconds_total,
            rank_wait_s: b.step_rank_wait_seconds_total - a.step_rank_wait_seconds_total,
            preemptions: b.preemptions_total.saturating_sub(a.preemptions_total),
            prefix_queries: b
                .prefix_cache_query_tokens
                .saturating_sub(a.prefix_cache_query_tokens),
            prefix_hits: b
                .prefix_cache_hit_tokens
                .saturating_sub(a.prefix_cache_hit_tokens),
        }
    }

    /// Hit tokens over looked-up tokens during the run; `None` when nothing was looked up.
    /// (The server's own `prefix_cache_hit_ratio` counts since its start.)
    pub fn prefix_hit_ratio(&self) -> Option<f64> {
        (self.prefix_queries > 0).then(|| self.prefix_hits as f64 / self.prefix_queries as f64)
    }

    fn mean_compute_ms(&self) -> f64 {
        self.compute_s / self.steps.max(1) as f64 * 1e3
    }

    fn mean_gap_us(&self) -> f64 {
        self.gap_s / self.steps.max(1) as f64 * 1e6
    }

    fn percent(&self, s: f64) -> f64 {
        if self.compute_s > 0.0 {
            s / self.compute_s * 100.0
        } else {
            0.0
        }
    }

    /// JSON fields (the names `bench/run-scheduler-bench.sh` reads) and text lines.
    pub fn report(&self) -> (Map<String, Value>, Vec<String>) {
        let fields = json!({
            "steps": self.steps,
            "mean_step_compute_ms": self.mean_compute_ms(),
            "mean_step_gap_us": self.mean_gap_us(),
            "gap_percent_of_step": self.percent(self.gap_s),
            "rank_wait_percent_of_step": self.percent(self.rank_wait_s),
            "preemptions": self.preemptions,
            "prefix_cache_query_tokens": self.prefix_queries,
            "prefix_cache_hit_tokens": self.prefix_hits,
            "prefix_cache_hit_ratio": self.prefix_hit_ratio(),
        });
        let ratio = self.prefix_hit_ratio().map_or("-".to_string(), |r| {
            format!(
                "{:.2}% ({} of {} tokens)",
                r * 100.0,
                self.prefix_hits,
                self.prefix_queries
            )
        });
        let lines = vec![
            format!("{:<40} {}", "Steps:", self.steps),
            format!(
                "{:<40} {:.2}",
                "Mean step compute (ms):",
                self.mean_compute_ms()
            ),
            format!(
                "{:<40} {:.0} ({:.2}% of a step)",
                "Rank 0 wait for the next plan (us):",
                self.mean_gap_us(),
                self.percent(self.gap_s)
            ),
            format!(
                "{:<40} {:.2}%",
                "Longest rank wait (of a step):",
                self.percent(self.rank_wait_s)
            ),
            format!("{:<40} {}", "Preemptions:", self.preemptions),
            format!("{:<40} {}", "Prefix cache hit tokens:", self.prefix_hits),
            format!("{:<40} {ratio}", "Prefix cache hit ratio:"),
        ];
        match fields {
            Value::Object(m) => (m, lines),
            _ => (Map::new(), lines),
        }
    }

    /// The same fields, null: the protocol has no such counters.
    pub fn absent() -> Map<String, Value> {
        [
            "steps",
            "mean_step_compute_ms",
            "mean_step_gap_us",
            "gap_percent_of_step",
            "rank_wait_percent_of_step",
            "preemptions",
            "prefix_cache_query_tokens",
            "prefix_cache_hit_tokens",
            "prefix_cache_hit_ratio",
        ]
        .into_iter()
        .map(|k| (k.to_string(), Value::Null))
        .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_cache_hit_ratio_is_over_the_run() {
        let before = ModelInfoResponse {
            prefix_cache_query_tokens: 1000,
            prefix_cache_hit_tokens: 900,
            steps_total: 10,
            ..Default::default()
        };
        let after = ModelInfoResponse {
            prefix_cache_query_tokens: 1400,
            prefix_cache_hit_tokens: 1000,
            steps_total: 30,
            ..Default::default()
        };
        let c = StepCounters::between(&before, &after);
        // 100 of the run's 400 looked-up tokens hit, not 1000 of 1400 since the server started.
        assert_eq!(c.prefix_hit_ratio(), Some(0.25));
        let (fields, lines) = c.report();
        assert_eq!(fields["prefix_cache_query_tokens"], 400);
        assert_eq!(fields["prefix_cache_hit_tokens"], 100);
        assert_eq!(fields["prefix_cache_hit_ratio"], 0.25);
        assert_eq!(fields["steps"], 20);
        assert!(
            lines
                .iter()
                .any(|l| l.starts_with("Prefix cache hit ratio:")
                    && l.ends_with("25.00% (100 of 400 tokens)")),
            "{lines:?}"
        );
        let mut keys: Vec<&String> = fields.keys().collect();
        let absent = StepCounters::absent();
        let mut absent_keys: Vec<&String> = absent.keys().collect();
        keys.sort();
        absent_keys.sort();
        assert_eq!(keys, absent_keys, "absent() names the same fields");

        let idle = StepCounters::between(&after, &after);
        assert_eq!(idle.prefix_hit_ratio(), None);
        assert!(idle.report().0["prefix_cache_hit_ratio"].is_null());
    }
}
