"""SequentialAttention++ (algorithms/sapp.py): the attention folded into the committed weights, the exponential
sparsification ramp, the attention logits (in the user's optimizer, trained, their L2, float32 under any
precision), and the points the paper leaves open (SAPP_SPEC section 6) as arguments: each one changes behaviour as
documented, and its default is the spec's."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from helpers import (
    BLOCK,
    PRUNED,
    TinyNet,
    assert_same_state,
    attention_of,
    drive,
    fit_and_probe,
    loop_sparsifier,
    make_trainer,
    paper_pruning,
    pruning,
    tiny_loader,
)

from sapp_lightning import BlockLayout, BlockPruning, BlockSparsifier, Phase, committed_state_dict, keep_count
from sapp_lightning.algorithms import BlockAttention, SequentialAttentionPP

# --- the commit and the ramp ------------------------------------------------------------------------------------------


def test_sapp_folds_the_attention_into_the_committed_weight(tmp_path):
    model, _, recorder, _, _ = fit_and_probe(tmp_path, "sapp")
    # weights recorded before commit are the effective ones (W * A * mask): commit keeps exactly those
    assert torch.equal(model.fc1.weight, recorder.weights["fc1"])


def test_sapp_sparsification_follows_the_exponential_schedule_and_only_shrinks(tmp_path):
    _, callback, _, probe, _ = fit_and_probe(tmp_path, "sapp", sparsity=0.9, attention_clipping=False)
    schedule = callback.schedule
    sparsify_rows = [r for r in probe.rows if r["phase"] is Phase.SPARSIFY]
    assert len(sparsify_rows) >= 10
    previous = None
    for row in sparsify_rows:
        tau = schedule.locate(row["step"]).tau
        from sapp_lightning import exponential_sparsity

        expected = [keep_count(n, exponential_sparsity(tau, 0.9, 4.0)) for n in PRUNED.values()]
        assert row["kept"] == expected
        if previous is not None:
            for before, after in zip(previous["masks"], row["masks"]):
                assert not (after & ~before).any(), "a block came back inside a sparsification phase"
        previous = row
    first_sparse = next(r for r in probe.rows if r["phase"] is Phase.SPARSE)
    assert first_sparse["kept"] == [keep_count(n, 0.9) for n in PRUNED.values()]


# --- the attention logits ---------------------------------------------------------------------------------------------


def test_logits_reach_the_optimizer_when_configure_optimizers_left_them_out(tmp_path):
    torch.manual_seed(0)
    model = TinyNet(freeze_params=True)
    callback = paper_pruning("sapp")
    trainer = make_trainer(tmp_path, [callback])
    with pytest.warns(UserWarning, match="left out the 2 attention-logit tensor"):
        trainer.fit(model, tiny_loader())
    optimizer_params = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
    logits = [m.logits for m in model.modules() if isinstance(m, BlockAttention)]
    assert logits == []  # committed: gone from the model
    assert len(callback.layers) == 2 and len(trainer.optimizers[0].param_groups) == 2
    assert len(optimizer_params) == len(list(model.parameters())) + 2


def test_logits_train_and_are_in_the_users_optimizer(tmp_path):
    class LogitProbe(pl.Callback):
        def on_train_end(self, trainer, pl_module):
            self.logits = [layer.reparam.logits.detach().clone() for layer in callback.layers]
            ids = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
            self.in_optimizer = all(id(layer.reparam.logits) in ids for layer in callback.layers)

    torch.manual_seed(0)
    callback, probe = paper_pruning("sapp"), LogitProbe()
    make_trainer(tmp_path, [callback, probe]).fit(TinyNet(), tiny_loader())
    assert probe.in_optimizer
    assert all(logits.abs().max() > 0 for logits in probe.logits)
    assert all(logits.dtype == torch.float32 for logits in probe.logits)


def test_logit_l2_adds_exactly_its_gradient(tmp_path):
    class SetLogits(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            torch.manual_seed(1)
            for layer in self.cb.layers:
                layer.reparam.logits.data.normal_(0, 0.1)
            self.start = [layer.reparam.logits.detach().clone() for layer in self.cb.layers]

        def on_train_end(self, trainer, pl_module):
            self.end = [layer.reparam.logits.detach().clone() for layer in self.cb.layers]

    def one_step(l2):
        torch.manual_seed(0)
        model = TinyNet(lr=0.1)
        model.optimizer_name = "plain-sgd"
        model.configure_optimizers = lambda: torch.optim.SGD(model.parameters(), lr=0.1)
        cb = paper_pruning("sapp", logit_l2=l2)
        probe = SetLogits()
        probe.cb = cb
        make_trainer(tmp_path, [cb, probe], max_epochs=None, max_steps=1).fit(model, tiny_loader())
        return probe

    plain, regularized = one_step(0.0), one_step(0.5)
    for start, a, b in zip(plain.start, plain.end, regularized.end):
        torch.testing.assert_close(a - b, 0.1 * 0.5 * start, rtol=1e-4, atol=1e-7)


def test_logit_l2_defaults_to_the_weights_decay_unless_the_optimizer_decays_the_logits(tmp_path):
    torch.manual_seed(0)
    callback = paper_pruning("sapp")
    make_trainer(tmp_path, [callback], max_epochs=1).fit(TinyNet(weight_decay=1e-3), tiny_loader())
    assert callback.algorithm.effective_logit_l2 == 0.0  # SGD already decays them with the weights
    model = TinyNet(freeze_params=True)  # the logits get a group of their own, with SGD's default decay 0
    model.configure_optimizers = lambda: torch.optim.SGD(
        [{"params": model.frozen_params, "weight_decay": 1e-3}], lr=0.1
    )
    callback = paper_pruning("sapp")
    with pytest.warns(UserWarning, match="left out"):
        make_trainer(tmp_path, [callback], max_epochs=1).fit(model, tiny_loader())
    assert callback.algorithm.effective_logit_l2 == 1e-3


def test_bad_logit_l2():
    with pytest.raises(ValueError, match=re.escape("logit_l2 must be >= 0 or None")):
        BlockPruning("sapp", 0.5, BLOCK, logit_l2=-1.0)


def test_sapp_without_an_optimizer():
    sparsifier = BlockSparsifier("sapp", 0.5, BLOCK, min_blocks=10)
    sparsifier.prepare(TinyNet())
    with pytest.raises(ValueError, match="SequentialAttentionPP trains attention logits and needs an optimizer"):
        sparsifier.attach([])


def test_logits_stay_float32_when_the_model_is_converted():
    callback = pruning("sapp")
    model = TinyNet()
    callback.sparsifier.prepare(model)
    logits = model.fc1.parametrizations.weight[0].logits
    model.to(torch.bfloat16)
    assert model.fc1.parametrizations.weight.original.dtype == torch.bfloat16
    assert logits.dtype == torch.float32 and model.fc1.parametrizations.weight[0].logits is logits
    model.half()
    assert logits.dtype == torch.float32 and model.fc1.weight.dtype == torch.float16
    model.double()
    assert logits.dtype == torch.float64  # wider is kept


def test_attention_and_its_gradient_are_float32_for_bf16_weights():
    from sapp_lightning.algorithms import BlockAttention
    from sapp_lightning.blocks import BlockLayout

    torch.manual_seed(0)
    weight = torch.randn(64, 256).to(torch.bfloat16)
    reparam = BlockAttention(BlockLayout.for_weight(weight, 16), clip=None)
    with torch.no_grad():
        reparam.logits.normal_(0, 0.5)
    upstream = torch.randn(64, 256).to(torch.bfloat16).float()  # what a bf16 model back-propagates
    effective = reparam(weight)
    assert effective.dtype == torch.bfloat16
    (effective.float() * upstream).sum().backward()
    grad = reparam.logits.grad.clone()
    reference = BlockAttention(BlockLayout.for_weight(weight, 16), clip=None)
    reference.load_state_dict(reparam.state_dict())
    (reference(weight.float()) * upstream).sum().backward()
    assert grad.dtype == torch.float32
    torch.testing.assert_close(grad, reference.logits.grad, rtol=1e-5, atol=1e-6)


# --- the points the paper leaves open ---------------------------------------------------------------------------------


def test_logit_init_std():
    torch.manual_seed(0)
    spread, flat = loop_sparsifier(logit_init_std=0.5), loop_sparsifier()
    spread.prepare(TinyNet())
    flat.prepare(TinyNet())
    logits = torch.cat([layer.reparam.logits.reshape(-1) for layer in spread.layers])
    assert logits.std().item() == pytest.approx(0.5, rel=0.15)
    assert all((layer.reparam.logits == 0).all() for layer in flat.layers)  # the spec's default: A = 1


def test_softmax_scope_global_normalizes_over_every_layer():
    s = loop_sparsifier(logit_init_std=1.0, softmax_scope="global", attention_clipping=False)
    drive(s, steps=4)
    attention = attention_of(s)
    total = sum(a.numel() for a in attention)
    assert sum(float(a.sum()) for a in attention) == pytest.approx(total, rel=1e-5)
    assert abs(float(attention[0].mean()) - 1.0) > 1e-3  # no longer mean 1 within each layer
    per_layer = loop_sparsifier(logit_init_std=1.0, attention_clipping=False)
    drive(per_layer, steps=4)
    assert all(float(a.mean()) == pytest.approx(1.0, rel=1e-5) for a in attention_of(per_layer))


def test_softmax_over_kept_blocks():
    for over, expected in (("kept", "kept"), ("all", "all")):
        s = loop_sparsifier(softmax_over=over, attention_clipping=False, logit_init_std=0.3)
        drive(s, steps=30)  # in the sparse phase
        for layer, attention in zip(s.layers, attention_of(s)):
            kept = attention[layer.mask]
            if expected == "kept":
                assert float(kept.mean()) == pytest.approx(1.0, rel=1e-5)
            else:
                assert float(attention.mean()) == pytest.approx(1.0, rel=1e-5)
                assert abs(float(kept.mean()) - 1.0) > 1e-4


def test_sapp_score_magnitude_ranks_blocks_by_the_effective_weights_norm():
    def check(s):  # in the sparsification phase, before the masks move again: the kept set is the top by norm
        layer = s.layers[1]
        if s.phase is Phase.SPARSIFY:
            scores = s.algorithm.block_scores(layer)
            norms = layer.layout.block_sq_norms(layer.effective_weight().detach())
            assert torch.equal(scores, norms)  # W * A * mask: what the layer computes with

    s = loop_sparsifier(score="magnitude", logit_init_std=0.5)
    drive(s, each_step=check)
    assert s.layer_states()[0].importance_name == "block norm"
    by_attention = loop_sparsifier(logit_init_std=0.5)
    drive(by_attention)
    assert not all(torch.equal(a.mask, b.mask) for a, b in zip(s.layers, by_attention.layers))  # another ranking
    assert [layer.num_kept for layer in s.layers] == [keep_count(n, 0.5) for n in PRUNED.values()]


def test_clip_ties_rank_blocks_at_the_bound_by_logit_or_by_index():
    model = torch.nn.Sequential(torch.nn.Linear(16, 16))  # 4 x 4 = 16 blocks
    kept = {}
    for ties in ("logit", "index"):
        s = BlockSparsifier(
            "sapp",
            0.75,
            4,
            min_blocks=1,
            plan=[("sparse", 1.0)],
            clip_ties=ties,
            clip_bounds=(0.1, 1.2),
            logit_scale=1.0,  # the paper's A = N softmax(L), for the attention values below
        )
        s.prepare(model)
        layer = s.layers[0]
        with torch.no_grad():  # blocks 10..15 all have attention above 1.2 (1.39 to 2.29): clipped to 1.2
            layer.reparam.logits.view(-1).copy_(torch.tensor([0.0] * 10 + [1.0, 1.1, 1.2, 1.3, 1.4, 1.5]))
        s.start(1)
        kept[ties] = layer.mask.view(-1).nonzero().flatten().tolist()
        s.commit()
        model = torch.nn.Sequential(torch.nn.Linear(16, 16))
    assert kept == {"logit": [12, 13, 14, 15], "index": [10, 11, 12, 13]}


def test_clip_ties_default_says_plainly_that_it_differs_from_the_spec():
    # SPEC 1.10 / #12 rank the clipped attention with ties to the lower index; the default ranks by the unclipped logit
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    row = next(line for line in readme.splitlines() if line.startswith("| 12 |"))
    assert "`clip_ties`" in row and "**not the spec's**" in row and 'Why `clip_ties="logit"` differs' in readme
    assert "**The default differs from the spec**" in SequentialAttentionPP.__doc__
    assert SequentialAttentionPP().clip_ties == "logit"


def test_clip_bounds():
    s = loop_sparsifier(clip_bounds=(0.9, 1.1), logit_init_std=1.0)
    s.prepare(TinyNet())
    attention = torch.cat([a.reshape(-1) for a in attention_of(s)])
    assert attention.min() == pytest.approx(0.9) and attention.max() == pytest.approx(1.1)


@pytest.mark.parametrize(
    "options",
    [dict(), dict(attention_clipping=False), dict(clip_ties="index"), dict(softmax_over="kept")],
    ids=["logit", "unclipped", "index", "over_kept"],
)
def test_global_ranking_compares_each_layers_attention_not_its_raw_logits(options):
    # two layers whose logits differ by a constant: the same attention N * softmax(L), other raw logits
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Linear(16, 16))  # 4 x 4 = 16 blocks each
    s = BlockSparsifier("sapp", 0.5, 4, min_blocks=1, plan=[("sparse", 1.0)], ranking="global", **options)
    s.prepare(model)
    # spread over [-0.1, 0.1], times the default logit_scale 10: no attention reaches a clipping bound (no ties)
    logits = torch.linspace(-0.1, 0.1, 16)[torch.randperm(16, generator=torch.Generator().manual_seed(0))]
    with torch.no_grad():
        s.layers[0].reparam.logits.view(-1).copy_(logits)
        s.layers[1].reparam.logits.view(-1).copy_(logits + 5.0)
    assert torch.allclose(*attention_of(s))
    s.start(1)
    first, second = (layer.mask for layer in s.layers)
    assert (int(first.sum()), int(second.sum())) == (8, 8) and torch.equal(first, second)
    assert first.view(-1).nonzero().flatten().tolist() == logits.topk(8).indices.sort().values.tolist()


@pytest.mark.parametrize(
    "option, message",
    [
        (dict(softmax_scope="model"), "softmax_scope must be one of 'layer', 'global'"),
        (dict(softmax_over="some"), "softmax_over must be one of 'all', 'kept'"),
        (dict(score="norm"), "score must be one of 'attention', 'magnitude'"),
        (dict(clip_ties="random"), "clip_ties must be one of 'logit', 'index'"),
        (dict(clip_bounds=(2, 1)), "clip_bounds must be (low, high) with 0 < low <= high"),
        (dict(logit_init_std=-1), "logit_init_std must be >= 0"),
    ],
)
def test_bad_sapp_options(option, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        SequentialAttentionPP(**option)


def test_the_defaults_are_the_specs_and_leave_the_configuration_as_before():
    """Except ``logit_scale`` (10, the paper's 1: README, "Why logit_scale is 10"), which the configuration records."""
    s = loop_sparsifier()
    algorithm = s.algorithm
    assert algorithm.logit_scale == 10.0
    assert (algorithm.softmax_scope, algorithm.softmax_over, algorithm.score, algorithm.clip_ties) == (
        "layer", "all", "attention", "logit",
    )  # fmt: skip
    assert (algorithm.logit_init_std, algorithm.clip_bounds, s.sparsify_every_n_steps, s.ranking) == (
        0,
        None,
        1,
        "layer",
    )
    assert set(s.config()) == {
        "algorithm", "sparsity", "block_size", "min_blocks", "include", "exclude", "prune_mode",
        "attention_clipping", "plan", "schedule_exponent", "layers", "kinds", "logit_scale",
    }  # fmt: skip


def test_logit_scale_is_a_temperature_that_moves_the_attention_faster():
    """A = N softmax(k L): the same logits give a sharper attention, and one SGD step on the logits moves the
    attention's logits k^2 as far (a k times larger gradient, k times scaled): as a k^2 larger learning rate."""
    torch.manual_seed(0)
    layout = BlockLayout.for_weight(torch.zeros(8, 8), block_size=4)
    plain, scaled = (SequentialAttentionPP(logit_scale=k).make_reparam(layout, 0.5) for k in (1.0, 3.0))
    with torch.no_grad():
        plain.logits.copy_(torch.tensor([[0.3, -0.1], [0.0, 0.2]]))
        scaled.logits.copy_(plain.logits / 3)  # the same attention
    torch.testing.assert_close(scaled.attention(), plain.attention())
    weight = torch.randn(8, 8)
    for reparam in (plain, scaled):
        (reparam(weight) * torch.arange(64.0).reshape(8, 8)).sum().backward()
    step = 0.01
    moved_plain = -step * plain.logits.grad
    moved_scaled = 3 * (-step * scaled.logits.grad)  # the change of k * logits
    torch.testing.assert_close(moved_scaled, 9 * moved_plain)
    assert SequentialAttentionPP(logit_scale=3.0).config()["logit_scale"] == 3.0
    assert SequentialAttentionPP().config()["logit_scale"] == 10.0  # the default is recorded: it is not the paper's
    assert "logit_scale" not in SequentialAttentionPP(logit_scale=1.0).config()  # as before the setting existed


def test_a_state_recorded_without_logit_scale_folds_with_the_papers_attention():
    """Checkpoints written before ``logit_scale`` existed record no value: they fold with 1, not today's default."""
    sparsifier = loop_sparsifier(logit_scale=1.0, logit_init_std=0.5)
    model = drive(sparsifier, steps=10)
    state = model.state_dict()
    assert "logit_scale" not in sparsifier.config()
    committed = committed_state_dict(state)
    sparsifier.commit()
    assert_same_state(committed, model.state_dict())


def test_logit_scale_must_be_positive():
    with pytest.raises(ValueError, match="logit_scale must be > 0, got 0"):
        SequentialAttentionPP(logit_scale=0)
