"""The benchmark scripts: their ``--quick`` modes end to end (slow), and the resumable store and tables (fast)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import quality  # noqa: E402
from bench.common import append_row, load_done  # noqa: E402


def _run(script: str, *args: str, timeout: float = 240) -> str:
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
    rows = list(load_done(out).values())
    assert len(rows) == len(quality.quick_jobs())
    assert {r["part"] for r in rows} == {"ctr", "images"}
    for r in rows:
        if r["method"] != "dense":
            assert r["achieved_sparsity"] == pytest.approx(0.9, abs=0.01)
    assert "CTR (MovieLens-100k), validation BCE" in text
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
    assert {r["batch"] for r in rows} == {1, 32, 256}
    assert {r["model"] for r in rows} == {"square", "mlp"}
    assert all(r["limit"] == pytest.approx(10.0) for r in rows)
    assert "limit 1/(1-s)" in text
    # blocks of 16: the rule picks BSR for 1 row, CSR from 32; the files are a fraction of the dense one
    assert {r["batch"]: r["auto_layouts"][0] for r in rows if r["model"] == "mlp"} == {1: "bsr", 32: "csr", 256: "csr"}
    assert all(r["file_bytes"]["bsr"] < 0.12 * r["file_bytes"]["dense"] for r in rows)


def test_store_skips_finished_runs_and_torn_lines(tmp_path):
    path = tmp_path / "runs.jsonl"
    append_row(path, {"key": "a", "val_loss": 0.5})
    with path.open("a") as f:
        f.write('{"key": "b", "val_')  # an interrupted write
    assert set(load_done(path)) == {"a"}


def test_store_refuses_a_finished_run_made_with_other_settings(tmp_path):
    from bench.common import run_pool

    path = tmp_path / "runs.jsonl"
    job = {"key": "images/cnn/sapp/s0.9/b16/seed0/e2", "min_blocks": 16}
    append_row(path, dict(job, val_acc=85.0))
    assert run_pool([job], lambda j: pytest.fail("a finished run was trained again"), path, 1) == []
    with pytest.raises(ValueError, match=r"min_blocks=16 there, 17 asked\); use another --out"):
        run_pool([dict(job, min_blocks=17)], lambda j: j, path, 1)


def test_image_tables_compare_only_runs_that_pruned_the_same_layers(tmp_path, capsys):
    path = tmp_path / "images.jsonl"
    with_classifier = {"net.features.4": [68, 72], "net.classifier.1": [2979, 3136], "net.classifier.3": [15, 16]}
    runs = {  # (block, min_blocks): (accuracy, pruned layers)
        (16, 16): (80.0, with_classifier),
        (16, 17): (86.0, {"net.features.4": [68, 72], "net.classifier.1": [2979, 3136]}),
        (32, 16): (87.0, {"net.features.4": [17, 18], "net.classifier.1": [745, 784]}),
    }
    for (block, min_blocks), (acc, layers) in runs.items():
        argv = f"--part images --models cnn --seeds 0 --sparsities 0.95 --methods sapp --blocks {block} --min-blocks"
        for job in quality.image_jobs(quality.parse_args([*argv.split(), str(min_blocks)])):
            row = dict(val_acc=90.0, test_acc=0.0) if job["method"] == "dense" else dict(val_acc=acc, test_acc=0.0)
            append_row(path, dict(job, **row, achieved_sparsity=0.95, pruned_layers=layers))
    assert set(load_done(path)) == {
        "images/cnn/dense/s0.0/b0/seed0/e3", "images/cnn/sapp/s0.95/b16/mb16/seed0/e3",
        "images/cnn/sapp/s0.95/b16/mb17/seed0/e3", "images/cnn/sapp/s0.95/b32/mb16/seed0/e3",
    }  # fmt: skip
    quality.print_tables([path])
    text = capsys.readouterr().out
    title = "Fashion-MNIST cnn, pruned net.classifier.1, net.features.4 (B=16: min_blocks=17, B=32: min_blocks=16)"
    same = text[text.index(title + ", validation") : text.index(title + ", test")]
    assert "| 0 | dense | 90.00 ± 0.00 (n=1) |" in same
    assert "| 95% | sapp | 86.00 ± 0.00 (n=1) (95.0%) | 64.27 | 87.00 ± 0.00 (n=1) (95.0%) | 65.41 |" in same
    title = "Fashion-MNIST cnn, pruned net.classifier.1, net.classifier.3, net.features.4 (B=16: min_blocks=16)"
    other = text[text.index(title + ", validation") : text.index(title + ", test")]
    assert "| 95% | sapp | 80.00 ± 0.00 (n=1) (95.0%) | 64.27 |" in other and "86.00" not in other


def test_images_ablation_without_sparsification_follows_the_imagenet_acdc_plan():
    argv = "--part ablations --ablations-on images --models cnn --ablations no_sparsify --seeds 0 --sparsities 0.9"
    (job,) = quality.ablation_jobs(quality.parse_args(argv.split()))
    assert job["options"] == {"plan": "imagenet_acdc"}
    assert quality.make_pruning(job).plan == quality.make_pruning(dict(job, method="acdc", options={})).plan
    rows = [dict(job, val_acc=80.0), dict(job, method="sapp", options={}, key="x", val_acc=82.0)]
    assert "| sparsity | block | sapp | no_sparsify |" in quality.ablation_table(rows, "val_acc", 2)


@pytest.mark.parametrize("part", ["ctr", "images"])
def test_zero_mode_ablation_zeroes_pruned_blocks_on_either_part(part):
    argv = f"--part ablations --ablations-on {part} --models cnn --ablations zero_mode --seeds 0 --sparsities 0.9"
    (job,) = quality.ablation_jobs(quality.parse_args(argv.split()))
    assert quality.make_pruning(job).algorithm.prune_mode == "zero"
    assert quality.make_pruning(dict(job, options={})).algorithm.prune_mode == "mask"


def test_jobs_and_paper_shaped_table():
    args = quality.parse_args(["--part", "ctr", "--seeds", "0", "1", "--blocks", "10", "--sparsities", "0.9"])
    jobs = quality.ctr_jobs(args)
    assert len(jobs) == 2 + 2 * 4 and len({j["key"] for j in jobs}) == len(jobs)
    rows = [dict(j, val_loss=0.5 + 0.01 * j["seed"], achieved_sparsity=0.9) for j in jobs]
    table = quality.paper_shaped_table(rows, "val_loss", 4)
    assert "| 90% | sapp | 0.5050 ± 0.0071 (n=2) (90.0%) | 0.4535 |" in table
    assert "| 0 | dense | 0.5050 ± 0.0071 (n=2) |" in table
    rows = [dict(r, val_auroc=0.7) for r in rows]  # the paper reports no AUROC: no paper value beside it
    table = quality.paper_shaped_table(rows, "val_auroc", 4, with_paper=False)
    assert "| 90% | sapp | 0.7000 ± 0.0000 (n=2) (90.0%) | - |" in table


def test_image_ablations_pass_the_module_option_to_the_module_not_the_callback():
    argv = "--part ablations --ablations-on images --models cnn --ablations logit_lr_x10 --seeds 0 --sparsities 0.95"
    args = quality.parse_args([*argv.split(), "--min-blocks", "16"])
    (job,) = quality.ablation_jobs(args)
    assert job["key"] == "images/cnn/sapp/s0.95/b16/mb16/seed0/e3/logit_lr_scale=10.0" and job["min_blocks"] == 16
    assert quality.make_pruning(job).algorithm.name == "sapp"  # BlockPruning would reject logit_lr_scale
    with pytest.raises(ValueError, match="run these ablations on images"):
        quality.build_module(dict(job, part="ctr"))
