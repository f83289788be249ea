"""``meshgate configservice``: the command's arguments, and running it.

``gateway/cli.py`` adds the subcommand with ``add_configservice_command(subparsers)`` and dispatches to
``run_configservice_command(args)``. Usage errors exit 2 (argparse); a bad tokens file, a busy data directory or a
port in use exit 1 with one line on stderr (or a ``listen_failed`` log line), never a traceback.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from gateway.config.snapshot import Address
from gateway.config.values import parse_address

__all__ = ["add_configservice_command", "run_configservice_command"]


def add_configservice_command(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``configservice`` to ``subparsers`` (the object ``add_subparsers`` returned)."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "configservice",
        help="run the central config service (versioned configs, OPA bundles, instance registry)",
        description="Run the central config service. See docs/configservice.md.",
    )
    parser.add_argument("--data", required=True, type=Path, help="data directory (SQLite file, generated tokens)")
    parser.add_argument(
        "--listen", type=_address, default=Address("127.0.0.1", 7000), help="host:port (default 127.0.0.1:7000)"
    )
    parser.add_argument("--tokens", type=Path, default=None, help="tokens file (default: DIR/tokens.yaml, generated)")
    parser.add_argument("--store", choices=("sqlite", "etcd"), default="sqlite", help="storage (default sqlite)")
    parser.add_argument(
        "--etcd-endpoints",
        nargs="+",
        default=[],
        metavar="HOST:PORT",
        help="etcd endpoints for --store etcd (space- or comma-separated)",
    )
    parser.add_argument("--log-level", choices=("debug", "info", "warning", "error"), default="info")
    return parser


def _address(text: str) -> Address:
    try:
        return parse_address(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def run_configservice_command(args: argparse.Namespace) -> int:
    from gateway.configservice.server import ServiceSettings, run_configservice

    endpoints = tuple(part for item in args.etcd_endpoints for part in item.split(",") if part)
    if args.store == "etcd" and not endpoints:
        print("meshgate configservice: --store etcd needs --etcd-endpoints", flush=True)
        return 2
    settings = ServiceSettings(
        data=args.data,
        listen=args.listen,
        tokens=args.tokens,
        store=args.store,
        etcd_endpoints=endpoints,
        log_level=args.log_level,
    )
    return run_configservice(settings)
