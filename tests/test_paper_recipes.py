"""The paper's remaining recipes: Table 3 (SA++ without the sparsification phase), Table 4 (the schedule's exponent c)
and the unstructured global ACDC check compose with --cfg job, sweep the paper's grid and run on Fashion-MNIST."""

from __future__ import annotations

import subprocess
import sys

import pytest
from test_app import compose_cfg

from sapp_lightning.app.configs import RECIPES_DIR
from sapp_lightning.app.results import summarize, to_frame
from sapp_lightning.app.synthetic import make_fashion_dir
from sapp_lightning.app.train import build_pruning, run

# recipe: (what --cfg job prints, the sweep's parameters)
PAPER_RECIPES = {
    "imagenet_table3": (
        ["algorithm: sapp", "plan: imagenet_acdc", "variant: pruning.plan=imagenet_acdc"],
        {"pruning": "sapp", "pruning.sparsity": "0.7,0.8,0.9,0.95", "pruning.block_size": "8,16,32,64"},
    ),
    "imagenet_table4": (
        ["algorithm: sapp", "sparsity: 0.9", "plan: imagenet", "variant: pruning.schedule_exponent=4.0"],
        {"pruning": "sapp", "pruning.schedule_exponent": "2,4,8", "pruning.block_size": "8,16,32,64"},
    ),
    "imagenet_global_acdc": (
        ["algorithm: acdc", "sparsity: 0.9", "block_size: 1", "ranking: global", "variant: pruning.ranking=global"],
        {"seed": 0},
    ),
}
SMALL = ["data=fashion_mnist", "model=mlp", "model.net.hidden=[64]", "trainer=cpu", "trainer.max_epochs=1"]
SMALL += ["+trainer.limit_train_batches=4", "global_batch_size=null", "data.batch_size=16", "data.val_size=20"]
SMALL += ["data.num_workers=0", "trainer.precision=32-true", "trainer.enable_progress_bar=false"]


@pytest.mark.slow
@pytest.mark.parametrize("recipe", list(PAPER_RECIPES))
def test_the_paper_recipes_compose_with_cfg_job(recipe):
    out = subprocess.run(
        [sys.executable, "-m", "sapp_lightning.app.train", f"recipe={recipe}", "--cfg", "job", "--resolve"],
        capture_output=True, text=True, check=True, cwd=RECIPES_DIR.parent,
    )  # fmt: skip
    assert all(line in out.stdout for line in PAPER_RECIPES[recipe][0]), out.stdout


@pytest.mark.parametrize("recipe", list(PAPER_RECIPES))
def test_the_paper_recipes_sweep_the_papers_grid(tmp_path, recipe):
    sweep = PAPER_RECIPES[recipe][1]
    cfg = compose_cfg([f"recipe={recipe}"], tmp_path)
    assert cfg.trainer.max_epochs == 90 and cfg.global_batch_size == 2048  # Table 1's setup underneath
    assert {k: v for k, v in cfg.hydra.sweeper.params.items() if k != "seed"} == {
        k: v for k, v in sweep.items() if k != "seed"
    }
    assert cfg.hydra.sweep.dir.startswith("runs/") and recipe.split("_", 1)[1] in cfg.hydra.sweep.dir


@pytest.mark.parametrize("recipe", list(PAPER_RECIPES))
def test_the_paper_recipes_run_on_fashion_mnist_with_a_small_override(tmp_path, recipe):
    data = tmp_path / "fashion"
    make_fashion_dir(data, n_train=100, n_test=20)
    cfg = compose_cfg([f"recipe={recipe}", *SMALL, f"data.data_dir={data}", "logger=none"], tmp_path / "out")
    pruning = build_pruning(cfg.pruning)
    results = run(cfg)
    assert results["steps"] == 4 and results["variant"] == cfg.variant
    assert results["achieved_block_sparsity"] == pytest.approx(0.9, abs=0.01)
    if recipe == "imagenet_table3":
        assert (
            pruning.plan.to_config() == build_pruning(compose_cfg(["pruning=acdc"], tmp_path).pruning).plan.to_config()
        )
    if recipe == "imagenet_global_acdc":  # unstructured, one ranking over every pruned weight
        assert results["block_size"] == 1 and results["pruned_layers"] == ["net.1", "net.3"]
        assert pruning.sparsifier.ranking == "global"


def test_a_variant_gets_rows_of_its_own_in_the_results_table():
    rows = [
        {"algorithm": "sapp", "sparsity": 0.9, "block_size": 16, "seed": 0, "task": "classification",
         "variant": f"pruning.schedule_exponent={c}", "val": {"val/acc": acc}, "test": {},
         "achieved_block_sparsity": 0.9, "fit_seconds": 1.0}
        for c, acc in ((2.0, 0.69), (8.0, 0.70))
    ]  # fmt: skip
    assert [(s["variant"], s["n"]) for s in summarize(to_frame(rows)).to_dict("records")] == [
        ("pruning.schedule_exponent=2.0", 1),
        ("pruning.schedule_exponent=8.0", 1),
    ]
