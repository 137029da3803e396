"""The command-line tools, light to import: each parses its arguments before torch or Lightning is imported, so
``--help`` answers at once.

* ``sapp-train`` (:func:`train`): the Hydra app over ``conf/`` and ``recipes/``;
* ``sapp-results`` (:func:`results`): tables and figures of runs, sweeps and stored runs (``.jsonl``); pandas and
  matplotlib load after the arguments are parsed.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

try:
    import hydra
    from omegaconf import DictConfig
except ImportError as err:  # pragma: no cover - depends on the installation
    raise SystemExit(f"the sapp_lightning tools need the app extra: pip install 'sapp_lightning[app]' ({err})") from err

from .configs import CONFIG_DIR

#: what ``sapp-results --compare`` puts side by side
COMPARED = {
    "mean": "validation BCE or top-1 %",
    "test_mean": "test BCE or top-1 %",
    "auroc_mean": "validation AUROC",
    "test_auroc_mean": "test AUROC",
}


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="config")
def _train(cfg: DictConfig) -> float | None:
    from .data.base import MISSING_DATA
    from .train import run

    try:
        results = run(cfg)
    except Exception as err:
        missing = next((e for e in _causes(err) if isinstance(e, MISSING_DATA)), None)
        if missing is None:
            raise
        recipe = cfg.get("name") or "NAME"
        raise SystemExit(  # one paragraph instead of a traceback: what is missing, and the ways to get it
            f"sapp-train: the data set of this run is missing. {missing}\nThe data module's arguments are data.* on "
            f"the command line (data.root=PATH, data.data_dir=PATH, ...). To try recipe={recipe} without the data "
            f"set, on generated data: sapp-train recipe={recipe} smoke=true"
        ) from None
    key = "val/acc" if cfg.model.task == "classification" else "val/loss"
    return None if results is None else results["val"].get(key)


def _causes(err: BaseException):
    """``err`` and the exceptions it was raised from (Hydra wraps a failed instantiation in its own)."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__ or err.__context__


def train() -> None:
    """``sapp-train``: Hydra parses the command line (``--help``, ``--cfg job``, overrides, ``-m``) first; a run
    returns its validation metric so that sweepers can optimize it."""
    sys.argv[0] = "sapp-train"  # Hydra names the app after the program in its help and logs
    _train()


def results(argv: Sequence[str] | None = None) -> int:
    """``sapp-results``: the tables of runs, sweeps and JSON-lines stores; ``--plot`` their figures, ``--train-acc``
    the training-accuracy overlay, ``--jsonl`` appends the runs to a store. Returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="sapp-results",
        description="Tables and figures of runs: run or sweep folders (every results.json below) and JSON-lines "
        "stores (one results.json a line, e.g. bench/results/*.jsonl).",
    )
    parser.add_argument("sources", nargs="+", metavar="SOURCE", help="run or sweep folders, or .jsonl stores")
    parser.add_argument(
        "--plot", action="store_true",
        help="draw the figures: a folder's comparison figure (results.png) and each pruned run's sparsity_curve.png "
        "in its folder; a .jsonl store's comparison figures beside it (or in --out); SA++ attention against "
        "magnitude scores where such runs pair up",
    )  # fmt: skip
    parser.add_argument(
        "--paper", action="append", choices=["auto", "imagenet", "criteo", "none"],
        help="the paper's numbers in brackets: auto (default) for ResNet50 on ImageNet and the Criteo model on "
        "Criteo; imagenet or criteo beside every run of that task (repeat for both); none",
    )  # fmt: skip
    parser.add_argument("--out", metavar="DIR", help="write every figure into DIR")
    parser.add_argument(
        "--train-acc", metavar="OUT.png",
        help="training accuracy over steps of the sources' runs (their CSV logs; metrics.csv files too), one line "
        "per run (the paper's Fig. 3)",
    )  # fmt: skip
    parser.add_argument("--smooth", type=int, metavar="N", help="--train-acc's running mean over N logged steps")
    parser.add_argument("--jsonl", metavar="OUT.jsonl", help="append the runs to this store (skipping those there)")
    parser.add_argument(
        "--compare", action="store_true",
        help="instead of the tables, each source's plain runs side by side (e.g. one grid before and after a change)",
    )  # fmt: skip
    args = parser.parse_args(argv)

    from .results import append_jsonl, compare_table, load_runs, report  # pandas: after the arguments parsed

    paper = None if "none" in (args.paper or []) else args.paper or "auto"
    sources = [s for s in args.sources if not s.endswith(".csv")]  # a bare CSV log only draws --train-acc
    try:
        if args.compare:
            frames = {Path(source).name: load_runs(source) for source in sources}
            for stat, label in COMPARED.items():
                table = compare_table(frames, stat)
                if "±" in table:
                    print(f"{label}, mean ± std over seeds\n\n{table}\n")
        elif sources:
            frame = load_runs(sources)
            print(f"{len(frame)} runs from {', '.join(sources)}\n\n{report(frame, paper)}")
        if args.jsonl:
            added, skipped = append_jsonl(load_runs(sources), args.jsonl)
            print(f"\n{args.jsonl}: {added} runs appended, {skipped} already there")
    except (FileNotFoundError, ValueError) as err:
        print(err, file=sys.stderr)
        return 1
    if not (args.plot or args.train_acc):
        return 0
    try:
        from .plots import SCORE_FIGURE, plot_sources, save_train_accuracy

        written = plot_sources(sources, args.out) if args.plot else []
        if args.train_acc:
            written.append(save_train_accuracy(args.sources, args.train_acc, args.smooth))
    except (ImportError, FileNotFoundError, ValueError) as err:
        print(f"\nno figures: {err}", file=sys.stderr)
        return 1
    print()
    for path in written:
        kind = "sparsity curve" if path.name.startswith("sparsity_curve") else "comparison figure"
        kind = "score-difference figure" if path.name == SCORE_FIGURE else kind
        print(f"{'training accuracy' if args.train_acc and str(path) == args.train_acc else kind}: {path}")
    return 0


def export(argv: Sequence[str] | None = None) -> int:
    """``sapp-export RUN_DIR``: a finished run's committed model as a block-sparse model file, its summary and the
    speedup measured at the batch given (:mod:`sapp_lightning.app.export`). Returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="sapp-export",
        description="A finished sapp-train run to a block-sparse model for inference: model_block_sparse.pt, "
        "block_sparse_summary.txt and export.json in RUN_DIR, and the speedup measured at --batch-size.",
    )
    parser.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a finished sapp-train run folder")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. data.root=/data/imagenet")
    parser.add_argument("--batch-size", type=int, default=32, help="rows per call to choose kernels for and time")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--out", type=Path, help="the model file (default: RUN_DIR/model_block_sparse.pt)")
    parser.add_argument("--repeats", type=int, default=10, help="timed calls of each model")
    parser.add_argument("--no-measure", action="store_true", help="skip the timing")
    args = parser.parse_args(argv)
    from .export import run_command

    return run_command(args)
