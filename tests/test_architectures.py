"""Models nobody here wrote, from tiny configs (no downloads): torchvision MobileNetV3, VisionTransformer and a
ConvNeXt block, Hugging Face BERT and GPT-2, with every algorithm: the layers of today's models are pruned, with
exact block counts, the model's own state_dict keys after the commit, and what stays dense said out loud."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
import torchvision
import transformers  # a test dependency ([dev]), never one of sapp_lightning
from conftest import ALGORITHM_IDS
from torchvision.models.convnext import CNBlock

from sapp_lightning import BlockSparsifier, block_sparsity, keep_count

PLAN = [("dense", 0.25), ("sparsify", 0.25), ("sparse", 0.5)]
SPARSITY, BLOCK, STEPS = 0.5, 8, 12


def prune(model: torch.nn.Module, algorithm: str, batch, loss_fn, min_blocks: int = 4) -> BlockSparsifier:
    """Train ``model`` for a few steps with the sparsifier in a plain loop and commit."""
    torch.manual_seed(0)
    sparsifier = BlockSparsifier(algorithm, SPARSITY, BLOCK, min_blocks=min_blocks, plan=PLAN)
    sparsifier.prepare(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    sparsifier.attach([optimizer])
    sparsifier.start(STEPS)
    for _ in range(STEPS):
        loss = loss_fn(model, batch)
        loss.backward()
        assert torch.isfinite(loss), algorithm
        sparsifier.before_optimizer_step(optimizer)
        optimizer.step()
        optimizer.zero_grad()
        sparsifier.step()
    sparsifier.commit()
    return sparsifier


def assert_exact_blocks(sparsifier: BlockSparsifier) -> None:
    for layer in sparsifier.report().layers:
        assert layer.zero_blocks == layer.num_blocks - keep_count(layer.num_blocks, SPARSITY), layer.name


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
    assert_exact_blocks(sparsifier)
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
    assert_exact_blocks(sparsifier)
    assert list(model.state_dict()) == keys
    with torch.no_grad():
        assert torch.isfinite(model(images()[0])).all()


@pytest.mark.parametrize("algorithm", ["sapp", "acdc"])
def test_a_convnext_block_prunes_its_pointwise_layers_and_names_the_depthwise_conv(algorithm):
    torch.manual_seed(0)
    block = CNBlock(dim=32, layer_scale=1e-6, stochastic_depth_prob=0.0)
    sparsifier = prune(block, algorithm, torch.randn(2, 32, 8, 8), lambda m, x: m(x).square().mean())
    assert reasons(sparsifier) == {"block.0": "depthwise convolution", "block.3": None, "block.5": None}
    assert_exact_blocks(sparsifier)


def bert():
    config = transformers.BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=16, num_labels=2,
    )  # fmt: skip
    return transformers.BertForSequenceClassification(config)


def gpt2():
    config = transformers.GPT2Config(
        vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0
    )
    return transformers.GPT2LMHeadModel(config)


def tokens():
    return torch.randint(64, (4, 16), generator=torch.Generator().manual_seed(0))


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
    model, loss = (bert(), bert_loss) if name == "bert" else (gpt2(), gpt2_loss)
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
    assert_exact_blocks(sparsifier)
    assert list(model.state_dict()) == keys
    model.eval()
    model.save_pretrained(tmp_path)
    loaded = type(model).from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=tokens()).logits, model(input_ids=tokens()).logits)
    assert block_sparsity(loaded, BLOCK, min_blocks=4).zero_blocks == sparsifier.report().zero_blocks


def test_a_tied_lm_head_included_by_name_is_pruned_once_for_both_owners():
    torch.manual_seed(0)
    model = gpt2()
    sparsifier = BlockSparsifier("magnitude", SPARSITY, BLOCK, min_blocks=4, include=["lm_head"], plan=PLAN)
    sparsifier.prepare(model)
    sparsifier.start(1)
    sparsifier.commit()
    assert [layer.name for layer in sparsifier.layers] == ["lm_head"]
    assert model.lm_head.weight is model.transformer.wte.weight
    zero = block_sparsity(model, BLOCK, include=["lm_head"])["lm_head"]
    assert zero.zero_blocks == zero.num_blocks - keep_count(zero.num_blocks, SPARSITY)


@pytest.mark.slow
def test_hugging_face_trainer_fine_tunes_a_tiny_bert_to_the_target_sparsity(tmp_path):
    from sapp_lightning.huggingface import BlockPruningCallback

    torch.manual_seed(0)
    model = bert()
    keys = list(model.state_dict())
    data = [{"input_ids": tokens()[i % 4], "labels": torch.tensor(i % 2)} for i in range(96)]
    args = transformers.TrainingArguments(
        str(tmp_path), max_steps=36, per_device_train_batch_size=8, gradient_accumulation_steps=2, learning_rate=1e-3,
        report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True, logging_strategy="no",
    )  # fmt: skip
    pruning = BlockPruningCallback("sapp", SPARSITY, BLOCK, min_blocks=4, plan=PLAN)
    starts = []
    pruning.sparsifier.add_listener(lambda s, e: starts.append(e.step) if e.kind == "phase_start" else None)
    transformers.Trainer(model=model, args=args, train_dataset=data, callbacks=[pruning]).train()
    assert starts == [0, 9, 18]  # 36 optimizer steps (after accumulation): the plan's 25% / 25% / 50%
    assert_exact_blocks(pruning.sparsifier)
    assert list(model.state_dict()) == keys
    assert pruning.sparsifier.report().block_sparsity == pytest.approx(SPARSITY, abs=0.02)
