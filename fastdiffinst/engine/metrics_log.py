"""``metrics.jsonl``: one JSON record per line, each with its ``"iter"`` (training records carry the
losses, ``lr``, ``images_per_s`` and ``train_s``; evaluation records an ``"eval"`` entry)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from fastdiffinst.checkpoint import TEMPORARY_PREFIX


class MetricsLog:
    """Appends records to ``path``, reads them back, and drops those of a killed run's lost iterations."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def append(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def records(self) -> list[dict]:
        return [record for line in self._lines() if (record := _parse(line)) is not None]

    def _lines(self) -> list[str]:
        return self.path.read_text().splitlines() if self.path.is_file() else []

    def trim_after(self, iteration: int) -> None:
        """Drops the records after ``iteration`` (written by a run that was killed after its last
        checkpoint, at ``iteration``, and that is now resumed from it) and a line torn by the kill;
        the file is replaced atomically, so a second kill loses nothing."""
        if not self.path.is_file():
            return
        kept = [line for line in self._lines() if (record := _parse(line)) is not None and record["iter"] <= iteration]
        temporary = self.path.with_name(f"{TEMPORARY_PREFIX}{self.path.name}")
        temporary.write_text("".join(line + "\n" for line in kept))
        os.replace(temporary, self.path)


def _parse(line: str) -> dict | None:
    """A record, or None for an empty line or one a kill cut short."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    return record if isinstance(record, dict) and "iter" in record else None
