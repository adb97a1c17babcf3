"""A stock grpcio client that knows nothing of Helios' .proto files.

It asks the server's reflection service (grpcio-reflection speaks v1alpha) for the services
and the descriptors of ``helios.v1.Generation``, builds the message classes from them, calls
``Generate`` and ``GenerateStream``, and prints one JSON object:
``{"services": [...], "text": ..., "stream_text": ..., "finish_reason": ...}``.

Usage: reflection_client.py HOST:PORT PROMPT MAX_NEW_TOKENS
"""

import json
import sys

import grpc
from google.protobuf import descriptor_pool, json_format, message_factory
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)


def main() -> None:
    addr, prompt, max_new = sys.argv[1], sys.argv[2], int(sys.argv[3])
    channel = grpc.insecure_channel(addr)
    db = ProtoReflectionDescriptorDatabase(channel)
    services = sorted(db.get_services())
    pool = descriptor_pool.DescriptorPool(db)
    service = pool.FindServiceByName("helios.v1.Generation")
    method = service.methods_by_name["Generate"]
    request_cls = message_factory.GetMessageClass(method.input_type)
    response_cls = message_factory.GetMessageClass(method.output_type)
    request = json_format.ParseDict(
        {"prompt": prompt, "parameters": {"max_new_tokens": max_new}}, request_cls()
    )
    unary = channel.unary_unary(
        "/helios.v1.Generation/Generate",
        request_serializer=request_cls.SerializeToString,
        response_deserializer=response_cls.FromString,
    )
    stream = channel.unary_stream(
        "/helios.v1.Generation/GenerateStream",
        request_serializer=request_cls.SerializeToString,
        response_deserializer=response_cls.FromString,
    )
    answer = unary(request, timeout=60)
    pieces = [r.text for r in stream(request, timeout=60)]
    finish = response_cls.DESCRIPTOR.fields_by_name["finish_reason"].enum_type
    print(
        json.dumps(
            {
                "services": services,
                "text": answer.text,
                "stream_text": "".join(pieces),
                "token_ids": list(answer.token_ids),
                "finish_reason": finish.values_by_number[answer.finish_reason].name,
            }
        )
    )


if __name__ == "__main__":
    main()
