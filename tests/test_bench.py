"""The benchmark scripts: their ``--quick`` modes end to end (slow). The quality grids are ``sapp-train -m`` sweeps
(``+bench=fast``: tests/test_app.py, tests/test_cli.py) gathered by ``sapp-results`` (tests/test_results.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(script: str, *args: str, timeout: float = 600) -> str:
    out = subprocess.run(
        [sys.executable, str(ROOT / "bench" / script), "--quick", *args],
        cwd=ROOT, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout


@pytest.mark.slow
def test_training_cost_quick(tmp_path):
    out = tmp_path / "cost.json"
    _run("training_cost.py", "--out", str(out))
    res = json.loads(out.read_text())["models"]["mlp"]["configs"]
    assert res["dense"]["ratio_median"] == 1.0
    assert res["sapp dense"]["memory"]["extra_fraction"] < 0.01


@pytest.mark.slow
def test_reparam_cost_quick(tmp_path):
    out = tmp_path / "reparam.json"
    text = _run("reparam_cost.py", "--out", str(out))
    res = json.loads(out.read_text())["results"]["mlp"]
    assert res["dense"]["ratio_to_dense"] == 1.0
    assert set(res) == {"dense", "sapp", "powerprop"} and all(r["ms_per_step"] > 0 for r in res.values())
    assert "| mlp |" in text


def test_reparam_cost_parametrizes_the_layers_the_callback_would_prune():
    from torch.nn.utils import parametrize

    from bench import reparam_cost

    net, x, y = reparam_cost.build("mlp", "sapp")
    pruned = [name for name, m in net.named_modules() if parametrize.is_parametrized(m)]
    assert pruned == ["1", "3"]  # the two hidden layers; the 512x10 classifier has 32 blocks < 100
    assert x.shape[0] == len(y) == 256


@pytest.mark.slow
def test_inference_quick(tmp_path):
    out = tmp_path / "inference.json"
    text = _run("inference.py", "--out", str(out))
    rows = json.loads(out.read_text())["rows"]
    layers = [r for r in rows if r["cell"] == "layers"]
    assert {r["batch"] for r in layers} == {1, 32, 256} and {r["threads"] for r in rows} == {1}
    assert {r["name"] for r in layers} == {"1024x1024", "768x3072"}
    assert all(r["limit"] == pytest.approx(10.0) for r in rows)
    assert all(set(r["speedup"]) == {"own", "torch"} for r in layers)
    # the layout the earlier export's rule picked, timed beside the own kernel: BSR for 1 row, CSR from 32
    chosen = {r["batch"]: r["torch_layout"] for r in layers if r["name"] == "768x3072"}
    assert chosen == {1: "bsr", 32: "csr", 256: "csr"}
    assert [r["name"] for r in rows if r["cell"] == "conv"] == ["conv1x1 256->1024 14x14"]
    assert "| cell | name |" in text
