"""The official ``openai`` Python package (and raw ``httpx``) against Helios' HTTP API.

Driven by ``tests/tests/openai_api.rs``, which starts the server and checks what this prints:
one JSON object of observations per mode. The checks live in the Rust test; this script only
asks and records (it fails only when the client itself fails where it should not).

Usage: openai_client.py MODE BASE_URL MODEL [CONFIG_JSON]
  api         completions and chat completions, streamed and not, usage, logprobs, stop
              strings, seeds, token-id prompts, /v1/models, /health, the raw SSE framing
              (CONFIG_JSON: {"prompt": ..., "question": ..., "prompt_ids": [...]})
  bad         bad inputs, raw and through the SDK, then a good request
  disconnect  a stream and a unary request whose client leaves early
  drain       a stream, SIGTERM to the server (CONFIG_JSON: {"pid": N}), then /health and a
              new request during the drain, and the rest of the stream
"""

import json
import os
import signal
import sys
import time

import httpx
import openai
from openai import OpenAI


def sse_events(response):
    """The `data:` payloads of an event stream, checking its framing on the way."""
    events, data = [], None
    for line in response.iter_lines():
        if line.startswith("data: "):
            assert data is None, f"two data lines in one event: {line!r}"
            data = line[len("data: ") :]
        elif line == "":
            if data is not None:
                events.append(data)
            data = None
        else:
            raise AssertionError(f"unexpected SSE line {line!r}")
    if data is not None:
        events.append(data)
    return events


def completion_stream(stream):
    """Text, finish reasons, logprob tokens, usage and chunk count of a streamed completion."""
    out = {"text": "", "finish_reasons": [], "tokens": 0, "usage": None, "chunks": 0}
    for chunk in stream:
        out["chunks"] += 1
        if chunk.usage is not None:
            out["usage"] = chunk.usage.model_dump(exclude_none=True)
            out["usage_chunk_choices"] = len(chunk.choices)
        for c in chunk.choices:
            out["text"] += c.text
            if c.logprobs is not None:
                out["tokens"] += len(c.logprobs.tokens)
            if c.finish_reason is not None:
                out["finish_reasons"].append(c.finish_reason)
    return out


def legacy_logprobs(text, lp):
    return {
        "text": text,
        "tokens": lp.tokens,
        "token_logprobs": lp.token_logprobs,
        "top_logprobs": [None if t is None else list(t.items()) for t in lp.top_logprobs],
        "text_offset": lp.text_offset,
    }


def merge_legacy(parts):
    """The legacy logprobs of a stream's chunks as one object."""
    merged = parts[0].model_copy(deep=True)
    for p in parts[1:]:
        for k in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
            getattr(merged, k).extend(getattr(p, k))
    return merged


def chat_stream(stream):
    out = {"text": "", "finish_reasons": [], "tokens": 0, "usage": None, "roles": []}
    for chunk in stream:
        if chunk.usage is not None:
            out["usage"] = chunk.usage.model_dump(exclude_none=True)
            out["usage_chunk_choices"] = len(chunk.choices)
        for c in chunk.choices:
            if c.delta.role is not None:
                out["roles"].append(c.delta.role)
            out["text"] += c.delta.content or ""
            if c.logprobs is not None and c.logprobs.content is not None:
                out["tokens"] += len(c.logprobs.content)
            if c.finish_reason is not None:
                out["finish_reasons"].append(c.finish_reason)
    return out


