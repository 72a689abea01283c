"""Server assembly: the MaxEnt service, health, reflection, authentication,
TLS, metrics endpoint, access log, graceful shutdown and SIGHUP token reload."""

from __future__ import annotations

import asyncio
import errno
import gc
import ipaddress
import logging
import os
import signal
import socket
import sys
import threading
from collections.abc import Callable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from maxent_api import SERVICE_NAME

from .auth import Authorizer, TokenFileError, plaintext_tokens_readable_by_all
from .engine import Engine
from .edge import Admission, CallerRates, EdgeInterceptor
from .metrics import Metrics, MetricsServer
from .service import MaxEntServicer, add_to_server
from .settings import ConfigError, ServerSettings
from .store import StoreError, open_store
from .tls import TlsConfigError, certificate_expiry_problem, grpc_server_credentials, http_ssl_context, tls_files

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
#: After the grace period: seconds allowed to the shutdown steps that may block
#: (stopping the reward workers, the executors) before the server exits anyway.
SHUTDOWN_SECONDS = 2.5
# A connection that has not finished its TLS and HTTP/2 handshakes by then is
# closed (gRPC's default, 120 s, lets idle sockets pile up).
HANDSHAKE_TIMEOUT_MS = 20_000


def transport_options(s: ServerSettings) -> list[tuple[str, int]]:
    """gRPC server options: message size, keepalive, streams per connection
    and connection idle/age limits. An aged connection gets GOAWAY and its
    calls the grace period; clients reconnect (a WatchRun resumes from its
    last version)."""
    limit = s.max_message_mb * 1024 * 1024
    options = [("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit),
               *KEEPALIVE_OPTIONS, ("grpc.max_concurrent_streams", s.max_streams_per_connection),
               ("grpc.server_handshake_timeout_ms", HANDSHAKE_TIMEOUT_MS)]
    if s.connection_idle_seconds:
        options.append(("grpc.max_connection_idle_ms", _ms(s.connection_idle_seconds)))
    if s.connection_max_age_seconds:
        options.append(("grpc.max_connection_age_ms", _ms(s.connection_max_age_seconds)))
        options.append(("grpc.max_connection_age_grace_ms", _ms(s.connection_age_grace_seconds)))
    return options


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))


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
        if s.metrics_auth and s.metrics_without_token:
            raise ConfigError("--metrics-auth and --metrics-without-token contradict each other")
        _check_reward_backend(s)
        self.code_execution = await asyncio.get_running_loop().run_in_executor(None, _code_execution_mode, s)
        authenticated = self.authorizer is not None
        host, narrowed = restrict_to_loopback(s.host, authenticated, s.insecure_allow_remote)
        metrics_host, metrics_narrowed = restrict_to_loopback(
            s.metrics_host or s.host, authenticated, s.insecure_allow_remote
        )
        self.metrics_token_required = authenticated and not s.metrics_without_token
        self._refuse_plaintext_tokens(host, metrics_host if s.metrics_port and self.metrics_token_required else None)
        self.metrics: Metrics | None = None
        self.metrics_server = None
        if s.metrics_port:
            self.metrics = Metrics(s.metrics_max_runs)
            try:
                self.metrics_server = MetricsServer(
                    self.metrics,
                    metrics_host,
                    s.metrics_port,
                    authorizer=self.authorizer if self.metrics_token_required else None,
                    ssl_context=http_ssl_context(self.tls) if self.tls else None,
                    max_connections=s.metrics_max_connections,
                    read_timeout=s.metrics_read_timeout_seconds,
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
        # What exists now (torch, the modules, the engine) lives as long as the
        # server: keep it out of the collector's full passes, whose pauses
        # otherwise grow with it and show in every call's tail latency.
        gc.freeze()

    def _refuse_plaintext_tokens(self, host: str, metrics_host: str | None) -> None:
        """Bearer tokens over plaintext to a non-loopback address cross the
        network readable: refuse unless TLS is on or it is explicitly allowed."""
        s = self.settings
        if self.authorizer is None or self.tls is not None or s.allow_plaintext_tokens:
            return
        for what, address in (("--host", host), ("--metrics-host", metrics_host)):
            if address is not None and not is_loopback(address):
                raise ConfigError(
                    f"--auth-tokens with {what} {address} and no TLS would take bearer tokens in cleartext: give "
                    "--tls-cert and --tls-key, or --allow-plaintext-tokens (e.g. behind a TLS-terminating proxy)"
                )

    async def _start_grpc(self, host: str) -> None:
        s = self.settings
        try:
            self.store = open_store(s.state_store, s.data_dir)
        except ValueError as error:  # its message never holds the URL's password
            raise ConfigError(f"--state-store: {error}") from None
        try:
            # Before binding: a store that never answers fails the start (a
            # Redis store waits its startup_wait first) without blocking the loop.
            await asyncio.get_running_loop().run_in_executor(None, self.store.ping)
        except StoreError as error:
            raise ConfigError(f"state store not reachable: {error}") from None
        interceptor = EdgeInterceptor(
            admission=Admission(s.max_concurrent_rpcs, s.max_inflight_mb), metrics=self.metrics,
            authorizer=self.authorizer, access_log=s.access_log, max_message_bytes=s.max_message_mb * 1024 * 1024,
            rates=CallerRates(s.caller_rate_mb, s.caller_burst_mb) if s.caller_rate_mb > 0 else None,
        )
        self.server = grpc.aio.server(interceptors=[interceptor], options=transport_options(s))
        # Bind before the reward workers start: a busy port fails the start
        # with one line and nothing left to shut down.
        self._bind(host)
        self.engine = Engine(s.device, threads=s.torch_threads)
        try:
            self.rewards = _reward_runner(s, self.code_execution)
        except ConfigError:
            self.store.close()
            raise
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
                     "bearer token required" if self.metrics_token_required else "no token needed",
                     s.metrics_max_runs)
        else:
            log.info("metrics endpoint off (--metrics-port 0)")
        self._log_warnings(host)
        if s.tls_client_ca:
            log.info("mutual TLS: clients need a certificate signed by %s", s.tls_client_ca)
        if self.code_execution is None:
            log.info("code execution off (code_unit_tests refused; --enable-code-execution turns it on)")
        else:
            from .rewards.sandbox import describe_mode

            log_sandbox = log.info if self.code_execution == "bwrap" else log.warning
            log_sandbox("code execution ON: code_unit_tests runs programs in the %s sandbox: %s",
                        self.code_execution, describe_mode(self.code_execution))

    def _log_warnings(self, host: str) -> None:
        s = self.settings
        if self.authorizer is not None and self.tls is None and s.allow_plaintext_tokens and not is_loopback(host):
            log.warning("--allow-plaintext-tokens: bearer tokens reach %s without TLS; anyone on the path can read "
                        "and reuse them", host)
        self._warn_if_token_file_readable()
        if self.tls is not None:
            problem = certificate_expiry_problem(self.tls.cert)
            if problem:
                log.warning("--tls-cert %s: %s; clients will refuse the connection", self.tls.cert, problem)

    def _warn_if_token_file_readable(self) -> None:
        if self.authorizer is not None and plaintext_tokens_readable_by_all(self.authorizer.path):
            log.warning("token file %s holds plaintext tokens and is readable by every user: chmod 600 it, or "
                        "keep only sha256 digests in it", self.authorizer.path)

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
        self._warn_if_token_file_readable()

    async def stop(self) -> None:
        """Stop taking calls, finish those in flight within the grace period,
        then stop the reward workers and close the store.

        Nothing here blocks the event loop: the blocking steps run on threads
        with a bound each, and reward work still running when the grace period
        ends is cancelled (its workers killed) rather than waited for."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        log.info("draining: finishing calls in flight (grace %.1fs)", self.settings.grace_seconds)
        await self.health.enter_graceful_shutdown()
        self.servicer.begin_shutdown()  # WatchRun streams end now instead of holding the grace period
        await self.server.stop(self.settings.grace_seconds)
        if self.metrics_server is not None:
            self.metrics_server.stop()
        deadline = asyncio.get_running_loop().time() + SHUTDOWN_SECONDS
        # Rewards first: closing the pool fails the reward work of calls still
        # running, which frees the executor threads the servicer waits for.
        if self.rewards is not None:
            await _off_loop(self.rewards.close, "stopping the reward workers", deadline)
        await _off_loop(self.servicer.shutdown, "finishing the servicer's work", deadline)
        self.store.close()
        log.info("maxent-server stopped")

    async def serve_until_signal(self, *, exit_process: bool = True) -> None:
        """Serve until SIGTERM or SIGINT, then :meth:`stop`; with ``exit_process``
        the process ends right after (see :func:`_end_process`)."""
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        loop.add_signal_handler(signal.SIGHUP, self.reload_tokens)
        await self.start()
        await stop.wait()
        await self.stop()
        if exit_process:
            _end_process(0)


async def _off_loop(step: Callable[[], None], what: str, deadline: float) -> None:
    """Run a blocking shutdown step on its own (daemon) thread; wait for it
    until ``deadline`` (event loop time), then carry on without it."""
    loop = asyncio.get_running_loop()
    done = loop.create_future()

    def finished() -> None:
        if not done.done():
            done.set_result(None)

    def run() -> None:
        try:
            step()
        except Exception:  # shutting down anyway
            log.exception("%s failed", what)
        finally:
            try:
                loop.call_soon_threadsafe(finished)
            except RuntimeError:
                pass  # the loop is closed: nobody waits any more

    threading.Thread(target=run, name="maxent-shutdown", daemon=True).start()
    try:
        await asyncio.wait_for(done, max(0.1, deadline - loop.time()))
    except asyncio.TimeoutError:
        log.warning("%s did not finish in time; exiting without it", what)


def _end_process(code: int) -> None:
    """Exit now, skipping the interpreter's teardown: collecting the modules
    (torch, sympy...) takes seconds on a busy machine, and everything that
    matters is closed by then. Threads still running (a computation whose call
    was cancelled) end with the process instead of holding it."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError, AttributeError):
            pass
    os._exit(code)


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


