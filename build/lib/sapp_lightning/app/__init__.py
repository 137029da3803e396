"""The Hydra application's pieces: a client of the public ``sapp_lightning`` API like any user's code."""

from .heatmaps import MaskHeatmaps

__all__ = ["MaskHeatmaps"]
