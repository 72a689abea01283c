"""Regenerate the Python stubs in api/maxent_api/_generated from proto/.

Usage:
    python scripts/gen_proto.py          # rewrite the checked-in stubs
    python scripts/gen_proto.py --check  # fail if they differ from proto/
"""

from __future__ import annotations

import argparse
import filecmp
import re
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"
PROTO_FILES = ["maxent/v1/maxent.proto"]
OUT_DIR = ROOT / "api" / "maxent_api" / "_generated"
PACKAGE = "maxent_api._generated"

# protoc writes absolute imports rooted at proto/ ("from maxent.v1 import");
# the stubs live inside the contract package, so those imports are re-rooted.
_IMPORT_FIXES = [
    (re.compile(r"\bfrom maxent\.v1 import\b"), f"from {PACKAGE}.maxent.v1 import"),
    (re.compile(r"\bimport maxent\.v1\.maxent_pb2\b"), f"import {PACKAGE}.maxent.v1.maxent_pb2"),
    (re.compile(r"(?<![\w.])maxent\.v1\.maxent_pb2\b"), f"{PACKAGE}.maxent.v1.maxent_pb2"),
]


def _plugin(name: str) -> str:
    path = Path(sys.executable).parent / name
    if not path.exists():
        found = shutil.which(name)
        if found is None:
            raise SystemExit(f"{name} not found: pip install mypy-protobuf")
        return found
    return str(path)


def generate(out: Path) -> None:
    from grpc_tools import protoc
    import grpc_tools

    wkt = Path(grpc_tools.__file__).parent / "_proto"
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"-I{wkt}",
        f"--plugin=protoc-gen-mypy={_plugin('protoc-gen-mypy')}",
        f"--plugin=protoc-gen-mypy_grpc={_plugin('protoc-gen-mypy_grpc')}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        f"--mypy_out={out}",
        f"--mypy_grpc_out={out}",
        *PROTO_FILES,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    for path in out.rglob("*.py*"):
        text = path.read_text()
        for pattern, repl in _IMPORT_FIXES:
            text = pattern.sub(repl, text)
        path.write_text(text)
    for folder in [out, *[p for p in out.rglob("*") if p.is_dir()]]:
        (folder / "__init__.py").touch()


def _differences(a: Path, b: Path) -> list[str]:
    files = {p.relative_to(a) for p in a.rglob("*") if p.is_file() and "__pycache__" not in p.parts}
    files |= {p.relative_to(b) for p in b.rglob("*") if p.is_file() and "__pycache__" not in p.parts}
    return sorted(
        str(f) for f in files
        if not ((a / f).exists() and (b / f).exists() and filecmp.cmp(a / f, b / f, shallow=False))
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="compare instead of writing")
    opts = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        fresh = Path(tmp)
        generate(fresh)
        if opts.check:
            stale = _differences(fresh, OUT_DIR)
            if stale:
                print("generated stubs are out of date; run python scripts/gen_proto.py:", *stale, sep="\n  ")
                return 1
            print("generated stubs match proto/")
            return 0
        if OUT_DIR.exists():
            shutil.rmtree(OUT_DIR)
        shutil.copytree(fresh, OUT_DIR)
    print(f"wrote {OUT_DIR.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
