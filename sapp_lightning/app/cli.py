"""The command-line tools, light to import: each parses its arguments before torch or Lightning is imported, so
``--help`` answers at once.

* ``sapp-train`` (:func:`train`): the Hydra app over ``conf/`` and ``recipes/``;
* ``sapp-results`` (:func:`results`): tables and figures of runs, sweeps and stored runs (``.jsonl``).
"""

from __future__ import annotations

import sys

try:
    import hydra
    from omegaconf import DictConfig
except ImportError as err:  # pragma: no cover - depends on the installation
    raise SystemExit(f"the sapp_lightning tools need the app extra: pip install 'sapp_lightning[app]' ({err})") from err

from .configs import CONFIG_DIR


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="config")
def _train(cfg: DictConfig) -> float | None:
    from .data.base import MISSING_DATA
    from .train import run

    try:
        results = run(cfg)
    except Exception as err:
        missing = next((e for e in _causes(err) if isinstance(e, MISSING_DATA)), None)
        if missing is None:
            raise
        recipe = cfg.get("name") or "NAME"
        raise SystemExit(  # one paragraph instead of a traceback: what is missing, and the ways to get it
            f"sapp-train: the data set of this run is missing. {missing}\nThe data module's arguments are data.* on "
            f"the command line (data.root=PATH, data.data_dir=PATH, ...). To try recipe={recipe} without the data "
            f"set, on generated data: sapp-train recipe={recipe} smoke=true"
        ) from None
    key = "val/acc" if cfg.model.task == "classification" else "val/loss"
    return None if results is None else results["val"].get(key)


def _causes(err: BaseException):
    """``err`` and the exceptions it was raised from (Hydra wraps a failed instantiation in its own)."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__ or err.__context__


def train() -> None:
    """``sapp-train``: Hydra parses the command line (``--help``, ``--cfg job``, overrides, ``-m``) first; a run
    returns its validation metric so that sweepers can optimize it."""
    sys.argv[0] = "sapp-train"  # Hydra names the app after the program in its help and logs
    _train()
