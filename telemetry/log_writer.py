"""The one place log lines leave the process: a bounded in-memory queue drained to stdout by a daemon thread.

Why: a blocking write to stdout on the event loop stalls every request when nobody reads the pipe (a stuck log
shipper, a full disk, a paused terminal). Here the event loop only appends a line to a queue; a daemon thread does
the blocking ``os.write`` calls, in batches. The queue is bounded in bytes: when it is full the line is dropped and
counted (``LogWriter.dropped``), and once the thread has written what was queued it writes one
``{"event": "log_lines_dropped", "count": N, ...}`` line, so the gap is visible in the log itself. Lines keep the
order in which they were accepted.

Both the access log (``telemetry.access_log``) and structlog (``telemetry.logging``) write through the one
process-wide writer (``default_writer``), so their lines never interleave mid-line and share one bound. Tests
inject their own writer over any file descriptor.
"""

from __future__ import annotations

import atexit
import json
import os
import select
import stat
import threading
import time

__all__ = [
    "CLOSE_TIMEOUT",
    "DEFAULT_CAPACITY",
    "DEFAULT_INTERVAL",
    "QUEUE_BYTES_ENV",
    "LogWriter",
    "default_writer",
    "iso_utc",
]

DEFAULT_CAPACITY = 4 * 1024 * 1024
# How stale a batched line (the access log) may get before the thread writes it; Envoy flushes its access log every
# 1 s. Lines written with ``write`` (everything but the access log) wake the thread at once instead.
DEFAULT_INTERVAL = 0.1
# At exit, the longest the process waits for queued lines to reach a stdout nobody reads.
CLOSE_TIMEOUT = 1.0
# Overrides DEFAULT_CAPACITY for the process-wide writer (bytes). The writer exists before any config is read, and
# the e2e tests use it to force drops.
QUEUE_BYTES_ENV = "MESHGATE_LOG_QUEUE_BYTES"

# A batch is handed to os.write in chunks of whole lines. On a pipe, chunks of at most PIPE_BUF bytes are written
# atomically, so lines of several worker processes sharing one stdout pipe never interleave mid-line.
_PIPE_CHUNK = select.PIPE_BUF
_OTHER_CHUNK = 256 * 1024
# While a write would block on a non-blocking fd, how often the thread looks again (and checks for close).
_POLL_SECONDS = 0.05


_second: tuple[int, str] = (-1, "")  # the last whole second formatted, and its text (replaced whole: thread-safe)


def iso_utc(now: float) -> str:
    """``now`` (epoch seconds) as ISO 8601 UTC with microseconds, the format of every line's ``timestamp``."""
    global _second
    seconds = int(now)
    cached, text = _second
    if cached != seconds:
        # strftime+gmtime were a quarter of an access-log line's cost; the text changes once a second.
        text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
        _second = (seconds, text)
    return f"{text}.{int((now - seconds) * 1e6):06d}Z"


