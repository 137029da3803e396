import math

import pytest

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
