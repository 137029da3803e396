"""Block-sparse export: exact outputs (Linear, its subclasses, GPT-2's Conv1D, a ViT), the kernel rules (own
kernel; torch.sparse without a compiler), the summary of what stayed dense and why, index dtypes and file sizes,
save/load round trips, error messages. Kernels: test_export_kernels.py; convolutions and attention:
test_export_layers.py; the command: test_export_cli.py."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import torchvision
import transformers  # a test dependency ([dev]), never one of sapp_lightning
from export_utils import disable_own_kernel, torch_sparse_only, zero_blocks_  # noqa: F401 (a fixture)
from torch import nn

from sapp_lightning import BlockPruning
from sapp_lightning.export import (
    FORMAT,
    BlockSparseConv2d,
    BlockSparseLinear,
    BlockSparseMultiheadAttention,
    kernel_rule,
    layout_rule,
    load_block_sparse,
    save_block_sparse,
    to_block_sparse,
    zero_block_fraction,
)


def _block_sparse_(linear: nn.Linear, block: int, keep_every: int) -> None:
    """Zero all but every ``keep_every``-th block of ``linear`` (a committed model's pattern)."""
    out_features, in_features = linear.weight.shape
    grid = torch.arange((out_features // block) * (in_features // block)).reshape(out_features // block, -1)
    keep = (grid % keep_every == 0).repeat_interleave(block, 0).repeat_interleave(block, 1)
    with torch.no_grad():
        linear.weight.mul_(keep)


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 32), nn.ReLU(), nn.Linear(32, 3))
    _block_sparse_(net[0], 8, keep_every=10)  # 90% zero blocks
    _block_sparse_(net[2], 8, keep_every=2)  # 50%
    return net


@pytest.mark.parametrize("layout", ["own", "bsr", "csr", "auto"])
def test_outputs_match_the_dense_model(layout):
    net = _net()
    sparse = to_block_sparse(net, block_size=8, min_sparsity=0.5, layout=layout)
    assert isinstance(sparse[0], BlockSparseLinear)
    assert isinstance(sparse[2], BlockSparseLinear)  # 50% zero blocks: the own kernel beats dense from 20%
    assert type(sparse[4]) is nn.Linear  # 4 x 6 blocks of 8, none zero
    assert type(net[0]) is nn.Linear  # not in place by default
    for shape in [(7, 64), (2, 5, 64), (1, 64), (64,)]:
        x = torch.randn(shape)
        torch.testing.assert_close(sparse(x), net(x))
    assert sparse[0].layout == sparse[2].layout == ("own" if layout == "auto" else layout)


@pytest.mark.usefixtures("torch_sparse_only")
def test_without_a_compiler_auto_follows_the_torch_sparse_rule():
    net = _net()
    sparse = to_block_sparse(net, block_size=8, min_sparsity=0.5)
    assert sparse[0].layout == "bsr"  # 90% zero blocks of 8 at batch 32: padded BSR
    assert type(sparse[2]) is nn.Linear  # 50% zero blocks: the rule keeps it dense, and says so
    assert "under 80%" in sparse.block_sparse_summary["2"].reason
    assert sparse.block_sparse_summary["0"].reason.endswith("(torch.sparse: the own kernel is not built)")
    x = torch.randn(7, 64)
    torch.testing.assert_close(sparse(x), net(x))


@pytest.mark.usefixtures("torch_sparse_only")
def test_an_own_kernel_model_runs_on_torch_sparse_where_the_kernel_is_missing():
    """A file exported where the kernel was built, loaded on a machine without a compiler."""
    net = _net()
    sparse = to_block_sparse(net, block_size=8, min_sparsity=0.5, layout="own")
    assert sparse[0].layout == "own"
    for rows in (1, 7):
        x = torch.randn(rows, 64)
        torch.testing.assert_close(sparse(x), net(x))


def test_layer_not_sparse_enough_stays_dense():
    net = _net()
    sparse = to_block_sparse(net, block_size=8, min_sparsity=0.8)
    assert isinstance(sparse[0], BlockSparseLinear)
    assert type(sparse[2]) is nn.Linear  # 50% < 80%
    assert sparse.block_sparse_summary["2"].reason == "50.0% zero blocks, under min_sparsity=80%"


def test_nothing_sparse_warns_and_leaves_the_model():
    net = nn.Sequential(nn.Linear(16, 16))
    with pytest.warns(UserWarning, match="no layer became block-sparse"):
        out = to_block_sparse(net, block_size=4)
    assert type(out[0]) is nn.Linear


@pytest.mark.parametrize("layout", ["own", "bsr"])
def test_save_load_round_trip(tmp_path, layout):
    net = _net()
    sparse = to_block_sparse(net, block_size=8, min_sparsity=0.5, layout=layout)
    path = tmp_path / "model.pt"
    save_block_sparse(sparse, path)
    torch.manual_seed(1)
    fresh = nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 32), nn.ReLU(), nn.Linear(32, 3))
    loaded = load_block_sparse(path, fresh)
    assert isinstance(loaded[0], BlockSparseLinear) and loaded[0].layout == layout
    assert loaded.block_sparse_summary == sparse.block_sparse_summary
    x = torch.randn(4, 64)
    torch.testing.assert_close(loaded(x), net(x))
    torch.testing.assert_close(loaded[0].to_dense_linear().weight, net[0].weight)


