""":func:`to_block_sparse`: which weights become block-sparse, with which kernel, and the replacement itself."""

from __future__ import annotations

import copy
import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..blocks import BlockLayout, BlockSize, KernelKind, normalize_block_size
from ..report import measure_layer
from ..targets import compile_patterns, survey, weight_kinds
from . import attention, conv, kernels
from .attention import BlockSparseMultiheadAttention
from .conv import BlockSparseConv2d
from .linear import BlockSparseLinear
from .summary import ExportChoice, ExportSummary

log = logging.getLogger("sapp_lightning.export")

LAYOUTS = ("auto", "own", "bsr", "csr")
DEFAULT_BATCH_SIZE = 32

# The rule for this project's kernel (docs/results.md section 3: 1-256 rows, 1 and 2 threads, layers 256-3072 wide,
# 10-50% zero blocks of 16x16): it beat dense in every cell from 20% zero blocks (1.1x at least), and lost in 5 of
# 32 cells at 10% (0.85-0.98x, at 256 rows and on the 3072-input layer).
OWN_MIN_ZERO = 0.2

# The rule for torch.sparse (the fallback without a compiler; one thread, MKL; docs/results.md section 3):
DENSE_MARGIN = 1.1  # the rule was fitted counting a layout as a win only when at least this much faster than dense
MIN_ZERO = 0.8  # under 80% zero blocks sparse products win 1.0-1.5x at best and lose at 1-4 and 100+ rows
FEW_ROWS = 2  # 1-2 rows: dense is a memory-bound GEMV, hard to beat ...
FEW_ROWS_CSR_MIN_ZERO = 0.9  # ... CSR needs 90% zero blocks there; BSR with blocks of 16+ beats it
BIG_BLOCK = 16  # blocks this large (both sides): BSR for 1-2 rows, CSR from 4 rows on (measured up to 256)
SMALL_BLOCK_BSR_ROWS = 16  # blocks under 16: BSR (padded) from 16 rows, CSR below


# Without the own kernel a convolution would go through an im2col copy and torch.sparse.mm: 0.1-0.9x dense oneDNN
# at 90% zero blocks, 1x1 and 3x3, batch 1-32 (docs/results.md section 3), so it stays dense there.
TORCH_SPARSE_CONV = "torch.sparse (the own kernel is not built or takes float32): slower than dense for convolutions"


def zero_block_fraction(weight: torch.Tensor, block_size: BlockSize, kind: KernelKind = "linear") -> float:
    """Fraction of the blocks of a weight (paper orientation ``fan_in x fan_out``) that are all zero; ``kind``
    is ``"linear"`` for an ``nn.Linear`` weight (``out x in``), ``"hf_conv1d"`` for a Conv1D's (``in x out``),
    ``"conv2d"`` for a convolution's.

    Example:
        >>> w = torch.zeros(16, 32)
        >>> w[:8, :8] = 1.0
        >>> zero_block_fraction(w, 8), zero_block_fraction(w.t(), 8, kind="hf_conv1d")
        (0.875, 0.875)
    """
    layer = measure_layer("", weight, BlockLayout.for_weight(weight, block_size, kind=kind))
    return layer.zero_blocks / layer.num_blocks


def kernel_rule(batch_size: int, zero_fraction: float) -> tuple[str | None, str]:
    """Whether this project's CPU kernel beats dense: ``("own" | None for dense, why)``; deterministic, no timing.

    ``batch_size`` is the rows a layer multiplies per call (batch x tokens; a convolution multiplies batch x pixels).
    Measured (docs/results.md section 3), the kernel beat dense from 20% zero blocks at every batch from 1 to 256 rows
    on one and two threads (and lost in some cells at 10%), so the rule needs the fraction only; ``batch_size`` is
    named in the reason.

    Example:
        >>> kernel_rule(32, 0.9)
        ('own', 'batch 32, 90.0% zero blocks: own kernel (dense is faster under 20%)')
        >>> kernel_rule(1, 0.1)
        (None, '10.0% zero blocks: dense is as fast under 20%')
    """
    _check_batch(batch_size)
    if zero_fraction < OWN_MIN_ZERO:
        return None, f"{zero_fraction:.1%} zero blocks: dense is as fast under {OWN_MIN_ZERO:.0%}"
    why = f"batch {batch_size}, {zero_fraction:.1%} zero blocks: own kernel (dense is faster under {OWN_MIN_ZERO:.0%})"
    return "own", why


