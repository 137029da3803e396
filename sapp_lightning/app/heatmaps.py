"""Block-mask heatmaps a person can read: an overview of all pruned layers at phase ends, and one figure per
pruned layer when training ends, sent to W&B as images or saved as PNGs beside the other logs.

Rows are fan-in blocks and columns fan-out blocks (the paper's kernel orientation). Pruned blocks are black;
kept blocks are pale, or for SA++ coloured by their attention on a log scale (a colour bar gives the values), so
the picture shows what the next pruning step removes. For convolutions the rows of each kernel tap are grouped
and labelled ``(h, w)``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import WandbLogger

from sapp_lightning import BlockPruning, BlockSparsifier, LayerState, PruningEvent

from .plots import save_figure

if TYPE_CHECKING:
    from matplotlib.figure import Figure

KEPT_COLOR = "#d9d9d9"  # kept blocks when nothing ranks them by colour (ACDC, magnitude, PowerPropagation)
PRUNED_COLOR = "#000000"
ATTENTION_CMAP = "viridis"  # brightness grows with the value


def _image(state: LayerState) -> np.ndarray:
    """The grid to draw: attention where kept (SA++), 1 where kept (others), NaN where pruned."""
    mask = state.mask.numpy()
    values = state.importance.numpy() if state.importance_name == "attention" else np.ones(mask.shape)
    return np.where(mask, values, np.nan)


def _attention_norm(states: list[LayerState]) -> Any:
    from matplotlib.colors import LogNorm

    kept = [s.importance[s.mask] for s in states if s.importance_name == "attention" and bool(s.mask.any())]
    if not kept:
        return None
    low = min(float(k.min()) for k in kept)
    high = max(float(k.max()) for k in kept)
    return LogNorm(vmin=low, vmax=high if high > low else low * 1.0001)


def _draw(ax: Any, state: LayerState, norm: Any) -> Any:
    import matplotlib
    from matplotlib.colors import ListedColormap
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    if norm is not None:
        cmap = matplotlib.colormaps[ATTENTION_CMAP].copy()
    else:
        cmap = ListedColormap([KEPT_COLOR])
    cmap.set_bad(PRUNED_COLOR)
    return ax.imshow(_image(state), cmap=cmap, norm=norm, interpolation="nearest", aspect="auto")


def _label_taps(ax: Any, state: LayerState) -> str:
    """For a conv layer whose blocks stay inside one tap: lines between taps and ``(h, w)`` ticks."""
    layout = state.layout
    if layout.kind not in ("conv2d", "conv1d"):
        return "fan-in blocks"
    _, cin, kh, kw = layout.conv_dims
    rows = layout.block_size[0]
    if kh * kw == 1:
        return "fan-in blocks (input channels)"
    if cin % rows:
        return "fan-in blocks (kh·kw·cin, tap by tap)"
    per_tap = cin // rows
    for tap in range(1, kh * kw):
        ax.axhline(tap * per_tap - 0.5, color="white", lw=0.6)
    ax.set_yticks([tap * per_tap + (per_tap - 1) / 2 for tap in range(kh * kw)])
    ax.set_yticklabels([f"({h},{w})" for h in range(kh) for w in range(kw)], fontsize=7)
    return f"fan-in blocks, by kernel tap (h, w): {per_tap} per tap"


def _phase_text(step: int, phase: str) -> str:
    return f"step {step}, {phase}"


def layer_figure(state: LayerState, step: int, phase: str) -> Figure:
    """One pruned layer's block grid, titled with its name, the step, the phase and its achieved sparsity."""
    from matplotlib.figure import Figure

    rows, cols = state.mask.shape
    height = min(9.0, max(3.0, 2.0 + rows / 12))
    width = min(12.0, max(4.5, 3.0 + cols / 12))
    fig = Figure(figsize=(width, height), dpi=100)  # a fixed layout: constrained layout costs most of the drawing
    fig.subplots_adjust(left=0.8 / width, right=1 - 1.4 / width, bottom=0.6 / height, top=1 - 0.75 / height)
    ax = fig.add_subplot()
    norm = _attention_norm([state])
    image = _draw(ax, state, norm)
    ax.set_ylabel(_label_taps(ax, state))
    r, c = state.layout.block_size
    ax.set_xlabel(f"fan-out blocks ({c} outputs each)")
    ax.set_title(
        f"{state.name}: {state.sparsity:.1%} of {state.num_blocks} blocks pruned ({r}x{c})\n"
        f"{_phase_text(step, phase)}; black = pruned",
        fontsize=10,
    )
    if norm is not None:
        _colorbar(fig, image, ax, "attention A = N·softmax(k·L) (log scale)")  # k: logit_scale
    return fig


