"""The ``meshgate`` command line: ``run``, ``check``, ``configservice``, ``policy test|eval|push`` and ``demo``.

Usage errors exit 2 (argparse), config errors exit 1 with one ``path: problem`` line each on stderr; no command
prints a traceback for a user error.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence
from pathlib import Path

from gateway.config.errors import ConfigError, Problem
from gateway.configservice.cli import add_configservice_command, run_configservice_command
from gateway.policy_cli import add_policy_commands, run_policy_command

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="meshgate", description="Observability-first telemetry and policy gateway.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="run a gateway from a config file")
    run.add_argument("-c", "--config", required=True, type=Path, help="gateway config file (YAML or JSON)")
    run.add_argument("--workers", type=_positive_int, default=1, help="processes sharing the port (default 1)")

    check = commands.add_parser("check", help="validate a config file")
    check.add_argument("-c", "--config", required=True, type=Path, help="gateway config file (YAML or JSON)")

    demo = commands.add_parser(
        "demo",
        help="start the compose topology as local processes: config service, demo services, sidecars, Prometheus",
        description="Run compose/ without Docker (see docs/compose.md). Ctrl-C stops everything.",
    )
    demo.add_argument(
        "--data", type=Path, default=Path("meshgate-demo"), help="working files and logs (default ./meshgate-demo)"
    )
    demo.add_argument("--traffic", action="store_true", help="also send a steady request mix (gateway.demo.traffic)")
    demo.add_argument("--no-prometheus", action="store_true", help="do not start Prometheus even if installed")
    demo.add_argument(
        "--scrape-interval",
        type=_prometheus_duration,
        default=None,
        metavar="DURATION",
        help="Prometheus scrape interval, e.g. 1s (default 5s)",
    )

    add_configservice_command(commands)
    add_policy_commands(commands)
    return parser


def _prometheus_duration(text: str) -> str:
    # Checked here, in Prometheus' own format: a bad value would otherwise surface as "prometheus did not start".
    if not re.fullmatch(r"(?:[1-9][0-9]*(?:ms|s|m|h))+", text):
        raise argparse.ArgumentTypeError(f"expected a Prometheus duration such as 1s, 500ms or 1m, got {text!r}")
    return text


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError("must be >= 1")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "check":
            return _check(args.config)
        if args.command == "run":
            return _run(args.config, args.workers)
        if args.command == "configservice":
            return run_configservice_command(args)
        if args.command == "policy":
            return run_policy_command(args)
        from gateway.demo.stack import DemoOptions, run_demo

        options = DemoOptions(args.data, args.traffic, not args.no_prometheus, args.scrape_interval)
        return run_demo(options)
    except KeyboardInterrupt:
        return 130


def _check(path: Path) -> int:
    try:
        bootstrap = _validate(path)
    except ConfigError as error:
        print(str(error), file=sys.stderr)
        return 1
    # A bootstrap is checked alone: what the config service pushes is checked by the service, and by the gateway
    # again when it arrives.
    print("ok")
    if bootstrap:
        # stdout stays the contract's bare "ok"; what was not checked is said beside it.
        print(f"note: a bootstrap file: the routes and the rest come from {bootstrap}", file=sys.stderr)
    return 0


def _validate(path: Path) -> str | None:
    """Everything ``check`` and ``run`` refuse a file for; the config service's URL if it is a bootstrap."""
    from gateway.config.bootstrap import Bootstrap, load_config, read_token
    from gateway.policy_runtime import check_policies
    from gateway.tls.contexts import check_tls

    loaded = load_config(path)
    snapshot = loaded.snapshot if isinstance(loaded, Bootstrap) else loaded
    problems: list[Problem] = []
    # The bundles and the certificate files too: a config whose policy or TLS files cannot load is not ok.
    for check in (check_policies, check_tls):
        try:
            check(snapshot)
        except ConfigError as error:
            problems.extend(error.problems)
    if problems:
        raise ConfigError(problems)
    if not isinstance(loaded, Bootstrap):
        return None
    read_token(loaded.settings.token_file)
    return loaded.settings.url


def _run(path: Path, workers: int) -> int:
    from gateway.workers import run_worker, run_workers

    try:  # fail fast, once, before any worker starts
        _validate(path)
    except ConfigError as error:
        print(str(error), file=sys.stderr)
        return 1
    if workers == 1:
        run_worker(str(path), reuse_port=False)
    return run_workers(path, workers)


if __name__ == "__main__":
    sys.exit(main())
