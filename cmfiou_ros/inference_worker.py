"""The detector node's inference worker: one thread, a one-frame slot, the newest frame wins.

``submit(job)`` puts a job in the slot (a job already waiting there is replaced and counted as dropped);
the thread takes jobs one at a time and calls ``process(*job)``. ``stop()`` clears the slot and joins the thread.
"""
from __future__ import annotations

import threading
import time
from typing import Callable, Optional

from cmfiou_core import memory
from cmfiou_ros import diagnostics as D


class InferenceWorker:
    def __init__(self, process: Callable[..., object], trim_period: Callable[[], int] = lambda: 0,
                 name: str = "cmfiou_inference"):
        self.process = process
        self.trim_period = trim_period  # read per frame: the parameter is dynamic
        self.name = name
        self.cond = threading.Condition(threading.Lock())
        self.slot: Optional[tuple] = None
        self.stopped = True
        self.thread: Optional[threading.Thread] = None
        self.dropped = 0  # jobs replaced in the slot before they ran
        self.dropped_since_taken = 0  # drops not yet reported by ``take_dropped``
        self.processed = 0  # jobs run (published or failed)
        self.malloc_trims = 0
        self.trim_ms = D.Stats()

    def start(self) -> None:
        self.stopped = False
        self.thread = threading.Thread(target=self._loop, name=self.name, daemon=True)
        self.thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        with self.cond:
            self.stopped = True
            self.slot = None
            self.cond.notify_all()
        if self.thread is not None and self.thread is not threading.current_thread():
            self.thread.join(timeout=timeout)
        self.thread = None

    def submit(self, job: tuple) -> None:
        with self.cond:
            if self.slot is not None:
                self.dropped += 1
                self.dropped_since_taken += 1
            self.slot = job
            self.cond.notify()

    def take_dropped(self) -> int:
        """Drops since the last call (for the per-frame timings message)."""
        with self.cond:
            n, self.dropped_since_taken = self.dropped_since_taken, 0
        return n

    def _loop(self) -> None:
        while True:
            with self.cond:
                while self.slot is None and not self.stopped:
                    self.cond.wait(0.5)
                if self.stopped:
                    return
                job, self.slot = self.slot, None
            self.process(*job)
            self.processed += 1
            self._maybe_trim()

    def _maybe_trim(self) -> None:
        """Return the C heap's free pages to the OS every ``trim_period()`` processed frames."""
        n = self.trim_period()
        if n <= 0 or self.processed % n:
            return
        t0 = time.perf_counter()
        memory.malloc_trim()
        self.trim_ms.add((time.perf_counter() - t0) * 1e3)
        self.malloc_trims += 1