def layout_rule(batch_size: int, blocksize: tuple[int, int] | None, zero_fraction: float) -> tuple[str | None, str]:
    """The ``torch.sparse`` layout for a layer on CPU (the path without this project's kernel):
    ``("bsr" | "csr" | None for dense, why)``; deterministic, no timing.

    Args:
        batch_size: rows the layer multiplies per call (batch x tokens for sequence inputs).
        blocksize: ``(rows, cols)`` BSR blocks of the ``out x in`` matrix, or ``None`` where the blocks do not tile
            it (edge blocks) or are not square (MKL refuses those): then only CSR is considered.
        zero_fraction: fraction of all-zero blocks (:func:`zero_block_fraction`).

    The rule, from one-thread timings of dense ``F.linear`` against ``torch.sparse.mm`` over batches 1-256,
    blocks 4-64 and sparsities 50-95% (docs/results.md §3): dense under 80% zero blocks; BSR where the blocks tile
    and either both block sides are 16 or more and the batch is 1 or 2, or a block side is under 16 and the batch
    is 16 or more; CSR otherwise, except at a batch of 1 or 2 under 90% zero blocks: dense there.

    Example:
        >>> layout_rule(1, (16, 16), 0.9)[0], layout_rule(32, (16, 16), 0.9)[0], layout_rule(256, (8, 8), 0.9)[0]
        ('bsr', 'csr', 'bsr')
        >>> layout_rule(1, (8, 8), 0.85)
        (None, 'batch 1: CSR needs 90% zero blocks to beat dense (85.0% here), BSR blocks of 16+')
    """
    _check_batch(batch_size)
    if zero_fraction < MIN_ZERO:
        return None, f"{zero_fraction:.1%} zero blocks: under {MIN_ZERO:.0%}, no sparse layout beats dense"
    if blocksize is not None:
        big = min(blocksize) >= BIG_BLOCK
        if big and batch_size <= FEW_ROWS:
            return "bsr", f"batch {batch_size}, blocks of {BIG_BLOCK}+: BSR"
        if not big and batch_size >= SMALL_BLOCK_BSR_ROWS:
            return "bsr", f"batch {batch_size} >= {SMALL_BLOCK_BSR_ROWS}, blocks under {BIG_BLOCK}: BSR"
    edge = "" if blocksize is not None else "edge blocks force CSR; "
    if batch_size <= FEW_ROWS and zero_fraction < FEW_ROWS_CSR_MIN_ZERO:
        why = f"batch {batch_size}: CSR needs {FEW_ROWS_CSR_MIN_ZERO:.0%} zero blocks to beat dense"
        why += f" ({zero_fraction:.1%} here)" + ("" if blocksize is None else f", BSR blocks of {BIG_BLOCK}+")
        return None, edge + why
    return "csr", edge + f"batch {batch_size}: CSR"


def _check_batch(batch_size: int) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")


def _bsr_blocksize(fan_in: int, fan_out: int, block: tuple[int, int]) -> tuple[int, int] | None:
    """The BSR blocksize of the ``out x in`` matrix, or ``None`` where BSR is impossible (edge blocks; MKL
    refuses blocks that are not square)."""
    r, c = block
    return None if fan_in % r or fan_out % c or r != c else (c, r)


@dataclass(frozen=True)
class _Asked:
    block: tuple[int, int]
    min_sparsity: float
    layout: str
    batch_size: int
    own: bool  # layout 'auto' and this project's kernel is built


_NO_KERNEL = {
    "embedding": "no sparse kernel for Embedding (a table lookup, not a product)",
    "conv1d": "no sparse kernel for Conv1d",
}


