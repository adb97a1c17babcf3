"""A soak of a running ``helios serve``: many concurrent clients, some of which cancel or leave.

Driven by ``scripts/soak.sh`` (10 minutes, release build) and ``tests/tests/soak.rs`` (60 s in
CI). The server is started by the caller; this script only loads it, watches it and records.
It never judges: it prints one JSON object and the caller checks it.

Usage: soak.py --grpc HOST:PORT --http HOST:PORT --pid COORDINATOR_PID
               [--duration S] [--seed N] [--clients N] [--warmup S]

``--clients`` threads (default 24) each run requests back to back until ``--duration`` seconds
have passed, each request a random one of:

  grpc_stream  GenerateStream; 40 % are cancelled by us (``call.cancel()``) after a random
               number of responses (0 = at once, before the first token)
  grpc_unary   Generate; 30 % with a short deadline (50 ms to 2 s), which may pass first
  http_stream  POST /v1/completions or /v1/chat/completions with ``stream: true``; 40 % of the
               connections are closed by us after a random number of events (a disconnect)
  http_unary   the same without streaming; 25 % with a short read timeout (50 ms to 2 s), after
               which we close the connection (a disconnect)

with random prompts (1 to 80 words; a third start with one shared 40-word preamble, so that
cached prefix blocks are shared and freed too), random max tokens (4 to 48), greedy or seeded
sampling, sometimes logprobs, ``ignore_eos`` or a priority. Every request ends in one outcome:

  completed          it ended by itself, and what came back is whole: exactly one finish reason
                     (length, stop or EOS), on the last response; no more tokens than asked
  cancelled          a gRPC stream we cancelled
  disconnected       an HTTP request whose connection we closed (mid-stream, or on our timeout)
  deadline_exceeded  DEADLINE_EXCEEDED on a call we gave a short deadline
  failed             anything else: another status or HTTP code, a broken or truncated stream,
                     a stream without its finish, or a long (60 s) deadline that passed

Each second a sampler reads VmRSS (and the open file descriptors) of the coordinator and of
every child of it (its workers, found through /proc/PID/task/*/children at the start).
``fds_first`` is the first sample's count (our gRPC connection open), ``fds_last`` the count once
we have closed every connection of ours and waited a second.

Warm-up: the first ``--warmup`` seconds (default: a quarter of the run, at most 60 s) fill the
allocator's arenas, the KV pages the workers touch for the first time, the prefix cache and the
connection pools; the RSS slope (least squares, MiB per minute) is fitted to the samples after
it. ``warm`` is the first sample after it, ``last`` the last one.

After the duration no new request starts; those in flight get 60 s to end (a client still busy
then is counted in ``unfinished``). Then it waits (up to ``--idle-timeout``, 30 s) for
``/metrics`` to show ``helios_requests_running``, ``helios_requests_waiting`` and
``helios_kv_cache_usage_ratio`` at 0 for every replica, and prints:

  {"outcomes": {...}, "by_kind": {kind: {outcome: n}}, "failures": [first 20], "requests": N,
   "requests_per_s": X, "elapsed_s": S, "warmup_s": W, "unfinished": N,
   "processes": {"coordinator": {"pid", "first_mib", "warm_mib", "last_mib", "max_mib",
                 "slope_mib_per_min", "samples", "fds_first", "fds_last", "alive"},
                 "worker0": {...}, ...},
   "workers_unchanged": bool (the same children at the end: no worker was lost and replaced),
   "final": {"idle": bool, "waited_s": S, "kv_cache_usage": {replica: v},
             "running": {replica: n}, "waiting": {replica: n}},
   "server_finished": {finish_reason: n}, "server_preemptions": n}
"""

import argparse
import json
import os
import random
import threading
import time

import grpc
import httpx
from google.protobuf import descriptor_pool, message_factory
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from prometheus_client.parser import text_string_to_metric_families

