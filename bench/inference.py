"""Block-sparse inference against dense torch, measured side by side (interleaved) in one process.

    python bench/inference.py                        # every cell on 1 and 2 threads -> bench/results/inference.json
    python bench/inference.py --cells layers conv    # some cells (their rows replace the same rows in the file)
    python bench/inference.py --cells models --models resnet50 --threads 2 --memory
    python bench/inference.py --quick                # 90% layers and the convolution, one thread (< 1 minute)

Every cell prunes with 16x16 blocks the way a committed model has them (a random ``round((1 - s) * N)`` of each
weight's N blocks kept, the others exact zeros; layers chosen by ``sapp_lightning.targets`` as BlockPruning chooses
them), exports with ``to_block_sparse`` at the batch timed, checks the outputs with ``assert_close``, and times the
dense and the exported model interleaved (A B A B ..., medians), on each thread count:

* ``layers``: one ``Linear(1024, 1024)`` and one ``Linear(768, 3072)`` at 90% and 95%, 1, 32 and 256 rows: dense,
  this project's kernel (``own``) and the torch.sparse layout the earlier export chose (``torch``);
* ``conv``: a 1x1 ``Conv2d(256, 1024)`` on a 14x14 map, batch 32, 90%: dense (NCHW, and channels-last) against
  the exported layer on a channels-last input (what it gets inside an exported network) and on an NCHW one;
* ``fallback`` (not in the default run): convolutions through torch.sparse (im2col, no compiler) against dense;
* ``coverage`` (not in the default run): MobileNetV3-small, a ViT and GPT-2 in tiny configs, what export does with
  each weight;
* ``rule`` (not in the default run): the own kernel against dense at 10-50% zero blocks, 1-256 rows,
  layers 256 to 3072 wide: the measurements behind ``kernel_rule``;
* ``models``: torchvision's ResNet50 (``min_blocks=100``, the recipe's choice), a ViT-B/16 encoder block (197
  tokens), the paper's Criteo model (its first dense layer, as the recipe prunes it; 100,000-row tables) at 90%,
  batch 1 and 32; beside each, the model's own limit from its multiply-adds (pruned layers at their kept
  fraction, everything else dense) and the share of it reached, file sizes, and with ``--memory`` the peak memory of
  a fresh process that loads the model and runs one batch.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.common import interleaved_times, load, machine, prune_like_committed_  # noqa: E402
from sapp_lightning.export import (  # noqa: E402
    BlockSparseConv2d,
    BlockSparseLinear,
    BlockSparseMultiheadAttention,
    layout_rule,
    load_block_sparse,
    save_block_sparse,
    to_block_sparse,
)

BLOCK = 16
OUT = ROOT / "bench" / "results" / "inference.json"
LAYERS = {"1024x1024": (1024, 1024), "768x3072": (768, 3072)}  # (in, out)
MODELS = ("resnet50", "vit_block", "criteo")
CRITEO_TABLE = 100_000


# --- timing ------------------------------------------------------------------------------------------------------
def time_calls(calls: dict[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
    """Median seconds per call of each, interleaved; a call repeats inside a sample until it lasts ~2 ms."""
    first = next(iter(calls.values()))
    with torch.inference_mode():
        first()
        start = time.perf_counter()
        first()
        inner = max(1, int(2e-3 / max(1e-7, time.perf_counter() - start)))

        def loop(call):
            def run():
                for _ in range(inner):
                    call()

            return run

        times = interleaved_times({name: loop(call) for name, call in calls.items()}, repeats)
    return {name: statistics.median(t) / inner for name, t in times.items()}


def _busy_seconds() -> float:
    """CPU seconds all processes of the machine have run, from /proc/stat."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    user, nice, system, idle, iowait, irq, softirq, steal = (int(v) for v in fields[:8])
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


TRIES = 6  # --quick: 1


def time_alone(
    calls: dict[str, Callable[[], Any]], repeats: int, tries: int | None = None
) -> tuple[dict[str, float], dict]:
    """:func:`time_calls`, timed again (up to ``tries`` times) while other processes used more than a quarter of a
    core during it (this machine is shared, and a process on the other core skews two-thread timings most; /proc/stat
    counts in hundredths of a second). Returns the times of the quietest try, with the cores the others used then
    and the tries it took."""
    best = None
    attempt, tries = 0, tries or TRIES
    while attempt < tries:
        attempt += 1
        busy, ours, start = _busy_seconds(), sum(os.times()[:2]), time.perf_counter()
        times = time_calls(calls, repeats)
        elapsed = time.perf_counter() - start
        others = max(0.0, (_busy_seconds() - busy) - (sum(os.times()[:2]) - ours)) / elapsed
        if best is None or others < best[1]:
            best = (times, others)
        if others < 0.25:
            break
        time.sleep(5)
    return best[0], {"other_cores": round(best[1], 3), "tries": attempt}


