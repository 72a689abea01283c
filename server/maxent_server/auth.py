"""Bearer-token authentication and per-run authorisation.

The token file (``--auth-tokens FILE``) is JSON::

    {"tokens": [
      {"name": "trainer-a", "sha256": "<hex digest of the token>", "role": "write", "runs": ["team-a/*"]},
      {"name": "ops", "token": "<the token itself>", "role": "admin", "runs": ["*"]}
    ]}

Each entry has a unique ``name`` (what the logs show, never the token), either
the token's SHA-256 hex digest (``sha256``, preferred) or the token itself
(``token``), a ``role`` and the run-id patterns it may touch (``runs``,
shell-style: ``*`` matches any characters, ``/`` included; ``?`` one; ``[ab]``
a set). Roles are cumulative:

* ``read``: GetRun, ListRuns (only the runs it may touch), ComputeWeightStats,
  ComputeRewardStatistics, ListRewardFunctions;
* ``write``: also CreateRun and UpdateController;
* ``admin``: also DeleteRun.

Only SHA-256 digests are kept in memory. A presented token is hashed and
compared with every digest with :func:`hmac.compare_digest`, all entries every
time, so the time taken does not depend on where or whether it matched.

``python -m maxent_server.auth new-token NAME ROLE PATTERN...`` prints a fresh
random token and the JSON entry (with its digest) to add to the file.
"""

from __future__ import annotations

import argparse
import contextvars
import enum
import fnmatch
import hashlib
import hmac
import json
import re
import secrets
import stat
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from maxent_api import SERVICE_NAME as MAXENT_SERVICE

from .logs import clip

_HEX_DIGEST = re.compile(r"^[0-9a-fA-F]{64}$")


class Role(enum.IntEnum):
    READ = 1
    WRITE = 2
    ADMIN = 3

    @property
    def label(self) -> str:
        return self.name.lower()


#: The least role each MaxEntService method needs; a method not listed needs admin.
METHOD_ROLES: dict[str, Role] = {
    "GetRun": Role.READ,
    "ListRuns": Role.READ,
    "ComputeRewardStatistics": Role.READ,
    "ComputeWeightStats": Role.READ,
    "ComputeStepStatistics": Role.READ,
    "ListRewardFunctions": Role.READ,
    "WatchRun": Role.READ,
    "CreateRun": Role.WRITE,
    "UpdateController": Role.WRITE,
    "DeleteRun": Role.ADMIN,
}


class TokenFileError(ValueError):
    """The token file cannot be used; the message never contains a token."""


@dataclass(frozen=True)
class Principal:
    """Who a valid token stands for."""

    name: str
    role: Role
    run_patterns: tuple[str, ...]

    @property
    def all_runs(self) -> bool:
        return "*" in self.run_patterns

    def may_access(self, run_id: str) -> bool:
        return any(fnmatch.fnmatchcase(run_id, pattern) for pattern in self.run_patterns)


#: The principal of the call being served (None without --auth-tokens): set
#: by the interceptor once the token is checked, read by the servicer where
#: the answer depends on who asks (ListRuns).
CURRENT_PRINCIPAL: contextvars.ContextVar[Principal | None] = contextvars.ContextVar(
    "maxent_principal", default=None
)


