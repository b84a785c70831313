"""When a training run stops: SIGTERM/SIGINT (``StopSignals``: stop after the current iteration and save; a second
Ctrl-C interrupts) and the wall-clock budget (``TimeBudget``: stop while there is time left to save). The resume
checks live with the checkpoint (``Trainer.load``)."""
from __future__ import annotations

import logging
import signal
import threading
import time
from typing import Dict, Optional

log = logging.getLogger("cmfiou.train")


class StopSignals:
    """``install()`` SIGTERM/SIGINT handlers that record the signal (``signum``) instead of raising; ``restore()`` puts
    the previous handlers back. Only the main thread can install handlers; elsewhere both are no-ops."""

    def __init__(self):
        self.signum: Optional[int] = None
        self._old: Dict[int, object] = {}

    @property
    def received(self) -> bool:
        return self.signum is not None

    def _handler(self, signum, frame) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        log.warning("signal %d: stopping after this iteration and saving", signum)

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for s in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[s] = signal.signal(s, self._handler)
            except (ValueError, OSError):
                pass

    def restore(self) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)
        self._old = {}


class TimeBudget:
    """``max_minutes`` of wall-clock time from ``origin`` (``time.time()``); None = no budget."""

    def __init__(self, max_minutes: Optional[float], origin: float):
        self.seconds = None if max_minutes is None else float(max_minutes) * 60.0
        self.origin = origin

    def elapsed(self) -> float:
        return time.time() - self.origin

    def exhausted(self, iteration_s: float = 0.0, save_s: float = 0.0, extra: float = 0.0) -> bool:
        """Whether one more iteration (1.5x ``iteration_s``), a save (``save_s``) and ``extra`` seconds no longer
        fit in the budget."""
        if self.seconds is None:
            return False
        return self.elapsed() + 1.5 * iteration_s + save_s + extra >= self.seconds

    def fraction(self) -> float:
        """Elapsed share of the budget, at most 1 (0 without a budget)."""
        return 0.0 if self.seconds is None else min(self.elapsed() / self.seconds, 1.0)
