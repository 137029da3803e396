"""Plain weights from a checkpoint written during training, without a model or this package's callback; checkpoint
files are read with ``torch.load(weights_only=True)`` (:func:`load_checkpoint`)."""

from __future__ import annotations

import os
import pathlib
import pickle
import re
from collections.abc import Mapping
from typing import IO, Any

import torch

from .algorithms import build_algorithm, get_algorithm
from .algorithms.base import MASK_SUFFIX, algorithm_option_names
from .blocks import BlockLayout
from .compatibility import METADATA_KEY

LEGACY_CONFIG_KEY = "_block_pruning_config"  # state_dict entry of sapp_lightning 0.1 checkpoints
CALLBACK_STATE_KEY = "BlockPruning"

#: What a checkpoint may hold beyond ``torch.load(weights_only=True)``'s own allowlist (tensors, plain containers,
#: ``OrderedDict``, dtypes, devices). Lightning's checkpoints and this package's state (the callback's, the app's
#: settings and checksum, the data loaders' positions, optimizer and scheduler states) need nothing more; paths are
#: allowed for a module's or data module's ``save_hyperparameters()`` (a data folder): rebuilding one runs no code of
#: the file's choosing.
SAFE_GLOBALS: tuple[type, ...] = (
    pathlib.PosixPath,
    pathlib.WindowsPath,
    pathlib.PurePosixPath,
    pathlib.PureWindowsPath,
)


class UnsafeCheckpointError(pickle.UnpicklingError):
    """A checkpoint file holds a pickled object beyond tensors and plain data (a function, a class of its own):
    it was refused, since unpickling it could run code."""


def allow_safe_globals() -> None:
    """Allow :data:`SAFE_GLOBALS` in every ``torch.load(weights_only=True)`` of this process (Lightning's resume
    included). Idempotent."""
    torch.serialization.add_safe_globals(list(SAFE_GLOBALS))


def load_checkpoint(path: str | os.PathLike | IO[bytes], map_location: Any = "cpu", *, trusted: bool = False) -> Any:
    """``torch.load`` a checkpoint file safely: ``weights_only=True``, with :data:`SAFE_GLOBALS` allowed.

    Anything else (a pickled function or class, e.g. a ``functools.partial`` or a custom object in the
    hyperparameters) raises :class:`UnsafeCheckpointError` naming its type. ``trusted=True`` opens a file you
    vouch for with ``weights_only=False``, which runs whatever code the file asks for.

    Example:
        >>> import io, torch
        >>> buffer = io.BytesIO()
        >>> torch.save({"state_dict": {"w": torch.ones(2)}, "epoch": 3}, buffer)
        >>> _ = buffer.seek(0)
        >>> load_checkpoint(buffer)["epoch"]
        3
    """
    if trusted:
        return torch.load(path, map_location=map_location, weights_only=False)
    allow_safe_globals()
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        if "GLOBAL" not in str(err):  # not a forbidden type: a damaged file
            raise
        names = _unsafe_globals(path) or sorted(set(re.findall(r"GLOBAL ([\w.]+)", str(err))))
        where = f"checkpoint {path}" if isinstance(path, str | os.PathLike) else "the checkpoint"
        raise UnsafeCheckpointError(
            f"{where} holds {', '.join(names)}, beyond tensors and plain data: it was not opened, since unpickling "
            "it could run code. Open only a file you trust, with trusted=True (sapp-train: trusted=true)"
        ) from None


def _unsafe_globals(path: Any) -> list[str]:
    """Every type the file needs that is not allowed (``[]`` where torch cannot say, before 2.5)."""
    find = getattr(torch.serialization, "get_unsafe_globals_in_checkpoint", None)
    if find is None:
        return []
    if hasattr(path, "seek"):
        path.seek(0)
    try:
        return list(find(path))
    except Exception:  # noqa: BLE001 - the names only improve the message
        return []


def _configs_by_root(checkpoint: Mapping[str, Any], state: Mapping[str, Any], config: Any) -> dict[str, dict]:
    """``{prefix of the pruned model: its configuration}``, from the argument, the callback state, the
    state_dict's metadata, or a legacy entry (in that order)."""
    if config is not None:
        return {"": dict(config.config() if hasattr(config, "config") else config)}
    callback_state = (checkpoint.get("callbacks") or {}).get(CALLBACK_STATE_KEY)
    if isinstance(callback_state, Mapping) and "config" in callback_state:
        # saved after the commit: the weights are plain already
        return {} if callback_state.get("lifecycle") == "committed" else {"": dict(callback_state["config"])}
    metadata = getattr(state, "_metadata", None) or {}
    found = {
        (f"{module}." if module else ""): entry[METADATA_KEY]
        for module, entry in metadata.items()
        if isinstance(entry, Mapping) and METADATA_KEY in entry
    }
    found.update({key[: -len(LEGACY_CONFIG_KEY)]: state[key] for key in state if key.endswith(LEGACY_CONFIG_KEY)})
    return found


