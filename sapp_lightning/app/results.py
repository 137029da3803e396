"""Runs as a pandas DataFrame, and the tables ``sapp-results`` prints from it.

A run is its ``results.json`` (what ``sapp-train`` writes); :func:`load_runs` reads them from run and sweep folders
and from JSON-lines stores (one ``results.json`` a line, e.g. ``bench/results/*.jsonl``) into one row per run.
:func:`summarize` averages over seeds with ``groupby``; :func:`report` prints every table of a set of runs.

Example:
    >>> rows = [{"algorithm": "sapp", "sparsity": 0.9, "block_size": 10, "seed": s, "task": "ctr",
    ...          "val": {"val/loss": 0.45 + s / 100}, "test": {}, "achieved_block_sparsity": 0.9,
    ...          "fit_seconds": 1.0} for s in range(3)]
    >>> summary = summarize(to_frame(rows))
    >>> [(s["metric"], s["n"], round(s["mean"], 4), round(s["std"], 4)) for s in summary.to_dict("records")]
    [('val/loss', 3, 0.46, 0.01)]
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from sapp_lightning.tables import text_table

from .paper import paper_value

#: every method's name in tables and figures, in their order
METHODS = {
    "dense": "Dense",
    "magnitude": "Magnitude",
    "powerprop": "PowerPropagation",
    "acdc": "ACDC",
    "gmp": "Gradual magnitude",
    "torch_ao_gmp": "torch.ao GMP",
    "sapp": "SA++",
}
DATA_NAMES = {
    "FashionMNISTDataModule": "Fashion-MNIST",
    "MovieLensCTRDataModule": "MovieLens-100k CTR",
    "CriteoDataModule": "Criteo",
    "ImageNetDataModule": "ImageNet",
}
#: the paper's tables: the data, model and task of their setting (Table 1: ResNet50 on ImageNet; Table 2: Criteo)
PAPER_SETTINGS = {
    "imagenet": ("ImageNetDataModule", "resnet50", "classification"),
    "criteo": ("CriteoDataModule", "CriteoPaperNet", "ctr"),
}
#: SA++'s block score by variant: the plain run and ``pruning.score=attention`` against ``pruning.score=magnitude``
SCORE_VARIANTS = {"": "attention", "pruning.score=attention": "attention", "pruning.score=magnitude": "magnitude"}
_COLUMNS = ["key", "algorithm", "sparsity", "block_size", "seed", "variant", "data", "model", "task", "epochs"]
_COLUMNS += ["steps", "fit_seconds", "achieved_block_sparsity", "achieved_weight_sparsity", "pruned_layers"]
_COLUMNS += ["min_blocks", "path", "record"]
_STATS = {"": "primary", "test_": "test_primary", "auroc_": "val/auroc", "test_auroc_": "test/auroc"}


def method_name(algorithm: str, variant: str = "") -> str:
    """The method's name, with its variant (the overrides beyond the grid) where it has one."""
    name = METHODS.get(algorithm, algorithm)
    return f"{name} {variant}" if variant else name


def method_rank(algorithm: str) -> int:
    """The method's place in tables and figures (unknown methods last)."""
    return list(METHODS).index(algorithm) if algorithm in METHODS else len(METHODS)


def paper_setting(
    data: str, model: str, paper: str | Sequence[str] | None = "auto", task: str | None = None
) -> str | None:
    """Which of the paper's tables runs of ``data`` and ``model`` belong to: ``"imagenet"`` (ResNet50 on ImageNet),
    ``"criteo"`` (the paper's Criteo model on Criteo) or None. A ``paper`` named explicitly (or several) applies to
    every run of its task (``task``); ``None`` or ``"none"`` to none.

    Example:
        >>> paper_setting("ImageNetDataModule", "resnet50"), paper_setting("ImageNetDataModule", "SmallCNN")
        ('imagenet', None)
        >>> paper_setting("FashionMNISTDataModule", "MLP", paper=["imagenet", "criteo"], task="classification")
        'imagenet'
    """
    names = [paper] if paper is None or isinstance(paper, str) else list(paper)
    if "auto" in names:
        return next((name for name, (d, m, _) in PAPER_SETTINGS.items() if (d, m) == (data, str(model))), None)
    return next((name for name in names if name in PAPER_SETTINGS and PAPER_SETTINGS[name][2] == task), None)


