"""``nn.MultiheadAttention`` with block-sparse projections.

``nn.MultiheadAttention`` never calls its projections as modules: in inference it hands ``in_proj_weight`` and
``out_proj.weight`` to ``torch._native_multi_head_attention`` (which refuses a sparse tensor), otherwise to
``F.linear``. :class:`BlockSparseMultiheadAttention` is its forward written out: the projections through
:class:`~.linear.BlockSparseLinear` (or dense where they stay dense), attention through
``F.scaled_dot_product_attention`` (or the explicit softmax where the weights are asked for), with the same
arguments, masks and outputs.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .linear import BlockSparseLinear
from .matrix import BlockSparseMatrix


def unsupported(mha: nn.MultiheadAttention) -> str | None:
    """Why ``mha`` cannot be replaced, or ``None``."""
    if mha.in_proj_weight is None:
        return "separate Q/K/V projection weights (kdim or vdim differ from embed_dim)"
    return None


def _one_more_key(mask: Tensor | None) -> Tensor | None:
    """A mask with a column for a key appended (``bias_k``, ``add_zero_attn``), which every query may attend."""
    return None if mask is None else F.pad(mask, (0, 1))


def _float_mask(mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """A boolean mask (``True``: do not attend) as ``-inf`` / ``0``; a float mask as it is."""
    if mask is None or mask.dtype != torch.bool:
        return None if mask is None else mask.to(dtype)
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask, float("-inf"))


class BlockSparseMultiheadAttention(nn.Module):
    """``nn.MultiheadAttention``'s forward with block-sparse projections (inference).

    ``in_proj`` is a :class:`~.linear.BlockSparseLinear` of ``embed_dim -> 3 * embed_dim`` or an ``nn.Linear``
    holding the dense ``in_proj_weight``; ``out_proj`` a :class:`~.linear.BlockSparseLinear` or the original layer.
    Self-attention (``query is key is value``) projects Q, K and V in one product.

    Example:
        >>> mha = nn.MultiheadAttention(32, 4, batch_first=True).eval()
        >>> with torch.no_grad():
        ...     mha.in_proj_weight[:, 16:] = 0  # every projection reads the first 16 inputs only
        >>> sparse = BlockSparseMultiheadAttention.from_mha(mha, "own", None, block=(16, 16)).eval()
        >>> x = torch.randn(2, 5, 32)
        >>> torch.testing.assert_close(sparse(x, x, x)[0], mha(x, x, x)[0])
    """

    # Read by nn.TransformerEncoderLayer and nn.TransformerEncoder before their fused paths (which take the
    # projections' dense weights): False sends them to the plain path, which calls this module.
    _qkv_same_embed_dim = False

    def __init__(self, in_proj: nn.Module, out_proj: nn.Module, config: dict[str, Any]) -> None:
        super().__init__()
        self.in_proj, self.out_proj = in_proj, out_proj
        self.embed_dim, self.num_heads = int(config["embed_dim"]), int(config["num_heads"])
        self.dropout, self.batch_first = float(config["dropout"]), bool(config["batch_first"])
        self.add_zero_attn = bool(config["add_zero_attn"])
        self.head_dim = self.embed_dim // self.num_heads
        self.bias_k: nn.Parameter | None = config.get("bias_k")
        self.bias_v: nn.Parameter | None = config.get("bias_v")

    @classmethod
    def from_mha(
        cls, mha: nn.MultiheadAttention, in_kernel: str | None, out_kernel: str | None, block: tuple[int, int]
    ) -> BlockSparseMultiheadAttention:
        """Replace ``mha``'s projections: each with a kernel (``"own"``, ``"bsr"``, ``"csr"``) or ``None`` (dense);
        ``block`` is the pruning's ``(fan_in, fan_out)`` block size."""
        why = unsupported(mha)
        if why is not None:
            raise ValueError(f"cannot replace this MultiheadAttention: {why}")
        embed = mha.embed_dim
        in_bias = None if mha.in_proj_bias is None else mha.in_proj_bias.detach().clone()
        if in_kernel is None:
            in_proj: nn.Module = nn.Linear(embed, 3 * embed, bias=in_bias is not None)
            in_proj.to(device=mha.in_proj_weight.device, dtype=mha.in_proj_weight.dtype)
            with torch.no_grad():
                in_proj.weight.copy_(mha.in_proj_weight)
                if in_bias is not None:
                    in_proj.bias.copy_(in_bias)
        else:
            matrix = BlockSparseMatrix.from_kernel(mha.in_proj_weight.detach().t(), block, in_kernel)
            in_proj = BlockSparseLinear(matrix, in_bias)
        out_proj = mha.out_proj
        if out_kernel is not None:
            out_proj = BlockSparseLinear.from_linear(mha.out_proj, out_kernel, (block[1], block[0]))
        return cls(in_proj, out_proj, cls._config(mha))

    @staticmethod
    def _config(mha: nn.MultiheadAttention) -> dict[str, Any]:
        return {"embed_dim": mha.embed_dim, "num_heads": mha.num_heads, "dropout": mha.dropout,
                "batch_first": mha.batch_first, "add_zero_attn": mha.add_zero_attn, "bias_k": mha.bias_k,
                "bias_v": mha.bias_v}  # fmt: skip

    @property
    def in_proj_weight(self) -> Tensor:
        """The ``3E x E`` input projection (a ``torch.sparse`` tensor where it is sparse), for code that reads it."""
        return self.in_proj.weight

    @property
    def in_proj_bias(self) -> Tensor | None:
        return self.in_proj.bias

    def _project(self, x: Tensor, which: int) -> Tensor:
        start, stop = which * self.embed_dim, (which + 1) * self.embed_dim
        if isinstance(self.in_proj, BlockSparseLinear):
            return self.in_proj(x, columns=(start, stop))
        bias = None if self.in_proj.bias is None else self.in_proj.bias[start:stop]
        return F.linear(x, self.in_proj.weight[start:stop], bias)

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        same = query is key and key is value
        batched = query.dim() == 3
        if not batched:  # (L, E): a batch of one
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            key_padding_mask = None if key_padding_mask is None else key_padding_mask.unsqueeze(0)
        elif not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        batch, length, embed = query.shape
        if same:
            q, k, v = self.in_proj(query).split(embed, dim=-1)
        else:
            q, k, v = self._project(query, 0), self._project(key, 1), self._project(value, 2)
        if is_causal and attn_mask is None:
            raise RuntimeError("Need attn_mask if specifying the is_causal hint (as nn.MultiheadAttention)")
        causal = is_causal and key_padding_mask is None and not need_weights  # SDPA builds the mask itself
        attn_mask = None if causal else _float_mask(attn_mask, q.dtype)
        key_padding_mask = _float_mask(key_padding_mask, q.dtype)
        if attn_mask is not None:
            attn_mask = attn_mask.view(batch, self.num_heads, length, -1) if attn_mask.dim() == 3 else attn_mask
        if self.bias_k is not None and self.bias_v is not None:
            k = torch.cat([k, self.bias_k.expand(batch, 1, embed)], dim=1)
            v = torch.cat([v, self.bias_v.expand(batch, 1, embed)], dim=1)
            attn_mask, key_padding_mask = _one_more_key(attn_mask), _one_more_key(key_padding_mask)
        q, k, v = (t.reshape(batch, -1, self.num_heads, self.head_dim).transpose(1, 2) for t in (q, k, v))
        if self.add_zero_attn:
            zeros = k.new_zeros(batch, self.num_heads, 1, self.head_dim)
            k, v = torch.cat([k, zeros], dim=2), torch.cat([v, zeros], dim=2)
            attn_mask, key_padding_mask = _one_more_key(attn_mask), _one_more_key(key_padding_mask)
        mask = attn_mask
        if key_padding_mask is not None:
            padding = key_padding_mask.view(batch, 1, 1, -1)
            mask = padding if mask is None else mask + padding
        dropout = self.dropout if self.training else 0.0
        weights = None
        if need_weights:
            scores = (q * math.sqrt(1.0 / self.head_dim)) @ k.transpose(-2, -1)
            weights = torch.softmax(scores if mask is None else scores + mask, dim=-1)
            out = F.dropout(weights, dropout) @ v if dropout else weights @ v
            weights = weights.mean(dim=1) if average_attn_weights else weights
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=causal)
        out = self.out_proj(out.transpose(1, 2).reshape(batch, length, embed))
        if not batched:
            return out.squeeze(0), None if weights is None else weights.squeeze(0)
        return (out if self.batch_first else out.transpose(0, 1)), weights

    # --- storage ---------------------------------------------------------------------------------------------
    def parts(self) -> dict[str, Any]:
        """The sparse projections' tensors (a dense one is in the model's ``state_dict``)."""
        sparse = {name: getattr(self, name).parts() for name in ("in_proj", "out_proj")
                  if isinstance(getattr(self, name), BlockSparseLinear)}  # fmt: skip
        return {"module": "mha", "embed_dim": self.embed_dim, **sparse}

    @classmethod
    def from_parts(cls, parts: dict[str, Any], mha: nn.MultiheadAttention) -> BlockSparseMultiheadAttention:
        """Rebuild into the place of ``mha`` (a fresh layer of the same configuration: its dense tensors are loaded
        from the file's ``state_dict`` afterwards)."""
        why = unsupported(mha)
        if why is not None:
            raise ValueError(f"cannot replace this MultiheadAttention: {why}")
        module = cls.from_mha(mha, None, None, (1, 1))
        if "in_proj" in parts:
            module.in_proj = BlockSparseLinear.from_parts(parts["in_proj"])
        if "out_proj" in parts:
            module.out_proj = BlockSparseLinear.from_parts(parts["out_proj"])
        return module
