"""Push-to-applied: how long from a config ``PUT`` to every gateway serving the new version.

Run from the repository root::

    python bench/configservice_push.py [--gateways 4] [--pushes 50] [--store sqlite|etcd] [--out bench/out]

Starts a config service (SQLite in a temp dir, or etcd when ``--store etcd``: a temp ``etcd`` process), one demo
upstream and N gateways whose bootstrap names the service, all on 127.0.0.1. Each push changes one route's
rewrite prefix, so it is a real new version; the clock starts before the ``PUT`` and stops when every gateway's
admin ``/readyz`` reports that version (polled every 2 ms per gateway, which is the measurement's resolution).
Prints p50/p90/p99/max and writes ``<out>/configservice_push.json``. Load: none besides the polls; this measures
propagation (long-poll wake-up, compile, swap), not throughput.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import urllib.request
from contextlib import ExitStack
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.configservice_proc import GATEWAY_TOKEN, config_service  # noqa: E402
from tests.procs import gateway, upstream  # noqa: E402


def pushed(port: int, n: int) -> dict[str, Any]:
    return {
        "routes": [{"name": "r", "match": {"path_prefix": "/"}, "cluster": "a", "rewrite": {"prefix": f"/v{n}/"}}],
        "clusters": [{"name": "a", "endpoints": [f"127.0.0.1:{port}"]}],
    }


def version_of(admin_url: str) -> int:
    with urllib.request.urlopen(f"{admin_url}/readyz", timeout=2) as response:
        return int(json.loads(response.read())["version"])


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gateways", type=int, default=4)
    parser.add_argument("--pushes", type=int, default=50)
    parser.add_argument("--store", choices=("sqlite", "etcd"), default="sqlite")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="meshgate-push-"))
    with ExitStack() as stack:
        extra: list[str] = []
        if args.store == "etcd":
            from tests.etcd_proc import etcd_server

            etcd = stack.enter_context(etcd_server())
            extra = ["--store", "etcd", "--etcd-endpoints", etcd.endpoint]
        service = stack.enter_context(config_service(tmp / "cs", extra_args=extra))
        port = stack.enter_context(upstream("a"))
        service.push("bench", pushed(port, 0))
        token = tmp / "gw.token"
        token.write_text(GATEWAY_TOKEN)
        admins = []
        for i in range(args.gateways):
            directory = tmp / f"gw{i}"
            directory.mkdir()
            boot = {
                "service": "bench",
                "config_service": {"url": service.url, "token_file": str(token), "cache_dir": str(directory / "c")},
            }
            admins.append(stack.enter_context(gateway(directory, boot)).admin_url)
        samples: list[float] = []
        for n in range(1, args.pushes + 1):
            started = time.perf_counter()
            version = service.push("bench", pushed(port, n))
            pending = set(admins)
            while pending:
                pending = {admin for admin in pending if version_of(admin) < version}
                if pending:
                    time.sleep(0.002)
            samples.append((time.perf_counter() - started) * 1000)
            time.sleep(0.05)
    summary = {
        "store": args.store,
        "gateways": args.gateways,
        "pushes": args.pushes,
        "ms": {
            "p50": round(statistics.median(samples), 1),
            "p90": round(percentile(samples, 0.90), 1),
            "p99": round(percentile(samples, 0.99), 1),
            "max": round(max(samples), 1),
            "min": round(min(samples), 1),
        },
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "configservice_push.json").write_text(json.dumps({**summary, "samples_ms": samples}, indent=2))
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
