//! A minute of soak, the CI version of `scripts/soak.sh`: `tests/reference/soak.py` keeps 8
//! clients busy against `helios serve --dp 2 --tp 1` (two replicas, a worker process each) for
//! 60 s, over gRPC and the OpenAI-compatible HTTP API, streamed and not, and cancels, leaves
//! mid-stream or gives a short deadline to a good share of them. Afterwards nothing may have
//! failed, every replica must be back to idle with its KV cache empty, no worker lost, and no
//! process' memory may have grown beyond noise after the warm-up.

use helios_tests::server::Process;
use serde_json::Value;

/// Clients at once: 4 per replica keeps a debug build's requests within seconds on 2 cores.
const CLIENTS: &str = "8";
const SECONDS: &str = "60";
/// KV blocks per replica: fewer than its 4 requests may hold at once (up to about 13 blocks
/// each), so that the soak preempts too, and few enough (about 17 MiB) that the warm-up touches
/// every page of them: KV memory is mapped lazily and its first touch is RSS growth, no leak.
const KV_BLOCKS: &str = "24";
/// RSS samples before this are the warm-up: the allocator's arenas, the connection pools, the
/// KV pages and the step buffers of the first batches.
const WARMUP: &str = "15";
/// Growth of RSS from the first sample after the warm-up to the last one, MiB. Measured over the
/// 45 s after the warm-up on a debug build (2 cores, shared): the coordinator 0.4-0.5, the
/// workers 3-10 (their step buffers' high-water mark rising as larger batches turn up, then
/// flat). The bounds are 3× and more above that: noise stays below them, while a gross leak passes
/// them within the minute: a worker keeping a step's logits or activations (hundreds of KiB per
/// sequence per step, several steps a second), the coordinator keeping a request's state
/// (tokens, text, logprobs, stream buffers) or a connection's per request at several requests a
/// second. Small leaks need the 10-minute `scripts/soak.sh`, which bounds the slope; leaked KV
/// blocks are caught by the KV check below, which needs no memory figure.
const MAX_GROWTH_MIB: [(&str, f64); 2] = [("coordinator", 8.0), ("worker", 32.0)];

fn count(v: &Value, key: &str) -> u64 {
    v[key].as_u64().unwrap_or_else(|| panic!("{key} in {v}"))
}

#[test]
fn a_minute_of_streams_cancels_and_disconnects_leaves_nothing_behind() {
    let server = Process::serve_default("1", &["--dp", "2", "--num-kv-blocks", KV_BLOCKS]);
    let workers = server.children();
    assert_eq!(workers.len(), 2, "two worker processes: {workers:?}");
    let http = server.http_addr.clone().expect("an HTTP address");
    let pid = server.pid().to_string();
    let r = helios_tests::reference_json(
        "soak.py",
        &[
            "--grpc",
            &server.addr,
            "--http",
            &http,
            "--pid",
            &pid,
            "--duration",
            SECONDS,
            "--seed",
            "7",
            "--clients",
            CLIENTS,
            "--warmup",
            WARMUP,
            "--idle-timeout",
            "20",
        ],
    );
    let summary = serde_json::to_string_pretty(&r).expect("json");
    eprintln!("{summary}");

    // Nothing failed, and every client finished its last request.
    let outcomes = &r["outcomes"];
    assert_eq!(count(outcomes, "failed"), 0, "failures: {}", r["failures"]);
    assert_eq!(count(&r, "unfinished"), 0, "clients still busy: {summary}");
    // The soak went down every path: requests that ran to the end, streams cancelled over gRPC,
    // HTTP connections closed mid-answer.
    // (Each client's choices come from a seeded generator: which requests are cut short is
    // fixed; only how many requests fit in the minute depends on the machine.)
    let completed = count(outcomes, "completed");
    assert!(completed >= 10, "few completed: {outcomes}");
    assert!(
        count(outcomes, "cancelled") >= 1,
        "none cancelled: {outcomes}"
    );
    assert!(
        count(outcomes, "disconnected") >= 1,
        "none disconnected: {outcomes}"
    );

    // Every replica is back to idle: nothing running or waiting, no KV block held.
    let fin = &r["final"];
    assert_eq!(fin["idle"], true, "not idle after the soak: {fin}");
    for family in ["kv_cache_usage", "running", "waiting"] {
        let per_replica = fin[family].as_object().expect("per replica");
        assert_eq!(per_replica.len(), 2, "two replicas: {fin}");
        for (replica, v) in per_replica {
            assert_eq!(v.as_f64(), Some(0.0), "{family} of {replica}: {fin}");
        }
    }

    // The server's own count: every request it accepted ended once, none in error or cut short
    // by the server; every request we saw complete, it counted as complete.
    let finished = r["server_finished"].as_object().expect("finish reasons");
    let of = |reason: &str| finished.get(reason).and_then(Value::as_f64).unwrap_or(0.0);
    for reason in ["error", "cancelled", "rejected"] {
        assert_eq!(
            of(reason),
            0.0,
            "requests finished as {reason}: {finished:?}"
        );
    }
    let server_total: f64 = finished.values().filter_map(Value::as_f64).sum();
    assert!(
        server_total <= count(&r, "requests") as f64,
        "the server ended more requests than were sent: {finished:?}"
    );
    assert!(
        of("length") + of("eos") + of("stop") >= completed as f64,
        "the server counts fewer complete requests than the clients saw: {finished:?}"
    );

    // No worker was lost, and no process grew beyond noise once warm.
    assert_eq!(r["workers_unchanged"], true, "a worker was replaced");
    assert_eq!(server.children(), workers, "a worker was replaced");
    let processes = r["processes"].as_object().expect("processes");
    assert_eq!(processes.len(), 3, "the coordinator and two workers");
    for (name, p) in processes {
        assert_eq!(p["alive"], true, "{name} is gone");
        let warm = p["warm_mib"].as_f64().expect("a sample after the warm-up");
        let last = p["last_mib"].as_f64().expect("a last sample");
        let bound = MAX_GROWTH_MIB
            .iter()
            .find(|(prefix, _)| name.starts_with(prefix))
            .map(|&(_, b)| b)
            .expect("a bound for every process");
        assert!(
            last - warm < bound,
            "{name}: RSS grew from {warm} to {last} MiB after the warm-up (bound {bound} MiB)"
        );
        // Connections of clients that left are closed, not kept.
        let fds = |k: &str| p[k].as_u64().expect("fd count");
        assert!(
            fds("fds_last") <= fds("fds_first") + 4,
            "{name}: file descriptors {} at the start, {} at the end",
            fds("fds_first"),
            fds("fds_last")
        );
    }
}
