"""sapp-train (train.py, configs.py, conf/ and recipes/): configs compose, every recipe runs on tiny data in its real
format, the paper's remaining recipes (Table 3, Table 4, unstructured global ACDC) compose and sweep the paper's grid,
sweeps and loggers work."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from helpers import compose_cfg

from sapp_lightning import BlockPruning
from sapp_lightning.app.cli import results as results_main
from sapp_lightning.app.configs import CONFIG_DIR, RECIPES_DIR
from sapp_lightning.app.synthetic import make_criteo_tsv, make_fashion_dir, make_imagefolder, make_ml100k_dir
from sapp_lightning.app.train import build_pruning, run

RECIPES = sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))
PRUNINGS = sorted(p.stem for p in (CONFIG_DIR / "pruning").glob("*.yaml") if not p.stem.startswith("_"))


def test_there_are_recipes_and_pruning_options():
    assert {"resnet50_imagenet", "criteo_paper", "criteo_table2", "imagenet_table1", "movielens_ctr"} <= set(RECIPES)
    assert PRUNINGS == ["acdc", "dense", "gmp", "magnitude", "powerprop", "sapp"]


@pytest.mark.parametrize("recipe", RECIPES)
def test_every_recipe_starts_with_the_command_that_runs_it(recipe):
    lines = (RECIPES_DIR / f"{recipe}.yaml").read_text().splitlines()
    assert lines[0] == "# @package _global_"  # Hydra needs this header first
    assert lines[1].startswith("# sapp-train ") and f"recipe={recipe}" in lines[1]
    text = "\n".join(lines)
    assert "OUR ASSUMPTIONS" in text or "settings are those of recipes/" in text


@pytest.mark.parametrize("pruning", PRUNINGS)
@pytest.mark.parametrize("recipe", RECIPES)
def test_every_recipe_composes_with_every_pruning_option(tmp_path, recipe, pruning):
    cfg = compose_cfg([f"recipe={recipe}", f"pruning={pruning}"], tmp_path)
    callback = build_pruning(cfg.pruning)
    if pruning == "dense":
        assert callback is None
        return
    assert isinstance(callback, BlockPruning) and callback.algorithm_name == pruning
    if recipe.startswith(("criteo", "movielens")):
        assert callback.plan == BlockPruning(pruning, 0.9, 10, plan="criteo").plan
        assert callback.algorithm.prune_mode == "mask"
        assert callback.include == ["^net\\.mlp\\.0$"]
    if recipe.startswith(("resnet50", "imagenet")):
        plan = "imagenet_acdc" if recipe == "imagenet_table3" else "imagenet"  # Table 3: SA++ on ACDC's plan
        assert callback.plan == BlockPruning(pruning, 0.9, 16, plan=plan).plan
        assert cfg.trainer.max_epochs == 90 and cfg.model.module.lr == 0.8


def test_the_issue_commands_compose_exactly_as_written(tmp_path):
    cfg = compose_cfg(
        "recipe=resnet50_imagenet pruning=sapp pruning.sparsity=0.9 pruning.block_size=16".split(), tmp_path
    )
    assert (cfg.pruning.algorithm, cfg.pruning.sparsity, cfg.pruning.block_size) == ("sapp", 0.9, 16)
    assert cfg.data._target_.endswith("ImageNetDataModule") and cfg.model.net._target_.endswith("resnet50")
    cfg = compose_cfg("recipe=criteo_paper pruning=acdc pruning.sparsity=0.95 pruning.block_size=10".split(), tmp_path)
    assert (cfg.pruning.algorithm, cfg.pruning.sparsity, cfg.pruning.block_size) == ("acdc", 0.95, 10)
    assert cfg.global_batch_size == 32768 and cfg.trainer.max_epochs == 25


def test_recipes_override_the_primary_config_including_the_sweep_folder(tmp_path):
    # `make demo` gathers runs/demo: the recipe's hydra.sweep.dir must win over conf/config.yaml's
    assert compose_cfg(["recipe=fashion_mnist_demo"], tmp_path).hydra.sweep.dir == "runs/demo"
    assert compose_cfg(["recipe=criteo_table2"], tmp_path).hydra.sweep.dir == "runs/table2_criteo"
    assert compose_cfg([], tmp_path).hydra.sweep.dir.startswith("runs/multirun/")


@pytest.mark.slow  # sapp-train in a subprocess (the wheel check runs --cfg job for every recipe)
def test_cfg_job_prints_the_composed_config():
    out = subprocess.run(
        [sys.executable, "-m", "sapp_lightning.app.train", "recipe=criteo_paper", "pruning=dense", "--cfg", "job"],
        capture_output=True, text=True, check=True, cwd=RECIPES_DIR.parent,
    )  # fmt: skip
    assert "algorithm: dense" in out.stdout and "CriteoDataModule" in out.stdout


FAST = ["trainer.fast_dev_run=1", "trainer.accelerator=cpu", "trainer.devices=1", "logger=none"]


def test_resnet50_recipe_runs_on_an_imagefolder_tree(tmp_path):
    root = make_imagefolder(tmp_path / "imagenet")
    overrides = ["recipe=resnet50_imagenet", "pruning=sapp", "trainer=cpu", f"data.root={root}", "data.batch_size=4"]
    overrides += ["global_batch_size=null"]
    overrides += ["data.num_workers=0", "data.image_size=32", "data.val_resize=36", "trainer.precision=32-true"]
    results = run(compose_cfg(overrides + FAST, tmp_path / "out"))
    assert results["data"] == "ImageNetDataModule" and results["model"] == "resnet50"
    assert results["achieved_block_sparsity"] == pytest.approx(0.9, abs=0.01)  # one step: straight to the final phase
    # SPEC 2.4: at 16x16, 46 of ResNet50's 54 conv/fc layers have >= 100 blocks; the stem conv1 has 40
    assert len(results["pruned_layers"]) == 46
    assert "net.layer4.0.conv2" in results["pruned_layers"] and "net.conv1" not in results["pruned_layers"]
    assert json.loads((tmp_path / "out" / "results.json").read_text())["test"]


def test_criteo_recipe_runs_on_a_kaggle_tsv(tmp_path):
    tsv = make_criteo_tsv(tmp_path / "train.txt")
    overrides = [
        "recipe=criteo_paper",
        "pruning=acdc",
        f"data.path={tsv}",
        "data.batch_size=32",
        "global_batch_size=null",
    ]
    overrides += ["data.table_size=50", f"data.cache_dir={tmp_path / 'cache'}"]
    results = run(compose_cfg(overrides + FAST, tmp_path / "out"))
    assert results["pruned_layers"] == ["net.mlp.0"]
    assert results["achieved_block_sparsity"] == pytest.approx(0.9, abs=0.001)
    assert {"val/loss", "val/auroc"} <= set(results["val"]) and "test/loss" in results["test"]


def test_movielens_recipe_runs_on_the_ml100k_layout(tmp_path):
    folder = make_ml100k_dir(tmp_path / "ml-100k")
    overrides = ["recipe=movielens_ctr", "pruning=sapp", f"data.data_dir={folder}", "data.batch_size=8"]
    overrides += ["pruning.block_size=5", "data.val_fraction=0.2", "data.test_fraction=0.2"]
    results = run(compose_cfg(overrides + FAST, tmp_path / "out"))
    assert results["pruned_layers"] == ["net.mlp.0"] and results["data"] == "MovieLensCTRDataModule"
    assert results["achieved_block_sparsity"] == pytest.approx(0.9, abs=0.001)


def test_wandb_offline_receives_the_pruning_curves_and_heatmaps(tmp_path, monkeypatch):
    from pytorch_lightning.loggers import WandbLogger

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    logged, images = set(), set()
    original = WandbLogger.log_metrics

    def record_metrics(self, metrics: dict, step=None):
        logged.update(metrics)
        return original(self, metrics, step)

    monkeypatch.setattr(WandbLogger, "log_metrics", record_metrics)
    monkeypatch.setattr(WandbLogger, "log_image", lambda self, key, images_, **kw: images.add(key))
    data = tmp_path / "fmnist"
    make_fashion_dir(data, n_train=300, n_test=20)
    overrides = [
        "recipe=fashion_mnist_demo",
        "pruning=sapp",
        "logger=wandb",
        f"data.data_dir={data}",
        "data.val_size=20",
    ]
    overrides += ["data.batch_size=32", "trainer.max_epochs=3", "trainer.log_every_n_steps=1", "test=false"]
    overrides += ["trainer.enable_progress_bar=false"]
    run(compose_cfg(overrides, tmp_path / "out"))
    assert {"pruning/sparsity", "pruning/target_sparsity", "pruning/phase", "pruning/layer/net.1"} <= logged
    assert {"pruning/mask/net.1", "pruning/mask/net.3"} <= images
    assert list((tmp_path / "out" / "wandb").glob("offline-run-*"))
    import wandb

    assert wandb.run is None  # finished: the next run in this process (a sweep) gets a run of its own


@pytest.mark.slow  # a joblib sweep: two sapp-train processes
def test_joblib_multirun_of_two_jobs_and_the_results_table(tmp_path, capsys):
    data = tmp_path / "fmnist"
    make_fashion_dir(data, n_train=100, n_test=20)
    sweep = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "sapp_lightning.app.train", "-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2"]
    cmd += ["recipe=fashion_mnist_demo", "pruning=dense,sapp", f"data.data_dir={data}", "data.val_size=20"]
    cmd += ["trainer.fast_dev_run=2", "logger=none", f"hydra.sweep.dir={sweep}"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(CONFIG_DIR.parent)}  # this checkout's package
    subprocess.run(cmd, check=True, cwd=tmp_path, env=env, capture_output=True)
    results = sorted(json.loads(p.read_text())["algorithm"] for p in sweep.rglob("results.json"))
    assert results == ["dense", "sapp"]
    assert results_main([str(sweep)]) == 0
    table = capsys.readouterr().out
    assert "| Dense" in table and "| SA++" in table and "| 90%" in table
    curve = sweep / "1" / "sparsity_curve.png"  # a fast_dev_run's curve too: drawn from its results.json
    assert curve.is_file() and json.loads((sweep / "1" / "results.json").read_text())["pruning"]["phases"]


def test_the_benchmark_settings_compose_validation_once_at_the_end_one_thread_and_no_extras(tmp_path):
    cfg = compose_cfg(["recipe=fashion_mnist_demo", "model=cnn", "trainer.max_epochs=2", "+bench=fast"], tmp_path)
    assert cfg.trainer.check_val_every_n_epoch == cfg.trainer.max_epochs == 2
    assert (cfg.trainer.accelerator, cfg.trainer.devices, cfg.trainer.num_sanity_val_steps) == ("cpu", 1, 0)
    assert not cfg.trainer.enable_checkpointing and not cfg.trainer.enable_progress_bar
    assert not cfg.callbacks and not cfg.logger  # no checkpoints, heatmaps or logger
    assert (cfg.threads, cfg.skip_finished) == (1, True)
    plain = compose_cfg(["recipe=fashion_mnist_demo"], tmp_path)
    assert (plain.threads, plain.skip_finished) == (None, False)


def test_skip_finished_returns_a_finished_runs_results_only_when_its_config_is_this_one(tmp_path, monkeypatch):
    from sapp_lightning.app import train
    from sapp_lightning.app.checkpoints import run_settings

    cfg = compose_cfg(["recipe=fashion_mnist_demo", "skip_finished=true"], tmp_path)
    finished = {"algorithm": "sapp", "val": {"val/acc": 0.5}, "config": run_settings(cfg) | {"skip_finished": False}}
    (tmp_path / "results.json").write_text(json.dumps(finished, default=str))

    def no_training(*args, **kwargs):
        raise AssertionError("trained again")

    monkeypatch.setattr(train, "build_module", no_training)
    assert run(cfg)["val"] == {"val/acc": 0.5}  # skip_finished itself is not compared
    other = compose_cfg(["recipe=fashion_mnist_demo", "skip_finished=true", "seed=1"], tmp_path)
    with pytest.raises(AssertionError, match="trained again"):
        run(other)


def test_a_global_batch_is_split_over_the_devices_and_a_share_that_does_not_divide_is_refused(tmp_path):
    from sapp_lightning.app.train import pin_global_batch

    class Trainer:
        world_size, accumulate_grad_batches = 4, 2

    class Data:
        batch_size = 256

    cfg = compose_cfg(["recipe=resnet50_imagenet"], tmp_path)
    data = Data()
    pin_global_batch(cfg, data, Trainer())
    assert data.batch_size == 2048 // 8  # the paper's 2048 on 4 devices with 2 accumulated batches
    Trainer.world_size = 3
    with pytest.raises(ValueError, match="global_batch_size=2048 does not split over 3 device"):
        pin_global_batch(cfg, data, Trainer())


def test_the_algorithms_own_knobs_reach_them_from_the_command_line(tmp_path):
    sapp = build_pruning(
        compose_cfg(["pruning=sapp", "pruning.softmax_over=kept", "pruning.alpha=3"], tmp_path).pruning
    )
    assert sapp.sparsifier.algorithm.softmax_over == "kept"  # alpha is PowerPropagation's: ignored here
    powerprop = build_pruning(compose_cfg(["pruning=powerprop", "pruning.alpha=3"], tmp_path).pruning)
    assert powerprop.sparsifier.algorithm.config() == {"prune_mode": "mask", "alpha": 3.0}


def test_the_pruning_groups_arguments_are_generated_from_the_sparsifiers_signature():
    from sapp_lightning.app.configs import main, sparsifier_yaml

    assert (CONFIG_DIR / "pruning" / "_sparsifier.yaml").read_text() == sparsifier_yaml(), (
        "conf/pruning/_sparsifier.yaml is out of date: python -m sapp_lightning.app.configs --write"
    )
    assert main([]) == 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_a_gpu_recipe_on_a_cpu_machine_names_the_override(tmp_path):
    with pytest.raises(SystemExit, match="resnet50_imagenet trains on GPUs .* add trainer=cpu"):
        run(compose_cfg(["recipe=resnet50_imagenet"], tmp_path))


# --- the paper's remaining recipes ------------------------------------------------------------------------------------
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
