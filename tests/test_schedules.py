import math
import re

import pytest
from helpers import BLOCK

from sapp_lightning import BlockPruning
from sapp_lightning.schedules import Phase, PhasePlan, exponential_sparsity


@pytest.mark.parametrize(
    "c, row",
    [
        (2, [0, 0.210, 0.455, 0.731, 0.898, 1]),
        (4, [0, 0.336, 0.644, 0.881, 0.968, 1]),
        (8, [0, 0.551, 0.865, 0.982, 0.998, 1]),
    ],
)
def test_exponential_schedule_matches_the_spec_table(c, row):
    for tau, expected in zip([0, 0.1, 0.25, 0.5, 0.75, 1], row):
        assert exponential_sparsity(tau, target=1.0, c=c) == pytest.approx(expected, abs=5e-4)


def test_exponential_schedule_from_a_nonzero_start_is_monotone():
    values = [exponential_sparsity(t / 20, target=0.9, c=4, start=0.3) for t in range(21)]
    assert values[0] == 0.3 and values[-1] == pytest.approx(0.9)
    assert all(a < b for a, b in zip(values, values[1:]))


def phases(plan):
    return [(seg.phase.name.lower(), round(seg.fraction * 100, 4)) for seg in plan.segments]


def test_imagenet_acdc_plan():
    plan = phases(PhasePlan.named("imagenet_acdc"))
    assert plan[0] == ("dense", 10)
    assert plan[1:13] == [("sparse", 5), ("dense", 5)] * 6
    assert plan[13:] == [("sparse", 5), ("dense", 10), ("sparse", 15)]


def test_imagenet_sapp_plan():
    plan = phases(PhasePlan.named("imagenet_sapp"))
    third = round(10 / 3, 4)
    assert plan[0] == ("dense", 10)
    assert plan[1:19] == [("sparsify", third), ("sparse", third), ("dense", third)] * 6
    assert plan[19:] == [("sparsify", 15), ("sparse", 15)]


def test_criteo_plans():
    assert phases(PhasePlan.named("criteo_acdc")) == [("dense", 20)] + [("sparse", 3), ("dense", 3)] * 10 + [
        ("sparse", 20)
    ]
    assert phases(PhasePlan.named("criteo_sapp")) == [("dense", 20)] + [
        ("sparsify", 2),
        ("sparse", 2),
        ("dense", 2),
    ] * 9 + [
        ("sparsify", 6),
        ("sparse", 20),
    ]


@pytest.mark.parametrize("setup, final", [("imagenet", 85), ("criteo", 80)])
def test_oneshot_plans_prune_before_the_final_fine_tuning(setup, final):
    assert phases(PhasePlan.named(f"{setup}_oneshot")) == [("dense", final), ("sparse", 100 - final)]


@pytest.mark.parametrize("name", ["imagenet_acdc", "imagenet_sapp", "imagenet_oneshot", "criteo_acdc", "criteo_sapp"])
def test_named_plans_cover_training(name):
    assert math.isclose(sum(seg.fraction for seg in PhasePlan.named(name).segments), 1.0)


def test_parse_resolves_setup_names_per_algorithm_kind():
    assert PhasePlan.parse("criteo", "sapp") == PhasePlan.named("criteo_sapp")
    assert PhasePlan.parse("imagenet_acdc", "sapp") == PhasePlan.named("imagenet_acdc")  # the no-sparsify ablation
    custom = PhasePlan.parse([["dense", 0.5], {"phase": "sparse", "fraction": 0.5}], "acdc")
    assert [s.phase for s in custom.segments] == [Phase.DENSE, Phase.SPARSE]


def test_resolve_and_locate():
    schedule = PhasePlan.parse([("dense", 0.25), ("sparsify", 0.5), ("sparse", 0.25)], "sapp").resolve(100)
    assert schedule.ends == (25, 75, 100)
    assert schedule.locate(0).phase is Phase.DENSE
    assert schedule.locate(24).phase is Phase.DENSE
    start = schedule.locate(25)
    assert (start.phase, start.tau) == (Phase.SPARSIFY, 0.0)
    assert schedule.locate(50).tau == 25 / 49
    assert schedule.locate(74).tau == 1.0  # a phase's last step: a sparsification phase reaches its target there
    assert schedule.locate(75).phase is Phase.SPARSE
    assert schedule.locate(1000).index == 2  # past the end: the last phase


