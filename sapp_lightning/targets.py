"""Which weights of a model get pruned, and why the others stay dense.

Eligible by default: ``nn.Linear`` and its subclasses (attention output projections included), Hugging Face's
``Conv1D`` (GPT-2), ``nn.Conv2d`` with ``groups == 1``, and the Q/K/V input projection of
``nn.MultiheadAttention``; ``nn.Conv1d`` and ``nn.Embedding`` when ``include`` names them. Every weight matrix or
kernel of the model gets a :class:`LayerChoice` saying whether it is pruned and, if not, why.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from torch import Tensor, nn

from .blocks import BlockLayout, BlockSize, kernel_kind, normalize_block_size
from .distributed import rank_zero_warn
from .tables import text_table

DEFAULT_TYPES = ("linear", "conv2d", "hf_conv1d")  # Conv1d and embeddings only when a user includes them


def compile_patterns(patterns: str | Sequence[str] | None, argument: str) -> tuple[re.Pattern, ...]:
    """Compile a list of regular expressions, naming the argument in the error for a bad one."""
    if patterns is None:
        return ()
    if isinstance(patterns, str):
        patterns = [patterns]
    compiled = []
    for pattern in patterns:
        try:
            compiled.append(re.compile(pattern))
        except (re.error, TypeError) as err:
            raise ValueError(f"{argument} holds an invalid regular expression {pattern!r}: {err}") from None
    return tuple(compiled)


@dataclass(frozen=True)
class Candidate:
    name: str
    module: nn.Module
    layout: BlockLayout
    param_name: str = "weight"

    @property
    def weight(self) -> nn.Parameter:
        return getattr(self.module, self.param_name)


@dataclass(frozen=True)
class LayerChoice:
    """One weight of the model: pruned (``reason`` is ``None``) or left dense, and why."""

    name: str
    type_name: str
    layout: BlockLayout | None
    reason: str | None = None

    @property
    def pruned(self) -> bool:
        return self.reason is None


def weight_kinds(module: nn.Module) -> list[tuple[str, str | None]]:
    """``(parameter name, kernel kind or None)`` for each weight matrix or kernel held directly by ``module``."""
    if isinstance(module, nn.MultiheadAttention):
        if module.in_proj_weight is not None:
            return [("in_proj_weight", "linear")]
        return [(p, None) for p in ("q_proj_weight", "k_proj_weight", "v_proj_weight")]
    weight = module._parameters.get("weight")
    if weight is None or weight.dim() < 2:
        return []
    return [("weight", kernel_kind(module))]


def _unsupported(module: nn.Module) -> str:
    groups = getattr(module, "groups", 1)
    if isinstance(module, nn.Conv1d | nn.Conv2d | nn.Conv3d) and groups > 1:
        return "depthwise convolution" if groups == module.in_channels else f"grouped convolution (groups={groups})"
    if isinstance(module, nn.MultiheadAttention):
        return "separate Q/K/V projection weights (kdim or vdim differ from embed_dim)"
    return f"unsupported type {type(module).__name__}"


def _walk(model: nn.Module, block: tuple[int, int], include: Sequence[re.Pattern], exclude: Sequence[re.Pattern]):
    """Every weight of ``model`` as ``(candidate or None, choice)``, judged by type and name only."""
    for name, module in model.named_modules():
        for param_name, kind in weight_kinds(module):
            label = name if param_name == "weight" else f"{name}.{param_name}"
            type_name = type(module).__name__
            if kind is None:
                yield None, LayerChoice(label, type_name, None, _unsupported(module))
                continue
            layout = BlockLayout(kind, tuple(getattr(module, param_name).shape), block)
            reason = None
            if include and not any(p.search(name) for p in include):
                reason = "not included"
            elif not include and kind not in DEFAULT_TYPES:
                reason = f"{type_name} is pruned only when include names it"
            elif any(p.search(name) for p in exclude):
                reason = "excluded"
            candidate = Candidate(name, module, layout, param_name) if reason is None else None
            yield candidate, LayerChoice(label, type_name, layout, reason)


def candidate_layers(
    model: nn.Module,
    block_size: BlockSize,
    include: Iterable[re.Pattern] = (),
    exclude: Iterable[re.Pattern] = (),
) -> list[Candidate]:
    """The weights of the eligible types whose names match, before the block-count rule (tied ones too)."""
    block = normalize_block_size(block_size)
    return [c for c, _ in _walk(model, block, tuple(include), tuple(exclude)) if c is not None]


def survey(
    model: nn.Module,
    block_size: BlockSize,
    min_blocks: int = 0,
    include: Iterable[re.Pattern] = (),
    exclude: Iterable[re.Pattern] = (),
) -> tuple[list[Candidate], list[LayerChoice], list[Candidate]]:
    """The weights to prune, a :class:`LayerChoice` for every weight of the model (in module order), and the
    eligible weights shared by several modules (tied).

    A tied weight is reported with ``reason="tied with ..."`` and not chosen; the caller decides what to do with
    it (see :class:`~sapp_lightning.BlockSparsifier`).
    """
    block = normalize_block_size(block_size)
    owners = parameter_owners(model)
    chosen: list[Candidate] = []
    tied: list[Candidate] = []
    choices: list[LayerChoice] = []
    for candidate, choice in _walk(model, block, tuple(include), tuple(exclude)):
        if candidate is not None:
            module, layout = candidate.module, candidate.layout
            holders = owners[id(candidate.weight)]
            reason = None
            if layout.num_blocks < min_blocks:
                reason = f"{layout.num_blocks} blocks, under min_blocks={min_blocks}"
            elif isinstance(module, nn.MultiheadAttention) and module.embed_dim % block[1]:
                reason = (
                    f"embed_dim {module.embed_dim} is not a multiple of the block's {block[1]} outputs: blocks "
                    "would straddle Q, K and V"
                )
            elif len(holders) > 1:
                others = [h for h in holders if h != f"{candidate.name}.{candidate.param_name}"]
                reason = f"tied with {', '.join(others)}"
                tied.append(candidate)
            choice = LayerChoice(choice.name, choice.type_name, layout, reason)
            if reason is None:
                chosen.append(candidate)
        choices.append(choice)
    return chosen, choices, tied


def choose_layers(
    model: nn.Module,
    block_size: BlockSize,
    min_blocks: int,
    include: Sequence[re.Pattern] = (),
    exclude: Sequence[re.Pattern] = (),
    refuse_tied: str | None = None,
    cannot_train: Callable[[Tensor], str | None] | None = None,
    who: str = "BlockSparsifier",
) -> tuple[list[Candidate], list[LayerChoice]]:
    """:func:`survey`, deciding on tied weights and refusing a model with nothing to prune.

    A tied weight stays dense with a warning, unless ``include`` names it: then it is pruned once, through its
    first owner, where the algorithm zeroes blocks in place; ``refuse_tied`` (the algorithm, when it
    reparametrizes the forward of one module only) refuses it. A weight for which ``cannot_train`` (the
    algorithm's check) gives a reason stays dense with that reason and a warning. Raises ``ValueError`` before
    anything changes.
    """
    chosen, choices, tied = survey(model, block_size, min_blocks, include, exclude)
    untrainable = {_label(c): why for c in chosen if cannot_train and (why := cannot_train(c.weight.detach()))}
    if untrainable:
        chosen = [c for c in chosen if _label(c) not in untrainable]
        choices = [LayerChoice(c.name, c.type_name, c.layout, untrainable.get(c.name, c.reason)) for c in choices]
        listed = "; ".join(f"{name} ({why})" for name, why in untrainable.items())
        rank_zero_warn(f"{who}: these weights stay dense: {listed}")
    if tied and include:  # the user named a tied weight
        if refuse_tied is not None:
            owners = ", ".join(c.reason.removeprefix("tied with ") for c in choices if c.name == tied[0].name)
            raise ValueError(
                f"include names {tied[0].name!r}, whose weight is tied with {owners}: {refuse_tied} changes the "
                "weight only in the forward of the module it is registered on, so the other owners would keep the "
                "dense weight. Prune it with an algorithm that zeroes blocks in place (acdc or magnitude, "
                "prune_mode='zero'), or untie it"
            )
        first: dict[int, str] = {}
        for cand in tied:
            first.setdefault(id(cand.weight), cand.name)
        picked = set(first.values())
        order = {c.name: i for i, c in enumerate(choices)}
        chosen = sorted([*chosen, *(c for c in tied if c.name in picked)], key=lambda c: order[_label(c)])
        choices = [LayerChoice(c.name, c.type_name, c.layout, None) if c.name in picked else c for c in choices]
    elif tied:
        listed = "; ".join(f"{c.name} ({c.reason})" for c in choices if c.reason and c.reason.startswith("tied"))
        rank_zero_warn(
            f"{who}: tied weights stay dense: {listed}. To prune one, include it by name (include=[...]): "
            "acdc and magnitude with prune_mode='zero' prune it once for all its owners"
        )
    if not chosen and untrainable:
        raise ValueError(f"no layer to prune: {'; '.join(f'{n} is {why}' for n, why in untrainable.items())}")
    if not chosen:
        blockable = [c for c in choices if c.layout is not None and c.reason.startswith(("tied", "embed_dim"))
                     or "under min_blocks" in (c.reason or "")]  # fmt: skip
        if blockable:
            found = ", ".join(f"{c.name} ({c.layout.num_blocks} blocks)" for c in blockable[:10])
            raise ValueError(
                f"no layer has at least min_blocks={min_blocks} blocks of size {normalize_block_size(block_size)}; "
                f"candidates: {found}. Use a smaller block_size or min_blocks."
            )
        raise ValueError(
            "no layer to prune: the model has no nn.Linear or nn.Conv2d (groups=1) layer"
            + (" matching include/exclude" if include or exclude else "")
        )
    return chosen, choices


def _label(candidate: Candidate) -> str:
    return candidate.name if candidate.param_name == "weight" else f"{candidate.name}.{candidate.param_name}"


def parameter_owners(model: nn.Module) -> dict[int, list[str]]:
    """``id(parameter)`` -> the sorted names under which the model holds it (several: a tied weight)."""
    holders: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        for param_name, param in module.named_parameters(recurse=False):
            holders.setdefault(id(param), []).append(f"{name}.{param_name}" if name else param_name)
    return {key: sorted(set(value)) for key, value in holders.items()}


def format_choices(choices: Sequence[LayerChoice]) -> str:
    """The set-up summary: one row per weight, its block grid, and why it stays dense."""
    rows = [
        (
            c.name,
            c.type_name,
            "x".join(map(str, c.layout.grid_shape)) if c.layout else "—",
            "yes" if c.pruned else "no",
            c.reason or "",
        )
        for c in choices
    ]
    return text_table(("layer", "type", "blocks", "pruned", "why not"), rows)