def _choose(label: str, module: nn.Module, param_name: str, reason: str | None, asked: _Asked) -> ExportChoice:
    """The kernel for one weight, or why it stays dense (``reason``: the one :func:`~sapp_lightning.targets.survey`
    gave, for a weight it does not choose)."""
    type_name = type(module).__name__
    weight = getattr(module, param_name)
    kind = dict(weight_kinds(module)).get(param_name)
    counts = {}
    if kind is not None and not weight.dtype.is_complex:
        layer = measure_layer(label, weight.detach(), BlockLayout(kind, tuple(weight.shape), asked.block))
        counts = {"nonzero_blocks": layer.num_blocks - layer.zero_blocks, "num_blocks": layer.num_blocks}

    def dense(why: str) -> ExportChoice:
        return ExportChoice(label, type_name, None, why, **counts)

    if kind in _NO_KERNEL:
        return dense(_NO_KERNEL[kind])
    if reason is not None:
        return dense(reason)
    if isinstance(module, nn.Linear) and type(module).forward is not nn.Linear.forward:
        return dense(f"{type_name} overrides nn.Linear.forward")
    why = conv.unsupported(module) if isinstance(module, nn.Conv2d) else None
    why = attention.unsupported(module) if isinstance(module, nn.MultiheadAttention) else why
    if why is not None:
        return dense(f"no sparse kernel: {why}")
    on_cpu = weight.device.type == "cpu"
    if on_cpu and weight.dtype not in (torch.float32, torch.float64):
        return dense(f"{weight.dtype}: the CPU kernels take float32 (own) or float32/64 (torch.sparse)")
    zero = 1.0 - counts["nonzero_blocks"] / counts["num_blocks"]
    if zero == 0.0:
        return dense("no zero blocks")
    if zero < asked.min_sparsity:
        return dense(f"{zero:.1%} zero blocks, under min_sparsity={asked.min_sparsity:.0%}")
    fan_in, fan_out = BlockLayout(kind, tuple(weight.shape), asked.block).kernel_shape
    blocksize = _bsr_blocksize(fan_in, fan_out, asked.block)
    if asked.layout == "bsr" and blocksize is None:
        raise ValueError(
            f"layout 'bsr' needs square blocks that tile the weight: {label} is {fan_out} x {fan_in} (out x in), "
            f"blocks {(asked.block[1], asked.block[0])}; use layout='own', 'csr' or 'auto'"
        )
    own_fits = weight.dtype == torch.float32 or not on_cpu
    if asked.layout == "own" and not own_fits:
        raise ValueError(f"layout 'own' takes float32 weights on the CPU: {label} is {weight.dtype}")
    if asked.layout != "auto":
        chosen, why = asked.layout, f"layout={asked.layout!r} asked"
    elif asked.own and own_fits:
        chosen, why = kernel_rule(asked.batch_size, zero)
    elif isinstance(module, nn.Conv2d):
        return dense(TORCH_SPARSE_CONV)
    else:
        chosen, why = layout_rule(asked.batch_size, blocksize, zero)
        why += " (torch.sparse: the own kernel " + ("is not built)" if own_fits else "takes float32)")
    if chosen is None:
        return dense(why)
    shown = (asked.block[1], asked.block[0]) if chosen == "own" else blocksize if chosen == "bsr" else None
    return ExportChoice(label, type_name, chosen, why, shown, **counts)


