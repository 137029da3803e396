"""Runs as a frame and the tables printed from it: loading folders and JSON-lines stores, summaries over seeds, the
paper's layout, variants, the score differences of Fig. 2(a), the committed stores' numbers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import record, score_rows, write_jsonl, write_run

from sapp_lightning.app.paper import paper_value
from sapp_lightning.app.results import (
    METHODS,
    append_jsonl,
    compare_table,
    load_runs,
    paper_setting,
    paper_table,
    report,
    runs_table,
    score_differences,
    score_table,
    summarize,
    to_frame,
)

STORES = Path(__file__).resolve().parents[1] / "bench" / "results"


def cells(table: str, *first: str) -> list[str]:
    """The cells after ``first`` in the markdown row that starts with them."""
    for line in table.splitlines():
        row = [c.strip() for c in line.strip().strip("|").split("|")]
        if row[: len(first)] == list(first):
            return row[len(first) :]
    raise AssertionError(f"no row {first} in\n{table}")


def section(text: str, start: str, end: str | None = None) -> str:
    begin = text.index(start)
    return text[begin : text.index(end, begin + len(start)) if end else None]


# --- loading --------------------------------------------------------------------------------------------------------
def test_a_sweep_folder_gives_one_row_per_results_json_with_its_overrides_as_key(tmp_path):
    write_run(tmp_path / "0", record("none", 0.0, 16, 0, 0.88), ["recipe=fashion_mnist_demo", "pruning=dense"])
    write_run(tmp_path / "1", record("sapp", 0.9, 16, 0, 0.85), ["recipe=fashion_mnist_demo", "pruning=sapp"])
    write_run(tmp_path / "nested" / "run", record("acdc", 0.9, 16, 0, 0.84))  # no Hydra record: its folder
    frame = load_runs(tmp_path)
    assert frame["algorithm"].tolist() == ["dense", "sapp", "acdc"]  # sapp_lightning 0.1 called dense "none"
    demo = "recipe=fashion_mnist_demo pruning="
    assert frame["key"].tolist() == [f"{demo}dense", f"{demo}sapp", str(tmp_path / "nested" / "run")]
    assert (frame.loc[0, "sparsity"], frame.loc[0, "block_size"]) == (0.0, 0)  # the dense baseline has neither
    assert frame.loc[1, "path"] == str(tmp_path / "1") and frame.loc[1, "val/acc"] == 0.85
    assert frame.loc[1, "record"]["overrides"] == ["recipe=fashion_mnist_demo", "pruning=sapp"]


def test_a_store_skips_a_torn_last_line_and_counts_a_run_written_twice_once(tmp_path):
    first = record("sapp", 0.9, 16, 0, 0.80) | {"key": "a", "variant": "pruning.score=magnitude"}
    path = write_jsonl(
        tmp_path / "runs.jsonl", [first, record("acdc", 0.9, 16, 0, 0.7), first | {"val": {"val/acc": 0.82}}]
    )
    frame = load_runs(path)
    assert len(frame) == 2 and frame["algorithm"].tolist() == ["acdc", "sapp"]
    assert frame.set_index("key").loc["a", "val/acc"] == 0.82  # the last line wins
    assert frame["variant"].tolist() == ["", "pruning.score=magnitude"]
    assert frame.loc[0, "key"] == f"{path}:2"  # a line without a key is keyed by its place


def test_sources_that_hold_no_runs_say_so(tmp_path):
    with pytest.raises(FileNotFoundError, match="no results.json below .*finished run or sweep folder"):
        load_runs(tmp_path)
    with pytest.raises(FileNotFoundError, match="no such file: .*missing.jsonl"):
        load_runs(tmp_path / "missing.jsonl")
    (tmp_path / "old.jsonl").write_text('{"key": "x", "method": "sapp", "val_acc": 80.0}\n')
    with pytest.raises(ValueError, match=r"old.jsonl, line 1: not a results.json record"):
        load_runs(tmp_path / "old.jsonl")


def test_min_blocks_comes_from_the_run_its_overrides_or_its_config():
    rows = [
        record("sapp", 0.9, 16, 0, 0.8) | {"min_blocks": 17},
        record("sapp", 0.9, 8, 0, 0.8) | {"overrides": ["pruning=sapp", "pruning.min_blocks=50"]},
        record("sapp", 0.9, 32, 0, 0.8) | {"config": {"pruning": {"min_blocks": 100}}},
        record("sapp", 0.9, 4, 0, 0.8),
    ]
    min_blocks = to_frame(rows)["min_blocks"]
    assert min_blocks.tolist()[:3] == [17, 50, 100] and min_blocks.isna().tolist() == [False, False, False, True]


def test_append_jsonl_stores_each_run_once_and_after_a_torn_line(tmp_path):
    for seed in (0, 1):
        write_run(tmp_path / "sweep" / str(seed), record("sapp", 0.9, 16, seed, 0.8), [f"seed={seed}", "pruning=sapp"])
    store = write_jsonl(tmp_path / "store.jsonl", [record("acdc", 0.9, 16, 0, 0.7) | {"key": "old"}])
    frame = load_runs(tmp_path / "sweep")
    assert append_jsonl(frame, store) == (2, 0)
    assert append_jsonl(frame, store) == (0, 2)  # already there
    stored = load_runs(store)
    assert stored["key"].tolist() == ["old", "seed=0 pruning=sapp", "seed=1 pruning=sapp"]
    line = json.loads(store.read_text().splitlines()[-1])
    assert line["overrides"] == ["seed=1", "pruning=sapp"] and "path" not in line  # the folder is not stored


# --- summaries and tables -------------------------------------------------------------------------------------------
def test_summaries_average_over_seeds_in_the_methods_order_and_keep_variants_apart():
    rows = [record(m, 0.9, 16, s, 0.80 + s / 100) for m in ("sapp", "gmp", "acdc", "dense") for s in (0, 1, 2)]
    rows += [record("sapp", 0.9, 16, 0, 0.70, variant="pruning.score=magnitude")]
    summary = summarize(to_frame(rows))
    assert [(s["algorithm"], s["variant"]) for s in summary.to_dict("records")] == [
        ("dense", ""), ("acdc", ""), ("gmp", ""), ("sapp", ""), ("sapp", "pruning.score=magnitude")
    ]  # fmt: skip
    sapp = summary.iloc[3]
    assert (sapp["metric"], sapp["n"], sapp["mean"], sapp["std"]) == ("val/acc", 3, pytest.approx(81.0), 1.0)
    assert (summary.iloc[4]["n"], summary.iloc[4]["std"]) == (1, 0.0)  # one seed: no spread
    assert list(METHODS).index("acdc") < list(METHODS).index("gmp") < list(METHODS).index("sapp")
    assert METHODS["gmp"] == "Gradual magnitude" and METHODS["torch_ao_gmp"] == "torch.ao GMP"


def test_runs_table_has_auroc_columns_only_where_auroc_was_logged():
    ctr = [record(m, 0.9, 10, s, 0.45, task="ctr", val={"val/auroc": 0.7}) for m in ("dense", "sapp") for s in (0, 1)]
    table = runs_table(summarize(to_frame(ctr)))
    header = [c.strip() for c in table.splitlines()[0].split("|")]
    assert header[5:9] == ["val BCE", "test BCE", "val AUROC", "test AUROC"]
    assert cells(table, "Dense", "—", "—", "2")[:4] == ["0.4500 ± 0.0000", "0.4500 ± 0.0000", "0.7000 ± 0.0000", "—"]
    images = runs_table(summarize(to_frame([record("sapp", 0.9, 16, 0, 0.85)])))
    assert "AUROC" not in images and cells(images, "SA++", "90%", "16", "1") == ["85.00", "85.00", "90.00%", "1 s"]


def test_the_papers_layout_puts_its_numbers_in_brackets():
    rows = [record(m, s, b, 0, paper_value("criteo", m, b, s), task="ctr") for m in ("acdc", "sapp")
            for s in (0.9, 0.95) for b in (5, 10)]  # fmt: skip
    rows += [record("magnitude", 0.9, 5, 0, 0.5, task="ctr"), record("dense", 0.0, 0, 0, 0.44, task="ctr")]
    summary = summarize(to_frame(rows))
    table = paper_table(summary, "criteo", achieved=True)
    assert [c.strip() for c in table.splitlines()[0].split("|")[1:-1]] == ["sparsity", "method", "B=5", "B=10"]
    assert cells(table, "95%", "SA++") == ["0.4540 (95.0%) [0.4540]", "0.4595 (95.0%) [0.4595]"]
    assert cells(table, "90%", "Magnitude") == ["0.5000 (90.0%) [0.4523]", "— [0.4693]"]
    assert cells(table, "0%", "Dense") == ["0.4400 [0.4489]", "0.4400 [0.4489]"]
    assert "[" not in paper_table(summary, None)


def test_the_papers_setting_is_decided_in_one_place():
    assert paper_setting("ImageNetDataModule", "resnet50") == "imagenet"
    assert paper_setting("ImageNetDataModule", "SmallCNN") is None
    assert paper_setting("CriteoDataModule", "CriteoPaperNet") == "criteo"
    assert paper_setting("CriteoDataModule", "DLRM") is None
    assert paper_setting("MovieLensCTRDataModule", "CriteoPaperNet") is None
    assert paper_setting("MovieLensCTRDataModule", "CriteoPaperNet", "criteo", "ctr") == "criteo"  # forced
    assert paper_setting("FashionMNISTDataModule", "MLP", "criteo", "classification") is None  # not its task
    assert paper_setting("ImageNetDataModule", "resnet50", "none") is None


def test_report_adds_the_papers_layout_where_there_are_several_blocks_or_the_papers_setting(tmp_path):
    demo = [record(m, 0.9, 16, 0, acc) for m, acc in (("dense", 0.89), ("sapp", 0.86), ("acdc", 0.85))]
    text = report(to_frame(demo))
    assert text.startswith("MLP (classification, 2 epochs), pruned net.1: every configuration\n\n| method ")
    assert "B=16" not in text  # one block size and no paper setting: the configurations are the table
    imagenet = [r | {"data": "ImageNetDataModule", "model": "resnet50"} for r in demo]
    text = report(to_frame(imagenet))
    layout = section(text, "validation top-1 %, mean ± std over seeds (achieved block sparsity), [the paper's "
                     "imagenet number]", "test top-1")  # fmt: skip
    assert cells(layout, "90%", "SA++") == ["86.00 (90.0%) [69.92]"] and cells(layout, "0%", "Dense") == [
        "89.00 [76.90]"
    ]
    assert "[" not in report(to_frame(imagenet), paper=None)


def test_report_compares_only_runs_that_pruned_the_same_layers():
    with_classifier = ["net.classifier.1", "net.classifier.3", "net.features.4"]
    rows = [record("dense", 0.0, 16, 0, 0.90, model="SmallCNN", pruned_layers=[])]
    for block, min_blocks, acc, layers in [
        (16, 16, 0.80, with_classifier),
        (16, 17, 0.86, ["net.classifier.1", "net.features.4"]),
        (32, 16, 0.87, ["net.classifier.1", "net.features.4"]),
    ]:
        rows.append(record("sapp", 0.95, block, 0, acc, model="SmallCNN", pruned_layers=layers, min_blocks=min_blocks))
    text = report(to_frame(rows), paper="imagenet")
    title = "SmallCNN (classification, 2 epochs), pruned net.classifier.1, net.features.4"
    title += " (min_blocks B=16: 17, B=32: 16)"
    same = section(text, title + ": validation", title + ": test")
    assert cells(same, "95%", "SA++") == ["86.00 (95.0%) [64.27]", "87.00 (95.0%) [65.41]"]
    assert cells(same, "0%", "Dense") == ["90.00 [76.90]", "90.00 [76.90]"]
    title = "SmallCNN (classification, 2 epochs), pruned " + ", ".join(with_classifier) + " (min_blocks B=16: 16)"
    other = section(text, title + ": validation", title + ": test")
    assert cells(other, "95%", "SA++") == ["80.00 (95.0%) [64.27]"] and "86.00" not in other


def test_variants_get_a_table_beside_the_plain_sapp_and_acdc_runs_of_their_cells():
    rows = [record(m, 0.9, 16, 0, acc) for m, acc in (("sapp", 0.82), ("acdc", 0.81), ("magnitude", 0.5))]
    rows += [record("sapp", 0.8, 16, 0, 0.9), record("sapp", 0.9, 16, 0, 0.80, variant="pruning.plan=imagenet_acdc")]
    variants = section(report(to_frame(rows)), "variants: validation", "variants: test")
    assert cells(variants, "90%", "SA++ pruning.plan=imagenet_acdc") == ["80.00"]
    assert cells(variants, "90%", "SA++") == ["82.00"] and cells(variants, "90%", "ACDC") == ["81.00"]
    assert "Magnitude" not in variants and "80%" not in variants  # only SA++ and ACDC, only the variants' cells


def test_score_differences_pair_attention_and_magnitude_runs_seed_by_seed():
    differences = score_differences(to_frame(score_rows()))
    assert sorted(differences["model"].unique()) == ["MLP", "SmallCNN"]
    first = differences[(differences["model"] == "MLP") & (differences["block_size"] == 8)]
    first = first[first["sparsity"] == 0.8]
    assert first["seed"].tolist() == [0, 1, 2]  # seed 7 has no magnitude run
    assert first["difference"].tolist() == pytest.approx([1.0, 2.0, 3.0])
    cnn = differences[differences["model"] == "SmallCNN"]
    assert sorted(set(zip(cnn["block_size"], cnn["sparsity"]))) == [(16, 0.8), (16, 0.9)]
    table = score_table(to_frame(score_rows()))
    assert cells(table, "80%") == ["+2.00 ± 1.00 [+1.00, +3.00] (n=3)", "+2.00 ± 1.00 [+1.00, +3.00] (n=3)"]
    assert score_table(to_frame(score_rows()[-1:])) == "" and "Fig. 2(a)" not in report(to_frame(score_rows()[-1:]))
    assert "SA++ with attention minus magnitude scores (Fig. 2(a)), validation top-1" in report(to_frame(score_rows()))


def test_a_variant_gets_rows_of_its_own_in_the_results_table():
    rows = [
        {"algorithm": "sapp", "sparsity": 0.9, "block_size": 16, "seed": 0, "task": "classification",
         "variant": f"pruning.schedule_exponent={c}", "val": {"val/acc": acc}, "test": {},
         "achieved_block_sparsity": 0.9, "fit_seconds": 1.0}
        for c, acc in ((2.0, 0.69), (8.0, 0.70))
    ]  # fmt: skip
    assert [(s["variant"], s["n"]) for s in summarize(to_frame(rows)).to_dict("records")] == [
        ("pruning.schedule_exponent=2.0", 1),
        ("pruning.schedule_exponent=8.0", 1),
    ]


def test_a_sweep_over_a_setting_without_a_variant_label_keeps_its_values_apart(tmp_path):
    for i, (plan, seed, value) in enumerate([("criteo", 0, 0.68), ("criteo", 1, 0.70), ("criteo_auto", 0, 0.99)]):
        config = {"pruning": {"plan": plan, "logit_scale": 1.0, "block_size": 16}}
        write_run(tmp_path / str(i), record("sapp", 0.9, 16, seed, value, task="ctr", config=config))
    write_run(tmp_path / "old", record("sapp", 0.9, 16, 2, 0.69, task="ctr", config={"pruning": {"plan": "criteo"}}))
    write_run(tmp_path / "gmp", record("gmp", 0.9, 16, 0, 0.75, task="ctr", config={"pruning": {"plan": "x"}}))
    summary = summarize(load_runs(tmp_path))
    # logit_scale, missing from the older run, is not compared; gmp's plan is gmp's own
    assert [(s["algorithm"], s["variant"], s["n"]) for s in summary.to_dict("records")] == [
        ("gmp", "", 1),
        ("sapp", "pruning.plan=criteo", 3),
        ("sapp", "pruning.plan=criteo_auto", 1),
    ]


# --- the committed stores -------------------------------------------------------------------------------------------
def test_the_committed_stores_print_the_numbers_docs_results_md_shows():
    text = report(load_runs(STORES / "ctr25.jsonl"), paper="criteo")
    bce = section(text, "validation BCE", "test BCE")
    assert cells(bce, "90%", "SA++") == ["0.6760 ± 0.0394 (90.0%) [0.4535]"]
    assert cells(bce, "0%", "Dense") == ["0.7370 ± 0.0996 [0.4489]"]
    auroc = section(text, "validation AUROC", "test AUROC")
    assert cells(auroc, "99%", "ACDC") == ["0.6731 ± 0.0075 (99.0%)"]
    both = {name: load_runs(STORES / name) for name in ("ctr25.jsonl", "ctr.jsonl")}
    assert cells(compare_table(both, "auroc_mean"), "90%", "10", "SA++") == ["0.6700 ± 0.0170 (n=3)",
                                                                             "0.6423 ± 0.0054 (n=3)"]  # fmt: skip
    text = report(load_runs(STORES / "ablations.jsonl"))
    variants = section(text, "CriteoPaperNet on MovieLens-100k CTR (ctr, 3 epochs), variants: validation BCE")
    assert cells(variants, "90%", "SA++ pruning.schedule_exponent=2.0") == ["0.6775 ± 0.0202"]
    assert cells(variants, "98%", "SA++ pruning.logit_l2=0.0001") == ["0.6759 ± 0.0103"]
    text = report(load_runs(STORES / "images.jsonl"), paper="imagenet")
    mlp = section(text, "MLP (classification, 2 epochs), pruned net.1, net.3 ")
    assert cells(mlp, "95%", "SA++")[:2] == ["81.11 ± 1.35 (95.0%) [64.27]", "81.95 ± 0.73 (95.0%) [65.41]"]
    cnn = section(text, "SmallCNN (classification, 2 epochs), pruned net.classifier.1, net.features.4 ")
    assert cells(cnn, "90%", "ACDC") == ["87.90 ± 0.35 (90.0%) [67.74]", "87.72 ± 0.40 (90.0%) [68.61]",
                                         "87.10 ± 0.41 (90.0%) [68.96]"]  # fmt: skip


@pytest.mark.parametrize("store", sorted(p.name for p in STORES.glob("*.jsonl")))
def test_every_committed_store_is_in_the_results_json_schema(store):
    frame = load_runs(STORES / store)
    assert len(frame) and frame["algorithm"].isin(METHODS).all() and frame["task"].isin(["classification", "ctr"]).all()
    assert (frame["val/loss"].notna()).all()
