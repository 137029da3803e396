"""Whether saved pruning state belongs to this run: the state's version, its configuration against the
sparsifier's, and what a model's ``state_dict`` carries in and out while it trains."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from .algorithms import PrunedLayer

STATE_VERSION = 2
#: where a prepared model's ``state_dict()`` records the configuration: its metadata, not an entry
METADATA_KEY = "sapp_lightning.block_pruning"
# options left out of a configuration at these values (the spec's), so that checkpoints made before they existed match
_SPARSIFIER_DEFAULTS = {"sparsify_every_n_steps": 1, "sparsify_regrowth": False, "ranking": "layer"}


def configuration(sparsifier: Any) -> dict[str, Any]:
    """The settings of a :class:`~sapp_lightning.BlockSparsifier` that must match for a checkpoint to resume
    (plain types only). Options added later are listed only where they differ from their default, so that older
    checkpoints keep matching."""
    algorithm, layers = sparsifier.algorithm, sparsifier.layers
    params = [layer.param_name for layer in layers]  # in_proj_weight for MultiheadAttention, else "weight"
    return {
        "algorithm": algorithm.name,
        "sparsity": sparsifier.sparsity,
        "block_size": list(sparsifier.block_size),
        "min_blocks": sparsifier.min_blocks,
        "include": list(sparsifier.include),
        "exclude": list(sparsifier.exclude),
        **algorithm.config(),
        "plan": sparsifier.plan.to_config(),
        "schedule_exponent": sparsifier.schedule_exponent,
        **({"ramp": sparsifier.ramp.kind} if sparsifier.ramp.kind != algorithm.default_ramp else {}),
        **{k: getattr(sparsifier, k) for k, v in _SPARSIFIER_DEFAULTS.items() if getattr(sparsifier, k) != v},
        "layers": [layer.name for layer in layers],
        "kinds": [layer.layout.kind for layer in layers],
        **({"params": params} if any(p != "weight" for p in params) else {}),
    }


def config_differences(saved: Mapping[str, Any], ours: Mapping[str, Any]) -> list[str]:
    """``"key: checkpoint X, this callback Y"`` for every setting that differs (a knob left at its default is not
    listed on one side, so the union of keys is compared).

    Example:
        >>> config_differences({"sparsity": 0.9, "score": "magnitude"}, {"sparsity": 0.9})
        ["score: checkpoint 'magnitude', this callback None"]
    """
    keys = [*ours, *(key for key in saved if key not in ours)]
    return [f"{key}: checkpoint {saved.get(key)!r}, this callback {ours.get(key)!r}" for key in keys
            if saved.get(key) != ours.get(key)]  # fmt: skip


def raise_on_config_difference(saved: Mapping[str, Any], ours: Mapping[str, Any]) -> None:
    diffs = config_differences(saved, ours)
    if diffs:
        raise ValueError(
            "the checkpoint was written with a different BlockPruning configuration; "
            + "; ".join(diffs)
            + ". Resume with the same settings, or start a new run."
        )


def check_saved_state(state_dict: Mapping[str, Any]) -> None:
    """Refuse a sparsifier state of another version, or one saved after the commit (a finished run)."""
    if state_dict.get("version") != STATE_VERSION:
        raise ValueError(
            f"unsupported BlockPruning checkpoint state version {state_dict.get('version')!r} (this version "
            f"reads {STATE_VERSION}); finish that run with the sapp_lightning that wrote it, or turn the "
            "checkpoint into plain weights with committed_state_dict"
        )
    if state_dict.get("lifecycle") == "committed":
        raise ValueError(
            "this checkpoint was saved after BlockPruning committed the weights when fit returned: the run is "
            "finished and cannot be resumed. Its state_dict holds plain pruned weights (load them with "
            "model.load_state_dict); resume from a checkpoint written during training instead"
        )


def check_incoming_model_state(
    state_dict: Mapping[str, Any], prefix: str, metadata: Mapping[str, Any], layers: Sequence[PrunedLayer],
    ours: Mapping[str, Any],
) -> None:  # fmt: skip
    """A model being pruned loads a ``state_dict``: it must come from a run with the same configuration (its
    metadata says), or at least carry the pruned layers' masks."""
    saved = metadata.get(METADATA_KEY)
    if saved is not None:
        raise_on_config_difference(saved, ours)
        return
    expected = [key for layer in layers for key in layer.state_keys(f"{prefix}{layer.name}." if layer.name else prefix)]
    if not any(key in state_dict for key in expected):
        raise ValueError(
            "the model is being trained with BlockPruning, but this state_dict holds no BlockPruning "
            "configuration (no masks for the pruned layers): it was saved by a run without BlockPruning, or "
            "after BlockPruning committed the weights when fit returned (a finished run, which cannot be "
            "resumed). Load such plain weights into the model before training (model.load_state_dict or "
            "Model.load_from_checkpoint) to start a new run from them, or resume from a checkpoint written "
            "during training (e.g. ModelCheckpoint's last.ckpt)"
        )
