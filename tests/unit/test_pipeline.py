"""compose(): stages run outermost first, each may continue or reply, and the chain is built once."""

from __future__ import annotations

from typing import Any, cast

from aiohttp import web

from gateway.context import RequestContext
from gateway.pipeline import Handler, compose


class Recorder:
    def __init__(self, name: str, trail: list[str], reply: bool = False) -> None:
        self.name, self.trail, self.reply = name, trail, reply

    async def __call__(self, ctx: RequestContext, next: Handler) -> web.StreamResponse:
        self.trail.append(f"{self.name}:in")
        if self.reply:
            return web.Response(status=418)
        response = await next(ctx)
        self.trail.append(f"{self.name}:out")
        return response


def _ctx() -> RequestContext:
    return cast(RequestContext, object())


async def test_stages_run_in_order_around_terminal() -> None:
    trail: list[str] = []

    async def terminal(_: Any) -> web.StreamResponse:
        trail.append("terminal")
        return web.Response(status=200)

    handler = compose([Recorder("a", trail), Recorder("b", trail)], terminal)
    response = await handler(_ctx())
    assert response.status == 200
    assert trail == ["a:in", "b:in", "terminal", "b:out", "a:out"]


async def test_a_stage_can_reply_locally_and_stop_the_chain() -> None:
    trail: list[str] = []

    async def terminal(_: Any) -> web.StreamResponse:
        trail.append("terminal")
        return web.Response(status=200)

    handler = compose([Recorder("a", trail), Recorder("b", trail, reply=True), Recorder("c", trail)], terminal)
    response = await handler(_ctx())
    assert response.status == 418
    assert trail == ["a:in", "b:in", "a:out"]


async def test_empty_pipeline_is_the_terminal() -> None:
    async def terminal(_: Any) -> web.StreamResponse:
        return web.Response(status=204)

    assert (await compose([], terminal)(_ctx())).status == 204
