"""The log writer: the caller never blocks on a stuck stdout, lines keep their order, drops are counted and announced,
and shutdown is bounded however stuck the fd is."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import select
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from telemetry import log_writer
from telemetry.log_writer import LogWriter, iso_utc

TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z")


class Pipe:
    """A pipe with a small kernel buffer whose reader the test pauses (by not calling ``read``) and resumes."""

    def __init__(self) -> None:
        self.read_fd, self.write_fd = os.pipe()
        fcntl.fcntl(self.write_fd, fcntl.F_SETPIPE_SZ, 4096)  # fills after a few lines: stalls come quickly
        os.set_blocking(self.read_fd, False)
        self.data = bytearray()

    def read(self, until: str | None = None, timeout: float = 5.0) -> list[str]:
        """Read what is there (or, with ``until``, until that text has arrived); the complete lines so far."""
        deadline = time.monotonic() + timeout
        while True:
            readable, _, _ = select.select([self.read_fd], [], [], 0.02)
            if readable:
                with contextlib.suppress(BlockingIOError):
                    chunk = os.read(self.read_fd, 1 << 16)
                    if not chunk:
                        break
                    self.data += chunk
                    continue
            if until is None or until.encode() in self.data or time.monotonic() > deadline:
                break
        text = self.data.decode()
        return text.split("\n")[:-1] if "\n" in text else []

    def close(self) -> None:
        for fd in (self.read_fd, self.write_fd):
            with contextlib.suppress(OSError):
                os.close(fd)


@pytest.fixture
def pipe() -> Iterator[Pipe]:
    p = Pipe()
    yield p
    p.close()


@contextlib.contextmanager
def writer_on(fd: int, **kwargs: Any) -> Iterator[LogWriter]:
    writer = LogWriter(fd, **kwargs)
    try:
        yield writer
    finally:
        writer.close(0.5)


def line(i: int, pad: int = 100) -> str:
    return json.dumps({"event": "request", "n": i, "pad": "x" * pad})


def test_lines_arrive_in_order(pipe: Pipe) -> None:
    with writer_on(pipe.write_fd) as writer:
        for i in range(500):
            (writer.write if i % 7 == 0 else writer.write_batched)(line(i))
        reader = threading.Thread(target=pipe.read, kwargs={"until": '"n": 499,'})
        reader.start()
        assert writer.flush(5.0)
        reader.join()
    assert [json.loads(text)["n"] for text in pipe.read()] == list(range(500))
    assert writer.dropped == 0


def test_a_stuck_reader_never_blocks_the_caller_and_drops_are_announced_once_it_resumes(pipe: Pipe) -> None:
    count = 2000  # ~230 KB: far more than the 4 KiB pipe plus the 16 KiB queue
    with writer_on(pipe.write_fd, capacity=16 * 1024, service="shop") as writer:
        for i in range(40):  # ~4.6 KB: the thread fills the pipe and blocks in os.write
            writer.write(line(i))
        deadline = time.monotonic() + 2.0
        while writer.queued_bytes == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.1)
        assert writer.queued_bytes > 0  # stuck: the rest of its batch cannot go out

        slowest = 0.0
        started = time.perf_counter()
        for i in range(40, count):
            before = time.perf_counter()
            writer.write(line(i))
            slowest = max(slowest, time.perf_counter() - before)
        elapsed = time.perf_counter() - started
        assert slowest < 0.2, slowest  # an append, never a wait for the pipe (which would be forever)
        assert elapsed < 2.0, elapsed
        dropped = writer.dropped
        assert 0 < dropped < count
        assert writer.queued_bytes <= 16 * 1024  # the bound holds, in-flight batch included

        lines = pipe.read(until="log_lines_dropped")  # the reader resumes
        records = [json.loads(text) for text in lines]
    summary = records[-1]  # after every line accepted before the gap
    assert summary["event"] == "log_lines_dropped"
    assert summary["count"] == summary["dropped_total"] == dropped
    assert (summary["level"], summary["service"], summary["logger"]) == ("warning", "shop", "meshgate.log")
    assert TIMESTAMP.fullmatch(summary["timestamp"])
    kept = [r["n"] for r in records[:-1]]
    assert kept == list(range(len(kept)))  # in order, and the gap is the tail: the lines written while full
    assert len(kept) + dropped == count  # every line is either written or accounted for


def test_writing_goes_on_after_drops(pipe: Pipe) -> None:
    with writer_on(pipe.write_fd, capacity=8 * 1024) as writer:
        for i in range(1000):
            writer.write_batched(line(i))
        assert writer.dropped > 0
        pipe.read(until="log_lines_dropped")
        writer.write("after")
        lines = pipe.read(until="after\n")
    assert lines[-1] == "after"


def test_close_returns_in_time_with_a_blocked_pipe(pipe: Pipe) -> None:
    writer = LogWriter(pipe.write_fd, capacity=1 << 20)
    for i in range(1000):
        writer.write(line(i))
    started = time.monotonic()
    assert not writer.flush(0.2)
    assert not writer.close(0.3)
    assert time.monotonic() - started < 1.0
    assert writer.closed
    writer.write("late")  # after close: dropped and counted, never raised
    assert writer.dropped == 1
    # The reader resumes: what was queued still goes out, then the thread ends (before the fixture closes the fds:
    # a thread still writing would write into whatever pipe reuses the fd number).
    reader = threading.Thread(target=pipe.read, kwargs={"until": '"n": 999,'})
    reader.start()
    assert writer.close(5.0)
    reader.join()
    records = [json.loads(text) for text in pipe.read()]
    assert [r["n"] for r in records[:-1]] == list(range(1000))
    assert (records[-1]["event"], records[-1]["count"]) == ("log_lines_dropped", 1)  # the late line, announced


def test_close_drains_what_it_can(pipe: Pipe) -> None:
    writer = LogWriter(pipe.write_fd)
    writer.write_batched("one")
    writer.write_batched("two")
    assert writer.close(2.0)
    assert writer.queued_bytes == 0
    assert pipe.read() == ["one", "two"]
    assert writer.close(0.1)  # idempotent


def test_write_wakes_the_thread_write_batched_waits_for_the_interval(pipe: Pipe) -> None:
    with writer_on(pipe.write_fd, interval=30.0) as writer:
        time.sleep(0.05)  # the thread is in its (long) wait
        writer.write_batched("batched")
        time.sleep(0.2)
        assert pipe.read() == []  # not yet: the access log is written in rounds
        writer.write("prompt")  # takes the batched line along, in order
        assert pipe.read(until="prompt\n", timeout=2.0) == ["batched", "prompt"]
        writer.write_batched("nudged")
        writer.wake()  # what AccessLog.flush does
        assert pipe.read(until="nudged\n", timeout=2.0)[-1] == "nudged"


def test_a_non_blocking_fd_is_written_all_the_same(pipe: Pipe) -> None:
    os.set_blocking(pipe.write_fd, False)  # e.g. a parent set O_NONBLOCK on the stdout it shares
    with writer_on(pipe.write_fd) as writer:
        for i in range(300):  # ~35 KB through a 4 KiB pipe: the writer sees EAGAIN and waits
            writer.write_batched(line(i))
        lines = pipe.read(until='"n": 299,')
    assert [json.loads(text)["n"] for text in lines] == list(range(300))
    assert writer.dropped == 0


def test_a_failed_fd_counts_drops_instead_of_raising(pipe: Pipe) -> None:
    os.close(pipe.read_fd)  # every write now fails with EPIPE
    with writer_on(pipe.write_fd) as writer:
        writer.write("a")
        writer.write("b")
        assert writer.flush(2.0)  # given up on counts as done: flush does not wait for the impossible
        assert writer.dropped == 2


def test_lines_from_many_threads_stay_whole(pipe: Pipe) -> None:
    reader = threading.Thread(target=pipe.read, kwargs={"until": "end\n", "timeout": 10.0})
    reader.start()
    with writer_on(pipe.write_fd, capacity=64 << 20) as writer:

        def produce(t: int) -> None:
            for i in range(200):  # lines up to ~5 KB: some longer than a pipe's atomic write
                writer.write_batched(json.dumps({"t": t, "n": i, "pad": "y" * (i * 37 % 5000)}))

        threads = [threading.Thread(target=produce, args=(t,)) for t in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        writer.write("end")
        reader.join()
    lines = pipe.read()
    assert lines[-1] == "end"
    records = [json.loads(text) for text in lines[:-1]]  # a torn line would fail to parse
    for t in range(4):
        assert [r["n"] for r in records if r["t"] == t] == list(range(200))  # each producer's order kept


def test_capacity_must_be_positive() -> None:
    with pytest.raises(ValueError, match="capacity must be positive, got 0"):
        LogWriter(1, capacity=0)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, log_writer.DEFAULT_CAPACITY),
        ("", log_writer.DEFAULT_CAPACITY),
        ("65536", 65536),
        ("lots", log_writer.DEFAULT_CAPACITY),
        ("-1", log_writer.DEFAULT_CAPACITY),
    ],
    ids=["unset", "empty", "bytes", "not-a-number", "negative"],
)
def test_capacity_from_the_environment(monkeypatch: pytest.MonkeyPatch, value: str | None, expected: int) -> None:
    if value is None:
        monkeypatch.delenv(log_writer.QUEUE_BYTES_ENV, raising=False)
    else:
        monkeypatch.setenv(log_writer.QUEUE_BYTES_ENV, value)
    assert log_writer._capacity_from_env() == expected


@pytest.mark.parametrize(
    ("now", "expected"),
    [
        (0.5, "1970-01-01T00:00:00.500000Z"),
        (0.75, "1970-01-01T00:00:00.750000Z"),  # same second: the cached text
        (86_401.5, "1970-01-02T00:00:01.500000Z"),
        (1_700_000_000.25, "2023-11-14T22:13:20.250000Z"),
    ],
)
def test_iso_utc(now: float, expected: str) -> None:
    assert iso_utc(now) == expected
