"""Block-sparse inference: the exported model (``sapp_lightning.export``) against the dense committed model.

    python bench/inference.py            # MLP 784-512-512-10, blocks 16, sparsity 70/80/90/95%, batch 32 and 256
    python bench/inference.py --quick    # fewer repeats (< 1 minute)

The weights are those of a committed model: in each hidden layer, a random ``round((1 - s) * N)`` of the N
blocks are kept (the others are exact zeros; the classifier, 32 blocks, stays dense as ``min_blocks=100`` keeps it).
For each sparsity and batch the dense model, the exported model with each layout (CSR, BSR) and the
``layout="auto"`` choice are timed interleaved on one thread; outputs are checked with ``assert_close``.
The speedup is reported for the whole model and for the first hidden layer alone, beside its limit
``1 / (1 - s)``. On a CUDA device (``--device cuda``) the BSR layer also runs through torch's Triton kernel.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import interleaved_times, machine  # noqa: E402
from sapp_lightning.blocks import BlockLayout, keep_count  # noqa: E402
from sapp_lightning.export import to_block_sparse  # noqa: E402
from sapp_lightning.models import MLP  # noqa: E402


def committed_mlp(sparsity: float, block: int, seed: int = 0) -> nn.Module:
    """An MLP whose hidden layers look like a committed BlockPruning result at ``sparsity``."""
    torch.manual_seed(seed)
    net = MLP((1, 28, 28), 10).eval()
    for layer in (net[1], net[3]):
        layout = BlockLayout.for_weight(layer.weight, block)
        keep = keep_count(layout.num_blocks, sparsity)
        mask = torch.zeros(layout.num_blocks)
        mask[torch.randperm(layout.num_blocks)[:keep]] = 1
        with torch.no_grad():
            layer.weight.mul_(layout.expand(mask.reshape(layout.grid_shape)))
    return net


def time_models(models: dict[str, nn.Module], x: torch.Tensor, repeats: int) -> dict[str, float]:
    """Median seconds per call, interleaved; the inner loop repeats a call enough to last ~2 ms."""
    inner = max(1, int(2e-3 / max(1e-6, _once(models["dense"], x))))

    def loop(m):
        def run():
            for _ in range(inner):
                m(x)

        return run

    with torch.no_grad():
        times = interleaved_times({k: loop(m) for k, m in models.items()}, repeats)
    return {k: statistics.median(v) / inner for k, v in times.items()}


def _once(model: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        model(x)
        start = time.perf_counter()
        model(x)
        return time.perf_counter() - start


def run(sparsities: list[float], batches: list[int], block: int, repeats: int, device: str) -> list[dict[str, Any]]:
    rows = []
    for sparsity in sparsities:
        dense = committed_mlp(sparsity, block).to(device)
        exported = {layout: to_block_sparse(dense, block, min_sparsity=0.5, layout=layout) for layout in ("csr", "bsr")}
        for batch in batches:
            x = torch.randn(batch, 1, 28, 28, device=device)
            auto = to_block_sparse(dense, block, min_sparsity=0.5, layout="auto", sample_batch=batch)
            with torch.no_grad():
                for model in (*exported.values(), auto):
                    torch.testing.assert_close(model(x), dense(x), rtol=1e-4, atol=1e-4)
            models = {"dense": dense, **exported, "auto": auto}
            # the first hidden layer alone (784 -> 512)
            layer_models = {"dense": dense[1], "csr": exported["csr"][1], "bsr": exported["bsr"][1]}
            t_model = time_models(models, x, repeats)
            t_layer = time_models(layer_models, x.flatten(1), repeats)
            row = {
                "sparsity": sparsity,
                "batch": batch,
                "block": block,
                "auto_layouts": [auto[1].layout, auto[3].layout],
                "limit": 1 / (1 - sparsity),
                "model_ms": {k: 1e3 * v for k, v in t_model.items()},
                "layer_ms": {k: 1e3 * v for k, v in t_layer.items()},
                "model_speedup": {k: t_model["dense"] / v for k, v in t_model.items() if k != "dense"},
                "layer_speedup": {k: t_layer["dense"] / v for k, v in t_layer.items() if k != "dense"},
            }
            if device == "cuda":
                row["layer_speedup"]["triton_bsr"] = _triton_speedup(dense[1], exported["bsr"][1], x.flatten(1))
            rows.append(row)
            ms = row["model_speedup"]
            print(
                f"s={sparsity:.0%} batch={batch}: model speedup csr {ms['csr']:.2f} bsr {ms['bsr']:.2f} auto "
                f"{ms['auto']:.2f} ({'/'.join(row['auto_layouts'])}); layer csr {row['layer_speedup']['csr']:.2f} "
                f"bsr {row['layer_speedup']['bsr']:.2f}; limit {row['limit']:.1f}",
                flush=True,
            )
    return rows


def _triton_speedup(dense_layer: nn.Linear, sparse_layer: nn.Module, x: torch.Tensor) -> float | None:
    """Dense ``F.linear`` against torch's Triton ``bsr_dense_mm`` on CUDA (None when unavailable)."""
    try:
        from torch.sparse._triton_ops import bsr_dense_mm
    except ImportError:
        return None
    w = sparse_layer.weight
    xt = x.t().contiguous()
    torch.testing.assert_close(bsr_dense_mm(w, xt).t() + dense_layer.bias, dense_layer(x), rtol=1e-3, atol=1e-3)

    def timed(fn):
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(50):
            fn()
        torch.cuda.synchronize()
        return time.perf_counter() - start

    return timed(lambda: dense_layer(x)) / timed(lambda: bsr_dense_mm(w, xt))


def print_table(rows: list[dict[str, Any]]) -> None:
    print("| sparsity | batch | dense ms | csr ms | bsr ms | auto (layer 1/2) | model speedup csr / bsr / auto | "
          "784x512 layer speedup csr / bsr | limit 1/(1-s) |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        m, ms, ls = r["model_ms"], r["model_speedup"], r["layer_speedup"]
        print(
            f"| {r['sparsity']:.0%} | {r['batch']} | {m['dense']:.3f} | {m['csr']:.3f} | {m['bsr']:.3f} | "
            f"{'/'.join(r['auto_layouts'])} | {ms['csr']:.2f} / {ms['bsr']:.2f} / {ms['auto']:.2f} | "
            f"{ls['csr']:.2f} / {ls['bsr']:.2f}"
            + (f" / triton {ls['triton_bsr']:.2f}" if ls.get("triton_bsr") else "")
            + f" | {r['limit']:.1f} |"
        )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--sparsities", type=float, nargs="+", default=[0.7, 0.8, 0.9, 0.95])
    p.add_argument("--batches", type=int, nargs="+", default=[32, 256])
    p.add_argument("--block", type=int, default=16)
    p.add_argument("--repeats", type=int, default=21)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", type=Path, default=Path("runs/inference.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    repeats = 5 if args.quick else args.repeats
    sparsities = [0.9] if args.quick else args.sparsities
    rows = run(sparsities, args.batches, args.block, repeats, args.device)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": machine(), "threads": args.threads, "rows": rows}, indent=2))
    print_table(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
