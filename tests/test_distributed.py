"""Distributed training: masks agree on every rank at every phase boundary, and a disagreement names the layer."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from helpers import PRUNED, TinyNet, assert_same_state, make_trainer, pruning, state_of, tiny_loader
from lightning_fabric.plugins.environments.lightning import find_free_network_port

from sapp_lightning import BlockPruning, Phase, keep_count
from sapp_lightning.distributed import mask_checksum


class CountingPruning(BlockPruning):
    """Records every cross-rank mask verification (phase starts and the end of training)."""

    def verify_masks(self, trainer, when):
        self.verified = getattr(self, "verified", []) + [(trainer.global_step, trainer.world_size, when)]
        super().verify_masks(trainer, when)


def corrupt_on_rank_one(sparsifier, event):
    """A listener: on rank 1 only, swaps a kept and a pruned block of fc1 when the first sparse phase begins."""
    if event.kind == "phase_start" and event.phase is Phase.SPARSE and torch.distributed.get_rank() == 1:
        layer = sparsifier.layers[1]
        mask = layer.mask.clone()
        flat = mask.view(-1)
        kept, pruned = int(flat.nonzero()[0]), int((~flat).nonzero()[0])
        flat[kept], flat[pruned] = False, True  # same number of kept blocks
        layer.set_mask(mask)


class RankDump(pl.Callback):
    """Placed after BlockPruning: each rank writes the masks at every phase start and its committed weights."""

    def __init__(self, callback, out):
        self.callback, self.out, self.phases = callback, out, []

    def _record(self, trainer):
        if not self.phases or self.phases[-1][1] != self.callback.segment_index:
            masks = [layer.mask.clone() for layer in self.callback.layers]
            self.phases.append((trainer.global_step, self.callback.segment_index, masks))

    def on_train_start(self, trainer, pl_module):
        self._record(trainer)

    def on_train_batch_end(self, trainer, *args):
        self._record(trainer)

    def on_fit_end(self, trainer, pl_module):
        torch.save(
            {"phases": self.phases, "state": state_of(pl_module), "verified": self.callback.verified},
            self.out / f"rank{trainer.global_rank}.pt",
        )


@pytest.fixture
def free_port(monkeypatch):
    monkeypatch.setenv("MASTER_PORT", str(find_free_network_port()))


def ddp_trainer(tmp_path, callbacks, strategy="ddp_fork"):
    if strategy == "ddp_fork" and torch.cuda.is_initialized():  # a process that touched CUDA cannot fork
        strategy = "ddp_spawn"
    return make_trainer(tmp_path, callbacks, strategy=strategy, devices=2, accelerator="cpu")


@pytest.mark.parametrize(
    "algorithm, strategy",
    [
        ("sapp", "ddp_fork"),
        ("acdc", "ddp_fork"),
        ("gmp", "ddp_fork"),
        pytest.param("sapp", "ddp_spawn", marks=pytest.mark.slow),
    ],
)
def test_ddp_masks_agree_on_every_rank_at_every_phase_boundary(tmp_path, free_port, algorithm, strategy):
    torch.manual_seed(0)
    model = TinyNet()
    callback = pruning(algorithm, cls=CountingPruning)
    ddp_trainer(tmp_path, [callback, RankDump(callback, tmp_path)], strategy).fit(model, tiny_loader())
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    # each rank trains 40 steps on its half of the data: the plan's five phases start at 0, 8, 24, 32, 36
    for rank in ranks:
        assert [(step, index) for step, index, _ in rank["phases"]] == [(0, 0), (8, 1), (24, 2), (32, 3), (36, 4)]
        assert [(step, world) for step, world, _ in rank["verified"]] == [(s, 2) for s in (0, 8, 24, 32, 36, 40)]
    for (_, _, masks0), (_, _, masks1) in zip(ranks[0]["phases"], ranks[1]["phases"]):
        assert all(torch.equal(a, b) for a, b in zip(masks0, masks1))
    sparse_masks = ranks[0]["phases"][2][2]
    assert [int(m.sum()) for m in sparse_masks] == [keep_count(n, 0.5) for n in PRUNED.values()]
    assert_same_state(ranks[0]["state"], ranks[1]["state"])
    assert_same_state(state_of(model), ranks[0]["state"])  # the launcher brought rank 0's weights back
    assert all(isinstance(value, torch.Tensor) for value in ranks[0]["state"].values())


def test_ddp_masks_that_differ_across_ranks_raise_naming_the_layer(tmp_path, free_port):
    callback = pruning("sapp")
    callback.sparsifier.add_listener(corrupt_on_rank_one)
    with pytest.raises(Exception, match=r"the masks of layer\(s\) 'fc1' differ across ranks at the start of phase 2"):
        ddp_trainer(tmp_path, [callback]).fit(TinyNet(), tiny_loader())


def test_mask_checksum_tells_swapped_blocks_apart():
    callback = pruning("acdc")
    callback.sparsifier.prepare(TinyNet())
    layer = callback.layers[1]
    a = torch.zeros_like(layer.mask).view(-1)
    b = a.clone()
    a[[1, 4]] = True
    b[[2, 3]] = True  # same count, same index sum
    layer.set_mask(a.view_as(layer.mask))
    sum_a = mask_checksum(layer.mask)
    layer.set_mask(b.view_as(layer.mask))
    assert not torch.equal(sum_a, mask_checksum(layer.mask))
    assert sum_a.dtype == torch.int64