class LogWriter:
    """Accept whole lines without blocking; write them to ``fd`` from a daemon thread.

    ``write``/``write_batched`` take one line without its newline (JSON lines never contain one) and never block
    on I/O: they take a lock held only for an append or a counter update. ``fd`` is not closed by the writer.
    """

    def __init__(
        self,
        fd: int = 1,
        *,
        capacity: int = DEFAULT_CAPACITY,
        interval: float = DEFAULT_INTERVAL,
        service: str = "meshgate",
    ) -> None:
        if capacity <= 0:
            raise ValueError(f"capacity must be positive, got {capacity}")
        self.service = service  # for the drop summary line; telemetry.logging.configure keeps it current
        self._fd = fd
        self._capacity = capacity
        self._interval = interval
        self._chunk = _chunk_size(fd)
        self._lock = threading.Lock()
        # Notified by the thread whenever bytes are written (or given up on): what flush() waits for.
        self._progress = threading.Condition(self._lock)
        self._wake = threading.Event()
        self._wake_pending = False  # a wake is already signalled: later lines skip Event.set (~1 µs)
        self._queue: list[bytes] = []
        # Bytes accepted and bytes written (or discarded after a write error), over the writer's life; their
        # difference is what is queued or being written, the quantity the capacity bounds.
        self._accepted = 0
        self._done = 0
        self._dropped = 0
        self._unreported = 0  # drops not yet announced by a log_lines_dropped line
        # ``_accepted`` at the first unannounced drop: the announcement waits until everything accepted before the
        # gap is written, so it follows those lines in the output (and comes at least once per round under a
        # sustained overload, where a "queue empty" condition might never hold).
        self._drop_mark = 0
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="meshgate-log-writer", daemon=True)
        self._thread.start()

    @property
    def dropped(self) -> int:
        """Lines dropped since start (queue full, written after close, or lost to a write error)."""
        return self._dropped

    @property
    def queued_bytes(self) -> int:
        """Bytes accepted but not yet written."""
        return self._accepted - self._done

    @property
    def closed(self) -> bool:
        return self._closed

    def write(self, line: str) -> None:
        """Queue one line and wake the thread: for the occasional line that should show up at once."""
        if self._put(line) and not self._wake_pending:
            self._wake_pending = True
            self._wake.set()

    def write_batched(self, line: str) -> None:
        """Queue one line for the thread's next round (within ``interval``): the per-request access log."""
        self._put(line)

    def wake(self) -> None:
        """Have the thread write what is queued now, without waiting for it."""
        self._wake_pending = True
        self._wake.set()

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every line accepted before the call is written, or ``timeout`` passes; True if all were."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            target = self._accepted
        self.wake()
        with self._progress:
            while self._done < target:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                if not self._thread.is_alive():
                    return False
                # Bounded waits: the thread may die without notifying (interpreter shutdown).
                self._progress.wait(_POLL_SECONDS if remaining is None else min(remaining, _POLL_SECONDS))
        return True

    def close(self, timeout: float = CLOSE_TIMEOUT) -> bool:
        """Write what can be written within ``timeout``, then stop; later lines are dropped (and counted).

        Never waits longer than ``timeout``, however stuck the fd: the thread is a daemon, and a write it is
        blocked in is abandoned with the process. True if everything queued was written. Idempotent.
        """
        deadline = time.monotonic() + timeout
        drained = self.flush(timeout)
        with self._lock:
            self._closed = True
        self.wake()
        self._thread.join(max(0.0, deadline - time.monotonic()))
        return drained and self.queued_bytes == 0

    # -- producer side -------------------------------------------------------------------------------------------

    def _put(self, line: str) -> bool:
        data = line.encode()
        size = len(data) + 1  # the newline added when the batch is joined
        with self._lock:
            if self._closed or self._accepted - self._done + size > self._capacity:
                self._count_drops(1)
                return False
            self._queue.append(data)
            self._accepted += size
            return True

    # -- the thread ----------------------------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            self._wake.wait(self._interval)
            # Cleared before taking the batch: a line queued after the swap sets the event again, so the next
            # wait returns at once instead of leaving that line for a whole interval.
            self._wake.clear()
            self._wake_pending = False
            with self._lock:
                batch, self._queue = self._queue, []
                closing = self._closed
            if batch:
                self._write_batch(batch)
            self._report_drops()
            if closing:
                with self._lock:
                    if not self._queue:
                        return

    def _write_batch(self, batch: list[bytes]) -> None:
        start = 0
        while start < len(batch):
            end, size = start, 0
            # Whole lines up to the chunk size (at least one line, however long).
            while end < len(batch) and (end == start or size + len(batch[end]) + 1 <= self._chunk):
                size += len(batch[end]) + 1
                end += 1
            data = b"\n".join(batch[start:end]) + b"\n"
            if not self._write_all(data):
                with self._lock:
                    self._count_drops(end - start)
            with self._progress:
                self._done += size
                self._progress.notify_all()
            start = end

    def _write_all(self, data: bytes) -> bool:
        """Blocking write of all of ``data``; False if the fd failed (closed pipe, bad fd, disk full)."""
        view = memoryview(data)
        while view:
            try:
                written = os.write(self._fd, view)
            except BlockingIOError:
                # stdout may be non-blocking (shared with a parent that set O_NONBLOCK): wait until writable.
                select.select([], [self._fd], [], _POLL_SECONDS)
                continue
            except OSError:
                return False
            view = view[written:]
        return True

    def _count_drops(self, count: int) -> None:
        # Called with the lock held.
        if not self._unreported:
            self._drop_mark = self._accepted
        self._dropped += count
        self._unreported += count

    def _report_drops(self) -> None:
        with self._lock:
            if not self._unreported or self._done < self._drop_mark:
                return
            count, self._unreported = self._unreported, 0
            total = self._dropped
        line = json.dumps(
            {
                "event": "log_lines_dropped",
                "count": count,
                "dropped_total": total,
                "level": "warning",
                "logger": "meshgate.log",
                "service": self.service,
                "timestamp": iso_utc(time.time()),
            },
            separators=(",", ":"),
        ).encode()
        if not self._write_all(line + b"\n"):
            with self._lock:  # announced next time, together with whatever else is lost meanwhile
                self._count_drops(0)
                self._unreported += count


def _chunk_size(fd: int) -> int:
    try:
        is_pipe = stat.S_ISFIFO(os.fstat(fd).st_mode)
    except OSError:
        is_pipe = False
    return _PIPE_CHUNK if is_pipe else _OTHER_CHUNK


_default: LogWriter | None = None
_default_lock = threading.Lock()


def default_writer() -> LogWriter:
    """The process-wide writer to fd 1, started on first use and drained (bounded) at interpreter exit."""
    global _default
    writer = _default
    if writer is not None and not writer.closed:
        return writer
    with _default_lock:
        if _default is None or _default.closed:
            _default = LogWriter(1, capacity=_capacity_from_env())
            # After the event loop and its teardown have logged their last lines; daemon threads still run then.
            atexit.register(_default.close, CLOSE_TIMEOUT)
        return _default


def _capacity_from_env() -> int:
    # A bad value must not stop the gateway from starting (nor from logging): the default applies.
    try:
        capacity = int(os.environ.get(QUEUE_BYTES_ENV) or DEFAULT_CAPACITY)
    except ValueError:
        return DEFAULT_CAPACITY
    return capacity if capacity > 0 else DEFAULT_CAPACITY
