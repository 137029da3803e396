"""Cost of the reparametrized forward alone: a plain-torch training step with SA++'s attention or PowerProp's norm
scaling on the pruned layers, against the same step without, interleaved every few steps in one process.

    python bench/reparam_cost.py                  # MLP (batch 256) and ResNet50 (batch 4, 64x64), eager and compiled
    python bench/reparam_cost.py --quick          # < 2 minutes: the MLP, eager only, fewer rounds
    python bench/reparam_cost.py --models mlp --no-compile --rounds 60
    # the floor: what any parametrization that materializes W * A (and its gradient G * A) must cost
    python bench/reparam_cost.py --models mlp --mlp-hidden 1024 1024 --threads 2 --no-compile --floor --rounds 60

`training_cost.py` times whole Lightning fits, one configuration after another; on a shared machine whose speed
drifts over seconds that needs many rounds. Here the configurations take turns every ``--steps`` optimizer steps
(SGD with momentum, the parametrizations exactly as ``BlockPruning`` registers them, 16x16 blocks, the same
layers as the callback would prune with ``min_blocks=100``), so a drift hits all of them alike; the ratio is the
median step time over the dense model's. With ``--compile`` the same models also run under
``torch.compile`` (inductor), each against the compiled dense model. ``--floor`` adds two parametrizations that are
not SA++ but bound it from below: ``floor-forward`` computes ``W * A`` and passes the gradient through unscaled,
``floor`` also scales the gradient (``G * A``) but gives the attention none (no block sums). One thread unless
``--threads``.
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
from torch.nn.utils import parametrize

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import interleaved_times, machine  # noqa: E402
from sapp_lightning import BlockSparsifier  # noqa: E402
from sapp_lightning.algorithms import get_algorithm  # noqa: E402
from sapp_lightning.blocks import spread_over_taps  # noqa: E402
from sapp_lightning.targets import candidate_layers  # noqa: E402

SPARSITY, BLOCK, MIN_BLOCKS = 0.9, 16, 100
KINDS = ("sapp", "powerprop")  # the algorithms that reparametrize the forward
FLOOR_KINDS = ("floor-forward", "floor")


class _ForwardOnly(torch.autograd.Function):
    """``view * grid`` forward; the gradient passes through unscaled (a timing bound, not a training)."""

    @staticmethod
    def forward(ctx, view, grid):  # type: ignore[override]
        return view * spread_over_taps(grid, view)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        return grad, None


class _BothMultiplies(torch.autograd.Function):
    """``view * grid`` forward, ``grad * grid`` backward, no gradient for the grid (no block sums)."""

    @staticmethod
    def forward(ctx, view, grid):  # type: ignore[override]
        ctx.save_for_backward(view, grid)
        return view * spread_over_taps(grid, view)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        view, grid = ctx.saved_tensors
        return grad * spread_over_taps(grid, view), None


class FloorReparam(nn.Module):
    """The attention's forward (``W * expand(A)``, A from the logits) with one of the bounding backwards above."""

    def __init__(self, layout, function) -> None:
        super().__init__()
        self.layout, self.function = layout, function
        self.attention = get_algorithm("sapp")().make_reparam(layout, SPARSITY)

    def forward(self, weight):
        view = self.layout.block_view(weight)
        grid = self.layout.grid_to_view(self.attention.block_scale(weight).detach())
        return self.function.apply(view, grid).view(self.layout.weight_shape)


