"""Logging setup and the one-line-per-RPC access log.

``--log-format text`` (default) writes ``time LEVEL logger: message``;
``--log-format json`` writes one JSON object per line with ``time``,
``level``, ``logger``, ``message`` and, for the RPC lines, the fields below.

Each RPC of the MaxEnt service is one INFO line on the ``maxent_server.rpc``
logger (health checks and reflection at DEBUG) with: method, service, run
(the request's run_id, '' when none), code (gRPC status name),
duration_seconds, request_bytes, response_bytes, completions (when the
request carries a batch), principal (the token's name from the token file,
'' without authentication) and peer. Never in it: completion texts, answers,
reward parameters, tokens or error details.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

RPC_LOGGER = "maxent_server.rpc"
_FIELDS = ("method", "service", "run", "code", "duration_seconds", "request_bytes", "response_bytes",
           "completions", "principal", "peer")


class JsonFormatter(logging.Formatter):
    """One JSON object per record; RPC records carry their fields at the top level."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": _iso_time(record.created),
            "level": record.levelname,
            "logger": record.name,
        }
        fields = getattr(record, "rpc_fields", None)
        if fields is not None:
            out["message"] = "rpc"
            out.update(fields)
        else:
            out["message"] = record.getMessage()
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False, default=str)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")


def _iso_time(created: float) -> str:
    seconds = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created))
    return f"{seconds}.{int(created % 1 * 1000):03d}Z"


def configure_logging(level: str = "INFO", fmt: str = "text", stream=None) -> None:
    """Root handler on stderr in the chosen format."""
    if fmt not in ("text", "json"):
        raise ValueError(f"unknown log format {fmt!r} (text or json)")
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())


_rpc_log = logging.getLogger(RPC_LOGGER)


def log_rpc(level: int, **fields: Any) -> None:
    """One access-log line. `fields` are the keys of _FIELDS (None: left out)."""
    if not _rpc_log.isEnabledFor(level):
        return
    fields = {k: fields[k] for k in _FIELDS if fields.get(k) is not None}
    text = " ".join(f"{k}={_text_value(v)}" for k, v in fields.items())
    _rpc_log.log(level, "rpc %s", text, extra={"rpc_fields": fields})


def _text_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6f}"
    text = str(value)
    if text == "" or any(c.isspace() or c in '"=' for c in text):
        return json.dumps(text)
    return text
