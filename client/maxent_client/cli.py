"""maxentctl: operate a MaxEnt server from the terminal.

    maxentctl health
    maxentctl runs list | show RUN | create RUN [--config FILE] [--set KEY=VALUE ...] | delete RUN
    maxentctl export RUN [--format service|seed] [-o FILE]
    maxentctl import FILE [--run-id RUN] [--config FILE] [--set KEY=VALUE ...]
    maxentctl watch RUN [--count N] [--duration SECONDS] [--since VERSION] [--wait]

Connection flags (every subcommand): --target (MAXENT_TARGET, default
127.0.0.1:50051), --token (MAXENT_TOKEN), --tls-ca, --tls-cert, --tls-key.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import math
import os
import sys
from typing import Any, Sequence, TextIO

import grpc

from . import _convert as cv
from .client import MaxEntClient
from .errors import MaxEntError
from .models import ControllerState, Run, WeightingConfig

_HEALTH_NAMES = {0: "UNKNOWN", 1: "SERVING", 2: "NOT_SERVING", 3: "SERVICE_UNKNOWN"}


# -- JSON forms -------------------------------------------------------------------


def config_to_json(config: WeightingConfig) -> dict[str, Any]:
    out = dataclasses.asdict(config)
    out["denominator"] = config.denominator.name
    return out


def config_from_json(data: dict[str, Any]) -> WeightingConfig:
    """A config from JSON fields (an export's, or --set items); a wrong key or
    value type is a ValueError naming it, which maxentctl prints as one line."""
    try:
        return cv.as_config(data)
    except TypeError as error:
        raise ValueError(str(error)) from None


def state_to_json(state: ControllerState) -> dict[str, Any]:
    out = dataclasses.asdict(state)
    out["update_time"] = state.update_time.isoformat()
    return out


def state_from_json(data: dict[str, Any]) -> ControllerState:
    """An exported state (state_to_json) as the initial state of an import.
    Keys the client does not know are ignored; missing ones take their
    defaults (log tau from tau, no EMA, step and version 0), so exports
    written before a field existed still load. A step that was pending is
    not carried over."""
    known = {f.name for f in dataclasses.fields(ControllerState)} - {"pending_step", "pending_reporters"}
    values = {k: v for k, v in data.items() if k in known}
    tau = float(values.get("tau", 0.0))
    values.update(
        run_id="",
        tau=tau,
        beta=float(values.get("beta", 0.0)),
        tau_log=float(values.get("tau_log", math.log(max(tau, 1e-12)))),
        entropy_ema=values.get("entropy_ema"),
        global_step=int(values.get("global_step", 0)),
        version=int(values.get("version", 0)),
        active_target_entropy=values.get("active_target_entropy"),
        update_time=dt.datetime.now(dt.timezone.utc),
    )
    return ControllerState(**values)


def seed_state_from_json(data: dict[str, Any], config: WeightingConfig) -> ControllerState:
    """The published library's controller file (beta, tau, tau_log,
    tau_entropy_ema) as an initial state: the fields it carries, the rest
    fresh (step and version 0; the target in force at step 0)."""
    unknown = set(data) - {"beta", "tau", "tau_log", "tau_entropy_ema"}
    if unknown:
        raise ValueError(f"unknown keys in a seed-format controller file: {', '.join(sorted(unknown))}")
    ema = data.get("tau_entropy_ema")
    state = {"tau": data.get("tau", config.tau), "beta": data.get("beta", config.beta),
             "entropy_ema": None if ema is None or math.isnan(ema) else ema,
             "active_target_entropy": _target_at_start(config)}
    if "tau_log" in data:
        state["tau_log"] = data["tau_log"]
    return state_from_json(state)


def _target_at_start(config: WeightingConfig) -> float | None:
    if config.target_entropy_start is not None and config.target_entropy_final is not None:
        return config.target_entropy_start if config.target_entropy_horizon > 0 else config.target_entropy_final
    return config.target_entropy


def run_to_json(run: Run) -> dict[str, Any]:
    return {
        "run_id": run.run_id,
        "create_time": run.create_time.isoformat(),
        "config": config_to_json(run.config),
        "state": state_to_json(run.state),
    }


def seed_state(state: ControllerState) -> dict[str, float]:
    """The published library's controller file: beta, tau, tau_log, tau_entropy_ema."""
    ema = state.entropy_ema if state.entropy_ema is not None else math.nan
    return {"beta": state.beta, "tau": state.tau, "tau_log": state.tau_log, "tau_entropy_ema": ema}


# -- terminal output ----------------------------------------------------------------


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, dt.datetime):
        return value.strftime("%Y-%m-%d %H:%M:%S")
    return str(value)


