"""Which weights get pruned and why the others stay dense (targets.py): include patterns, min_blocks, tied weights,
models with nothing to prune, and the layers of models nobody here wrote, from tiny configs (no downloads):
torchvision MobileNetV3, VisionTransformer and a ConvNeXt block, Hugging Face BERT and GPT-2, with every algorithm:
exact block counts, the model's own state_dict keys after the commit, and what stays dense said out loud."""

from __future__ import annotations

import copy
import warnings

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
import torchvision
from helpers import (
    ALGORITHM_IDS,
    BLOCK,
    MODEL_BLOCK,
    MODEL_PLAN,
    MODEL_SPARSITY,
    MODEL_STEPS,
    PRUNED,
    TinyNet,
    assert_exact_blocks,
    assert_same_state,
    make_trainer,
    pruning,
    state_of,
    tiny_bert,
    tiny_gpt2,
    tiny_loader,
    tokens,
)
from torch import nn
from torchvision.models.convnext import CNBlock

from sapp_lightning import BlockPruning, BlockSparsifier, block_sparsity, keep_count


# --- include, min_blocks, tied weights, nothing to prune --------------------------------------------------------------
def test_invalid_regex():
    with pytest.raises(ValueError, match="include holds an invalid regular expression"):
        BlockPruning("acdc", sparsity=0.5, block_size=4, include=["fc("])


def test_no_layer_with_enough_blocks_leaves_the_model_untouched(tmp_path):
    model = TinyNet()
    before = copy.deepcopy(model.state_dict())
    callback = BlockPruning("sapp", sparsity=0.5, block_size=64)
    with pytest.raises(ValueError, match=r"no layer has at least min_blocks=100 blocks of size \(64, 64\)"):
        make_trainer(tmp_path, [callback]).fit(model, tiny_loader())
    assert list(model.state_dict()) == list(before)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    assert not any(hasattr(m, "parametrizations") for m in model.modules())


def test_no_candidate_layer(tmp_path):
    callback = BlockPruning("acdc", sparsity=0.5, block_size=4, include=["nothing_matches"])
    with pytest.raises(ValueError, match="no layer to prune"):
        make_trainer(tmp_path, [callback]).fit(TinyNet(), tiny_loader())


