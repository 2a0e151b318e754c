"""The Python code blocks of docs/natten.md and docs/fsdp.md run as written, on CPU (the FSDP one
in a one-process gloo group, as torchrun would start it)."""

import os
import re
import socket
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _blocks(page):
    text = open(os.path.join(ROOT, "docs", page)).read()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, f"docs/{page} has no python block"
    return blocks


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("page", ["natten.md", "fsdp.md"])
def test_doc_blocks_run(page, tmp_path):
    env = dict(
        os.environ,
        PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
        OMP_NUM_THREADS="1",
        RANK="0",
        WORLD_SIZE="1",
        LOCAL_RANK="0",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(_free_port()),
    )
    for i, code in enumerate(_blocks(page)):
        script = tmp_path / f"block{i}.py"
        script.write_text(code)
        res = subprocess.run(
            [sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300, cwd=str(tmp_path)
        )
        assert res.returncode == 0, f"docs/{page} block {i} failed:\n{code}\n{res.stderr[-3000:]}"
