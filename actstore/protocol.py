"""What client and server agree on beyond the .proto: message sizes and enum names.

Large arrays stream as ~1 MiB messages rather than raising gRPC's 4 MiB limit; the limits are still
set explicitly on both sides, with headroom for framing and for a header carrying many labels.
"""

from __future__ import annotations

from actstore.v1 import actstore_pb2 as pb

CHUNK_BYTES = 1 << 20
MAX_MESSAGE_BYTES = 64 << 20
MAX_REQUEST_BYTES = 4 << 20  # what the server reads of one request: a selection of up to ~1 million ids
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
]
DEFAULT_ADDRESS = "127.0.0.1:50051"

VISIBILITY_NAMES = {pb.VISIBILITY_PRIVATE: "private", pb.VISIBILITY_SHARED: "shared", pb.VISIBILITY_PUBLIC: "public"}
VISIBILITY_ENUMS = {name: value for value, name in VISIBILITY_NAMES.items()}
DTYPE_NAMES = {pb.DTYPE_UNSPECIFIED: "float32", pb.DTYPE_FLOAT32: "float32", pb.DTYPE_FLOAT16: "float16"}
DTYPE_ENUMS = {"float32": pb.DTYPE_FLOAT32, "float16": pb.DTYPE_FLOAT16}