def on_threads(threads: int, fn: Callable[[], Any]) -> Any:
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return fn()
    finally:
        torch.set_num_threads(before)


def check(sparse: Callable[[], torch.Tensor], dense: Callable[[], torch.Tensor]) -> None:
    with torch.inference_mode():
        torch.testing.assert_close(sparse(), dense(), rtol=1e-4, atol=1e-4)


# --- cells ---------------------------------------------------------------------------------------------------------
def layer_cells(sparsities: list[float], rows: list[int], threads: list[int], repeats: int) -> list[dict[str, Any]]:
    out = []
    for (name, (fan_in, fan_out)), sparsity in itertools.product(LAYERS.items(), sparsities):
        torch.manual_seed(0)
        dense = prune_like_committed_(nn.Sequential(nn.Linear(fan_in, fan_out)), BLOCK, sparsity).eval()
        own = to_block_sparse(dense, BLOCK, layout="own")
        for n in rows:
            blocksize = (BLOCK, BLOCK)
            zero = 1 - own[0].matrix.nonzero_blocks / own[0].matrix.num_blocks
            torch_layout = layout_rule(n, blocksize, zero)[0] or "csr"  # what export chose before its own kernel
            torch_sparse = to_block_sparse(dense, BLOCK, layout=torch_layout)
            x = torch.randn(n, fan_in)
            calls = {"dense": partial(dense, x), "own": partial(own, x), "torch": partial(torch_sparse, x)}
            check(calls["own"], calls["dense"])
            check(calls["torch"], calls["dense"])
            for t in threads:
                times, alone = on_threads(t, partial(time_alone, calls, repeats))
                ms = {k: 1e3 * v for k, v in times.items()}
                row = {"cell": "layers", "name": name, "sparsity": sparsity, "batch": n, "threads": t, "load": load(),
                       "alone": alone,
                       "limit": 1 / (1 - sparsity), "ms": ms, "torch_layout": torch_layout,
                       "speedup": {k: ms["dense"] / ms[k] for k in ("own", "torch")},
                       "gflops": {"dense": 2e-6 * n * fan_in * fan_out / ms["dense"],
                                  "own": 2e-6 * n * fan_in * fan_out * (1 - zero) / ms["own"]}}  # fmt: skip
                out.append(row)
                print(f"layers {name} {sparsity:.0%} rows={n} threads={t}: own {row['speedup']['own']:.2f}x, "
                      f"torch.sparse ({torch_layout}) {row['speedup']['torch']:.2f}x, limit {row['limit']:.0f}x",
                      flush=True)  # fmt: skip
    return out


def rule_cells(threads: list[int], repeats: int, sparsities: list[float]) -> list[dict[str, Any]]:
    """The measurements behind ``kernel_rule``: the own kernel against dense at low fractions of zero blocks."""
    out = []
    shapes = {"1024x1024": (1024, 1024), "768x3072": (768, 3072), "3072x768": (3072, 768), "256x256": (256, 256)}
    for (name, (fan_in, fan_out)), sparsity in itertools.product(shapes.items(), sparsities):
        torch.manual_seed(0)
        dense = prune_like_committed_(nn.Sequential(nn.Linear(fan_in, fan_out)), BLOCK, sparsity).eval()
        own = to_block_sparse(dense, BLOCK, layout="own")
        for n, t in itertools.product((1, 4, 32, 256), threads):
            x = torch.randn(n, fan_in)
            calls = {"dense": partial(dense, x), "own": partial(own, x)}
            times, alone = on_threads(t, partial(time_alone, calls, repeats))
            ms = {k: 1e3 * v for k, v in times.items()}
            row = {
                "cell": "rule",
                "name": name,
                "sparsity": sparsity,
                "batch": n,
                "threads": t,
                "load": load(),
                "alone": alone,
            }
            out.append({**row, "limit": 1 / (1 - sparsity), "ms": ms, "speedup": {"own": ms["dense"] / ms["own"]}})
        print(f"rule {name} {sparsity:.0%}: " + ", ".join(f"{r['batch']} rows {r['threads']}t "
              f"{r['speedup']['own']:.2f}x" for r in out[-4 * len(threads):]), flush=True)  # fmt: skip
    return out


