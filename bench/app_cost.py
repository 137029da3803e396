"""What the app costs around the step: whole ``sapp-train`` fits of the demo against the step-level cost of the same
algorithm on the same model and batch, interleaved round by round in one process (issue 23's target: a pruned
run's fit ratio to dense at most 1.15x its step ratio).

    python bench/app_cost.py                      # the demo's runs (recipe=fashion_mnist_demo, 6 epochs), 3 rounds
    python bench/app_cost.py --epochs 2 --rounds 5 --threads 2

Each round runs, per method, one app fit (``recipe=fashion_mnist_demo pruning=METHOD``, the recipe's loggers,
checkpoints and heatmaps included; ``fit_seconds`` of its ``results.json``) and the step-level benchmark of
``bench/training_cost.py`` for every phase the method's plan has (one-phase plans, the median step of a second
epoch). A method's step ratio is its phases' step ratios to dense weighted by the steps its app run spent in each
phase (from the run's ``results.json``, ``"pruning"``); its app ratio is its fit time over the dense fit of the same
round. Ratios are per round; the median [min, max] over rounds is printed and written to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import load, machine, quiet  # noqa: E402
from bench.training_cost import Setting, time_config  # noqa: E402

METHODS = ("dense", "sapp", "acdc", "magnitude", "powerprop", "gmp")
TARGET = 1.15


def app_fit(method: str, epochs: int, seed: int, folder: Path) -> dict[str, Any]:
    """One ``sapp-train recipe=fashion_mnist_demo pruning=METHOD`` run in this process; its ``results.json``."""
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig

    from sapp_lightning.app.configs import CONFIG_DIR
    from sapp_lightning.app.train import run

    overrides = ["recipe=fashion_mnist_demo", f"pruning={method}", f"trainer.max_epochs={epochs}", f"seed={seed}",
                 "trainer.enable_progress_bar=false", f"output_dir={folder}"]  # fmt: skip
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("config", overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    return run(cfg)


def phase_steps(results: dict[str, Any]) -> dict[str, int]:
    """Steps the run spent in each kind of phase (dense, sparsify, sparse)."""
    spent: dict[str, int] = {}
    for phase in (results.get("pruning") or {}).get("phases", []):
        spent[phase["phase"]] = spent.get(phase["phase"], 0) + phase["end"] - phase["start"]
    return spent


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=6, help="the demo's epochs (default 6, the recipe's)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "app_cost.json")
    args = p.parse_args(argv)
    quiet()
    torch.set_num_threads(args.threads)
    setting = Setting("mlp", hidden=(512, 512), steps=30)  # the demo's MLP at its batch (256)
    methods = ["dense", *(m for m in args.methods if m != "dense")]
    fits: dict[str, list[float]] = {m: [] for m in methods}
    steps: dict[tuple[str, str], list[float]] = {}
    spent: dict[str, dict[str, int]] = {}
    loads: list[float] = []  # the 1-minute load average at the end of each round
    with tempfile.TemporaryDirectory(prefix="app-cost-") as tmp:
        for r in range(args.rounds):
            for m in methods:  # the app fits
                results = app_fit(m, args.epochs, seed=r, folder=Path(tmp) / f"{m}{r}")
                fits[m].append(results["fit_seconds"])
                spent[m] = phase_steps(results)
            dense_step = time_config(setting, "dense", None, seed=r)[1]
            for m in methods[1:]:  # the steps of each phase the method's run went through
                for phase in spent[m]:
                    step = time_config(setting, m, phase, seed=r)[1]
                    steps.setdefault((m, phase), []).append(step / dense_step)
            loads.append(load())
            line = " ".join(f"{m}={fits[m][-1] / fits['dense'][-1]:.2f}" for m in methods[1:])
            print(f"[round {r + 1}/{args.rounds}] app fit / dense fit: {line} (load {loads[-1]:.2f})", flush=True)
    rows = {}
    for m in methods[1:]:
        total = sum(spent[m].values())
        per_round = []
        for r in range(args.rounds):
            step_ratio = sum(n / total * steps[(m, phase)][r] for phase, n in spent[m].items())
            app_ratio = fits[m][r] / fits["dense"][r]
            per_round.append((app_ratio, step_ratio, app_ratio / step_ratio))
        rows[m] = {
            "phase_steps": spent[m],
            "app_ratio": [a for a, _, _ in per_round],
            "step_ratio": [s for _, s, _ in per_round],
            "app_over_step": [x for _, _, x in per_round],
            "fit_seconds": fits[m],
        }
    rows["dense"] = {"fit_seconds": fits["dense"]}
    print(f"\n{args.epochs}-epoch demo fits, {args.threads} threads, {args.rounds} rounds: median [min, max]\n")
    print("| method | phases (steps) | app fit / dense fit | step / dense step | app over step | target |")
    print("|---|---|---|---|---|---|")
    for m in methods[1:]:
        row = rows[m]

        def cell(values: list[float]) -> str:
            return f"{statistics.median(values):.2f} [{min(values):.2f}, {max(values):.2f}]"

        phases = ", ".join(f"{k} {v}" for k, v in row["phase_steps"].items())
        ok = "met" if statistics.median(row["app_over_step"]) <= TARGET else "missed"
        print(f"| {m} | {phases} | {cell(row['app_ratio'])} | {cell(row['step_ratio'])} | "
              f"{cell(row['app_over_step'])} | {TARGET:.2f}: {ok} |")  # fmt: skip
    dense_fit = statistics.median(fits["dense"])
    print(f"\ndense fit: {dense_fit:.1f} s (median); load average {min(loads):.2f}-{max(loads):.2f} after the rounds")
    record = {"machine": machine(), "epochs": args.epochs, "threads": args.threads, "rounds": args.rounds,
              "load_average": loads, **rows}  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2))
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
