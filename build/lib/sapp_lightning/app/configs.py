"""Where ``sapp-train`` finds ``conf/`` and ``recipes/``: inside the installed package (a wheel) or at the top of a
source checkout (an editable install), and how the recipes become Hydra's ``recipe`` config group."""

from __future__ import annotations

from pathlib import Path

import yaml
from hydra.core.config_store import ConfigStore

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


CONFIG_DIR, RECIPES_DIR = config_dirs()
RECIPES = register_recipes(RECIPES_DIR)
