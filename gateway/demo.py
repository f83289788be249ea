"""``meshgate demo``: a local stack with embedded defaults, no Docker needed.

Starts two demo upstream instances (``examples/upstream.py`` on 127.0.0.1:9001 and :9002) and a gateway in front
of them running ``examples/gateway.yaml``, each as a real process, waits until the gateway is ready, prints what to
try, and stops everything on Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from gateway.config.errors import ConfigError
from gateway.config.sources.file import read_config

__all__ = ["run_demo"]

ROOT = Path(__file__).resolve().parent.parent
UPSTREAMS = (("a", 9001), ("b", 9002))


def run_demo(config: Path | None) -> int:
    config = config or ROOT / "examples" / "gateway.yaml"
    upstream_script = ROOT / "examples" / "upstream.py"
    try:
        snapshot = read_config(config)
    except ConfigError as error:
        print(str(error), file=sys.stderr)
        return 1
    if not upstream_script.exists():
        print(f"{upstream_script}: demo upstream not found (run from a meshgate checkout)", file=sys.stderr)
        return 1
    processes: list[subprocess.Popen[bytes]] = []

    def stop(_signum: int, _frame: object) -> None:
        raise KeyboardInterrupt  # SIGTERM stops the demo exactly like Ctrl-C

    # Installed before anything starts, so a SIGTERM at any point still reaches the cleanup below.
    signal.signal(signal.SIGTERM, stop)
    try:
        for name, port in UPSTREAMS:
            processes.append(
                subprocess.Popen([sys.executable, str(upstream_script), "--port", str(port), "--name", name])
            )
        log_path = Path(os.environ.get("MESHGATE_DEMO_LOG", "meshgate-demo.log"))
        with log_path.open("ab") as log_file:
            gateway = subprocess.Popen(
                [sys.executable, "-m", "gateway", "run", "-c", str(config)], stdout=log_file, stderr=subprocess.STDOUT
            )
        processes.append(gateway)
        admin = f"http://{snapshot.admin}"
        if not _wait_ready(f"{admin}/readyz", gateway, timeout=15.0):
            print(f"the gateway did not become ready; see {log_path}", file=sys.stderr)
            return 1
        listen = f"http://{snapshot.listen}"
        print(
            f"""meshgate demo is up: gateway {listen} (admin {admin}) -> upstreams 127.0.0.1:9001, 127.0.0.1:9002
gateway logs (JSON lines): {log_path}

Try:
  curl -i {listen}/api/v1/things          # proxied, rewritten to /v1/things; see x-request-id, x-upstream-instance
  curl -s {listen}/items/42 | python3 -m json.tool     # what the upstream received (x-forwarded-*, x-request-id)
  curl -s -X POST {listen}/checkout       # 90/10 split between clusters demo and demo-canary
  curl -s --path-as-is {listen}/api/v1/../../items/7   # normalized to /items/7 before routing
  curl -i {listen}/nowhere                # the gateway's own JSON reply: 404 route_not_found
  curl -s {admin}/status/upstreams        # endpoints and in-flight counts
  curl -s {admin}/config                  # the config being served
  curl -s {admin}/metrics | grep http_server_request_duration

Edit {config} and save: the gateway reloads it without dropping a request.
Ctrl-C stops everything."""
        )
        while all(p.poll() is None for p in processes):
            time.sleep(0.5)
        return 0
    except KeyboardInterrupt:
        return 0
    finally:
        for process in reversed(processes):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in processes:
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()


def _wait_ready(url: str, process: subprocess.Popen[bytes], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                if response.status == 200:
                    return True
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.2)
    return False
