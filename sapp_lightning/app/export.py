"""``sapp-export RUN_DIR``: a finished ``sapp-train`` run to a deployable block-sparse model.

    sapp-export runs/2026-12-07/10-00-00                    # batch 32, the threads torch uses here
    sapp-export runs/demo/1 --batch-size 1 --threads 1       # choose kernels and measure for one row at a time
    sapp-export runs/imagenet_sapp data.root=/data/imagenet  # config overrides (what building the model needs)

Reads the run's composed config (``RUN_DIR/.hydra/config.yaml``), its committed weights (``model.pt``) and results
(``results.json``); checks that the weights are block-sparse at the recorded block size; exports the layers the run
pruned (its ``pruning.block_size``, ``include``, ``exclude``, ``min_blocks``) with
:func:`~sapp_lightning.export.to_block_sparse`; writes ``model_block_sparse.pt`` (restore it with
:func:`load_exported`, or :func:`~sapp_lightning.export.load_block_sparse` into the run's LightningModule),
``block_sparse_summary.txt`` and ``export.json``; and prints the speedup over the dense model measured at the batch
given. ``sapp-train ... export.enabled=true`` does the same when training ends.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf

from sapp_lightning import block_sparsity
from sapp_lightning.export import ExportSummary, load_block_sparse, save_block_sparse, to_block_sparse

MODEL_FILE, SUMMARY_FILE, RESULT_FILE = "model_block_sparse.pt", "block_sparse_summary.txt", "export.json"
SPARSITY_SLACK = 0.05  # a pruned layer may have fewer zero blocks than planned by this much (rounding, ties)


class ExportError(ValueError):
    """A run folder that cannot be exported, with what to do about it."""


def read_run(
    run_dir: Path, overrides: list[str] | None = None, cfg: DictConfig | None = None
) -> tuple[DictConfig, dict[str, Any]]:
    """The run's composed config (``cfg``, or ``.hydra/config.yaml``, with ``overrides``) and its ``results.json``;
    refuses a folder that is not a finished, pruned run."""
    if not run_dir.is_dir():
        raise ExportError(f"{run_dir} is not a folder")
    config = run_dir / ".hydra" / "config.yaml"
    if cfg is None and not config.is_file():
        raise ExportError(f"{run_dir} is not a sapp-train run folder: it has no .hydra/config.yaml")
    cfg = cfg if cfg is not None else OmegaConf.load(config)
    if overrides:
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(overrides))
    if cfg.pruning.algorithm == "dense":
        raise ExportError(f"{run_dir} is a dense run (pruning=dense): nothing in it is block-sparse")
    if not (run_dir / "model.pt").is_file() or not (run_dir / "results.json").is_file():
        raise ExportError(
            f"{run_dir} has no committed model (model.pt and results.json are written when training ends): the run "
            f"never finished; resume it with `sapp-train ... hydra.run.dir={run_dir} ckpt_path=last`"
        )
    return cfg, json.loads((run_dir / "results.json").read_text())


@dataclass(frozen=True)
class Shapes:
    """What the run's model takes: an image batch ``input_shape``, or a CTR batch (``num_dense`` features and one
    category per table)."""

    input_shape: tuple[int, ...] = ()
    num_dense: int = 0
    cardinalities: tuple[int, ...] = ()

    def inputs(self, batch_size: int) -> tuple[torch.Tensor, ...]:
        """Random inputs for one batch (for the timing)."""
        gen = torch.Generator().manual_seed(0)
        if not self.cardinalities:
            return (torch.randn(batch_size, *self.input_shape, generator=gen),)
        categorical = [torch.randint(n, (batch_size,), generator=gen) for n in self.cardinalities]
        return torch.randn(batch_size, self.num_dense, generator=gen), torch.stack(categorical, dim=1)


def build_model(
    cfg: DictConfig, state: dict[str, torch.Tensor], datamodule: Any = None
) -> tuple[torch.nn.Module, Shapes]:
    """The run's LightningModule with the committed weights ``state`` (on the CPU, in eval mode), and its inputs.

    The architecture needs the data's shapes: a CTR model's table sizes come from the weights and its dense-feature
    count from the data module's class, so no data is read; an image model's from the data module (ImageNet reads
    its class folders: give ``data.root=...`` where they are elsewhere).
    """
    from .builders import build_module

    if datamodule is None and cfg.model.task == "ctr":
        tables = sorted((k for k in state if k.startswith("net.embeddings.") and k.endswith(".weight")),
                        key=lambda k: int(k.split(".")[2]))  # fmt: skip
        num_dense = get_class(cfg.data._target_).num_dense
        datamodule = argparse.Namespace(num_dense=num_dense, cardinalities=[state[k].shape[0] for k in tables])
    elif datamodule is None:
        try:
            datamodule = instantiate(cfg.data)
        except Exception as error:
            message = f"cannot build the model: its data module needs its data for the shapes ({error})"
            raise ExportError(message) from error
    module = build_module(cfg, datamodule)
    module.load_state_dict(state, strict=True)
    if cfg.model.task == "ctr":
        shapes = Shapes(num_dense=datamodule.num_dense, cardinalities=tuple(datamodule.cardinalities))
    else:
        shapes = Shapes(input_shape=tuple(datamodule.input_shape))
    return module.cpu().eval(), shapes


def check_block_sparse(module: torch.nn.Module, cfg: DictConfig, results: dict[str, Any], run_dir: Path) -> None:
    """Refuse weights that are not block-sparse at the recorded block size (another run's model.pt, a block size
    changed in the config)."""
    p = cfg.pruning
    report = block_sparsity(module, p.block_size, include=p.include, exclude=p.exclude, min_blocks=p.min_blocks)
    pruned = results.get("pruned_layers") or [layer.name for layer in report.layers]
    found = {layer.name: layer.block_sparsity for layer in report.layers}
    short = [
        f"{name} ({found.get(name, 0.0):.0%})" for name in pruned if found.get(name, 0.0) < p.sparsity - SPARSITY_SLACK
    ]
    if short:
        raise ExportError(
            f"{run_dir}/model.pt is not block-sparse at the recorded block size {p.block_size}: the run pruned "
            f"{', '.join(pruned[:5])} to {p.sparsity:.0%} zero blocks, and has {', '.join(short[:5])}. Is model.pt "
            "from another run, or was pruning.block_size changed?"
        )


def time_pair(dense: torch.nn.Module, sparse: torch.nn.Module, inputs, repeats: int) -> tuple[float, float]:
    """Median seconds per call of each model, timed interleaved (a load change hits both alike)."""
    times: dict[str, list[float]] = {"dense": [], "sparse": []}
    with torch.inference_mode():
        for model in (dense, sparse):
            model(*inputs)
        for _ in range(repeats):
            for name, model in (("dense", dense), ("sparse", sparse)):
                start = time.perf_counter()
                model(*inputs)
                times[name].append(time.perf_counter() - start)
    return statistics.median(times["dense"]), statistics.median(times["sparse"])


def export_run(
    run_dir: str | Path,
    batch_size: int = 32,
    out: str | Path | None = None,
    measure: bool = True,
    repeats: int = 10,
    overrides: list[str] | None = None,
    cfg: DictConfig | None = None,
    datamodule: Any = None,
) -> dict[str, Any]:
    """Export a finished run (see the module docstring); returns what ``export.json`` holds. ``cfg`` and
    ``datamodule``: those of the run in progress (``sapp-train export.enabled=true``)."""
    run_dir = Path(run_dir)
    cfg, results = read_run(run_dir, overrides, cfg)
    state = torch.load(run_dir / "model.pt", map_location="cpu", weights_only=True)
    module, shapes = build_model(cfg, state, datamodule)
    check_block_sparse(module, cfg, results, run_dir)
    p = cfg.pruning
    sparse = to_block_sparse(module, p.block_size, include=p.include, exclude=p.exclude, min_blocks=p.min_blocks,
                             batch_size=batch_size)  # fmt: skip
    summary: ExportSummary = sparse.block_sparse_summary
    path = Path(out) if out is not None else run_dir / MODEL_FILE
    save_block_sparse(sparse, path)
    (run_dir / SUMMARY_FILE).write_text(summary.format() + "\n")
    record: dict[str, Any] = {
        "model_file": str(path),
        "batch_size": batch_size,
        "threads": torch.get_num_threads(),
        "exported_layers": len(summary.exported),
        "dense_layers": len(summary.dense),
        "file_bytes": {"dense": (run_dir / "model.pt").stat().st_size, "block_sparse": path.stat().st_size},
        "summary": summary.to_dict(),
    }
    if measure:
        inputs = shapes.inputs(batch_size)
        dense_s, sparse_s = time_pair(module, sparse, inputs, repeats)
        record.update(dense_ms=1e3 * dense_s, block_sparse_ms=1e3 * sparse_s, speedup=dense_s / sparse_s)
    (run_dir / RESULT_FILE).write_text(json.dumps(record, indent=2))
    return record


def load_exported(run_dir: str | Path, overrides: list[str] | None = None) -> torch.nn.Module:
    """The run's LightningModule with its block-sparse layers, from ``RUN_DIR/model_block_sparse.pt``."""
    run_dir = Path(run_dir)
    cfg, _ = read_run(run_dir, overrides)
    state = torch.load(run_dir / "model.pt", map_location="cpu", weights_only=True)
    return load_block_sparse(run_dir / MODEL_FILE, build_model(cfg, state)[0]).eval()


def describe(record: dict[str, Any]) -> str:
    """What ``sapp-export`` prints."""
    sizes = record["file_bytes"]
    text = (
        f"{record['exported_layers']} layers block-sparse, {record['dense_layers']} dense "
        f"(per layer: {Path(record['model_file']).with_name(SUMMARY_FILE)})\n"
        f"{record['model_file']}: {sizes['block_sparse'] / 1e6:.2f} MB (dense model.pt {sizes['dense'] / 1e6:.2f} MB)"
    )
    if "speedup" in record:
        text += (
            f"\nbatch {record['batch_size']}, {record['threads']} thread(s): {record['speedup']:.2f}x the dense "
            f"model's speed (per batch: dense {record['dense_ms']:.3f} ms, block-sparse "
            f"{record['block_sparse_ms']:.3f} ms)"
        )
    return text


def run_command(args: argparse.Namespace) -> int:
    """What ``sapp-export`` does once its arguments are parsed (:func:`sapp_lightning.app.cli.export`)."""
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        record = export_run(args.run_dir, args.batch_size, args.out, not args.no_measure, args.repeats, args.overrides)
    except ExportError as error:
        print(f"sapp-export: error: {error}", file=sys.stderr)
        return 2
    print(describe(record))
    return 0
