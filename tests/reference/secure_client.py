"""Stock clients against a Helios server behind TLS and API keys: grpcio (a secure channel,
no Helios code) and the official ``openai`` package over HTTPS.

Driven by ``tests/tests/security.rs``, which starts the server with certificates it made and
checks what this prints: one JSON object of observations. This script only asks and records.

Usage: secure_client.py GRPC_ADDR HTTP_ADDR CA_PEM KEY [CLIENT_CERT CLIENT_KEY]
  With CLIENT_CERT and CLIENT_KEY (mutual TLS), each call is made twice: with the client
  certificate, and without one.
"""

import json
import sys

import grpc
import httpx
import openai
from openai import OpenAI


def unary(channel, method, request_bytes, metadata):
    """Calls a unary method with raw protobuf bytes; the status code's name, and the reply."""
    call = channel.unary_unary(method, request_serializer=None, response_deserializer=None)
    try:
        reply = call(request_bytes, metadata=metadata, timeout=60)
        return "OK", reply
    except grpc.RpcError as e:
        return e.code().name, e.details()


def call_any(channel, method, body, streaming, metadata):
    """The status code's name of a call of any shape (a stream is read to its end)."""
    try:
        if streaming and method.endswith("ServerReflectionInfo"):
            call = channel.stream_stream(method, request_serializer=None, response_deserializer=None)
            list(call(iter([body]), metadata=metadata, timeout=60))
        elif streaming:
            call = channel.unary_stream(method, request_serializer=None, response_deserializer=None)
            list(call(body, metadata=metadata, timeout=60))
        else:
            channel.unary_unary(method, request_serializer=None, response_deserializer=None)(
                body, metadata=metadata, timeout=60
            )
        return "OK"
    except grpc.RpcError as e:
        return e.code().name


def generate_request(prompt, max_new_tokens):
    """A GenerateRequest, encoded by hand: prompt = field 2, parameters = field 5 with
    max_new_tokens = field 1 (see proto/helios/v1/generate.proto)."""

    def varint(n):
        out = b""
        while True:
            b = n & 0x7F
            n >>= 7
            out += bytes([b | (0x80 if n else 0)])
            if not n:
                return out

    p = prompt.encode()
    params = b"\x08" + varint(max_new_tokens)
    return b"\x12" + varint(len(p)) + p + b"\x2a" + varint(len(params)) + params


def grpc_observations(addr, ca, key, cert_pair):
    creds = grpc.ssl_channel_credentials(
        root_certificates=ca,
        private_key=cert_pair[1] if cert_pair else None,
        certificate_chain=cert_pair[0] if cert_pair else None,
    )
    out = {}
    with grpc.secure_channel(addr, creds) as ch:
        req = generate_request("Hello", 4)
        gen = "/helios.v1.Generation/Generate"
        out["generate_with_key"], reply = unary(ch, gen, req, [("authorization", f"Bearer {key}")])
        out["generate_reply_bytes"] = len(reply) if isinstance(reply, bytes) else 0
        out["generate_wrong_key"], out["wrong_key_message"] = unary(
            ch, gen, req, [("authorization", "Bearer not-the-key")]
        )
        out["generate_no_key"], out["no_key_message"] = unary(ch, gen, req, [])
        out["model_info_no_key"], _ = unary(ch, "/helios.v1.Generation/ModelInfo", b"", [])
        # Every other route, without a key and with a wrong one: TokenizeRequest{prompt: "Hi"}
        # (field 1), DetokenizeRequest{token_ids: [5]} (field 1, packed), the stream, and
        # server reflection (a list_services request, field 7).
        routes = {
            "Tokenize": ("/helios.v1.Generation/Tokenize", b"\x0a\x02Hi", False),
            "Detokenize": ("/helios.v1.Generation/Detokenize", b"\x0a\x01\x05", False),
            "GenerateStream": ("/helios.v1.Generation/GenerateStream", req, True),
            "Reflection": ("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo", b"\x3a\x00", True),
        }
        refused = {}
        for name, (method, body, streaming) in routes.items():
            for label, md in (("no key", []), ("wrong key", [("authorization", "Bearer nope")])):
                refused[f"{name}, {label}"] = call_any(ch, method, body, streaming, md)
            refused[f"{name}, the key"] = call_any(
                ch, method, body, streaming, [("authorization", f"Bearer {key}")]
            )
        out["routes"] = refused
        # grpc.health.v1.Health/Check with an empty service name: open to probes. SERVING is
        # status = 1, encoded 08 01.
        out["health_no_key"], reply = unary(ch, "/grpc.health.v1.Health/Check", b"", [])
        out["health_serving"] = reply == b"\x08\x01"
    return out


