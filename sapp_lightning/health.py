"""Health checks of a pruning run: non-finite weights and logits, layers that cannot be pruned at the asked
sparsity, and kept blocks that ended all zero. Each raises or warns with what to try."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .algorithms import PrunedLayer, PruningAlgorithm
from .blocks import keep_count
from .distributed import rank_zero_warn
from .report import measure_layer
from .targets import Candidate


def likely_cause(found: list[tuple[str, str, Tensor]]) -> str:
    """What to try for the non-finite tensors ``(layer, what, tensor)``, from what they are."""
    tensors = [t.detach() for *_, t in found]
    if any(t.dtype == torch.float16 and bool(torch.isinf(t).any()) for t in tensors):
        return "float16 overflowed (its largest value is 65504): train in bf16-mixed or 32-true, or scale the loss"
    if all(what == "attention logits" for _, what, _ in found):
        return (
            "only SA++'s attention logits diverged: lower their learning rate or give them an L2 term "
            "(logit_l2); the weights are finite"
        )
    return "training diverged (lower the learning rate, clip gradients, or check the data)"


def check_finite(layers: Sequence[PrunedLayer], algorithm: PruningAlgorithm, when: str, who: str) -> None:
    """Raise ``FloatingPointError`` naming the layers whose weights or logits hold NaN or infinity (one host
    sync for all of them)."""
    tensors = []
    for layer in layers:
        tensors.append((layer.name, "weight", layer.raw_weight))
        tensors += [(layer.name, "attention logits", p) for p in algorithm.trainable_parameters(layer)]
    if not tensors:
        return
    device = tensors[0][2].device
    finite = torch.stack([torch.isfinite(t.detach()).all().to(device) for *_, t in tensors])
    if bool(finite.all()):
        return
    found = [(name, what, t) for (name, what, t), ok in zip(tensors, finite.tolist()) if not ok]
    bad = ", ".join(f"{name!r} ({what})" for name, what, _ in found)
    raise FloatingPointError(f"{who}: NaN or infinite values {when} in layer {bad}; {likely_cause(found)}")


def check_scores(layer: PrunedLayer, scores: Tensor, importance_name: str, who: str) -> Tensor:
    """``scores`` if finite, else ``FloatingPointError`` naming the layer."""
    if not torch.isfinite(scores).all():
        what = "attention logits" if importance_name == "attention" else "weights"
        raise FloatingPointError(
            f"{who}: layer {layer.name!r} has NaN or infinite block scores ({what}); training diverged"
        )
    return scores


def warn_on_layers_that_stay_dense(chosen: Sequence[Candidate], sparsity: float, who: str) -> None:
    """Warn when ``sparsity`` rounds to no pruned block in some of the chosen layers."""
    if sparsity <= 0:
        return
    dense = [c for c in chosen if keep_count(c.layout.num_blocks, sparsity) >= c.layout.num_blocks]
    if dense:
        listed = ", ".join(f"{c.name} ({c.layout.num_blocks} blocks)" for c in dense[:10])
        more = f" and {len(dense) - 10} more" if len(dense) > 10 else ""
        rank_zero_warn(
            f"{who}: sparsity {sparsity:g} rounds to 0 pruned blocks in {len(dense)} of the "
            f"{len(chosen)} pruned layer(s), which stay dense: {listed}{more}. A layer of N blocks loses "
            "a block from sparsity 1/N on: raise sparsity, use smaller blocks, or exclude those layers."
        )


def warn_when_short_of_target(
    layers: Sequence[PrunedLayer], sparsity: float, where: str, who: str, ranking: str = "layer"
) -> None:
    """Warn when training ended with layers keeping more blocks than the target allows (``where`` says why).
    Under ``ranking="global"`` the layers end at sparsities of their own: only the total has a target."""
    total = sum(layer.layout.num_blocks for layer in layers)
    kept = sum(layer.num_kept for layer in layers)
    if ranking == "global":
        target = max(len(layers), total - round(sparsity * total))
        short = [f"the pruned layers keep {kept} of {total} blocks (target {target})"] if kept > target else []
    else:
        short = [
            f"{layer.name} keeps {layer.num_kept} of {layer.layout.num_blocks} (target {target})"
            for layer in layers
            if layer.num_kept > (target := keep_count(layer.layout.num_blocks, sparsity))
        ]
    if short:
        achieved = 1 - kept / max(1, total)
        rank_zero_warn(
            f"{who}: training ended at {achieved:.2%} block sparsity, below the target "
            f"{sparsity:.2%}: {'; '.join(short[:10])} ({where})"
        )


def warn_on_dead_blocks(layers: Sequence[PrunedLayer], zeroes_pruned_weights: bool, who: str) -> None:
    """After the commit: warn about kept blocks that are all zero (committed pruned blocks are exact zeros, so
    any zero block beyond them is a kept one)."""
    dead = {
        layer.name: (zeros, layer.num_kept)
        for layer in layers
        if (
            zeros := measure_layer(layer.name, layer.effective_weight(), layer.layout).zero_blocks
            - (layer.layout.num_blocks - layer.num_kept)
        )
    }
    if not dead:
        return
    hint = (
        " In prune_mode='zero' a unit whose incoming blocks were all pruned can stop receiving gradient "
        "(with ReLU and a bias <= 0 it outputs 0), so its blocks never regrow; prune_mode='mask' keeps "
        "their values."
        if zeroes_pruned_weights
        else ""
    )
    rank_zero_warn(
        f"{who}: {sum(n for n, _ in dead.values())} kept blocks are all zero after training, so the "
        "model is sparser than asked and those blocks are wasted: "
        + "; ".join(f"{name}: {n} of {kept}" for name, (n, kept) in list(dead.items())[:10])
        + "."
        + hint
    )