def hash_token(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8")).digest()


class TokenTable:
    """Hashed tokens and their principals."""

    def __init__(self, entries: Iterable[tuple[bytes, Principal]]) -> None:
        self._entries = list(entries)

    def __len__(self) -> int:
        return len(self._entries)

    def authenticate(self, token: str | None) -> Principal | None:
        """The principal of `token`, or None. Compares against every entry in
        constant time per entry and never stops early."""
        if not token:
            return None
        digest = hash_token(token)
        found = None
        for stored, principal in self._entries:
            if hmac.compare_digest(stored, digest):
                found = principal
        return found


def parse_token_file(text: str, source: str = "token file") -> TokenTable:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise TokenFileError(f"{source}: not valid JSON (line {error.lineno}, column {error.colno})") from None
    entries = data.get("tokens") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise TokenFileError(f'{source}: expected an object with a "tokens" list')
    names: set[str] = set()
    digests: set[bytes] = set()
    table = []
    for i, entry in enumerate(entries):
        where = f"{source}: tokens[{i}]"
        if not isinstance(entry, dict):
            raise TokenFileError(f"{where}: expected an object")
        unknown = set(entry) - {"name", "token", "sha256", "role", "runs"}
        if unknown:
            raise TokenFileError(f"{where}: unknown keys {sorted(unknown)}")
        name = entry.get("name")
        if not isinstance(name, str) or not name:
            raise TokenFileError(f"{where}: name must be a non-empty string")
        where = f"{source}: tokens[{i}] ({name!r})"
        if name in names:
            raise TokenFileError(f"{where}: duplicate name")
        names.add(name)
        if ("token" in entry) == ("sha256" in entry):
            raise TokenFileError(f'{where}: give exactly one of "token" and "sha256"')
        if "token" in entry:
            token = entry["token"]
            if not isinstance(token, str) or not token.strip() or token != token.strip():
                raise TokenFileError(f"{where}: token must be a non-empty string without surrounding spaces")
            digest = hash_token(token)
        else:
            hexed = entry["sha256"]
            if not isinstance(hexed, str) or not _HEX_DIGEST.match(hexed):
                raise TokenFileError(f"{where}: sha256 must be 64 hex digits")
            digest = bytes.fromhex(hexed)
        if digest in digests:
            raise TokenFileError(f"{where}: the same token appears twice")
        digests.add(digest)
        role = entry.get("role")
        if not isinstance(role, str) or role.upper() not in Role.__members__:
            raise TokenFileError(f"{where}: role must be one of read, write, admin")
        runs = entry.get("runs")
        if not isinstance(runs, list) or not runs or not all(isinstance(p, str) and p for p in runs):
            raise TokenFileError(f'{where}: runs must be a non-empty list of run-id patterns (["*"] for all)')
        table.append((digest, Principal(name=name, role=Role[role.upper()], run_patterns=tuple(runs))))
    return TokenTable(table)


def load_token_file(path: str | Path) -> TokenTable:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as error:
        raise TokenFileError(f"cannot read token file {str(path)!r}: {error.strerror or error}") from None
    return parse_token_file(text, source=str(path))


def plaintext_tokens_readable_by_all(path: str | Path) -> bool:
    """Whether the token file holds tokens themselves (not only digests) and
    any user on the machine may read it."""
    try:
        if not Path(path).stat().st_mode & stat.S_IROTH:
            return False
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    entries = data.get("tokens") if isinstance(data, dict) else None
    return any(isinstance(entry, dict) and "token" in entry for entry in entries or ())


def bearer_token(metadata: Sequence[tuple[str, str | bytes]] | None) -> str | None:
    """The token of an `authorization: Bearer <token>` entry, or None."""
    for key, value in metadata or ():
        if key.lower() != "authorization":
            continue
        if isinstance(value, bytes):
            value = value.decode("utf-8", "replace")
        scheme, _, token = value.strip().partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
    return None


class Authorizer:
    """The tokens in force (reloadable) and the access rules."""

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        self._lock = threading.Lock()
        self._table = load_token_file(self.path)

    @property
    def token_count(self) -> int:
        return len(self._table)

    def reload(self) -> int:
        """Read the file again; keep the old tokens when it is invalid (raises)."""
        table = load_token_file(self.path)
        with self._lock:
            self._table = table
        return len(table)

    def authenticate(self, metadata) -> Principal | None:
        with self._lock:
            table = self._table
        return table.authenticate(bearer_token(metadata))

    def authenticate_token(self, token: str | None) -> Principal | None:
        with self._lock:
            table = self._table
        return table.authenticate(token)

    @staticmethod
    def denial(principal: Principal, method: str, run_id: str) -> str | None:
        """Why `principal` may not call `method` on `run_id`, or None when it may."""
        needed = METHOD_ROLES.get(method, Role.ADMIN)
        if principal.role < needed:
            return f"token {principal.name!r} has role {principal.role.label}; {method} needs {needed.label}"
        if run_id and not principal.may_access(run_id):
            return f"token {principal.name!r} may not access run {clip(run_id)!r}"
        return None


# -- command line: make a token --------------------------------------------------


def _main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m maxent_server.auth", description="Token helpers.")
    sub = parser.add_subparsers(dest="command", required=True)
    new = sub.add_parser("new-token", help="print a random token and its token-file entry")
    new.add_argument("name")
    new.add_argument("role", choices=[r.label for r in Role])
    new.add_argument("runs", nargs="+", help="run-id patterns, e.g. 'team-a/*' or '*'")
    sub.add_parser("hash", help="print the sha256 of a token read from standard input")
    args = parser.parse_args(argv)
    if args.command == "new-token":
        token = secrets.token_urlsafe(32)
        entry = {"name": args.name, "sha256": hash_token(token).hex(), "role": args.role, "runs": args.runs}
        print(f"token (give it to the client; it is not stored): {token}")
        print(f"token-file entry: {json.dumps(entry)}")
    else:
        token = sys.stdin.readline().strip()
        if not token:
            print("no token on standard input", file=sys.stderr)
            return 2
        print(hash_token(token).hex())
    return 0


if __name__ == "__main__":
    sys.exit(_main())