def print_table(rows: Sequence[Sequence[Any]], header: Sequence[str], out: TextIO) -> None:
    cells = [list(header)] + [[_fmt(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    for index, row in enumerate(cells):
        out.write("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() + "\n")
        if index == 0:
            out.write("  ".join("-" * w for w in widths) + "\n")


# -- subcommands ----------------------------------------------------------------------


def cmd_health(client: MaxEntClient, args: argparse.Namespace, out: TextIO) -> int:
    channel = client._channel  # the health service shares the client's channel
    check = channel.unary_unary("/grpc.health.v1.Health/Check")
    request = args.service.encode()
    payload = (b"\x0a" + bytes([len(request)]) + request) if request else b""
    try:
        reply = check(payload, timeout=args.timeout)
    except grpc.RpcError as error:
        out.write(f"{error.code().name}: {error.details()}\n")
        return 1
    status = reply[1] if len(reply) >= 2 and reply[0] == 0x08 else 0  # field 1, varint
    out.write(_HEALTH_NAMES.get(status, str(status)) + "\n")
    return 0 if status == 1 else 1


def cmd_runs_list(client: MaxEntClient, args: argparse.Namespace, out: TextIO) -> int:
    rows = [
        (r.run_id, r.state.tau, r.state.beta, r.state.entropy_ema, r.state.version, r.state.global_step,
         r.state.update_time)
        for r in client.iter_runs(page_size=args.page_size)
    ]
    print_table(rows, ["RUN", "TAU", "BETA", "ENTROPY_EMA", "VERSION", "STEP", "UPDATED"], out)
    return 0


def cmd_runs_show(client: MaxEntClient, args: argparse.Namespace, out: TextIO) -> int:
    out.write(json.dumps(run_to_json(client.get_run(args.run_id)), indent=2) + "\n")
    return 0


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _load_config(path: str | None, settings: Sequence[str]) -> WeightingConfig:
    data: dict[str, Any] = {}
    if path:
        with open(path, encoding="utf-8") as handle:
            loaded = json.load(handle)
        data = loaded.get("config", loaded)
    for item in settings:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        data[key.strip()] = _parse_value(value)
    return config_from_json(data)


def cmd_runs_create(client: MaxEntClient, args: argparse.Namespace, out: TextIO) -> int:
    run = client.create_run(args.run_id, _load_config(args.config, args.set))
    out.write(json.dumps(run_to_json(run), indent=2) + "\n")
    return 0


def cmd_runs_delete(client: MaxEntClient, args: argparse.Namespace, out: TextIO) -> int:
    client.delete_run(args.run_id)
    out.write(f"deleted {args.run_id}\n")
    return 0


def cmd_export(client: MaxEntClient, args: argparse.Namespace, out: TextIO) -> int:
    run = client.get_run(args.run_id)
    data = seed_state(run.state) if args.format == "seed" else run_to_json(run)
    text = json.dumps(data, indent=2) + "\n"
    if args.output:
        with open(args.output, "w", encoding="utf-8") as handle:
            handle.write(text)
        out.write(f"wrote {args.output}\n")
    else:
        out.write(text)
    return 0


def cmd_import(client: MaxEntClient, args: argparse.Namespace, out: TextIO) -> int:
    """Create a run from an export that continues where the exported one
    stopped: our format restores its config and its whole controller state;
    a seed-format file (the library's controller file) restores tau, beta,
    log tau and the entropy EMA, with the config given by --config/--set."""
    with open(args.file, encoding="utf-8") as handle:
        data = json.load(handle)
    if not isinstance(data, dict):
        raise ValueError(f"{args.file}: not an export (a JSON object)")
    if "config" in data:  # service format
        config = config_from_json({**data["config"], **_settings(args.set)})
        state = state_from_json(data.get("state", {"tau": config.tau, "beta": config.beta}))
        run_id = args.run_id or data.get("run_id")
    else:  # seed format: the controller file alone
        if not args.config and not args.set:
            raise ValueError(f"{args.file} is a seed-format controller file without a config; "
                             "give the run's config with --config FILE and/or --set KEY=VALUE")
        config = _load_config(args.config, args.set)
        # The run starts at the file's tau and beta (its config says so too).
        config = dataclasses.replace(config, tau=float(data.get("tau", config.tau)),
                                     beta=float(data.get("beta", config.beta)))
        state = seed_state_from_json(data, config)
        run_id = args.run_id
    if not run_id:
        raise ValueError("--run-id is required for a seed-format file")
    run = client.create_run(run_id, config, initial_state=state)
    s = run.state
    out.write(f"imported {run.run_id}: tau={_fmt(s.tau)} beta={_fmt(s.beta)} "
              f"step={s.global_step} version={s.version}\n")
    return 0


def _settings(items: Sequence[str]) -> dict[str, Any]:
    """--set KEY=VALUE items as a dict (config_from_json checks the keys)."""
    values = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        values[key.strip()] = _parse_value(value)
    return values


WATCH_COLUMNS = (("VERSION", 8), ("STEP", 8), ("TAU", 12), ("BETA", 12), ("ENTROPY_EMA", 12), ("ENTROPY", 12),
                 ("KL", 12))


def watch_line(state: ControllerState) -> str:
    """One state as fixed-width columns (WATCH_COLUMNS), numbers right-aligned."""
    values = (state.version, state.global_step, state.tau, state.beta, state.entropy_ema,
              state.last_weight_entropy, state.last_measured_kl)
    return "  ".join(_fmt(v).rjust(width) for v, (_, width) in zip(values, WATCH_COLUMNS))


def cmd_watch(client: MaxEntClient, args: argparse.Namespace, out: TextIO) -> int:
    """Stream the run's controller versions (WatchRun): one aligned line per
    version, none skipped; resumes by itself across a server restart."""
    out.write("  ".join(name.rjust(width) for name, width in WATCH_COLUMNS) + "\n")
    out.flush()
    printed = 0
    states = client.watch_run(args.run_id, since_version=args.since, wait_for_run=args.wait,
                              timeout=args.duration if args.duration > 0 else None)
    try:
        for state in states:
            out.write(watch_line(state) + "\n")
            out.flush()
            printed += 1
            if 0 < args.count <= printed:
                break
    except MaxEntError as error:
        if error.code != grpc.StatusCode.DEADLINE_EXCEEDED or args.duration <= 0:
            raise
    finally:
        states.close()
    return 0


# -- wiring ---------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="maxentctl", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default=os.environ.get("MAXENT_TARGET", "127.0.0.1:50051"))
    parser.add_argument("--token", default=os.environ.get("MAXENT_TOKEN"))
    parser.add_argument("--tls-ca", help="CA bundle (PEM) to verify the server; enables TLS")
    parser.add_argument("--tls-cert", help="client certificate (PEM) for mutual TLS")
    parser.add_argument("--tls-key", help="client private key (PEM) for mutual TLS")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds per call (default 10)")
    sub = parser.add_subparsers(dest="command", required=True)

    health = sub.add_parser("health", help="is the server SERVING?")
    health.add_argument("--service", default="", help="service name to check (default: the whole server)")
    health.set_defaults(func=cmd_health)

    runs = sub.add_parser("runs", help="list, show, create or delete runs").add_subparsers(dest="runs", required=True)
    listing = runs.add_parser("list", help="one line per run")
    listing.add_argument("--page-size", type=int, default=100)
    listing.set_defaults(func=cmd_runs_list)
    show = runs.add_parser("show", help="a run's config and state as JSON")
    show.add_argument("run_id")
    show.set_defaults(func=cmd_runs_show)
    create = runs.add_parser("create", help="create a run")
    create.add_argument("run_id")
    create.add_argument("--config", help="JSON file: a WeightingConfig object (or an export)")
    create.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config field (repeatable)")
    create.set_defaults(func=cmd_runs_create)
    delete = runs.add_parser("delete", help="delete a run and its controller")
    delete.add_argument("run_id")
    delete.set_defaults(func=cmd_runs_delete)

    export = sub.add_parser("export", help="a run's config and controller state as JSON")
    export.add_argument("run_id")
    export.add_argument("--format", choices=["service", "seed"], default="service",
                        help="service: config + state; seed: the published library's controller file")
    export.add_argument("-o", "--output", help="write to this file instead of stdout")
    export.set_defaults(func=cmd_export)

    imp = sub.add_parser("import", help="create a run that continues an exported one")
    imp.add_argument("file")
    imp.add_argument("--run-id", help="run id (default: the one in the file)")
    imp.add_argument("--config", help="config JSON for a seed-format file (required, or --set)")
    imp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="config field (repeatable): the config of a seed-format file, or overrides")
    imp.set_defaults(func=cmd_import)

    watch = sub.add_parser("watch", help="print each controller version (tau, beta, entropy, KL) as it is applied")
    watch.add_argument("run_id")
    watch.add_argument("--count", type=int, default=0, help="stop after N lines (default: never)")
    watch.add_argument("--duration", type=float, default=0.0, help="stop after this many seconds (default: never)")
    watch.add_argument("--since", type=int, default=0, metavar="VERSION",
                       help="start after this version (default: with the current state)")
    watch.add_argument("--wait", action="store_true", help="wait for a run that does not exist yet")
    watch.add_argument("--interval", type=float, default=None, help=argparse.SUPPRESS)  # before WatchRun; ignored
    watch.set_defaults(func=cmd_watch)
    return parser


def main(argv: Sequence[str] | None = None, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    args = build_parser().parse_args(argv)
    client = MaxEntClient(args.target, token=args.token, root_certificates=args.tls_ca, private_key=args.tls_key,
                          certificate_chain=args.tls_cert, timeout=args.timeout, max_attempts=2)
    try:
        return args.func(client, args, out)
    except MaxEntError as error:
        # One line per violation; the message repeats them, so it is printed only without any.
        if not error.violations:
            sys.stderr.write(f"maxentctl: {error}\n")
        for violation in error.violations:
            sys.stderr.write(f"maxentctl: {error.code.name}: {violation.field}: {violation.description}\n")
        return 2
    except (OSError, ValueError) as error:
        sys.stderr.write(f"maxentctl: {error}\n")
        return 2
    except KeyboardInterrupt:
        return 130
    finally:
        client.close()


if __name__ == "__main__":
    sys.exit(main())
