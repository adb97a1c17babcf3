//! Tool calls on `/v1/chat/completions`, end to end on the default model (tp 1), through the
//! official `openai` package (`tests/reference/tools_client.py` records, validating every
//! call's arguments with `jsonschema`; the checks are here): required and named calls are
//! calls of the declared tool whose arguments its schema accepts, streamed and not, and the
//! streamed argument deltas add up to the unary arguments; histories with `tool` messages are
//! accepted; bad tools are 400s naming the parameter.

use serde_json::Value;

use helios_tests::server::Process;

/// The id `/v1/models` lists for the default model.
const MODEL: &str = "SmolLM2-135M-Instruct.Q4_1";

/// One recorded answer holds exactly one valid call of one of `names`.
fn one_valid_call<'a>(name: &str, a: &'a Value, names: &[&str]) -> &'a Value {
    assert_eq!(a["finish_reason"], "tool_calls", "{name}: {a}");
    let calls = a["calls"].as_array().expect("calls");
    assert_eq!(calls.len(), 1, "{name}: {a}");
    let call = &calls[0];
    assert!(
        names.contains(&call["name"].as_str().unwrap_or("")),
        "{name}: {a}"
    );
    assert_eq!(call["errors"], Value::Array(vec![]), "{name}: {a}");
    call
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn required_and_named_tool_calls_through_the_openai_client() {
    let server = Process::serve_default("1", &[]);
    let r = helios_tests::reference_json("tools_client.py", &[&server.http_url(), MODEL]);
    let any = ["get_weather", "add"];

    let required = one_valid_call("required", &r["required"], &any);
    assert_eq!(r["required"]["content"], Value::Null, "only the call");
    assert!(r["required"]["ids"][0]
        .as_str()
        .is_some_and(|id| id.starts_with("call_")));
    assert_eq!(r["required"]["types"][0], "function");
    // Streamed: the header first (id, type, name, no arguments), then argument deltas that
    // join to exactly the unary arguments.
    let s = &r["required_stream"];
    let streamed = one_valid_call("required_stream", s, &any);
    assert_eq!(streamed, required);
    assert_eq!(s["content"], "", "{s}");
    let header = &s["headers"][0];
    assert_eq!(
        (&header["type"], &header["arguments"]),
        (&"function".into(), &"".into())
    );
    assert_eq!(header["name"], required["name"]);
    assert!(s["argument_deltas"].as_u64().is_some_and(|n| n > 1), "{s}");

    let add = one_valid_call("named", &r["named"], &["add"]);
    let args: Value = serde_json::from_str(add["arguments"].as_str().expect("text")).expect("JSON");
    assert!(args["a"].is_i64() && args["b"].is_i64(), "{args}");
    let weather = one_valid_call("named_weather", &r["named_weather"], &["get_weather"]);
    let streamed = one_valid_call(
        "named_weather_stream",
        &r["named_weather_stream"],
        &["get_weather"],
    );
    assert_eq!(streamed, weather);

    // `auto` is the model's choice: a call, if any, is valid; otherwise text.
    for name in ["auto", "history_auto"] {
        let a = &r[name];
        match a["calls"].as_array().map(Vec::len) {
            Some(0) | None => assert!(a["content"].is_string(), "{name}: {a}"),
            Some(_) => {
                for c in a["calls"].as_array().into_iter().flatten() {
                    assert_eq!(c["errors"], Value::Array(vec![]), "{name}: {a}");
                }
            }
        }
    }
    // `none` never calls; a history with calls and tool results is taken.
    for name in ["none", "history"] {
        let a = &r[name];
        assert_eq!(a["calls"], Value::Array(vec![]), "{name}: {a}");
        assert!(
            a["content"].as_str().is_some_and(|c| !c.is_empty()),
            "{name}: {a}"
        );
        assert_ne!(a["finish_reason"], "tool_calls", "{name}: {a}");
    }

    for (case, param) in [
        ("unknown_choice", "tool_choice"),
        ("bad_name", "tools[0].function.name"),
        ("duplicate", "tools[1].function.name"),
        ("not_function", "tools[0].type"),
        ("bad_choice", "tool_choice"),
        ("required_without_tools", "tool_choice"),
        ("with_response_format", "tool_choice"),
        ("bad_parameters", "tools"),
    ] {
        let b = &r["bad"][case];
        assert_eq!(b[0], 400, "{case}: {b}");
        assert_eq!(b[1]["param"], param, "{case}: {b}");
        assert_eq!(b[1]["type"], "invalid_request_error", "{case}: {b}");
    }
}