def overview_figure(states: list[LayerState], step: int, phase: str) -> Figure:
    """Every pruned layer as a small multiple on one shared colour scale."""
    from matplotlib.figure import Figure

    n = len(states)
    columns = min(n, max(1, round(np.sqrt(n * 1.6))))
    rows = -(-n // columns)
    width, height = 2.4 * columns + 1.2, 2.2 * rows + 0.8
    fig = Figure(figsize=(width, height), dpi=100)
    fig.subplots_adjust(left=0.2 / width, right=1 - 1.4 / width, bottom=0.2 / height, top=1 - 0.95 / height,
                        wspace=0.15, hspace=0.45)  # fmt: skip
    axes = np.atleast_1d(fig.subplots(rows, columns, squeeze=False)).reshape(-1)
    norm = _attention_norm(states)
    image = None
    for ax, state in zip(axes, states):
        image = _draw(ax, state, norm)
        ax.set_title(f"{state.name}\n{state.sparsity:.0%} pruned", fontsize=7)
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in axes[n:]:
        ax.set_visible(False)
    total = 1 - sum(s.num_kept for s in states) / max(1, sum(s.num_blocks for s in states))
    fig.suptitle(
        f"{n} pruned layers, {_phase_text(step, phase)}: {total:.1%} of blocks pruned\n"
        "rows: fan-in blocks, columns: fan-out blocks; black = pruned",
        fontsize=9,
    )
    if norm is not None and image is not None:
        _colorbar(fig, image, list(axes[:n]), "attention (log scale)", shrink=1.0)
    return fig


def _colorbar(fig: Figure, image: Any, ax: Any, label: str, shrink: float = 0.8) -> None:
    from matplotlib.ticker import FuncFormatter, NullFormatter

    bar = fig.colorbar(image, ax=ax, label=label, shrink=shrink, fraction=0.05, pad=0.03)
    plain = FuncFormatter(lambda value, _: f"{value:.3g}")
    bar.ax.yaxis.set_major_formatter(plain)
    # a range of a decade or more has labelled powers of ten; a narrower one needs its minor ticks labelled
    wide = image.norm.vmax >= 10 * image.norm.vmin
    bar.ax.yaxis.set_minor_formatter(NullFormatter() if wide else plain)


class MaskHeatmaps(pl.Callback):
    """Draw the block masks: all pruned layers in one overview (``overview``) at each phase end and when training
    ends, and each layer's own figure (``per_layer``) when training ends, or also at every phase end with
    ``per_layer_every_phase`` (a model with fewer than ``overview_min_layers`` pruned layers gets its layers'
    figures at every phase end instead of an overview). A phase end draws only what is new: SA++'s colours change
    every step, but another method's picture changes only with its masks, so a phase end where every block is kept
    (ACDC's dense phases) or the masks are those last drawn draws nothing. Drawing costs a tenth of a second or more
    per figure, so a run with many phases draws a few figures, not dozens. W&B gets them as images
    (``pruning/mask/<layer>``, ``pruning/masks``); other loggers with a folder get PNGs under
    ``<log_dir>/masks/``. It listens to the :class:`~sapp_lightning.BlockPruning` callback's sparsifier, so its
    place in the callback list does not matter.
    """

    def __init__(
        self,
        per_layer: bool = True,
        overview: bool = True,
        overview_min_layers: int = 2,
        per_layer_every_phase: bool = False,
    ) -> None:
        self.per_layer, self.overview, self.overview_min_layers = per_layer, overview, overview_min_layers
        self.per_layer_every_phase = per_layer_every_phase
        self._trainer: pl.Trainer | None = None
        self._sparsifier: BlockSparsifier | None = None
        self._drawn_masks: list[torch.Tensor] | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        pruning = next((cb for cb in trainer.callbacks if isinstance(cb, BlockPruning)), None)
        if stage == "fit" and pruning is not None and self._sparsifier is not pruning.sparsifier:
            self._sparsifier = pruning.sparsifier
            self._sparsifier.add_listener(self._on_event)
        self._trainer = trainer

    def _on_event(self, sparsifier: BlockSparsifier, event: PruningEvent) -> None:
        if event.kind != "phase_end" or event.phase is None or not self._draws():
            return
        states = sparsifier.layer_states()  # copied once, for the check and the drawing
        if self._shows_something_new(states):
            self._render(states, f"end of phase {event.segment_index} ({event.phase.name.lower()})", end=False)

    def _draws(self) -> bool:
        return self._trainer is not None and self._trainer.is_global_zero

    def _shows_something_new(self, states: list[LayerState]) -> bool:
        if any(state.importance_name == "attention" for state in states):
            return True
        masks = [state.mask for state in states]
        if all(bool(mask.all()) for mask in masks) or (
            self._drawn_masks is not None and all(map(torch.equal, masks, self._drawn_masks))
        ):
            return False
        self._drawn_masks = masks
        return True

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._sparsifier is not None and self._sparsifier.layers and self._draws():
            self._render(self._sparsifier.layer_states(), "end of training", end=True)

    def figures(self, sparsifier: BlockSparsifier, step: int, phase: str, end: bool = True) -> dict[str, Figure]:
        """``{W&B key: figure}`` for the masks as they are now (``end``: training ended; else a phase did)."""
        return self._figures(sparsifier.layer_states(), step, phase, end)

    def _figures(self, states: list[LayerState], step: int, phase: str, end: bool) -> dict[str, Figure]:
        overview = self.overview and len(states) >= self.overview_min_layers
        per_layer = self.per_layer and (end or self.per_layer_every_phase or not overview)
        figures = {f"pruning/mask/{s.name}": layer_figure(s, step, phase) for s in states} if per_layer else {}
        if overview:
            figures["pruning/masks"] = overview_figure(states, step, phase)
        return figures

    def _render(self, states: list[LayerState], phase: str, end: bool) -> None:
        trainer = self._trainer
        assert trainer is not None  # callers check _draws()
        step = trainer.global_step
        figures = self._figures(states, step, phase, end)
        for logger in trainer.loggers:
            for key, fig in figures.items():
                if isinstance(logger, WandbLogger):
                    import wandb

                    logger.log_image(key, [wandb.Image(fig)], step=step, caption=[phase])
                elif logger.log_dir:
                    name = key.removeprefix("pruning/mask/") if key != "pruning/masks" else "overview"
                    save_figure(fig, Path(logger.log_dir) / "masks" / name / f"step{step:07d}.png")