def test_edge_blocks_run_on_the_own_kernel_and_force_csr_on_torch_sparse(monkeypatch):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(62, 20))
    with torch.no_grad():
        net[0].weight[:, 8:] = 0  # blocks of 8 do not tile 62 x 20; 3 of 24 blocks kept
    x = torch.randn(3, 62)
    sparse = to_block_sparse(net, block_size=8, min_sparsity=0.5)
    assert sparse[0].layout == "own" and sparse[0].matrix.nonzero_blocks == 3
    torch.testing.assert_close(sparse(x), net(x))
    disable_own_kernel(monkeypatch)
    sparse = to_block_sparse(net, block_size=8, min_sparsity=0.5)
    assert sparse[0].layout == "csr"
    assert sparse.block_sparse_summary["0"].reason.startswith("edge blocks force CSR; batch 32: CSR")
    torch.testing.assert_close(sparse(x), net(x))
    with pytest.raises(ValueError, match="tile the weight"):
        to_block_sparse(net, block_size=8, min_sparsity=0.5, layout="bsr")


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda net: to_block_sparse(net, block_size=8, min_sparsity=1.5), "min_sparsity"),
        (lambda net: to_block_sparse(net, block_size=8, layout="coo"), "layout"),
        (lambda net: to_block_sparse(net, block_size=0), "block_size"),
        (lambda net: save_block_sparse(net, "unused.pt"), "no block-sparse layer"),
        (lambda net: to_block_sparse(net, block_size=8, batch_size=0), "batch_size"),
        (lambda net: to_block_sparse(net.double(), block_size=8, layout="own"), "layout 'own' takes float32"),
        (lambda net: to_block_sparse(net, block_size=(8, 4), layout="bsr"), "needs square blocks"),
    ],
    ids=["min_sparsity", "layout", "block_size", "nothing_to_save", "batch_size", "own_float64", "bsr_square"],
)
def test_each_error_message(call, match):
    with pytest.raises(ValueError, match=match):
        call(_net())


