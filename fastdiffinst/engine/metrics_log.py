"""``metrics.jsonl``: one JSON record per line, each with its ``"iter"`` (training records carry the
losses, ``lr``, ``images_per_s`` and ``train_s``; evaluation records an ``"eval"`` entry)."""

from __future__ import annotations

import json
from pathlib import Path


class MetricsLog:
    """Appends records to ``path``, reads them back, and drops those of a killed run's lost iterations."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def append(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def records(self) -> list[dict]:
        return [json.loads(line) for line in self.path.read_text().splitlines() if line]

    def trim_after(self, iteration: int) -> None:
        """Drops the records after ``iteration`` (written by a run that was killed after its last
        checkpoint, at ``iteration``, and that is now resumed from it)."""
        if not self.path.is_file():
            return
        kept = [line for line in self.path.read_text().splitlines() if line and json.loads(line)["iter"] <= iteration]
        self.path.write_text("".join(line + "\n" for line in kept))