OUTCOMES = ["completed", "cancelled", "disconnected", "deadline_exceeded", "failed"]
KINDS = [("grpc_stream", 30), ("grpc_unary", 20), ("http_stream", 30), ("http_unary", 20)]
# A request that is not ours to cut short must end well within this.
LONG_TIMEOUT = 60.0
WORDS = (
    "the a of to and in is it you that he was for on are with as his they be at one have "
    "this from or had by hot word but what some we can out other were all there when up use "
    "your how said an each she which do their time if will way about many then them write "
    "would like so these her long make thing see him two has look more day could go come did "
    "number sound no most people my over know water than call first who may down side been now "
    "find any new work part take get place made live where after back little only round man "
    "year came show every good me give our under name very through just form sentence great "
    "think say help low line differ turn cause much mean before move right boy old too same "
    "tell does set three want air well also play small end put home read hand port large spell"
).split()
PREAMBLE = " ".join(random.Random(0).choice(WORDS) for _ in range(40))


class Api:
    """The gRPC message classes and stubs, found by reflection (no generated code)."""

    def __init__(self, addr):
        self.channel = grpc.insecure_channel(addr)
        pool = descriptor_pool.DescriptorPool(ProtoReflectionDescriptorDatabase(self.channel))
        method = pool.FindServiceByName("helios.v1.Generation").methods_by_name["Generate"]
        self.request = message_factory.GetMessageClass(method.input_type)
        response = message_factory.GetMessageClass(method.output_type)
        self.finish = response.DESCRIPTOR.fields_by_name["finish_reason"].enum_type
        self.unary = self.channel.unary_unary(
            "/helios.v1.Generation/Generate",
            request_serializer=self.request.SerializeToString,
            response_deserializer=response.FromString,
        )
        self.stream = self.channel.unary_stream(
            "/helios.v1.Generation/GenerateStream",
            request_serializer=self.request.SerializeToString,
            response_deserializer=response.FromString,
        )

    def reason(self, number):
        return self.finish.values_by_number[number].name


class Broken(Exception):
    """What came back is not a whole answer."""


def random_request(rng):
    """(prompt text, chat or not, max tokens, sampling options) of one random request."""
    words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 80)))
    prompt = f"{PREAMBLE} {words}" if rng.random() < 1 / 3 else words
    opts = {"max_tokens": rng.randint(4, 48)}
    if rng.random() < 0.5:
        opts["temperature"] = 0.8
        opts["seed"] = rng.randrange(1 << 32)
        if rng.random() < 0.5:
            opts["top_k"] = 40
    if rng.random() < 0.25:
        opts["logprobs"] = rng.randint(0, 3)
    if rng.random() < 0.3:
        opts["ignore_eos"] = True
    if rng.random() < 0.2:
        opts["priority"] = rng.randint(-1, 1)
    return prompt, rng.random() < 0.5, opts


def grpc_request(api, prompt, chat, opts):
    params = {"max_new_tokens": opts["max_tokens"], "ignore_eos": opts.get("ignore_eos", False)}
    for key in ("temperature", "seed", "top_k", "logprobs"):
        if key in opts:
            params[key] = opts[key]
    req = api.request(parameters=params, priority=opts.get("priority", 0))
    if chat:
        req.messages.add(role="user", content=prompt)
    else:
        req.prompt = prompt
    return req


def check_finish(api, number, tokens, max_tokens):
    reason = api.reason(number)
    if reason not in ("FINISH_REASON_LENGTH", "FINISH_REASON_STOP", "FINISH_REASON_EOS"):
        raise Broken(f"finish reason {reason}")
    if tokens > max_tokens:
        raise Broken(f"{tokens} tokens for max {max_tokens}")