def test_load_into_another_architecture_is_refused(tmp_path):
    path = tmp_path / "model.pt"
    save_block_sparse(to_block_sparse(_net(), block_size=8), path)
    other = nn.Sequential(nn.Linear(64, 40), nn.ReLU(), nn.Linear(40, 32), nn.ReLU(), nn.Linear(32, 3))
    with pytest.raises(ValueError, match="build the same architecture"):
        load_block_sparse(path, other)
    torch.save({"x": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a block-sparse model"):
        load_block_sparse(tmp_path / "other.pt", _net())


class _Model(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 1))

    def training_step(self, batch, _):
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_export_after_block_pruning():
    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(64, 64), torch.randn(64, 1))
    model = _Model()
    pruning = BlockPruning("sapp", sparsity=0.9, block_size=8, min_blocks=16)
    kwargs = dict(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer = pl.Trainer(max_epochs=2, callbacks=[pruning], **kwargs)
    trainer.fit(model, torch.utils.data.DataLoader(data, batch_size=8))
    sparse = to_block_sparse(model.net, block_size=8, min_sparsity=0.7, batch_size=5)
    assert isinstance(sparse[0], BlockSparseLinear) and type(sparse[2]) is nn.Linear
    assert sparse[0].layout == "own"  # 90% zero blocks: the own kernel (torch.sparse's rule gave CSR here)
    x = torch.randn(5, 64)
    with torch.no_grad():
        torch.testing.assert_close(sparse(x), model.net(x))


class _Mask(nn.Module):
    def forward(self, weight):
        return weight


def test_uncommitted_model_is_refused():
    net = _net()
    torch.nn.utils.parametrize.register_parametrization(net[0], "weight", _Mask())  # what fit leaves before commit
    with pytest.raises(ValueError, match="not committed"):
        to_block_sparse(net, block_size=8)


# --- what gets exported ---------------------------------------------------------------------------------
class _Subclass(nn.Linear):
    """An nn.Linear subclass that keeps its forward (as NonDynamicallyQuantizableLinear, or a library's tag)."""


class _Scaled(nn.Linear):
    def forward(self, x):
        return 2 * super().forward(x)


def test_a_linear_subclass_is_exported_and_one_with_its_own_forward_stays_dense():
    torch.manual_seed(0)
    net = nn.Sequential(_Subclass(64, 64), nn.ReLU(), _Scaled(64, 64))
    for layer in (net[0], net[2]):
        zero_blocks_(layer, 16, 0.9)
    sparse = to_block_sparse(net, block_size=16, batch_size=1)
    assert isinstance(sparse[0], BlockSparseLinear) and sparse[0].layout == "own"
    assert type(sparse[2]) is _Scaled
    assert sparse.block_sparse_summary["2"].reason == "_Scaled overrides nn.Linear.forward"
    x = torch.randn(1, 64)
    torch.testing.assert_close(sparse(x), net(x))


def gpt2(seed: int = 0) -> transformers.GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = transformers.GPT2Config(
        vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0
    )
    return transformers.GPT2LMHeadModel(config).eval()


def committed_gpt2() -> transformers.GPT2LMHeadModel:
    model = gpt2()
    for module in model.modules():
        if type(module).__name__ == "Conv1D":
            zero_blocks_(module, 8, 0.9)
    return model


CONV1D = [f"transformer.h.{i}.{part}" for i in range(2) for part in ("attn.c_attn", "attn.c_proj", "mlp.c_fc",
          "mlp.c_proj")]  # fmt: skip


@pytest.mark.parametrize("layout", ["auto", "csr"])
def test_gpt2_conv1d_layers_export_and_the_logits_match(layout):
    model = committed_gpt2()
    ids = torch.randint(64, (2, 16), generator=torch.Generator().manual_seed(1))
    sparse = to_block_sparse(model, block_size=8, layout=layout, batch_size=32)  # 2 sequences of 16 tokens
    summary = sparse.block_sparse_summary
    assert [c.name for c in summary.exported] == CONV1D
    for name in CONV1D:
        module = sparse.get_submodule(name)
        assert isinstance(module, BlockSparseLinear) and module.source == "hf_conv1d"
        assert module.layout == ("own" if layout == "auto" else "csr")
        conv = model.get_submodule(name)  # weight (in, out): the sparse matrix is its transpose
        torch.testing.assert_close(module.to_dense_linear().weight, conv.weight.t())
        assert summary[name].zero_fraction == pytest.approx(zero_block_fraction(conv.weight, 8, kind="hf_conv1d"))
    assert summary["lm_head"].reason == "tied with transformer.wte.weight"
    assert summary["transformer.wte"].reason.startswith("no sparse kernel for Embedding")
    with torch.no_grad():
        torch.testing.assert_close(sparse(input_ids=ids).logits, model(input_ids=ids).logits)


@pytest.mark.parametrize("layout", ["own", "bsr", "csr"])
def test_gpt2_save_load_round_trip(tmp_path, layout):
    model = committed_gpt2()
    path = tmp_path / "gpt2.pt"
    save_block_sparse(to_block_sparse(model, block_size=8, layout=layout), path)
    loaded = load_block_sparse(path, gpt2(seed=1))  # a fresh model with other weights
    for name in CONV1D:
        layer = loaded.get_submodule(name)
        assert isinstance(layer, BlockSparseLinear) and layer.source == "hf_conv1d" and layer.layout == layout
        assert layer.matrix.index_dtype == torch.int32
    ids = torch.randint(64, (1, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
    with pytest.raises(ValueError, match="Conv1D layer there: build the same architecture"):
        load_block_sparse(path, gpt2_with_linear())


def gpt2_with_linear() -> nn.Module:
    """The tiny GPT-2 with its first Conv1D swapped for an nn.Linear of the same shape (another architecture)."""
    model = gpt2()
    model.transformer.h[0].attn.c_attn = nn.Linear(32, 96)
    return model


def vit() -> torchvision.models.VisionTransformer:
    torch.manual_seed(0)
    model = torchvision.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64, num_classes=10
    )
    nn.init.normal_(model.heads.head.weight)  # torchvision starts it at zero
    for module in model.modules():
        if isinstance(module, nn.Linear | nn.Conv2d):
            zero_blocks_(module, 8, 0.9)
        if isinstance(module, nn.MultiheadAttention):
            zero_blocks_(module, 8, 0.9, "in_proj_weight")
    return model.eval()


def test_vit_exports_every_pruned_weight_attention_and_patch_embedding_included():
    """Before the own kernel: conv_proj and MultiheadAttention's projections stayed dense (no sparse kernel)."""
    model = vit()
    images = torch.randn(2, 3, 32, 32)
    sparse = to_block_sparse(model, block_size=8, batch_size=2 * 17)  # 16 patches and the class token
    summary = sparse.block_sparse_summary
    block = "encoder.layers.encoder_layer_0"
    assert not summary.dense  # every weight: 90% zero blocks
    assert {c.layout for c in summary.choices} == {"own"}
    assert isinstance(sparse.encoder.layers[0].self_attention, BlockSparseMultiheadAttention)
    assert isinstance(sparse.conv_proj, BlockSparseConv2d)  # 8x8 patches of 3 channels: 192 x 32
    assert summary["heads.head"].num_blocks == 4 * 2  # 32 -> 10: edge blocks (the own kernel takes them)
    assert {f"{block}.self_attention.in_proj_weight", f"{block}.self_attention.out_proj"} <= set(
        c.name for c in summary.exported
    )
    with torch.no_grad():
        torch.testing.assert_close(sparse(images), model(images))


def test_why_multihead_attention_cannot_use_a_sparse_out_proj():
    """Why BlockSparseMultiheadAttention exists: MultiheadAttention hands out_proj.weight to its fused kernel."""
    mha = nn.MultiheadAttention(32, 2, batch_first=True).eval()
    zero_blocks_(mha.out_proj, 8, 0.9)
    mha.out_proj = BlockSparseLinear.from_linear(mha.out_proj, "csr")
    x = torch.randn(2, 5, 32)
    with torch.no_grad(), pytest.raises((NotImplementedError, AttributeError)):
        mha(x, x, x, need_weights=False)


# --- the summary: one test per reason a layer stays dense --------------------------------------------------
class _Everything(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(16, 32)
        self.reflect = nn.Conv2d(32, 32, 3, padding=1, padding_mode="reflect")
        self.depthwise = nn.Conv2d(32, 32, 3, groups=32)
        self.attn = nn.MultiheadAttention(32, 2, batch_first=True)
        self.attn2 = nn.Linear(32, 32)  # no zero blocks
        self.cross = nn.MultiheadAttention(32, 2, kdim=16, vdim=16, batch_first=True)
        self.sparse = nn.Linear(32, 32)  # 94% zero blocks
        self.mid = nn.Linear(32, 32)  # 50%
        self.low = nn.Linear(32, 32)  # 12.5%
        self.edge = nn.Linear(36, 32)  # 85%, blocks of 8 do not tile 36
        self.skip = nn.Linear(32, 32)  # 90%
        self.head = nn.Linear(32, 16, bias=False)
        self.head.weight = self.embed.weight  # tied

    def forward(self, ids):  # not run: the summary needs the modules only
        raise NotImplementedError


def _everything() -> _Everything:
    torch.manual_seed(0)
    model = _Everything()
    for name, sparsity in [("sparse", 0.95), ("mid", 0.5), ("low", 0.15), ("edge", 0.85), ("skip", 0.9)]:
        zero_blocks_(getattr(model, name), 8, sparsity)
    for name in ("reflect", "attn.out_proj", "cross.out_proj"):
        zero_blocks_(model.get_submodule(name), 8, 0.9)
    zero_blocks_(model.attn, 8, 0.9, "in_proj_weight")
    return model


@pytest.mark.parametrize(
    "kwargs, layer, reason",
    [
        ({}, "embed", "no sparse kernel for Embedding (a table lookup, not a product)"),
        ({}, "reflect", "no sparse kernel: padding_mode='reflect': the kernel pads with zeros"),
        ({}, "depthwise", "depthwise convolution"),
        ({}, "cross.q_proj_weight", "separate Q/K/V projection weights"),
        ({}, "cross.out_proj", "its MultiheadAttention stays as it is"),
        ({"min_sparsity": 0.6}, "mid", "50.0% zero blocks, under min_sparsity=60%"),
        ({}, "low", "12.5% zero blocks: dense is as fast under 20%"),
        ({}, "attn2", "no zero blocks"),
        ({"exclude": "skip"}, "skip", "excluded"),
        ({"include": "sparse"}, "skip", "not included"),
        ({"min_blocks": 17}, "skip", "16 blocks, under min_blocks=17"),
        ({}, "head", "tied with embed.weight"),
    ],
    ids=["embedding", "padding_mode", "depthwise", "kdim", "mha_out_proj", "min_sparsity", "rule", "no_zeros",
         "excluded", "not_included", "min_blocks", "tied"],
)  # fmt: skip
def test_the_summary_names_each_dense_layer_with_its_reason(kwargs, layer, reason):
    sparse = to_block_sparse(_everything(), block_size=8, **kwargs)
    summary = sparse.block_sparse_summary
    assert summary[layer].reason.startswith(reason) and not summary[layer].exported
    assert {"sparse", "edge"} & {c.name for c in summary.exported}  # something is exported, whatever the kwargs
    text = summary.format()
    assert all(line.startswith(("layer", *(c.name for c in summary.choices))) for line in text.splitlines())
    assert f"{summary[layer].name}" in text and reason[:30] in text


@pytest.mark.usefixtures("torch_sparse_only")
def test_the_summary_of_the_torch_sparse_rule_says_why_a_layer_stays_dense():
    sparse = to_block_sparse(_everything(), block_size=8, batch_size=1)
    summary = sparse.block_sparse_summary
    assert summary["edge"].reason.startswith(
        "edge blocks force CSR; batch 1: CSR needs 90% zero blocks to beat dense (85.0%"
    )
    assert summary["mid"].reason.startswith("50.0% zero blocks: under 80%, no sparse layout beats dense")
    assert summary["sparse"].layout == "csr"  # blocks of 8 at batch 1: CSR (94% zero blocks is enough)


def test_the_summary_lists_each_exported_layer_and_is_logged(caplog):
    with caplog.at_level("INFO", logger="sapp_lightning.export"):
        sparse = to_block_sparse(_everything(), block_size=8, batch_size=1)
    summary = sparse.block_sparse_summary
    row = summary["sparse"]
    assert (row.layout, row.blocksize, row.nonzero_blocks, row.num_blocks) == ("own", (8, 8), 1, 16)
    assert row.index_dtype == "int32"
    assert summary["attn.in_proj_weight"].exported and summary["attn.out_proj"].exported  # 94% and 90%
    assert isinstance(sparse.attn, BlockSparseMultiheadAttention)
    assert "sparse  " in caplog.text and "why / note" in caplog.text
    assert summary.to_dict()["layers"][0]["name"] == "embed"


def test_a_half_precision_layer_on_cpu_stays_dense_with_its_reason():
    net = _net().to(torch.bfloat16)
    sparse = to_block_sparse(nn.Sequential(net[0], nn.ReLU(), _net()[0]), block_size=8)
    assert sparse.block_sparse_summary["0"].reason == (
        "torch.bfloat16: the CPU kernels take float32 (own) or float32/64 (torch.sparse)"
    )
    assert isinstance(sparse[2], BlockSparseLinear)


def test_a_float64_model_runs_on_torch_sparse():
    net = _net().double()
    sparse = to_block_sparse(net, block_size=8)
    assert sparse[0].layout == "bsr"  # the own kernel takes float32; torch.sparse's rule at batch 32
    assert sparse.block_sparse_summary["0"].reason.endswith("(torch.sparse: the own kernel takes float32)")
    x = torch.randn(5, 64, dtype=torch.float64)
    torch.testing.assert_close(sparse(x), net(x))


# --- the rules -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "batch, zero, expected", [(1, 0.9, "own"), (32, 0.2, "own"), (256, 0.5, "own"), (32, 0.19, None), (1, 0.0, None)]
)
def test_the_kernel_rule(batch, zero, expected):
    assert kernel_rule(batch, zero)[0] == expected


@pytest.mark.parametrize(
    "batch, blocksize, zero, expected",
    [
        (1, (16, 16), 0.9, "bsr"),  # few rows, big blocks: MKL's BSR kernel
        (2, (32, 32), 0.8, "bsr"),
        (8, (16, 16), 0.9, "csr"),
        (256, (32, 32), 0.95, "csr"),
        (1, (8, 8), 0.9, "csr"),  # small blocks, few rows
        (1, (8, 8), 0.85, None),  # ... under 90%: dense's GEMV wins
        (16, (8, 8), 0.8, "bsr"),  # small blocks from 16 rows: padded BSR
        (256, (8, 8), 0.9, "bsr"),
        (64, (16, 16), 0.7, None),  # under 80% zero blocks: dense
        (1, None, 0.95, "csr"),  # edge blocks: CSR only
        (64, None, 0.9, "csr"),
    ],
)
def test_the_layout_rule(batch, blocksize, zero, expected):
    assert layout_rule(batch, blocksize, zero)[0] == expected
    assert layout_rule(batch, blocksize, zero) == layout_rule(batch, blocksize, zero)


@pytest.mark.parametrize("own", [True, False], ids=["own", "torch_sparse"])
def test_auto_layout_is_deterministic_and_follows_the_batch(own, monkeypatch):
    net = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64))
    torch.manual_seed(0)
    for layer in (net[0], net[2]):
        zero_blocks_(layer, 16, 0.9)
    if not own:
        disable_own_kernel(monkeypatch)
    for batch, layout in [(1, "own" if own else "bsr"), (64, "own" if own else "csr")]:
        first, second = (to_block_sparse(net, block_size=16, batch_size=batch) for _ in range(2))
        assert first.block_sparse_summary == second.block_sparse_summary
        assert first[0].layout == first[2].layout == layout
        x = torch.randn(batch, 64)
        torch.testing.assert_close(first(x), net(x))