def api(base, model, config):
    client = OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=120)
    r = {}
    r["models"] = [m.id for m in client.models.list().data]
    r["model_retrieved"] = client.models.retrieve(model).id
    h = httpx.get(f"{base}/health")
    r["health"] = [h.status_code, h.json()]

    # Completions, greedy: whole, streamed (with usage), and from token ids.
    args = dict(model=model, prompt=config["prompt"], max_tokens=16, temperature=0)
    c = client.completions.create(logprobs=2, **args)
    lp = c.choices[0].logprobs
    r["completion"] = {
        "id": c.id,
        "object": c.object,
        "model": c.model,
        "text": c.choices[0].text,
        "finish_reason": c.choices[0].finish_reason,
        "usage": c.usage.model_dump(exclude_none=True),
        "logprobs": {
            "tokens": lp.tokens,
            "token_logprobs": lp.token_logprobs,
            "top_logprobs": [list(t.items()) for t in lp.top_logprobs],
            "text_offset": lp.text_offset,
        },
    }
    stream = client.completions.create(
        stream=True, stream_options={"include_usage": True}, logprobs=0, **args
    )
    r["completion_stream"] = completion_stream(stream)
    ids = dict(args, prompt=config["prompt_ids"])
    r["completion_from_ids"] = client.completions.create(**ids).choices[0].text
    # echo: the prompt, then the completion (from text and from token ids).
    r["echo"] = client.completions.create(echo=True, **args).choices[0].text
    r["echo_from_ids"] = client.completions.create(echo=True, **ids).choices[0].text
    # echo with logprobs, as lm-evaluation-harness scores a continuation: the prompt's
    # tokens with their logprobs (the first null), then the completion's; whole and streamed.
    scored = dict(args, prompt=config["scored_ids"], max_tokens=1, logprobs=1)
    e = client.completions.create(echo=True, **scored).choices[0]
    r["echo_logprobs"] = legacy_logprobs(e.text, e.logprobs)
    stream = client.completions.create(echo=True, stream=True, **scored)
    text, lps = "", []
    for chunk in stream:
        for c in chunk.choices:
            text += c.text
            if c.logprobs is not None:
                lps.append(c.logprobs)
    r["echo_logprobs_stream"] = legacy_logprobs(text, merge_legacy(lps))

    # Chat, greedy.
    messages = [{"role": "user", "content": config["question"]}]
    chat_args = dict(model=model, messages=messages, max_tokens=64, temperature=0)
    ch = client.chat.completions.create(logprobs=True, top_logprobs=3, **chat_args)
    content = ch.choices[0].logprobs.content
    r["chat"] = {
        "id": ch.id,
        "object": ch.object,
        "text": ch.choices[0].message.content,
        "role": ch.choices[0].message.role,
        "finish_reason": ch.choices[0].finish_reason,
        "usage": ch.usage.model_dump(exclude_none=True),
        "logprobs": [
            {
                "token": t.token,
                "logprob": t.logprob,
                "bytes": t.bytes,
                "top": [[x.token, x.logprob] for x in t.top_logprobs],
            }
            for t in content
        ],
    }
    stream = client.chat.completions.create(
        stream=True, stream_options={"include_usage": True}, logprobs=True, **chat_args
    )
    r["chat_stream"] = chat_stream(stream)
    r["chat_stream_no_usage"] = chat_stream(
        client.chat.completions.create(stream=True, **chat_args)
    )
    parts = [{"role": "user", "content": [{"type": "text", "text": config["question"]}]}]
    r["chat_parts"] = (
        client.chat.completions.create(**dict(chat_args, messages=parts))
        .choices[0]
        .message.content
    )

    # A stop string, streamed and not; and with max_completion_tokens.
    stopped = client.chat.completions.create(stop=["s Par"], **chat_args)
    r["chat_stop"] = [stopped.choices[0].message.content, stopped.choices[0].finish_reason]
    r["chat_stop_stream"] = chat_stream(
        client.chat.completions.create(stop="s Par", stream=True, **chat_args)
    )
    short = client.chat.completions.create(
        model=model, messages=messages, max_completion_tokens=3, temperature=0
    )
    r["chat_short"] = [short.choices[0].finish_reason, short.usage.completion_tokens]

    # Seeded sampling is repeatable, streamed or not; vLLM's extensions are accepted.
    seeded = dict(model=model, prompt=config["prompt"], max_tokens=12, temperature=0.9, seed=7)
    extra = {"top_k": 40, "min_p": 0.01, "repetition_penalty": 1.05, "priority": 1}
    r["seeded"] = [
        client.completions.create(**seeded).choices[0].text,
        completion_stream(client.completions.create(stream=True, **seeded))["text"],
        client.completions.create(extra_body=extra, **seeded).choices[0].text,
    ]

    # The raw event stream: framing, content type, the order of the last events.
    with httpx.stream(
        "POST",
        f"{base}/v1/chat/completions",
        json=dict(chat_args, stream=True, stream_options={"include_usage": True}),
        timeout=120,
    ) as resp:
        r["raw_stream"] = {
            "status": resp.status_code,
            "content_type": resp.headers.get("content-type"),
            "events": sse_events(resp),
        }
    return r


