"""``meshgate configservice``: the command's arguments, and running it.

``gateway/cli.py`` adds the subcommand with ``add_configservice_command(subparsers)`` and dispatches to
``run_configservice_command(args)``. Usage errors exit 2 (argparse); a bad tokens file, unusable CA files, a busy
data directory or a port in use exit 1 with one line on stderr (or a ``listen_failed`` log line), never a
traceback.
"""

from __future__ import annotations

import argparse
import datetime
from pathlib import Path
from typing import Any

from gateway.config.snapshot import Address
from gateway.config.values import parse_address
from gateway.configservice.ca import DEFAULT_TRUST_DOMAIN, check_trust_domain, parse_ttl

__all__ = ["add_configservice_command", "run_configservice_command"]


def add_configservice_command(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``configservice`` to ``subparsers`` (the object ``add_subparsers`` returned)."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "configservice",
        help="run the central config service (versioned configs, OPA bundles, instance registry, mesh CA)",
        description="Run the central config service. See docs/configservice.md. SIGHUP (or any change to the "
        "tokens file, checked every second) reloads the tokens: a token removed from the file is revoked.",
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
    ca = parser.add_argument_group(
        "mesh CA",
        "The service signs short-lived mesh certificates (POST /v1/certificates) for gateway tokens bound to a "
        "service. Without --ca-cert/--ca-key the CA is created in DIR/ca/ on first start. Several replicas "
        "(--store etcd) must share one CA: give each the same --ca-cert and --ca-key.",
    )
    ca.add_argument("--ca-cert", type=Path, default=None, metavar="FILE", help="signing CA certificate (PEM)")
    ca.add_argument("--ca-key", type=Path, default=None, metavar="FILE", help="its private key (PEM, unencrypted)")
    ca.add_argument(
        "--ca-trust",
        type=Path,
        action="append",
        default=[],
        metavar="FILE",
        help="also trust these CA certificates (served by GET /v1/ca, never used to sign): CA rotation; repeatable",
    )
    ca.add_argument(
        "--trust-domain",
        type=_trust_domain,
        metavar="DOMAIN",
        default=DEFAULT_TRUST_DOMAIN,
        help=f"SPIFFE trust domain of issued identities spiffe://DOMAIN/service/NAME (default {DEFAULT_TRUST_DOMAIN})",
    )
    ca.add_argument(
        "--cert-ttl",
        type=_ttl,
        default=datetime.timedelta(hours=24),
        metavar="DURATION",
        help="lifetime of issued certificates, 5m..30d (e.g. 12h, 7d; default 24h)",
    )
    parser.add_argument(
        "--seed",
        type=Path,
        default=None,
        metavar="DIR",
        help="on start-up, store DIR/bundles/NAME/ and DIR/services/SERVICE.yaml where the service has none yet "
        "(an invalid file stops the service)",
    )
    parser.add_argument("--log-level", choices=("debug", "info", "warning", "error"), default="info")
    return parser


def _trust_domain(text: str) -> str:
    try:
        return check_trust_domain(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _ttl(text: str) -> datetime.timedelta:
    try:
        return parse_ttl(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


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
    if (args.ca_cert is None) != (args.ca_key is None):
        print("meshgate configservice: --ca-cert and --ca-key go together", flush=True)
        return 2
    settings = ServiceSettings(
        data=args.data,
        listen=args.listen,
        tokens=args.tokens,
        store=args.store,
        etcd_endpoints=endpoints,
        log_level=args.log_level,
        ca_cert=args.ca_cert,
        ca_key=args.ca_key,
        ca_trust=tuple(args.ca_trust),
        trust_domain=args.trust_domain,
        cert_ttl=args.cert_ttl,
        seed=args.seed,
    )
    return run_configservice(settings)
