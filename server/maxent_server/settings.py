"""Every setting of `maxent-server`, defined once.

Each :class:`ServerSettings` field carries its command-line flag, help text
and group in its metadata; the argument parser, the ``MAXENT_*`` environment
variables and the README's flag table are all built from them, so a default
is written in exactly one place. Imports neither grpc nor torch: the
command line can explain itself before the server's dependencies load.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

GROUPS = ("server", "rewards", "logging", "metrics", "security", "transport")
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


class ConfigError(ValueError):
    """Settings that cannot work together; the message says which."""


def default_data_dir() -> str:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return str(Path(base) / "maxent-grpo")


def parse_bool(text: str, name: str) -> bool:
    """1/0, true/false, yes/no, on/off in any case; anything else is an error
    naming `name`."""
    word = text.strip().lower()
    if word in _TRUE:
        return True
    if word in _FALSE:
        return False
    raise ConfigError(f"{name}: expected 1/0, true/false, yes/no or on/off, got {text!r}")


def _setting(default: Any = dataclasses.MISSING, *, help: str, group: str, flag: str = "",
             negative: bool = False, choices: tuple[str, ...] = (), minimum: float | None = None,
             shown_default: str = "", default_factory: Callable[[], Any] | None = None) -> Any:
    """A field with its command-line metadata. `flag` defaults to the field
    name with dashes; `negative` flags (``--no-plugins``) set a True-by-default
    field to False; `shown_default` replaces the default in help and README."""
    assert group in GROUPS
    metadata = {"help": help, "group": group, "flag": flag, "negative": negative, "choices": choices,
                "minimum": minimum, "shown_default": shown_default}
    if default_factory is not None:
        return field(default_factory=default_factory, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class ServerSettings:
    # -- server
    host: str = _setting("127.0.0.1", group="server", help="address to bind; without --auth-tokens only loopback")
    port: int = _setting(50051, group="server", minimum=0, help="gRPC port; 0 picks a free one (the log says which)")
    data_dir: str = _setting(default_factory=default_data_dir, group="server",
                             shown_default="~/.local/share/maxent-grpo",
                             help="folder of the SQLite state (per-user data folder, $XDG_DATA_HOME respected)")
    state_store: str = _setting("", group="server", shown_default="empty",
                                help="empty: SQLite in --data-dir; redis://[:PASSWORD@]HOST:PORT/DB?prefix=... or "
                                     "rediss://...: shared Redis for several replicas (docs/redis.md)")
    device: str = _setting("auto", group="server",
                           help="torch device: auto (CUDA when present, else CPU), cpu, cuda:1 ...")
    max_message_mb: int = _setting(64, group="server", minimum=1,
                                   help="largest request or response in MiB; larger is RESOURCE_EXHAUSTED")
    grace_seconds: float = _setting(10.0, group="server", minimum=0,
                                    help="on SIGTERM/SIGINT: stop accepting, finish calls in flight for this long, "
                                         "exit 0")
    torch_threads: int = _setting(1, group="server", minimum=0,
                                  help="torch intra-op threads on the CPU; 0 keeps torch's default")
    # -- rewards
    reward_workers: int | None = _setting(None, group="rewards", minimum=1, shown_default="CPU count",
                                          help="reward worker processes")
    reward_timeout_seconds: float = _setting(5.0, group="rewards", minimum=0,
                                             help="time limit per completion and reward function")
    load_plugins: bool = _setting(True, group="rewards", flag="no-plugins", negative=True,
                                  help="do not load reward functions of maxent.rewards entry points")
    enable_code_execution: bool = _setting(False, group="rewards",
                                           help="run code_unit_tests rewards in a sandbox; off by default")
    code_execution_sandbox: str = _setting("auto", group="rewards", choices=("auto", "bwrap", "rlimits"),
                                           help="sandbox of code execution: bwrap (bubblewrap), rlimits (resource "
                                                "limits only) or auto (bwrap when installed)")
    reward_backend: str = _setting("local", group="rewards", choices=("local", "ray"),
                                   help="where rewards run: local worker processes or a Ray cluster")
    ray_address: str = _setting("", group="rewards", shown_default="empty",
                                help="HOST:PORT of the Ray head (GCS) for --reward-backend ray; this host must be a node of that "
                                     "cluster (docs/operations.md, Reward backends)")
    # -- logging
    log_level: str = _setting("INFO", group="logging", help="least severe level logged: DEBUG, INFO, WARNING, ERROR")
    log_format: str = _setting("text", group="logging", choices=("text", "json"),
                               help="text lines or one JSON object per line")
    access_log: bool = _setting(True, group="logging", flag="no-access-log", negative=True,
                                help="do not log one line per RPC")
    # -- metrics
    metrics_port: int = _setting(9464, group="metrics", minimum=0,
                                 help="Prometheus /metrics port; 0 turns the endpoint off")
    metrics_host: str = _setting("", group="metrics", shown_default="--host", help="address of the metrics endpoint")
    metrics_max_runs: int = _setting(1000, group="metrics", minimum=1,
                                     help="most runs with per-run series; the least recently touched goes first")
    metrics_auth: bool = _setting(False, group="metrics", shown_default="on with --auth-tokens",
                                  help="/metrics needs a bearer token from --auth-tokens; a token sees only its "
                                       "runs' series")
    metrics_without_token: bool = _setting(False, group="metrics",
                                           help="with --auth-tokens, still serve /metrics without a token (it names "
                                                "runs and their tau and beta)")
    metrics_max_connections: int = _setting(64, group="metrics", minimum=1,
                                            help="open metrics connections at most; beyond it the one waiting "
                                                 "longest for a request is closed")
    metrics_read_timeout_seconds: float = _setting(10.0, group="metrics", minimum=0.1,
                                                   help="a metrics connection that sends no complete request for "
                                                        "this long is closed")
    # -- security
    auth_tokens: str = _setting("", group="security", shown_default="none",
                                help="JSON token file (roles read/write/admin, run-id patterns), reloaded on SIGHUP; "
                                     "without it the server binds loopback only")
    insecure_allow_remote: bool = _setting(False, group="security",
                                           help="without --auth-tokens, still bind a non-loopback host (anyone "
                                                "reaching it controls every run)")
    allow_plaintext_tokens: bool = _setting(False, group="security",
                                            help="accept bearer tokens without TLS on a non-loopback host (they "
                                                 "cross the network readable)")
    tls_cert: str = _setting("", group="security", shown_default="none",
                             help="server certificate chain (PEM); turns on TLS for gRPC and /metrics")
    tls_key: str = _setting("", group="security", shown_default="none", help="private key of --tls-cert (PEM)")
    tls_client_ca: str = _setting("", group="security", shown_default="none",
                                  help="CA bundle (PEM) for client certificates: mutual TLS, every client needs one")
    # -- transport
    max_concurrent_rpcs: int = _setting(64, group="transport", minimum=1,
                                        help="MaxEntService calls handled at once; more get RESOURCE_EXHAUSTED (never queued)")
    max_inflight_mb: int = _setting(1024, group="transport", minimum=1,
                                    help="MiB of estimated memory of the calls being handled; beyond it RESOURCE_EXHAUSTED")
    caller_rate_mb: float = _setting(16.0, group="transport", minimum=0,
                                     help="MiB of requests per second each token may send; a faster caller's calls "
                                          "wait before their body is read, each counting 64 KiB plus its body "
                                          "(0: no limit; a server without tokens limits no one)")
    caller_burst_mb: float = _setting(128.0, group="transport", minimum=1,
                                      help="MiB a token may send at once, above --caller-rate-mb, after a quiet while")
    max_streams_per_connection: int = _setting(100, group="transport", minimum=1,
                                               help="concurrent HTTP/2 streams (calls) one connection may open")
    connection_idle_seconds: float = _setting(300.0, group="transport", minimum=0,
                                              help="a connection without calls for this long is closed (0: never)")
    connection_max_age_seconds: float = _setting(3600.0, group="transport", minimum=0,
                                                 help="a connection is asked to reconnect after this long (0: never); "
                                                      "clients reconnect and resume WatchRun")
    connection_age_grace_seconds: float = _setting(30.0, group="transport", minimum=0,
                                                   help="calls still open on an aged connection get this long to "
                                                        "finish before it closes")


def fields() -> list[dataclasses.Field]:
    return list(dataclasses.fields(ServerSettings))


def flag_of(f: dataclasses.Field) -> str:
    return "--" + (f.metadata["flag"] or f.name.replace("_", "-"))


def env_of(f: dataclasses.Field) -> str:
    return "MAXENT_" + flag_of(f)[2:].upper().replace("-", "_")


def default_of(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def shown_default(f: dataclasses.Field) -> str:
    if f.metadata["shown_default"]:
        return f.metadata["shown_default"]
    value = default_of(f)
    if isinstance(value, bool):
        return "on" if value != f.metadata["negative"] else "off"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _converter(f: dataclasses.Field) -> Callable[[str], Any]:
    """Text (a flag value or environment variable) to the field's type; a
    number below the field's minimum is an error."""
    kind = str(f.type)
    base: Callable[[str], Any] = int if kind.startswith("int") else float if kind == "float" else str
    minimum = f.metadata["minimum"]

    def convert(text: str) -> Any:
        if kind == "int | None" and text.strip() == "":
            return None
        try:
            value = base(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if base is int else 'a number'}, "
                                             f"got {text!r}") from None
        if minimum is not None and value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum:g}, got {text!r}")
        return value

    convert.__name__ = base.__name__
    return convert


