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
reward parameters, tokens or error details. Every text value is made safe
to log (:func:`clip`): at most MAX_LOGGED_CHARS characters, the rest replaced
by a marker saying how many were left out, and control characters escaped
(``\\n``, ``\\x1b``), so one line stays one line whatever a client sends.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from typing import Any

RPC_LOGGER = "maxent_server.rpc"
_FIELDS = ("method", "service", "run", "code", "duration_seconds", "request_bytes", "response_bytes",
           "completions", "principal", "peer")
#: The longest text value an access-log line (or an error message quoting a
#: client's id) carries.
MAX_LOGGED_CHARS = 128
# C0 and C1 controls, DEL, and the line and paragraph separators.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def clip(text: str, limit: int = MAX_LOGGED_CHARS) -> str:
    """`text` fit for one log line: control characters escaped, at most
    `limit` characters of it kept and the rest counted."""
    kept = text[:limit]
    safe = _CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), kept)
    if len(text) > limit:
        safe += f"...[{len(text) - limit} more chars]"
    return safe


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
    """`time LEVEL logger: message`; control characters in the message are
    escaped (a traceback after it keeps its lines)."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 - logging's naming
        return _CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"),
                            super().formatMessage(record))


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
    fields = {k: clip(fields[k]) if isinstance(fields[k], str) else fields[k]
              for k in _FIELDS if fields.get(k) is not None}
    text = " ".join(f"{k}={_text_value(v)}" for k, v in fields.items())
    _rpc_log.log(level, "rpc %s", text, extra={"rpc_fields": fields})


def _text_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6f}"
    text = str(value)
    if text == "" or any(c.isspace() or c in '"=' for c in text):
        return json.dumps(text)
    return text
