"""Dense against CSR against BSR for one layer on CPU: the measurements behind ``export.layout_rule``.

    python bench/sparse_layouts.py                   # 3 shapes x blocks 8/16/32 x sparsity 80/90/95% x 5 batches
    python bench/sparse_layouts.py --quick           # one shape, one block, fewer repeats (seconds)
    python bench/sparse_layouts.py --table runs/sparse_layouts.json   # print a finished run's table again

For each cell a weight whose kept blocks (``round((1 - s) * N)`` of the N blocks, chosen at random) hold random
values is timed as ``nn.Linear`` (dense ``F.linear``) and as :class:`~sapp_lightning.export.BlockSparseLinear`
with each layout (``torch.sparse.mm(W, x.T).T + b``, int32 indices, as exported), interleaved on one thread.
Each time is the median of ``--repeats`` samples of an inner loop lasting ~3 ms; outputs are checked with
``assert_close``. The first table gives each layout's speedup over dense, the measured winner, and what
``layout_rule`` picks for the cell (and the speedup that choice gets); the second the median over shapes.
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
from bench.common import interleaved_times, machine, zero_random_blocks_  # noqa: E402
from sapp_lightning.export import BlockSparseLinear, layout_rule  # noqa: E402
from sapp_lightning.export.convert import DENSE_MARGIN  # noqa: E402

SHAPES = {"1024-1024": (1024, 1024), "768-3072": (768, 3072), "3072-768": (3072, 768)}  # "in-out"


def committed_linear(in_features: int, out_features: int, block: int, sparsity: float, seed: int = 0) -> nn.Linear:
    """An ``nn.Linear`` whose weight has ``sparsity`` of its ``block x block`` blocks zero, at random."""
    torch.manual_seed(seed)
    return zero_random_blocks_(nn.Linear(in_features, out_features).eval(), block, sparsity)


def time_cell(shape: str, block: int, sparsity: float, batch: int, repeats: int) -> dict[str, Any]:
    in_features, out_features = SHAPES[shape]
    dense = committed_linear(in_features, out_features, block, sparsity)
    modules = {
        "dense": dense,
        "csr": BlockSparseLinear.from_linear(dense, "csr"),
        "bsr": BlockSparseLinear.from_linear(dense, "bsr", (block, block)),
    }
    x = torch.randn(batch, in_features)
    with torch.no_grad():
        for m in modules.values():
            torch.testing.assert_close(m(x), dense(x), rtol=1e-4, atol=1e-4)
        start = time.perf_counter()
        dense(x)
        inner = max(1, int(3e-3 / max(1e-6, time.perf_counter() - start)))

        def loop(m):
            def run():
                for _ in range(inner):
                    m(x)

            return run

        times = interleaved_times({k: loop(m) for k, m in modules.items()}, repeats)
    ms = {k: 1e3 * statistics.median(v) / inner for k, v in times.items()}
    speedup = {k: ms["dense"] / ms[k] for k in ("csr", "bsr")}
    best = max(speedup, key=speedup.get)
    return {
        "shape": shape,
        "block": block,
        "sparsity": sparsity,
        "batch": batch,
        "ms": ms,
        "speedup": speedup,
        "winner": best if speedup[best] >= DENSE_MARGIN else "dense",
    }


def rule_check(row: dict[str, Any]) -> tuple[str, float]:
    """What ``layout_rule`` picks for the cell, and the speedup over dense that choice gets (1.0 for dense)."""
    choice, _ = layout_rule(row["batch"], (row["block"], row["block"]), row["sparsity"])
    return choice or "dense", 1.0 if choice is None else row["speedup"][choice]


def print_table(rows: list[dict[str, Any]]) -> None:
    print("| shape in-out | block | sparsity | batch | dense ms | csr x | bsr x | winner | rule | rule x | best x |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        choice, got = rule_check(r)
        best = max(1.0, *r["speedup"].values())
        print(
            f"| {r['shape']} | {r['block']} | {r['sparsity']:.0%} | {r['batch']} | {r['ms']['dense']:.3f} | "
            f"{r['speedup']['csr']:.2f} | {r['speedup']['bsr']:.2f} | {r['winner']} | {choice} | {got:.2f} | "
            f"{best:.2f} |"
        )
    picks = [rule_check(r) for r in rows]
    agree = sum(choice == r["winner"] for (choice, _), r in zip(picks, rows))
    losses = [got / max(1.0, *r["speedup"].values()) for (_, got), r in zip(picks, rows)]
    print(
        f"\nrule picks the measured winner in {agree}/{len(rows)} cells; its choice gets {statistics.mean(losses):.0%} "
        f"of the best speedup on average, {min(losses):.0%} at worst; slower than dense in "
        f"{sum(got < 1.0 for _, got in picks)} cells"
    )


def print_grid(rows: list[dict[str, Any]]) -> None:
    """Median over shapes per (block, sparsity) and batch: ``csr x / bsr x``, ``*`` where neither beats dense by
    ``DENSE_MARGIN``, and the rule's choice (C, B or D)."""
    cells: dict[tuple[int, float], dict[int, list[dict[str, Any]]]] = {}
    for r in rows:
        cells.setdefault((r["block"], r["sparsity"]), {}).setdefault(r["batch"], []).append(r)
    batches = sorted({r["batch"] for r in rows})
    print("\n| block | sparsity | " + " | ".join(f"batch {b}" for b in batches) + " |")
    print("|---|---|" + "---|" * len(batches))
    for (block, sparsity), by_batch in sorted(cells.items()):
        out = []
        for b in batches:
            group = by_batch.get(b, [])
            if not group:
                out.append("")
                continue
            csr = statistics.median(r["speedup"]["csr"] for r in group)
            bsr = statistics.median(r["speedup"]["bsr"] for r in group)
            mark = "*" if max(csr, bsr) < DENSE_MARGIN else ""
            out.append(f"{csr:.1f} / {bsr:.1f}{mark} {rule_check(group[0])[0][0].upper()}")
        print(f"| {block} | {sparsity:.0%} | " + " | ".join(out) + " |")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--blocks", type=int, nargs="+", default=[8, 16, 32])
    p.add_argument("--sparsities", type=float, nargs="+", default=[0.8, 0.9, 0.95])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 64, 256])
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=Path("runs/sparse_layouts.json"))
    p.add_argument("--table", type=Path, help="print the table of a finished run (its JSON) and exit")
    args = p.parse_args(argv)
    if args.table:
        rows = json.loads(args.table.read_text())["rows"]
        print_table(rows)
        print_grid(rows)
        return 0
    torch.set_num_threads(args.threads)
    if args.quick:
        args.shapes, args.blocks, args.sparsities, args.repeats = ["1024-1024"], [16], [0.9], 3
    rows = []
    for shape in args.shapes:
        for block in args.blocks:
            for sparsity in args.sparsities:
                for batch in args.batches:
                    row = time_cell(shape, block, sparsity, batch, args.repeats)
                    rows.append(row)
                    print(
                        f"{shape} b{block} s={sparsity:.0%} batch {batch}: dense {row['ms']['dense']:.3f} ms, "
                        f"csr {row['speedup']['csr']:.2f}x, bsr {row['speedup']['bsr']:.2f}x",
                        flush=True,
                    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": machine(), "threads": args.threads, "rows": rows}, indent=2))
    print_table(rows)
    print_grid(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
