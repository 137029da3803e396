"""The README's runnable snippets (each loop: Lightning, lightning.pytorch, Fabric, a plain loop) keep running."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
SNIPPETS = [b for b in re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S) if "print(" in b]
NAMES = {"class Model": "lightning", "Fabric": "fabric", "GradScaler": "plain"}


def snippet(kind: str) -> str:
    found = [b for b in SNIPPETS if any(k in b and NAMES[k] == kind for k in NAMES)]
    assert len(found) == 1, kind
    return found[0]


def run(code: str, tmp_path, monkeypatch) -> dict:
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    return namespace


@pytest.mark.parametrize("kind", ["lightning", "lightning.pytorch", "fabric", "plain"])
def test_readme_snippet_runs(tmp_path, monkeypatch, kind):
    if kind == "lightning.pytorch":
        code = snippet("lightning").replace("import pytorch_lightning as pl", "import lightning.pytorch as pl")
        code = code.replace("sapp_lightning import BlockPruning", "sapp_lightning.lightning import BlockPruning")
    else:
        code = snippet(kind)
    namespace = run(code, tmp_path, monkeypatch)
    pruned = namespace.get("pruning") or namespace["sparsifier"]
    report = pruned.report()
    first = "net.0" if kind.startswith("lightning") else "0"
    assert (report[first].zero_blocks, report[first].num_blocks) == (48, 64)
    assert [layer.name for layer in report.layers] == [first]
