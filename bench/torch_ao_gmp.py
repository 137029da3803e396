"""``torch.ao.pruning``'s gradual magnitude pruning as a Lightning callback: the reference for the ``gmp`` algorithm.

``WeightNormSparsifier`` with square blocks (every entry of a pruned block is zero: ``zeros_per_block`` = the block's
size) and the ``CubicSL`` scheduler, stepped after every optimizer step, on the layers ``sapp_lightning`` would prune
(``block_sparsity(..., min_blocks=...)`` lists them). The ramp runs from ``start`` to ``end`` of training
(``init_t`` and ``delta_t * total_t`` in ``CubicSL``'s terms), the masks are re-chosen every ``every_n_steps``
steps, and the fit ends with ``squash_mask`` (plain weights). Nothing of ``torch.ao`` is in the library: this is
glue for the comparison in docs/results.md, added to a run of the dense configuration through the app::

    PYTHONPATH=. sapp-train -m recipe=fashion_mnist_demo model=mlp pruning=dense pruning.algorithm=torch_ao_gmp \\
        +callbacks.torch_ao._target_=bench.torch_ao_gmp.TorchAOGradualPruning \\
        '+callbacks.torch_ao.sparsity=${pruning.sparsity}' '+callbacks.torch_ao.block_size=${pruning.block_size}' \\
        '+callbacks.torch_ao.min_blocks=${pruning.min_blocks}' \\
        pruning.sparsity=0.9,0.95 pruning.block_size=8,16,32 seed=0,1,2 +bench=fast hydra/launcher=joblib

(``PYTHONPATH=.`` from the repository's root, so that ``bench`` imports in every job;
``pruning.algorithm`` labels the runs in the tables).
"""

from __future__ import annotations

import pytorch_lightning as pl
from torch import nn
from torch.ao.pruning import CubicSL, WeightNormSparsifier

from sapp_lightning import block_sparsity


class TorchAOGradualPruning(pl.Callback):
    """Prune ``sparsity`` of the ``block_size`` x ``block_size`` blocks of each layer with torch.ao.pruning."""

    def __init__(
        self,
        sparsity: float,
        block_size: int,
        min_blocks: int = 100,
        start: float = 0.1,
        end: float = 0.85,
        every_n_steps: int = 1,
    ) -> None:
        if not 0 <= start < end <= 1:
            raise ValueError(f"need 0 <= start < end <= 1, got start={start}, end={end}")
        self.sparsity, self.block_size, self.min_blocks = sparsity, block_size, min_blocks
        self.start, self.end, self.every_n_steps = start, end, every_n_steps
        self.sparsifier: WeightNormSparsifier | None = None
        self.scheduler: CubicSL | None = None

    def setup(self, trainer: pl.Trainer, pl_module: nn.Module, stage: str) -> None:
        if stage != "fit" or self.sparsifier is not None:
            return
        layers = block_sparsity(pl_module, self.block_size, min_blocks=self.min_blocks).layers
        self.sparsifier = WeightNormSparsifier(
            sparsity_level=self.sparsity,
            sparse_block_shape=(self.block_size, self.block_size),
            zeros_per_block=self.block_size**2,
        )
        # the parametrization keeps the weight Parameter (as its ``original``): the optimizer made later trains it
        self.sparsifier.prepare(pl_module, [{"tensor_fqn": f"{layer.name}.weight"} for layer in layers])

    def on_train_start(self, trainer: pl.Trainer, pl_module: nn.Module) -> None:
        total = int(trainer.estimated_stepping_batches)
        first = round(self.start * total)
        updates = max(1, round((self.end - self.start) * total / self.every_n_steps))
        self.scheduler = CubicSL(
            self.sparsifier, init_sl=0.0, init_t=first, delta_t=self.every_n_steps, total_t=updates,
            initially_zero=True,
        )  # fmt: skip

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: nn.Module, *args) -> None:
        self.scheduler.step()  # the sparsity level for the next step
        self.sparsifier.step()  # the masks that reach it, from the block norms of the masked weights

    def on_fit_end(self, trainer: pl.Trainer, pl_module: nn.Module) -> None:
        self.sparsifier.squash_mask()