class NoEligibleNet(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.depthwise = nn.Conv2d(3, 3, 3, groups=3)
        self.conv1d = nn.Conv1d(3, 4, 3)
        self.scale = nn.Parameter(torch.ones(4))

    def forward(self, x):
        return self.conv1d(self.depthwise(x).flatten(2)).mean(-1) * self.scale

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def test_a_model_with_no_eligible_layer_is_refused_untouched_and_the_callback_stays_usable(tmp_path):
    model = NoEligibleNet()
    before = state_of(model)
    callback = pruning("sapp")
    with pytest.raises(ValueError, match=r"no layer to prune: the model has no nn.Linear or nn.Conv2d \(groups=1\)"):
        make_trainer(tmp_path, [callback]).fit(model, tiny_loader())
    assert_same_state(state_of(model), before)
    make_trainer(tmp_path, [callback], max_epochs=2).fit(TinyNet(), tiny_loader())
    assert [layer.name for layer in callback.layers] == list(PRUNED)


class TiedNet(TinyNet):
    """fc1's weight is also an embedding table (weight tying)."""

    def __init__(self):
        super().__init__()
        self.embedding = nn.Embedding(24, 128)
        self.embedding.weight = self.fc1.weight


def test_a_tied_weight_stays_dense_with_a_warning_and_is_pruned_once_when_included(tmp_path):
    model = TiedNet()
    before = state_of(model)
    callback = pruning("sapp")
    with pytest.warns(
        UserWarning, match=r"tied weights stay dense: fc1 \(tied with embedding.weight\).*include=\[\.\.\.\]"
    ):
        make_trainer(tmp_path, [callback], max_epochs=2).fit(model, tiny_loader())
    assert [layer.name for layer in callback.layers] == ["conv"]
    assert model.embedding.weight is model.fc1.weight
    assert "fc1  " in callback.sparsifier.summary() and "tied with embedding.weight" in callback.sparsifier.summary()
    model = TiedNet()
    with pytest.raises(ValueError, match=r"include names 'fc1', whose weight is tied with embedding.weight: sapp in "):
        make_trainer(tmp_path, [pruning("sapp", include=["fc1"])]).fit(model, tiny_loader())
    assert list(state_of(model)) == list(before)  # refused before anything changed
    callback = pruning("acdc", include=["fc1"])
    make_trainer(tmp_path, [callback], max_epochs=2).fit(model, tiny_loader())
    assert [layer.name for layer in callback.layers] == ["fc1"]  # pruned once, through its first owner
    assert model.embedding.weight is model.fc1.weight  # still one tensor, with the same zero blocks for both
    assert block_sparsity(model, BLOCK, include=["fc1"])["fc1"].zero_blocks == PRUNED["fc1"] - keep_count(192, 0.5)


# --- today's models ---------------------------------------------------------------------------------------------------
def prune(model: torch.nn.Module, algorithm: str, batch, loss_fn, min_blocks: int = 4) -> BlockSparsifier:
    """Train ``model`` for a few steps with the sparsifier in a plain loop and commit."""
    torch.manual_seed(0)
    sparsifier = BlockSparsifier(algorithm, MODEL_SPARSITY, MODEL_BLOCK, min_blocks=min_blocks, plan=MODEL_PLAN)
    sparsifier.prepare(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    sparsifier.attach([optimizer])
    sparsifier.start(MODEL_STEPS)
    for _ in range(MODEL_STEPS):
        loss = loss_fn(model, batch)
        loss.backward()
        assert torch.isfinite(loss), algorithm
        sparsifier.before_optimizer_step(optimizer)
        optimizer.step()
        optimizer.zero_grad()
        sparsifier.step()
    sparsifier.commit()
    return sparsifier


def reasons(sparsifier: BlockSparsifier) -> dict[str, str | None]:
    return {choice.name: choice.reason for choice in sparsifier.choices}


def image_loss(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y)


def images(size: int = 32, classes: int = 10):
    gen = torch.Generator().manual_seed(0)
    return torch.randn(4, 3, size, size, generator=gen), torch.randint(classes, (4,), generator=gen)


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ALGORITHM_IDS)
def test_mobilenet_v3_small(algorithm):
    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v3_small(num_classes=10)
    keys = list(model.state_dict())
    sparsifier = prune(model, algorithm, images(), image_loss)
    why = reasons(sparsifier)
    depthwise = [name for name, reason in why.items() if reason == "depthwise convolution"]
    assert len(depthwise) == 11  # every depthwise conv is named, with its reason
    assert why["classifier.3"] is None and why["features.4.block.2.fc1"] is None  # the head, an SE 1x1 conv
    assert why["features.1.block.1.fc1"] == "2 blocks, under min_blocks=4"  # 16 -> 8 channels
    assert len(sparsifier.layers) == sum(reason is None for reason in why.values()) > 30
    assert_exact_blocks(sparsifier, MODEL_SPARSITY)
    assert list(model.state_dict()) == keys


def vit() -> torchvision.models.VisionTransformer:
    return torchvision.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64, num_classes=10
    )


@pytest.mark.parametrize("algorithm", ALGORITHM_IDS)
def test_vision_transformer_prunes_qkv_out_proj_mlp_and_its_zero_initialised_head(algorithm):
    torch.manual_seed(0)
    model = vit()
    keys = list(model.state_dict())
    tokens_ = ("class_token", "encoder.pos_embedding")
    matrices = sum(p.numel() for n, p in model.named_parameters() if p.dim() >= 2 and n not in tokens_)
    sparsifier = prune(model, algorithm, images(), image_loss)
    pruned = {layer.name if layer.param_name == "weight" else f"{layer.name}.{layer.param_name}"
              for layer in sparsifier.layers}  # fmt: skip
    for i in range(2):
        block = f"encoder.layers.encoder_layer_{i}"
        assert {f"{block}.self_attention.in_proj_weight", f"{block}.self_attention.out_proj"} <= pruned
        assert {f"{block}.mlp.0", f"{block}.mlp.3"} <= pruned
    dense_head = 0
    if algorithm == "powerprop":  # a zero block is PowerPropagation's fixed point: the all-zero head stays dense
        assert "conv_proj" in pruned and "heads.head" not in pruned
        assert reasons(sparsifier)["heads.head"].startswith("all zero")
        assert model.heads.head.weight.abs().sum() > 0  # and trains
        dense_head = model.heads.head.weight.numel()
    else:
        assert {"conv_proj", "heads.head"} <= pruned  # the head starts all zero (64 x 10: ragged edge blocks)
    assert sum(layer.layout.num_weights for layer in sparsifier.layers) == matrices - dense_head  # every matrix
    assert_exact_blocks(sparsifier, MODEL_SPARSITY)
    assert list(model.state_dict()) == keys
    with torch.no_grad():
        assert torch.isfinite(model(images()[0])).all()