def build(
    model_name: str, kind: str, batch: int | None = None, hidden: tuple[int, ...] = (512, 512)
) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A model (parametrized like BlockPruning would for ``kind``), an input batch and its labels."""
    from sapp_lightning.app.models import MLP, resnet50

    torch.manual_seed(0)
    if model_name == "mlp":
        net, x = MLP((1, 28, 28), 10, hidden=hidden), torch.randn(batch or 256, 1, 28, 28)
    else:
        net, x = resnet50(num_classes=10), torch.randn(batch or 4, 3, 64, 64)
    if kind != "dense":
        floor = {"floor-forward": _ForwardOnly, "floor": _BothMultiplies}.get(kind)
        if floor is None:
            for layer in BlockSparsifier(kind, SPARSITY, BLOCK, MIN_BLOCKS).prepare(net):  # as BlockPruning does
                layer.set_mask(torch.rand(layer.layout.grid_shape) > SPARSITY)  # a sparse-phase mask
        for candidate in candidate_layers(net, BLOCK) if floor else ():
            layout = candidate.layout
            if layout.num_blocks < MIN_BLOCKS:
                continue
            if layout.block_view(candidate.weight) is None:  # ResNet50's 2048x10 head: left out of the bound
                print(f"--floor: {candidate.name} left dense (its blocks do not tile the weight)", flush=True)
                continue
            reparam = FloorReparam(layout, floor)
            parametrize.register_parametrization(candidate.module, candidate.param_name, reparam)
    return net, x, torch.randint(10, (x.shape[0],))


def stepper(model_name: str, kind: str, steps: int, compiled: bool, batch: int | None, hidden=(512, 512)):
    net, x, y = build(model_name, kind, batch, hidden)
    forward = torch.compile(net) if compiled else net
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()

    def run() -> None:
        for _ in range(steps):
            optimizer.zero_grad(set_to_none=True)
            loss_fn(forward(x), y).backward()
            optimizer.step()

    return run


def measure(
    model_name: str,
    rounds: int,
    steps: int,
    compiled: bool,
    batch: int | None = None,
    hidden: tuple[int, ...] = (512, 512),
    floor: bool = False,
) -> dict[str, Any]:
    kinds = ["dense", *KINDS, *(FLOOR_KINDS if floor else ())]
    start = time.perf_counter()
    runs = {kind: stepper(model_name, kind, steps, compiled, batch, hidden) for kind in kinds}
    times = interleaved_times(runs, rounds, warmup=2)  # warm-up compiles
    medians = {kind: statistics.median(t) / steps for kind, t in times.items()}
    label = f"{model_name}{' compiled' if compiled else ''}"
    print(f"[{label}] {rounds} rounds x {steps} steps in {time.perf_counter() - start:.0f}s", flush=True)
    result = {}
    for kind in kinds:
        ratios = sorted(a / b for a, b in zip(times[kind], times["dense"]))  # per round: a drift hits both alike
        result[kind] = {
            "ms_per_step": 1e3 * medians[kind],
            "ratio_to_dense": medians[kind] / medians["dense"],
            "ratio_per_round_median": statistics.median(ratios),
            "ratio_per_round_quartiles": [ratios[len(ratios) // 4], ratios[(3 * len(ratios)) // 4]],
        }
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--models", nargs="+", default=["mlp", "resnet50"], choices=["mlp", "resnet50"])
    p.add_argument("--rounds", type=int, help="default: 40 MLP, 8 ResNet50 (8 / 2 with --quick)")
    p.add_argument("--steps", type=int, help="optimizer steps per turn (default: 5 MLP, 1 ResNet50)")
    p.add_argument("--batch", type=int, help="batch size (default: 256 MLP, 4 ResNet50)")
    p.add_argument("--no-compile", action="store_true", help="eager only")
    p.add_argument("--mlp-hidden", type=int, nargs="+", default=[512, 512], help="the MLP's hidden widths")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    p.add_argument("--floor", action="store_true", help="add the two bounding parametrizations (see above)")
    p.add_argument("--fused", action="store_true", help="sapp_lightning.fused kernels on")
    p.add_argument("--out", type=Path, default=Path("runs/reparam_cost.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.fused:
        from sapp_lightning import fused

        if not fused.use_fused_kernels(True):
            raise SystemExit("--fused: the kernels could not be built")
    models = ["mlp"] if args.quick else args.models
    results: dict[str, Any] = {
        "machine": machine(),
        "threads": args.threads,
        "fused_kernels": args.fused,
        "sparsity": SPARSITY,
        "block": BLOCK,
        "results": {},
    }
    for model_name in models:
        rounds = args.rounds or {"mlp": 40, "resnet50": 8}[model_name] // (5 if args.quick else 1)
        steps = args.steps or {"mlp": 5, "resnet50": 1}[model_name]
        for compiled in [False] if (args.quick or args.no_compile) else [False, True]:
            key = f"{model_name}{f' batch {args.batch}' if args.batch else ''}{' compiled' if compiled else ''}"
            hidden = tuple(args.mlp_hidden)
            results["results"][key] = measure(model_name, rounds, steps, compiled, args.batch, hidden, args.floor)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    kinds = [k for k in (*KINDS, *FLOOR_KINDS) if k in next(iter(results["results"].values()))]
    print(f"\n{args.threads} thread(s); per kind: ms/step (ratio of medians; median [quartiles] of per-round ratios)")
    print("| model | dense ms/step | " + " | ".join(kinds) + " |\n|---|---|" + "---|" * len(kinds))
    for key, r in results["results"].items():
        cells = [
            f"{r[k]['ms_per_step']:.1f} ({r[k]['ratio_to_dense']:.3f}; {r[k]['ratio_per_round_median']:.3f} "
            f"[{r[k]['ratio_per_round_quartiles'][0]:.3f}, {r[k]['ratio_per_round_quartiles'][1]:.3f}])"
            for k in kinds
        ]
        print(f"| {key} | {r['dense']['ms_per_step']:.1f} | " + " | ".join(cells) + " |")
    print(f"\nwritten {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
