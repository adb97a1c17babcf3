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
from concurrent.futures import ThreadPoolExecutor

import httpx
import jsonschema
from openai import OpenAI

S = {"type": "string", "maxLength": 24}
SCHEMAS = [
    {"type": "object", "properties": {"name": S, "age": {"type": "integer"}}, "required": ["name", "age"]},
    {"type": "object", "properties": {"city": S, "country": S}, "required": ["city", "country"], "additionalProperties": False},
    {"type": "object", "properties": {"answer": {"enum": ["yes", "no", "maybe"]}}, "required": ["answer"]},
    {"type": "object", "properties": {"colors": {"type": "array", "items": S, "minItems": 1, "maxItems": 3}}, "required": ["colors"]},
    {"type": "object", "properties": {"score": {"type": "integer", "minimum": 0, "maximum": 10}}, "required": ["score"]},
    {"type": "object", "properties": {"ok": {"type": "boolean"}, "reason": S}, "required": ["ok"]},
    {"type": "object", "properties": {"date": {"type": "string", "pattern": "^[0-9]{4}-[0-9]{2}-[0-9]{2}$"}}, "required": ["date"]},
    {"type": "object", "properties": {"person": {"type": "object", "properties": {"first": S, "last": S}, "required": ["first", "last"]}}, "required": ["person"]},
    {"type": "object", "properties": {"items": {"type": "array", "items": {"type": "object", "properties": {"id": {"type": "integer", "minimum": 1, "maximum": 99}, "label": S}, "required": ["id", "label"]}, "maxItems": 2}}, "required": ["items"]},
    {"type": "object", "properties": {"value": {"anyOf": [{"type": "integer"}, {"type": "string", "maxLength": 10}]}}, "required": ["value"]},
    {"type": "object", "properties": {"title": S, "subtitle": S}, "required": ["title"]},
    {"type": "object", "properties": {"level": {"type": "integer", "enum": [1, 2, 3]}}, "required": ["level"]},
    {"type": "object", "properties": {"code": {"type": "string", "pattern": "^[A-Z]{3}$"}, "rate": {"type": "integer"}}, "required": ["code", "rate"]},
    {"type": "object", "properties": {"tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3}}, "required": ["tags"]},
    {"type": "object", "properties": {"matrix": {"type": "array", "items": {"type": "array", "items": {"type": "integer"}, "maxItems": 2}, "maxItems": 2}}, "required": ["matrix"]},
    {"type": "object", "properties": {"email": {"type": "string", "pattern": "^[a-z]{1,8}@[a-z]{1,8}\\.com$"}}, "required": ["email"]},
    {"type": "object", "properties": {"nullable": {"type": ["string", "null"], "maxLength": 12}}, "required": ["nullable"]},
    {"type": "object", "properties": {"steps": {"type": "array", "items": S, "minItems": 2, "maxItems": 2}}, "required": ["steps"]},
    {"type": "object", "properties": {"kind": {"const": "point"}, "x": {"type": "integer"}, "y": {"type": "integer"}}, "required": ["kind", "x", "y"]},
    {"type": "object", "properties": {"meta": {"type": "object", "properties": {"version": {"type": "integer"}, "stable": {"type": "boolean"}}, "required": ["version", "stable"]}, "note": S}, "required": ["meta"]},
]


def strict(schema):
    """Objects take no properties beyond their own, as OpenAI's strict mode requires, and
    numbers are bounded: a 135M model left free writes digits until max_tokens (so the
    schemas use integers: a fraction has no bound on its digits)."""
    if isinstance(schema, dict):
        if schema.get("type") == "object":
            schema.setdefault("additionalProperties", False)
        if schema.get("type") in ("integer", "number") and "enum" not in schema:
            schema.setdefault("minimum", -1000)
            schema.setdefault("maximum", 1000)
        for v in schema.values():
            strict(v)
    elif isinstance(schema, list):
        for v in schema:
            strict(v)
    return schema


SCHEMAS = [strict(s) for s in SCHEMAS]
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
