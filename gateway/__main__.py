"""Command line: ``python -m gateway {serve,config,token,dev-setup}`` (also installed as
``gateway``).

* ``serve`` starts the gateway as the GATEWAY_* variables configure it (docs/configuration.md).
* ``config`` prints the effective configuration, secrets masked, after the same checks.
* ``token`` prints an HS256 token signed with the configured secret, for curl, wscat, scripts.
* ``dev-setup`` writes the development certificate and secret into certs/ (used by make run).

A configuration problem prints every problem at once and exits with status 2; so does an
address the server cannot listen on, in one line. Nothing ends in a traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from gateway import __version__
from gateway.settings import Settings, SettingsError, load_settings

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gateway", description=__doc__.split("\n")[0])
    parser.add_argument("--version", action="version", version=f"gateway {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser(
        "serve",
        help="start the gateway as configured by GATEWAY_* variables",
        description="Start the gateway. It takes no options: GATEWAY_* environment variables "
        "configure it, each described in docs/configuration.md; `gateway config` prints the "
        "values in effect. Stop it with SIGTERM or SIGINT: it drains (closes connections with "
        "1001, spread over GATEWAY_SHUTDOWN_SPREAD_SECONDS) before it exits.",
    )
    commands.add_parser(
        "config",
        help="print the effective configuration (GATEWAY_* variables), secrets masked",
        description="Check the configuration as serve does, then print every setting in "
        "effect as GATEWAY_NAME=value, with '# default' where the variable is unset. Secrets "
        "and URL passwords print as ***. Exits 2, listing every problem, when serve would.",
    )
    token = commands.add_parser("token", help="print a token signed with the configured secret")
    token.add_argument("--sub", required=True, help="user id (the sub claim)")
    token.add_argument("--name", help="display name (defaults to the user id)")
    token.add_argument("--rooms", default="", help="comma separated rooms the token grants")
    token.add_argument("--ttl", type=float, default=3600.0, help="lifetime in seconds")
    commands.add_parser("dev-setup", help="create the development certificate and secret")
    return parser


def _settings() -> Settings:
    try:
        return load_settings(os.environ)
    except SettingsError as error:
        print(f"gateway: {error}", file=sys.stderr)
        raise SystemExit(2) from None


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "dev-setup":
        from gateway.devsetup import ensure_dev_files

        for path in ensure_dev_files():
            print(f"wrote {path}")
        return 0

    settings = _settings()
    if args.command == "config":
        from gateway.server import check_files
        from gateway.settings import describe

        problems = check_files(settings)
        if problems:
            print(f"gateway: {SettingsError(problems)}", file=sys.stderr)
            return 2
        print("\n".join(describe(settings, os.environ)))
        return 0
    if args.command == "token":
        from gateway.auth import mint_token

        rooms = [room.strip() for room in args.rooms.split(",") if room.strip()]
        try:
            print(
                mint_token(
                    settings, sub=args.sub, name=args.name, rooms=rooms, ttl_seconds=args.ttl
                )
            )
        except ValueError as error:
            print(f"gateway: {error}", file=sys.stderr)
            return 2
        return 0

    from gateway.logs import configure_logging
    from gateway.server import StartupError, check_files, listen, listening_url, run

    problems = check_files(settings)
    if problems:
        print(f"gateway: {SettingsError(problems)}", file=sys.stderr)
        return 2
    try:
        sock = listen(settings)
    except StartupError as error:
        print(f"gateway: {error}", file=sys.stderr)
        return 2

    # From here on stderr carries JSON lines only (docs/configuration.md): no plain prints.
    configure_logging(settings.log_level)
    log = logging.getLogger("gateway")
    log.info(
        "gateway starting",
        extra={"env": settings.env, "url": listening_url(settings, sock)},
    )
    if not settings.is_production:
        log.warning(
            "DEVELOPMENT MODE: self-signed certificate, development secret, and a token "
            "endpoint anyone can use. Never expose this to a network. A token for scripts: "
            "python -m gateway token --sub alice --name Alice --rooms lobby,dev"
        )
    try:
        run(settings, sock)
    except StartupError as error:
        log.error("gateway cannot start", extra={"problem": str(error)})
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
