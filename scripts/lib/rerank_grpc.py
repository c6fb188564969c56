"""rerank-server's gRPC API from Python with plain grpcio and no generated stubs: the message classes come from the
server's reflection service. Shared by the scripts that call a running server.

    import sys, pathlib; sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "lib"))
    from rerank_grpc import Api, connect
    api = Api(connect("127.0.0.1:50051"))
    response = api.rerank(api.RerankRequest(query="q", documents=["a", "b"]), timeout=60)
"""
import grpc
from google.protobuf.descriptor_pool import DescriptorPool
from google.protobuf.message_factory import GetMessageClass
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

SERVICE = "rerank.v1.RerankerService"
# Large responses (return_documents of long documents) must not be cut by grpcio's 4 MiB default.
CHANNEL_OPTIONS = [("grpc.max_receive_message_length", 256 << 20), ("grpc.max_send_message_length", 256 << 20)]


def connect(address, extra_options=(), wait_seconds=30):
    """An insecure channel to `address`, ready (or an error after `wait_seconds`)."""
    channel = grpc.insecure_channel(address, options=CHANNEL_OPTIONS + list(extra_options))
    grpc.channel_ready_future(channel).result(timeout=wait_seconds)
    return channel


def message_types(channel):
    """The request and response classes of Rerank, RerankStream and Info, and the stream's RerankStart and
    DocumentChunk, from the server's reflection service."""
    pool = DescriptorPool(ProtoReflectionDescriptorDatabase(channel))
    service = pool.FindServiceByName(SERVICE)
    types = {}
    for name in ("Rerank", "RerankStream", "Info"):
        method = service.methods_by_name[name]
        types[name] = (GetMessageClass(method.input_type), GetMessageClass(method.output_type))
    stream_fields = types["RerankStream"][0].DESCRIPTOR.fields_by_name
    types["RerankStart"] = GetMessageClass(stream_fields["start"].message_type)
    types["DocumentChunk"] = GetMessageClass(stream_fields["documents"].message_type)
    return types


class Api:
    """Message classes and the Reranker's methods on one channel (`types` from another channel's Api, to skip
    the reflection round trips)."""

    def __init__(self, channel, types=None):
        self.types = types or message_types(channel)
        self.RerankRequest, rerank_response = self.types["Rerank"]
        self.StreamRequest, stream_response = self.types["RerankStream"]
        self.InfoRequest, info_response = self.types["Info"]
        self.RerankStart, self.DocumentChunk = self.types["RerankStart"], self.types["DocumentChunk"]
        method = lambda name: f"/{SERVICE}/{name}"
        self.rerank = channel.unary_unary(method("Rerank"), request_serializer=self.RerankRequest.SerializeToString,
                                          response_deserializer=rerank_response.FromString)
        # Takes an already serialized RerankRequest (bytes): one serialization for many identical calls.
        self.rerank_raw = channel.unary_unary(method("Rerank"), request_serializer=None,
                                              response_deserializer=rerank_response.FromString)
        self.rerank_stream = channel.stream_stream(
            method("RerankStream"), request_serializer=self.StreamRequest.SerializeToString,
            response_deserializer=stream_response.FromString)
        self.info = channel.unary_unary(method("Info"), request_serializer=self.InfoRequest.SerializeToString,
                                        response_deserializer=info_response.FromString)

    def scores(self, query, documents, timeout=600, **fields):
        """Each document's score, in the documents' order."""
        response = self.rerank(self.RerankRequest(query=query, documents=documents, **fields), timeout=timeout)
        scores = [0.0] * len(documents)
        for result in response.results:
            scores[result.index] = result.score
        return scores