def test_bsr_pads_a_batch_that_is_not_a_multiple_of_16():
    layer = nn.Linear(64, 32)
    zero_blocks_(layer, 8, 0.75)
    sparse = BlockSparseLinear.from_linear(layer, "bsr", (8, 8))
    for rows in (1, 3, 5, 16, 17, 40):
        x = torch.randn(rows, 64)
        torch.testing.assert_close(sparse(x), layer(x))


def test_sample_batch_still_works_as_the_former_name_of_batch_size():
    with pytest.warns(DeprecationWarning, match="batch_size"):
        sparse = to_block_sparse(_net(), block_size=8, sample_batch=1)
    assert sparse.block_sparse_summary.batch_size == 1


# --- storage -----------------------------------------------------------------------------------------------
def _three_1024(block: int = 16, sparsity: float = 0.9) -> nn.Sequential:
    torch.manual_seed(0)
    net = nn.Sequential(*[nn.Linear(1024, 1024) for _ in range(3)])
    for layer in net:
        zero_blocks_(layer, block, sparsity)
    return net


@pytest.mark.parametrize(
    "layout, indices, at_most",
    [
        ("csr", {"crow_indices": torch.int32, "col_indices": torch.int16}, 0.16),
        ("bsr", {"crow_indices": torch.int16, "col_indices": torch.uint8}, 0.11),
        ("own", {"ptr": torch.int16, "rows": torch.uint8}, 0.11),
    ],
)
def test_indices_are_saved_in_the_smallest_type_and_loaded_as_int32(tmp_path, layout, indices, at_most):
    net = _three_1024()
    torch.save(net.state_dict(), tmp_path / "dense.pt")
    save_block_sparse(to_block_sparse(net, block_size=16, layout=layout), tmp_path / "sparse.pt")
    saved = torch.load(tmp_path / "sparse.pt", weights_only=True)["sparse_layers"]["0"]["matrix"]
    # CSR: column < 1024, 104960 nonzeros; BSR and own: block column or row < 64, 410 blocks
    assert {name: saved[name].dtype for name in indices} == indices
    ratio = os.path.getsize(tmp_path / "sparse.pt") / os.path.getsize(tmp_path / "dense.pt")
    assert ratio < at_most  # before format 2: CSR 6.34 MB (0.50 of dense: int64, twice the storage), BSR 0.10
    loaded = load_block_sparse(tmp_path / "sparse.pt", nn.Sequential(*[nn.Linear(1024, 1024) for _ in range(3)]))
    assert loaded[0].matrix.index_dtype == torch.int32
    x = torch.randn(4, 1024)
    torch.testing.assert_close(loaded(x), net(x), rtol=1e-4, atol=1e-4)


