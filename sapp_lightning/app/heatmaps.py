"""Block-mask heatmaps at each phase end, sent to W&B as images or saved as PNGs beside other logs."""

from __future__ import annotations

from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import WandbLogger
from pytorch_lightning.utilities import rank_zero_only

from ..algorithms import BlockAttention, PrunedLayer
from ..callback import BlockPruning


def mask_image(layer: PrunedLayer, min_side: int = 128) -> torch.Tensor:
    """A ``[1, H, W]`` image of the layer's block grid (rows: fan_in blocks, columns: fan_out blocks).

    Pruned blocks are black. Kept blocks are white, or for SA++ shaded by their attention
    (brighter = more attention), so the picture shows what the next pruning step will remove.
    """
    mask = layer.mask.detach().float().cpu()
    if isinstance(layer.reparam, BlockAttention):
        attention = layer.reparam.attention().detach().float().cpu().log()
        lo, hi = attention.min(), attention.max()
        shade = (attention - lo) / (hi - lo) if hi > lo else torch.ones_like(attention)
        mask = mask * (0.25 + 0.75 * shade)
    scale = max(1, -(-min_side // max(mask.shape)))
    return mask.repeat_interleave(scale, 0).repeat_interleave(scale, 1).unsqueeze(0)


class MaskHeatmaps(pl.Callback):
    """Render every pruned layer's block mask when a phase ends and when training ends.

    Put it before :class:`~sapp_lightning.BlockPruning` in the callback list so that it sees the
    masks as the ending phase left them (the app does).
    """

    def __init__(self, min_side: int = 128) -> None:
        self.min_side = min_side
        self.pruning: BlockPruning | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.pruning = next((cb for cb in trainer.callbacks if isinstance(cb, BlockPruning)), None)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        pruning = self.pruning
        if pruning is None or pruning.schedule is None or pruning.segment_index is None:
            return
        if pruning.schedule.locate(trainer.global_step).index != pruning.segment_index:
            self._render(trainer, f"end of phase {pruning.segment_index} ({pruning.phase.name.lower()})")

    def on_train_end(self, trainer, pl_module) -> None:
        if self.pruning is not None and self.pruning.layers:
            self._render(trainer, "end of training")

    @rank_zero_only
    def _render(self, trainer: pl.Trainer, caption: str) -> None:
        images = {layer.name: mask_image(layer, self.min_side) for layer in self.pruning.layers}
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
