"""The span batcher: batches, never blocks the caller, counts drops and failures, bounded flush and shutdown."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

import structlog.testing
from opentelemetry.trace import SpanKind

from telemetry.export import SpanBatcher
from telemetry.tracing import Span


def spans(n: int) -> list[Span]:
    return [Span(1, i + 1, 0, SpanKind.SERVER, sampled=True, recording=True) for i in range(n)]


def encode(batch: Sequence[Span]) -> bytes:
    return b",".join(str(span.span_id).encode() for span in batch)


class Sender:
    def __init__(self, *, accept: bool = True, gate: threading.Event | None = None) -> None:
        self.payloads: list[tuple[bytes, int]] = []
        self.accept = accept
        self.gate = gate
        self.closed = False

    def send(self, payload: bytes, count: int) -> bool:
        if self.gate is not None:
            self.gate.wait()
        self.payloads.append((payload, count))
        return self.accept

    def close(self) -> None:
        self.closed = True


def test_spans_are_sent_in_order_in_batches() -> None:
    sender = Sender()
    batcher = SpanBatcher(sender, encode, max_queue=1000, delay=0.01, batch=4)
    for span in spans(10):
        batcher.add(span)
    assert batcher.flush(5.0)
    assert [count for _, count in sender.payloads] == [4, 4, 2]
    assert b",".join(payload for payload, _ in sender.payloads) == b",".join(str(i).encode() for i in range(1, 11))
    assert (batcher.exported, batcher.dropped, batcher.failed) == (10, 0, 0)
    batcher.shutdown(1.0)
    assert sender.closed


def test_a_stuck_collector_drops_new_spans_and_never_blocks_the_caller() -> None:
    gate = threading.Event()
    sender = Sender(gate=gate)
    batcher = SpanBatcher(sender, encode, max_queue=5, delay=0.01, batch=5)
    started = time.monotonic()
    for span in spans(5):
        batcher.add(span)
    deadline = time.monotonic() + 5.0
    while batcher._queue and time.monotonic() < deadline:  # the thread took the batch and is stuck sending it
        time.sleep(0.01)
    for span in spans(8):
        batcher.add(span)
    assert time.monotonic() - started < 1.0
    assert batcher.dropped == 3  # 5 queued behind the stuck send, 3 refused
    assert not batcher.flush(0.1)  # bounded: the send is still stuck
    gate.set()
    assert batcher.flush(5.0)
    assert (batcher.exported, batcher.dropped, batcher.failed) == (10, 3, 0)


def test_refused_and_crashing_sends_are_counted_as_failed() -> None:
    sender = Sender(accept=False)
    batcher = SpanBatcher(sender, encode, max_queue=100, delay=0.01)
    for span in spans(3):
        batcher.add(span)
    assert batcher.flush(5.0)
    assert batcher.failed == 3

    def broken(batch: Sequence[Span]) -> bytes:
        raise ValueError("a bug in encoding")

    crashing = SpanBatcher(Sender(), broken, max_queue=100, delay=0.01)
    crashing.add(spans(1)[0])
    assert crashing.flush(5.0)
    assert crashing.failed == 1
    crashing.add(spans(1)[0])  # the thread survived
    assert crashing.flush(5.0)
    assert crashing.failed == 2


def test_shutdown_is_bounded_by_its_timeout_and_refuses_later_spans() -> None:
    gate = threading.Event()
    sender = Sender(gate=gate)
    batcher = SpanBatcher(sender, encode, max_queue=100, delay=0.01)
    batcher.add(spans(1)[0])
    started = time.monotonic()
    batcher.shutdown(0.3)
    assert time.monotonic() - started < 1.5
    assert sender.closed  # closed though still stuck sending: the exporters abort their retry waits on close
    batcher.add(spans(1)[0])
    assert batcher.dropped == 1
    gate.set()


def test_failing_and_recovering_export_is_logged_once_per_change() -> None:
    sender = Sender(accept=False)
    batcher = SpanBatcher(sender, encode, max_queue=100, delay=0.01, batch=1)
    with structlog.testing.capture_logs() as logs:
        for span in spans(3):  # three failed batches: one line
            batcher.add(span)
        assert batcher.flush(5.0)
        sender.accept = True
        for span in spans(2):  # two good batches: one line
            batcher.add(span)
        assert batcher.flush(5.0)
    assert [entry["event"] for entry in logs] == ["span_export_failing", "span_export_recovered"]
    batcher.shutdown(1.0)
