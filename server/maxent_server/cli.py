"""`maxent-server`: run the MaxEnt-GRPO service. Every flag has a MAXENT_*
environment equivalent (e.g. --data-dir and MAXENT_DATA_DIR); booleans take
1/0, true/false, yes/no or on/off."""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import sys

from .settings import ConfigError, build_parser, flag_table, settings_from

#: Modules the server needs beyond the client install, and their distributions.
SERVER_MODULES = {
    "torch": "torch",
    "grpc_health": "grpcio-health-checking",
    "grpc_reflection": "grpcio-reflection",
    "prometheus_client": "prometheus-client",
    "math_verify": "math-verify",
}
SERVER_EXTRA_HINT = "pip install 'maxent-grpo-service[server]'"


def missing_server_modules() -> list[str]:
    """Distributions of the server extra that are not installed."""
    return [dist for module, dist in SERVER_MODULES.items() if importlib.util.find_spec(module) is None]


def main(argv: list[str] | None = None) -> int:
    try:
        parser = build_parser(description=__doc__)
    except ConfigError as error:
        print(f"maxent-server: {error}", file=sys.stderr)
        return 2
    parser.add_argument("--print-flag-table", action="store_true",
                        help="print the README's flag table (Markdown) and exit")
    args = parser.parse_args(argv)
    if args.print_flag_table:
        sys.stdout.write(flag_table())
        return 0
    missing = missing_server_modules()
    if missing:
        print(f"maxent-server needs the server extra ({', '.join(missing)} missing): {SERVER_EXTRA_HINT}",
              file=sys.stderr)
        return 2
    settings = settings_from(args)
    from .logs import configure_logging

    configure_logging(settings.log_level, settings.log_format, sys.stderr)
    # Imported only now: the checks above need neither grpc nor torch.
    from .app import MaxEntServer, PortError

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
