"""Block-sparse export: exact outputs (Linear, its subclasses, GPT-2's Conv1D, a ViT), the layout rule, the
summary of what stayed dense and why, index dtypes and file sizes, save/load round trips, error messages."""

from __future__ import annotations

import os

import pytest
import pytorch_lightning as pl
import torch
import torchvision
import transformers  # a test dependency ([dev]), never one of sapp_lightning
from torch import nn

from sapp_lightning import BlockPruning
from sapp_lightning.blocks import BlockLayout, keep_count
from sapp_lightning.export import (
    FORMAT,
    BlockSparseLinear,
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


@pytest.mark.parametrize("layout", ["bsr", "csr", "auto"])
def test_outputs_match_the_dense_model(layout):
    net = _net()
    sparse = to_block_sparse(net, block_size=8, min_sparsity=0.5, layout=layout)
    assert isinstance(sparse[0], BlockSparseLinear)
    if layout == "auto":  # 50% zero blocks: the rule keeps it dense, and says so
        assert type(sparse[2]) is nn.Linear
        assert "under 80%" in sparse.block_sparse_summary["2"].reason
    else:
        assert isinstance(sparse[2], BlockSparseLinear)
    assert type(sparse[4]) is nn.Linear  # 4 x 6 blocks of 8, none zero
    assert type(net[0]) is nn.Linear  # not in place by default
    for shape in [(7, 64), (2, 5, 64)]:
        x = torch.randn(shape)
        torch.testing.assert_close(sparse(x), net(x))
    if layout != "auto":
        assert sparse[0].layout == layout


def test_layer_not_sparse_enough_stays_dense():
    net = _net()
    sparse = to_block_sparse(net, block_size=8, min_sparsity=0.8)
    assert isinstance(sparse[0], BlockSparseLinear)
    assert type(sparse[2]) is nn.Linear  # 50% < 80%
    assert sparse.block_sparse_summary["2"].reason == "50.0% zero blocks, under min_sparsity=80%"


def test_nothing_sparse_warns_and_leaves_the_model():
    net = nn.Sequential(nn.Linear(16, 16))
    with pytest.warns(UserWarning, match="no nn.Linear layer"):
        out = to_block_sparse(net, block_size=4)
    assert type(out[0]) is nn.Linear


def test_save_load_round_trip(tmp_path):
    net = _net()
    sparse = to_block_sparse(net, block_size=8, min_sparsity=0.5, layout="bsr")
    path = tmp_path / "model.pt"
    save_block_sparse(sparse, path)
    torch.manual_seed(1)
    fresh = nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 32), nn.ReLU(), nn.Linear(32, 3))
    loaded = load_block_sparse(path, fresh)
    assert isinstance(loaded[0], BlockSparseLinear) and loaded[0].layout == "bsr"
    x = torch.randn(4, 64)
    torch.testing.assert_close(loaded(x), net(x))
    torch.testing.assert_close(loaded[0].to_dense_linear().weight, net[0].weight)


def test_edge_blocks_fall_back_to_csr():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(62, 20))
    with torch.no_grad():
        net[0].weight[:, 8:] = 0  # blocks of 8 do not tile 62 x 20; 3 of 24 blocks kept
    sparse = to_block_sparse(net, block_size=8, min_sparsity=0.5)
    assert sparse[0].layout == "csr"
    assert sparse.block_sparse_summary["0"].reason == "edge blocks force CSR; batch 32: CSR"
    x = torch.randn(3, 62)
    torch.testing.assert_close(sparse(x), net(x))
    with pytest.raises(ValueError, match="tile the weight"):
        to_block_sparse(net, block_size=8, min_sparsity=0.5, layout="bsr")


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda net: to_block_sparse(net, block_size=8, min_sparsity=1.5), "min_sparsity"),
        (lambda net: to_block_sparse(net, block_size=8, layout="coo"), "layout"),
        (lambda net: to_block_sparse(net, block_size=0), "block_size"),
        (lambda net: save_block_sparse(net, "unused.pt"), "no BlockSparseLinear"),
        (lambda net: to_block_sparse(net, block_size=8, batch_size=0), "batch_size"),
    ],
    ids=["min_sparsity", "layout", "block_size", "nothing_to_save", "batch_size"],
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
    assert sparse[0].layout == "csr"  # blocks of 8, 5 rows: the rule's CSR
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
def _zero_blocks_(module: nn.Module, block: int, sparsity: float, param_name: str = "weight") -> None:
    """Keep a random ``round((1 - sparsity) * N)`` of the N blocks of a Linear or Conv1D weight, as a committed
    model has them."""
    weight = getattr(module, param_name)
    kind = "hf_conv1d" if type(module).__name__ == "Conv1D" else "linear"
    layout = BlockLayout.for_weight(weight, block, kind=kind)
    mask = torch.zeros(layout.num_blocks)
    mask[torch.randperm(layout.num_blocks)[: keep_count(layout.num_blocks, sparsity)]] = 1
    with torch.no_grad():
        weight.mul_(layout.expand(mask.reshape(layout.grid_shape)))


