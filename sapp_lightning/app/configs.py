"""Where ``sapp-train`` finds ``conf/`` and ``recipes/``: inside the installed package (a wheel) or at the top of a
source checkout (an editable install), and how the recipes become Hydra's ``recipe`` config group."""

from __future__ import annotations

from pathlib import Path

import yaml
from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

PACKAGE = Path(__file__).resolve().parents[1]


def config_dirs() -> tuple[Path, Path]:
    """``(conf, recipes)``: the wheel ships them as ``sapp_lightning/conf`` and ``sapp_lightning/recipes``; a
    checkout has them beside the package."""
    for root in (PACKAGE, PACKAGE.parent):
        conf, recipes = root / "conf", root / "recipes"
        if (conf / "config.yaml").is_file() and recipes.is_dir():
            return conf, recipes
    raise FileNotFoundError(
        f"sapp-train found no conf/config.yaml and recipes/ in {PACKAGE} or {PACKAGE.parent}: the installation "
        "is incomplete; reinstall sapp_lightning"
    )


def register_recipes(recipes: Path) -> list[str]:
    """Put every ``recipes/*.yaml`` into Hydra's config store as the ``recipe`` group (``recipe=NAME``).

    The recipes live beside ``conf/`` rather than in ``conf/recipe/``, so they join the search path this way;
    each keeps its ``# @package _global_`` header and its defaults list.
    """
    store = ConfigStore.instance()
    names = []
    for path in sorted(recipes.glob("*.yaml")):
        text = path.read_text()
        if not text.startswith("# @package _global_"):
            raise ValueError(f"{path} must start with '# @package _global_' (a recipe overrides the whole config)")
        store.store(group="recipe", name=path.stem, node=yaml.safe_load(text) or {}, package="_global_")
        names.append(path.stem)
    return names


def config_groups() -> str:
    """The config groups and their options, one line each, as ``sapp-train --help`` lists them: private
    options (``_sparsifier``, a group's shared keys) are left out."""
    groups = {"recipe": list(RECIPES)}
    for folder in sorted(p for p in CONFIG_DIR.rglob("*") if p.is_dir()):
        options = sorted(p.stem for p in folder.glob("*.yaml") if not p.stem.startswith("_"))
        if options:
            groups[folder.relative_to(CONFIG_DIR).as_posix()] = options
    groups["hydra/launcher"] = sorted({"basic", "joblib", *groups.get("hydra/launcher", [])})
    return "\n".join(f"{name}: {', '.join(options)}" for name, options in groups.items())


CONFIG_DIR, RECIPES_DIR = config_dirs()
RECIPES = register_recipes(RECIPES_DIR)
OmegaConf.register_new_resolver("sapp_config_groups", config_groups, replace=True)


# --- the pruning group's arguments, generated from BlockSparsifier's signature -----------------------------
SPARSIFIER_NODE = "_sparsifier.yaml"
#: the app's values for the arguments the library leaves without a default
APP_DEFAULTS = {"sparsity": 0.9, "block_size": 16}
_HEADER = """\
# Generated from the signature of sapp_lightning.BlockSparsifier and the algorithms' own knobs by
#   python -m sapp_lightning.app.configs --write
# (tests/test_app.py fails when it is out of date). Each option of this group (pruning=sapp, acdc, magnitude,
# powerprop, gmp) picks the algorithm; override any key on the command line, e.g. pruning.sparsity=0.95.
# What each key does: BlockSparsifier's documentation (null for an algorithm knob: the algorithm's default;
# a knob the algorithm lacks is ignored, so one configuration serves a sweep over algorithms). sparsity and
# block_size, which the library leaves to the user, are the app's: 0.9 and 16.
"""


def sparsifier_node() -> dict:
    """The pruning group's keys: every argument of ``BlockSparsifier`` with its default, and every knob of the
    registered algorithms as null (``_target_`` instantiates the sparsifier; ``algorithm`` is set per option)."""
    import inspect

    from sapp_lightning import BlockSparsifier
    from sapp_lightning.algorithms import algorithm_option_names

    node: dict = {"_target_": "sapp_lightning.BlockSparsifier", "algorithm": "???"}
    for name, parameter in inspect.signature(BlockSparsifier).parameters.items():
        if parameter.kind is parameter.VAR_KEYWORD or name == "algorithm":
            continue
        node[name] = parameter.default if parameter.default is not parameter.empty else APP_DEFAULTS[name]
    node.update({name: None for name in sorted(algorithm_option_names()) if name not in node})
    return node


def sparsifier_yaml() -> str:
    return _HEADER + yaml.safe_dump(sparsifier_node(), sort_keys=False)


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m sapp_lightning.app.configs",
        description=f"write or check conf/pruning/{SPARSIFIER_NODE}, generated from BlockSparsifier's signature",
    )
    parser.add_argument("--write", action="store_true", help="write the file (default: check it)")
    args = parser.parse_args(argv)
    path = CONFIG_DIR / "pruning" / SPARSIFIER_NODE
    if args.write:
        path.write_text(sparsifier_yaml())
        print(f"wrote {path}")
        return 0
    if path.read_text() != sparsifier_yaml():
        print(f"{path} is out of date: python -m sapp_lightning.app.configs --write")
        return 1
    print(f"{path} is up to date")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