def test_tiny_runs_report_empty_phases():
    schedule = PhasePlan.named("imagenet_acdc").resolve(10)
    assert schedule.empty_segments()
    assert schedule.ends[-1] == 10


def test_plan_that_does_not_cover_training_is_rejected():
    with pytest.raises(ValueError, match="must cover training exactly"):
        PhasePlan.parse([("dense", 0.5), ("sparse", 0.4)], "acdc")


def test_plan_with_a_nonpositive_phase_is_rejected():
    with pytest.raises(ValueError, match="positive length"):
        PhasePlan.parse([("dense", 1.2), ("sparse", -0.2)], "acdc")


def test_unknown_phase_is_rejected():
    with pytest.raises(ValueError, match="unknown phase 'prune'"):
        PhasePlan.parse([("prune", 1.0)], "acdc")


def test_unknown_plan_name_is_rejected():
    with pytest.raises(ValueError, match="unknown phase plan 'cifar'"):
        PhasePlan.parse("cifar", "acdc")


def test_nonpositive_exponent_is_rejected():
    with pytest.raises(ValueError, match="exponent c must be > 0"):
        exponential_sparsity(0.5, 0.9, c=0)


def test_cubic_ramp_is_gradual_magnitude_prunings():
    from sapp_lightning.schedules import cubic_sparsity

    # Zhu & Gupta: s_t = s_f + (s_i - s_f) (1 - tau)^3
    assert [cubic_sparsity(t, 0.8) for t in (0, 0.5, 1)] == pytest.approx([0.0, 0.7, 0.8])
    assert cubic_sparsity(0.5, 0.8, start=0.4) == pytest.approx(0.75)


@pytest.mark.parametrize("setup, final, dense", [("imagenet", 15, 10), ("criteo", 20, 20)])
def test_gmp_plans_keep_the_first_dense_and_last_fine_tuning_of_the_other_methods(setup, final, dense):
    assert phases(PhasePlan.named(f"{setup}_gmp")) == [("dense", dense), ("sparsify", 100 - dense - final),
                                                       ("sparse", final)]  # fmt: skip


@pytest.mark.parametrize(
    "name, cycles",
    [("imagenet_sapp", 6), ("imagenet_acdc", 6), ("criteo_sapp", 9), ("criteo_acdc", 10)],
)
def test_the_papers_plans_are_their_templates_with_the_papers_cycle_count(name, cycles):
    assert PhasePlan.cycled(name, cycles) == PhasePlan.named(name)
    assert PhasePlan.parse(f"{name.split('_')[0]}:{cycles}", name.split("_")[1]) == PhasePlan.named(name)


def test_fewer_cycles_share_the_same_span():
    assert phases(PhasePlan.cycled("imagenet_sapp", 2)) == [("dense", 10)] + [
        ("sparsify", 10), ("sparse", 10), ("dense", 10)] * 2 + [("sparsify", 15), ("sparse", 15)]  # fmt: skip
    # no cycle: SA++ ramps once from 10% to 85%; ACDC trains dense up to the paper's last sparse-dense cycle
    assert phases(PhasePlan.cycled("imagenet_sapp", 0)) == [("dense", 10), ("sparsify", 75), ("sparse", 15)]
    assert phases(PhasePlan.cycled("imagenet_acdc", 0)) == [("dense", 70), ("sparse", 5), ("dense", 10),
                                                            ("sparse", 15)]  # fmt: skip
    assert phases(PhasePlan.cycled("criteo_acdc", 0)) == [("dense", 80), ("sparse", 20)]


