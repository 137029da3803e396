"""The library is light to import, and the package list of pyproject.toml ships every module and config.

(``.ci/wheel_check.sh``, part of ``make test``, builds the wheel and runs it from a clean environment.)"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]
APP_ONLY = ("hydra", "omegaconf", "wandb", "pandas", "pyarrow", "torchvision", "matplotlib")


def imported_after(setup: str, code: str) -> list[str]:
    """Top-level packages that ``code`` imports beyond those ``setup`` imported, in a fresh interpreter."""
    script = (
        f"import sys, json\n{setup}\nbefore = set(sys.modules)\n{code}\n"
        "print(json.dumps(sorted({m.split('.')[0] for m in set(sys.modules) - before})))"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, cwd=ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow  # a fresh interpreter
def test_the_core_imports_torch_alone():
    added = imported_after("import torch", "import sapp_lightning; from sapp_lightning import BlockSparsifier")
    assert not [m for m in added if m in APP_ONLY or m in ("pytorch_lightning", "lightning", "lightning_fabric")]


@pytest.mark.slow  # a fresh interpreter
def test_the_callback_report_and_export_import_nothing_of_the_app():
    # Lightning's own torchmetrics imports torchvision and matplotlib when they are installed: not ours to count
    added = imported_after(
        "import torch, pytorch_lightning",
        "import sapp_lightning, sapp_lightning.export, sapp_lightning.report; sapp_lightning.BlockPruning",
    )
    assert not [m for m in added if m in APP_ONLY], added


def test_every_package_and_config_file_is_in_the_wheel_list():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    packages = set(config["packages"])
    on_disk = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "sapp_lightning").rglob("__init__.py")}
    assert on_disk <= packages
    assert config["package-dir"] == {"sapp_lightning.conf": "conf", "sapp_lightning.recipes": "recipes"}
    assert not (ROOT / "conf" / "recipe").exists()  # no symlink: sapp-train registers recipes/ itself
