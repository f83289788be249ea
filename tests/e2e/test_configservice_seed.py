"""e2e: ``meshgate configservice --seed DIR`` stores the compose seed once, never over what was pushed since, and
refuses a bad seed before it listens."""

from __future__ import annotations

import gzip
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from tests.configservice_proc import ADMIN_TOKEN, ConfigService, config_service
from tests.procs import ROOT, free_port

pytestmark = pytest.mark.e2e

COMPOSE_SEED = ROOT / "compose" / "seed"
TOKEN = f"Bearer {ADMIN_TOKEN}"


def compose_seed(tmp_path: Path) -> Path:
    """compose/seed plus the shipped policy where compose mounts it (bundles/authz)."""
    seed = tmp_path / "seed"
    shutil.copytree(COMPOSE_SEED, seed)
    shutil.copytree(ROOT / "policy" / "rego", seed / "bundles" / "authz")
    return seed


def versions(service: ConfigService, name: str) -> list[dict[str, object]]:
    status, answer = service.call("GET", f"/v1/services/{name}/versions")
    assert status == 200, answer
    result: list[dict[str, object]] = answer["versions"]
    return result


def test_the_compose_seed_is_stored_once_and_never_over_a_later_push(tmp_path: Path) -> None:
    seed = compose_seed(tmp_path)
    with config_service(tmp_path / "data", extra_args=["--seed", str(seed)]) as service:
        for name in ("orders", "payments"):
            status, answer = service.call("GET", f"/v1/services/{name}/config")
            assert status == 200
            assert answer["version"] == 1
            assert [v["author"] for v in versions(service, name)] == ["seed"]
        status, answer = service.call("GET", "/v1/services/orders/config")
        assert answer["config"]["authz"]["shadow"]["bundle"] == "authz-next"
        for bundle, revision in (("authz", "meshgate-default-2"), ("authz-next", "candidate-1")):
            request = urllib.request.Request(f"{service.url}/v1/bundles/{bundle}", headers={"Authorization": TOKEN})
            with urllib.request.urlopen(request, timeout=10) as reply:
                assert reply.headers["X-Meshgate-Bundle-Revision"] == revision
                assert gzip.decompress(reply.read())  # the tarball itself

        pushed = dict(answer["config"], routes=answer["config"]["routes"][:1])
        assert service.push("orders", pushed) == 2
        service.restart()  # the seed is still there: it must not come back over version 2
        assert [v["version"] for v in versions(service, "orders")] == [1, 2]
        status, answer = service.call("GET", "/v1/services/orders/config")
        assert (answer["version"], len(answer["config"]["routes"])) == (2, 1)


@pytest.mark.parametrize(
    ("breakage", "message"),
    [
        (
            lambda seed: (seed / "services" / "orders.yaml").write_text(
                (seed / "services" / "orders.yaml").read_text().replace("timeout: 3s", "timeout: -3s")
            ),
            "services/orders.yaml: routes[1].timeout:",
        ),
        (
            lambda seed: (seed / "bundles" / "authz-next" / "candidate.rego").write_text("package x\nallow if {"),
            "candidate.rego",
        ),
        (lambda seed: (seed / "services" / "Bad Name.yaml").write_text("{}"), "'Bad Name' is not a service name"),
        (
            lambda seed: shutil.rmtree(seed / "bundles" / "authz-next"),
            "services/orders.yaml: authz.shadow.bundle: no bundle named 'authz-next'",
        ),
        (
            lambda seed: (seed / "bundles" / "gone.tar.gz").symlink_to(seed / "nowhere.tar.gz"),
            "bundles/gone.tar.gz: cannot read: No such file or directory",
        ),
        (
            lambda seed: shutil.copytree(seed / "bundles" / "authz-next", seed / "bundles" / "my bundle"),
            "'my bundle' is not a bundle name",
        ),
        (
            lambda seed: shutil.copy(seed / "services" / "orders.yaml", seed / "services" / "orders.json"),
            "services/orders.yaml: a second config for service 'orders'",
        ),
    ],
    ids=[
        "invalid-config",
        "invalid-rego",
        "bad-service-name",
        "missing-bundle",
        "unreadable-bundle",
        "bad-bundle-name",
        "two-configs-one-service",
    ],
)
def test_a_bad_seed_stops_the_service_with_the_file_and_the_problem(
    tmp_path: Path, breakage: object, message: str
) -> None:
    seed = compose_seed(tmp_path)
    assert callable(breakage)
    breakage(seed)
    tokens = tmp_path / "tokens.yaml"
    shutil.copy(ROOT / "compose" / "tokens.yaml", tokens)
    command = [sys.executable, "-m", "gateway", "configservice", "--data", str(tmp_path / "data")]
    command += ["--tokens", str(tokens), "--seed", str(seed), "--listen", f"127.0.0.1:{free_port()}"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    assert message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert_nothing_stored(tmp_path / "data")


def test_every_problem_of_a_bad_seed_is_listed_and_nothing_is_stored(tmp_path: Path) -> None:
    seed = compose_seed(tmp_path)
    orders = seed / "services" / "orders.yaml"
    orders.write_text(orders.read_text().replace("timeout: 3s", "timeout: -3s"))
    payments = seed / "services" / "payments.yaml"
    payments.write_text(payments.read_text().replace("lb: least_request", "lb: fastest"))
    tokens = tmp_path / "tokens.yaml"
    shutil.copy(ROOT / "compose" / "tokens.yaml", tokens)
    command = [sys.executable, "-m", "gateway", "configservice", "--data", str(tmp_path / "data")]
    command += ["--tokens", str(tokens), "--seed", str(seed), "--listen", f"127.0.0.1:{free_port()}"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    lines = result.stderr.splitlines()
    assert any(line.startswith(f"{orders}: routes[1].timeout:") for line in lines), lines
    assert any(line.startswith(f"{payments}: clusters[0].lb:") for line in lines), lines
    # The bundles were fine, but they were not stored either: a bad seed leaves the store as it was.
    assert_nothing_stored(tmp_path / "data")


def assert_nothing_stored(data: Path) -> None:
    """The config service on ``data``, started without a seed, has no bundle and no config."""
    with config_service(data) as service:
        for bundle in ("authz", "authz-next"):
            assert service.call("GET", f"/v1/bundles/{bundle}")[0] == 404
        for name in ("orders", "payments"):
            assert service.call("GET", f"/v1/services/{name}/config")[0] == 404