# --- loading ------------------------------------------------------------------------------------------------------
def override_value(overrides: Sequence[str] | None, key: str) -> str | None:
    """The value ``overrides`` give ``key`` (``None`` where they leave it to the config).

    Example:
        >>> override_value(["recipe=movielens_ctr", "pruning.min_blocks=17"], "pruning.min_blocks")
        '17'
    """
    found = [v for k, _, v in (o.partition("=") for o in overrides or ()) if k.lstrip("+~") == key]
    return found[-1] if found else None


def _min_blocks(record: dict[str, Any]) -> int | None:
    config = (record.get("config") or {}).get("pruning") or {}
    value = record.get("min_blocks") or override_value(record.get("overrides"), "pruning.min_blocks")
    value = value or config.get("min_blocks")
    return int(value) if value not in (None, "") else None


def to_frame(records: Iterable[dict[str, Any]]) -> pd.DataFrame:
    """One row per ``results.json`` record: its fields, each ``val``/``test`` metric as a column (``val/acc``...),
    ``variant`` (``""`` for a plain run), ``min_blocks`` where known, and the record itself (``record``). The dense
    baseline has sparsity 0 and block size 0 (sapp_lightning 0.1 called it ``"none"``)."""
    rows = []
    for r in records:
        dense = r["algorithm"] in ("dense", "none")
        rows.append(
            {
                "key": r.get("key"),
                "algorithm": "dense" if dense else r["algorithm"],
                "sparsity": 0.0 if dense else round(float(r["sparsity"]), 6),
                "block_size": 0 if dense else int(r["block_size"]),
                "seed": r.get("seed"),
                "variant": r.get("variant") or "",
                "data": r.get("data", ""),
                "model": str(r.get("model", "")),
                "task": r.get("task", "classification"),
                "epochs": r.get("epochs"),
                "steps": r.get("steps"),
                "fit_seconds": r.get("fit_seconds", math.nan),
                "achieved_block_sparsity": r.get("achieved_block_sparsity", 0.0),
                "achieved_weight_sparsity": r.get("achieved_weight_sparsity", 0.0),
                "pruned_layers": tuple(sorted(r.get("pruned_layers") or ())),
                "min_blocks": _min_blocks(r),
                "path": r.get("path"),
                "record": r,
                **{k: float(v) for split in ("val", "test") for k, v in (r.get(split) or {}).items()},
            }
        )
    return pd.DataFrame(rows, columns=None if rows else _COLUMNS).astype({"min_blocks": "Int64"})


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    records = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a torn last line: the sweep was interrupted while writing it
            continue
        if "algorithm" not in record:
            raise ValueError(f"{path}, line {number}: not a results.json record (no 'algorithm')")
        records.append({**record, "key": record.get("key") or f"{path}:{number}", "path": str(path)})
    return records


def _read_folder(folder: Path) -> list[dict[str, Any]]:
    """The ``results.json`` files below ``folder``; a Hydra run's task overrides (``.hydra/overrides.yaml``) become
    its ``overrides`` and ``key``, as the JSON-lines stores keep them."""
    import yaml

    files = [folder] if folder.name == "results.json" else sorted(folder.rglob("results.json"))
    records = []
    for file in files:
        record = json.loads(file.read_text())
        hydra = file.parent / ".hydra" / "overrides.yaml"
        overrides = yaml.safe_load(hydra.read_text()) if hydra.is_file() else None
        if overrides is not None:
            record.setdefault("overrides", overrides)
        record.setdefault("key", " ".join(overrides) if overrides else str(file.parent))
        records.append(record | {"path": str(file.parent)})
    return records