def raw(method, url, **kw):
    resp = httpx.request(method, url, timeout=120, **kw)
    try:
        body = resp.json()
    except ValueError:
        body = resp.text
    return {"status": resp.status_code, "body": body}


def bad(base, model, _config):
    comp, chat = f"{base}/v1/completions", f"{base}/v1/chat/completions"
    user = [{"role": "user", "content": "Hello"}]
    big = json.dumps({"model": model, "prompt": "a" * (5 << 20)})
    cases = {
        "malformed_json": ("POST", comp, {"content": b'{"model": "x", "prompt": '}),
        "empty_body": ("POST", comp, {"content": b""}),
        "not_an_object": ("POST", comp, {"json": [1, 2]}),
        "max_tokens_ten": ("POST", comp, {"json": {"model": model, "prompt": "x", "max_tokens": "ten"}}),
        "temperature_hot": ("POST", chat, {"json": {"model": model, "messages": user, "temperature": "hot"}}),
        "messages_string": ("POST", chat, {"json": {"model": model, "messages": "Hello"}}),
        "unknown_model": ("POST", comp, {"json": {"model": "gpt-4o", "prompt": "x"}}),
        "unknown_model_chat": ("POST", chat, {"json": {"model": "gpt-4o", "messages": user}}),
        "n_0": ("POST", comp, {"json": {"model": model, "prompt": "x", "n": 0}}),
        "n_129_chat": ("POST", chat, {"json": {"model": model, "messages": user, "n": 129}}),
        "best_of_below_n": ("POST", comp, {"json": {"model": model, "prompt": "x", "n": 3, "best_of": 2}}),
        "best_of_stream": ("POST", comp, {"json": {"model": model, "prompt": "x", "best_of": 2, "stream": True}}),
        "choice_tokens": ("POST", comp, {"json": {"model": model, "prompt": "x", "n": 100, "max_tokens": 1000}}),
        "logit_bias_range": ("POST", chat, {"json": {"model": model, "messages": user, "logit_bias": {"5": 150}}}),
        "logit_bias_unknown_id": ("POST", comp, {"json": {"model": model, "prompt": "x", "logit_bias": {"99999999": 1}}}),
        "logit_bias_key": ("POST", comp, {"json": {"model": model, "prompt": "x", "logit_bias": {"the": 1}}}),
        "two_prompts": ("POST", comp, {"json": {"model": model, "prompt": ["a", "b"]}}),
        "echo_logprobs_21": ("POST", comp, {"json": {"model": model, "prompt": "x", "echo": True, "logprobs": 21}}),
        "body_5_mib": ("POST", comp, {"content": big, "headers": {"content-type": "application/json"}}),
        "negative_temperature": ("POST", comp, {"json": {"model": model, "prompt": "x", "temperature": -1}}),
        "negative_temperature_stream": (
            "POST",
            chat,
            {"json": {"model": model, "messages": user, "temperature": -1, "stream": True}},
        ),
        "max_tokens_too_many": ("POST", comp, {"json": {"model": model, "prompt": "x", "max_tokens": 100000}}),
        "top_logprobs_21": (
            "POST",
            chat,
            {"json": {"model": model, "messages": user, "logprobs": True, "top_logprobs": 21}},
        ),
        "image_part": (
            "POST",
            chat,
            {"json": {"model": model, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}},
        ),
        "unknown_route": ("GET", f"{base}/v1/nothing", {}),
        "wrong_method": ("GET", comp, {}),
        "unknown_model_card": ("GET", f"{base}/v1/models/gpt-4o", {}),
    }
    r = {"cases": {name: raw(m, url, **kw) for name, (m, url, kw) in cases.items()}}

    # The SDK raises its typed errors from these answers.
    client = OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=120)
    sdk = {}
    for name, call in {
        "unknown_model": lambda: client.completions.create(model="gpt-4o", prompt="x"),
        "n_0": lambda: client.chat.completions.create(model=model, messages=user, n=0),
    }.items():
        try:
            call()
            sdk[name] = None
        except openai.APIStatusError as e:
            sdk[name] = [type(e).__name__, e.status_code, e.body]
    r["sdk"] = sdk

    # Still serving.
    ok = client.completions.create(model=model, prompt="Hello", max_tokens=4, temperature=0)
    r["after"] = [ok.choices[0].finish_reason, ok.usage.completion_tokens]
    return r


