"""TLS for the gRPC port and the metrics endpoint.

``--tls-cert`` and ``--tls-key`` (PEM: the certificate chain and its private
key) turn on TLS; ``--tls-client-ca`` (PEM bundle) also requires every client
to present a certificate signed by one of those CAs (mutual TLS). The files
are read and checked once at start; restart the server to rotate them.
"""

from __future__ import annotations

import ssl
import time
from dataclasses import dataclass
from pathlib import Path

import grpc


class TlsConfigError(ValueError):
    """The TLS flags or files cannot be used."""


@dataclass(frozen=True)
class TlsFiles:
    cert: str
    key: str
    client_ca: str = ""

    @property
    def mutual(self) -> bool:
        return bool(self.client_ca)


def tls_files(cert: str, key: str, client_ca: str) -> TlsFiles | None:
    """The TLS settings from the flags, None for plaintext; checks that the
    files exist, parse and that the key matches the certificate."""
    if not (cert or key or client_ca):
        return None
    if bool(cert) != bool(key):
        raise TlsConfigError("--tls-cert and --tls-key go together")
    if client_ca and not cert:
        raise TlsConfigError("--tls-client-ca needs --tls-cert and --tls-key")
    files = TlsFiles(cert, key, client_ca)
    for flag, path in (("--tls-cert", cert), ("--tls-key", key), ("--tls-client-ca", client_ca)):
        if path and not Path(path).is_file():
            raise TlsConfigError(f"{flag}: no such file {path!r}")
    http_ssl_context(files)  # parses every file; raises TlsConfigError
    return files


def _read(path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as error:
        raise TlsConfigError(f"cannot read {path!r}: {error.strerror or error}") from None


def grpc_server_credentials(files: TlsFiles) -> grpc.ServerCredentials:
    return grpc.ssl_server_credentials(
        [(_read(files.key), _read(files.cert))],
        root_certificates=_read(files.client_ca) if files.client_ca else None,
        require_client_auth=files.mutual,
    )


def http_ssl_context(files: TlsFiles) -> ssl.SSLContext:
    """A server-side context with the same certificate (and client CA) for the
    metrics endpoint."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(files.cert, files.key)
    except (ssl.SSLError, OSError) as error:
        raise TlsConfigError(f"--tls-cert/--tls-key: cannot load the certificate and key ({error})") from None
    if files.client_ca:
        try:
            context.load_verify_locations(cafile=files.client_ca)
        except (ssl.SSLError, OSError) as error:
            raise TlsConfigError(f"--tls-client-ca: cannot load the CA bundle ({error})") from None
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def certificate_expiry_problem(cert: str, now: float | None = None) -> str | None:
    """'expired on DATE' (or 'not valid before DATE') for the first
    certificate of `cert`, None when it is valid now or cannot be decoded."""
    try:
        decoded = ssl._ssl._test_decode_cert(cert)  # type: ignore[attr-defined]  # the stdlib's only decoder
        not_before = ssl.cert_time_to_seconds(decoded["notBefore"])
        not_after = ssl.cert_time_to_seconds(decoded["notAfter"])
    except (AttributeError, KeyError, ValueError, OSError, ssl.SSLError):
        return None
    now = time.time() if now is None else now
    if now > not_after:
        return f"expired on {decoded['notAfter']}"
    if now < not_before:
        return f"not valid before {decoded['notBefore']}"
    return None
