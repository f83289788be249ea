"""e2e: ``meshgate demo`` brings up the compose topology as processes, shows what it promises, and stops cleanly."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import urllib.parse
from pathlib import Path

import pytest

from gateway.demo.topology import PORTS
from tests.demo_proc import demo_stack, http, port_in_use
from tests.procs import ROOT, metric_sum, wait_until

pytestmark = pytest.mark.e2e

ORDERS, PAYMENTS = "http://127.0.0.1:8081", "http://127.0.0.1:8082"
ALICE_ROLES = "orders.read,orders.write,payments.read,payments.charge"


def test_demo_runs_the_topology_and_stops_everything(tmp_path: Path) -> None:
    with demo_stack(tmp_path, "--no-prometheus") as demo:
        banner = demo.text()
        # The banner shows a real denial, made at start-up, with its decision id, reason and trace.
        assert "Just now, bob was denied: HTTP 403 decision_id=" in banner
        assert "reason: one of roles orders.read, orders.admin required for GET on route orders-read" in banner

        alice = demo.token("alice", ALICE_ROLES)
        status, headers, body = http(f"{ORDERS}/orders/1", alice)
        assert status == 200, body
        assert headers["x-decision-id"]
        # orders called payments through the payments sidecar, passing alice's token on.
        assert json.loads(body)["payment_status"] == 200

        status, headers, body = http(f"{ORDERS}/orders", demo.token("bob"))
        denial = json.loads(body)
        assert status == 403
        assert denial["error"] == "forbidden"
        assert denial["message"] == "one of roles orders.read, orders.admin required for GET on route orders-read"
        assert denial["decision_id"] == headers["x-decision-id"]

        status, headers, _ = http(f"{ORDERS}/orders")
        assert status == 401
        assert headers["www-authenticate"].startswith("Bearer")

        # carol's orders.admin is enough for the enforced policy, not for the shadow candidate: counted, not enforced.
        assert http(f"{ORDERS}/orders/2", demo.token("carol", "orders.admin"))[0] == 200

        # payments-b fails 30% of its answers, at random; retries on the other instance hide that from callers.
        answers = [http(f"{PAYMENTS}/payments/p-{n}", alice)[0] for n in range(40)]
        assert answers.count(200) >= 38, answers
        for n in range(200):  # until a failure was retried: with 40 requests, none is in about 1 run of 1,000
            payments_metrics = http("http://127.0.0.1:9912/metrics")[2].decode()
            if metric_sum(payments_metrics, "meshgate_upstream_retries_total", upstream="payments") >= 1:
                break
            http(f"{PAYMENTS}/payments/q-{n}", alice)

        # Each sidecar serves the config the config service was seeded with, from compose/seed.
        for admin in ("http://127.0.0.1:9911", "http://127.0.0.1:9912"):
            ready = json.loads(http(f"{admin}/readyz")[2])
            assert (ready["source"], ready["version"]) == ("config_service", 1)

        orders_metrics = http("http://127.0.0.1:9911/metrics")[2].decode()
        assert metric_sum(orders_metrics, "meshgate_authz_shadow_disagreements_total", http_route="orders-read") >= 1
        assert metric_sum(orders_metrics, "meshgate_authz_denials_total", http_route="orders-read") >= 2
        assert metric_sum(payments_metrics, "meshgate_upstream_retries_total", upstream="payments") >= 1
        assert metric_sum(payments_metrics, "meshgate_authz_bundle_info", revision="meshgate-default-2") == 1

        # The decision id leads to the access-log line and the decision-log line, which share the trace id.
        def logged() -> bool:
            lines = [r for r in demo.log("orders-sidecar") if r.get("decision_id") == denial["decision_id"]]
            return {r["event"] for r in lines} >= {"request", "decision"}

        wait_until(logged, timeout=10, interval=0.05, what="the denial's log lines")
        lines = [r for r in demo.log("orders-sidecar") if r.get("decision_id") == denial["decision_id"]]
        assert {r["trace_id"] for r in lines} == {denial["trace_id"]}

        if demo.runs("gateway.demo.traces"):
            # The trace of the denial, by id and by decision id, from the demo's Jaeger API stand-in.
            trace_id = denial["trace_id"]

            def stored() -> bool:
                return http(f"http://127.0.0.1:16686/api/traces/{trace_id}")[0] == 200

            wait_until(stored, timeout=15, interval=0.05, what="the denial's trace")
            tags = json.dumps({"meshgate.authz.decision_id": denial["decision_id"]})
            query = urllib.parse.urlencode({"service": "orders", "tags": tags})
            found = json.loads(http(f"http://127.0.0.1:16686/api/traces?{query}")[2])
            assert [trace["traceID"] for trace in found["data"]] == [trace_id]

        started = dict(demo.started)
        assert len(started) >= 8  # idp, config service, three apps, two sidecars, (redis, traces)
        demo.process.send_signal(signal.SIGTERM)
        assert demo.process.wait(timeout=40) == 0
    gone = [pid for pid in started if Path(f"/proc/{pid}").exists() and _state(pid) != "Z"]
    assert gone == [], [started[pid] for pid in gone]
    assert not any(port_in_use(port) for port in PORTS.values())


def _state(pid: int) -> str:
    try:
        return (Path(f"/proc/{pid}") / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "Z"


def test_demo_names_the_ports_it_cannot_have_and_starts_nothing(tmp_path: Path) -> None:
    if port_in_use(7777):
        pytest.skip("127.0.0.1:7777 is in use here")
    with socket.socket() as holder:
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # the previous test's IdP may be in TIME_WAIT
        holder.bind(("127.0.0.1", 7777))
        holder.listen()
        result = subprocess.run(
            [sys.executable, "-m", "gateway", "demo", "--data", str(tmp_path / "demo")],
            capture_output=True,
            text=True,
            timeout=30,
            cwd=ROOT,
        )
    assert result.returncode == 1
    assert "ports in use: IdP 127.0.0.1:7777" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "demo" / "logs").exists()


def test_demo_with_an_unusable_data_directory_says_which_and_exits_1(tmp_path: Path) -> None:
    busy = [port for port in PORTS.values() if port_in_use(port)]
    if busy:
        pytest.skip(f"meshgate demo needs fixed ports, in use here: {busy}")
    not_a_directory = tmp_path / "file"
    not_a_directory.write_text("")
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "demo", "--data", str(not_a_directory)],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=ROOT,
    )
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr == f"meshgate demo: {not_a_directory}/logs: Not a directory\n"


@pytest.mark.parametrize(
    ("how", "exit_code"),
    [("ctrl-c", 0), ("terminal-closed", 0), ("kill-9", -signal.SIGKILL)],
)
def test_demo_leaves_nothing_running_however_it_is_stopped(tmp_path: Path, how: str, exit_code: int) -> None:
    with demo_stack(tmp_path, "--no-prometheus") as demo:
        started = dict(demo.started)
        assert len(started) >= 8
        if how == "ctrl-c":
            os.killpg(demo.process.pid, signal.SIGINT)  # what a terminal sends its foreground process group
        elif how == "terminal-closed":
            demo.process.send_signal(signal.SIGHUP)
        else:
            demo.process.kill()  # no clean-up runs: the children must go on their own (parent-death signal)
        assert demo.process.wait(timeout=60) == exit_code

        def all_gone() -> bool:
            return all(not Path(f"/proc/{pid}").exists() or _state(pid) == "Z" for pid in started)

        wait_until(all_gone, timeout=30, interval=0.05, what="every process the demo started to exit")
        wait_until(
            lambda: not any(port_in_use(port) for port in PORTS.values()),
            timeout=10,
            interval=0.05,
            what="the demo's ports to be free",
        )