def http_observations(http_addr, ca_path, key, cert_paths):
    base = f"https://{http_addr}"
    out = {}
    with httpx.Client(verify=ssl_context(ca_path, cert_paths), timeout=60) as http:
        out["health_no_key"] = http.get(f"{base}/health").status_code
        out["metrics_no_key"] = http.get(f"{base}/metrics").status_code
        r = http.get(f"{base}/v1/models")
        out["models_no_key"] = r.status_code
        out["models_no_key_error"] = r.json().get("error", {})
        out["models_wrong_key"] = http.get(
            f"{base}/v1/models", headers={"Authorization": "Bearer nope"}
        ).status_code
        out["completions_no_key"] = http.post(
            f"{base}/v1/completions", json={"prompt": "Hi", "max_tokens": 2}
        ).status_code
        for path in ("/v1/chat/completions", "/v1/completions"):
            body = {"messages": [{"role": "user", "content": "Hi"}], "prompt": "Hi", "max_tokens": 2}
            for label, headers in (("no key", {}), ("wrong key", {"Authorization": "Bearer x"})):
                out[f"POST {path}, {label}"] = http.post(f"{base}{path}", json=body, headers=headers).status_code
        for label, headers in (("no key", {}), ("wrong key", {"Authorization": "Basic x"})):
            out[f"GET /v1/models/m, {label}"] = http.get(f"{base}/v1/models/m", headers=headers).status_code
        client = OpenAI(base_url=f"{base}/v1", api_key=key, http_client=http)
        c = client.completions.create(model=MODEL, prompt="Hello", max_tokens=4)
        out["sdk_completion_tokens"] = c.usage.completion_tokens
        chunks = client.completions.create(
            model=MODEL, prompt="Hello", max_tokens=4, stream=True
        )
        out["sdk_stream_chunks"] = sum(1 for _ in chunks)
        bad = OpenAI(base_url=f"{base}/v1", api_key="wrong", http_client=http)
        try:
            bad.completions.create(model=MODEL, prompt="Hello", max_tokens=4)
            out["sdk_wrong_key"] = "served"
        except openai.AuthenticationError as e:
            out["sdk_wrong_key"] = e.status_code
    return out


def ssl_context(ca_path, cert):
    import ssl

    ctx = ssl.create_default_context(cafile=ca_path)
    if cert:
        ctx.load_cert_chain(certfile=cert[0], keyfile=cert[1])
    return ctx


def attempt(f, *args):
    """f(*args), or the kind of exception it raised."""
    try:
        return f(*args)
    except Exception as e:  # noqa: BLE001 (the kind is the observation)
        return {"error": type(e).__name__, "message": str(e)[:300]}


# The served model's id; any name the server accepts would do.
MODEL = None

if __name__ == "__main__":
    grpc_addr, http_addr, ca_path, key = sys.argv[1:5]
    cert_paths = tuple(sys.argv[5:7]) if len(sys.argv) > 6 else None
    with open(ca_path, "rb") as f:
        ca = f.read()
    cert_pair = tuple(open(p, "rb").read() for p in cert_paths) if cert_paths else None
    with httpx.Client(verify=ssl_context(ca_path, cert_paths), timeout=60) as h:
        models = h.get(f"https://{http_addr}/v1/models", headers={"Authorization": f"Bearer {key}"})
        MODEL = models.json()["data"][0]["id"]
    result = {
        "grpc": attempt(grpc_observations, grpc_addr, ca, key, cert_pair),
        "http": attempt(http_observations, http_addr, ca_path, key, cert_paths),
    }
    if cert_paths:
        result["grpc_without_client_cert"] = attempt(grpc_observations, grpc_addr, ca, key, None)
        result["http_without_client_cert"] = attempt(
            http_observations, http_addr, ca_path, key, None
        )
    print(json.dumps(result))
