"""Saving an exported model, and restoring it into a fresh instance of the user's model class."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..blocks import is_hf_conv1d
from .attention import BlockSparseMultiheadAttention
from .conv import BlockSparseConv2d
from .convert import _set_submodule, finish_export
from .linear import BlockSparseLinear
from .summary import ExportChoice, ExportSummary

PREFIX = "sapp_lightning.block_sparse/"
VERSION = 3  # /1: int64 indices, linear layers only; /2: smallest index types; /3: own kernel, conv, attention
FORMAT = f"{PREFIX}{VERSION}"
SPARSE_MODULES = (BlockSparseLinear, BlockSparseConv2d, BlockSparseMultiheadAttention)


def save_block_sparse(model: nn.Module, path: str | Path) -> None:
    """Save an exported model: the sparse layers as index and value tensors, everything else as its state_dict.

    Indices are stored in the smallest integer type that holds them (uint8, int16, int32, int64) and the values of
    the own kernel without their padding; the file holds tensors and plain values only
    (``torch.load(weights_only=True)`` reads it), with the export summary. :func:`load_block_sparse` rebuilds the
    model into a fresh instance of the architecture.

    Example:
        >>> import tempfile
        >>> from sapp_lightning.export import to_block_sparse
        >>> net = nn.Sequential(nn.Linear(32, 32))
        >>> with torch.no_grad():
        ...     net[0].weight[:, 16:] = 0
        >>> path = f"{tempfile.mkdtemp()}/model.pt"
        >>> save_block_sparse(to_block_sparse(net, block_size=16), path)
        >>> loaded = load_block_sparse(path, nn.Sequential(nn.Linear(32, 32)))
        >>> loaded[0]
        BlockSparseLinear(in_features=32, out_features=32, kernel=own, blocksize=(16, 16), nonzero_blocks=2/4)
        >>> x = torch.randn(3, 32)
        >>> torch.testing.assert_close(loaded(x), net(x))
    """
    sparse: dict[str, Any] = {}
    for name, module in model.named_modules():
        inside = any(name.startswith(f"{saved}.") for saved in sparse)  # a projection of a saved attention
        if isinstance(module, SPARSE_MODULES) and not inside:
            sparse[name] = module.parts()
    if not sparse:
        raise ValueError("the model has no block-sparse layer; export it with to_block_sparse first")
    summary = getattr(model, "block_sparse_summary", None)
    saved = {"format": FORMAT, "sparse_layers": sparse, "state_dict": model.state_dict()}
    if isinstance(summary, ExportSummary):
        saved["summary"] = summary.to_dict()
    torch.save(saved, str(path))


def _dense_shape(module: nn.Module) -> tuple[list[int | None], str | None]:
    """``(shape, kind)`` a stored layer must match: ``[out, in]`` of a linear layer (kind ``"linear"`` or
    ``"hf_conv1d"``), a convolution's weight shape (``"conv2d"``), ``[embed_dim]`` of an attention."""
    if isinstance(module, BlockSparseLinear | BlockSparseConv2d):
        return module.dense_shape()  # type: ignore[return-value]
    if isinstance(module, BlockSparseMultiheadAttention | nn.MultiheadAttention):
        return [module.embed_dim], "mha"
    if is_hf_conv1d(module):
        return [module.weight.shape[1], module.weight.shape[0]], "hf_conv1d"
    if isinstance(module, nn.Linear):
        return [module.out_features, module.in_features], "linear"
    if isinstance(module, nn.Conv2d):
        return list(module.weight.shape), "conv2d"
    return [None, None], None


def _stored_shape(parts: dict[str, Any]) -> tuple[list[int], str]:
    kind = parts.get("module", "linear")
    if kind == "linear":
        if "matrix" in parts:
            shape = [parts["matrix"]["fan_out"], parts["matrix"]["fan_in"]]
        else:
            shape = list(parts["shape"])
        return shape, parts.get("source", "linear")
    if kind == "conv2d":
        g, fan_out = parts["geometry"], parts["matrix"]["fan_out"]
        return [fan_out, g["in_channels"], *g["kernel_size"]], "conv2d"
    return [parts["embed_dim"]], "mha"


_KIND_NAMES = {"linear": "linear", "hf_conv1d": "Conv1D", "conv2d": "Conv2d", "mha": "MultiheadAttention"}


def load_block_sparse(path: str | Path, model: nn.Module, map_location: Any = "cpu") -> nn.Module:
    """Load a file of :func:`save_block_sparse` into ``model``, a fresh (dense) instance of the architecture.

    Each stored sparse layer replaces the layer of the same name (its type and shape must match), then the rest of
    the state is loaded strictly; the export summary comes back as ``model.block_sparse_summary``. Returns
    ``model``, changed in place. Files of formats 1 and 2 (linear layers only) still load; a file of a newer format
    is refused with the version that wrote it.
    """
    saved = torch.load(str(path), map_location=map_location, weights_only=True)
    fmt = saved.get("format") if isinstance(saved, dict) else None
    if not isinstance(fmt, str) or not fmt.startswith(PREFIX) or not fmt[len(PREFIX) :].isdigit():
        raise ValueError(f"{path} is not a block-sparse model saved by save_block_sparse (format {FORMAT})")
    if int(fmt[len(PREFIX) :]) > VERSION:
        raise ValueError(
            f"{path} was written by a newer sapp_lightning (format {fmt}); this one reads formats {PREFIX}1 to "
            f"{FORMAT}: upgrade sapp_lightning to load it"
        )
    for name, parts in saved["sparse_layers"].items():
        try:
            current = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"the model has no layer {name!r}, which {path} stores as block-sparse") from None
        shape, kind = _dense_shape(current)
        stored, stored_kind = _stored_shape(parts)
        if shape != stored or kind != stored_kind:
            raise ValueError(
                f"layer {name!r} of the model is {type(current).__name__} {shape}, but {path} stores a "
                f"{' x '.join(map(str, stored))} {_KIND_NAMES[stored_kind]} layer there: build the same architecture"
            )
        if stored_kind == "conv2d":
            sparse: nn.Module = BlockSparseConv2d.from_parts(parts)
        elif stored_kind == "mha":
            sparse = BlockSparseMultiheadAttention.from_parts(parts, current)
        else:
            sparse = BlockSparseLinear.from_parts(parts)
        _set_submodule(model, name, sparse)
    model.load_state_dict(saved["state_dict"], strict=True)
    finish_export(model)
    if "summary" in saved:
        model.block_sparse_summary = _summary(saved["summary"])
    return model


def _summary(data: dict[str, Any]) -> ExportSummary:
    fields = set(ExportChoice.__dataclass_fields__)
    choices = []
    for row in data["layers"]:
        row = {k: v for k, v in row.items() if k in fields}
        row["blocksize"] = tuple(row["blocksize"]) if row.get("blocksize") else None
        choices.append(ExportChoice(**row))
    return ExportSummary(tuple(choices), data["batch_size"], tuple(data["block_size"]))