def grpc_stream(api, rng, prompt, chat, opts):
    cancel_after = rng.randint(0, opts["max_tokens"]) if rng.random() < 0.4 else None
    call = api.stream(grpc_request(api, prompt, chat, opts), timeout=LONG_TIMEOUT)
    finish, tokens, responses = 0, 0, 0
    try:
        if cancel_after == 0:
            call.cancel()  # at once: while it is admitted, queued or reading its prompt
            return "cancelled"
        for resp in call:
            if finish:
                raise Broken("a response after the last one")
            responses += 1
            tokens += len(resp.token_ids)
            finish = resp.finish_reason
            if not finish and cancel_after is not None and responses >= cancel_after:
                call.cancel()
                return "cancelled"
    finally:
        call.cancel()  # a no-op on a call that has ended
    if not finish:
        raise Broken(f"the stream ended without a finish after {responses} responses")
    check_finish(api, finish, tokens, opts["max_tokens"])
    return "completed"


def grpc_unary(api, rng, prompt, chat, opts):
    short = rng.random() < 0.3
    timeout = rng.uniform(0.05, 2.0) if short else LONG_TIMEOUT
    try:
        resp = api.unary(grpc_request(api, prompt, chat, opts), timeout=timeout)
    except grpc.RpcError as e:
        if short and e.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
            return "deadline_exceeded"
        raise
    check_finish(api, resp.finish_reason, len(resp.token_ids), opts["max_tokens"])
    return "completed"


def http_body(model, prompt, chat, opts, stream):
    body = {"model": model, "max_tokens": opts["max_tokens"], "stream": stream}
    if chat:
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    body["temperature"] = opts.get("temperature", 0)
    for key in ("seed", "top_k", "ignore_eos", "priority"):
        if key in opts:
            body[key] = opts[key]
    if "logprobs" in opts:
        if chat:
            body["logprobs"] = True
            body["top_logprobs"] = opts["logprobs"]
        else:
            body["logprobs"] = opts["logprobs"]
    if stream and opts["max_tokens"] % 2:
        body["stream_options"] = {"include_usage": True}
    path = "/v1/chat/completions" if chat else "/v1/completions"
    return path, body


def check_choice(choice_finish, usage, max_tokens):
    if choice_finish not in ("length", "stop"):
        raise Broken(f"finish_reason {choice_finish!r}")
    if usage is not None and usage["completion_tokens"] > max_tokens:
        raise Broken(f"{usage['completion_tokens']} tokens for max {max_tokens}")


def http_stream(client, model, rng, prompt, chat, opts):
    leave_after = rng.randint(0, opts["max_tokens"]) if rng.random() < 0.4 else None
    path, body = http_body(model, prompt, chat, opts, True)
    events, finishes, usage, done = 0, [], None, False
    with client.stream("POST", path, json=body, timeout=LONG_TIMEOUT) as resp:
        if resp.status_code != 200:
            resp.read()
            raise Broken(f"HTTP {resp.status_code}: {resp.text[:200]}")
        for line in resp.iter_lines():
            if leave_after is not None and events >= leave_after and not finishes:
                # Leaving the `with` unread closes the connection: a disconnect.
                return "disconnected"
            if line == "":
                continue
            if not line.startswith("data: "):
                raise Broken(f"unexpected SSE line {line!r}")
            data = line[len("data: ") :]
            if done:
                raise Broken("an event after [DONE]")
            if data == "[DONE]":
                done = True
                continue
            events += 1
            chunk = json.loads(data)
            if "error" in chunk:
                raise Broken(f"error event {data[:200]}")
            if chunk.get("usage"):
                usage = chunk["usage"]
            for c in chunk.get("choices", []):
                if c.get("finish_reason") is not None:
                    finishes.append(c["finish_reason"])
    if not done:
        raise Broken(f"the stream ended without [DONE] after {events} events")
    if len(finishes) != 1:
        raise Broken(f"finish reasons {finishes}")
    check_choice(finishes[0], usage, opts["max_tokens"])
    return "completed"


def http_unary(client, model, rng, prompt, chat, opts):
    short = rng.random() < 0.25
    path, body = http_body(model, prompt, chat, opts, False)
    try:
        resp = client.post(
            path, json=body, timeout=rng.uniform(0.05, 2.0) if short else LONG_TIMEOUT
        )
    except httpx.TimeoutException:
        if short:
            return "disconnected"
        raise
    if resp.status_code != 200:
        raise Broken(f"HTTP {resp.status_code}: {resp.text[:200]}")
    answer = resp.json()
    check_choice(answer["choices"][0]["finish_reason"], answer["usage"], opts["max_tokens"])
    return "completed"


