"""Tool calls through the official `openai` package, recorded for tests/tests/tool_calls.rs
(which holds the checks).

    tools_client.py BASE_URL MODEL

Asks for a call with `tool_choice: "required"` and with a named function, greedy, streamed
and not; validates each call's arguments with `jsonschema` against the tool's parameters;
joins the streamed argument deltas; sends a history with `tool` messages; records `auto`
and `none` answers and the errors bad tools get. Prints one JSON object.
"""

import json
import sys

import httpx
import jsonschema
from openai import OpenAI

TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "Get the current weather in a city",
        "parameters": {"type": "object", "properties": {
            "city": {"type": "string", "maxLength": 20},
            "unit": {"enum": ["celsius", "fahrenheit"]}},
            "required": ["city", "unit"], "additionalProperties": False}}},
    {"type": "function", "function": {
        "name": "add", "description": "Add two integers",
        "parameters": {"type": "object", "properties": {
            "a": {"type": "integer", "minimum": -1000, "maximum": 1000},
            "b": {"type": "integer", "minimum": -1000, "maximum": 1000}},
            "required": ["a", "b"], "additionalProperties": False}}},
]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
QUESTION = "What is the weather like in Paris today?"


def checked(calls):
    """Each call as {name, arguments, errors}: errors from the schema of the tool it names."""
    out = []
    for c in calls or []:
        errors = []
        try:
            args = json.loads(c["arguments"])
            schema = SCHEMAS.get(c["name"])
            if schema is None:
                errors.append(f"unknown tool {c['name']}")
            else:
                errors += [e.message for e in jsonschema.Draft202012Validator(schema).iter_errors(args)]
        except json.JSONDecodeError as e:
            errors.append(f"not JSON: {e}")
        out.append({"name": c["name"], "arguments": c["arguments"], "errors": errors})
    return out


def main():
    base, model = sys.argv[1].rstrip("/"), sys.argv[2]
    client = OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=300)
    user = [{"role": "user", "content": QUESTION}]

    def unary(choice, messages=user, **kw):
        r = client.chat.completions.create(model=model, messages=messages, tools=TOOLS,
                                           tool_choice=choice, temperature=0, max_tokens=96, **kw)
        c = r.choices[0]
        calls = [{"name": t.function.name, "arguments": t.function.arguments, "id": t.id,
                  "type": t.type} for t in (c.message.tool_calls or [])]
        return {"finish_reason": c.finish_reason, "content": c.message.content,
                "calls": checked(calls), "ids": [x["id"] for x in calls],
                "types": [x["type"] for x in calls]}

    def streamed(choice):
        s = client.chat.completions.create(model=model, messages=user, tools=TOOLS, tool_choice=choice,
                                           temperature=0, max_tokens=96, stream=True)
        calls, content, finish, deltas, headers = {}, "", None, 0, []
        for chunk in s:
            for c in chunk.choices:
                d = c.delta
                content += d.content or ""
                for t in d.tool_calls or []:
                    if t.id is not None:
                        headers.append({"id": t.id, "type": t.type, "name": t.function.name,
                                        "arguments": t.function.arguments})
                        calls[t.index] = {"name": t.function.name, "arguments": ""}
                    else:
                        deltas += 1
                    calls[t.index]["arguments"] += t.function.arguments or ""
                finish = c.finish_reason or finish
        return {"finish_reason": finish, "content": content, "headers": headers,
                "argument_deltas": deltas, "calls": checked([calls[i] for i in sorted(calls)])}

    named = {"type": "function", "function": {"name": "add"}}
    r = {
        "required": unary("required"),
        "required_stream": streamed("required"),
        "named": unary(named, messages=[{"role": "user", "content": "What is 2 plus 3?"}]),
        "named_weather": unary({"type": "function", "function": {"name": "get_weather"}}),
        "named_weather_stream": streamed({"type": "function", "function": {"name": "get_weather"}}),
        "auto": unary("auto"),
        "none": unary("none"),
    }
    history = user + [
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function",
         "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\", \"unit\": \"celsius\"}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "{\"temperature\": 18, \"sky\": \"sunny\"}"},
    ]
    r["history"] = unary("none", messages=history)
    r["history_auto"] = unary("auto", messages=history)

    def bad(body):
        body = dict({"model": model, "messages": user, "max_tokens": 4}, **body)
        resp = httpx.post(f"{base}/v1/chat/completions", json=body, timeout=120)
        return [resp.status_code, resp.json().get("error", {})]

    fn = lambda name: {"type": "function", "function": {"name": name}}
    r["bad"] = {
        "unknown_choice": bad({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "fly"}}}),
        "bad_name": bad({"tools": [fn("get weather")]}),
        "duplicate": bad({"tools": [fn("a"), fn("a")]}),
        "not_function": bad({"tools": [{"type": "retrieval"}]}),
        "bad_choice": bad({"tools": TOOLS, "tool_choice": "sometimes"}),
        "required_without_tools": bad({"tool_choice": "required"}),
        "with_response_format": bad({"tools": TOOLS, "tool_choice": "required",
                                     "response_format": {"type": "json_object"}}),
        "bad_parameters": bad({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "frobnicate"}}}],
                               "tool_choice": "required"}),
    }
    print(json.dumps(r))


if __name__ == "__main__":
    main()
