"""Streams one long greedy request from a running Helios server and kills (or stops) one of its
worker processes part-way, recording when every token arrived.

Talks gRPC through server reflection (no .proto files needed), like
tests/reference/reflection_client.py. Prints one JSON object: the kill's wall-clock time, every
token's arrival time (seconds since the epoch), and the token ids.

Usage: recovery_bench.py HOST:PORT WORKER_PID SIGNAL KILL_AFTER_TOKENS MAX_NEW_TOKENS
"""

import json
import os
import signal
import sys
import time

import grpc
from google.protobuf import descriptor_pool, message_factory
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)


def main() -> None:
    addr, pid, sig = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    kill_after, max_new = int(sys.argv[4]), int(sys.argv[5])
    channel = grpc.insecure_channel(addr)
    pool = descriptor_pool.DescriptorPool(ProtoReflectionDescriptorDatabase(channel))
    method = pool.FindServiceByName("helios.v1.Generation").methods_by_name["GenerateStream"]
    request_cls = message_factory.GetMessageClass(method.input_type)
    response_cls = message_factory.GetMessageClass(method.output_type)
    call = channel.unary_stream(
        "/helios.v1.Generation/GenerateStream",
        request_serializer=request_cls.SerializeToString,
        response_deserializer=response_cls.FromString,
    )
    req = request_cls(prompt="Tell me a long story about a lighthouse keeper.")
    req.parameters.max_new_tokens = max_new
    req.parameters.ignore_eos = True
    times, ids, killed_at = [], [], None
    for resp in call(req, timeout=300):
        now = time.time()
        for t in resp.token_ids:
            times.append(now)
            ids.append(t)
        if killed_at is None and len(ids) >= kill_after:
            killed_at = time.time()
            os.kill(pid, getattr(signal, sig))
    print(json.dumps({"killed_at": killed_at, "token_times": times, "token_ids": ids}))


if __name__ == "__main__":
    main()
