"""e2e: ``meshgate policy test|eval|push`` as users run them (``python -m gateway``): output, exit codes, and never a
traceback on stderr."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.procs import ROOT, free_port

pytestmark = pytest.mark.e2e

SHIPPED = "policy/rego"

WRITER_WITH_READ_ROLE = {
    "attributes": {"request": {"http": {"method": "POST", "path": "/orders", "headers": {}}}},
    "parsed_path": ["orders"],
    "parsed_query": {},
    "meshgate": {"service": "orders", "route": "orders-write", "principal": {"sub": "alice", "roles": ["orders.read"]}},
}
READER = {
    "attributes": {"request": {"http": {"method": "GET", "path": "/orders/1", "headers": {}}}},
    "parsed_path": ["orders", "1"],
    "parsed_query": {},
    "meshgate": {"service": "orders", "route": "orders-read", "principal": {"sub": "bob", "roles": ["orders.read"]}},
}

POLICY = 'package app\n\nimport rego.v1\n\ndefault allow := false\n\nallow if input.user == "alice"\n'
TESTS = """\
package app_test

import rego.v1

import data.app

test_alice if app.allow with input as {"user": "alice"}

test_bob if {
	print("bob is", "checked")
	app.allow with input as {"user": "bob"}
}
"""


def meshgate(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [sys.executable, "-m", "gateway", *args], input=stdin, capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert "Traceback" not in result.stderr, result.stderr
    return result


def write(directory: Path, files: dict[str, str]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (directory / name).write_text(text)
    return directory


def input_file(tmp_path: Path, document: dict[str, Any]) -> str:
    path = tmp_path / "input.json"
    path.write_text(json.dumps(document))
    return str(path)


# --------------------------------------------------------------------------------------------- policy test


def test_the_shipped_policy_passes() -> None:
    result = meshgate("policy", "test", SHIPPED)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert re.fullmatch(r"data\.meshgate\.authz_test\.test_\w+: PASS \(\d+\.\d+ms\)", lines[0])
    count = sum(1 for line in lines if ": PASS (" in line)
    assert lines[-2:] == ["-" * 80, f"PASS: {count}/{count}"]
    assert result.stderr == ""


def test_a_failing_test_exits_1_with_its_fail_line(tmp_path: Path) -> None:
    directory = write(tmp_path / "p", {"app.rego": POLICY, "app_test.rego": TESTS})
    result = meshgate("policy", "test", str(directory))
    assert result.returncode == 1
    assert "data.app_test.test_bob: FAIL (" in result.stdout
    assert result.stdout.rstrip().endswith("PASS: 1/2\nFAIL: 1/2")
    assert "bob is checked" not in result.stdout


def test_verbose_shows_print_output(tmp_path: Path) -> None:
    directory = write(tmp_path / "p", {"app.rego": POLICY, "app_test.rego": TESTS})
    result = meshgate("policy", "test", "-v", str(directory))
    assert result.returncode == 1
    assert re.search(r"app_test\.rego:\d+: bob is checked", result.stdout)


def test_a_parse_error_names_file_and_line(tmp_path: Path) -> None:
    directory = write(tmp_path / "p", {"bad.rego": "package bad\n\nimport rego.v1\n\nallow if {\n\tinput.x ==\n}\n"})
    result = meshgate("policy", "test", str(directory))
    assert result.returncode == 1
    assert re.fullmatch(r".*bad\.rego:7: .+\n", result.stderr), result.stderr
    assert result.stdout == ""


def test_no_tests_is_a_failure(tmp_path: Path) -> None:
    directory = write(tmp_path / "p", {"app.rego": POLICY})
    result = meshgate("policy", "test", str(directory))
    assert result.returncode == 1
    assert "no tests found" in result.stderr


def test_a_missing_directory_is_one_line(tmp_path: Path) -> None:
    result = meshgate("policy", "test", str(tmp_path / "nope"))
    assert (result.returncode, result.stderr) == (1, f"{tmp_path / 'nope'}: not a directory\n")


def test_usage_errors_exit_2() -> None:
    assert meshgate("policy").returncode == 2
    assert meshgate("policy", "test").returncode == 2
    assert meshgate("policy", "eval", "--bundle", SHIPPED).returncode == 2


# --------------------------------------------------------------------------------------------- policy eval


def test_eval_deny(tmp_path: Path) -> None:
    result = meshgate("policy", "eval", "--bundle", SHIPPED, "--input", input_file(tmp_path, WRITER_WITH_READ_ROLE))
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    assert answer["result"] == {
        "allowed": False,
        "http_status": 403,
        "reason": "role orders.write required for POST on route orders-write",
        "headers": {},
    }
    assert (answer["decision"], answer["defined"], answer["allowed"]) == ("meshgate/authz/allow", True, False)
    assert answer["revision"] == json.loads((ROOT / SHIPPED / ".manifest").read_text())["revision"]
    assert answer["eval_ms"] >= 0
    assert "explain" not in answer
    assert result.stderr == ""


def test_eval_allow_from_stdin() -> None:
    result = meshgate("policy", "eval", "--bundle", SHIPPED, "--input", "-", stdin=json.dumps(READER))
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    assert (answer["allowed"], answer["result"]["reason"]) == (True, "role orders.read grants GET on route orders-read")


def test_eval_of_an_undefined_rule_is_a_deny(tmp_path: Path) -> None:
    directory = write(tmp_path / "p", {"app.rego": 'package app\n\nimport rego.v1\n\nallow if input.user == "alice"\n'})
    result = meshgate(
        "policy",
        "eval",
        "--bundle",
        str(directory),
        "--input",
        "-",
        "--decision",
        "data.app.allow",
        stdin='{"user": "bob"}',
    )
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    assert (answer["decision"], answer["result"], answer["defined"], answer["allowed"]) == (
        "app/allow",
        None,
        False,
        False,
    )


def test_eval_explain(tmp_path: Path) -> None:
    args = ("policy", "eval", "--bundle", SHIPPED, "--input", input_file(tmp_path, WRITER_WITH_READ_ROLE), "--explain")
    result = meshgate(*args)
    assert result.returncode == 0, result.stderr
    explain = json.loads(result.stdout)["explain"]
    fired = {entry["rule"]: entry.get("value") for entry in explain["fired"]}
    assert fired["data.meshgate.authz.required_roles"] == ["orders.write"]
    assert fired["data.meshgate.authz.held"] == []
    not_fired = {entry["rule"] for entry in explain["not_fired"]}
    assert {"data.meshgate.authz.grant_reason", "data.meshgate.authz.public"} <= not_fired
    assert explain["coverage"]["policy/rego/authz.rego"]["covered"]
    # The readable account goes to stderr, the JSON stays parseable on stdout.
    assert result.stderr.startswith("data.meshgate.authz.allow = ")
    assert "not fired (undefined for this input):" in result.stderr
    assert "meshgate.authz.grant_reason  stopped at line" in result.stderr


def test_eval_missing_input_file(tmp_path: Path) -> None:
    missing = str(tmp_path / "missing.json")
    result = meshgate("policy", "eval", "--bundle", SHIPPED, "--input", missing)
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr == f"{missing}: cannot read the input: No such file or directory\n"


def test_eval_input_that_is_not_json_or_not_an_object(tmp_path: Path) -> None:
    path = tmp_path / "input.json"
    path.write_text('{"attributes": \n')
    result = meshgate("policy", "eval", "--bundle", SHIPPED, "--input", str(path))
    assert result.returncode == 1
    assert result.stderr.startswith(f"{path}:2: invalid JSON: ")
    result = meshgate("policy", "eval", "--bundle", SHIPPED, "--input", "-", stdin="[1, 2]")
    assert result.returncode == 1
    assert result.stderr == "stdin: the input must be a JSON object (the request document), not list\n"


def test_eval_bundle_that_does_not_load(tmp_path: Path) -> None:
    directory = write(tmp_path / "p", {"bad.rego": "package bad\n\nallow { true }\n"})
    result = meshgate(
        "policy", "eval", "--bundle", str(directory), "--input", "-", "--decision", "bad/allow", stdin="{}"
    )
    assert (result.returncode, result.stdout) == (1, "")
    assert "bad.rego:3" in result.stderr
    assert len(result.stderr.splitlines()) == 1


def test_eval_bad_decision_path_is_a_usage_error() -> None:
    result = meshgate("policy", "eval", "--bundle", SHIPPED, "--input", "-", "--decision", "allow", stdin="{}")
    assert result.returncode == 2
    assert "is not a rule path like meshgate/authz/allow" in result.stderr


# --------------------------------------------------------------------------------------------- policy push


def test_push_to_an_opa_that_is_not_there() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    result = meshgate("policy", "push", "--opa", url, "--timeout", "2", SHIPPED)
    assert (result.returncode, result.stdout) == (1, "")
    assert url in result.stderr
    assert len(result.stderr.splitlines()) == 1


def test_push_with_an_unreadable_token_file(tmp_path: Path) -> None:
    missing = tmp_path / "token"
    result = meshgate("policy", "push", "--opa", "http://127.0.0.1:1", "--token-file", str(missing), SHIPPED)
    assert result.returncode == 1
    assert result.stderr == f"{missing}: cannot read the token: No such file or directory\n"
