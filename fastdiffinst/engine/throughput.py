"""Training throughput: images per second over the iterations since the last report, and the
wall-clock of the training iterations in total; logging, checkpoints and evaluations count in
neither."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator


class Throughput:
    """``add_iteration()`` after each step, ``paused()`` around what is not training, ``report()`` at
    each log line (inside a pause it measures up to the pause)."""

    def __init__(self, images_per_iteration: int) -> None:
        self.images_per_iteration = images_per_iteration
        self.train_seconds = 0.0  # every reported window together
        self._window_start, self._window_images = time.perf_counter(), 0
        self._paused_at: float | None = None

    def add_iteration(self) -> None:
        self._window_images += self.images_per_iteration

    def report(self) -> float:
        """Images per second since the last report (0 for an empty window); starts the next window."""
        now = time.perf_counter() if self._paused_at is None else self._paused_at
        elapsed = now - self._window_start
        self.train_seconds += elapsed
        rate = self._window_images / elapsed if elapsed > 0 else 0.0
        self._window_start, self._window_images = now, 0
        return rate

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """The time spent inside is left out of the current window."""
        self._paused_at = time.perf_counter()
        try:
            yield
        finally:
            self._window_start += time.perf_counter() - self._paused_at
            self._paused_at = None
