"""Shared pieces of the timing benchmarks: quiet in-process training, interleaved timing, the machine's description.

The cost benchmarks train with the public API (``BlockPruning``, the data modules, the models and LightningModules
of ``sapp_lightning.app.models``) in the current process, on one thread, with Lightning's extras turned off. Quality
grids are not benchmarks of their own: they are ``sapp-train -m ... +bench=fast`` sweeps (docs/results.md).
"""

from __future__ import annotations

import os
import platform
import statistics
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

_DATA_CACHE: dict[str, Any] = {}


def quiet() -> None:
    """Silence Lightning's per-run banners and warnings (they cost time and bury the progress lines)."""
    import logging

    for name in (
        "pytorch_lightning",
        "pytorch_lightning.utilities.rank_zero",
        "lightning",
        "lightning.pytorch",
        "lightning.pytorch.utilities.rank_zero",
        "lightning_fabric",
        "sapp_lightning",
        "sapp_lightning.callback",
    ):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")


def trainer_kwargs() -> dict[str, Any]:
    """The Trainer settings every benchmark run uses: CPU, no logger, checkpoint, progress bar or summary."""
    return dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,  # validation runs once, after fit, on the committed model
        deterministic=False,
    )


def fashion_mnist(batch_size: int = 256) -> Any:
    """The Fashion-MNIST data module (55k train / 5k val / 10k test), set up once per process."""
    key = f"fmnist{batch_size}"
    if key not in _DATA_CACHE:
        from sapp_lightning.app.data import FashionMNISTDataModule

        dm = FashionMNISTDataModule(batch_size=batch_size, download=False)
        dm.setup("fit")
        _DATA_CACHE[key] = dm
    return _DATA_CACHE[key]


def machine() -> dict[str, Any]:
    """What produced the numbers: CPU, core count, torch and Lightning versions."""
    import pytorch_lightning as pl

    return {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "lightning": pl.__version__,
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d"),
    }


def load() -> float:
    """The 1-minute load average now (other processes on this machine skew a timing; the rows record it)."""
    return float(Path("/proc/loadavg").read_text().split()[0])


def median(values: list[float]) -> float:
    return statistics.median(values)


def interleaved_times(fns: dict[str, Callable[[], None]], repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    """Time each function ``repeats`` times, interleaved (A B C A B C ...) so load changes hit all alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return times


def memory_bandwidth(threads: int, small_numel: int, large_numel: int = 50_000_000, repeats: int = 7) -> dict[str, Any]:
    """What one pass over a tensor costs here: GB/s of ``torch.mul(a, b, out=c)`` (2 reads + 1 write of 4-byte
    floats, the median of ``repeats`` after a warm-up) on ``large_numel`` floats (far beyond the caches) and on
    ``small_numel`` (e.g. the pruned weights of one model, which may stay in cache between passes)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    result: dict[str, Any] = {"threads": threads, "large_numel": large_numel, "small_numel": small_numel}
    try:
        for name, numel in (("large", large_numel), ("small", small_numel)):
            a, b, c = torch.rand(numel), torch.rand(numel), torch.empty(numel)
            torch.mul(a, b, out=c)
            times = []
            for _ in range(repeats if numel >= 10_000_000 else 20 * repeats):
                t0 = time.perf_counter()
                torch.mul(a, b, out=c)
                times.append(time.perf_counter() - t0)
            result[f"{name}_gbps"] = 3 * 4 * numel / statistics.median(times) / 1e9
            del a, b, c
    finally:
        torch.set_num_threads(previous)
    return result


def zero_random_blocks_(layer: torch.nn.Linear, block: int, sparsity: float) -> torch.nn.Linear:
    """Zero ``sparsity`` of ``layer``'s ``block x block`` weight blocks, chosen at random (a committed layer)."""
    from sapp_lightning.blocks import BlockLayout, keep_count

    layout = BlockLayout.for_weight(layer.weight, block)
    mask = torch.zeros(layout.num_blocks)
    mask[torch.randperm(layout.num_blocks)[: keep_count(layout.num_blocks, sparsity)]] = 1
    with torch.no_grad():
        layer.weight.mul_(layout.expand(mask.reshape(layout.grid_shape)))
    return layer


def prune_like_committed_(
    model: torch.nn.Module,
    block: int,
    sparsity: float,
    min_blocks: int = 0,
    include: list[str] | None = None,
) -> torch.nn.Module:
    """Zero ``sparsity`` of the blocks of every weight BlockPruning would prune (``sapp_lightning.targets``: Linear,
    Conv2d, Conv1D, MultiheadAttention's input projection; ``min_blocks`` and ``include`` as in BlockPruning), chosen
    at random, as a committed model has them. Returns ``model``."""
    from sapp_lightning.blocks import keep_count
    from sapp_lightning.targets import compile_patterns, survey

    chosen, _, _ = survey(model, block, min_blocks, compile_patterns(include, "include"))
    with torch.no_grad():
        for candidate in chosen:
            layout = candidate.layout
            mask = torch.zeros(layout.num_blocks)
            mask[torch.randperm(layout.num_blocks)[: keep_count(layout.num_blocks, sparsity)]] = 1
            candidate.weight.mul_(layout.expand(mask.reshape(layout.grid_shape)))
    return model