@pytest.mark.parametrize("algorithm", ["sapp", "acdc"])
def test_a_convnext_block_prunes_its_pointwise_layers_and_names_the_depthwise_conv(algorithm):
    torch.manual_seed(0)
    block = CNBlock(dim=32, layer_scale=1e-6, stochastic_depth_prob=0.0)
    sparsifier = prune(block, algorithm, torch.randn(2, 32, 8, 8), lambda m, x: m(x).square().mean())
    assert reasons(sparsifier) == {"block.0": "depthwise convolution", "block.3": None, "block.5": None}
    assert_exact_blocks(sparsifier, MODEL_SPARSITY)


def bert_loss(model, ids):
    return model(input_ids=ids, labels=ids[:, 0] % 2).loss


def gpt2_loss(model, ids):
    return model(input_ids=ids, labels=ids).loss


@pytest.mark.parametrize(
    "algorithm", ["sapp", *(pytest.param(a, marks=pytest.mark.slow) for a in ALGORITHM_IDS if a != "sapp")]
)
@pytest.mark.parametrize("name", ["bert", "gpt2"])
def test_hugging_face_models_prune_attention_and_mlp_and_round_trip_through_save_pretrained(tmp_path, name, algorithm):
    torch.manual_seed(0)
    model, loss = (tiny_bert(), bert_loss) if name == "bert" else (tiny_gpt2(), gpt2_loss)
    keys = list(model.state_dict())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sparsifier = prune(model, algorithm, tokens(), loss)
    why = reasons(sparsifier)
    if name == "gpt2":
        for i in range(2):  # Conv1D: attention (Q, K, V and output) and MLP
            assert all(why[f"transformer.h.{i}.{part}"] is None for part in ("attn.c_attn", "attn.c_proj", "mlp.c_fc",
                       "mlp.c_proj"))  # fmt: skip
        assert why["lm_head"] == "tied with transformer.wte.weight"
        assert any("tied weights stay dense: lm_head" in str(w.message) for w in caught)
    else:
        parts = ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense")
        parts += ("intermediate.dense", "output.dense")
        for i in range(2):
            assert all(why[f"bert.encoder.layer.{i}.{part}"] is None for part in parts)
    assert_exact_blocks(sparsifier, MODEL_SPARSITY)
    assert list(model.state_dict()) == keys
    model.eval()
    model.save_pretrained(tmp_path)
    loaded = type(model).from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=tokens()).logits, model(input_ids=tokens()).logits)
    assert block_sparsity(loaded, MODEL_BLOCK, min_blocks=4).zero_blocks == sparsifier.report().zero_blocks


def test_a_tied_lm_head_included_by_name_is_pruned_once_for_both_owners():
    torch.manual_seed(0)
    model = tiny_gpt2()
    sparsifier = BlockSparsifier(
        "magnitude", MODEL_SPARSITY, MODEL_BLOCK, min_blocks=4, include=["lm_head"], plan=MODEL_PLAN
    )
    sparsifier.prepare(model)
    sparsifier.start(1)
    sparsifier.commit()
    assert [layer.name for layer in sparsifier.layers] == ["lm_head"]
    assert model.lm_head.weight is model.transformer.wte.weight
    zero = block_sparsity(model, MODEL_BLOCK, include=["lm_head"])["lm_head"]
    assert zero.zero_blocks == zero.num_blocks - keep_count(zero.num_blocks, MODEL_SPARSITY)
