"""e2e: every command in README.md and docs/*.md runs as written (the convention: ``tests/docs_commands.py``).

One test per page: the page's ``$ `` commands run in order in one bash process, in a fresh directory with the
repository's ``examples/``, ``policy/`` and ``compose/``; server commands (``meshgate demo``, ``configservice``,
``run``) are started in the background, waited for and stopped at the end of the page. Any command that exits
non-zero fails the test with its page, line and output. A page whose servers need a fixed port that is taken here
is skipped, naming the port.

Two kinds of commands are listed by the runner as not runnable, and checked otherwise:

- ``docker compose ...``: there is no Docker engine where the tests run. tests/integration/test_compose_file.py and
  test_compose_configs.py check the compose file statically (mounts, ports, images, healthchecks, tokens, Prometheus
  targets, the OPA bundle path), both reading it through tests/compose_files.py; here each such command must name a
  compose file that exists, is the one those tests check, and has every ``--profile`` it asks for.
- ``./scripts/setup`` and ``./scripts/test`` (README): CI (``.ci/run``) runs exactly these two, so they are not run
  again from here.
"""

from __future__ import annotations

import re
import shlex
import shutil
import time
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from tests.demo_proc import port_in_use
from tests.docs_commands import ROOT, Command, commands, fenced_blocks, needed_ports, pages, run_page

# A page that starts the demo with traffic waits for it, runs a score of commands and stops it again: more than the
# suite's 120 s default on a loaded 2-core machine, and the runner's own report (page, line) should win the race.
pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

PAGES = pages()
PLACEHOLDER = re.compile(r"<[A-Za-z][\w .-]*>|\b(?:FILE|DIR|TRACE_ID|DECISION_ID)\b")


@pytest.mark.parametrize("page", PAGES, ids=[str(page.relative_to(ROOT)) for page in PAGES])
def test_page_commands_run(page: Path, tmp_path: Path) -> None:
    found = commands(page)
    runnable = [command for command in found if command.not_runnable is None]
    if not runnable:
        return  # reference pages whose blocks are all config, synopsis or output
    ports = needed_ports(found)
    busy = [port for port in ports if port_in_use(port)]
    if busy:
        pytest.skip(f"{page.name} needs fixed ports in use here: {', '.join(map(str, busy))}")
    if 9090 in ports and shutil.which("prometheus") is None:
        pytest.skip(f"{page.name} queries the demo's Prometheus: not installed (./scripts/setup installs it)")
    started = time.monotonic()
    result = run_page(page, tmp_path / "work", found)
    assert result.failure is None, result.failure
    assert len(result.ran) == len(runnable)
    print(f"{result.page}: {len(result.ran)} commands in {time.monotonic() - started:.1f}s")


def test_docker_commands_are_checked_statically() -> None:
    reader = (ROOT / "tests" / "compose_files.py").read_text()
    assert 'COMPOSE_FILE = COMPOSE_DIR / "docker-compose.yml"' in reader  # the file the compose tests read
    assert 'COMPOSE_DIR = ROOT / "compose"' in reader
    for test in ("test_compose_file.py", "test_compose_configs.py"):
        source = (ROOT / "tests" / "integration" / test).read_text()
        assert "from tests import compose_files as cf" in source, f"{test} does not read through tests/compose_files.py"
        assert "cf.compose()" in source or "cf.services()" in source, f"{test} does not read the compose file"
    docker = [command for page in PAGES for command in commands(page) if command.text.startswith("docker")]
    assert docker, "the docs show how to run the compose stack"
    for command in docker:
        assert command.not_runnable is not None
        words = shlex.split(command.text.replace("\\\n", " "), comments=True)
        assert words[:2] == ["docker", "compose"], f"{command.where}: only `docker compose` commands are documented"
        assert "-f" in words, f"{command.where}: name the compose file with -f"
        compose = ROOT / words[words.index("-f") + 1]
        assert compose == ROOT / "compose" / "docker-compose.yml", (
            f"{command.where}: not the file the compose tests check"
        )
        assert compose.is_file(), f"{command.where}: {compose} does not exist"
        services = yaml.safe_load(compose.read_text())["services"]
        for index, word in enumerate(words):
            if word == "--profile":
                profile = words[index + 1]
                assert any(profile in service.get("profiles", []) for service in services.values()), (
                    f"{command.where}: no service in {compose.name} has profile {profile!r}"
                )
            if word in ("restart", "stop", "logs", "exec", "up") and index + 1 < len(words):
                named = [w for w in words[index + 1 :] if not w.startswith("-") and w in services]
                unknown = [w for w in words[index + 1 :] if not w.startswith("-") and w not in services]
                assert not unknown or named or word == "exec", f"{command.where}: unknown services {unknown}"