class _Subclass(nn.Linear):
    """An nn.Linear subclass that keeps its forward (as NonDynamicallyQuantizableLinear, or a library's tag)."""


class _Scaled(nn.Linear):
    def forward(self, x):
        return 2 * super().forward(x)


def test_a_linear_subclass_is_exported_and_one_with_its_own_forward_stays_dense():
    torch.manual_seed(0)
    net = nn.Sequential(_Subclass(64, 64), nn.ReLU(), _Scaled(64, 64))
    for layer in (net[0], net[2]):
        _zero_blocks_(layer, 16, 0.9)
    sparse = to_block_sparse(net, block_size=16, batch_size=1)
    assert isinstance(sparse[0], BlockSparseLinear) and sparse[0].layout == "bsr"
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
            _zero_blocks_(module, 8, 0.9)
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
        assert module.layout == ("bsr" if layout == "auto" else "csr")  # blocks of 8, 32 rows: BSR
        conv = model.get_submodule(name)  # weight (in, out): the sparse matrix is its transpose
        torch.testing.assert_close(module.to_dense_linear().weight, conv.weight.t())
        assert summary[name].zero_fraction == pytest.approx(zero_block_fraction(conv.weight, 8, kind="hf_conv1d"))
    assert summary["lm_head"].reason == "tied with transformer.wte.weight"
    assert summary["transformer.wte"].reason.startswith("no sparse kernel for Embedding")
    with torch.no_grad():
        torch.testing.assert_close(sparse(input_ids=ids).logits, model(input_ids=ids).logits)


@pytest.mark.parametrize("layout", ["bsr", "csr"])
def test_gpt2_save_load_round_trip(tmp_path, layout):
    model = committed_gpt2()
    path = tmp_path / "gpt2.pt"
    save_block_sparse(to_block_sparse(model, block_size=8, layout=layout), path)
    loaded = load_block_sparse(path, gpt2(seed=1))  # a fresh model with other weights
    for name in CONV1D:
        layer = loaded.get_submodule(name)
        assert isinstance(layer, BlockSparseLinear) and layer.source == "hf_conv1d" and layer.layout == layout
        assert layer.weight.col_indices().dtype == torch.int32
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
        if isinstance(module, nn.Linear):
            _zero_blocks_(module, 8, 0.9)
        if isinstance(module, nn.MultiheadAttention):
            _zero_blocks_(module, 8, 0.9, "in_proj_weight")
    return model.eval()


def test_vit_exports_its_mlp_and_head_and_says_why_attention_stays_dense():
    model = vit()
    images = torch.randn(2, 3, 32, 32)
    sparse = to_block_sparse(model, block_size=8, batch_size=2 * 17)  # 16 patches and the class token
    summary = sparse.block_sparse_summary
    block = "encoder.layers.encoder_layer_0"
    assert {f"{block}.mlp.0", f"{block}.mlp.3", "heads.head"} <= {c.name for c in summary.exported}
    assert summary["heads.head"].layout == "csr"  # 32 -> 10: blocks of 8 do not tile
    assert summary["heads.head"].reason.startswith("edge blocks force CSR")
    assert summary[f"{block}.self_attention.out_proj"].reason.startswith("MultiheadAttention never calls out_proj")
    assert "fused attention" in summary[f"{block}.self_attention.in_proj_weight"].reason
    assert summary["conv_proj"].reason == "no sparse kernel for Conv2d (torch.sparse has no convolution)"
    with torch.no_grad():
        torch.testing.assert_close(sparse(images), model(images))