def coverage_cells() -> list[dict[str, Any]]:
    """What export does with models nobody here wrote (tiny configs, as tests/test_architectures.py builds them),
    pruned at 90% with blocks of 8 (``min_blocks=4``): kernel or reason per weight, and exact outputs."""
    import collections

    import torchvision
    import transformers

    torch.manual_seed(0)
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=2,
                                                                n_head=2, bos_token_id=0, eos_token_id=0))  # fmt: skip
    vit = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32,
                                               mlp_dim=64, num_classes=10)  # fmt: skip
    models = {
        "MobileNetV3-small": (torchvision.models.mobilenet_v3_small(num_classes=10), (torch.randn(4, 3, 32, 32),), 4),
        "ViT": (vit, (torch.randn(4, 3, 32, 32),), 4 * 17),
        "GPT-2": (gpt2, (torch.randint(64, (4, 16)),), 4 * 16),
    }
    out = []
    for name, (model, x, rows) in models.items():
        model = prune_like_committed_(model, 8, 0.9, min_blocks=4).eval()
        sparse = to_block_sparse(model, 8, batch_size=rows, min_blocks=4)
        with torch.inference_mode():
            a, b = sparse(*x), model(*x)
        a, b = (getattr(t, "logits", t) for t in (a, b))
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
        summary = sparse.block_sparse_summary
        kinds = collections.Counter(f"{c.type_name}: {c.layout}" for c in summary.exported)
        dense = collections.Counter(f"{c.type_name}: {c.reason.split(' (')[0]}" for c in summary.dense)
        out.append({"cell": "coverage", "name": name, "sparsity": 0.9, "batch": rows, "threads": 0,
                    "exported": dict(kinds), "dense": dict(dense)})  # fmt: skip
        print(f"coverage {name}: exported {dict(kinds)}; dense {dict(dense)}", flush=True)
    return out


def fallback_cells(repeats: int) -> list[dict[str, Any]]:
    """Convolutions on torch.sparse (what a machine without a compiler would have: an im2col copy, then
    ``torch.sparse.mm``) against dense oneDNN, at 90%, one thread: why export keeps them dense there."""
    from sapp_lightning.export import kernels, matrix

    out = []
    saved = dict(kernels._state)
    kernels._state.update(module=None, failed=True)  # as without a compiler (no warning: not a user's run)
    matrix._warned.add("no-kernel")
    try:
        for cin, cout, k, size, batch in [(256, 256, 3, 14, 32), (64, 64, 3, 56, 8), (256, 1024, 1, 14, 32),
                                          (128, 128, 3, 28, 1)]:  # fmt: skip
            torch.manual_seed(0)
            dense = prune_like_committed_(nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2)), BLOCK, 0.9).eval()
            x = torch.randn(batch, cin, size, size)
            calls = {"dense": partial(dense, x)}
            for layout in ("csr", "bsr"):
                calls[layout] = partial(to_block_sparse(dense, BLOCK, layout=layout), x)
            times, alone = on_threads(1, partial(time_alone, calls, repeats))
            ms = {key: 1e3 * v for key, v in times.items()}
            name = f"conv{k}x{k} {cin}->{cout} {size}x{size}"
            out.append({"cell": "fallback", "name": name, "sparsity": 0.9, "batch": batch, "threads": 1, "alone": alone,
                        "ms": ms, "speedup": {key: ms["dense"] / ms[key] for key in ("csr", "bsr")}})  # fmt: skip
            print(f"fallback {name} batch {batch}: csr {out[-1]['speedup']['csr']:.2f}x, bsr "
                  f"{out[-1]['speedup']['bsr']:.2f}x", flush=True)  # fmt: skip
    finally:
        kernels._state.update(saved)
    return out