def choices(base, model, config):
    """n, best_of and logit_bias through the SDK: choices as listed, streamed chunks in the order
    they came (index, text), usage, and the legacy logprobs best_of is judged by."""
    client = OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=120)
    args = dict(
        model=model, prompt=config["prompt"], max_tokens=10, temperature=0.9, seed=11,
        extra_body={"ignore_eos": True},
    )
    r = {}
    four = client.completions.create(n=4, logprobs=0, **args)
    r["four"] = [
        {"index": c.index, "text": c.text, "logprob": sum(c.logprobs.token_logprobs), "finish_reason": c.finish_reason}
        for c in four.choices
    ]
    r["four_usage"] = four.usage.model_dump(exclude_none=True)
    r["singles"] = [
        client.completions.create(**{**args, "seed": 11 + i}).choices[0].text for i in range(4)
    ]
    stream = client.completions.create(n=4, stream=True, stream_options={"include_usage": True}, **args)
    chunks, usage = [], None
    for chunk in stream:
        for c in chunk.choices:
            chunks.append([c.index, c.text, c.finish_reason])
        if chunk.usage:
            usage = chunk.usage.model_dump(exclude_none=True)
    r["stream"], r["stream_usage"] = chunks, usage
    best = client.completions.create(n=2, best_of=4, **args)
    r["best"] = [[c.index, c.text] for c in best.choices]
    chat = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": config["question"]}], n=3, max_tokens=8,
        temperature=0.9, seed=3, stream=True,
    )
    chat_text = {}
    for chunk in chat:
        for c in chunk.choices:
            chat_text[c.index] = chat_text.get(c.index, "") + (c.delta.content or "")
    r["chat_stream"] = chat_text
    # logit_bias with string keys, as the SDK sends it: +100 makes greedy say that token.
    biased = client.completions.create(
        model=model, prompt=config["prompt"], max_tokens=4, temperature=0,
        logit_bias={str(config["forced"]): 100}, extra_body={"ignore_eos": True},
    )
    r["biased"] = biased.choices[0].text
    return r


def disconnect(base, model, _config):
    client = OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=120)
    long = dict(
        model=model,
        prompt="Count from one to one thousand.",
        max_tokens=1500,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    stream = client.completions.create(stream=True, **long)
    seen = 0
    for chunk in stream:
        seen += 1
        if seen == 3:
            break
    stream.close()
    # A unary request whose client gives up.
    timed_out = False
    try:
        OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=1.0).completions.create(**long)
    except openai.APITimeoutError:
        timed_out = True
    return {"chunks": seen, "unary_timed_out": timed_out}


def drain(base, model, config):
    body = {
        "model": model,
        "prompt": "Count from one to one thousand.",
        "max_tokens": 3000,
        "temperature": 0,
        "ignore_eos": True,
        "logprobs": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    r = {}
    with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=120) as resp:
        lines = resp.iter_lines()
        first = []
        for line in lines:
            if line.startswith("data: "):
                first.append(line)
            if len(first) == 2:
                break
        os.kill(config["pid"], signal.SIGTERM)
        time.sleep(0.3)
        r["health"] = raw("GET", f"{base}/health")
        r["refused"] = raw("POST", f"{base}/v1/completions", json={"model": model, "prompt": "Hi"})
        rest = [line[len("data: ") :] for line in lines if line.startswith("data: ")]
    events = [json.loads(e[len("data: ") :]) for e in first] + [
        json.loads(e) for e in rest if e != "[DONE]"
    ]
    r["done"] = bool(rest) and rest[-1] == "[DONE]"
    r["tokens"] = sum(len(c["logprobs"]["tokens"]) for e in events for c in e["choices"])
    r["finish_reasons"] = [c["finish_reason"] for e in events for c in e["choices"] if c["finish_reason"]]
    r["usage"] = [e["usage"] for e in events if e.get("usage")]
    return r


def main():
    mode, base, model = sys.argv[1], sys.argv[2].rstrip("/"), sys.argv[3]
    config = json.loads(sys.argv[4]) if len(sys.argv) > 4 else {}
    modes = {"api": api, "bad": bad, "choices": choices, "disconnect": disconnect, "drain": drain}
    print(json.dumps(modes[mode](base, model, config)))


if __name__ == "__main__":
    main()
