"""Change events: a waiter taken before a read still sees a change that lands before it waits."""

from __future__ import annotations

import asyncio

from gateway.configservice.changes import Changes


async def test_waiter_sees_a_change_made_before_it_waits() -> None:
    changes = Changes()
    waiter = changes.waiter("k")
    changes.changed("k")
    assert await waiter.wait(0.01) is True
    assert await changes.waiter("k").wait(0.01) is False  # a fresh event for later waiters


async def test_one_change_wakes_every_waiter_of_its_key_only() -> None:
    changes = Changes()
    waits = [asyncio.ensure_future(changes.waiter("a").wait(5)) for _ in range(100)]
    other = asyncio.ensure_future(changes.waiter("b").wait(0.2))
    await asyncio.sleep(0)
    changes.changed("a")
    assert await asyncio.gather(*waits) == [True] * 100
    assert await other is False


async def test_close_wakes_everyone_now_and_later() -> None:
    changes = Changes()
    pending = asyncio.ensure_future(changes.waiter("a").wait(5))
    await asyncio.sleep(0)
    changes.close()
    assert await pending is True
    assert changes.closed
    assert await changes.waiter("a").wait(5) is True
