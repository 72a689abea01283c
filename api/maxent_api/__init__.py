"""The wire contract shared by the server and the client.

Both sides stand on this package and on nothing of each other: the generated
protobuf and gRPC stubs for ``maxent.v1``, the packed-array codec, and the
names derived from the service descriptor (service name, methods, streaming
kinds), so no module spells them by hand.
"""

from __future__ import annotations

from ._generated.maxent.v1 import maxent_pb2 as pb
from ._generated.maxent.v1 import maxent_pb2_grpc as pb_grpc

SERVICE = pb.DESCRIPTOR.services_by_name["MaxEntService"]
SERVICE_NAME: str = SERVICE.full_name
"""Fully qualified service name, ``maxent.v1.MaxEntService``."""
METHODS: tuple[str, ...] = tuple(method.name for method in SERVICE.methods)
"""Every RPC of the service, in declaration order."""
STREAMING_METHODS: frozenset[str] = frozenset(
    method.name for method in SERVICE.methods if method.server_streaming or method.client_streaming
)
"""RPCs whose request or response is a stream."""


def method_path(name: str) -> str:
    """The gRPC path of one RPC, e.g. ``/maxent.v1.MaxEntService/UpdateController``."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; the service has {', '.join(METHODS)}")
    return f"/{SERVICE_NAME}/{name}"


__all__ = ["METHODS", "SERVICE", "SERVICE_NAME", "STREAMING_METHODS", "method_path", "pb", "pb_grpc"]
