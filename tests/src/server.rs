//! Running servers for tests: a `helios serve` / `helios coordinator` / `helios-worker` process
//! that announces its address on stdout, and gRPC helpers to talk to it.
//!
//! A process is killed when its handle drops; workers spawned by `helios serve` follow their
//! coordinator (their stdin pipe closes).

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::Duration;

use futures::StreamExt;
use helios_proto::v1::generation_client::GenerationClient;
use helios_proto::v1::{
    ChatMessage, FinishReason, GenerateRequest, GenerateResponse, GenerationParameters,
    ModelInfoRequest, ModelInfoResponse, TokenizeRequest, Usage,
};
use tonic::transport::Channel;
use tonic::{Status, Streaming};

use crate::{binary, default_model};

pub struct Process {
    child: Child,
    /// What the process announced, e.g. `127.0.0.1:40000` for `grpc=127.0.0.1:40000`.
    pub addr: String,
    /// The `http=` address of the ready line (the coordinator's HTTP API), if it has one.
    pub http_addr: Option<String>,
    /// The whole ready line.
    pub ready_line: String,
}

impl Process {
    /// Starts `cmd` and waits (up to 3 minutes) for its first stdout line to start with
    /// `ready_prefix`; `addr` is the `grpc=` value of that line, `http_addr` the `http=` one.
    pub fn start(cmd: Command, ready_prefix: &str) -> Process {
        Self::start_with_stderr(cmd, ready_prefix, Stdio::inherit())
    }

    /// [`Self::start`] with the process' stderr (its log, and its workers') going to `stderr`.
    pub fn start_with_stderr(cmd: Command, ready_prefix: &str, stderr: Stdio) -> Process {
        let shown = format!("{cmd:?}");
        Self::try_start(cmd, ready_prefix, stderr)
            .unwrap_or_else(|| panic!("{shown} did not become ready"))
    }