def load_runs(sources: str | Path | Iterable[str | Path]) -> pd.DataFrame:
    """Every run in ``sources`` as a frame (:func:`to_frame`): run or sweep folders (each ``results.json`` below)
    and ``.jsonl`` stores (one ``results.json`` a line; a torn last line is skipped). A run found twice (the same
    ``key``: its overrides, or its line) counts once, as its last copy.

    Example:
        >>> import tempfile
        >>> store = Path(tempfile.mkdtemp()) / "runs.jsonl"
        >>> run = {"key": "a", "algorithm": "sapp", "sparsity": 0.9, "block_size": 16, "val": {"val/acc": 0.8}}
        >>> _ = store.write_text(json.dumps(run) + "\\n" + json.dumps(run | {"val": {"val/acc": 0.82}}) + '\\n{"ke')
        >>> frame = load_runs(store)
        >>> len(frame), frame["val/acc"].tolist(), frame["variant"].tolist()
        (1, [0.82], [''])
    """
    records = []
    for source in [sources] if isinstance(sources, str | Path) else sources:
        path = Path(source)
        if path.suffix == ".jsonl":
            if not path.is_file():
                raise FileNotFoundError(f"no such file: {path}")
            records += _read_jsonl(path)
        elif path.is_dir() or path.name == "results.json":
            found = _read_folder(path)
            if not found:
                raise FileNotFoundError(f"no results.json below {path}: is this a finished run or sweep folder?")
            records += found
        else:
            raise FileNotFoundError(f"no such run folder or .jsonl file: {path}")
    frame = to_frame(records)
    return label_differing_settings(frame[~frame.duplicated("key", keep="last")].reset_index(drop=True))


#: The grid's own axes: runs that differ in these are different cells of one table, not different methods.
_GRID_KEYS = {"_target_", "algorithm", "sparsity", "block_size", "min_blocks", "include", "exclude"}


def label_differing_settings(frame: pd.DataFrame) -> pd.DataFrame:
    """Give the plain runs of one method (same task, model, epochs and data) that were trained with different pruning
    settings a variant each, naming the settings in which they differ (``pruning.plan=criteo``), so that a sweep
    over ``pruning.plan`` without a ``variant`` label does not average two methods into one row. Only settings that
    every one of those runs recorded are compared (a key added in a later version is not a difference).

    Example:
        >>> runs = [{"algorithm": "sapp", "sparsity": 0.9, "block_size": 16, "seed": seed,
        ...          "config": {"pruning": {"plan": plan, "logit_scale": None}}}
        ...         for plan in ("criteo", "criteo_auto") for seed in (0, 1)]
        >>> label_differing_settings(to_frame(runs))["variant"].tolist()
        ['pruning.plan=criteo', 'pruning.plan=criteo', 'pruning.plan=criteo_auto', 'pruning.plan=criteo_auto']
    """
    plain = frame[frame["variant"] == ""]
    labels: dict[int, str] = {}
    for _, runs in plain.groupby(["task", "model", "epochs", "data", "algorithm"], dropna=False):
        settings = [((r.get("config") or {}).get("pruning") or {}) for r in runs["record"]]
        shared = set.intersection(*(set(s) for s in settings)) - _GRID_KEYS
        differing = sorted(k for k in shared if len({json.dumps(s[k], sort_keys=True) for s in settings}) > 1)
        for index, setting in zip(runs.index, settings):
            if differing:
                labels[index] = " ".join(f"pruning.{k}={_plain(setting[k])}" for k in differing)
    if labels:
        frame = frame.copy()
        frame.loc[list(labels), "variant"] = pd.Series(labels)
    return frame


def _plain(value: Any) -> str:
    return "null" if value is None else json.dumps(value) if isinstance(value, list | dict) else str(value)


def append_jsonl(frame: pd.DataFrame, path: str | Path) -> tuple[int, int]:
    """Append the runs of ``frame`` to the JSON-lines store ``path`` (each its ``results.json`` with its ``key`` and
    ``overrides``), skipping those whose key is there already. Returns ``(appended, skipped)``."""
    path = Path(path)
    done = set(load_runs(path)["key"]) if path.is_file() else set()
    todo = [record for key, record in zip(frame["key"], frame["record"]) if key not in done]
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        if path.stat().st_size and not path.read_bytes().endswith(b"\n"):
            f.write("\n")  # after a torn last line
        for record in todo:
            f.write(json.dumps({k: v for k, v in record.items() if k != "path"}, sort_keys=True) + "\n")
    return len(todo), len(frame) - len(todo)


# --- summaries ----------------------------------------------------------------------------------------------------
def _column(frame: pd.DataFrame, name: str) -> pd.Series:
    return frame[name] if name in frame else pd.Series(math.nan, index=frame.index)