def to_block_sparse(
    model: nn.Module,
    block_size: BlockSize,
    min_sparsity: float = 0.0,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    layout: str = "auto",
    batch_size: int = DEFAULT_BATCH_SIZE,
    inplace: bool = False,
    sample_batch: int | None = None,
    min_blocks: int = 0,
) -> nn.Module:
    """Replace the block-sparse layers of a committed model with modules that skip their zero blocks.

    Layers are chosen as :class:`~sapp_lightning.BlockPruning` chooses them (:func:`~sapp_lightning.targets.survey`:
    the same ``include``, ``exclude``, ``min_blocks``, tie detection): ``nn.Linear`` and subclasses that keep its
    forward and Hugging Face ``Conv1D`` become :class:`~.linear.BlockSparseLinear`, ``nn.Conv2d`` (groups 1)
    :class:`~.conv.BlockSparseConv2d`, ``nn.MultiheadAttention`` (either projection sparse)
    :class:`~.attention.BlockSparseMultiheadAttention`. The returned model's ``block_sparse_summary`` (an
    :class:`~.summary.ExportSummary`, also logged at INFO on ``sapp_lightning.export``) lists every weight with its
    kernel, or why it stays dense.

    Args:
        model: a model whose pruning was committed (``trainer.fit`` returned, or ``BlockPruning.commit()``);
            a layer still carrying a parametrization (masks, SA++'s attention) is refused.
        block_size: the block size the model was pruned with (``(fan_in, fan_out)`` as in ``BlockPruning``).
        min_sparsity: your own floor: a layer is exported only with at least this fraction of zero blocks.
        include / exclude / min_blocks: as in ``BlockPruning`` (regular expressions searched in module names).
        layout: the kernel. ``"auto"``: this project's CPU kernel (``"own"``) where :func:`kernel_rule` expects it
            to beat dense at ``batch_size``, or without a compiler ``torch.sparse`` by :func:`layout_rule`;
            ``"own"``, ``"bsr"`` or ``"csr"`` force one on every sparse-enough layer (``"bsr"`` needs square
            blocks that tile the weight).
        batch_size: rows each layer will multiply per call: the batch, times the tokens for sequence inputs
            (a ViT on one image: 197). Default 32.
        inplace: change ``model`` itself instead of a deep copy.
        sample_batch: the former name of ``batch_size``.

    Returns:
        The model with its sparse layers replaced (for inference: no gradient flows through them), with the summary
        as its ``block_sparse_summary`` attribute.

    Example:
        >>> net = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Conv1d(1, 1, 3))
        >>> with torch.no_grad():
        ...     net[0].weight[16:] = 0  # 1 of 4 rows of blocks of 16 kept: 75% zero blocks
        >>> summary = to_block_sparse(net, block_size=16).block_sparse_summary
        >>> for c in summary.choices:
        ...     print(c.name, c.layout, c.reason)
        0 own batch 32, 75.0% zero blocks: own kernel (dense is faster under 20%)
        2 None no sparse kernel for Conv1d
    """
    if sample_batch is not None:
        warnings.warn("to_block_sparse: sample_batch is now batch_size", DeprecationWarning, stacklevel=2)
        batch_size = sample_batch
    if not 0.0 <= min_sparsity <= 1.0:
        raise ValueError(f"min_sparsity must be in [0, 1], got {min_sparsity!r}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(map(repr, LAYOUTS))}, got {layout!r}")
    _check_batch(batch_size)
    block = normalize_block_size(block_size)
    includes, excludes = compile_patterns(include, "include"), compile_patterns(exclude, "exclude")
    uncommitted = [name for name, m in model.named_modules() if parametrize.is_parametrized(m)]
    if uncommitted:
        raise ValueError(
            f"layer(s) {', '.join(map(repr, uncommitted[:5]))} still carry a parametrization (pruning masks not "
            "committed?): export the model after trainer.fit returned, or call BlockPruning.commit() first"
        )
    target = model if inplace else copy.deepcopy(model)
    asked = _Asked(block, min_sparsity, layout, batch_size, layout == "auto" and kernels.extension() is not None)
    _, surveyed, _ = survey(target, block, min_blocks, includes, excludes)
    owners = {}
    for name, module in target.named_modules():
        for param_name, _ in weight_kinds(module):
            owners[name if param_name == "weight" else f"{name}.{param_name}"] = (name, module, param_name)
    mha_out = {f"{name}.out_proj": name for name, m in target.named_modules() if isinstance(m, nn.MultiheadAttention)}
    choices = []
    for row in surveyed:
        name, module, param_name = owners[row.name]
        reason = row.reason
        if reason is None and row.name in mha_out and attention.unsupported(target.get_submodule(mha_out[row.name])):
            reason = "its MultiheadAttention stays as it is, and passes out_proj.weight to its fused kernel"
        choices.append(_choose(row.name, module, param_name, reason, asked))
    choices = _replace(target, choices, owners, mha_out, block)
    finish_export(target)
    summary = ExportSummary(tuple(choices), batch_size, block)
    target.block_sparse_summary = summary
    log.info("to_block_sparse (block %s, batch %d):\n%s", block, batch_size, summary.format())
    if not summary.exported:
        warnings.warn(
            f"to_block_sparse: no layer became block-sparse with blocks {block} at batch {batch_size}; the model is "
            f"unchanged (was it pruned with this block size, and committed?):\n" + summary.format(),
            stacklevel=2,
        )
    return target


