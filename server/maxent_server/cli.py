"""`maxent-server`: run the MaxEnt-GRPO service. Every flag has a MAXENT_*
environment equivalent (e.g. --data-dir and MAXENT_DATA_DIR)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from pathlib import Path

from .app import MaxEntServer, ServerSettings


def default_data_dir() -> str:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return str(Path(base) / "maxent-grpo")


def _env(name: str, default):
    return os.environ.get("MAXENT_" + name.upper().replace("-", "_"), default)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="maxent-server", description=__doc__)
    p.add_argument("--host", default=_env("host", "127.0.0.1"), help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=int(_env("port", 50051)), help="gRPC port; 0 picks a free one (default 50051)")
    p.add_argument("--data-dir", default=_env("data-dir", default_data_dir()), help="folder of the SQLite state (default: per-user data folder)")
    p.add_argument("--state-store", default=_env("state-store", ""), help="state store URL; empty = SQLite in --data-dir")
    p.add_argument("--device", default=_env("device", "auto"), help="torch device: auto (CUDA when present), cpu, cuda, cuda:1 ...")
    p.add_argument("--max-message-mb", type=int, default=int(_env("max-message-mb", 64)), help="largest request or response, MiB (default 64)")
    p.add_argument("--grace-seconds", type=float, default=float(_env("grace-seconds", 10)), help="time to finish calls in flight on SIGTERM (default 10)")
    p.add_argument("--reward-workers", type=int, default=_int_or_none(_env("reward-workers", None)), help="reward worker processes (default: CPU count)")
    p.add_argument("--reward-timeout-seconds", type=float, default=float(_env("reward-timeout-seconds", 5)), help="time limit per completion and reward (default 5)")
    p.add_argument("--no-plugins", action="store_true", default=_env("no-plugins", "") not in ("", "0", "false"), help="do not load maxent.rewards entry points")
    p.add_argument("--torch-threads", type=int, default=int(_env("torch-threads", 1)), help="torch intra-op threads on the CPU; 0 keeps torch's default (default 1)")
    p.add_argument("--log-level", default=_env("log-level", "INFO"))
    return p


def _int_or_none(value):
    return None if value in (None, "") else int(value)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
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
    )
    asyncio.run(MaxEntServer(settings).serve_until_signal())
    return 0


if __name__ == "__main__":
    sys.exit(main())
