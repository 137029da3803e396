"""What a user relies on during and after fit, for every algorithm: the phase plan, exact final block counts,
the commit, optimizer resets, each algorithm's own mechanics, and the curves it logs."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from conftest import ALGORITHM_IDS, BLOCK, PLAN, PRUNED, TinyNet, make_trainer, tiny_loader

from sapp_lightning import BlockPruning, Phase, block_sparsity, keep_count
from sapp_lightning.algorithms import BlockAttention


def paper_pruning(algorithm: str, sparsity: float = 0.5, **kwargs) -> BlockPruning:
    kwargs.setdefault("plan", PLAN if algorithm == "sapp" else "imagenet")
    return BlockPruning(algorithm, sparsity=sparsity, block_size=BLOCK, min_blocks=10, **kwargs)


class Recorder(pl.Callback):
    """Placed before BlockPruning: sees the masked model at fit end, before the commit."""

    def __init__(self, probe):
        self.probe = probe

    def on_fit_end(self, trainer, pl_module):
        with torch.no_grad():
            self.output = pl_module(self.probe).clone()
        self.weights = {n: m.weight.detach().clone() for n, m in pl_module.named_children()}


class StepProbe(pl.Callback):
    """Placed after BlockPruning: records its state after each optimizer step."""

    def __init__(self, pruning):
        self.pruning, self.rows = pruning, []

    def on_train_batch_end(self, trainer, pl_module, *args):
        self.rows.append(
            {
                "step": trainer.global_step,
                "phase": self.pruning.phase,
                "kept": [layer.num_kept for layer in self.pruning.layers],
                "masks": [layer.mask.clone() for layer in self.pruning.layers],
                "optimizer_state": sum(len(opt.state) for opt in trainer.optimizers),
                "target": self.pruning.target_sparsity(),
            }
        )


def fit(tmp_path, algorithm, sparsity=0.5, model=None, extra_callbacks=(), **kwargs):
    torch.manual_seed(0)
    model = model or TinyNet()
    callback = paper_pruning(algorithm, sparsity, **kwargs)
    recorder = Recorder(torch.randn(5, 3, 8, 8))
    probe = StepProbe(callback)
    trainer = make_trainer(tmp_path, [recorder, callback, probe, *extra_callbacks])
    keys_before = list(model.state_dict().keys())
    trainer.fit(model, tiny_loader())
    return model, callback, recorder, probe, keys_before


@pytest.mark.parametrize("algorithm", ALGORITHM_IDS)
@pytest.mark.parametrize("sparsity", [0.5, 0.9])
def test_every_pruned_layer_ends_at_the_target_with_exact_zero_blocks(tmp_path, algorithm, sparsity):
    model, callback, _, _, _ = fit(tmp_path, algorithm, sparsity)
    report = block_sparsity(model, BLOCK, min_blocks=10)
    assert [layer.name for layer in report.layers] == list(PRUNED)
    for layer in report.layers:
        assert layer.num_blocks - layer.zero_blocks == keep_count(PRUNED[layer.name], sparsity)
    dense = block_sparsity(model, BLOCK)["fc2"]
    assert dense.zero_blocks == 0  # under min_blocks: untouched
    assert callback.achieved_sparsity() == pytest.approx(
        1 - sum(keep_count(n, sparsity) for n in PRUNED.values()) / sum(PRUNED.values())
    )


@pytest.mark.parametrize("algorithm", ALGORITHM_IDS)
def test_commit_leaves_plain_weights_with_the_original_keys_and_same_outputs(tmp_path, algorithm):
    model, _, recorder, _, keys_before = fit(tmp_path, algorithm)
    assert list(model.state_dict().keys()) == keys_before
    for module in model.modules():
        assert not hasattr(module, "parametrizations")
        assert not any("block_mask" in name for name, _ in module.named_buffers())
    assert all(isinstance(m.weight, torch.nn.Parameter) for m in (model.conv, model.fc1, model.fc2))
    with torch.no_grad():
        assert torch.equal(model(recorder.probe), recorder.output)
    # loads into the same architecture with no trace of this package
    plain = TinyNet()
    plain.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.equal(plain(recorder.probe), recorder.output)


def test_sapp_folds_the_attention_into_the_committed_weight(tmp_path):
    model, _, recorder, _, _ = fit(tmp_path, "sapp")
    # weights recorded before commit are the effective ones (W * A * mask): commit keeps exactly those
    assert torch.equal(model.fc1.weight, recorder.weights["fc1"])


def test_sapp_sparsification_follows_the_exponential_schedule_and_only_shrinks(tmp_path):
    _, callback, _, probe, _ = fit(tmp_path, "sapp", sparsity=0.9, attention_clipping=False)
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


def test_gmp_follows_the_cubic_ramp_then_fine_tunes_at_the_final_mask(tmp_path):
    _, callback, _, probe, _ = fit(tmp_path, "gmp", sparsity=0.9)  # its own plan: imagenet_gmp
    schedule = callback.schedule
    assert [round(seg.fraction, 2) for seg in schedule.plan.segments] == [0.1, 0.75, 0.15]
    assert schedule.ends == (8, 68, 80)
    from sapp_lightning.schedules import cubic_sparsity

    rows = {row["step"]: row for row in probe.rows}  # state after step n = the masks of step n's forward
    for step in (8, 20, 38, 67):  # the ramp's first step, inside it, and its last
        tau = schedule.locate(step).tau
        expected = [keep_count(n, cubic_sparsity(tau, 0.9)) for n in PRUNED.values()]
        assert rows[step]["kept"] == expected, step
        assert rows[step]["target"] == pytest.approx(cubic_sparsity(tau, 0.9))
    assert rows[20]["kept"] == [8, 107]  # tau = 12/59: 1 - (1 - tau)^3 = 49.4% of the way to 90%
    ramp = [rows[step] for step in range(8, 68)]
    for before, after in zip(ramp, ramp[1:]):  # masks re-chosen every step, among the blocks still kept
        assert all(not (b & ~a).any() for a, b in zip(before["masks"], after["masks"]))
    final = rows[67]["masks"]
    for step in range(68, 80):  # the fine-tuning keeps the final mask
        assert all(torch.equal(a, b) for a, b in zip(rows[step]["masks"], final))
    assert rows[79]["kept"] == [keep_count(n, 0.9) for n in PRUNED.values()]


def test_gmp_zeroes_pruned_blocks_in_place_and_adds_nothing_to_the_forward(tmp_path):
    model, callback, _, probe, _ = fit(tmp_path, "gmp", sparsity=0.5)
    assert not callback.algorithm.reparametrizes
    assert block_sparsity(model, BLOCK, min_blocks=10).zero_blocks == sum(keep_count(n, 0.5) for n in PRUNED.values())


@pytest.mark.parametrize("algorithm", ALGORITHM_IDS)
def test_optimizer_state_is_reset_at_every_phase_boundary(tmp_path, algorithm):
    _, callback, _, probe, _ = fit(tmp_path, algorithm)
    boundaries = {callback.schedule.start(i) for i in range(1, len(callback.schedule.ends))}
    checked = 0
    for row in probe.rows:
        if row["step"] in boundaries:
            assert row["optimizer_state"] == 0
            checked += 1
        elif row["step"] > 1:
            assert row["optimizer_state"] > 0
    assert checked == len(boundaries)


def test_acdc_alternates_and_regrows_pruned_blocks_from_zero(tmp_path):
    _, callback, _, probe, _ = fit(tmp_path, "acdc", sparsity=0.5, plan="criteo")
    sparse_kept = [keep_count(n, 0.5) for n in PRUNED.values()]
    for row in probe.rows:
        assert row["kept"] == (sparse_kept if row["phase"] is Phase.SPARSE else list(PRUNED.values()))
    phases = [row["phase"] for row in probe.rows]
    assert phases.count(Phase.SPARSE) > 0 and phases.count(Phase.DENSE) > 0
    switches = sum(1 for a, b in zip(phases, phases[1:]) if a != b)
    assert switches >= 10


def test_acdc_in_zero_mode_keeps_pruned_weights_at_zero_during_sparse_phases(tmp_path):
    class WeightProbe(pl.Callback):
        def __init__(self, cb):
            self.cb, self.checked = cb, 0

        def on_train_batch_end(self, trainer, pl_module, *args):
            if self.cb.phase is Phase.SPARSE:
                layer = self.cb.layers[1]
                norms = layer.layout.block_norms(layer.raw_weight.detach())
                assert (norms[~layer.mask] == 0).all()
                assert (norms[layer.mask] > 0).all()
                self.checked += 1

    torch.manual_seed(0)
    callback = paper_pruning("acdc")
    weight_probe = WeightProbe(callback)
    make_trainer(tmp_path, [callback, weight_probe]).fit(TinyNet(), tiny_loader())
    assert weight_probe.checked > 0


def test_acdc_mask_mode_keeps_values_under_the_mask(tmp_path):
    class Probe(pl.Callback):
        seen = False

        def on_train_batch_end(self, trainer, pl_module, *args):
            layer = callback.layers[1]
            if callback.phase is Phase.SPARSE and not Probe.seen:
                Probe.seen = True
                raw = layer.layout.block_norms(layer.raw_weight.detach())
                effective = layer.layout.block_norms(layer.effective_weight().detach())
                assert (raw[~layer.mask] > 0).all() and (effective[~layer.mask] == 0).all()

    torch.manual_seed(0)
    callback = paper_pruning("acdc", prune_mode="mask")
    make_trainer(tmp_path, [callback, Probe()]).fit(TinyNet(), tiny_loader())
    assert Probe.seen


@pytest.mark.parametrize("algorithm", ["magnitude", "powerprop"])
def test_one_shot_methods_prune_once_at_the_final_fine_tuning(tmp_path, algorithm):
    _, callback, _, probe, _ = fit(tmp_path, algorithm)
    start = callback.schedule.start(1)
    assert start == round(0.85 * callback.schedule.total_steps)
    for row in probe.rows:
        expected = [keep_count(n, 0.5) for n in PRUNED.values()] if row["step"] >= start else list(PRUNED.values())
        assert row["kept"] == expected


def test_powerprop_starts_from_the_users_init():
    torch.manual_seed(0)
    model = TinyNet()
    before = model.fc1.weight.detach().clone()
    callback = paper_pruning("powerprop")
    callback.sparsifier.prepare(model)
    torch.testing.assert_close(model.fc1.weight, before, rtol=1e-5, atol=1e-6)
    raw = model.fc1.parametrizations.weight.original
    layout = callback.layers[1].layout
    assert not torch.allclose(raw, before)
    torch.testing.assert_close(layout.block_norms(raw.detach()) ** 2, layout.block_norms(before))


@pytest.mark.parametrize("weight_shape", [(10, 12), (6, 4, 3, 3), (10, 7)], ids=["linear", "conv", "ragged"])
def test_powerprop_gradients_match_the_norm_scaled_formula(weight_shape):
    """BlockPowerProp has a hand-written backward where blocks tile the weight: float64 gradcheck, double
    backward, the same gradient as autograd through ``||V_b|| V_b mask_b``, and none into pruned blocks."""
    from sapp_lightning.algorithms.powerprop import BlockPowerProp
    from sapp_lightning.blocks import BlockLayout

    torch.manual_seed(0)
    weight = torch.randn(*weight_shape, dtype=torch.float64, requires_grad=True)
    layout = BlockLayout.for_weight(weight, 2)
    reparam = BlockPowerProp(layout).double()
    reparam.block_mask[0, 0] = False
    torch.autograd.gradcheck(reparam, (weight,))
    torch.autograd.gradgradcheck(reparam, (weight,))
    grad = torch.randn(weight_shape, dtype=torch.float64)
    (ours,) = torch.autograd.grad(reparam(weight), weight, grad)
    norms = layout.block_sq_norms(weight).sqrt() * reparam.block_mask
    (reference,) = torch.autograd.grad(weight * layout.expand(norms), weight, grad)
    torch.testing.assert_close(ours, reference)
    pruned = layout.expand((~reparam.block_mask).double()).bool()
    assert (ours[pruned] == 0).all() and (ours[~pruned] != 0).all()


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


def test_curves_reach_every_logger(tmp_path):
    import pandas as pd
    from pytorch_lightning.loggers import CSVLogger

    torch.manual_seed(0)
    logger = CSVLogger(tmp_path, name="run")
    callback = paper_pruning("sapp", sparsity=0.75)
    make_trainer(tmp_path, [callback], logger=logger, log_every_n_steps=1).fit(TinyNet(), tiny_loader())
    metrics = pd.read_csv(logger.experiment.metrics_file_path)
    steps = metrics.dropna(subset=["pruning/sparsity"])
    assert {"pruning/sparsity", "pruning/target_sparsity", "pruning/phase"} <= set(metrics.columns)
    assert steps["pruning/target_sparsity"].max() == 0.75
    assert set(steps["pruning/phase"].unique()) == {0.0, 1.0, 2.0}
    assert steps["pruning/sparsity"].iloc[-1] == pytest.approx(callback.achieved_sparsity())
    per_layer = metrics.dropna(subset=["pruning/layer/fc1"])
    assert len(per_layer) == len(callback.plan.segments) - 1  # one row per phase end