def test_command_blocks_follow_the_convention() -> None:
    """Commands live in console blocks with `$ `; synopses (with [optional] parts) in text blocks; no sh blocks."""
    problems = []
    for page in PAGES:
        name = str(page.relative_to(ROOT))
        for info, first, lines in fenced_blocks(page.read_text(encoding="utf-8")):
            if info in ("sh", "bash", "shell", "shell-session"):
                problems.append(f"{name}:{first - 1}: a ```{info} block: use ```console with `$ ` lines")
            if info != "console":
                continue
            if not any(line.startswith("$ ") for line in lines):
                problems.append(f"{name}:{first - 1}: a console block without a `$ ` command")
        for command in commands(page):
            if " [-" in command.text or PLACEHOLDER.search(command.text.split("\n", 1)[0]):
                problems.append(f"{command.where}: a placeholder in a command: write it concretely or use ```text")
    assert not problems, "\n".join(problems)


def _anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped but ``-`` and ``_``, each space a ``-``."""
    anchors = set()
    in_block = False
    for line in page.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            in_block = not in_block
        elif not in_block and line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            anchors.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return anchors


def test_relative_links_and_pictures_resolve() -> None:
    """Every relative link, anchor and picture of the docs points at something that exists (the README shows the
    dashboards' PNGs, rendered by scripts/render_dashboards.py into docs/img/)."""
    problems = []
    for page in PAGES:
        text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.DOTALL)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):
                continue
            path, _, anchor = target.partition("#")
            resolved = (page.parent / path).resolve() if path else page
            if not resolved.exists():
                problems.append(f"{page.relative_to(ROOT)}: {target}: no such file")
            elif anchor and resolved.suffix == ".md" and anchor not in _anchors(resolved):
                problems.append(f"{page.relative_to(ROOT)}: {target}: no such heading")
    assert not problems, "\n".join(problems)


def test_the_runner_reads_the_convention(tmp_path: Path) -> None:
    """Continuations, here-documents, output lines, server and not-runnable commands, and a failure's report."""
    page = ROOT / "docs" / "_runner_probe.md"  # never written: commands() only needs a path under ROOT
    text = "\n".join(
        [
            "```console",
            "$ echo one \\",
            "    two",
            "one two",
            "$ cat > f.txt <<'EOF'",
            "$ not a command: inside the here-document",
            "EOF",
            "$ meshgate configservice --data ./d --listen 127.0.0.1:7001   # comment",
            "$ docker compose -f compose/docker-compose.yml up",
            "$ false",
            "```",
            "```text",
            "$ meshgate run -c FILE",
            "```",
        ]
    )
    found = _commands_of(text, page, tmp_path)
    assert [(c.line, c.text.count("\n")) for c in found] == [(2, 1), (5, 2), (8, 0), (9, 0), (10, 0)]
    assert found[2].server is not None
    assert found[2].server.url == "http://127.0.0.1:7001/healthz"
    assert found[2].server.ports == (7001,)
    assert found[3].not_runnable is not None
    assert found[0].server is None
    assert found[0].not_runnable is None

    plain = [found[0], found[1], found[4]]
    result = run_page(page, tmp_path / "work", plain)
    assert [c.line for c in result.ran] == [2, 5]
    assert (tmp_path / "work" / "f.txt").read_text() == "$ not a command: inside the here-document\n"
    assert result.failure is not None
    assert result.failure.startswith("docs/_runner_probe.md:10: exit status 1")


def _commands_of(text: str, page: Path, tmp_path: Path) -> list[Command]:
    source = tmp_path / "probe.md"
    source.write_text(text)
    return [replace(command, page=str(page.relative_to(ROOT))) for command in commands(source, root=tmp_path)]