def _old_format_parts(module: BlockSparseLinear, version: int) -> dict:
    """The parts of a BSR layer as formats 1 (int64 indices, no "source") and 2 stored them."""
    m = module.matrix.parts()
    parts = {"layout": m["kernel"], "shape": [m["fan_out"], m["fan_in"]], "crow_indices": m["crow_indices"],
             "col_indices": m["col_indices"], "values": m["values"], "bias": module.bias}  # fmt: skip
    if version == 1:
        parts["crow_indices"], parts["col_indices"] = parts["crow_indices"].long(), parts["col_indices"].long()
    else:
        parts["source"] = module.source
    return parts


@pytest.mark.parametrize("version", [1, 2])
def test_a_file_of_an_earlier_format_still_loads(tmp_path, version):
    net = _net()
    sparse = to_block_sparse(net, block_size=8, layout="bsr")
    parts = {name: _old_format_parts(sparse.get_submodule(name), version) for name in ("0", "2")}
    path = tmp_path / "old.pt"
    torch.save({"format": f"sapp_lightning.block_sparse/{version}", "sparse_layers": parts,
                "state_dict": sparse.state_dict()}, path)  # fmt: skip
    assert FORMAT == "sapp_lightning.block_sparse/3"
    loaded = load_block_sparse(path, _net())
    assert loaded[0].layout == "bsr"
    x = torch.randn(3, 64)
    torch.testing.assert_close(loaded(x), net(x))


