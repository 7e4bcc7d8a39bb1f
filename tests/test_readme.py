"""The Python examples of the README and of the docs pages run as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))
PATTERN = re.compile(r"```python\n(.*?)```", flags=re.S)
# (page relative to the repository, index of the block in its page, code)
BLOCKS = [(page.relative_to(ROOT).as_posix(), index, code)
          for page in PAGES
          for index, code in enumerate(PATTERN.findall(page.read_text(encoding="utf-8")))]


def test_docs_have_examples():
    counts = {name: sum(1 for page, _, _ in BLOCKS if page == name) for name in ("docs/ops.md", "docs/model.md")}
    # ops.md: RoIAlign, dynamic mask head, box diffusion, mask pasting, "use the ops in your model";
    # model.md: inference and the training losses.
    assert counts["docs/ops.md"] >= 5 and counts["docs/model.md"] >= 2, counts


@pytest.mark.parametrize("page,index,code", BLOCKS, ids=[f"{page}:python-block-{index}" for page, index, _ in BLOCKS])
def test_example_runs(page, index, code):
    exec(compile(code, f"{page}:python-block-{index}", "exec"), {})
