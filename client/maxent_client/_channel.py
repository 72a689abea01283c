"""Channel settings shared by the sync and async clients: TLS, bearer token,
message limits and gRPC's own retry policy."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import grpc
from maxent_api import SERVICE_NAME

RETRYABLE = ("UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED")
# HTTP/2 keepalive while a call is open (a WatchRun stream may carry no data
# for a long time): a ping every KEEPALIVE_TIME_MS, the connection declared
# dead when one goes unanswered for KEEPALIVE_TIMEOUT_MS, so a stream to a
# vanished server fails (UNAVAILABLE, then resumed) within ~40 s instead of
# hanging. The server accepts pings this often (app.py). Override with
# `options`, e.g. (("grpc.keepalive_time_ms", 60000),).
KEEPALIVE_TIME_MS = 30_000
KEEPALIVE_TIMEOUT_MS = 10_000


def _read(value: bytes | str | Path | None) -> bytes | None:
    """PEM bytes as given, or read from a path."""
    if value is None or isinstance(value, bytes):
        return value
    return Path(value).read_bytes()


def retry_service_config(*, max_attempts: int, initial_backoff: float, max_backoff: float,
                         retryable: Sequence[str] = RETRYABLE) -> str:
    """A gRPC service config: exponential backoff with jitter (gRPC applies a
    random factor to each backoff) on the retryable codes.

    gRPC re-sends the same request bytes, so a retried UpdateController
    carries the same request_id and the server applies it once."""
    policy = {
        "maxAttempts": max_attempts,
        "initialBackoff": f"{initial_backoff}s",
        "maxBackoff": f"{max_backoff}s",
        "backoffMultiplier": 2,
        "retryableStatusCodes": list(retryable),
    }
    return json.dumps({"methodConfig": [{"name": [{"service": SERVICE_NAME}], "retryPolicy": policy}]})


@dataclass(frozen=True)
class ChannelSettings:
    target: str
    root_certificates: bytes | str | Path | None = None
    private_key: bytes | str | Path | None = None
    certificate_chain: bytes | str | Path | None = None
    tls: bool = False
    token: str | None = None
    max_attempts: int = 5
    initial_backoff: float = 0.1
    max_backoff: float = 5.0
    max_message_mb: int = 64
    options: Sequence[tuple[str, Any]] = ()

    @property
    def secure(self) -> bool:
        return self.tls or any(v is not None for v in (self.root_certificates, self.private_key,
                                                         self.certificate_chain))

    def channel_options(self) -> list[tuple[str, Any]]:
        limit = self.max_message_mb * 1024 * 1024
        options: list[tuple[str, Any]] = [
            ("grpc.max_receive_message_length", limit),
            ("grpc.max_send_message_length", limit),
            ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
            ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
            ("grpc.keepalive_permit_without_calls", 0),
            ("grpc.http2.max_pings_without_data", 0),  # keep pinging a quiet stream
            # Each client its own connections: a connection that another
            # channel in this process left failing (a server gone from the
            # same address) is never handed to this one.
            ("grpc.use_local_subchannel_pool", 1),
        ]
        if self.max_attempts >= 2:  # gRPC's retry policy needs at least two attempts
            options += [
                ("grpc.enable_retries", 1),
                ("grpc.service_config", retry_service_config(max_attempts=self.max_attempts,
                                                             initial_backoff=self.initial_backoff,
                                                             max_backoff=self.max_backoff)),
            ]
        else:
            options.append(("grpc.enable_retries", 0))
        return [*options, *self.options]

    def credentials(self) -> grpc.ChannelCredentials:
        creds = grpc.ssl_channel_credentials(
            root_certificates=_read(self.root_certificates),
            private_key=_read(self.private_key),
            certificate_chain=_read(self.certificate_chain),
        )
        if self.token:
            # Call credentials ride on TLS; gRPC refuses them on plaintext.
            creds = grpc.composite_channel_credentials(creds, grpc.access_token_call_credentials(self.token))
        return creds

    def call_metadata(self) -> tuple[tuple[str, str], ...]:
        """Per-call metadata: the token travels here only on plaintext channels
        (loopback development); with TLS it is a call credential."""
        if self.token and not self.secure:
            return (("authorization", f"Bearer {self.token}"),)
        return ()

    def sync_channel(self) -> grpc.Channel:
        if self.secure:
            return grpc.secure_channel(self.target, self.credentials(), options=self.channel_options())
        return grpc.insecure_channel(self.target, options=self.channel_options())

    def aio_channel(self) -> grpc.aio.Channel:
        if self.secure:
            return grpc.aio.secure_channel(self.target, self.credentials(), options=self.channel_options())
        return grpc.aio.insecure_channel(self.target, options=self.channel_options())
