"""Cost of the reparametrized forward alone: a plain-torch training step with SA++'s attention or PowerProp's norm
scaling on the pruned layers, against the same step without, interleaved every few steps in one process.

    python bench/reparam_cost.py                  # MLP (batch 256) and ResNet50 (batch 4, 64x64), eager and compiled
    python bench/reparam_cost.py --quick          # < 2 minutes: the MLP, eager only, fewer rounds
    python bench/reparam_cost.py --models mlp --no-compile --rounds 60

`training_cost.py` times whole Lightning fits, one configuration after another; on a shared machine whose speed
drifts over seconds that needs many rounds. Here the configurations take turns every ``--steps`` optimizer steps
(SGD with momentum, the parametrizations exactly as ``BlockPruning`` registers them, 16x16 blocks, the same
layers as the callback would prune with ``min_blocks=100``), so a drift hits all of them alike; the ratio is the
median step time over the dense model's. With ``--compile`` the same models also run under
``torch.compile`` (inductor), each against the compiled dense model. One thread.
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
from sapp_lightning import BlockSparsifier  # noqa: E402

SPARSITY, BLOCK, MIN_BLOCKS = 0.9, 16, 100
KINDS = ("sapp", "powerprop")  # the algorithms that reparametrize the forward


def build(model_name: str, kind: str, batch: int | None = None) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A model (parametrized like BlockPruning would for ``kind``), an input batch and its labels."""
    from sapp_lightning.models import MLP, resnet50

    torch.manual_seed(0)
    if model_name == "mlp":
        net, x = MLP((1, 28, 28), 10), torch.randn(batch or 256, 1, 28, 28)
    else:
        net, x = resnet50(num_classes=10), torch.randn(batch or 4, 3, 64, 64)
    if kind != "dense":
        for layer in BlockSparsifier(kind, SPARSITY, BLOCK, MIN_BLOCKS).prepare(net):  # as BlockPruning does
            layer.set_mask(torch.rand(layer.layout.grid_shape) > SPARSITY)  # a sparse-phase mask
    return net, x, torch.randint(10, (x.shape[0],))


def stepper(model_name: str, kind: str, steps: int, compiled: bool, batch: int | None):
    net, x, y = build(model_name, kind, batch)
    forward = torch.compile(net) if compiled else net
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()

    def run() -> None:
        for _ in range(steps):
            optimizer.zero_grad(set_to_none=True)
            loss_fn(forward(x), y).backward()
            optimizer.step()

    return run


def measure(model_name: str, rounds: int, steps: int, compiled: bool, batch: int | None = None) -> dict[str, Any]:
    kinds = ["dense", *KINDS]
    start = time.perf_counter()
    runs = {kind: stepper(model_name, kind, steps, compiled, batch) for kind in kinds}
    times = interleaved_times(runs, rounds, warmup=2)  # warm-up compiles
    medians = {kind: statistics.median(t) / steps for kind, t in times.items()}
    label = f"{model_name}{' compiled' if compiled else ''}"
    print(f"[{label}] {rounds} rounds x {steps} steps in {time.perf_counter() - start:.0f}s", flush=True)
    return {
        kind: {"ms_per_step": 1e3 * medians[kind], "ratio_to_dense": medians[kind] / medians["dense"]} for kind in kinds
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--models", nargs="+", default=["mlp", "resnet50"], choices=["mlp", "resnet50"])
    p.add_argument("--rounds", type=int, help="default: 40 MLP, 8 ResNet50 (8 / 2 with --quick)")
    p.add_argument("--steps", type=int, help="optimizer steps per turn (default: 5 MLP, 1 ResNet50)")
    p.add_argument("--batch", type=int, help="batch size (default: 256 MLP, 4 ResNet50)")
    p.add_argument("--no-compile", action="store_true", help="eager only")
    p.add_argument("--out", type=Path, default=Path("runs/reparam_cost.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    models = ["mlp"] if args.quick else args.models
    results: dict[str, Any] = {"machine": machine(), "sparsity": SPARSITY, "block": BLOCK, "results": {}}
    for model_name in models:
        rounds = args.rounds or {"mlp": 40, "resnet50": 8}[model_name] // (5 if args.quick else 1)
        steps = args.steps or {"mlp": 5, "resnet50": 1}[model_name]
        for compiled in [False] if (args.quick or args.no_compile) else [False, True]:
            key = f"{model_name}{f' batch {args.batch}' if args.batch else ''}{' compiled' if compiled else ''}"
            results["results"][key] = measure(model_name, rounds, steps, compiled, args.batch)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print("\n| model | dense ms/step | sapp (ratio) | powerprop (ratio) |\n|---|---|---|---|")
    for key, r in results["results"].items():
        print(
            f"| {key} | {r['dense']['ms_per_step']:.1f} | {r['sapp']['ms_per_step']:.1f} "
            f"({r['sapp']['ratio_to_dense']:.3f}) | {r['powerprop']['ms_per_step']:.1f} "
            f"({r['powerprop']['ratio_to_dense']:.3f}) |"
        )
    print(f"\nwritten {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