def conv_cell(threads: list[int], repeats: int, sparsity: float = 0.9) -> list[dict[str, Any]]:
    torch.manual_seed(0)
    dense = prune_like_committed_(nn.Sequential(nn.Conv2d(256, 1024, 1)), BLOCK, sparsity).eval()
    sparse = to_block_sparse(dense, BLOCK, batch_size=32)
    assert isinstance(sparse[0], BlockSparseConv2d)
    dense_cl = nn.Sequential(nn.Conv2d(256, 1024, 1)).eval()
    dense_cl.load_state_dict(dense.state_dict())
    dense_cl = dense_cl.to(memory_format=torch.channels_last)
    x = torch.randn(32, 256, 14, 14)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    calls = {"dense": partial(dense, x), "dense_channels_last": partial(dense_cl, x_cl),
             "own": partial(sparse, x_cl), "own_nchw_input": partial(sparse, x)}  # fmt: skip
    check(calls["own"], calls["dense"])
    out = []
    for t in threads:
        times, alone = on_threads(t, partial(time_alone, calls, repeats))
        ms = {k: 1e3 * v for k, v in times.items()}
        row = {"cell": "conv", "name": "conv1x1 256->1024 14x14", "sparsity": sparsity, "batch": 32, "threads": t,
               "load": load(), "alone": alone,
               "limit": 1 / (1 - sparsity), "ms": ms,
               "speedup": {k: ms["dense"] / ms[k] for k in ("own", "own_nchw_input")},
               "speedup_vs_channels_last": ms["dense_channels_last"] / ms["own"]}  # fmt: skip
        out.append(row)
        print(f"conv 1x1 256->1024 14x14 batch 32 threads={t}: own {row['speedup']['own']:.2f}x "
              f"({row['speedup_vs_channels_last']:.2f}x against dense channels-last), NCHW input "
              f"{row['speedup']['own_nchw_input']:.2f}x", flush=True)  # fmt: skip
    return out


def build_model(name: str, sparsity: float = 0.9) -> tuple[nn.Module, Callable[[int], tuple], dict[str, Any]]:
    """The dense committed model (pruned as the recipe prunes it), an input maker, the pruning's settings."""
    import torchvision

    torch.manual_seed(0)
    if name == "resnet50":
        model, settings = torchvision.models.resnet50(weights=None), {"min_blocks": 100}
        inputs = lambda batch: (torch.randn(batch, 3, 224, 224),)  # noqa: E731
    elif name == "vit_block":
        from torchvision.models.vision_transformer import EncoderBlock

        model, settings = EncoderBlock(12, 768, 3072, dropout=0.0, attention_dropout=0.0), {"min_blocks": 100}
        inputs = lambda batch: (torch.randn(batch, 197, 768),)  # noqa: E731
    elif name == "criteo":
        from sapp_lightning.app.models import CriteoPaperNet

        model = CriteoPaperNet(num_dense=13, cardinalities=[CRITEO_TABLE] * 26)
        settings = {"min_blocks": 100, "include": [r"^mlp\.0$"]}

        def inputs(batch):
            gen = torch.Generator().manual_seed(0)
            return torch.randn(batch, 13, generator=gen), torch.randint(CRITEO_TABLE, (batch, 26), generator=gen)
    else:
        raise ValueError(f"unknown model {name!r}; one of {', '.join(MODELS)}")
    prune_like_committed_(model, BLOCK, sparsity, **settings)
    return model.eval(), inputs, settings


def multiply_adds(model: nn.Module, inputs: tuple, sparse: nn.Module | None = None) -> float:
    """Multiply-adds of one forward: Linear, Conv2d, attention's projections and its two batched products. With
    ``sparse`` (the exported model) each exported layer counts its kept fraction of blocks only."""
    kept: dict[str, float] = {}
    if sparse is not None:
        for name, module in sparse.named_modules():
            if isinstance(module, BlockSparseLinear | BlockSparseConv2d):
                kept[name] = module.matrix.nonzero_blocks / module.matrix.num_blocks
            if isinstance(module, BlockSparseMultiheadAttention):
                for part in ("in_proj", "out_proj"):
                    proj = getattr(module, part)
                    if isinstance(proj, BlockSparseLinear):
                        kept[f"{name}.{part}"] = proj.matrix.nonzero_blocks / proj.matrix.num_blocks
    total = [0.0]

    def hook(name):
        def count(module, args, output):
            out = output[0] if isinstance(output, tuple) else output
            if isinstance(module, nn.Linear) and not name.endswith("out_proj"):
                total[0] += out.numel() * module.in_features * kept.get(name, 1.0)
            elif isinstance(module, nn.Conv2d):
                per_output = module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
                total[0] += out.numel() * per_output * kept.get(name, 1.0)
            elif isinstance(module, nn.MultiheadAttention):
                tokens = args[0].numel() // module.embed_dim
                length = args[0].shape[1] if module.batch_first else args[0].shape[0]
                total[0] += tokens * module.embed_dim * 3 * module.embed_dim * kept.get(f"{name}.in_proj", 1.0)
                total[0] += tokens * module.embed_dim * module.embed_dim * kept.get(f"{name}.out_proj", 1.0)
                total[0] += 2 * tokens * length * module.embed_dim  # Q K^T and A V

        return count

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules()]
    try:
        with torch.inference_mode():
            model(*inputs)
    finally:
        for h in handles:
            h.remove()
    return total[0]