@pytest.mark.parametrize(
    "kind, picks",
    [("sapp", {100: 0, 1_000: 0, 10_000: 4, 100_000: 6}), ("acdc", {100: 0, 1_000: 0, 10_000: 6, 100_000: 6})],
)
def test_auto_plan_picks_cycles_by_training_length(kind, picks):
    from sapp_lightning.schedules import AutoPlan

    auto = PhasePlan.parse("auto", kind)
    assert isinstance(auto, AutoPlan)
    for steps, cycles in picks.items():
        assert auto.cycles(steps) == cycles
        assert auto.resolve(steps).plan == PhasePlan.cycled(f"imagenet_{kind}", cycles)
        assert auto.describe(steps).startswith(f"auto, {steps} steps: {cycles} of the paper's 6 (")
    # every phase of a cycle gets at least min_phase_steps (500) of the 60% the cycles share: the paper's 6 cycles
    # of 3 (SA++) or 2 (ACDC) phases from 15,000 or 10,000 steps on
    assert auto.cycles({"sapp": 15_000, "acdc": 10_000}[kind]) == 6
    assert auto.cycles({"sapp": 14_999, "acdc": 9_999}[kind]) == 5


def test_auto_plan_says_what_it_picked():
    from sapp_lightning.schedules import AutoPlan

    assert AutoPlan("sapp").describe(100) == (
        "auto, 100 steps: 0 of the paper's 6 (sparsify, sparse, dense) cycles (a phase needs 500 steps): one ramp "
        "over 75% of training"
    )
    assert AutoPlan("acdc").describe(100) == (
        "auto, 100 steps: 0 of the paper's 6 (sparse, dense) cycles (a phase needs 500 steps): dense until the "
        "last 30% of training"
    )
    assert AutoPlan("sapp", min_phase_steps=50).describe(1_000) == (
        "auto, 1000 steps: 4 of the paper's 6 (sparsify, sparse, dense) cycles of 50-step phases (at least 50)"
    )
    assert AutoPlan("gmp").describe(1_000) == "auto, 1000 steps: the imagenet_gmp plan (no cycles to choose)"
    assert PhasePlan.parse("criteo_auto:50", "sapp") == AutoPlan("sapp", "criteo", 50)
    assert AutoPlan("sapp", "criteo", 50).to_config() == "criteo_auto:50"


def test_a_plan_count_that_is_not_a_number_is_rejected():
    with pytest.raises(ValueError, match="after ':' comes a whole number"):
        PhasePlan.parse("imagenet:two", "sapp")


def test_cycles_of_a_plan_without_cycles_are_rejected():
    with pytest.raises(ValueError, match="'imagenet_gmp' has no cycles to count"):
        PhasePlan.parse("imagenet:2", "gmp")


def test_a_negative_cycle_count_is_rejected():
    with pytest.raises(ValueError, match="the number of cycles must be an int >= 0"):
        PhasePlan.cycled("imagenet_sapp", -1)


def test_an_unknown_auto_setup_is_rejected():
    with pytest.raises(ValueError, match="auto plans are 'auto', 'imagenet_auto', 'criteo_auto'"):
        PhasePlan.parse("cifar_auto", "sapp")


def test_an_auto_plan_needs_a_positive_phase_length():
    from sapp_lightning.schedules import AutoPlan

    with pytest.raises(ValueError, match="min_phase_steps must be an int >= 1"):
        AutoPlan("sapp", min_phase_steps=0)


def test_an_unknown_ramp_is_rejected():
    from sapp_lightning.schedules import Ramp

    with pytest.raises(ValueError, match="ramp must be one of 'exponential', 'cubic'"):
        Ramp("linear")


def test_a_callbacks_plan_that_does_not_cover_training_is_rejected():
    with pytest.raises(ValueError, match="must cover training exactly"):
        BlockPruning("acdc", sparsity=0.5, block_size=4, plan=[("dense", 0.5), ("sparse", 0.3)])


def test_bad_schedule_exponent():
    with pytest.raises(ValueError, match=re.escape("schedule_exponent must be > 0")):
        BlockPruning("sapp", 0.5, BLOCK, schedule_exponent=0)