def test_why_multihead_attention_cannot_use_a_sparse_out_proj():
    """The check behind the out_proj reason: MultiheadAttention hands out_proj.weight to its fused kernel."""
    mha = nn.MultiheadAttention(32, 2, batch_first=True).eval()
    _zero_blocks_(mha.out_proj, 8, 0.9)
    mha.out_proj = BlockSparseLinear.from_linear(mha.out_proj, "csr")
    x = torch.randn(2, 5, 32)
    with torch.no_grad(), pytest.raises(NotImplementedError, match="_native_multi_head_attention"):
        mha(x, x, x, need_weights=False)


# --- the summary: one test per reason a layer stays dense --------------------------------------------------
class _Everything(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(16, 32)
        self.conv = nn.Conv2d(32, 32, 1)
        self.attn = nn.MultiheadAttention(32, 2, batch_first=True)
        self.sparse = nn.Linear(32, 32)  # 94% zero blocks
        self.mid = nn.Linear(32, 32)  # 50%
        self.edge = nn.Linear(36, 32)  # 85%, blocks of 8 do not tile 36
        self.skip = nn.Linear(32, 32)  # 90%
        self.head = nn.Linear(32, 16, bias=False)
        self.head.weight = self.embed.weight  # tied

    def forward(self, ids):  # not run: the summary needs the modules only
        raise NotImplementedError


def _everything() -> _Everything:
    torch.manual_seed(0)
    model = _Everything()
    for name, sparsity in [("sparse", 0.95), ("mid", 0.5), ("edge", 0.85), ("skip", 0.9)]:
        _zero_blocks_(getattr(model, name), 8, sparsity)
    return model


@pytest.mark.parametrize(
    "kwargs, layer, reason",
    [
        ({}, "embed", "no sparse kernel for Embedding (a table lookup, not a product)"),
        ({}, "conv", "no sparse kernel for Conv2d (torch.sparse has no convolution)"),
        ({}, "attn.in_proj_weight", "no sparse kernel: MultiheadAttention passes in_proj_weight to its fused"),
        ({}, "attn.out_proj", "MultiheadAttention never calls out_proj"),
        ({"min_sparsity": 0.6}, "mid", "50.0% zero blocks, under min_sparsity=60%"),
        ({}, "mid", "50.0% zero blocks: under 80%, no sparse layout beats dense"),
        ({"batch_size": 1}, "edge", "edge blocks force CSR; batch 1: CSR needs 90% zero blocks to beat dense (85.0%"),
        ({"exclude": "skip"}, "skip", "excluded"),
        ({"include": "sparse"}, "skip", "not included"),
        ({}, "head", "tied with embed.weight"),
    ],
    ids=["embedding", "conv", "mha_in_proj", "mha_out_proj", "min_sparsity", "rule", "edge_blocks", "excluded",
         "not_included", "tied"],
)  # fmt: skip
def test_the_summary_names_each_dense_layer_with_its_reason(kwargs, layer, reason):
    sparse = to_block_sparse(_everything(), block_size=8, **kwargs)
    summary = sparse.block_sparse_summary
    assert summary[layer].reason.startswith(reason) and not summary[layer].exported
    assert "sparse" in {c.name for c in summary.exported}
    assert isinstance(sparse.sparse, BlockSparseLinear)
    text = summary.format()
    assert all(line.startswith(("layer", *(c.name for c in summary.choices))) for line in text.splitlines())
    assert f"{summary[layer].name}" in text and reason[:30] in text


def test_the_summary_lists_each_exported_layer_and_is_logged(caplog):
    with caplog.at_level("INFO", logger="sapp_lightning.export"):
        sparse = to_block_sparse(_everything(), block_size=8, batch_size=1)
    row = sparse.block_sparse_summary["sparse"]
    # blocks of 8 at batch 1: CSR (94% zero blocks is enough)
    assert (row.layout, row.blocksize, row.nonzero_blocks, row.num_blocks) == ("csr", None, 1, 16)
    assert row.index_dtype == "int32"
    assert "sparse  " in caplog.text and "why dense / note" in caplog.text


def test_a_half_precision_layer_on_cpu_stays_dense_with_its_reason():
    net = _net().to(torch.bfloat16)
    sparse = to_block_sparse(nn.Sequential(net[0], nn.ReLU(), _net()[0]), block_size=8)
    assert sparse.block_sparse_summary["0"].reason == "torch.bfloat16: torch's CPU sparse kernels take float32/64"
    assert isinstance(sparse[2], BlockSparseLinear)


# --- the layout rule -------------------------------------------------------------------------------------
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


def test_auto_layout_is_deterministic_and_follows_the_batch():
    net = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64))
    torch.manual_seed(0)
    for layer in (net[0], net[2]):
        _zero_blocks_(layer, 16, 0.9)
    for batch, layout in [(1, "bsr"), (64, "csr")]:
        first, second = (to_block_sparse(net, block_size=16, batch_size=batch) for _ in range(2))
        assert first.block_sparse_summary == second.block_sparse_summary
        assert first[0].layout == first[2].layout == layout
        x = torch.randn(batch, 64)
        torch.testing.assert_close(first(x), net(x))


