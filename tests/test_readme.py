"""Every ```python block of README.md runs, as written, in a fresh interpreter.

A block may be skipped only when it needs a GPU, and only by an HTML comment on the line right
before it: ``<!-- readme-test: skip (needs a GPU) -->``; on a machine with CUDA it runs anyway.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
FENCE = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.S | re.M)
SKIP = re.compile(r"<!--\s*readme-test:\s*skip\s*\((?P<why>[^)]*)\)\s*-->\s*$")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def python_blocks(text: str):
    """(line number, code, skip reason or None) of every ```python block."""
    out = []
    for m in FENCE.finditer(text):
        line = text.count("\n", 0, m.start()) + 1
        before = text[: m.start()].rstrip("\n").rsplit("\n", 1)[-1]
        skip = SKIP.search(before)
        out.append((line, m.group(1), skip.group("why").strip() if skip else None))
    return out


def _blocks():
    with open(README) as f:
        return python_blocks(f.read())


def test_readme_has_examples():
    blocks = _blocks()
    # one example per use: PWCA, the unfold conversion, neighborhood attention, rollout, DCAL ViT
    assert len(blocks) >= 5, f"README.md has {len(blocks)} python blocks; expected the five examples"
    for what in ("PWCAAttention", "from_unfold_state_dict", "neighborhood_attention2d", "attention_rollout", "DCALViT"):
        assert any(what in code for _, code, _ in blocks), f"no README example uses {what}"


def test_skip_marker_only_for_gpu():
    text = "a\n<!-- readme-test: skip (needs a GPU) -->\n```python\nprint(1)\n```\n\n```python\nprint(2)\n```\n"
    blocks = python_blocks(text)
    assert [(code, why) for _, code, why in blocks] == [("print(1)\n", "needs a GPU"), ("print(2)\n", None)]
    for line, _, why in _blocks():
        assert why is None or "GPU" in why, f"README.md line {line}: a block may be skipped only when it needs a GPU"


@pytest.mark.parametrize("line,code,skip", _blocks(), ids=lambda v: f"line{v}" if isinstance(v, int) else "")
def test_readme_block_runs(line, code, skip, tmp_path):
    import torch

    if skip and not torch.cuda.is_available():
        pytest.skip(f"README.md line {line}: {skip}")
    # a block written for torchrun (the FSDP2 example) runs as a one-process gloo group
    env = dict(
        os.environ,
        PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
        RANK="0",
        WORLD_SIZE="1",
        LOCAL_RANK="0",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(_free_port()),
    )
    env.pop("TRITON_INTERPRET", None)  # as a user runs it: the automatic backend chain
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, f"README.md block at line {line} failed:\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}"