class Tally:
    def __init__(self):
        self.lock = threading.Lock()
        self.by_kind = {k: dict.fromkeys(OUTCOMES, 0) for k, _ in KINDS}
        self.failures = []
        self.busy = 0

    def add(self, kind, outcome, detail=None):
        with self.lock:
            self.by_kind[kind][outcome] += 1
            if detail is not None and len(self.failures) < 20:
                self.failures.append(f"{kind}: {detail}")


def client_loop(i, args, api, model, tally, stop_at):
    rng = random.Random(args.seed * 1000 + i)
    kinds, weights = zip(*KINDS)
    with httpx.Client(base_url=f"http://{args.http}") as client:
        while time.monotonic() < stop_at:
            kind = rng.choices(kinds, weights)[0]
            prompt, chat, opts = random_request(rng)
            with tally.lock:
                tally.busy += 1
            try:
                if kind == "grpc_stream":
                    outcome = grpc_stream(api, rng, prompt, chat, opts)
                elif kind == "grpc_unary":
                    outcome = grpc_unary(api, rng, prompt, chat, opts)
                elif kind == "http_stream":
                    outcome = http_stream(client, model, rng, prompt, chat, opts)
                else:
                    outcome = http_unary(client, model, rng, prompt, chat, opts)
                tally.add(kind, outcome)
            except grpc.RpcError as e:
                tally.add(kind, "failed", f"{e.code().name}: {e.details()}")
            except Exception as e:  # noqa: BLE001 - every other way a request breaks is a failure
                tally.add(kind, "failed", f"{type(e).__name__}: {e}")
            finally:
                with tally.lock:
                    tally.busy -= 1


def children(pid):
    out = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for t in tasks:
        try:
            with open(f"/proc/{pid}/task/{t}/children") as f:
                out.extend(int(p) for p in f.read().split())
        except OSError:
            pass
    return sorted(set(out))


