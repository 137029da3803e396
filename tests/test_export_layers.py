"""Exported convolutions and attention give the dense model's outputs: ``BlockSparseConv2d`` (kernel sizes, strides,
padding, dilation, channels-last or not, a residual network, depthwise-separable blocks), and
``BlockSparseMultiheadAttention`` against ``nn.MultiheadAttention`` in eval mode for every argument it takes,
inside ``nn.TransformerEncoder`` too; save and load for each."""

from __future__ import annotations

import pytest
import torch
from export_utils import zero_blocks_
from torch import nn

from sapp_lightning.export import (
    BlockSparseConv2d,
    BlockSparseLinear,
    BlockSparseMultiheadAttention,
    load_block_sparse,
    save_block_sparse,
    to_block_sparse,
)

KERNELS = ["own", "csr"]


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize(
    "kwargs",
    [
        {"kernel_size": 3, "padding": 1},
        {"kernel_size": 3, "stride": 2, "padding": 1, "bias": False},
        {"kernel_size": (3, 5), "dilation": 2, "padding": "same"},
        {"kernel_size": 2, "padding": "valid"},
        {"kernel_size": 1},
        {"kernel_size": 1, "stride": 2},
    ],
    ids=["3x3", "stride2_nobias", "3x5_dilated_same", "2x2_valid", "1x1", "1x1_stride2"],
)
def test_a_convolution_gives_the_dense_outputs(kwargs, kernel):
    torch.manual_seed(0)
    conv = zero_blocks_(nn.Conv2d(12, 20, **kwargs), 8, 0.6).eval()  # 12 channels: blocks of 8 straddle taps
    sparse = BlockSparseConv2d.from_conv(conv, block=(8, 8), kernel=kernel)
    for x in (torch.randn(2, 12, 9, 10), torch.randn(1, 12, 5, 7), torch.randn(12, 6, 6)):
        torch.testing.assert_close(sparse(x), conv(x))
        cl = x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x
        torch.testing.assert_close(sparse(cl), conv(x))
    dense = sparse.to_dense_conv()
    torch.testing.assert_close(dense.weight, conv.weight)


def test_a_convolution_it_cannot_run_is_refused_with_the_reason():
    with pytest.raises(ValueError, match="padding_mode='circular'"):
        BlockSparseConv2d.from_conv(nn.Conv2d(8, 8, 3, padding=1, padding_mode="circular"), block=(8, 8))


