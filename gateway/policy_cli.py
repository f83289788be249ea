"""``meshgate policy test|eval|push``: argparse wiring and printing over ``policy.tools`` and friends.

``gateway/cli.py`` calls ``add_policy_commands`` on its sub-command list and hands ``args`` to
``run_policy_command`` when ``args.command == "policy"``. Exit codes: 0 success, 1 a failing test, a policy that
does not load, an unreadable input or a refused push, 2 a usage error (argparse). Errors are one line on stderr;
no traceback for anything a user can cause. The policy modules (and the regorus extension) are imported only when a
policy command runs, so ``meshgate run`` does not pay for them at start-up.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, TextIO

__all__ = ["DEFAULT_DECISION", "add_policy_commands", "run_policy_command"]

DEFAULT_DECISION = "meshgate/authz/allow"
_RULE = "-" * 80  # OPA's separator before the summary


def add_policy_commands(subparsers: Any) -> None:
    """Add ``policy`` (with ``test``, ``eval``, ``push``) to ``subparsers``, an ``add_subparsers()`` result."""
    policy = subparsers.add_parser("policy", help="test, evaluate and push Rego policies")
    commands = policy.add_subparsers(dest="policy_command", required=True, metavar="COMMAND")

    test = commands.add_parser("test", help="run the test_* rules of the *.rego files in DIR")
    test.add_argument("directory", type=Path, metavar="DIR", help="policy directory (with its *_test.rego files)")
    test.add_argument("-v", "--verbose", action="store_true", help="also show print() output and full errors")

    evaluate = commands.add_parser("eval", help="evaluate a bundle's decision for one input; prints JSON")
    evaluate.add_argument("--bundle", required=True, type=Path, metavar="DIR", help="bundle directory or .tar.gz")
    evaluate.add_argument("--input", required=True, metavar="FILE", help="input document (JSON); - for stdin")
    evaluate.add_argument(
        "--decision", default=DEFAULT_DECISION, type=_decision, help=f"rule path (default {DEFAULT_DECISION})"
    )
    evaluate.add_argument("--explain", action="store_true", help="report which rules fired and which lines ran")

    push = commands.add_parser("push", help="load DIR's policies and data into a running OPA")
    push.add_argument("directory", type=Path, metavar="DIR", help="bundle directory")
    push.add_argument("--opa", required=True, metavar="URL", help="OPA address, e.g. http://127.0.0.1:8181")
    push.add_argument("--token-file", type=Path, default=None, help="file holding OPA's bearer token")
    push.add_argument("--timeout", type=_positive_float, default=10.0, help="seconds per request (default 10)")


def _decision(text: str) -> str:
    from policy.tools import normalize_decision

    try:
        return normalize_decision(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError("must be > 0")
    return value


def run_policy_command(args: argparse.Namespace) -> int:
    """Run the parsed ``policy`` sub-command; its exit status."""
    if args.policy_command == "test":
        return _test(args.directory, verbose=args.verbose, out=sys.stdout, err=sys.stderr)
    if args.policy_command == "eval":
        return _eval(args.bundle, args.input, args.decision, explain=args.explain, out=sys.stdout, err=sys.stderr)
    return _push(args.opa, args.directory, args.token_file, args.timeout, out=sys.stdout, err=sys.stderr)


# --------------------------------------------------------------------------------------------- test


def _test(directory: Path, *, verbose: bool, out: TextIO, err: TextIO) -> int:
    from policy.engine import PolicyLoadError
    from policy.tools import TestResult, load_policy_set, run_tests

    if not directory.is_dir():
        print(f"{directory}: not a directory", file=err)
        return 1
    try:
        report = run_tests(load_policy_set(directory, with_tests=True))
    except PolicyLoadError as error:
        print(str(error), file=err)
        return 1
    if not report.results:
        print(f"{directory}: no tests found (rules named test_* in *.rego files)", file=err)
        return 1

    def line(result: TestResult) -> str:
        text = f"{result.case.path}: {result.outcome} ({_duration(result.duration_ms)})"
        return f"{text}: {result.message}" if result.message else text

    for result in report.results:
        print(line(result), file=out)
        if verbose:
            for printed in result.prints:
                print(f"  {printed}", file=out)
            if result.detail:
                print("\n".join(f"  {text}" for text in result.detail.splitlines()), file=out)
    print(_RULE, file=out)
    total = len(report.results)
    for outcome in ("PASS", "FAIL", "ERROR"):
        if count := report.count(outcome):
            print(f"{outcome}: {count}/{total}", file=out)
    return 0 if report.ok else 1


def _duration(ms: float) -> str:
    return f"{ms:.2f}ms" if ms < 10 else f"{ms:.1f}ms"


# --------------------------------------------------------------------------------------------- eval


def _eval(bundle_dir: Path, input_name: str, decision: str, *, explain: bool, out: TextIO, err: TextIO) -> int:
    from policy.engine import UNDEFINED, PolicyError, PolicyLoadError

    document = _read_input(input_name, err)
    if document is None:
        return 1
    try:
        from policy.bundle import load_bundle
        from policy.engine_embedded import EmbeddedEngine

        bundle = load_bundle(bundle_dir)
        engine = EmbeddedEngine(bundle, decision)
    except PolicyLoadError as error:
        print(str(error), file=err)
        return 1

    from policy.tools import allowed_of, to_json

    answer: dict[str, Any] = {"decision": decision}
    status = 0
    started = time.perf_counter()
    try:
        value = engine.evaluate_sync(document)
    except PolicyError as error:
        # The gateway fails closed on this (503 policy_unavailable, or on_error: allow); show the same facts.
        value, status = UNDEFINED, 1
        answer["error"] = str(error)
        print(f"evaluation failed: {error}", file=err)
    eval_ms = (time.perf_counter() - started) * 1000
    defined = value is not UNDEFINED
    allowed, problem = allowed_of(value)
    answer.update(result=to_json(value) if defined else None, defined=defined, allowed=allowed)
    if problem:
        answer["problem"] = problem
    answer.update(revision=bundle.revision, eval_ms=round(eval_ms, 3))
    if explain:
        from policy.explain import explain as explain_decision
        from policy.explain import explanation_json, render_text
        from policy.tools import policy_set

        try:
            explanation = explain_decision(policy_set(bundle, bundle_dir, with_tests=False), decision, document)
        except PolicyLoadError as error:
            print(str(error), file=err)
            return 1
        answer["explain"] = explanation_json(explanation)
        print(render_text(explanation), file=err)
    print(json.dumps(answer, indent=2), file=out)
    return status


def _read_input(name: str, err: TextIO) -> dict[str, Any] | None:
    """The input document from a file or stdin (``-``); None after printing why it cannot be used."""
    try:
        text = sys.stdin.read() if name == "-" else Path(name).read_text(encoding="utf-8")
    except OSError as error:
        print(f"{name}: cannot read the input: {error.strerror or error}", file=err)
        return None
    except UnicodeDecodeError:
        print(f"{name}: the input is not UTF-8 text", file=err)
        return None
    label = "stdin" if name == "-" else name
    try:
        document = json.loads(text)
    except json.JSONDecodeError as error:
        print(f"{label}:{error.lineno}: invalid JSON: {error.msg} (column {error.colno})", file=err)
        return None
    if not isinstance(document, dict):
        print(
            f"{label}: the input must be a JSON object (the request document), not {type(document).__name__}", file=err
        )
        return None
    return document


# --------------------------------------------------------------------------------------------- push


def _push(opa_url: str, directory: Path, token_file: Path | None, timeout: float, *, out: TextIO, err: TextIO) -> int:
    import asyncio

    import aiohttp

    from policy.opa_push import PushError, push_policies

    token: str | None = None
    if token_file is not None:
        try:
            token = token_file.read_text(encoding="utf-8").strip() or None
        except (OSError, UnicodeDecodeError) as error:
            print(f"{token_file}: cannot read the token: {getattr(error, 'strerror', None) or error}", file=err)
            return 1
    try:
        lines = asyncio.run(push_policies(opa_url, directory, token=token, timeout=timeout))
    except PushError as error:
        print(str(error), file=err)
        return 1
    except (aiohttp.ClientError, OSError, TimeoutError) as error:  # push_policies maps these; a safety net
        print(f"cannot push to OPA at {opa_url}: {error or type(error).__name__}", file=err)
        return 1
    for line in lines:
        print(line, file=out)
    return 0
