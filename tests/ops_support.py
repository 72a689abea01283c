"""Helpers of the operations tests (metrics, auth, TLS, logs): scraping,
token files, certificates made at run time, servers that speak TLS."""

from __future__ import annotations

import datetime
import ipaddress
import json
import ssl
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import grpc
from maxent_api import SERVICE_NAME
from prometheus_client.parser import text_string_to_metric_families

from server_process import ServerProcess


# -- metrics -------------------------------------------------------------------------


def scrape(url: str, *, token: str | None = None, context: ssl.SSLContext | None = None,
           timeout: float = 30.0) -> tuple[int, str]:
    """(HTTP status, body) of a GET."""
    request = urllib.request.Request(url)
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout, context=context) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def samples(text: str | bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """{(sample name, sorted labels): value} of an exposition."""
    if isinstance(text, bytes):
        text = text.decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(parsed: dict, name: str, default: float | None = 0.0, **labels: str) -> float | None:
    return parsed.get((name, tuple(sorted(labels.items()))), default)


def rpc_count(parsed: dict, method: str, code: str = "OK") -> float:
    return value(parsed, "maxent_rpc_requests_total", service=SERVICE_NAME, method=method, code=code)


# -- tokens ----------------------------------------------------------------------------


def write_tokens(path: Path, entries: list[dict]) -> Path:
    path.write_text(json.dumps({"tokens": entries}, indent=2))
    return path


def metadata(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


# -- certificates ------------------------------------------------------------------------


@dataclass
class Pki:
    """A CA and certificates it signed, as PEM files in a folder."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    rogue_ca: Path  # another CA, unrelated
    rogue_client_cert: Path  # signed by the rogue CA
    rogue_client_key: Path


def make_pki(folder: Path) -> Pki:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def key():
        return ec.generate_private_key(ec.SECP256R1())

    def name(common: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])

    def ca(common: str):
        k = key()
        cert = (
            x509.CertificateBuilder()
            .subject_name(name(common))
            .issuer_name(name(common))
            .public_key(k.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False),
                           critical=True)
            .sign(k, hashes.SHA256())
        )
        return k, cert

    def leaf(common: str, issuer_key, issuer_cert, *, server: bool):
        k = key()
        builder = (
            x509.CertificateBuilder()
            .subject_name(name(common))
            .issuer_name(issuer_cert.subject)
            .public_key(k.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        )
        if server:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                             x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False,
            )
        return k, builder.sign(issuer_key, hashes.SHA256())

    def write(stem: str, k, cert) -> tuple[Path, Path | None]:
        cert_path = folder / f"{stem}.crt"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path = None
        if k is not None:
            key_path = folder / f"{stem}.key"
            key_path.write_bytes(k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                 serialization.NoEncryption()))
        return cert_path, key_path

    folder.mkdir(parents=True, exist_ok=True)
    ca_key, ca_cert = ca("maxent test CA")
    rogue_key, rogue_cert = ca("rogue CA")
    server = leaf("localhost", ca_key, ca_cert, server=True)
    client = leaf("trainer", ca_key, ca_cert, server=False)
    rogue_client = leaf("trainer", rogue_key, rogue_cert, server=False)
    ca_path, _ = write("ca", None, ca_cert)
    rogue_path, _ = write("rogue-ca", None, rogue_cert)
    server_cert, server_key = write("server", *server)
    client_cert, client_key = write("client", *client)
    rogue_client_cert, rogue_client_key = write("rogue-client", *rogue_client)
    return Pki(ca_path, server_cert, server_key, client_cert, client_key, rogue_path, rogue_client_cert,
               rogue_client_key)


def channel_credentials(pki: Pki, *, client: bool = False, rogue: bool = False,
                        root: Path | None = None) -> grpc.ChannelCredentials:
    cert = key = None
    if client:
        cert = (pki.rogue_client_cert if rogue else pki.client_cert).read_bytes()
        key = (pki.rogue_client_key if rogue else pki.client_key).read_bytes()
    return grpc.ssl_channel_credentials((root or pki.ca).read_bytes(), key, cert)


class TlsServerProcess(ServerProcess):
    """A server on TLS: waits for SERVING over a TLS channel."""

    def __init__(self, *args, credentials: grpc.ChannelCredentials, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.credentials = credentials

    def channel(self) -> grpc.Channel:
        return grpc.secure_channel(self.target, self.credentials)


def wait_for_log(server: ServerProcess, text: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while text not in server.log():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{text!r} not in the log after {timeout}s:\n{server.log()}")
        time.sleep(0.1)


def listening_addresses(port: int) -> set[str]:
    """Local addresses with a listening TCP socket on `port` ('127.0.0.1',
    '0.0.0.0', '::1', '::'; IPv4-mapped IPv6 as IPv4), from /proc/net/tcp{,6}:
    no traffic sent."""
    found = set()
    for table, v6 in (("/proc/net/tcp", False), ("/proc/net/tcp6", True)):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local, state = fields[1], fields[3]
            address, port_hex = local.split(":")
            if state != "0A" or int(port_hex, 16) != port:
                continue
            raw = bytes.fromhex(address)
            if v6:
                # Four 32-bit words, each in host (little-endian) byte order.
                raw = b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))
                address6 = ipaddress.IPv6Address(raw)
                found.add(str(address6.ipv4_mapped or address6))
            else:
                found.add(str(ipaddress.IPv4Address(raw[::-1])))
    return found