class _Residual(nn.Module):
    """A ResNet bottleneck (1x1, 3x3 stride 2, 1x1, batch norms, a strided 1x1 shortcut) and a linear head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)  # 27 x 16: edge blocks
        self.conv1, self.bn1 = nn.Conv2d(16, 16, 1, bias=False), nn.BatchNorm2d(16)
        self.conv2, self.bn2 = nn.Conv2d(16, 16, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(16)
        self.conv3, self.bn3 = nn.Conv2d(16, 32, 1, bias=False), nn.BatchNorm2d(32)
        self.down = nn.Sequential(nn.Conv2d(16, 32, 1, stride=2, bias=False), nn.BatchNorm2d(32))
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        y = torch.relu(self.bn1(self.conv1(x)))
        y = torch.relu(self.bn2(self.conv2(y)))
        y = torch.relu(self.bn3(self.conv3(y)) + self.down(x))
        return self.head(y.mean((2, 3)))


def _residual() -> _Residual:
    torch.manual_seed(0)
    model = _Residual()
    for module in model.modules():
        if isinstance(module, nn.Conv2d | nn.Linear):
            zero_blocks_(module, 8, 0.75)
        if isinstance(module, nn.BatchNorm2d):  # running statistics of a trained model
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    return model.eval()


@pytest.mark.parametrize("kernel", ["auto", "csr"])
def test_a_residual_network_gives_the_dense_outputs_and_survives_save_and_load(tmp_path, kernel):
    model = _residual()
    sparse = to_block_sparse(model, block_size=8, layout=kernel)
    assert all(isinstance(getattr(sparse, n), BlockSparseConv2d) for n in ("stem", "conv1", "conv2", "conv3"))
    assert isinstance(sparse.down[0], BlockSparseConv2d) and isinstance(sparse.head, BlockSparseLinear)
    for batch in (1, 2, 5):
        x = torch.randn(batch, 3, 12, 12)
        with torch.no_grad():
            torch.testing.assert_close(sparse(x), model(x))
    save_block_sparse(sparse, tmp_path / "model.pt")
    loaded = load_block_sparse(tmp_path / "model.pt", _Residual().eval())
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))


def test_a_depthwise_separable_block_exports_its_pointwise_convolution():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.ReLU(), nn.Conv2d(16, 32, 1)).eval()
    zero_blocks_(model[2], 8, 0.75)
    sparse = to_block_sparse(model, block_size=8)
    assert type(sparse[0]) is nn.Conv2d and isinstance(sparse[2], BlockSparseConv2d)
    assert sparse.block_sparse_summary["0"].reason == "depthwise convolution"
    # the dense convolution now writes channels-last, what the sparse one reads without a copy
    assert sparse[0].weight.is_contiguous(memory_format=torch.channels_last)
    x = torch.randn(2, 16, 6, 6)
    torch.testing.assert_close(sparse(x), model(x))


def test_a_loaded_convolution_must_match_the_architecture(tmp_path):
    save_block_sparse(to_block_sparse(_residual(), block_size=8), tmp_path / "model.pt")
    other = _Residual()
    other.conv2 = nn.Conv2d(16, 16, 5, stride=2, padding=2, bias=False)
    with pytest.raises(ValueError, match=r"stores a 16 x 16 x 3 x 3 Conv2d layer there: build the same architecture"):
        load_block_sparse(tmp_path / "model.pt", other)


# --- attention -------------------------------------------------------------------------------------------------
def _mha(**kwargs) -> nn.MultiheadAttention:
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(32, 4, **kwargs)
    zero_blocks_(mha, 8, 0.7, "in_proj_weight")
    zero_blocks_(mha.out_proj, 8, 0.7)
    if mha.in_proj_bias is not None:
        nn.init.normal_(mha.in_proj_bias)  # torch starts it at zero
    return mha.eval()


def _masks(batch: int, length: int, source: int, kind: str):
    gen = torch.Generator().manual_seed(1)
    if kind == "padding_bool":
        padding = torch.zeros(batch, source, dtype=torch.bool)
        padding[:, -2:] = True
        return {"key_padding_mask": padding}
    if kind == "padding_float":
        return {"key_padding_mask": torch.randn(batch, source, generator=gen)}
    if kind == "causal":
        mask = torch.triu(torch.ones(length, source, dtype=torch.bool), diagonal=1)
        return {"attn_mask": mask, "is_causal": True}
    if kind == "attn_3d":
        return {"attn_mask": torch.randn(batch * 4, length, source, generator=gen)}
    if kind == "both":
        padding = torch.zeros(batch, source, dtype=torch.bool)
        padding[0, 0] = True
        return {"attn_mask": torch.randn(length, source, generator=gen), "key_padding_mask": padding}
    return {}


MASKS = ["none", "padding_bool", "padding_float", "causal", "attn_3d", "both"]


@pytest.mark.parametrize("masks", MASKS)
@pytest.mark.parametrize("need_weights", [False, True])
@pytest.mark.parametrize("batch_first", [True, False])
def test_attention_gives_the_outputs_of_multihead_attention(masks, need_weights, batch_first):
    mha = _mha(batch_first=batch_first)
    sparse = to_block_sparse(nn.Sequential(mha), block_size=8)[0]
    assert isinstance(sparse, BlockSparseMultiheadAttention) and sparse.in_proj.layout == "own"
    x = torch.randn(3, 6, 32) if batch_first else torch.randn(6, 3, 32)
    kwargs = {"need_weights": need_weights, **_masks(3, 6, 6, masks)}
    with torch.no_grad():
        expected, expected_weights = mha(x, x, x, **kwargs)
        out, weights = sparse(x, x, x, **kwargs)
    torch.testing.assert_close(out, expected)
    if need_weights:
        torch.testing.assert_close(weights, expected_weights)
    else:
        assert weights is None and expected_weights is None


@pytest.mark.parametrize(
    "kwargs, call",
    [
        ({"batch_first": True}, {"cross": True}),
        ({"batch_first": True}, {"average_attn_weights": False}),
        ({"batch_first": True}, {"unbatched": True}),
        ({"batch_first": True, "add_bias_kv": True}, {"masks": "padding_bool"}),
        ({"batch_first": True, "add_zero_attn": True}, {"masks": "both"}),
        ({"batch_first": False, "bias": False}, {"cross": True}),
    ],
    ids=["cross", "per_head_weights", "unbatched", "bias_kv", "zero_attn", "no_bias"],
)
@pytest.mark.parametrize("kernel", KERNELS)
def test_every_multihead_attention_option(kwargs, call, kernel):
    mha = _mha(**kwargs)
    sparse = to_block_sparse(nn.Sequential(mha), block_size=8, layout=kernel)[0]
    assert isinstance(sparse, BlockSparseMultiheadAttention)
    shape = (6, 32) if call.get("unbatched") else (2, 6, 32) if mha.batch_first else (6, 2, 32)
    q = torch.randn(shape)
    k = v = torch.randn(shape[:-2] + (7, 32) if mha.batch_first or len(shape) == 2 else (7, 2, 32))
    if not call.get("cross"):
        k = v = q
    masks = _masks(2, 6, k.shape[-2] if mha.batch_first or len(shape) == 2 else k.shape[0], call.get("masks", ""))
    options = {"average_attn_weights": call.get("average_attn_weights", True), **masks}
    if call.get("unbatched") and "key_padding_mask" in options:
        options["key_padding_mask"] = options["key_padding_mask"][0]
    with torch.no_grad():
        expected, expected_weights = mha(q, k, v, **options)
        out, weights = sparse(q, k, v, **options)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(weights, expected_weights)


@pytest.mark.parametrize("sparse_part", ["in_proj_weight", "out_proj"])
def test_attention_with_one_projection_dense(sparse_part):
    mha = _mha(batch_first=True)
    dense_part = "out_proj" if sparse_part == "in_proj_weight" else "in_proj_weight"
    with torch.no_grad():
        part = mha.out_proj.weight if dense_part == "out_proj" else mha.in_proj_weight
        part.normal_()  # no zero blocks: the rule keeps it dense
    sparse = to_block_sparse(nn.Sequential(mha), block_size=8)
    summary = sparse.block_sparse_summary
    assert summary[f"0.{sparse_part}"].exported and not summary[f"0.{dense_part}"].exported
    x = torch.randn(2, 5, 32)
    torch.testing.assert_close(sparse[0](x, x, x)[0], mha(x, x, x)[0])


def test_attention_without_its_hint_mask_is_refused_as_multihead_attention_refuses_it():
    sparse = to_block_sparse(nn.Sequential(_mha(batch_first=True)), block_size=8)[0]
    x = torch.randn(2, 5, 32)
    with pytest.raises(RuntimeError, match="Need attn_mask if specifying the is_causal hint"):
        sparse(x, x, x, is_causal=True)


def _encoder() -> nn.TransformerEncoder:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 4, dim_feedforward=64, dropout=0.0, batch_first=True)
    encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=True)
    for name, module in encoder.named_modules():
        if name.endswith(("linear1", "linear2")):
            zero_blocks_(module, 8, 0.8)
    return encoder.eval()


def test_a_transformer_encoder_with_sparse_layers_leaves_its_fused_path(tmp_path):
    """nn.TransformerEncoderLayer's inference path hands every layer's dense weight to one fused kernel; with its
    feed-forward layers sparse (attention dense) it must take its plain path, which calls each module."""
    encoder = _encoder()
    sparse = to_block_sparse(encoder, block_size=8)
    assert isinstance(sparse.layers[0].linear1, BlockSparseLinear)
    assert isinstance(sparse.layers[0].self_attn, BlockSparseMultiheadAttention)  # dense projections, plain path
    assert not sparse.block_sparse_summary["layers.0.self_attn.in_proj_weight"].exported
    x = torch.randn(3, 7, 32)
    padding = torch.zeros(3, 7, dtype=torch.bool)
    padding[0, -3:] = True
    with torch.no_grad():
        torch.testing.assert_close(sparse(x), encoder(x))
        expected = encoder(x, src_key_padding_mask=padding)  # nested tensors: padded positions come back as 0
        torch.testing.assert_close(sparse(x, src_key_padding_mask=padding)[~padding], expected[~padding])
    save_block_sparse(sparse, tmp_path / "encoder.pt")
    loaded = load_block_sparse(tmp_path / "encoder.pt", _encoder())
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), encoder(x))
