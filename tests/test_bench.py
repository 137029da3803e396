"""The benchmark scripts: their ``--quick`` modes end to end (slow); the quality grids as the app's overrides, the
resumable store and the tables (fast)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench import quality
from bench.common import append_row, load_done, run_pool
from sapp_lightning.app.results import compare_table, load_runs, override_value
from sapp_lightning.app.train import build_pruning

ROOT = Path(__file__).resolve().parents[1]


def _run(script: str, *args: str, timeout: float = 600) -> str:
    out = subprocess.run(
        [sys.executable, str(ROOT / "bench" / script), "--quick", *args],
        cwd=ROOT, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout


@pytest.mark.slow
def test_quality_quick_and_resume(tmp_path):
    out = tmp_path / "quick.jsonl"
    text = _run("quality.py", "--out", str(out))
    rows = load_runs(out)["record"].tolist()
    assert len(rows) == len(quality.quick_jobs())
    assert {r["task"] for r in rows} == {"ctr", "classification"}
    assert {r["model"] for r in rows} == {"CriteoPaperNet", "MLP", "SmallCNN"}
    for r in rows:
        if r["algorithm"] != "dense":
            assert r["achieved_block_sparsity"] == pytest.approx(0.9, abs=0.01)
        assert r["steps"] == 20 and r["epochs"] == 2  # 2 epochs of 10 batches: the overrides reached the runs
    assert {"val/loss", "val/auroc"} <= set(next(r for r in rows if r["task"] == "ctr")["val"])
    assert "CriteoPaperNet (ctr, 2 epochs): validation BCE" in text and "validation AUROC" in text
    again = _run("quality.py", "--out", str(out))  # every run is in the file: nothing is trained again
    assert f"{len(rows)} already in" in again and "0 to run" in again


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


def test_store_skips_finished_runs_and_torn_lines(tmp_path):
    path = tmp_path / "runs.jsonl"
    append_row(path, {"key": "a", "val_loss": 0.5})
    with path.open("a") as f:
        f.write('{"key": "b", "val_')  # an interrupted write
    assert set(load_done(path)) == {"a"}


def test_store_refuses_a_finished_run_made_with_other_settings(tmp_path):
    path = tmp_path / "runs.jsonl"
    job = {"key": "images/cnn/sapp/s0.9/b16/seed0/e2", "min_blocks": 16}
    append_row(path, dict(job, val_acc=85.0))
    assert run_pool([job], lambda j: pytest.fail("a finished run was trained again"), path, 1) == []
    with pytest.raises(ValueError, match=r"min_blocks=16 there, 17 asked\); use another --out"):
        run_pool([dict(job, min_blocks=17)], lambda j: j, path, 1)
    # a quality run: the key holds what changes results; the benchmark's speed settings must match too
    (job,) = quality.grid(args("--part ctr --methods sapp --seeds 0 --sparsities 0.9 --blocks 10"))
    append_row(path, dict(job, val={"val/loss": 0.6}))
    assert run_pool([job], lambda j: pytest.fail("a finished run was trained again"), path, 1) == []
    with pytest.raises(ValueError, match=r"bench=.*there, .*asked"):
        run_pool([dict(job, bench=[*job["bench"], "trainer.precision=16-mixed"])], lambda j: j, path, 1)


def args(text: str):
    return quality.parse_args(text.split())


def compose(job: dict, tmp_path: Path):
    return quality.compose([*job["overrides"], *job["bench"]], tmp_path)


def test_a_grid_is_the_apps_overrides_one_list_per_run():
    jobs = quality.grid(args("--part ctr --seeds 0 1 --blocks 10 --sparsities 0.9"))
    assert len(jobs) == 2 + 2 * 5 and len({j["key"] for j in jobs}) == len(jobs)  # dense + the five algorithms
    assert jobs[0]["overrides"] == ["recipe=movielens_ctr", "pruning=dense", "seed=0", "trainer.max_epochs=25"]
    sapp = [j for j in jobs if "pruning=sapp" in j["overrides"] and "seed=1" in j["overrides"]]
    assert [j["key"] for j in sapp] == [
        "recipe=movielens_ctr pruning=sapp pruning.sparsity=0.9 pruning.block_size=10 seed=1 trainer.max_epochs=25"
    ]
    assert all(j["bench"] == quality.BENCH and j["variant"] == "" for j in jobs)
    # a sweep: each value for every pruned run; pruning.* overrides leave the dense runs alone
    jobs = quality.grid(args("--part ctr --methods dense sapp --seeds 0 --blocks 10 --sparsities 0.9 --set "
                             "pruning.logit_l2=0,1e-4 data.batch_size=512"))  # fmt: skip
    assert [j["variant"] for j in jobs] == [
        "data.batch_size=512", "pruning.logit_l2=0 data.batch_size=512", "pruning.logit_l2=0.0001 data.batch_size=512"
    ]  # fmt: skip
    # images: one min_blocks per block size, the model chosen by model=...
    jobs = quality.grid(args("--part images --models cnn --methods acdc --seeds 0 --sparsities 0.9 --blocks 8 16 "
                             "--min-blocks 8=100 16=17"))  # fmt: skip
    assert [override_value(j["overrides"], "pruning.min_blocks") for j in jobs] == ["100", "17"]
    assert all({"recipe=fashion_mnist_demo", "model=cnn", "trainer.max_epochs=2"} <= set(j["overrides"]) for j in jobs)


def test_the_benchmark_settings_compose_validation_once_at_the_end_and_no_extras(tmp_path):
    (job,) = quality.grid(args("--part images --models mlp --methods sapp --seeds 3 --sparsities 0.8 --blocks 32"))
    cfg = compose(job, tmp_path)
    assert (cfg.pruning.algorithm, cfg.pruning.sparsity, cfg.pruning.block_size, cfg.seed) == ("sapp", 0.8, 32, 3)
    assert cfg.trainer.check_val_every_n_epoch == cfg.trainer.max_epochs == 2
    assert set(cfg.callbacks) == {"learning_rate"} and not cfg.logger  # no checkpoints, heatmaps or logger
    assert cfg.model.net._target_.endswith("MLP") and cfg.data._target_.endswith("FashionMNISTDataModule")


def test_a_config_override_reaches_a_benchmark_run(tmp_path):
    from sapp_lightning.app.synthetic import make_fashion_dir

    data = tmp_path / "fmnist"
    make_fashion_dir(data, n_train=120, n_test=20)
    text = (
        f"--part images --models mlp --methods dense sapp --seeds 0 --sparsities 0.5 --blocks 16 --epochs 1 "
        f"--set data.data_dir={data} data.val_size=20 data.batch_size=50 model.net.hidden=[32,32] "
        f"pruning.min_blocks=4 pruning.score=magnitude"
    )
    out = tmp_path / "runs.jsonl"
    quality.run_pool(quality.grid(args(text)), quality.run_job, out, 1)
    dense, sapp = load_runs(out)["record"]
    assert dense["algorithm"] == "dense" and "pruning.score=magnitude" not in dense["overrides"]
    assert sapp["algorithm"] == "sapp" and sapp["variant"].endswith("pruning.min_blocks=4 pruning.score=magnitude")
    # the 784-32-32-10 MLP of the override: 49 x 2 and 2 x 2 blocks of 16, both >= 4; 100 rows / 50 = 2 steps
    assert sapp["pruned_layers"] == ["net.1", "net.3"] and sapp["steps"] == 2
    assert sapp["achieved_block_sparsity"] == pytest.approx(51 / 102)
    assert "attention_range" not in sapp  # ranked by block norm, not attention: nothing to report
    assert {"val/acc", "val/loss"} <= set(sapp["val"]) and "test/acc" in sapp["test"]


def test_image_tables_compare_only_runs_that_pruned_the_same_layers(tmp_path, capsys):
    path = tmp_path / "images.jsonl"
    with_classifier = ["net.classifier.1", "net.classifier.3", "net.features.4"]
    runs = {  # (block, min_blocks): (accuracy, pruned layers)
        (16, 16): (80.0, with_classifier),
        (16, 17): (86.0, ["net.classifier.1", "net.features.4"]),
        (32, 16): (87.0, ["net.classifier.1", "net.features.4"]),
    }
    for (block, min_blocks), (acc, layers) in runs.items():
        text = f"--part images --models cnn --seeds 0 --sparsities 0.95 --methods dense sapp --blocks {block}"
        for job in quality.grid(args(f"{text} --min-blocks {min_blocks}")):
            dense = "pruning=dense" in job["overrides"]
            row = dict(job, algorithm="dense" if dense else "sapp", sparsity=0.0 if dense else 0.95, block_size=block)
            row |= dict(seed=0, task="classification", model="SmallCNN", epochs=2, fit_seconds=1.0, test={})
            row |= dict(val={"val/acc": (90.0 if dense else acc) / 100}, achieved_block_sparsity=0.0 if dense else 0.95)
            append_row(path, dict(row, pruned_layers=[] if dense else layers))
    assert len(load_done(path)) == 4  # one dense run, three pruned
    quality.print_tables([path])
    text = capsys.readouterr().out
    title = "SmallCNN (classification, 2 epochs), pruned net.classifier.1, net.features.4"
    title += " (min_blocks B=16: 17, B=32: 16)"
    same = text[text.index(title + ": validation") : text.index(title + ": test")]
    assert cells(same, "95%", "SA++") == ["86.00 (95.0%) [64.27]", "87.00 (95.0%) [65.41]"]
    assert cells(same, "0%", "Dense") == ["90.00 [76.90]", "90.00 [76.90]"]
    title = "SmallCNN (classification, 2 epochs), pruned " + ", ".join(with_classifier) + " (min_blocks B=16: 16)"
    other = text[text.index(title + ": validation") : text.index(title + ": test")]
    assert cells(other, "95%", "SA++") == ["80.00 (95.0%) [64.27]"] and "86.00" not in other


def cells(table: str, *first: str) -> list[str]:
    """The cells after ``first`` in the markdown row that starts with them."""
    for line in table.splitlines():
        row = [c.strip() for c in line.strip().strip("|").split("|")]
        if row[: len(first)] == list(first):
            return row[len(first) :]
    raise AssertionError(f"no row {first} in\n{table}")


def test_images_ablation_without_sparsification_follows_the_imagenet_acdc_plan(tmp_path):
    text = "--part images --models cnn --methods acdc sapp --ablations no_sparsify --seeds 0 --sparsities 0.9"
    acdc, sapp, no_sparsify = quality.grid(args(text + " --blocks 16"))
    assert no_sparsify["variant"] == "pruning.plan=imagenet_acdc"
    plan = {name: build_pruning(compose(job, tmp_path).pruning).plan for name, job in
            (("acdc", acdc), ("sapp", sapp), ("no_sparsify", no_sparsify))}  # fmt: skip
    assert plan["no_sparsify"] == plan["acdc"] != plan["sapp"]
    rows = [dict(no_sparsify, val={"val/acc": 0.8}), dict(sapp, val={"val/acc": 0.82})]
    fields = dict(algorithm="sapp", sparsity=0.9, block_size=16, seed=0, task="classification", model="SmallCNN")
    fields |= dict(test={}, achieved_block_sparsity=0.9, fit_seconds=1.0, pruned_layers=["net.features.4"])
    rows = [dict(r, **fields) for r in rows]
    text = quality.tables(rows)
    variants = text[text.index("variants: validation") :]
    assert cells(variants, "90%", "SA++ pruning.plan=imagenet_acdc") == ["80.00"]
    assert cells(variants, "90%", "SA++") == ["82.00"]


@pytest.mark.parametrize("part", ["ctr", "images"])
def test_zero_mode_ablation_zeroes_pruned_blocks_on_either_part(part, tmp_path):
    text = f"--part {part} --models cnn --methods sapp --ablations zero_mode --seeds 0 --sparsities 0.9 --blocks 16"
    plain, zero = quality.grid(args(text))
    assert build_pruning(compose(zero, tmp_path).pruning).algorithm.prune_mode == "zero"
    assert build_pruning(compose(plain, tmp_path).pruning).algorithm.prune_mode == "mask"


def test_image_ablations_pass_the_module_option_to_the_module_not_the_callback(tmp_path):
    text = "--part images --models cnn --methods sapp --ablations logit_lr_x10 --seeds 0 --sparsities 0.95 --blocks 16"
    _, job = quality.grid(args(text + " --min-blocks 16"))
    assert job["key"].endswith("pruning.min_blocks=16 model.module.logit_lr_scale=10 seed=0 trainer.max_epochs=2")
    cfg = compose(job, tmp_path)
    assert cfg.model.module.logit_lr_scale == 10 and cfg.pruning.min_blocks == 16
    assert build_pruning(cfg.pruning).algorithm.name == "sapp"  # BlockPruning would reject logit_lr_scale
    _, job = quality.grid(args(text.replace("images", "ctr")))
    assert compose(job, tmp_path).model.module.logit_lr_scale == 10  # CTRModule has the option too


def test_tables_show_auroc_and_achieved_sparsity_and_read_the_committed_lines():
    text = quality.tables(load_runs(quality.RESULTS / "ctr25.jsonl"))  # the numbers docs/results.md shows
    bce = text[text.index("validation BCE") : text.index("test BCE")]
    assert cells(bce, "90%", "SA++") == ["0.6760 ± 0.0394 (90.0%) [0.4535]"]
    assert cells(bce, "0%", "Dense") == ["0.7370 ± 0.0996 [0.4489]"]
    auroc = text[text.index("validation AUROC") : text.index("test AUROC")]
    assert cells(auroc, "99%", "ACDC") == ["0.6731 ± 0.0075 (99.0%)"]
    both = {name: load_runs(quality.RESULTS / name) for name in ("ctr25.jsonl", "ctr.jsonl")}
    both = compare_table(both, "auroc_mean")  # the two grids side by side, 25 and 3 epochs
    assert cells(both, "90%", "10", "SA++") == ["0.6700 ± 0.0170 (n=3)", "0.6423 ± 0.0054 (n=3)"]
    text = quality.tables(load_runs(quality.RESULTS / "ablations.jsonl"))  # older lines: ablations by name
    variants = text[text.index("CriteoPaperNet (ctr, 3 epochs), variants: validation BCE") :]
    assert cells(variants, "90%", "SA++ c2") == ["0.6775 ± 0.0202"]
    assert cells(variants, "98%", "SA++ logit_l2_1e-4") == ["0.6759 ± 0.0103"]
    text = quality.tables(load_runs(quality.RESULTS / "images.jsonl"))
    mlp = text[text.index("MLP (classification, 2 epochs), pruned net.1, net.3 ") :]
    assert cells(mlp, "95%", "SA++")[:2] == ["81.11 ± 1.35 (95.0%) [64.27]", "81.95 ± 0.73 (95.0%) [65.41]"]
    cnn = text[text.index("SmallCNN (classification, 2 epochs), pruned net.classifier.1, net.features.4 ") :]
    assert cells(cnn, "90%", "ACDC") == ["87.90 ± 0.35 (90.0%) [67.74]", "87.72 ± 0.40 (90.0%) [68.61]",
                                         "87.10 ± 0.41 (90.0%) [68.96]"]  # fmt: skip


def test_a_run_with_exactly_the_same_composed_config_is_reused_not_trained_again(tmp_path):
    source, out = tmp_path / "sweep.jsonl", tmp_path / "grid.jsonl"
    text = "--part ctr --methods sapp --seeds 0 --sparsities 0.9 --blocks 10 --set pruning.schedule_exponent=4,2"
    for job in quality.grid(args(text)):  # 4 is the default: the same config as the plain run
        append_row(source, dict(job, val={"val/loss": float("exponent=2" in job["key"])}))
    jobs = quality.grid(args("--part ctr --methods sapp --seeds 0 1 --sparsities 0.9 --blocks 10"))
    assert quality.reuse(jobs, [source], out) == 1 and quality.reuse(jobs, [source], out) == 0
    (row,) = load_done(out).values()
    assert row["key"] == jobs[0]["key"] and row["variant"] == "" and row["val"] == {"val/loss": 0.0}
    assert row["reused_from"] == "sweep.jsonl: " + jobs[0]["key"].replace(
        "seed=0", "pruning.schedule_exponent=4 seed=0"
    )
