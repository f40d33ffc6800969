"""The Python snippets of the kf and auto method cards run as written."""

from __future__ import annotations

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
CARDS = ("docs/methods/kf.md", "docs/methods/auto.md")


def snippets(path: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", (ROOT / path).read_text(), flags=re.S)


@pytest.mark.parametrize("card", CARDS)
def test_card_snippets_run(card, capsys):
    blocks = snippets(card)
    assert blocks, f"{card} has no Python snippet"
    for code in blocks:
        exec(compile(code, card, "exec"), {"__name__": "__docs__"})
    out = capsys.readouterr().out
    assert "IS o" in out  # every snippet prints the loader's status line