def test_a_file_of_a_newer_format_is_refused_with_its_version(tmp_path):
    path = tmp_path / "model.pt"
    save_block_sparse(to_block_sparse(_net(), block_size=8), path)
    saved = torch.load(path, weights_only=True)
    torch.save({**saved, "format": "sapp_lightning.block_sparse/4"}, path)
    with pytest.raises(ValueError, match=r"written by a newer sapp_lightning \(format sapp_lightning.block_sparse/4"):
        load_block_sparse(path, _net())


def test_the_readme_snippet_runs(tmp_path, monkeypatch):
    """The snippet of the README's "Run the pruned model"."""
    doc = Path(__file__).resolve().parents[1] / "README.md"
    blocks = re.findall(r"```python\n(.*?)```", doc.read_text(), flags=re.S)
    found = [b for b in blocks if "load_block_sparse(" in b]
    assert len(found) == 1
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(found[0], str(doc), "exec"), namespace)
    assert isinstance(namespace["restored"][0], BlockSparseConv2d)


@pytest.mark.usefixtures("torch_sparse_only")
def test_without_a_compiler_convolutions_stay_dense_and_attention_runs_on_torch_sparse():
    model = vit()
    sparse = to_block_sparse(model, block_size=8, batch_size=2 * 17)
    summary = sparse.block_sparse_summary
    assert summary["conv_proj"].reason.startswith("torch.sparse (the own kernel is not built")
    assert isinstance(sparse.encoder.layers[0].self_attention, BlockSparseMultiheadAttention)
    assert summary["encoder.layers.encoder_layer_0.self_attention.in_proj_weight"].layout == "bsr"
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(sparse(images), model(images))