def test_bsr_pads_a_batch_that_is_not_a_multiple_of_16():
    layer = nn.Linear(64, 32)
    _zero_blocks_(layer, 8, 0.75)
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
        _zero_blocks_(layer, block, sparsity)
    return net


@pytest.mark.parametrize(
    "layout, crow, col, at_most", [("csr", torch.int32, torch.int16, 0.16), ("bsr", torch.int16, torch.uint8, 0.11)]
)
def test_indices_are_saved_in_the_smallest_type_and_loaded_as_int32(tmp_path, layout, crow, col, at_most):
    net = _three_1024()
    torch.save(net.state_dict(), tmp_path / "dense.pt")
    save_block_sparse(to_block_sparse(net, block_size=16, layout=layout), tmp_path / "sparse.pt")
    saved = torch.load(tmp_path / "sparse.pt", weights_only=True)["sparse_layers"]["0"]
    # CSR: column < 1024, 104960 nonzeros; BSR: block column < 64, 410 blocks
    assert (saved["crow_indices"].dtype, saved["col_indices"].dtype) == (crow, col)
    ratio = os.path.getsize(tmp_path / "sparse.pt") / os.path.getsize(tmp_path / "dense.pt")
    assert ratio < at_most  # before: CSR 6.34 MB (0.50 of dense: int64, twice the storage), BSR 0.10
    loaded = load_block_sparse(tmp_path / "sparse.pt", nn.Sequential(*[nn.Linear(1024, 1024) for _ in range(3)]))
    assert loaded[0].weight.crow_indices().dtype == loaded[0].weight.col_indices().dtype == torch.int32
    x = torch.randn(4, 1024)
    torch.testing.assert_close(loaded(x), net(x), rtol=1e-4, atol=1e-4)


def test_a_file_of_the_first_format_still_loads(tmp_path):
    net = _net()
    sparse = to_block_sparse(net, block_size=8, layout="bsr")
    parts = {name: sparse.get_submodule(name).parts() for name in ("0", "2")}
    for p in parts.values():  # format 1: int64 indices, no "source"
        p.pop("source")
        p["crow_indices"], p["col_indices"] = p["crow_indices"].long(), p["col_indices"].long()
    path = tmp_path / "v1.pt"
    torch.save({"format": "sapp_lightning.block_sparse/1", "sparse_layers": parts,
                "state_dict": sparse.state_dict()}, path)  # fmt: skip
    assert FORMAT != "sapp_lightning.block_sparse/1"
    loaded = load_block_sparse(path, _net())
    x = torch.randn(3, 64)
    torch.testing.assert_close(loaded(x), net(x))
