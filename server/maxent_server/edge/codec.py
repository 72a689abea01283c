"""Request bytes to messages and responses to bytes, at the edge: a request
that is not a valid message is INVALID_ARGUMENT (one access-log line, no
traceback), a response larger than the client may receive is
RESOURCE_EXHAUSTED said here, so the log shows the code the client gets."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from .refusal import Refusal


def decode_request(deserialize: Callable[[bytes], Any] | None, raw: bytes, method: str) -> Any:
    if deserialize is None:
        return raw
    try:
        return deserialize(raw)
    except (DecodeError, ValueError, IndexError, RuntimeError) as error:
        # The protobuf runtime raises DecodeError; its C++ parser some
        # RuntimeErrors; the numpy reader ValueError and IndexError.
        raise Refusal.invalid("request", f"is not a valid {method} request message "
                                         f"({type(error).__name__})") from None


def encode_response(serialize: Callable[[Any], bytes] | None, response: Any, max_bytes: int | None) -> bytes:
    out = serialize(response) if serialize is not None else response
    if max_bytes is not None and len(out) > max_bytes:
        raise Refusal(grpc.StatusCode.RESOURCE_EXHAUSTED,
                      f"the response has {len(out)} bytes, more than the {max_bytes} this server sends in one "
                      "message; ask for fewer completions per call (or a read_mask)")
    return out
