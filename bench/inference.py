"""Block-sparse inference: the exported model (``sapp_lightning.export``) against the dense committed model.

    python bench/inference.py            # square 3x 1024x1024 and MLP 768-3072-768, 90/95%, batch 1, 32, 256
    python bench/inference.py --quick    # 90% only, fewer repeats (< 1 minute)

Two models whose every layer is pruned, as a committed model has them (a random ``round((1 - s) * N)`` of the
N blocks of each weight are kept, the others are exact zeros): ``square``, three ``Linear(1024, 1024)`` with
ReLU between, and ``mlp``, a transformer's MLP block ``Linear(768, 3072)``, GELU, ``Linear(3072, 768)``.
For each sparsity and batch the dense model, the exported model with each layout (CSR, BSR) and
``layout="auto"`` (:func:`~sapp_lightning.export.layout_rule` for that batch) are timed interleaved on one
thread; outputs are checked with ``assert_close``. The speedup over dense is reported beside its limit
``1 / (1 - s)``, with the size of each saved file (``torch.save`` of the dense state_dict, ``save_block_sparse``).
On a CUDA device (``--device cuda``) the first layer also runs through torch's Triton BSR kernel.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import interleaved_times, machine, zero_random_blocks_  # noqa: E402
from sapp_lightning.export import save_block_sparse, to_block_sparse  # noqa: E402

MODELS = {"square": "3x Linear(1024, 1024)", "mlp": "Linear(768, 3072) GELU Linear(3072, 768)"}


def build(model: str) -> nn.Sequential:
    if model == "square":
        return nn.Sequential(nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 1024))
    return nn.Sequential(nn.Linear(768, 3072), nn.GELU(), nn.Linear(3072, 768))


def committed(model: str, sparsity: float, block: int, seed: int = 0) -> nn.Sequential:
    """``model`` with every Linear block-sparse at ``sparsity``, as a committed BlockPruning result."""
    torch.manual_seed(seed)
    net = build(model).eval()
    for layer in net:
        if isinstance(layer, nn.Linear):
            zero_random_blocks_(layer, block, sparsity)
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


def file_sizes(dense: nn.Module, exported: dict[str, nn.Module]) -> dict[str, int]:
    """Bytes of the dense state_dict and of each exported model's ``save_block_sparse`` file."""
    with tempfile.TemporaryDirectory() as tmp:
        torch.save(dense.state_dict(), f"{tmp}/dense.pt")
        sizes = {"dense": Path(f"{tmp}/dense.pt").stat().st_size}
        for layout, model in exported.items():
            save_block_sparse(model, f"{tmp}/{layout}.pt")
            sizes[layout] = Path(f"{tmp}/{layout}.pt").stat().st_size
    return sizes


def run(
    models: list[str], sparsities: list[float], batches: list[int], block: int, repeats: int, device: str
) -> list[dict[str, Any]]:
    rows = []
    for name in models:
        for sparsity in sparsities:
            dense = committed(name, sparsity, block).to(device)
            exported = {layout: to_block_sparse(dense, block, layout=layout) for layout in ("csr", "bsr")}
            sizes = file_sizes(dense, exported)
            for batch in batches:
                x = torch.randn(batch, dense[0].in_features, device=device)
                auto = to_block_sparse(dense, block, layout="auto", batch_size=batch)
                with torch.no_grad():
                    for model in (*exported.values(), auto):
                        torch.testing.assert_close(model(x), dense(x), rtol=1e-4, atol=1e-4)
                t = time_models({"dense": dense, **exported, "auto": auto}, x, repeats)
                row = {
                    "model": name,
                    "sparsity": sparsity,
                    "batch": batch,
                    "block": block,
                    "auto_layouts": [c.layout or "dense" for c in auto.block_sparse_summary.choices],
                    "limit": 1 / (1 - sparsity),
                    "ms": {k: 1e3 * v for k, v in t.items()},
                    "speedup": {k: t["dense"] / v for k, v in t.items() if k != "dense"},
                    "file_bytes": sizes,
                }
                if device == "cuda":
                    row["speedup"]["triton_bsr"] = _triton_speedup(dense[0], exported["bsr"][0], x)
                rows.append(row)
                s = row["speedup"]
                print(
                    f"{name} s={sparsity:.0%} batch={batch}: speedup csr {s['csr']:.2f} bsr {s['bsr']:.2f} auto "
                    f"{s['auto']:.2f} ({'/'.join(row['auto_layouts'])}); limit {row['limit']:.1f}",
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
    print("| model | sparsity | batch | dense ms | csr ms | bsr ms | auto (per layer) | speedup csr / bsr / auto | "
          "limit 1/(1-s) | file MB dense / csr / bsr |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        m, s, f = r["ms"], r["speedup"], r["file_bytes"]
        print(
            f"| {r['model']} | {r['sparsity']:.0%} | {r['batch']} | {m['dense']:.3f} | {m['csr']:.3f} | "
            f"{m['bsr']:.3f} | {'/'.join(r['auto_layouts'])} | {s['csr']:.2f} / {s['bsr']:.2f} / {s['auto']:.2f}"
            + (f" / triton {s['triton_bsr']:.2f}" if s.get("triton_bsr") else "")
            + f" | {r['limit']:.0f} | {f['dense'] / 1e6:.2f} / {f['csr'] / 1e6:.2f} / {f['bsr'] / 1e6:.2f} |"
        )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--sparsities", type=float, nargs="+", default=[0.9, 0.95])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 32, 256])
    p.add_argument("--block", type=int, default=16)
    p.add_argument("--repeats", type=int, default=21)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", type=Path, default=Path("runs/inference.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    logging.getLogger("sapp_lightning.export").setLevel(logging.WARNING)  # the export summary, once per call
    repeats = 5 if args.quick else args.repeats
    sparsities = [0.9] if args.quick else args.sparsities
    rows = run(args.models, sparsities, args.batches, args.block, repeats, args.device)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": machine(), "threads": args.threads, "rows": rows}, indent=2))
    print_table(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