def summarize(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per (algorithm, sparsity, block size, variant), averaged over seeds: the primary metric (``mean``,
    ``std``, ``n``: top-1 % for classification, BCE for CTR), its test value (``test_``), AUROC where logged
    (``auroc_``, ``test_auroc_``), the achieved block sparsity and the fit time; in the tables' order."""
    classification = frame["task"] == "classification"
    values = frame.assign(
        metric=classification.map({True: "val/acc", False: "val/loss"}),
        primary=_column(frame, "val/acc").mul(100).where(classification, _column(frame, "val/loss")),
        test_primary=_column(frame, "test/acc").mul(100).where(classification, _column(frame, "test/loss")),
        **{"val/auroc": _column(frame, "val/auroc"), "test/auroc": _column(frame, "test/auroc")},
    )
    groups = values.groupby(["algorithm", "sparsity", "block_size", "variant", "metric"], sort=False)
    stats = [groups[column].agg(["mean", "std", "count"]).add_prefix(prefix) for prefix, column in _STATS.items()]
    summary = pd.concat(
        [*stats, groups["achieved_block_sparsity"].mean().rename("achieved"), groups["fit_seconds"].mean()], axis=1
    ).reset_index()
    summary = summary.rename(columns={f"{p}count": f"{p}n" for p in _STATS}).rename(columns={"fit_seconds": "seconds"})
    for prefix in _STATS:  # one seed: no spread
        summary[f"{prefix}std"] = summary[f"{prefix}std"].fillna(0.0)
    summary["rank"] = summary["algorithm"].map(method_rank)
    order = ["sparsity", "block_size", "rank", "variant"]
    return summary.sort_values(order, kind="stable").drop(columns="rank").reset_index(drop=True)


# --- tables -------------------------------------------------------------------------------------------------------
def _cell(mean: float, std: float, n: int, digits: int) -> str:
    if n == 0 or math.isnan(mean):
        return "—"
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if n > 1 else f"{mean:.{digits}f}"


def runs_table(summary: pd.DataFrame) -> str:
    """One row per configuration: validation and test metric (and AUROC where logged), achieved sparsity, time."""
    if summary.empty:
        return "(no runs)"
    metric = summary["metric"].iloc[0]
    digits, label = (2, "top-1 %") if metric == "val/acc" else (4, "BCE")
    auroc = bool((summary["auroc_n"] > 0).any())
    header = ["method", "target sparsity", "block", "seeds", f"val {label}", f"test {label}"]
    header += ["val AUROC", "test AUROC"] if auroc else []
    header += ["achieved sparsity", "fit time"]
    rows = []
    for s in summary.to_dict("records"):
        dense = s["algorithm"] == "dense"
        row = [method_name(s["algorithm"], s["variant"]), "—" if dense else f"{s['sparsity']:.0%}"]
        row += ["—" if dense else str(s["block_size"]), str(s["n"])]
        row += [_cell(s[f"{p}mean"], s[f"{p}std"], s[f"{p}n"], digits) for p in ("", "test_")]
        row += [_cell(s[f"{p}mean"], s[f"{p}std"], s[f"{p}n"], 4) for p in ("auroc_", "test_auroc_")] if auroc else []
        rows.append([*row, f"{s['achieved']:.2%}", f"{s['seconds']:.0f} s"])
    return text_table(header, rows, markdown=True)


def paper_table(summary: pd.DataFrame, paper: str | None, stat: str = "mean", achieved: bool = False) -> str:
    """The paper's layout: rows (sparsity, method), one column per block size, the paper's value in brackets.

    ``stat`` picks the number: ``"mean"`` (the validation metric), ``"test_mean"``, ``"auroc_mean"`` or
    ``"test_auroc_mean"``; ``achieved=True`` adds the achieved block sparsity of each cell, e.g. ``(97.97%)``.
    """
    prefix = stat.removesuffix("mean")
    pruned = summary[summary["algorithm"] != "dense"]
    if pruned.empty:
        return "(no pruned runs)"
    digits = 2 if pruned["metric"].iloc[0] == "val/acc" and "auroc" not in stat else 4
    blocks = sorted(pruned["block_size"].unique())
    cells = {(s["sparsity"], s["algorithm"], s["variant"], s["block_size"]): s for s in pruned.to_dict("records")}
    keys = sorted({k[:3] for k in cells}, key=lambda k: (k[0], method_rank(k[1]), k[2]))

    def cell(s: dict[str, Any] | None) -> str:
        return "—" if s is None else _cell(s[f"{prefix}mean"], s[f"{prefix}std"], s[f"{prefix}n"], digits)

    rows = []
    for sparsity, algorithm, variant in keys:
        row = [f"{sparsity:.0%}", method_name(algorithm, variant)]
        for block in blocks:
            s = cells.get((sparsity, algorithm, variant, block))
            text = cell(s) + (f" ({s['achieved']:.1%})" if achieved and s is not None else "")
            if paper:
                reference = paper_value(paper, algorithm, int(block), sparsity)
                text += f" [{reference:.{digits}f}]" if reference is not None else " [—]"
            row.append(text)
        rows.append(row)
    for d in summary[summary["algorithm"] == "dense"].to_dict("records"):
        reference = f" [{paper_value(paper, 'dense', 0, 0):.{digits}f}]" if paper else ""
        rows.append(["0%", method_name("dense", d["variant"]), *([cell(d) + reference] * len(blocks))])
    return text_table(["sparsity", "method", *[f"B={b}" for b in blocks]], rows, markdown=True)


def compare_table(sources: dict[str, pd.DataFrame], stat: str = "mean") -> str:
    """The plain runs (no variant) of several sources side by side, e.g. one grid before and after a change: one
    row per (sparsity, block, method), one column per source, cells mean ± std over seeds of ``stat`` (as in
    :func:`paper_table`)."""
    prefix = stat.removesuffix("mean")
    cells: dict[tuple, list[str]] = {}
    for i, frame in enumerate(sources.values()):
        for s in summarize(frame[frame["variant"] == ""]).to_dict("records"):
            if not s[f"{prefix}n"]:
                continue
            digits = 2 if s["metric"] == "val/acc" and "auroc" not in stat else 4
            cells.setdefault((s["sparsity"], s["block_size"], s["algorithm"]), ["—"] * len(sources))[i] = (
                f"{s[f'{prefix}mean']:.{digits}f} ± {s[f'{prefix}std']:.{digits}f} (n={s[f'{prefix}n']})"
            )
    keys = sorted(cells, key=lambda k: (k[0], k[1], method_rank(k[2])))
    rows = [[f"{k[0]:.0%}", str(k[1] or "—"), method_name(k[2]), *cells[k]] for k in keys]
    return text_table(["sparsity", "block", "method", *sources], rows, markdown=True)


def score_differences(frame: pd.DataFrame, split: str = "val") -> pd.DataFrame:
    """SA++ with attention scores minus SA++ with magnitude scores (the paper's Fig. 2(a)), top-1 in points, seed by
    seed: the plain or ``pruning.score=attention`` runs against the ``pruning.score=magnitude`` runs of the same
    model, block size, sparsity and seed (seeds without both are left out). Columns ``model``, ``block_size``,
    ``sparsity``, ``seed``, ``difference``.

    Example:
        >>> rows = [{"algorithm": "sapp", "model": "MLP", "block_size": 16, "sparsity": 0.9, "seed": s,
        ...          "variant": v, "val": {"val/acc": a}}
        ...         for s, v, a in [(0, "", 0.82), (0, "pruning.score=magnitude", 0.80), (1, "", 0.83)]]
        >>> score_differences(to_frame(rows))["difference"].tolist()  # seed 1 has no magnitude run
        [2.0]
    """
    index = ["model", "block_size", "sparsity", "seed"]
    column = f"{split}/acc"
    scored = frame["variant"].isin(SCORE_VARIANTS) & _column(frame, column).notna()
    runs = frame[(frame["algorithm"] == "sapp") & scored]
    if runs.empty:
        return pd.DataFrame(columns=[*index, "difference"])
    runs = runs.assign(score=runs["variant"].map(SCORE_VARIANTS), value=100 * runs[column])
    arms = runs.pivot_table(index=index, columns="score", values="value", aggfunc="last")
    if not {"attention", "magnitude"} <= set(arms.columns):
        return pd.DataFrame(columns=[*index, "difference"])
    difference = (arms["attention"] - arms["magnitude"]).dropna().round(10)
    return difference.rename("difference").reset_index()


def score_table(frame: pd.DataFrame, split: str = "val") -> str:
    """:func:`score_differences` per model, sparsity and block size: mean ± std over the paired seeds, [min, max];
    empty without such pairs."""
    tables = []
    for model, runs in score_differences(frame, split).groupby("model"):
        stats = runs.groupby(["sparsity", "block_size"])["difference"].agg(["mean", "std", "min", "max", "count"])
        stats["std"] = stats["std"].fillna(0.0)
        blocks = sorted(runs["block_size"].unique())
        cells = stats.to_dict("index")
        text = lambda d: f"{d['mean']:+.2f} ± {d['std']:.2f} [{d['min']:+.2f}, {d['max']:+.2f}] (n={int(d['count'])})"  # noqa: E731
        body = [
            [f"{sparsity:.0%}", *(text(cells[(sparsity, b)]) if (sparsity, b) in cells else "—" for b in blocks)]
            for sparsity in sorted(runs["sparsity"].unique())
        ]
        tables.append(text_table([model, *(f"B={b}" for b in blocks)], body, markdown=True))
    return "\n\n".join(tables)


def report(frame: pd.DataFrame, paper: str | Sequence[str] | None = "auto") -> str:
    """Every table of a set of runs, per (task, model, length) and, for image models, per set of pruned layers (one
    table never compares runs that pruned different layers; ``min_blocks`` picks layers by block size):

    * each configuration with validation and test metric, AUROC for CTR, achieved sparsity and time;
    * where there are several block sizes or the paper's setting (:func:`paper_setting`; ``paper`` names one for
      runs of its task, ``None`` none), the paper's layout of the plain runs, its numbers in brackets;
    * where there are variants, a table of them beside the plain SA++ and ACDC runs of the same cells;
    * SA++ with attention minus magnitude scores where such pairs exist (:func:`score_table`).
    """
    out = []
    several_data = frame["data"].nunique() > 1
    for (task, model, epochs, data), runs in sorted(
        frame.groupby(["task", "model", "epochs", "data"], dropna=False), key=lambda kv: str(kv[0])
    ):
        setting = paper_setting(data, model, paper, task)
        dense = runs[(runs["algorithm"] == "dense") & (runs["variant"] == "")]
        pruned = runs[runs["algorithm"] != "dense"]
        title = f"{model}{f' on {DATA_NAMES.get(data, data)}' if several_data else ''} ({task}"
        title += f", {epochs:g} epochs)" if pd.notna(epochs) else ")"
        if task == "ctr":
            sets = {(): pruned} if not pruned.empty else {}
            stats = [("mean", "validation BCE"), ("test_mean", "test BCE")]
            stats += [("auroc_mean", "validation AUROC"), ("test_auroc_mean", "test AUROC")]
        else:
            sets = dict(iter(pruned.groupby("pruned_layers")))
            stats = [("mean", "validation top-1 %"), ("test_mean", "test top-1 %")]
        if not sets:
            out.append(f"{title}: every configuration\n\n{runs_table(summarize(runs))}")
        for layers, group in sorted(sets.items(), key=lambda kv: kv[0]):
            name = title + (f", pruned {', '.join(layers)}" if layers else "")
            recorded = group["min_blocks"].fillna(0).astype(int)
            if task != "ctr" and recorded.any():  # an unrecorded min_blocks is the default, 100
                rules = sorted({(b, m or 100) for b, m in zip(group["block_size"], recorded)})
                name += " (min_blocks " + ", ".join(f"B={b}: {m}" for b, m in rules) + ")"
            plain, variants = group[group["variant"] == ""], group[group["variant"] != ""]
            if not plain.empty and (setting or plain["block_size"].nunique() > 1):
                summary = summarize(pd.concat([dense, plain]))
                for stat, label in stats:
                    reference = setting if "auroc" not in stat else None  # the paper reports no AUROC
                    note = f", [the paper's {reference} number]" if reference else ""
                    table = paper_table(summary, reference, stat=stat, achieved=True)
                    out.append(f"{name}: {label}, mean ± std over seeds (achieved block sparsity){note}\n\n{table}")
            if not variants.empty:
                cells = set(zip(variants["sparsity"], variants["block_size"]))
                references = plain[plain["algorithm"].isin(["sapp", "acdc"])]
                references = references[[c in cells for c in zip(references["sparsity"], references["block_size"])]]
                summary = summarize(pd.concat([references, variants]))
                for stat, label in stats:
                    table = paper_table(summary, None, stat)
                    out.append(f"{name}, variants: {label}, mean ± std over seeds\n\n{table}")
            out.append(f"{name}: every configuration\n\n{runs_table(summarize(pd.concat([dense, group])))}")
    for split, label in (("val", "validation"), ("test", "test")):
        table = score_table(frame, split)
        if table:
            out.append(f"SA++ with attention minus magnitude scores (Fig. 2(a)), {label} top-1, points\n\n{table}")
    return "\n\n".join(out) if out else "(no runs)"