def _env_default(f: dataclasses.Field, environ: Mapping[str, str]) -> Any:
    """The field's default after its environment variable (unset or empty:
    the dataclass default)."""
    name = env_of(f)
    text = environ.get(name, "")
    if text == "":
        return default_of(f)
    if str(f.type) == "bool":
        given = parse_bool(text, name)
        return not given if f.metadata["negative"] else given
    try:
        value = _converter(f)(text)
    except argparse.ArgumentTypeError as error:
        raise ConfigError(f"{name}: {error}") from None
    choices = f.metadata["choices"]
    if choices and value not in choices:
        raise ConfigError(f"{name}: expected one of {', '.join(choices)}, got {text!r}")
    return value


def build_parser(prog: str = "maxent-server", description: str = "",
                 environ: Mapping[str, str] | None = None) -> argparse.ArgumentParser:
    """The command line of every setting; defaults come from the environment
    (raises ConfigError for an environment variable that does not parse)."""
    environ = os.environ if environ is None else environ
    parser = argparse.ArgumentParser(prog=prog, description=description)
    groups = {name: parser.add_argument_group(name) for name in GROUPS}
    for f in fields():
        meta = f.metadata
        default = _env_default(f, environ)
        help_text = f"{meta['help']} (default {shown_default(f)}; {env_of(f)})"
        group = groups[meta["group"]]
        if str(f.type) == "bool":
            action = "store_false" if meta["negative"] else "store_true"
            group.add_argument(flag_of(f), dest=f.name, action=action, default=default, help=help_text)
        else:
            group.add_argument(flag_of(f), dest=f.name, type=_converter(f), default=default,
                               choices=meta["choices"] or None, help=help_text)
    return parser


def settings_from(args: argparse.Namespace) -> ServerSettings:
    return ServerSettings(**{f.name: getattr(args, f.name) for f in fields()})


def flag_table() -> str:
    """The README's flag table (Markdown), one row per setting."""
    rows = ["| flag | environment | default | meaning |", "| --- | --- | --- | --- |"]
    for f in fields():
        meaning = f.metadata["help"].replace("|", "\\|")
        if f.metadata["choices"]:
            meaning += f" ({', '.join(f.metadata['choices'])})"
        rows.append(f"| `{flag_of(f)}` | `{env_of(f)}` | `{shown_default(f)}` | {meaning} |")
    return "\n".join(rows) + "\n"
