"""The demo's traffic generator: a steady mix of the requests the dashboards are about.

``python -m gateway.demo.traffic --orders URL --payments URL --idp URL [--rate 20] [--duration SECONDS]``

Each second it sends about ``--rate`` requests through the sidecars, drawn from a fixed mix:

- alice (every role) reads orders (``orders-read``; the orders app calls payments) and places some (``orders-write``,
  a charge through payments), reads payments directly (``payments-read``): one payments instance fails ~30% of its
  answers, so retries, outlier ejections and breakers have work;
- carol holds only ``orders.admin``: the enforced policy lets her read orders, the shadow candidate does not, so
  ``meshgate_authz_shadow_disagreements_total`` grows;
- bob holds no role (403 from the policy, with its reason); a request without a token and one with a malformed token
  (401 from authentication, by reason); a path no route matches (404);
- every tenth second, a burst of orders from alice that passes the ``orders-write`` rate limit (429).

Prints one line of status counts every ten seconds. Stops on SIGTERM/SIGINT (exit 0) or after ``--duration``.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import random
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

import aiohttp

__all__ = ["Call", "main", "mix"]

ROLES = {
    "alice": "orders.read,orders.write,payments.read,payments.charge",
    "carol": "orders.admin",
    "bob": "",
}
TOKEN_REFRESH = 1800.0  # seconds; the demo IdP's tokens are valid for 3600
BURST = 15  # orders-write allows 5/s with a burst of 10: fifteen at once are sure to see 429s


@dataclass(frozen=True, slots=True)
class Call:
    """One request of the mix: which sidecar, method, path, who (a user, ``None``: no token, ``"garbage"``)."""

    sidecar: str  # "orders" | "payments"
    method: str
    path: str
    user: str | None
    weight: int


def mix() -> list[Call]:
    return [
        Call("orders", "GET", "/orders", "alice", 20),
        Call("orders", "GET", "/orders/1", "alice", 15),
        Call("orders", "POST", "/orders", "alice", 5),
        Call("payments", "GET", "/payments/p-7", "alice", 20),
        Call("orders", "GET", "/orders/2", "carol", 10),
        Call("orders", "GET", "/orders", "bob", 8),
        Call("orders", "GET", "/orders", None, 5),
        Call("payments", "GET", "/payments/p-9", "garbage", 3),
        Call("orders", "GET", "/healthz", None, 3),
        Call("orders", "GET", "/nowhere", "alice", 2),
    ]


async def run(urls: dict[str, str], idp: str, rate: float, duration: float | None) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    timeout = aiohttp.ClientTimeout(total=10)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        try:
            tokens = await _tokens(session, idp)
        except (aiohttp.ClientError, TimeoutError) as error:
            print(f"traffic: cannot get tokens from {idp}: {error}", file=sys.stderr, flush=True)
            return 1
        tokens["garbage"] = "not.a.jwt"
        calls = mix()
        weights = [call.weight for call in calls]
        counts: collections.Counter[str] = collections.Counter()
        rng = random.Random()
        started = last_report = time.monotonic()
        in_flight: set[asyncio.Task[None]] = set()
        second = 0
        fetched = started
        while not stop.is_set() and (duration is None or time.monotonic() - started < duration):
            if time.monotonic() - fetched > TOKEN_REFRESH:
                # The IdP's tokens live an hour: fetched again well before, or every request would become a 401.
                try:
                    tokens.update(await _tokens(session, idp))
                    fetched = time.monotonic()
                except (aiohttp.ClientError, TimeoutError) as error:
                    print(f"traffic: cannot refresh tokens from {idp}: {error}", file=sys.stderr, flush=True)
                    fetched += 60.0  # try again in a minute, with the old tokens meanwhile
            batch = rng.choices(calls, weights, k=max(1, round(rate)))
            if second % 10 == 9:
                batch += [Call("orders", "POST", "/orders", "alice", 0)] * BURST
            for call in batch:
                task = asyncio.create_task(_send(session, urls, tokens, call, counts))
                in_flight.add(task)
                task.add_done_callback(in_flight.discard)
            second += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 1.0)
            if time.monotonic() - last_report >= 10:
                last_report = time.monotonic()
                print("traffic: " + " ".join(f"{k}={v}" for k, v in sorted(counts.items())), flush=True)
        if in_flight:
            await asyncio.wait(in_flight, timeout=10)
    print("traffic: stopped " + " ".join(f"{k}={v}" for k, v in sorted(counts.items())), flush=True)
    return 0


async def _tokens(session: aiohttp.ClientSession, idp: str) -> dict[str, str]:
    tokens: dict[str, str] = {}
    for user, roles in ROLES.items():
        async with session.get(f"{idp}/token", params={"sub": user, "roles": roles}) as response:
            response.raise_for_status()
            tokens[user] = (await response.text()).strip()
    return tokens


async def _send(
    session: aiohttp.ClientSession,
    urls: dict[str, str],
    tokens: dict[str, str],
    call: Call,
    counts: collections.Counter[str],
) -> None:
    headers = {"authorization": f"Bearer {tokens[call.user]}"} if call.user else {}
    body = {"item": "coffee", "amount": 3.5} if call.method == "POST" else None
    try:
        async with session.request(call.method, urls[call.sidecar] + call.path, headers=headers, json=body) as answer:
            await answer.read()
            counts[str(answer.status)] += 1
    except (aiohttp.ClientError, TimeoutError):
        counts["error"] += 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m gateway.demo.traffic", description="Send the demo's request mix through the sidecars."
    )
    parser.add_argument("--orders", default="http://127.0.0.1:8081", help="the orders sidecar")
    parser.add_argument("--payments", default="http://127.0.0.1:8082", help="the payments sidecar")
    parser.add_argument("--idp", default="http://127.0.0.1:7777", help="the demo IdP (tokens)")
    parser.add_argument("--rate", type=float, default=20.0, help="requests per second (default 20)")
    parser.add_argument("--duration", type=float, default=None, help="stop after this many seconds")
    args = parser.parse_args(argv)
    urls = {"orders": args.orders.rstrip("/"), "payments": args.payments.rstrip("/")}
    return asyncio.run(run(urls, args.idp.rstrip("/"), args.rate, args.duration))


if __name__ == "__main__":
    sys.exit(main())
