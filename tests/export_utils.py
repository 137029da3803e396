"""What the export tests share: committed-looking weights, and a machine without the C++ kernel."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sapp_lightning.blocks import BlockLayout, keep_count, kernel_kind
from sapp_lightning.export import kernels, matrix


def zero_blocks_(module: nn.Module, block, sparsity: float, param_name: str = "weight") -> nn.Module:
    """Keep a random ``round((1 - sparsity) * N)`` of the N blocks of a weight (Linear, Conv1D, Conv2d, or
    MultiheadAttention's ``in_proj_weight``), as a committed model has them."""
    weight = getattr(module, param_name)
    kind = "linear" if param_name != "weight" else kernel_kind(module)
    layout = BlockLayout.for_weight(weight, block, kind=kind)
    mask = torch.zeros(layout.num_blocks)
    mask[torch.randperm(layout.num_blocks)[: keep_count(layout.num_blocks, sparsity)]] = 1
    with torch.no_grad():
        weight.mul_(layout.expand(mask.reshape(layout.grid_shape)))
    return module


def disable_own_kernel(monkeypatch) -> None:
    """As on a machine without a C++ compiler: the own kernel is not built; torch.sparse does the products."""
    monkeypatch.setattr(kernels, "_state", {"module": None, "failed": True})
    monkeypatch.setattr(matrix, "_warned", {"no-kernel"})  # its one warning, given already


@pytest.fixture
def torch_sparse_only(monkeypatch):
    disable_own_kernel(monkeypatch)
