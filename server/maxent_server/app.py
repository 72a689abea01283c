"""Server assembly: the MaxEnt service, health, reflection, authentication,
TLS, metrics endpoint, access log, graceful shutdown and SIGHUP token reload."""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
import signal
import socket
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from maxent_api import SERVICE_NAME

from .auth import Authorizer, TokenFileError
from .engine import Engine
from .edge import Admission, EdgeInterceptor
from .metrics import Metrics, MetricsServer
from .service import MaxEntServicer, add_to_server
from .store import StoreError, open_store
from .tls import TlsConfigError, grpc_server_credentials, http_ssl_context, tls_files

log = logging.getLogger("maxent_server")
# Clients ping every 30 s while a call is open (maxent_client._channel): allow
# pings 10 s apart on a stream that carries no data (the default, 5 min, would
# close their connections with too_many_pings), and ping clients every 60 s
# so a WatchRun stream of a client that vanished is ended within ~80 s.
KEEPALIVE_OPTIONS = (
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.keepalive_time_ms", 60_000),
    ("grpc.keepalive_timeout_ms", 20_000),
    ("grpc.http2.max_pings_without_data", 0),
)


@dataclass
class ServerSettings:
    host: str = "127.0.0.1"
    port: int = 50051
    data_dir: str = ""
    state_store: str = ""
    device: str = "auto"
    max_message_mb: int = 64
    grace_seconds: float = 10.0
    reward_workers: int | None = None
    reward_timeout_seconds: float = 5.0
    load_plugins: bool = True
    torch_threads: int = 1
    # Metrics endpoint: 0 = off (the maxent-server command defaults to 9464).
    metrics_port: int = 0
    metrics_host: str = ""  # "" = the gRPC host
    metrics_max_runs: int = 1000
    metrics_auth: bool = False  # /metrics needs a bearer token from auth_tokens
    auth_tokens: str = ""  # token file; "" = no authentication (loopback only)
    insecure_allow_remote: bool = False  # without auth_tokens, still bind a non-loopback host
    tls_cert: str = ""
    tls_key: str = ""
    tls_client_ca: str = ""
    access_log: bool = True
    # Admission (maxent_server.edge.admission): MaxEntService calls served at
    # once, and the memory budget their estimated costs share (MiB); a call
    # over either gets RESOURCE_EXHAUSTED, never a queue.
    max_concurrent_rpcs: int = 64
    max_inflight_mb: int = 1024


class ConfigError(ValueError):
    """Settings that cannot work together; the message says which."""


