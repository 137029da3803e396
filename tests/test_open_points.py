"""The points the paper leaves open (SAPP_SPEC section 6) are arguments: each one changes behaviour as documented,
and its default is the spec's."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import BLOCK, PRUNED, TinyNet, tiny_loader

from sapp_lightning import BlockLayout, BlockSparsifier, Phase, exponential_sparsity, keep_count
from sapp_lightning.algorithms import SequentialAttentionPP

PLAN = [("dense", 0.2), ("sparsify", 0.4), ("sparse", 0.4)]  # 40 steps: sparsify [8, 24), sparse [24, 40)


def drive(sparsifier: BlockSparsifier, steps: int = 40, lr: float = 0.05, each_step=None) -> TinyNet:
    """Train TinyNet with the sparsifier in a plain loop; ``each_step(sparsifier)`` runs after every step."""
    torch.manual_seed(0)
    model = TinyNet()
    sparsifier.prepare(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    sparsifier.attach([optimizer])
    sparsifier.start(steps)
    batches = list(tiny_loader())
    for step in range(steps):
        x, y = batches[step % len(batches)]
        F.cross_entropy(model(x), y).backward()
        sparsifier.before_optimizer_step(optimizer)
        optimizer.step()
        optimizer.zero_grad()
        sparsifier.step()
        if each_step is not None:
            each_step(sparsifier)
    return model


def sparsifier(algorithm="sapp", sparsity=0.5, **kwargs) -> BlockSparsifier:
    return BlockSparsifier(algorithm, sparsity, BLOCK, min_blocks=10, plan=PLAN, **kwargs)


def attention_of(s: BlockSparsifier) -> list[torch.Tensor]:
    return [layer.reparam.attention().detach() for layer in s.layers]


def test_logit_init_std():
    torch.manual_seed(0)
    spread, flat = sparsifier(logit_init_std=0.5), sparsifier()
    spread.prepare(TinyNet())
    flat.prepare(TinyNet())
    logits = torch.cat([layer.reparam.logits.reshape(-1) for layer in spread.layers])
    assert logits.std().item() == pytest.approx(0.5, rel=0.15)
    assert all((layer.reparam.logits == 0).all() for layer in flat.layers)  # the spec's default: A = 1


def test_softmax_scope_global_normalizes_over_every_layer():
    s = sparsifier(logit_init_std=1.0, softmax_scope="global", attention_clipping=False)
    drive(s, steps=4)
    attention = attention_of(s)
    total = sum(a.numel() for a in attention)
    assert sum(float(a.sum()) for a in attention) == pytest.approx(total, rel=1e-5)
    assert abs(float(attention[0].mean()) - 1.0) > 1e-3  # no longer mean 1 within each layer
    per_layer = sparsifier(logit_init_std=1.0, attention_clipping=False)
    drive(per_layer, steps=4)
    assert all(float(a.mean()) == pytest.approx(1.0, rel=1e-5) for a in attention_of(per_layer))


def test_softmax_over_kept_blocks():
    for over, expected in (("kept", "kept"), ("all", "all")):
        s = sparsifier(softmax_over=over, attention_clipping=False, logit_init_std=0.3)
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

    s = sparsifier(score="magnitude", logit_init_std=0.5)
    drive(s, each_step=check)
    assert s.layer_states()[0].importance_name == "block norm"
    by_attention = sparsifier(logit_init_std=0.5)
    drive(by_attention)
    assert not all(torch.equal(a.mask, b.mask) for a, b in zip(s.layers, by_attention.layers))  # another ranking
    assert [layer.num_kept for layer in s.layers] == [keep_count(n, 0.5) for n in PRUNED.values()]


def test_clip_ties_rank_blocks_at_the_bound_by_logit_or_by_index():
    model = torch.nn.Sequential(torch.nn.Linear(16, 16))  # 4 x 4 = 16 blocks
    kept = {}
    for ties in ("logit", "index"):
        s = BlockSparsifier(
            "sapp", 0.75, 4, min_blocks=1, plan=[("sparse", 1.0)], clip_ties=ties, clip_bounds=(0.1, 1.2)
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
    s = sparsifier(clip_bounds=(0.9, 1.1), logit_init_std=1.0)
    s.prepare(TinyNet())
    attention = torch.cat([a.reshape(-1) for a in attention_of(s)])
    assert attention.min() == pytest.approx(0.9) and attention.max() == pytest.approx(1.1)


def test_sparsify_every_n_steps_moves_the_mask_in_steps_and_reaches_the_target_on_the_last_one():
    kept = {}
    for every in (1, 5):
        kept[every] = []
        drive(sparsifier(sparsify_every_n_steps=every), each_step=lambda s, rows=kept[every]: rows.append(
            s.layers[1].num_kept))  # fmt: skip
    # rows[k] holds the masks of forward pass k + 1 (step() moves them to where the next pass needs them)
    changes = {every: [k + 2 for k in range(len(rows) - 1) if rows[k + 1] != rows[k]] for every, rows in kept.items()}
    assert set(changes[5]) <= {8, 13, 18, 23}
    assert len(changes[1]) > len(changes[5]) >= 3
    last = kept[5][22]  # the masks of the last sparsification step (23)
    assert last == kept[1][22] == keep_count(PRUNED["fc1"], 0.5)  # the target, on the phase's last step
    assert exponential_sparsity(1.0, 0.5) == 0.5


def test_sparsify_regrowth_lets_a_dropped_block_come_back_within_the_phase():
    def promote_a_dropped_block(s):
        if s.phase is Phase.SPARSIFY and s.steps_done == 15:
            layer = s.layers[1]
            dropped = (~layer.mask).view(-1).nonzero()[0]
            with torch.no_grad():
                layer.reparam.logits.view(-1)[dropped] = 50.0
            promote_a_dropped_block.block = int(dropped)
        if s.steps_done == 20:
            promote_a_dropped_block.back = bool(s.layers[1].mask.view(-1)[promote_a_dropped_block.block])

    for regrowth, expected in ((True, True), (False, False)):
        drive(sparsifier(sparsify_regrowth=regrowth, attention_clipping=False), each_step=promote_a_dropped_block)
        assert promote_a_dropped_block.back is expected


def test_global_ranking_reaches_the_target_over_all_layers_not_in_each():
    glob, local = sparsifier("acdc", 0.75, ranking="global"), sparsifier("acdc", 0.75)
    drive(glob)
    drive(local)
    total = sum(PRUNED.values())
    kept_global = [layer.num_kept for layer in glob.layers]
    assert sum(kept_global) == total - round(0.75 * total)
    assert kept_global != [keep_count(n, 0.75) for n in PRUNED.values()]  # layers end at other sparsities
    assert [layer.num_kept for layer in local.layers] == [keep_count(n, 0.75) for n in PRUNED.values()]
    with warnings.catch_warnings(record=True) as caught:  # the total is on target: no layer is "below" its own
        warnings.simplefilter("always")
        glob.commit()
    assert not [w for w in caught if "below the target" in str(w.message)]


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
    logits = torch.linspace(-1.0, 1.0, 16)[torch.randperm(16, generator=torch.Generator().manual_seed(0))]
    with torch.no_grad():
        s.layers[0].reparam.logits.view(-1).copy_(logits)
        s.layers[1].reparam.logits.view(-1).copy_(logits + 5.0)
    assert torch.allclose(*attention_of(s))
    s.start(1)
    first, second = (layer.mask for layer in s.layers)
    assert (int(first.sum()), int(second.sum())) == (8, 8) and torch.equal(first, second)
    assert first.view(-1).nonzero().flatten().tolist() == logits.topk(8).indices.sort().values.tolist()


def test_an_unknown_algorithm_option_is_refused_and_another_algorithms_is_ignored():
    with pytest.raises(ValueError, match=r"unknown algorithm option\(s\) 'scroe'; the algorithms take "):
        sparsifier(scroe="magnitude")
    assert sparsifier("acdc", score="magnitude").algorithm.config() == {"prune_mode": "zero"}


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


@pytest.mark.parametrize(
    "option, message",
    [
        (dict(sparsify_every_n_steps=0), "sparsify_every_n_steps must be an int >= 1"),
        (dict(ranking="model"), "ranking must be 'layer' or 'global'"),
    ],
)
def test_bad_sparsifier_options(option, message):
    with pytest.raises(ValueError, match=message):
        sparsifier(**option)


def test_the_defaults_are_the_specs_and_leave_the_configuration_as_before():
    s = sparsifier()
    algorithm = s.algorithm
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
        "attention_clipping", "plan", "schedule_exponent", "layers", "kinds",
    }  # fmt: skip


def test_powerprop_alpha_keeps_the_init_trains_differently_and_is_part_of_the_configuration():
    from sapp_lightning.algorithms import PowerPropagation

    torch.manual_seed(0)
    reference, model = TinyNet(), None
    for alpha in (2, 3):
        torch.manual_seed(0)
        model = TinyNet()
        sparsifier("powerprop", alpha=alpha).prepare(model)
        torch.testing.assert_close(model.fc1.weight, reference.fc1.weight)  # W starts at the user's init either way
    runs = {alpha: sparsifier("powerprop", alpha=alpha) for alpha in (2, 3)}
    models = {alpha: drive(s) for alpha, s in runs.items()}
    assert not torch.allclose(models[2].fc1.weight, models[3].fc1.weight)
    for s in runs.values():
        assert [layer.zero_blocks for layer in s.report().layers] == [n - keep_count(n, 0.5) for n in PRUNED.values()]
    assert runs[3].algorithm.config() == {"prune_mode": "mask", "alpha": 3.0}
    assert runs[2].algorithm.config() == PowerPropagation().config() == {"prune_mode": "mask"}  # as before alpha
    with pytest.raises(ValueError, match=r"alpha: checkpoint 3\.0, this callback None"):
        fresh = sparsifier("powerprop")
        fresh.prepare(TinyNet())
        fresh.load_state_dict(runs[3].state_dict())


@pytest.mark.parametrize("alpha", [0.5, True, "2"])
def test_bad_powerprop_alpha(alpha):
    from sapp_lightning.algorithms import PowerPropagation

    with pytest.raises(ValueError, match=r"alpha must be a number >= 1 \(the paper's block PowerPropagation is 2\)"):
        PowerPropagation(alpha=alpha)


def test_resuming_a_run_that_set_a_knob_without_it_is_refused():
    """Knobs at their default are left out of the configuration; one set in the checkpoint must still count."""
    saved = sparsifier(softmax_over="kept")
    saved.prepare(TinyNet())
    fresh = sparsifier()
    fresh.prepare(TinyNet())
    with pytest.raises(ValueError, match=r"softmax_over: checkpoint 'kept', this callback None"):
        fresh.load_state_dict(saved.state_dict())


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
    assert "logit_scale" not in SequentialAttentionPP().config()  # the default leaves old checkpoints matching


def test_logit_scale_must_be_positive():
    with pytest.raises(ValueError, match="logit_scale must be > 0, got 0"):
        SequentialAttentionPP(logit_scale=0)