    /// Like [`Self::start_with_stderr`], but `None` if the process exits (or says nothing
    /// within 3 minutes) instead of announcing itself: for starts that may be refused.
    pub fn try_start(mut cmd: Command, ready_prefix: &str, stderr: Stdio) -> Option<Process> {
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {cmd:?}: {e}"));
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            let first = lines.next().and_then(Result::ok);
            let _ = tx.send(first);
            // Keep draining so the process never blocks on a full pipe.
            for _ in lines {}
        });
        let line = match rx.recv_timeout(Duration::from_secs(180)) {
            Ok(Some(line)) => line,
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
        };
        assert!(
            line.starts_with(ready_prefix),
            "unexpected ready line {line:?}"
        );
        let field = |key: &str| {
            line.split_whitespace()
                .find_map(|kv| kv.strip_prefix(key))
                .map(str::to_string)
        };
        let addr = field("grpc=").expect("grpc= in the ready line");
        let http_addr = field("http=");
        Some(Process {
            child,
            addr,
            http_addr,
            ready_line: line,
        })
    }

    /// `helios serve --host 127.0.0.1 --port 0 --http-port 0 ARGS` (free ports: tests start
    /// many servers at once).
    pub fn serve(args: &[&str]) -> Process {
        Process::start(Self::serve_command(args), "HELIOS_READY ")
    }

    /// The command [`Self::serve`] runs, for a test to add to (environment, stderr).
    pub fn serve_command(args: &[&str]) -> Command {
        Self::helios_command("serve", args)
    }

    /// `helios serve` on the default model at tensor-parallel degree `tp`, then `extra`: the
    /// server most end-to-end tests start, in one place so they all start it alike.
    pub fn serve_default(tp: &str, extra: &[&str]) -> Process {
        Process::start(Self::serve_default_command(tp, extra), "HELIOS_READY ")
    }

    /// The command [`Self::serve_default`] runs (`--model DEFAULT --tp TP EXTRA`), for a test
    /// to add to (environment, stderr).
    pub fn serve_default_command(tp: &str, extra: &[&str]) -> Command {
        let model = default_model();
        let mut args = vec!["--model", model.to_str().expect("utf-8 path"), "--tp", tp];
        args.extend_from_slice(extra);
        Self::serve_command(&args)
    }

    /// `helios SUBCOMMAND` (`serve`, `coordinator`) on 127.0.0.1 with free ports, then `args`.
    pub fn helios_command(subcommand: &str, args: &[&str]) -> Command {
        let mut cmd = Command::new(binary("helios"));
        cmd.args([
            subcommand,
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--http-port",
            "0",
        ])
        .args(args)
        .env("HELIOS_WORKER_BIN", binary("helios-worker"))
        .env(
            helios_proto::auth::CLUSTER_SECRET_ENV,
            crate::TEST_CLUSTER_SECRET,
        );
        // A line per request is noise across hundreds of test requests (RUST_LOG overrides).
        if std::env::var_os("RUST_LOG").is_none() {
            cmd.env("RUST_LOG", "warn");
        }
        cmd
    }

    /// `http://ADDR` of the HTTP API (OpenAI-compatible, `/health`).
    pub fn http_url(&self) -> String {
        let addr = self
            .http_addr
            .as_deref()
            .expect("the ready line has no http= address");
        format!("http://{addr}")
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Child processes (a `helios serve`'s workers, in spawn order: by rank until one is
    /// replaced).
    pub fn children(&self) -> Vec<u32> {
        // Every thread's children: a worker spawned again after a loss comes from whichever
        // runtime thread did it. Sorted by pid, i.e. by spawn order while pids do not wrap.
        let tasks = std::fs::read_dir(format!("/proc/{}/task", self.pid()));
        let mut pids: Vec<u32> = tasks
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|t| std::fs::read_to_string(t.path().join("children")).ok())
            .flat_map(|text| {
                text.split_whitespace()
                    .filter_map(|p| p.parse().ok())
                    .collect::<Vec<u32>>()
            })
            .collect();
        pids.sort_unstable();
        pids
    }

    /// Waits up to `limit` for the process to exit; its status, if it did.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let start = std::time::Instant::now();
        while start.elapsed() < limit {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    pub async fn client(&self) -> GenerationClient<Channel> {
        GenerationClient::connect(format!("http://{}", self.addr))
            .await
            .expect("connecting to the server")
    }

    pub async fn channel(&self) -> Channel {
        Channel::from_shared(format!("http://{}", self.addr))
            .expect("url")
            .connect()
            .await
            .expect("connecting to the server")
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Sends `signal` (`-TERM`, `-KILL`) to `pid` with `kill(1)`, which must succeed: the tests that
/// stop a server or kill one of its workers check what follows, so the signal must have gone.
pub fn send_signal(pid: u32, signal: &str) {
    let status = Command::new("kill")
        .args([signal, &pid.to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
}

/// A prompt request with `params`.
pub fn prompt_request(prompt: &str, params: GenerationParameters) -> GenerateRequest {
    GenerateRequest {
        prompt: prompt.into(),
        parameters: Some(params),
        ..Default::default()
    }
}

/// One user message, rendered with the chat template.
pub fn chat_request(content: &str, params: GenerationParameters) -> GenerateRequest {
    GenerateRequest {
        messages: vec![ChatMessage {
            role: "user".into(),
            content: content.into(),
        }],
        parameters: Some(params),
        ..Default::default()
    }
}

/// A request that runs for seconds unless stopped: `max_new_tokens` past EOS.
pub fn long_request(max_new_tokens: u32) -> GenerateRequest {
    prompt_request(
        "Count from one to one thousand.",
        GenerationParameters {
            max_new_tokens: Some(max_new_tokens),
            ignore_eos: true,
            ..Default::default()
        },
    )
}

/// Starts `req` as a stream and reads its first `responses` responses, so that the request is
/// running (holding KV blocks) when this returns: for tests that cancel, drain or break a
/// request in flight. The stream, and how many tokens those responses carried.
pub async fn stream_started(
    client: &mut GenerationClient<Channel>,
    req: GenerateRequest,
    responses: usize,
) -> (Streaming<GenerateResponse>, usize) {
    let mut stream = client
        .generate_stream(req)
        .await
        .expect("stream")
        .into_inner();
    let mut tokens = 0;
    for _ in 0..responses {
        tokens += stream
            .next()
            .await
            .expect("a token")
            .expect("ok")
            .token_ids
            .len();
    }
    (stream, tokens)
}

/// Everything a stream said.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Streamed {
    pub text: String,
    pub token_ids: Vec<u32>,
    pub logprobs: Vec<f32>,
    pub finish_reason: Option<FinishReason>,
    pub usage: Option<Usage>,
    pub responses: usize,
}

/// Reads a whole `GenerateStream`, checking that only the last response has a finish reason.
pub async fn stream_all(
    client: &mut GenerationClient<Channel>,
    req: impl tonic::IntoRequest<GenerateRequest>,
) -> Result<Streamed, Status> {
    stream_all_counted(client, req, &AtomicUsize::new(0)).await
}

/// [`stream_all`], counting every response in `responses` as it comes (a test that breaks
/// something mid-stream waits on it).
pub async fn stream_all_counted(
    client: &mut GenerationClient<Channel>,
    req: impl tonic::IntoRequest<GenerateRequest>,
    responses: &AtomicUsize,
) -> Result<Streamed, Status> {
    let mut stream = client.generate_stream(req).await?.into_inner();
    let mut out = Streamed::default();
    while let Some(resp) = stream.next().await {
        let resp = resp?;
        responses.fetch_add(1, Ordering::SeqCst);
        assert!(out.finish_reason.is_none(), "a response after the last one");
        out.responses += 1;
        out.text.push_str(&resp.text);
        out.token_ids.extend(&resp.token_ids);
        out.logprobs.extend(
            resp.logprobs
                .iter()
                .filter_map(|l| l.sampled.as_ref().map(|s| s.logprob)),
        );
        if resp.finish_reason != FinishReason::Unspecified as i32 {
            out.finish_reason = FinishReason::try_from(resp.finish_reason).ok();
            out.usage = resp.usage;
        }
    }
    Ok(out)
}

pub async fn model_info(client: &mut GenerationClient<Channel>) -> ModelInfoResponse {
    client
        .model_info(ModelInfoRequest {})
        .await
        .expect("ModelInfo")
        .into_inner()
}

/// The token ids of a plain `prompt`.
pub async fn tokenize(
    client: &mut GenerationClient<Channel>,
    prompt: &str,
) -> Result<Vec<u32>, Status> {
    let req = TokenizeRequest {
        prompt: prompt.into(),
        ..Default::default()
    };
    Ok(client.tokenize(req).await?.into_inner().token_ids)
}

/// Polls ModelInfo until the server is idle: nothing running, nothing waiting and all `total` KV
/// blocks free; that info, or `None` if it is not idle within `limit`. A freed request returns
/// its blocks a step or two after its stream ends, so tests that check nothing leaked wait for
/// it (a bounded time: a leak fails instead of hanging).
pub async fn wait_until_idle(
    client: &mut GenerationClient<Channel>,
    total: u32,
    limit: Duration,
) -> Option<ModelInfoResponse> {
    let idle = async {
        loop {
            let info = model_info(client).await;
            if info.requests_running == 0
                && info.requests_waiting == 0
                && info.kv_blocks_free == total
            {
                return info;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    tokio::time::timeout(limit, idle).await.ok()
}