def _replace(target: nn.Module, choices: list[ExportChoice], owners: dict, mha_out: dict, block) -> list[ExportChoice]:
    """Swap the chosen layers in; returns the choices with their index dtypes."""
    by_label = {c.name: c for c in choices}
    done = []
    for choice in choices:
        name, module, _ = owners[choice.name]
        if not choice.exported or choice.name in mha_out:  # MultiheadAttention's out_proj: with its attention
            done.append(choice)
            continue
        if isinstance(module, nn.MultiheadAttention):
            out = by_label.get(f"{name}.out_proj")
            out_kernel = out.layout if out is not None else None
            sparse: nn.Module = BlockSparseMultiheadAttention.from_mha(module, choice.layout, out_kernel, block)
            matrix = sparse.in_proj.matrix
        elif isinstance(module, nn.Conv2d):
            sparse = BlockSparseConv2d.from_conv(module, block, choice.layout)
            matrix = sparse.matrix
        else:
            sparse = BlockSparseLinear.from_linear(module, choice.layout, (block[1], block[0]))
            matrix = sparse.matrix
        _set_submodule(target, name, sparse)
        done.append(replace(choice, index_dtype=str(matrix.index_dtype).removeprefix("torch.")))
    # a MultiheadAttention whose in_proj stays dense but whose out_proj is exported
    for i, choice in enumerate(done):
        parent = mha_out.get(choice.name)
        if parent is None or not choice.exported:
            continue
        mha = target.get_submodule(parent)
        if isinstance(mha, nn.MultiheadAttention):
            _set_submodule(target, parent, BlockSparseMultiheadAttention.from_mha(mha, None, choice.layout, block))
        matrix = target.get_submodule(parent).out_proj.matrix
        done[i] = replace(choice, index_dtype=str(matrix.index_dtype).removeprefix("torch."))
    return done


_SPARSE = (BlockSparseLinear, BlockSparseConv2d, BlockSparseMultiheadAttention)


def finish_export(model: nn.Module) -> None:
    """What the model around the block-sparse layers needs (after :func:`to_block_sparse`, and again after
    :func:`~.storage.load_block_sparse`):

    * where a convolution became block-sparse, the dense convolutions' weights become channels-last: their outputs
      are then channels-last too, which is what the sparse convolutions read without a copy (an NCHW activation
      costs a transposing copy per layer, as much as the sparse product on ResNet50's wide layers);
    * ``nn.TransformerEncoderLayer`` and ``nn.TransformerEncoder`` holding block-sparse layers take their plain
      forward: their fused inference paths hand every layer's dense weight to one kernel. An encoder layer's
      attention becomes a :class:`~.attention.BlockSparseMultiheadAttention` (its projections dense where they
      were), which those paths refuse; an encoder stops building nested tensors.
    """
    if any(isinstance(m, BlockSparseConv2d) for m in model.modules()):
        for module in model.modules():
            if isinstance(module, nn.Conv2d):
                module.to(memory_format=torch.channels_last)
    for module in list(model.modules()):
        if not isinstance(module, nn.TransformerEncoderLayer | nn.TransformerEncoder):
            continue
        if not any(isinstance(m, _SPARSE) for m in module.modules()):
            continue
        if isinstance(module, nn.TransformerEncoder):
            module.use_nested_tensor = False
        elif isinstance(module.self_attn, nn.MultiheadAttention) and not attention.unsupported(module.self_attn):
            module.self_attn = BlockSparseMultiheadAttention.from_mha(module.self_attn, None, None, (1, 1))


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    if not name:
        raise ValueError("to_block_sparse exports layers inside a model, not a bare layer; wrap it")
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, module)
