"""Every python code block of docs/huggingface.md, and of the README's Hugging Face section when
the README has one, runs as written (tiny random models, nothing downloaded)."""

import pathlib
import re

import pytest

pytest.importorskip("transformers")

ROOT = pathlib.Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"```python\n(.*?)```", re.S)


def _blocks(text):
    return BLOCK.findall(text)


def _readme_section():
    readme = (ROOT / "README.md").read_text()
    m = re.search(r"^(#+) [^\n]*Hugging Face[^\n]*\n(.*?)(?=^\1 |\Z)", readme, re.S | re.M)
    return m.group(2) if m else ""


DOC_BLOCKS = _blocks((ROOT / "docs" / "huggingface.md").read_text())


def test_docs_page_has_the_examples():
    assert len(DOC_BLOCKS) >= 3
    assert any("dcal_pair" in b and "collect_rollout" in b for b in DOC_BLOCKS)
    assert any("use_dcal_neighborhood" in b for b in DOC_BLOCKS)


@pytest.mark.parametrize("i", range(len(DOC_BLOCKS)))
def test_docs_block_runs(i, capsys):
    exec(compile(DOC_BLOCKS[i], f"docs/huggingface.md[block {i}]", "exec"), {"__name__": "__docs__"})
    out = capsys.readouterr().out
    # the printed shapes are the ones the comments promise
    promised = [
        size
        for line in DOC_BLOCKS[i].splitlines()
        if "print(" in line and "# " in line
        for size in re.findall(r"torch\.Size\(\[[^\]]*\]\)", line.split("# ", 1)[1])
    ]
    assert " ".join(promised) in out


def test_readme_section_runs():
    blocks = [b for b in _blocks(_readme_section()) if "dcal.integrations.transformers" in b]
    if not blocks:
        pytest.skip("README.md has no Hugging Face code block")
    for i, b in enumerate(blocks):
        exec(compile(b, f"README.md[Hugging Face block {i}]", "exec"), {"__name__": "__readme__"})
