"""Block-mask heatmaps at each phase end, sent to W&B as images or saved as PNGs beside other logs."""

from __future__ import annotations

from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import WandbLogger

from ..callback import BlockPruning
from ..events import LayerState, PruningEvent
from ..sparsifier import BlockSparsifier


def mask_image(layer: LayerState, min_side: int = 128) -> torch.Tensor:
    """A ``[1, H, W]`` image of the layer's block grid (rows: fan_in blocks, columns: fan_out blocks).

    Pruned blocks are black. Kept blocks are white, or for SA++ shaded by their attention
    (brighter = more attention), so the picture shows what the next pruning step will remove.
    """
    mask = layer.mask.float()
    if layer.importance_name == "attention":
        attention = layer.importance.log()
        lo, hi = attention.min(), attention.max()
        shade = (attention - lo) / (hi - lo) if hi > lo else torch.ones_like(attention)
        mask = mask * (0.25 + 0.75 * shade)
    scale = max(1, -(-min_side // max(mask.shape)))
    return mask.repeat_interleave(scale, 0).repeat_interleave(scale, 1).unsqueeze(0)


class MaskHeatmaps(pl.Callback):
    """Render every pruned layer's block mask when a phase ends and when training ends.

    It listens to the :class:`~sapp_lightning.BlockPruning` callback's sparsifier, so its place in the
    callback list does not matter.
    """

    def __init__(self, min_side: int = 128) -> None:
        self.min_side = min_side
        self._trainer: pl.Trainer | None = None
        self._sparsifier: BlockSparsifier | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        pruning = next((cb for cb in trainer.callbacks if isinstance(cb, BlockPruning)), None)
        if stage == "fit" and pruning is not None and self._sparsifier is not pruning.sparsifier:
            self._sparsifier = pruning.sparsifier
            self._sparsifier.add_listener(self._on_event)
        self._trainer = trainer

    def _on_event(self, sparsifier: BlockSparsifier, event: PruningEvent) -> None:
        if event.kind == "phase_end":
            self._render(sparsifier, f"end of phase {event.segment_index} ({event.phase.name.lower()})")

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._sparsifier is not None and self._sparsifier.layers:
            self._render(self._sparsifier, "end of training")

    def _render(self, sparsifier: BlockSparsifier, caption: str) -> None:
        trainer = self._trainer
        if trainer is None or not trainer.is_global_zero:
            return
        images = {layer.name: mask_image(layer, self.min_side) for layer in sparsifier.layer_states()}
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                for name, image in images.items():
                    logger.log_image(f"pruning/mask/{name}", [image], step=trainer.global_step, caption=[caption])
            elif logger.log_dir:
                from torchvision.utils import save_image

                for name, image in images.items():
                    path = Path(logger.log_dir) / "masks" / name / f"step{trainer.global_step:07d}.png"
                    path.parent.mkdir(parents=True, exist_ok=True)
                    save_image(image, path)
