"""`maxent-server`: run the MaxEnt-GRPO service. Every flag has a MAXENT_*
environment equivalent (e.g. --data-dir and MAXENT_DATA_DIR)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from pathlib import Path

from .app import ConfigError, MaxEntServer, PortError, ServerSettings
from .logs import configure_logging


def default_data_dir() -> str:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return str(Path(base) / "maxent-grpo")


def _env(name: str, default):
    return os.environ.get("MAXENT_" + name.upper().replace("-", "_"), default)


def _env_flag(name: str) -> bool:
    return _env(name, "").strip().lower() not in ("", "0", "false", "no", "off")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="maxent-server", description=__doc__)
    p.add_argument("--host", default=_env("host", "127.0.0.1"), help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=int(_env("port", 50051)), help="gRPC port; 0 picks a free one (default 50051)")
    p.add_argument("--data-dir", default=_env("data-dir", default_data_dir()), help="folder of the SQLite state (default: per-user data folder)")
    p.add_argument("--state-store", default=_env("state-store", ""), help="state store URL: empty = SQLite in --data-dir; redis://[:PASSWORD@]HOST:PORT/DB?prefix=... or rediss://... = shared Redis for several replicas (docs/redis.md)")
    p.add_argument("--device", default=_env("device", "auto"), help="torch device: auto (CUDA when present), cpu, cuda, cuda:1 ...")
    p.add_argument("--max-message-mb", type=int, default=int(_env("max-message-mb", 64)), help="largest request or response, MiB (default 64)")
    p.add_argument("--grace-seconds", type=float, default=float(_env("grace-seconds", 10)), help="time to finish calls in flight on SIGTERM (default 10)")
    p.add_argument("--reward-workers", type=int, default=_int_or_none(_env("reward-workers", None)), help="reward worker processes (default: CPU count)")
    p.add_argument("--reward-timeout-seconds", type=float, default=float(_env("reward-timeout-seconds", 5)), help="time limit per completion and reward (default 5)")
    p.add_argument("--reward-backend", choices=("local", "ray"), default=_env("reward-backend", "local"),
                   help="where rewards run: local worker processes, or tasks on the Ray cluster of --ray-address "
                        "(default local)")
    p.add_argument("--ray-address", default=_env("ray-address", ""),
                   help="Ray cluster for --reward-backend ray: HOST:PORT of its head (GCS); this host must be a node of that "
                        "cluster (see docs/operations.md)")
    p.add_argument("--no-plugins", action="store_true", default=_env("no-plugins", "") not in ("", "0", "false"), help="do not load maxent.rewards entry points")
    p.add_argument("--torch-threads", type=int, default=int(_env("torch-threads", 1)), help="torch intra-op threads on the CPU; 0 keeps torch's default (default 1)")
    p.add_argument("--log-level", default=_env("log-level", "INFO"), help="DEBUG, INFO, WARNING, ERROR (default INFO)")
    p.add_argument("--log-format", choices=("text", "json"), default=_env("log-format", "text"),
                   help="text lines or one JSON object per line (default text)")
    p.add_argument("--no-access-log", action="store_true", default=_env_flag("no-access-log"),
                   help="do not log one line per RPC")
    m = p.add_argument_group("metrics")
    m.add_argument("--metrics-port", type=int, default=int(_env("metrics-port", 9464)),
                   help="Prometheus /metrics port; 0 turns the endpoint off (default 9464)")
    m.add_argument("--metrics-host", default=_env("metrics-host", ""),
                   help="address of the metrics endpoint (default: --host)")
    m.add_argument("--metrics-max-runs", type=int, default=int(_env("metrics-max-runs", 1000)),
                   help="most runs with per-run series; the least recently touched is dropped first (default 1000)")
    m.add_argument("--metrics-auth", action="store_true", default=_env_flag("metrics-auth"),
                   help="/metrics needs a bearer token from --auth-tokens; a token sees only its runs' series")
    a = p.add_argument_group("security")
    a.add_argument("--auth-tokens", default=_env("auth-tokens", ""),
                   help="JSON token file (see docs/operations.md); reloaded on SIGHUP. Without it the server binds "
                        "only to loopback")
    a.add_argument("--insecure-allow-remote", action="store_true", default=_env_flag("insecure-allow-remote"),
                   help="without --auth-tokens, still bind a non-loopback --host (anyone reaching it controls every run)")
    a.add_argument("--tls-cert", default=_env("tls-cert", ""), help="server certificate chain (PEM); turns on TLS")
    a.add_argument("--tls-key", default=_env("tls-key", ""), help="private key of --tls-cert (PEM)")
    a.add_argument("--tls-client-ca", default=_env("tls-client-ca", ""),
                   help="CA bundle (PEM) for client certificates: mutual TLS, every client needs one")
    a.add_argument("--enable-code-execution", action="store_true", default=_env_flag("enable-code-execution"),
                   help="offer the code_unit_tests reward, which runs completions' code in a sandbox (docs/rewards.md)")
    a.add_argument("--code-execution-sandbox", choices=("auto", "bwrap", "rlimits"),
                   default=_env("code-execution-sandbox", "auto"),
                   help="auto/bwrap: bubblewrap, else refuse to start; rlimits: the weaker sandbox without it "
                        "(default auto)")
    return p


def _int_or_none(value):
    return None if value in (None, "") else int(value)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.metrics_port < 0 or args.metrics_max_runs < 1:
        parser.error("--metrics-port must be >= 0 and --metrics-max-runs >= 1")
    configure_logging(args.log_level, args.log_format, sys.stderr)
    settings = ServerSettings(
        host=args.host,
        port=args.port,
        data_dir=args.data_dir,
        state_store=args.state_store,
        device=args.device,
        max_message_mb=args.max_message_mb,
        grace_seconds=args.grace_seconds,
        reward_workers=args.reward_workers,
        reward_timeout_seconds=args.reward_timeout_seconds,
        load_plugins=not args.no_plugins,
        torch_threads=args.torch_threads,
        metrics_port=args.metrics_port,
        metrics_host=args.metrics_host,
        metrics_max_runs=args.metrics_max_runs,
        metrics_auth=args.metrics_auth,
        auth_tokens=args.auth_tokens,
        insecure_allow_remote=args.insecure_allow_remote,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        tls_client_ca=args.tls_client_ca,
        access_log=not args.no_access_log,
        enable_code_execution=args.enable_code_execution,
        code_execution_sandbox=args.code_execution_sandbox,
        reward_backend=args.reward_backend,
        ray_address=args.ray_address,
    )
    try:
        asyncio.run(MaxEntServer(settings).serve_until_signal())
    except PortError as error:
        logging.getLogger("maxent_server").error("cannot start: %s", error)
        return 1
    except ConfigError as error:
        logging.getLogger("maxent_server").error("cannot start: %s", error)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
