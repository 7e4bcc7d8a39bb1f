"""The Python examples of the README and of the docs pages, and the README's quick start, run as
written."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
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


def _quick_start_commands() -> list[str]:
    """The ``fastdiffinst`` lines of the README's quick start, comments dropped."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    block = re.search(r"## Quick start\n+```bash\n(.*?)```", text, flags=re.S).group(1)
    return [line.split("#")[0].strip() for line in block.splitlines() if line.startswith("fastdiffinst ")]


@pytest.mark.slow
def test_quick_start_runs_as_written(tmp_path):
    # As a newcomer runs it after `make setup` and `source .venv/bin/activate`: the venv's console
    # command first on PATH, in a fresh folder, the synthetic data generated on first use.
    commands = _quick_start_commands()
    assert [c.split()[1] for c in commands] == ["--version", "demo", "train", "eval", "demo"]
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
               FASTDIFFINST_DATA=str(tmp_path / "data"))
    printed = []
    for command in commands:
        run = subprocess.run(shlex.split(command), cwd=tmp_path, env=env, capture_output=True, text=True,
                             timeout=900)
        assert run.returncode == 0, f"{command}\n{run.stderr[-3000:]}"
        printed.append(run.stdout)
    version, shipped, train, evaluation, demo = printed
    assert version.startswith("fastdiffinst ")
    assert "using the shipped model tiny-synthetic" in shipped and len(list((tmp_path / "pictures").glob("*.png"))) == 4
    assert "iter 40/40" in train and "| segm |" in train
    assert "| segm |" in evaluation
    run = tmp_path / "runs" / "quick"
    assert {"model_final.pth", "last.pth", "log.txt", "metrics.jsonl"} <= {p.name for p in run.iterdir()}
    assert len(list((run / "pictures").glob("*.png"))) == 4
