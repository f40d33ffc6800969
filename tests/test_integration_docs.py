"""Every code block of docs/integrations.md runs (each needs its framework installed)."""

from __future__ import annotations

import pathlib
import re
import warnings

import pytest

DOC = pathlib.Path(__file__).resolve().parents[1] / "docs" / "integrations.md"
BLOCKS = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
NEEDS = {"lightning": "lightning.pytorch", "transformers": "transformers"}


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_integrations_doc_block_runs(index, tmp_path, monkeypatch):
    code = BLOCKS[index]
    for word, module in NEEDS.items():
        if f"import {word}" in code:
            pytest.importorskip(module)
    monkeypatch.chdir(tmp_path)  # the Trainer writes its output folder here
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exec(compile(code, f"{DOC.name}[{index}]", "exec"), {"__name__": "__docs__"})


def test_the_doc_has_both_integrations():
    assert len(BLOCKS) == 2