class PortError(ConfigError):
    """The gRPC port cannot be bound (in use, or not allowed)."""


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def restrict_to_loopback(host: str, authenticated: bool, allow_remote: bool) -> tuple[str, bool]:
    """The host to bind and whether it was narrowed to loopback: without
    authentication only loopback, unless remote access is allowed."""
    if authenticated or allow_remote or is_loopback(host):
        return host, False
    return ("::1" if ":" in host else "127.0.0.1"), True


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class MaxEntServer:
    """One running server; `start()` then `wait()` (or `stop()`)."""

    def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings
        self.port: int | None = None
        self.authorizer: Authorizer | None = None
        self.metrics_server: MetricsServer | None = None
        self._stopped = asyncio.Event()

    async def start(self) -> None:
        s = self.settings
        try:
            self.tls = tls_files(s.tls_cert, s.tls_key, s.tls_client_ca)
            self.authorizer = Authorizer(s.auth_tokens) if s.auth_tokens else None
        except (TlsConfigError, TokenFileError) as error:
            raise ConfigError(str(error)) from None
        if s.metrics_auth and self.authorizer is None:
            raise ConfigError("--metrics-auth needs --auth-tokens")
        authenticated = self.authorizer is not None
        host, narrowed = restrict_to_loopback(s.host, authenticated, s.insecure_allow_remote)
        metrics_host, metrics_narrowed = restrict_to_loopback(
            s.metrics_host or s.host, authenticated, s.insecure_allow_remote
        )
        self.metrics: Metrics | None = None
        self.metrics_server: MetricsServer | None = None
        if s.metrics_port:
            self.metrics = Metrics(s.metrics_max_runs)
            try:
                self.metrics_server = MetricsServer(
                    self.metrics,
                    metrics_host,
                    s.metrics_port,
                    authorizer=self.authorizer if s.metrics_auth else None,
                    ssl_context=http_ssl_context(self.tls) if self.tls else None,
                ).start()
            except OSError as error:
                raise ConfigError(f"cannot serve metrics on {_address(metrics_host, s.metrics_port)}: {error}") from None
        try:
            await self._start_grpc(host)
        except BaseException:
            if self.metrics_server is not None:
                self.metrics_server.stop()
            raise
        self._log_start(host, narrowed, metrics_narrowed and bool(s.metrics_port))

    async def _start_grpc(self, host: str) -> None:
        s = self.settings
        self.store = open_store(s.state_store, s.data_dir)
        try:
            # Before binding: a store that never answers fails the start (a
            # Redis store waits its startup_wait first) without blocking the loop.
            await asyncio.get_running_loop().run_in_executor(None, self.store.ping)
        except StoreError as error:
            raise ConfigError(f"state store not reachable: {error}") from None
        limit = s.max_message_mb * 1024 * 1024
        interceptor = EdgeInterceptor(
            admission=Admission(s.max_concurrent_rpcs, s.max_inflight_mb), metrics=self.metrics,
            authorizer=self.authorizer, access_log=s.access_log, max_message_bytes=limit,
        )
        self.server = grpc.aio.server(
            interceptors=[interceptor],
            options=[("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit),
                     *KEEPALIVE_OPTIONS],
        )
        # Bind before the reward workers start: a busy port fails the start
        # with one line and nothing left to shut down.
        self._bind(host)
        self.engine = Engine(s.device, threads=s.torch_threads)
        self.rewards = _reward_runner(s)
        if self.metrics is not None and self.rewards is not None:
            self.metrics.declare_rewards(f.name for f in self.rewards.list_functions())
            rewards = self.rewards
            self.metrics.watch_reward_queue(lambda: rewards.stats()["queued_items"])
        self.servicer = MaxEntServicer(self.store, self.engine, self.rewards, observer=self.metrics)
        add_to_server(self.servicer, self.server)
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
            self.server,
        )
        await self.server.start()
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)

    def _bind(self, host: str) -> None:
        """Add the gRPC port; one that cannot be bound is a PortError saying
        why (the operating system's reason) and what to do."""
        s = self.settings
        address = _address(host, s.port)
        # Asked first so that a port in use is this one line, not gRPC's log too.
        busy = _bind_failure(host, s.port, only_in_use=True) if s.port else None
        if busy:
            self.store.close()
            raise PortError(busy)
        try:
            if self.tls is not None:
                self.port = self.server.add_secure_port(address, grpc_server_credentials(self.tls))
            else:
                self.port = self.server.add_insecure_port(address)
        except RuntimeError:
            self.store.close()
            raise PortError(_bind_failure(host, s.port)) from None

    def _log_start(self, host: str, narrowed: bool, metrics_narrowed: bool) -> None:
        s = self.settings
        transport = "plaintext" if self.tls is None else ("mutual TLS" if self.tls.mutual else "TLS")
        log.info(
            "maxent-server listening on %s:%d (%s, device %s, store %s)",
            host,
            self.port,
            transport,
            self.engine.device,
            getattr(self.store, "path", s.state_store),
        )
        if self.authorizer is not None:
            log.info("authentication: %d tokens from %s (SIGHUP reloads the file)", self.authorizer.token_count,
                     self.authorizer.path)
        elif s.insecure_allow_remote and not is_loopback(host):
            log.warning("authentication OFF and --insecure-allow-remote: anyone who reaches %s:%d can read, change "
                        "and delete every run", host, self.port)
        else:
            log.warning("authentication OFF (no --auth-tokens): listening on loopback only")
        for what, wanted, done in (("gRPC", s.host, narrowed), ("metrics", s.metrics_host or s.host, metrics_narrowed)):
            if done:
                log.warning("no --auth-tokens: %s bound to loopback instead of %s; give --auth-tokens FILE (or "
                            "--insecure-allow-remote) to accept remote clients", what, wanted)
        if self.metrics_server is not None:
            scheme = "https" if self.metrics_server.tls else "http"
            log.info("metrics on %s://%s/metrics (%s, at most %d runs)", scheme,
                     _address(self.metrics_server.host, self.metrics_server.port),
                     "bearer token required" if s.metrics_auth else "no token needed", s.metrics_max_runs)
        else:
            log.info("metrics endpoint off (--metrics-port 0)")
        if s.tls_client_ca:
            log.info("mutual TLS: clients need a certificate signed by %s", s.tls_client_ca)

    def reload_tokens(self) -> None:
        """SIGHUP: read the token file again; keep the old tokens when it is invalid."""
        if self.authorizer is None:
            log.info("SIGHUP: no --auth-tokens, nothing to reload")
            return
        try:
            count = self.authorizer.reload()
        except TokenFileError as error:
            log.error("SIGHUP: kept the previous tokens: %s", error)
            return
        log.info("SIGHUP: reloaded %d tokens from %s", count, self.authorizer.path)

    async def stop(self) -> None:
        """Stop taking calls, finish those in flight within the grace period,
        close the store."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        log.info("draining: finishing calls in flight (grace %.1fs)", self.settings.grace_seconds)
        await self.health.enter_graceful_shutdown()
        self.servicer.begin_shutdown()  # WatchRun streams end now instead of holding the grace period
        await self.server.stop(self.settings.grace_seconds)
        if self.metrics_server is not None:
            self.metrics_server.stop()
        self.servicer.shutdown()
        if self.rewards is not None:
            self.rewards.close()
        self.store.close()
        log.info("maxent-server stopped")

    async def serve_until_signal(self) -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        loop.add_signal_handler(signal.SIGHUP, self.reload_tokens)
        await self.start()
        await stop.wait()
        await self.stop()


def _bind_failure(host: str, port: int, *, only_in_use: bool = False) -> str | None:
    """Why `host:port` cannot be bound, asked of the operating system (with
    `only_in_use`: None unless the port is in use)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
    except socket.gaierror:
        return None if only_in_use else f"cannot listen on {_address(host, port)}: unknown host, check --host"
    except OSError as error:
        reason = error.strerror or str(error)
        if error.errno == errno.EADDRINUSE:
            return f"port {port} is in use ({reason}): pick another with --port"
        if only_in_use:
            return None
        return f"cannot listen on {_address(host, port)} ({reason}): pick another --port or --host"
    return None if only_in_use else f"cannot listen on {_address(host, port)}: pick another with --port"


def _reward_runner(s: ServerSettings):
    from .rewards import RewardRunner

    return RewardRunner(workers=s.reward_workers, timeout_seconds=s.reward_timeout_seconds, load_plugins=s.load_plugins)
