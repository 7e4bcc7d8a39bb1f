"""``log.txt``: what a training run did, one timestamped line per event (start, logged iterations
with ETA, evaluations with their AP tables, checkpoints, resumes, stops), appended across resumes
and echoed to the console — what a detectron2 user greps."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path


class RunLog:
    """Appends ``[YYYY-mm-dd HH:MM:SS] text`` lines to ``path`` and hands ``text`` to ``echo`` (the
    progress bar's ``write``, which keeps the bar intact, or a print)."""

    def __init__(self, path: Path, echo: Callable[[str], None]) -> None:
        self.path, self.echo = path, echo

    def line(self, text: str) -> None:
        """One event; a multi-line ``text`` (a table) is stamped on each line."""
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        with open(self.path, "a", encoding="utf-8") as f:
            f.writelines(f"[{stamp}] {part}\n" for part in text.splitlines())
        self.echo(text)


def format_duration(seconds: float) -> str:
    """``"1:02:03"`` (hours unbounded), ``"4:05"`` under an hour."""
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"
