"""The README's two set-up commands stay true, and .ci/run runs the test command as written."""

from __future__ import annotations

import pathlib
import re
import subprocess

ROOT = pathlib.Path(__file__).resolve().parents[1]


def commands() -> list[str]:
    return re.findall(r"^    \$ (.+)$", (ROOT / "README.md").read_text(), flags=re.M)


def test_readme_has_exactly_two_setup_commands():
    cmds = commands()
    assert len(cmds) == 2, cmds
    main, tests = cmds
    assert main.endswith("isample bench") and "pip install" in main
    assert "pytest" in tests and "pip install" in tests


def test_ci_extracts_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    assert "torch==2.13.0" in ci
    sed = re.search(r"sed -n '(.+)' README.md", ci).group(1)
    out = subprocess.run(
        ["sed", "-n", sed, "README.md"], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip().splitlines()[0] == commands()[1]
