"""Structured outputs through the official `openai` package, recorded for
tests/tests/structured_outputs.rs (which holds the checks).

    structured_client.py BASE_URL MODEL

Sends 20 JSON schemas as `response_format: json_schema`, each greedy and sampled (seeded),
all at once together with unconstrained chats; validates every answer with `jsonschema`;
records the unconstrained answers alone and in that batch, one streamed constrained answer
beside its unary twin, vLLM's `guided_*` extensions, and the errors bad constraints get.
Prints one JSON object.
"""

import json
import sys
from pathlib import Path
from concurrent.futures import ThreadPoolExecutor

import httpx
import jsonschema
from openai import OpenAI

# 20 schemas (helios-bench constraint compiles the same ones): objects closed to other
# properties, as OpenAI's strict mode requires; strings, arrays and integers bounded, since a
# 135M model left free writes digits or items until max_tokens (hence integers: a fraction
# has no bound on its digits).
with open(Path(__file__).with_name("schemas.json")) as f:
    SCHEMAS = json.load(f)
QUESTION = "Describe something as JSON."
PLAIN = ["What is the capital of France?", "Name three colors.", "Count to five."]


def main():
    base, model = sys.argv[1].rstrip("/"), sys.argv[2]
    client = OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=300)

    def chat(content, fmt=None, temperature=0.0, seed=None, max_tokens=160, extra=None):
        kw = dict(model=model, messages=[{"role": "user", "content": content}],
                  max_tokens=max_tokens, temperature=temperature)
        if fmt is not None:
            kw["response_format"] = fmt
        if seed is not None:
            kw["seed"] = seed
        if extra:
            kw["extra_body"] = extra
        c = client.chat.completions.create(**kw).choices[0]
        return {"text": c.message.content, "finish_reason": c.finish_reason}

    def fmt(i):
        return {"type": "json_schema", "json_schema": {"name": f"s{i}", "schema": SCHEMAS[i], "strict": True}}

    r = {"solo": [chat(q, max_tokens=24) for q in PLAIN]}
    jobs = [(QUESTION, fmt(i), t, 7 + i, 160) for i in range(len(SCHEMAS)) for t in (0.0, 0.8)]
    jobs += [(q, None, 0.0, None, 24) for q in PLAIN]
    with ThreadPoolExecutor(len(jobs)) as ex:
        answers = list(ex.map(lambda j: chat(j[0], j[1], j[2], j[3], j[4]), jobs))
    r["batch_plain"] = answers[len(SCHEMAS) * 2:]
    r["constrained"] = []
    for (_, f, t, _, _), a in zip(jobs, answers):
        if f is None:
            continue
        schema = f["json_schema"]["schema"]
        try:
            value = json.loads(a["text"])
            errors = [e.message for e in jsonschema.Draft202012Validator(schema).iter_errors(value)]
        except json.JSONDecodeError as e:
            errors = [f"not JSON: {e}"]
        r["constrained"].append({"temperature": t, "finish_reason": a["finish_reason"],
                                 "text": a["text"], "errors": errors})

    # One schema streamed: the deltas concatenate to the unary answer.
    stream = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": QUESTION}], max_tokens=160,
        temperature=0, response_format=fmt(0), stream=True)
    r["streamed"] = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    r["unary"] = chat(QUESTION, fmt(0))["text"]

    # vLLM's extensions and OpenAI's json_object, on completions and chat.
    r["json_object"] = chat(QUESTION, {"type": "json_object"}, max_tokens=200)
    r["guided_regex"] = chat("Give a date.", extra={"guided_regex": "[0-9]{4}-[0-9]{2}-[0-9]{2}"})
    r["guided_choice"] = chat("Is the sky blue?", extra={"guided_choice": ["yes", "no"]})
    r["structured_outputs_json"] = chat(QUESTION, extra={"structured_outputs": {"json": SCHEMAS[2]}})
    comp = client.completions.create(model=model, prompt="The year is", max_tokens=8, temperature=0,
                                     extra_body={"guided_regex": " [0-9]{4}\\."})
    r["completion_regex"] = comp.choices[0].text

    # Bad constraints: status, param and message of each.
    def bad(body):
        body = dict({"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}, **body)
        resp = httpx.post(f"{base}/v1/chat/completions", json=body, timeout=120)
        return [resp.status_code, resp.json().get("error", {})]

    wide = {"type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(30000)}}
    r["bad"] = {
        "invalid_schema": bad({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "frobnicate"}}}}),
        "missing_schema": bad({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}),
        "bad_type": bad({"response_format": {"type": "xml"}}),
        "bad_regex": bad({"guided_regex": "(unclosed"}),
        "bad_grammar": bad({"guided_grammar": "start: nowhere"}),
        "two_at_once": bad({"guided_regex": "a", "guided_choice": ["b"]}),
        "unsupported_keyword": bad({"guided_json": {"type": "array", "uniqueItems": True}}),
        "too_large": bad({"guided_json": wide}),
    }
    r["after"] = chat(PLAIN[0], max_tokens=24)
    print(json.dumps(r))


if __name__ == "__main__":
    main()
