#!/usr/bin/env python3
"""Calls a running rerank-server from Python with plain grpcio and no local .proto: the message types come
from the server's reflection service.

    pip install grpcio grpcio-reflection protobuf
    python3 scripts/python_client.py localhost:50051
"""
import sys

import grpc
from google.protobuf.descriptor_pool import DescriptorPool
from google.protobuf.message_factory import GetMessageClass
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase


def main(address: str):
    channel = grpc.insecure_channel(address)
    pool = DescriptorPool(ProtoReflectionDescriptorDatabase(channel))
    method = pool.FindServiceByName("rerank.v1.RerankerService").methods_by_name["Rerank"]
    request_type, response_type = GetMessageClass(method.input_type), GetMessageClass(method.output_type)
    rerank = channel.unary_unary(
        "/rerank.v1.RerankerService/Rerank",
        request_serializer=request_type.SerializeToString,
        response_deserializer=response_type.FromString,
    )
    response = rerank(request_type(
        query="what is the capital of france?",
        documents=["Berlin is the capital of Germany.", "Paris is the capital of France.", "The Eiffel Tower"],
        top_n=2,
        return_documents=True,
    ))
    for result in response.results:
        print(f"{result.index}  {result.score:.4f}  {result.document}")
    print(f"model={response.model} pairs={response.usage.pairs} total={response.usage.total_ns / 1e6:.1f} ms")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "localhost:50051")
