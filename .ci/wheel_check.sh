#!/usr/bin/env bash
# The wheel as a user gets it: build it, install it into a clean virtual environment (core first, then [app]),
# and from a folder outside the checkout check the light import and run sapp-train for every recipe
# (--cfg job, then one fast_dev_run on generated data). Usage: .ci/wheel_check.sh [PYTHON] [TORCH_SPEC]
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
python="${1:-python3}"
torch_spec="${2:-torch==2.14.1 torchvision==0.29.1}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
venv="$repo/.venv-wheel"   # kept between runs for its torch; sapp_lightning itself is reinstalled every time

"$repo/.venv/bin/python" -m build --wheel --sdist --outdir "$work/dist" "$repo" >"$work/build.log" 2>&1 \
    || { cat "$work/build.log"; exit 1; }
wheel="$(ls "$work"/dist/*.whl)"
unzip -l "$wheel" >"$work/wheel.txt"
yamls=$(grep -c '\.yaml$' "$work/wheel.txt")
echo "wheel: $(basename "$wheel") with $yamls YAML files; sdist: $(basename "$(ls "$work"/dist/*.tar.gz)")"
tar -tzf "$work"/dist/*.tar.gz >"$work/sdist.txt"
grep -q '/recipes/criteo_paper.yaml$' "$work/sdist.txt" || { echo "the sdist lacks recipes/"; exit 1; }
grep -q 'sapp_lightning/recipes/criteo_paper.yaml$' "$work/wheel.txt" || { echo "the wheel lacks the recipes"; exit 1; }

core_torch="${torch_spec%% *}"   # torch alone for the core install; torchvision comes with [app]
if [ ! -x "$venv/bin/python" ]; then
    "$python" -m venv "$venv"
    "$venv/bin/python" -m pip install --quiet --upgrade pip
    "$venv/bin/python" -m pip install --quiet "$core_torch"
fi
# what [app] brings goes, so that the core install is checked on its own
"$venv/bin/python" -m pip uninstall --quiet --yes sapp_lightning hydra-core wandb pandas pyarrow matplotlib \
    torchvision omegaconf >/dev/null 2>&1 || true
"$venv/bin/python" -m pip install --quiet --force-reinstall --no-deps "$wheel"
"$venv/bin/python" -m pip install --quiet "$wheel" "$core_torch"   # core dependencies only
cd "$work"
"$venv/bin/python" - <<'PY'
import sys
import sapp_lightning
from sapp_lightning import BlockPruning, BlockSparsifier  # noqa: F401
import sapp_lightning.export, sapp_lightning.report  # noqa: F401,E401
app = ("hydra", "wandb", "pandas", "pyarrow", "omegaconf", "matplotlib", "torchvision")
heavy = sorted(m for m in app if m in sys.modules)
assert not heavy, f"importing sapp_lightning pulled in {heavy}"
assert sapp_lightning.__file__.startswith(sys.prefix), sapp_lightning.__file__
print("core install: import sapp_lightning (callback, report, export) loads none of", ", ".join(app))
PY
site="$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
core_mb=$(du -sm "$site" | cut -f1)
"$venv/bin/python" -m pip install --quiet "$wheel[app]" $torch_spec
echo "installed size (site-packages, torch included): core ${core_mb} MB, with [app] $(du -sm "$site" | cut -f1) MB"

# every recipe from the wheel: its composed config, then a smoke run (its data module on generated data) cut to
# one batch by fast_dev_run
recipes=$(cd "$repo/recipes" && ls *.yaml | sed 's/\.yaml$//')
for recipe in $recipes; do
    "$venv/bin/sapp-train" "recipe=$recipe" --cfg job >"$work/cfg.txt"
    grep -q "_target_: sapp_lightning.BlockSparsifier" "$work/cfg.txt"
    rm -rf "$work/run"
    "$venv/bin/sapp-train" "recipe=$recipe" smoke=true trainer.fast_dev_run=1 logger=none "hydra.run.dir=$work/run" \
        >"$work/log.txt" 2>&1 || { tail -30 "$work/log.txt"; echo "sapp-train recipe=$recipe smoke=true failed"; exit 1; }
    test -f "$work/run/results.json"
    echo "sapp-train recipe=$recipe: --cfg job and a smoke run from $(pwd) OK"
done
