"""Bounded FIFO of admitted requests; hands the group one batch of compatible requests at a time.

Thread-safe: HTTP handlers ``submit`` from the server thread, the group loop on rank 0's main thread calls
``next_batch``. Each entry carries a ``concurrent.futures.Future`` the handler awaits.
"""
from __future__ import annotations

import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field

from .schemas import Job


class QueueFull(Exception):
    def __init__(self, retry_after_s: int):
        super().__init__(f"the queue is full; retry after {retry_after_s} s")
        self.retry_after_s = retry_after_s


class NotAccepting(Exception):
    """The server is draining or a rank failed: 503."""


@dataclass
class Entry:
    job: Job
    future: Future = field(default_factory=Future)
    enqueued: float = field(default_factory=time.monotonic)
    started: float | None = None


class Scheduler:
    def __init__(self, max_queue: int, max_batch_images: int = 1, batch_wait_s: float = 0.0):
        if max_queue < 1 or max_batch_images < 1 or batch_wait_s < 0:
            raise ValueError("max_queue and max_batch_images must be >= 1, batch_wait_s >= 0")
        self.max_queue, self.max_batch_images, self.batch_wait_s = max_queue, max_batch_images, batch_wait_s
        self._q: deque[Entry] = deque()
        self._cv = threading.Condition()
        self._closed: str | None = None  # why new requests are refused
        self.in_flight = 0
        self._service_s = 1.0  # moving average of a batch's run time, for Retry-After

    # -- server side ----------------------------------------------------------------------------
    def submit(self, job: Job) -> Entry:
        with self._cv:
            if self._closed:
                raise NotAccepting(self._closed)
            if len(self._q) >= self.max_queue:
                raise QueueFull(max(1, round(self._service_s * (len(self._q) + self.in_flight))))
            e = Entry(job)
            self._q.append(e)
            self._cv.notify_all()
            return e

    def depth(self) -> int:
        with self._cv:
            return len(self._q)

    # -- group side -----------------------------------------------------------------------------
    def next_batch(self, timeout_s: float) -> list[Entry]:
        """Up to ``max_batch_images`` images of requests compatible with the oldest one ([] on timeout or close).

        The oldest request always runs first (FIFO); compatible later ones join it, in arrival order."""
        deadline = time.monotonic() + timeout_s
        with self._cv:
            while not self._q and not self._closed:
                left = deadline - time.monotonic()
                if left <= 0:
                    return []
                self._cv.wait(left)
            if not self._q:
                return []
            if self.max_batch_images > 1 and self.batch_wait_s > 0:
                # give concurrent clients a moment to join the batch (until it is full or the wait is over)
                until = time.monotonic() + self.batch_wait_s
                while not self._closed and self._compatible_images() < self.max_batch_images:
                    left = until - time.monotonic()
                    if left <= 0:
                        break
                    self._cv.wait(left)
                if not self._q:  # closed meanwhile: the queue was handed back to the caller of close()
                    return []
            head = self._q.popleft()
            batch, images = [head], head.job.n
            for e in list(self._q):
                if images >= self.max_batch_images:
                    break
                if e.job.batch_key() == head.job.batch_key() and images + e.job.n <= self.max_batch_images:
                    self._q.remove(e)
                    batch.append(e)
                    images += e.job.n
            now = time.monotonic()
            for e in batch:
                e.started = now
            self.in_flight = len(batch)
            return batch

    def _compatible_images(self) -> int:
        key = self._q[0].job.batch_key()
        return sum(e.job.n for e in self._q if e.job.batch_key() == key)

    def finished(self, seconds: float) -> None:
        with self._cv:
            self.in_flight = 0
            self._service_s = 0.8 * self._service_s + 0.2 * seconds

    def close(self, reason: str) -> list[Entry]:
        """Refuse new requests; returns the queued ones (the caller answers them)."""
        with self._cv:
            self._closed = self._closed or reason
            left = list(self._q)
            self._q.clear()
            self._cv.notify_all()
            return left

    @property
    def closed(self) -> str | None:
        return self._closed
