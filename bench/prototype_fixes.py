"""A prototype of two fixes to ``BlockPruning``'s per-step cost, measured by ``bench/training_cost.py``.

``callback.py`` and ``blocks.py`` belong to another engineer; this subclass only shows the gain:

1. ``_log_step`` calls ``pl_module.log_dict`` with three metrics after every optimizer step. Each
   ``LightningModule.log`` costs about 3 ms on this machine (``_ResultMetric.to`` walks the metric's ``__dict__``
   with ``apply_to_collection``), also when the Trainer has no logger: ~10 ms per step, 40% of an MLP step.
   The fix logs only when a logger will write the values (``trainer.loggers`` non-empty and the step is a
   multiple of ``trainer.log_every_n_steps``).
2. ``PrunedLayer.zero_pruned_`` (ACDC and magnitude, every step of a sparse phase) materializes the full-size
   mask with two ``repeat_interleave`` calls before ``mul_``. The fix multiplies in place through a blocked
   view of the weight (as ``BlockLayout.scale`` already does), with no full-size temporary.
"""

from __future__ import annotations

import torch

from sapp_lightning import BlockPruning
from sapp_lightning.algorithms.base import PrunedLayer


@torch.no_grad()
def zero_pruned_in_place(layer: PrunedLayer) -> None:
    """``weight *= expand(mask)`` through a ``(gc, c, gr, r)`` view of a Linear weight, falling back otherwise."""
    if layer.num_kept >= layer.layout.num_blocks:
        return
    weight = layer.raw_weight
    (n, m), (r, c) = layer.layout.kernel_shape, layer.layout.block_size
    if layer.layout.kind == "linear" and n % r == 0 and m % c == 0 and weight.is_contiguous():
        gr, gc = layer.layout.grid_shape
        weight.view(gc, c, gr, r).mul_(layer.mask.t().to(weight.dtype)[:, None, :, None])
    else:
        PrunedLayer.zero_pruned_(layer)


class FastBlockPruning(BlockPruning):
    """``BlockPruning`` with the two fixes above (same masks and weights; fewer, cheaper per-step hooks)."""

    def setup(self, trainer, pl_module, stage):
        super().setup(trainer, pl_module, stage)
        for layer in self.layers:
            layer.zero_pruned_ = lambda layer=layer: zero_pruned_in_place(layer)  # type: ignore[method-assign]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._trainer_ref = trainer
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def _log_step(self, pl_module):
        trainer = self._trainer_ref
        if trainer.loggers and trainer.global_step % max(1, trainer.log_every_n_steps) == 0:
            super()._log_step(pl_module)
