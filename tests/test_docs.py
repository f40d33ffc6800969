"""Every ```python block of README.md and docs/**/*.md runs (or, for the few that need a launcher, compiles).

Blocks of one file run in order in one namespace, which starts from the small fixture
prelude below (a digits-like training set, a model, a per-example loss, an optimizer,
a loader), so a snippet can use ``train_set``, ``model``, ``loss_fn``, ``optimizer`` and
the like without setting them up. A block that cannot run in a test process (it needs
``torchrun``) is listed in :data:`NEEDS_LAUNCHER` with the reason; it must still compile.
Warnings a snippet shows are allowed (they are part of what the user sees), except
deprecation warnings. Blocks run with ``__name__ != "__main__"``, so ``if __name__ == "__main__":`` parts are
skipped, as they would be in a spawned worker.
"""

from __future__ import annotations

import pathlib
import re
import textwrap
import warnings

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
#: pages whose blocks another test runs, with the frameworks they need
OWN_TESTS = {"docs/integrations.md": "tests/test_integration_docs.py (needs Lightning / transformers)"}
FILES = sorted(
    path
    for path in [ROOT / "README.md", *(ROOT / "docs").rglob("*.md")]
    if path.relative_to(ROOT).as_posix() not in OWN_TESTS
)
FENCE = re.compile(r"^(?P<indent>[ \t]*)```python[ \t]*\n(?P<body>.*?)^(?P=indent)```[ \t]*$", re.M | re.S)

#: (file, a line of the block) -> why it is compiled but not run.
NEEDS_LAUNCHER = {
    ("docs/distributed.md", 'dist.init_process_group("gloo")'): "needs torchrun (RANK, WORLD_SIZE, ...)",
}

PRELUDE = """
import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import TensorDataset

import isample
from isample import ImportanceDataLoader, TableSampler

_g = torch.Generator().manual_seed(0)
_x = torch.randn(512, 10, generator=_g)
_y = (_x[:, :3] + 0.3 * torch.randn(512, 3, generator=_g)).argmax(1)
train_set = dataset = ds = TensorDataset(_x, _y)
x, y = _x[:32], _y[:32]
x_probe, y_probe = _x[:64], _y[:64]
model = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 3))
net = model
loss_fn = nn.CrossEntropyLoss(reduction="none")
optimizer = opt = torch.optim.Adam(model.parameters(), lr=1e-3)
loader = isample.DataLoader(train_set, batch_size=64, scheme="uniform", model=model, loss_fn=loss_fn, seed=0)
E = epochs = 1
epoch = step = rank = 0
schedule = lambda progress: 1e-3 * (1.0 - progress)
"""


def blocks(path: pathlib.Path) -> list[tuple[int, str]]:
    text = path.read_text()
    out = []
    for m in FENCE.finditer(text):
        line = text.count("\n", 0, m.start()) + 1
        out.append((line, textwrap.dedent(m.group("body"))))
    return out


def launcher_reason(rel: str, code: str) -> str | None:
    for (file, marker), reason in NEEDS_LAUNCHER.items():
        if file == rel and marker in code:
            return reason
    return None


def test_the_docs_have_python_blocks_and_the_launcher_list_is_current():
    found = {str(p.relative_to(ROOT)): blocks(p) for p in FILES}
    assert len(found["README.md"]) >= 2
    for file, marker in NEEDS_LAUNCHER:
        assert any(marker in code for _, code in found[file]), f"stale NEEDS_LAUNCHER entry {file}: {marker}"


@pytest.mark.parametrize("path", [p for p in FILES if blocks(p)], ids=lambda p: str(p.relative_to(ROOT)))
def test_every_python_block_runs(path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # snippets that save checkpoints write here
    torch.manual_seed(0)  # some snippets build models with the global RNG, as user code does
    rel = str(path.relative_to(ROOT))
    namespace: dict = {"__name__": "isample_docs_snippet"}
    exec(compile(PRELUDE, "<docs prelude>", "exec"), namespace)
    for line, code in blocks(path):
        compiled = compile(code, f"{rel}:{line}", "exec")
        if launcher_reason(rel, code):
            continue
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")  # a snippet's informative warnings are part of the docs
            try:
                exec(compiled, namespace)
            except Exception as error:  # name the block
                raise AssertionError(f"the ```python block at {rel}:{line} failed: {error!r}") from error
        stale = [w for w in caught if issubclass(w.category, (DeprecationWarning, FutureWarning))]
        assert not stale, f"the ```python block at {rel}:{line} uses a deprecated API: {stale[0].message}"


def test_the_check_sampler_snippet_is_guarded_and_its_factory_passes():
    """The documented check_sampler call is under a __main__ guard that says why, and its factory is sound."""
    path = ROOT / "docs" / "distributed.md"
    code = next(c for _, c in blocks(path) if "check_sampler(make_loader" in c)
    assert 'if __name__ == "__main__":' in code and "spawn" in code
    namespace: dict = {"__name__": "isample_docs_snippet"}
    exec(compile(PRELUDE, "<docs prelude>", "exec"), namespace)
    exec(compile(code, "distributed.md", "exec"), namespace)
    from isample.testing import check_sampler

    small = torch.utils.data.TensorDataset(torch.randn(24, 3), torch.randint(0, 2, (24,)))
    check_sampler(namespace["make_loader"], small, skip=("pickle_spawn",))  # spawn needs a real script
