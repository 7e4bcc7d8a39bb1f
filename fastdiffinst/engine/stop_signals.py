"""SIGINT and SIGTERM as a request to stop: training saves a checkpoint at the end of the current
iteration and stops, instead of dying mid-step."""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Callable, Iterator

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def handle_stop_signals(handler: Callable[[int, object], None]) -> Iterator[None]:
    """``handler(signum, frame)`` receives SIGINT and SIGTERM inside the block; the previous
    handlers are restored on leaving it."""
    previous = {signum: signal.signal(signum, handler) for signum in STOP_SIGNALS}
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)