def _code_execution_mode(s: ServerSettings) -> str | None:
    """The sandbox mode of code_unit_tests (None: off), checked by running a probe."""
    if not s.enable_code_execution:
        return None
    from .rewards.sandbox import SandboxUnavailable, choose_mode

    try:
        return choose_mode(s.code_execution_sandbox)
    except SandboxUnavailable as error:
        raise ConfigError(f"--enable-code-execution: {error}") from None


def _check_reward_backend(s: ServerSettings) -> None:
    if s.reward_backend not in ("local", "ray"):
        raise ConfigError(f"--reward-backend must be local or ray, not {s.reward_backend!r}")
    if s.reward_backend == "ray" and not s.ray_address:
        raise ConfigError("--reward-backend ray needs --ray-address (the Ray cluster's HOST:PORT)")


def _reward_runner(s: ServerSettings, code_execution: str | None = None):
    from .rewards import RewardRegistry, RewardRunner

    registry = RewardRegistry.default(load_plugins=s.load_plugins, code_execution=code_execution)
    backend = None
    if s.reward_backend == "ray":
        from .rewards.ray_backend import RayBackend, RayUnavailableError

        def backend(timeout: float, plugins: list[tuple[str, str]]) -> RayBackend:
            try:
                return RayBackend(s.ray_address, timeout, plugins)
            except RayUnavailableError as error:
                raise ConfigError(str(error)) from None

    return RewardRunner(workers=s.reward_workers, timeout_seconds=s.reward_timeout_seconds, registry=registry,
                        backend=backend)