def breakdown(model: nn.Module, inputs: tuple) -> dict[str, float]:
    """Milliseconds of one forward per kind of leaf module (forward hooks; a block-sparse layer counts as one), the
    rest (functional ops between modules) as ``other``."""
    spent: dict[str, float] = {}
    started: dict[str, float] = {}
    handles = []
    for name, module in model.named_modules():
        leaf = not list(module.children()) or isinstance(module, BlockSparseConv2d | BlockSparseLinear)
        inside = any(isinstance(model.get_submodule(name.rpartition(".")[0]), BlockSparseMultiheadAttention)
                     for _ in [0] if "." in name)  # fmt: skip
        if not leaf and not isinstance(module, BlockSparseMultiheadAttention | nn.MultiheadAttention) or inside:
            continue
        kind = type(module).__name__

        def pre(module, args, name=name):
            started[name] = time.perf_counter()

        def post(module, args, output, name=name, kind=kind):
            spent[kind] = spent.get(kind, 0.0) + 1e3 * (time.perf_counter() - started[name])

        handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
    try:
        with torch.inference_mode():
            model(*inputs)
            spent.clear()
            start = time.perf_counter()
            model(*inputs)
            total = 1e3 * (time.perf_counter() - start)
    finally:
        for h in handles:
            h.remove()
    return {**spent, "other": total - sum(spent.values())}


def file_sizes(dense: nn.Module, sparse: nn.Module) -> dict[str, int]:
    with tempfile.TemporaryDirectory() as tmp:
        torch.save(dense.state_dict(), f"{tmp}/dense.pt")
        save_block_sparse(sparse, f"{tmp}/sparse.pt")
        sizes = {kind: Path(f"{tmp}/{kind}.pt").stat().st_size for kind in ("dense", "sparse")}
    return {"dense": sizes["dense"], "block_sparse": sizes["sparse"]}


def tensor_bytes(model: nn.Module) -> int:
    """Bytes of every tensor the model holds (parameters and buffers, the sparse layers' packed blocks included)."""
    return sum(t.numel() * t.element_size() for t in itertools.chain(model.parameters(), model.buffers()))


def _rss() -> int:
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE")


def memory_probe(name: str, kind: str, batch: int, path: str) -> None:
    """In a fresh process: build the model class, load ``path`` (dense state_dict or block-sparse file), run one
    batch; print as JSON the resident memory after loading, the peak during the forward (sampled every
    millisecond), and the model's tensor bytes."""
    import gc
    import threading

    logging.getLogger("sapp_lightning.export").setLevel(logging.WARNING)
    model, inputs, _ = build_model(name, sparsity=0.0)  # the architecture (its weights are replaced)
    if kind == "dense":
        model.load_state_dict(torch.load(path, weights_only=True))
    else:
        load_block_sparse(path, model)
    x = inputs(batch)
    gc.collect()
    loaded = _rss()
    peak, running = [loaded], [True]

    def sample():
        while running[0]:
            peak[0] = max(peak[0], _rss())
            time.sleep(1e-3)

    sampler = threading.Thread(target=sample)
    sampler.start()
    with torch.inference_mode():
        for _ in range(2):
            model(*x)
    running[0] = False
    sampler.join()
    print(json.dumps({"rss_loaded": loaded, "rss_peak_forward": peak[0], "tensor_bytes": tensor_bytes(model)}))


