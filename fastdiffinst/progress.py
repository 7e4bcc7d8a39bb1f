"""The progress bar of training, evaluation and the benchmarks: a tqdm bar on stderr when tqdm is
installed (it is optional, requirements-extra.txt), else silent or, with ``count_without_tqdm``
(the benchmarks), a ``[done/total]`` line on stderr per update; :meth:`ProgressBar.write` lines go
to stderr either way. A disabled bar (training off rank 0 or with ``--no-progress``, evaluation
unless asked) shows nothing."""

from __future__ import annotations

import sys


class ProgressBar:
    """``ProgressBar(total, "train", "it", initial=start)``; a context manager that closes the bar.
    ``enabled=False`` shows nothing at all: no bar, no counts, no :meth:`write` lines."""

    def __init__(self, total: int, desc: str, unit: str, *, initial: int = 0, enabled: bool = True,
                 count_without_tqdm: bool = False) -> None:
        self._bar = None
        self._enabled = enabled
        self._done, self._total = initial, total
        self._count = enabled and count_without_tqdm
        if enabled:
            try:
                from tqdm import tqdm
            except ImportError:
                return
            self._bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, file=sys.stderr)
            self._count = False

    def update(self, n: int = 1) -> None:
        """Advances by ``n`` steps."""
        self._done += n
        if self._bar is not None:
            self._bar.update(n)
        elif self._count:
            print(f"[{self._done}/{self._total}]", file=sys.stderr)

    def set(self, position: int, text: str) -> None:
        """Moves to step ``position`` and shows ``text`` after the bar (tqdm only)."""
        self.update(position - self._done)
        if self._bar is not None:
            self._bar.set_postfix_str(text)

    def write(self, text: str) -> None:
        """A line of text that does not break the bar (printed to stderr without tqdm; nothing when
        the bar is disabled)."""
        if self._bar is not None:
            self._bar.write(text)
        elif self._enabled:
            print(text, file=sys.stderr)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
