"""Mask heatmaps: what W&B stores is what the figure shows (pruned blocks black, SA++'s kept blocks brighter with
more attention), and the figures say what they are (axes, taps, colour bar, title)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from helpers import PLAN, STEPS, TinyNet, make_trainer, pruning, tiny_loader
from PIL import Image

from sapp_lightning import BlockSparsifier
from sapp_lightning.app import MaskHeatmaps
from sapp_lightning.app.heatmaps import layer_figure, overview_figure
from sapp_lightning.app.plots import save_figure


def block_pixels(fig, rows: int, cols: int) -> np.ndarray:
    """``(rows, cols, 2)``: the (x, y) pixel of each block's centre in the figure's PNG."""
    fig.canvas.draw()
    ax, height = fig.axes[0], fig.bbox.height
    centres = np.array([[ax.transData.transform((c, r)) for c in range(cols)] for r in range(rows)])
    return np.stack([centres[..., 0], height - centres[..., 1]], axis=-1).round().astype(int)


def luminance(rgb: np.ndarray) -> np.ndarray:
    return rgb[..., :3].astype(float) @ np.array([0.2126, 0.7152, 0.0722])


def test_wandb_stores_the_heatmap_as_drawn_with_pruned_blocks_black_and_attention_ordered(tmp_path, monkeypatch):
    from pytorch_lightning.loggers import WandbLogger

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    import wandb

    if wandb.run is not None:  # an unfinished run of an earlier test would be reused by WandbLogger
        wandb.finish()
    torch.manual_seed(0)
    callback, seen = pruning("sapp"), []
    callback.sparsifier.add_listener(
        lambda s, e: seen.append((e.step, e.segment_index, e.phase, s.layer_states())) if e.kind == "phase_end" else 0
    )

    class SpreadLogits(pl.Callback):  # a few steps of a tiny run barely move the attention: give it a range
        def on_train_start(self, trainer, pl_module):
            for logits in (p for layer in callback.layers for p in callback.algorithm.trainable_parameters(layer)):
                logits.data.normal_(0, 1 / callback.algorithm.logit_scale)  # a spread of 1 inside the softmax

    logger = WandbLogger(project="heatmaps", save_dir=tmp_path, offline=True)
    heatmaps = MaskHeatmaps(per_layer_every_phase=True)  # each layer's figure at every phase end too
    trainer = make_trainer(tmp_path, [SpreadLogits(), heatmaps, callback], logger=logger)
    trainer.fit(TinyNet(), tiny_loader())
    run_dir = Path(logger.experiment.dir)
    assert tmp_path in run_dir.parents
    logger.experiment.finish()
    step, index, phase, states = seen[1]  # the end of the sparsification phase: a shrunk, shaded mask
    fc1 = states[1]
    assert fc1.name == "fc1" and 0 < fc1.num_kept < fc1.num_blocks
    stored = [np.asarray(Image.open(p).convert("RGB")) for p in run_dir.rglob("media/images/pruning/mask/fc1_*.png")]
    assert len(stored) == len(PLAN)  # each phase end but the last, and the end of training
    fig = layer_figure(fc1, step, f"end of phase {index} ({phase.name.lower()})")
    drawn = np.asarray(Image.open(save_figure(fig, tmp_path / "drawn.png")).convert("RGB"))
    matches = [image for image in stored if image.shape == drawn.shape and np.array_equal(image, drawn)]
    assert len(matches) == 1  # W&B keeps the 8-bit picture as drawn
    pixels = matches[0]
    at = block_pixels(fig, *fc1.mask.shape)
    colour = pixels[at[..., 1], at[..., 0]]
    mask, attention = fc1.mask.numpy(), fc1.importance.numpy()
    assert (colour[~mask] == 0).all()  # pruned: black
    kept_light, kept_attention = luminance(colour[mask]), attention[mask]
    assert kept_light.min() > 20
    order = np.argsort(kept_attention)
    distinct = np.diff(kept_attention[order]) > 0.02 * kept_attention[order][1:]
    assert (np.diff(kept_light[order])[distinct] >= 0).all() and distinct.sum() > 10  # brighter = more attention
    assert len(list(run_dir.rglob("media/images/pruning/masks_*.png"))) == len(PLAN)  # and the overviews


def test_by_default_the_overview_is_drawn_where_the_masks_change_and_each_layer_once_at_the_end(tmp_path):
    from pytorch_lightning.loggers import CSVLogger

    logger = CSVLogger(tmp_path, name="csv")
    trainer = make_trainer(tmp_path, [MaskHeatmaps(), pruning("acdc")], logger=logger)
    trainer.fit(TinyNet(), tiny_loader())
    masks = Path(logger.log_dir) / "masks"
    # ACDC's phase ends at 16, 48, 64 and 72: the dense phases (16, 72) keep every block and the sparse phase ending
    # at 64 kept the mask drawn at 48, so only 48 and the end of training show something new
    assert sorted(p.name for p in (masks / "overview").glob("*.png")) == ["step0000048.png", f"step{STEPS:07d}.png"]
    assert [p.name for p in (masks / "fc1").glob("*.png")] == [f"step{STEPS:07d}.png"]


@pytest.fixture
def conv_state():
    sparsifier = BlockSparsifier("sapp", 0.75, 4, min_blocks=1, plan=PLAN)
    sparsifier.prepare(torch.nn.Sequential(torch.nn.Conv2d(8, 8, 3), torch.nn.Conv2d(8, 12, 1)))
    sparsifier.start(10)
    for _ in range(10):
        sparsifier.step()
    return sparsifier.layer_states()


def test_a_conv_layer_figure_labels_its_taps_axes_title_and_colour_bar(conv_state):
    fig = layer_figure(conv_state[0], 10, "sparse")
    ax, bar = fig.axes
    assert [t.get_text() for t in ax.get_yticklabels()] == [f"({h},{w})" for h in range(3) for w in range(3)]
    assert ax.get_ylabel() == "fan-in blocks, by kernel tap (h, w): 2 per tap"
    assert ax.get_xlabel() == "fan-out blocks (4 outputs each)"
    assert ax.get_title().splitlines() == ["0: 75.0% of 36 blocks pruned (4x4)", "step 10, sparse; black = pruned"]
    assert bar.get_ylabel().startswith("attention")
    one_by_one = layer_figure(conv_state[1], 10, "sparse")
    assert one_by_one.axes[0].get_ylabel() == "fan-in blocks (input channels)"


def test_the_overview_draws_every_layer_on_one_scale(conv_state):
    fig = overview_figure(conv_state, 10, "end of training")
    titles = [ax.get_title() for ax in fig.axes if ax.get_visible() and ax.get_title()]
    assert titles == ["0\n75% pruned", "1\n67% pruned"]  # 2 of 6 blocks kept in the 1x1 conv
    assert "2 pruned layers, step 10, end of training: 73.8% of blocks pruned" in fig.get_suptitle()