def peak_memory(name: str, dense: nn.Module, sparse: nn.Module, batch: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        torch.save(dense.state_dict(), f"{tmp}/dense.pt")
        save_block_sparse(sparse, f"{tmp}/sparse.pt")
        for kind in ("dense", "block_sparse"):
            path = f"{tmp}/{'dense' if kind == 'dense' else 'sparse'}.pt"
            code = f"from bench.inference import memory_probe; memory_probe({name!r}, {kind!r}, {batch}, {path!r})"
            done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
            out[kind] = json.loads(done.stdout.strip().splitlines()[-1])
    return out


def model_cells(names: list[str], batches: list[int], threads: list[int], repeats: int, memory: bool) -> list[dict]:
    out = []
    for name in names:
        dense, inputs, settings = build_model(name)
        dense_cl = None
        if name == "resnet50":  # dense torch's faster CPU layout, for a fair second baseline
            dense_cl = build_model(name)[0].to(memory_format=torch.channels_last)
        for batch in batches:
            sparse = to_block_sparse(dense, BLOCK, batch_size=batch, **settings)
            x = inputs(batch)
            calls = {"dense": partial(dense, *x), "block_sparse": partial(sparse, *x)}
            check(calls["block_sparse"], calls["dense"])
            full, pruned = multiply_adds(dense, x), multiply_adds(dense, x, sparse)
            if dense_cl is not None:
                x_cl = tuple(t.contiguous(memory_format=torch.channels_last) for t in x)
                calls["dense_channels_last"] = partial(dense_cl, *x_cl)
            summary = sparse.block_sparse_summary
            base = {"cell": "models", "name": name, "sparsity": 0.9, "batch": batch,
                    "exported_layers": len(summary.exported), "dense_layers": len(summary.dense),
                    "multiply_adds": {"dense": full, "block_sparse": pruned}, "limit": full / pruned,
                    "file_bytes": file_sizes(dense, sparse),
                    "tensor_bytes": {"dense": tensor_bytes(dense), "block_sparse": tensor_bytes(sparse)}}  # fmt: skip
            if memory:
                base["peak_memory"] = peak_memory(name, dense, sparse, batch)
            base["breakdown_ms_1_thread"] = {
                kind: on_threads(1, partial(breakdown, model, x))
                for kind, model in (("dense", dense), ("block_sparse", sparse))
            }
            for t in threads:
                times, alone = on_threads(t, partial(time_alone, calls, repeats))
                ms = {k: 1e3 * v for k, v in times.items()}
                speedup = ms["dense"] / ms["block_sparse"]
                row = {**base, "threads": t, "load": load(), "alone": alone, "ms": ms, "speedup": speedup,
                       "share_of_limit": speedup / base["limit"]}  # fmt: skip
                if "dense_channels_last" in ms:
                    row["speedup_vs_channels_last"] = ms["dense_channels_last"] / ms["block_sparse"]
                out.append(row)
                print(f"{name} batch {batch} threads={t}: {speedup:.2f}x dense (limit {base['limit']:.2f}x, "
                      f"{row['share_of_limit']:.0%} of it)", flush=True)  # fmt: skip
    return out


# --- output ------------------------------------------------------------------------------------------------------
def key(row: dict[str, Any]) -> tuple:
    return row["cell"], row["name"], row["sparsity"], row["batch"], row["threads"]


def merge(path: Path, rows: list[dict[str, Any]], meta: dict[str, Any]) -> dict[str, Any]:
    """Rows of this run replace those with the same cell, name, sparsity, batch and threads already in ``path``."""
    old = json.loads(path.read_text()) if path.exists() else {"rows": []}
    if any("cell" not in r for r in old.get("rows", [])):  # the torch.sparse-only benchmark's rows: kept aside
        old = {"earlier": {k: v for k, v in old.items()}, "rows": []}
    new_keys = {key(r) for r in rows}
    kept = [r for r in old.get("rows", []) if key(r) not in new_keys]
    return {**old, **meta, "rows": sorted(kept + rows, key=key)}


def table(rows: list[dict[str, Any]]) -> str:
    rows = [r for r in rows if "ms" in r and r["cell"] != "fallback"]
    lines = ["| cell | name | sparsity | batch | threads | dense ms | block-sparse ms | speedup | limit | share |",
             "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        ms = r["ms"]
        sparse_ms = ms.get("own", ms.get("block_sparse"))
        speedup = r["speedup"]["own"] if isinstance(r["speedup"], dict) else r["speedup"]
        lines.append(
            f"| {r['cell']} | {r['name']} | {r['sparsity']:.0%} | {r['batch']} | {r['threads']} | {ms['dense']:.3f} "
            f"| {sparse_ms:.3f} | {speedup:.2f}x | {r['limit']:.2f}x | {speedup / r['limit']:.0%} |"
        )
    return "\n".join(lines)


TARGETS = [  # issue 21, item 3: (cell, name, sparsity, batch, at least)
    *[("layers", n, 0.9, 1, 3.0) for n in LAYERS],
    *[("layers", n, 0.9, b, 5.0) for n in LAYERS for b in (32, 256)],
    *[("layers", n, 0.95, b, 8.0) for n in LAYERS for b in (32, 256)],
    ("conv", "conv1x1 256->1024 14x14", 0.9, 32, 4.0),
    ("models", "resnet50", 0.9, 32, 2.0),
]


def _own(row: dict[str, Any]) -> float:
    return row["speedup"]["own"] if isinstance(row["speedup"], dict) else row["speedup"]


def report(path: Path) -> str:
    """The markdown tables of docs/results.md section 3, from the rows in ``path``."""
    rows = json.loads(path.read_text())["rows"]
    find = {key(r): r for r in rows}
    threads = sorted({r["threads"] for r in rows if "ms" in r})
    out = ["| cell | sparsity | rows | target | " + " | ".join(f"{t} thread(s)" for t in threads) + " |",
           "|---|---|---|---|" + "---|" * len(threads)]  # fmt: skip
    for cell, name, sparsity, batch, least in TARGETS:
        cells = []
        for t in threads:
            r = find.get((cell, name, sparsity, batch, t))
            cells.append("—" if r is None else f"{_own(r):.2f}x" + ("" if _own(r) >= least else " **missed**"))
        out.append(f"| {name} | {sparsity:.0%} | {batch} | >= {least:g}x | " + " | ".join(cells) + " |")
    out += ["", "| layer | sparsity | rows | threads | dense ms | own ms | own | torch.sparse (layout) | limit | "
            "own GFLOPS (dense) | other cores |", "|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in (r for r in rows if r["cell"] == "layers"):
        ms, g = r["ms"], r["gflops"]
        out.append(f"| {r['name']} | {r['sparsity']:.0%} | {r['batch']} | {r['threads']} | {ms['dense']:.3f} | "
                   f"{ms['own']:.3f} | {r['speedup']['own']:.2f}x | {r['speedup']['torch']:.2f}x "
                   f"({r['torch_layout']}) | {r['limit']:.0f}x | {g['own']:.0f} ({g['dense']:.0f}) | "
                   f"{r.get('alone', {}).get('other_cores', '?')} |")  # fmt: skip
    out += [
        "",
        "| threads | dense NCHW ms | dense channels-last ms | own ms (channels-last input) | own ms (NCHW "
        "input) | own against dense NCHW / channels-last | NCHW input |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in (r for r in rows if r["cell"] == "conv"):
        ms = r["ms"]
        out.append(f"| {r['threads']} | {ms['dense']:.2f} | {ms['dense_channels_last']:.2f} | {ms['own']:.2f} | "
                   f"{ms['own_nchw_input']:.2f} | {r['speedup']['own']:.2f}x / {r['speedup_vs_channels_last']:.2f}x "
                   f"| {r['speedup']['own_nchw_input']:.2f}x |")  # fmt: skip
    out += ["", "| model | batch | threads | dense ms | block-sparse ms | speedup | limit | share of limit | "
            "other cores |", "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    models = [r for r in rows if r["cell"] == "models"]
    for r in models:
        ms = r["ms"]
        cl = f" (channels-last {ms['dense_channels_last']:.1f})" if "dense_channels_last" in ms else ""
        vs = f" ({r['speedup_vs_channels_last']:.2f}x)" if "speedup_vs_channels_last" in r else ""
        out.append(f"| {r['name']} | {r['batch']} | {r['threads']} | {ms['dense']:.1f}{cl} | {ms['block_sparse']:.1f} "
                   f"| {r['speedup']:.2f}x{vs} | {r['limit']:.2f}x | {r['share_of_limit']:.0%} | "
                   f"{r.get('alone', {}).get('other_cores', '?')} |")  # fmt: skip
    out += [
        "",
        "| model | batch | weights MB dense / block-sparse | file MB dense / block-sparse | resident MB after "
        "loading, dense / block-sparse | added by the forward, dense / block-sparse |",
        "|---|---|---|---|---|---|",
    ]
    mb = lambda v: f"{v / 1e6:.1f}"  # noqa: E731
    for r in (r for r in models if r["threads"] == threads[0]):
        tb, fb, pm = r["tensor_bytes"], r["file_bytes"], r.get("peak_memory")
        mem = "— | —"
        if pm:
            d, s = pm["dense"], pm["block_sparse"]
            mem = (f"{mb(d['rss_loaded'])} / {mb(s['rss_loaded'])} | {mb(d['rss_peak_forward'] - d['rss_loaded'])} / "
                   f"{mb(s['rss_peak_forward'] - s['rss_loaded'])}")  # fmt: skip
        out.append(
            f"| {r['name']} | {r['batch']} | {mb(tb['dense'])} / {mb(tb['block_sparse'])} | "
            f"{mb(fb['dense'])} / {mb(fb['block_sparse'])} | {mem} |"
        )
    out += ["", "| model | batch | dense: ms per module kind (one thread) | block-sparse |", "|---|---|---|---|"]
    for r in (r for r in models if r["threads"] == threads[0] and "breakdown_ms_1_thread" in r):
        parts = [
            ", ".join(f"{k} {v:.1f}" for k, v in sorted(b.items(), key=lambda kv: -kv[1]) if v >= 0.05)
            for b in (r["breakdown_ms_1_thread"]["dense"], r["breakdown_ms_1_thread"]["block_sparse"])
        ]
        out.append(f"| {r['name']} | {r['batch']} | {parts[0]} | {parts[1]} |")
    rule = [r for r in rows if r["cell"] == "rule"]
    if rule:
        out += ["", "| layer | zero blocks | " + " | ".join(f"{n} rows, {t}t" for n in (1, 4, 32, 256) for t in threads)
                + " |", "|---|---|" + "---|" * (4 * len(threads))]  # fmt: skip
        for name, sparsity in dict.fromkeys((r["name"], r["sparsity"]) for r in rule):
            cells = [find.get(("rule", name, sparsity, n, t)) for n in (1, 4, 32, 256) for t in threads]
            out.append(f"| {name} | {sparsity:.0%} | " + " | ".join("—" if c is None else f"{_own(c):.2f}x"
                                                                     for c in cells) + " |")  # fmt: skip
    fallback = [r for r in rows if r["cell"] == "fallback"]
    if fallback:
        out += [
            "",
            "| convolution (torch.sparse, 90%, one thread) | batch | dense ms | csr | bsr |",
            "|---|---|---|---|---|",
        ]
        for r in fallback:
            out.append(f"| {r['name']} | {r['batch']} | {r['ms']['dense']:.1f} | {r['speedup']['csr']:.2f}x | "
                       f"{r['speedup']['bsr']:.2f}x |")  # fmt: skip
    coverage = [r for r in rows if r["cell"] == "coverage"]
    if coverage:
        out.append("")
        for r in coverage:
            listed = lambda counts: "; ".join(f"{k} x{v}" for k, v in counts.items()) or "none"  # noqa: E731
            out.append(f"* **{r['name']}** (batch of {r['batch']} rows): exported {listed(r['exported'])}. Dense: "
                       f"{listed(r['dense'])}.")  # fmt: skip
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="layers at 90%% and the convolution, one thread")
    p.add_argument("--cells", nargs="+", default=["layers", "conv", "models"],
                   choices=["layers", "conv", "models", "rule", "coverage", "fallback"])  # fmt: skip
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--sparsities", type=float, nargs="+", default=[0.9, 0.95])
    p.add_argument("--rows", type=int, nargs="+", default=[1, 32, 256])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 32], help="model batches")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--rule-sparsities", type=float, nargs="+", default=[0.1, 0.2, 0.3, 0.5])
    p.add_argument("--memory", action="store_true", help="peak memory of each model in a fresh process")
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--report", action="store_true", help="print the tables of docs/results.md section 3 from --out")
    args = p.parse_args(argv)
    if args.report:
        print(report(args.out))
        return 0
    logging.getLogger("sapp_lightning.export").setLevel(logging.WARNING)  # the export summary, once per call
    if args.quick:
        global TRIES
        TRIES = 1
        args.cells, args.sparsities, args.threads, args.repeats = ["layers", "conv"], [0.9], [1], 3
    rows: list[dict[str, Any]] = []
    if "layers" in args.cells:
        rows += layer_cells(args.sparsities, args.rows, args.threads, args.repeats)
    if "conv" in args.cells:
        rows += conv_cell(args.threads, args.repeats)
    if "fallback" in args.cells:
        rows += fallback_cells(args.repeats)
    if "coverage" in args.cells:
        rows += coverage_cells()
    if "rule" in args.cells:
        rows += rule_cells(args.threads, max(5, args.repeats // 2), args.rule_sparsities)
    if "models" in args.cells:
        rows += model_cells(args.models, args.batches, args.threads, max(3, args.repeats // 3), args.memory)
    meta = {"machine": machine(), "block": BLOCK}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(merge(args.out, rows, meta), indent=2))
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
