"""The Hydra application's pieces: a client of the public ``sapp_lightning`` API like any user's code."""

from __future__ import annotations

from typing import Any

__all__ = ["MaskHeatmaps"]


def __getattr__(name: str) -> Any:
    # lazy: importing the app's package loads neither Lightning nor matplotlib
    if name == "MaskHeatmaps":
        from .heatmaps import MaskHeatmaps

        return MaskHeatmaps
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
