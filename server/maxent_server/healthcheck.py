"""`python -m maxent_server.healthcheck`: exit 0 when the server's gRPC health
service says SERVING, 1 otherwise (the Docker HEALTHCHECK).

Every flag has a MAXENT_HEALTHCHECK_* environment equivalent; the target
defaults to 127.0.0.1 on MAXENT_PORT (50051). With TLS give --tls-ca (the CA
that signed the server's certificate, or the certificate itself when
self-signed) and, under mutual TLS, a client --tls-cert/--tls-key;
--tls-server-name sets the name checked against the certificate when it does
not cover the target's host. Health needs no token.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from .settings import ConfigError, parse_bool


def _env(name: str, default: str = "") -> str:
    return os.environ.get("MAXENT_HEALTHCHECK_" + name.upper().replace("-", "_"), default)


def _env_flag(name: str) -> bool:
    text = _env(name)
    return parse_bool(text, "MAXENT_HEALTHCHECK_" + name.upper()) if text.strip() else False


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m maxent_server.healthcheck", description=__doc__)
    p.add_argument("--target", default=_env("target", f"127.0.0.1:{os.environ.get('MAXENT_PORT', '50051')}"),
                   help="host:port of the server (default 127.0.0.1:$MAXENT_PORT or 127.0.0.1:50051)")
    p.add_argument("--service", default=_env("service", ""), help="health service name ('' = the whole server)")
    p.add_argument("--timeout", type=float, default=float(_env("timeout", "5")), help="seconds (default 5)")
    p.add_argument("--tls", action="store_true", default=_env_flag("tls"),
                   help="use TLS with the system's root certificates (implied by --tls-ca)")
    p.add_argument("--tls-ca", default=_env("tls-ca"), help="PEM file of the CA that signed the server certificate")
    p.add_argument("--tls-cert", default=_env("tls-cert"), help="client certificate (PEM) for mutual TLS")
    p.add_argument("--tls-key", default=_env("tls-key"), help="client key (PEM) for mutual TLS")
    p.add_argument("--tls-server-name", default=_env("tls-server-name"),
                   help="name to check the server certificate against (default: the target's host)")
    return p


def check(args: argparse.Namespace) -> tuple[bool, str]:
    use_tls = args.tls or bool(args.tls_ca or args.tls_cert)
    if use_tls:
        read = lambda path: Path(path).read_bytes() if path else None  # noqa: E731
        credentials = grpc.ssl_channel_credentials(read(args.tls_ca), read(args.tls_key), read(args.tls_cert))
        options = [("grpc.ssl_target_name_override", args.tls_server_name)] if args.tls_server_name else []
        channel = grpc.secure_channel(args.target, credentials, options=options)
    else:
        channel = grpc.insecure_channel(args.target)
    with channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout
            )
        except grpc.RpcError as error:
            return False, f"{error.code().name}: {error.details()}"
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    return reply.status == health_pb2.HealthCheckResponse.SERVING, status


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except ConfigError as error:
        print(error, file=sys.stderr)
        return 2
    if bool(args.tls_cert) != bool(args.tls_key):
        print("--tls-cert and --tls-key go together", file=sys.stderr)
        return 2
    try:
        ok, what = check(args)
    except OSError as error:
        print(f"cannot read a TLS file: {error}", file=sys.stderr)
        return 2
    print(f"{args.target}: {what}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