@torch.no_grad()
def committed_state_dict(
    checkpoint: str | os.PathLike | Mapping[str, Any],
    config: Mapping[str, Any] | Any | None = None,
    *,
    trusted: bool = False,
) -> dict[str, torch.Tensor]:
    """The plain state_dict that the commit would leave, from a checkpoint written during training.

    A training checkpoint holds each pruned layer's raw weight, mask and (SA++) logits under parametrization
    keys. This folds them exactly as the commit does (pruned blocks exact zeros, attention and PowerPropagation
    scaling folded in) and returns a state_dict with the keys the model had before training, which loads into
    the model without this package. On CPU the result is bit-identical to the commit's.

    Args:
        checkpoint: a path to a Lightning checkpoint (loaded on CPU by :func:`load_checkpoint`: tensors and plain
            data only), a loaded checkpoint (a dict with ``"state_dict"`` and the callback's state), or a model
            state_dict (its metadata records the configuration when it came from ``model.state_dict()``).
            One without BlockPruning state (e.g. already committed) is returned unchanged.
        config: the pruning settings, for a state_dict that lost its metadata: ``BlockPruning.config()``,
            ``BlockSparsifier.config()``, the ``"config"`` of the callback's saved state, or the object itself.
        trusted: open a checkpoint file that holds other pickled objects (refused by default with
            :class:`UnsafeCheckpointError`, since unpickling them can run code): only for a file you trust.

    Example:
        >>> import torch
        >>> from sapp_lightning import committed_state_dict
        >>> committed_state_dict({"state_dict": {"fc.weight": torch.ones(2, 2)}})["fc.weight"].shape
        torch.Size([2, 2])
    """
    if isinstance(checkpoint, str | os.PathLike):
        checkpoint = load_checkpoint(checkpoint, trusted=trusted)
    if not isinstance(checkpoint, Mapping):
        raise TypeError(f"expected a checkpoint path, a checkpoint dict or a state_dict, got {type(checkpoint)!r}")
    state = checkpoint["state_dict"] if isinstance(checkpoint.get("state_dict"), Mapping) else checkpoint
    configs = _configs_by_root(checkpoint, state, config)
    if not configs:
        leftover = [k for k in state if ".parametrizations." in k or k.endswith(MASK_SUFFIX)]
        if leftover:
            raise ValueError(
                f"the state_dict holds parametrization or mask entries ({leftover[0]!r}, ...) but no BlockPruning "
                "configuration (it lost the metadata of model.state_dict()): pass the settings, "
                "committed_state_dict(state_dict, config=pruning.config())"
            )
        return dict(state)
    pending: dict[str, tuple[str, torch.Tensor]] = {}  # layer prefix -> (weight key, committed weight)
    dropped = {key for key in state if key.endswith(LEGACY_CONFIG_KEY)}
    for root, cfg in configs.items():
        # the knobs the configuration records (alpha, clip bounds, softmax scope...) change the forward; one it
        # lacks has the value it had before it was recorded (DEFAULTS), not today's default
        recorded = {**getattr(get_algorithm(cfg["algorithm"]), "DEFAULTS", {}), **cfg}
        options = {k: v for k, v in recorded.items() if k in algorithm_option_names()}
        algorithm = build_algorithm(cfg["algorithm"], **options)
        params = cfg.get("params") or ["weight"] * len(cfg["layers"])
        # every layer's parametrization first: with softmax_scope="global" each one's attention needs all logits
        layers = [
            _load_layer(state, f"{root}{name}." if name else root, param, kind, cfg, algorithm)
            for name, kind, param in zip(cfg["layers"], cfg["kinds"], params)
        ]
        for prefix, param, fold, used in layers:
            pending[prefix] = (prefix + param, fold())
            dropped.update(used)
    plain: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        # the weight comes first among its module's entries, as in the model before training
        prefix = next((p for p in pending if key.startswith(p)), None)
        if prefix is not None:
            weight_key, weight = pending.pop(prefix)
            plain[weight_key] = weight
        if key not in dropped:
            plain[key] = value
    return plain


def _load_layer(state, prefix: str, param: str, kind: str, cfg, algorithm) -> tuple[str, str, Any, list[str]]:
    """One layer: ``(prefix, param, a function giving its committed weight, the keys that weight replaces)``."""
    reparam_prefix = f"{prefix}parametrizations.{param}."
    if reparam_prefix + "original" in state:
        original = state[reparam_prefix + "original"]
        layout = BlockLayout(kind, tuple(original.shape), tuple(cfg["block_size"]))
        reparam = algorithm.make_reparam(layout, cfg["sparsity"])
        if reparam is None:
            raise ValueError(f"layer {prefix[:-1]!r} has a parametrization, but {cfg['algorithm']!r} uses none")
        own = {k: state[f"{reparam_prefix}0.{k}"] for k in reparam.state_dict()}
        reparam.load_state_dict(own)
        reparam.to(original.device)
        used = [reparam_prefix + "original"] + [f"{reparam_prefix}0.{k}" for k in own]
        return prefix, param, lambda: reparam(original), used
    weight, mask = state[prefix + param], state[prefix + param + MASK_SUFFIX]
    layout = BlockLayout(kind, tuple(weight.shape), tuple(cfg["block_size"]))
    used = [prefix + param, prefix + param + MASK_SUFFIX]
    return prefix, param, lambda: weight * layout.expand(mask.to(weight.dtype)), used
