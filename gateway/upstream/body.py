"""The client's request body, handed to one or more upstream attempts.

A body is streamed, never buffered whole, unless the route may retry it: then up to ``retry.max_replay_body``
bytes are kept so the same bytes can be sent again (Envoy's retry buffer). A larger body is streamed once; it can
still be re-sent after a connect failure as long as not one byte of it was read, since nothing reached any upstream.
``Expect: 100-continue`` is answered the first time the body is actually wanted, so a request refused before that
(401, 413, 429, ...) never sees 100 Continue and the client never sends the body.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
from aiohttp import http_exceptions

from gateway.context import RequestContext
from gateway.errors import BadRequest, GatewayError, PayloadTooLarge

__all__ = ["RequestBody"]

_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


class RequestBody:
    __slots__ = ("_buffer_tried", "_buffered", "_consumed", "_continued", "_ctx", "_limit", "_prefix")

    def __init__(self, ctx: RequestContext) -> None:
        self._ctx = ctx
        self._limit = ctx.serving.snapshot.limits.max_body_size
        self._buffered: bytes | None = None  # the whole body, when it fit the replay buffer
        self._prefix = b""  # bytes read while trying to buffer a body that turned out larger
        self._consumed = False  # a streamed body started flowing: it cannot be sent again
        self._continued = False
        self._buffer_tried = False

    @property
    def resendable(self) -> bool:
        return self._buffered is not None or not self._consumed

    async def buffer_up_to(self, replay_limit: int) -> None:
        """Keep the body for replay if it is at most ``replay_limit`` bytes; otherwise it will stream once.

        Only the first call reads: the same body serves a route's cluster and then its fallback cluster, and a
        second read would find the stream exhausted and take it for an empty body."""
        if self._buffer_tried:
            return
        self._buffer_tried = True
        request = self._ctx.request
        length = request.content_length
        if replay_limit <= 0 or (length is not None and length > replay_limit):
            return
        await self._continue()
        chunks: list[bytes] = []
        size = 0
        try:
            while size <= replay_limit:
                chunk = await request.content.readany()
                if not chunk:  # end of body: it fits
                    self._buffered = b"".join(chunks)
                    return
                size += len(chunk)
                self._check_limit(size)
                chunks.append(chunk)
        except (aiohttp.ClientPayloadError, http_exceptions.HttpProcessingError, ValueError) as exc:
            raise BadRequest(f"malformed request body: {exc}") from None
        self._prefix = b"".join(chunks)  # larger than the replay buffer: stream it, starting with what was read
        self._consumed = True

    def payload(self) -> bytes | AsyncIterator[bytes]:
        """What one attempt sends. Call only while ``resendable`` (or for the first attempt)."""
        if self._buffered is not None:
            return self._buffered
        return self._stream()

    async def _stream(self) -> AsyncIterator[bytes]:
        ctx = self._ctx
        request = ctx.request
        self._consumed = True
        await self._continue()
        received = len(self._prefix)
        try:
            if self._prefix:
                yield self._prefix
            async for chunk in request.content.iter_any():
                received += len(chunk)
                self._check_limit(received)
                yield chunk
        except GatewayError as error:
            # Raised inside aiohttp's body-writer task, which reports it only as a connection error: keep the real
            # cause for the reply.
            ctx.body_error = error
            raise
        except (aiohttp.ClientPayloadError, http_exceptions.HttpProcessingError, ValueError) as exc:
            ctx.body_error = BadRequest(f"malformed request body: {exc}")
            raise

    def _check_limit(self, received: int) -> None:
        if self._limit is not None and received > self._limit:
            raise PayloadTooLarge(f"request body exceeds the limit of {self._limit} bytes")

    async def _continue(self) -> None:
        if self._continued:
            return
        self._continued = True
        request = self._ctx.request
        if request.version >= (1, 1) and request.headers.get("Expect", "").lower() == "100-continue":
            await request.writer.write(_CONTINUE)
            request.writer.output_size = 0  # as aiohttp's own expect handler: the interim response is not the reply