def rss_kib(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def fd_count(pid):
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


def sampler(procs, samples, start, stop):
    """Samples every process once a second, from the start until `stop` is set."""
    while True:
        t = time.monotonic() - start
        for name, pid in procs.items():
            rss = rss_kib(pid)
            if rss is not None:
                samples[name].append((t, rss / 1024, fd_count(pid)))
        if stop.wait(1.0 - (time.monotonic() - start) % 1.0):
            return


def slope_per_min(points):
    """Least-squares slope of (seconds, MiB) points, in MiB per minute."""
    if len(points) < 2:
        return None
    n = len(points)
    mt = sum(t for t, _ in points) / n
    mv = sum(v for _, v in points) / n
    var = sum((t - mt) ** 2 for t, _ in points)
    if var == 0:
        return None
    return 60 * sum((t - mt) * (v - mv) for t, v in points) / var


def scrape(http):
    """{family: {labels: value}} of /metrics (Prometheus text, the project's own parser)."""
    text = httpx.get(f"http://{http}/metrics", timeout=10).text
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            key = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            out.setdefault(s.name, {})[key] = s.value
    return out


def wait_idle(http, limit):
    start = time.monotonic()
    while True:
        m = scrape(http)
        running = m.get("helios_requests_running", {})
        waiting = m.get("helios_requests_waiting", {})
        usage = m.get("helios_kv_cache_usage_ratio", {})
        idle = (
            bool(usage)
            and all(v == 0 for v in running.values())
            and all(v == 0 for v in waiting.values())
            and all(v == 0 for v in usage.values())
        )
        waited = time.monotonic() - start
        if idle or waited >= limit:
            return m, {
                "idle": idle,
                "waited_s": round(waited, 2),
                "kv_cache_usage": usage,
                "running": running,
                "waiting": waiting,
            }
        time.sleep(0.25)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--grpc", required=True, help="HOST:PORT of the gRPC API")
    p.add_argument("--http", required=True, help="HOST:PORT of the HTTP API")
    p.add_argument("--pid", type=int, required=True, help="the coordinator's pid")
    p.add_argument("--duration", type=float, default=600)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--clients", type=int, default=24)
    p.add_argument("--warmup", type=float, default=None)
    p.add_argument("--idle-timeout", type=float, default=30)
    p.add_argument("--samples-out", help="also write every sample here (JSON)")
    args = p.parse_args()
    warmup = args.warmup if args.warmup is not None else min(args.duration / 4, 60)

    procs = {"coordinator": args.pid}
    for n, child in enumerate(children(args.pid)):
        procs[f"worker{n}"] = child
    samples = {name: [] for name in procs}

    api = Api(args.grpc)
    model = httpx.get(f"http://{args.http}/v1/models", timeout=10).json()["data"][0]["id"]
    tally = Tally()
    start = time.monotonic()
    stop_sampling = threading.Event()
    threading.Thread(
        target=sampler, args=(procs, samples, start, stop_sampling), daemon=True
    ).start()
    stop_at = start + args.duration
    clients = [
        threading.Thread(
            target=client_loop, args=(i, args, api, model, tally, stop_at), daemon=True
        )
        for i in range(args.clients)
    ]
    for c in clients:
        c.start()
    for c in clients:
        c.join(timeout=max(0.0, stop_at + LONG_TIMEOUT - time.monotonic()))
    load_s = time.monotonic() - start
    with tally.lock:
        unfinished = tally.busy
    metrics, final = wait_idle(args.http, args.idle_timeout)
    stop_sampling.set()
    # Our own connection closed, and a moment for the server to see every close: the file
    # descriptors left are the server's own.
    api.channel.close()
    time.sleep(1)
    fds_end = {name: fd_count(pid) for name, pid in procs.items()}

    outcomes = dict.fromkeys(OUTCOMES, 0)
    for counts in tally.by_kind.values():
        for o, n in counts.items():
            outcomes[o] += n
    total = sum(outcomes.values())
    processes = {}
    for name, pid in procs.items():
        s = samples[name]
        after = [(t, v) for t, v, _ in s if t >= warmup]
        warm = after[0][1] if after else None
        slope = slope_per_min(after)
        processes[name] = {
            "pid": pid,
            "samples": len(s),
            "first_mib": round(s[0][1], 1) if s else None,
            "warm_mib": round(warm, 1) if warm is not None else None,
            "last_mib": round(s[-1][1], 1) if s else None,
            "max_mib": round(max(v for _, v, _ in s), 1) if s else None,
            "slope_mib_per_min": round(slope, 3) if slope is not None else None,
            "fds_first": s[0][2] if s else None,
            "fds_last": fds_end[name],
            "alive": rss_kib(pid) is not None,
        }
    if args.samples_out:
        with open(args.samples_out, "w") as f:
            json.dump({"pids": procs, "samples": samples}, f)
    preemptions = sum(metrics.get("helios_preemptions_total", {}).values())
    finished = {
        k.removeprefix("finish_reason="): v
        for k, v in metrics.get("helios_requests_finished_total", {}).items()
    }
    print(
        json.dumps(
            {
                "duration_s": args.duration,
                "seed": args.seed,
                "clients": args.clients,
                "elapsed_s": round(load_s, 2),
                "warmup_s": warmup,
                "requests": total,
                "requests_per_s": round(total / load_s, 2) if load_s > 0 else None,
                "outcomes": outcomes,
                "by_kind": tally.by_kind,
                "failures": tally.failures,
                "unfinished": unfinished,
                "processes": processes,
                "workers_unchanged": children(args.pid) == [
                    pid for name, pid in procs.items() if name != "coordinator"
                ],
                "final": final,
                "server_finished": finished,
                "server_preemptions": preemptions,
            }
        )
    )


if __name__ == "__main__":
    main()
