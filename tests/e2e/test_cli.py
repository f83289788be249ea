"""e2e: the ``meshgate`` command line as users run it: ``check``, usage errors, ``python -m gateway``
(``demo`` is ``test_demo.py``)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.procs import ROOT

pytestmark = pytest.mark.e2e

EXAMPLE = ROOT / "examples" / "gateway.yaml"
CONSOLE_SCRIPT = Path(sys.executable).parent / "meshgate"  # installed next to this interpreter by `pip install -e .`
PROBLEM_LINE = re.compile(r"[^:\s][^:]*: \S.*")  # path (no colon; "line 2, column 1" for undecodable text): problem

BAD_CONFIG = """\
service: orders
listen: 127.0.0.1:8080
routes:
  - name: read
    match: {path_prefix: /orders, methods: [GET]}
    cluster: orders
  - name: write
    match: {path_prefix: /orders}
    split: [{cluster: ordrs, weight: 90}, {cluster: orders, weight: 10}]
    timeout: soon
clusters:
  - name: orders
    endpoints: [127.0.0.1:9001]
    lb: fastest
"""


def meshgate(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway", *args], capture_output=True, text=True, timeout=30, cwd=cwd)


def test_check_accepts_the_example_config() -> None:
    result = meshgate("check", "-c", str(EXAMPLE))
    assert (result.returncode, result.stdout, result.stderr) == (0, "ok\n", "")


@pytest.mark.skipif(not CONSOLE_SCRIPT.exists(), reason=f"console script not installed at {CONSOLE_SCRIPT}")
def test_console_script_is_the_same_command() -> None:
    result = subprocess.run(
        [str(CONSOLE_SCRIPT), "check", "-c", str(EXAMPLE)], capture_output=True, text=True, timeout=30
    )
    assert (result.returncode, result.stdout, result.stderr) == (0, "ok\n", "")


def test_check_lists_every_problem_as_path_colon_problem(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(BAD_CONFIG)
    result = meshgate("check", "-c", str(path))
    assert result.returncode == 1
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert all(PROBLEM_LINE.fullmatch(line) for line in lines), lines
    assert [line.split(": ", 1)[0] for line in lines] == [
        "routes[1].split[0].cluster",
        "routes[1].timeout",
        "clusters[0].lb",
    ]
    assert lines[0].startswith('routes[1].split[0].cluster: unknown cluster "ordrs"')
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("text", "path"),
    [
        ("service: [unclosed\n", "line 2, column 1"),  # not YAML: the location in the text is the path
        ("", "(document)"),
        ("- a list\n", "(document)"),
    ],
)
def test_check_rejects_undecodable_documents(tmp_path: Path, text: str, path: str) -> None:
    config = tmp_path / "gateway.yaml"
    config.write_text(text)
    result = meshgate("check", "-c", str(config))
    assert result.returncode == 1
    [line] = result.stderr.splitlines()
    assert PROBLEM_LINE.fullmatch(line), line
    assert line.startswith(f"{path}: ")
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("target", ["missing.yaml", "."])
def test_check_reports_an_unreadable_file(tmp_path: Path, target: str) -> None:
    path = tmp_path / target
    result = meshgate("check", "-c", str(path))
    assert result.returncode == 1
    assert re.fullmatch(rf"{re.escape(str(path))}: cannot read config file: .+\n", result.stderr), result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["frobnicate"],
        ["check"],
        ["check", "-c"],
        ["run"],
        ["run", "-c", str(EXAMPLE), "--workers", "0"],
        ["run", "-c", str(EXAMPLE), "--workers", "two"],
        ["check", "-c", str(EXAMPLE), "--unknown-flag"],
    ],
)
def test_usage_errors_exit_2(args: list[str]) -> None:
    result = meshgate(*args)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.startswith("usage: meshgate")
    assert "Traceback" not in result.stderr


def test_help_exits_0() -> None:
    result = meshgate("--help")
    assert result.returncode == 0
    for command in ("run", "check", "demo"):
        assert command in result.stdout
