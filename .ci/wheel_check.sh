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

"$venv/bin/python" "$repo/tests/datagen.py" "$work/data" >/dev/null
data="$work/data"
fast=(trainer.fast_dev_run=1 trainer.accelerator=cpu trainer.devices=1 logger=none "hydra.run.dir=$work/run")
declare -A data_args=(
    [fashion_mnist_demo]="data.data_dir=$data/fashion data.val_size=20"
    [resnet50_imagenet]="trainer=cpu data.root=$data/imagenet global_batch_size=2 data.num_workers=0 data.image_size=32 data.val_resize=36 trainer.precision=32-true"
    [imagenet_table1]="trainer=cpu data.root=$data/imagenet global_batch_size=2 data.num_workers=0 data.image_size=32 data.val_resize=36 trainer.precision=32-true"
    [imagenet_table3]="trainer=cpu data.root=$data/imagenet global_batch_size=2 data.num_workers=0 data.image_size=32 data.val_resize=36 trainer.precision=32-true"
    [imagenet_table4]="trainer=cpu data.root=$data/imagenet global_batch_size=2 data.num_workers=0 data.image_size=32 data.val_resize=36 trainer.precision=32-true"
    [imagenet_global_acdc]="trainer=cpu data.root=$data/imagenet global_batch_size=2 data.num_workers=0 data.image_size=32 data.val_resize=36 trainer.precision=32-true"
    [criteo_paper]="data.path=$data/criteo.txt global_batch_size=32 data.table_size=50 data.cache_dir=$work/cache"
    [criteo_table2]="data.path=$data/criteo.txt global_batch_size=32 data.table_size=50 data.cache_dir=$work/cache"
    [movielens_ctr]="data.data_dir=$data/ml-100k data.batch_size=8 pruning.block_size=5 data.val_fraction=0.2 data.test_fraction=0.2"
)
recipes=$(cd "$repo/recipes" && ls *.yaml | sed 's/\.yaml$//')
for recipe in $recipes; do
    [ -n "${data_args[$recipe]:-}" ] || { echo "no generated data for recipe $recipe: add it to $0"; exit 1; }
    "$venv/bin/sapp-train" "recipe=$recipe" --cfg job >"$work/cfg.txt"
    grep -q "_target_: sapp_lightning.BlockSparsifier" "$work/cfg.txt"
    rm -rf "$work/run"
    # shellcheck disable=SC2086
    "$venv/bin/sapp-train" "recipe=$recipe" ${data_args[$recipe]} "${fast[@]}" >"$work/log.txt" 2>&1 \
        || { tail -30 "$work/log.txt"; echo "sapp-train recipe=$recipe failed"; exit 1; }
    test -f "$work/run/results.json"
    echo "sapp-train recipe=$recipe: --cfg job and a fast_dev_run from $(pwd) OK"
done
