"""What a run's pruning record holds (sapp_lightning/app/history.py): the phases exactly as the plan resolved them,
phases shorter than the logging interval included, and the target and achieved sparsity at each sample and phase
boundary, read back as the sparsity curve's line."""

from __future__ import annotations

import pytest
from helpers import HISTORY_BANDS, pruning_record

from sapp_lightning.app.plots import phase_line


def test_the_record_has_the_exact_phases_and_the_line_is_flat_between_its_jumps():
    pruning = pruning_record()
    assert [(p["phase"], p["start"], p["end"]) for p in pruning["phases"]] == HISTORY_BANDS
    xs, ys = phase_line(pruning, pruning["curve"]["achieved"])
    assert xs == [0, 20, 25, 30, 35, 40, 60, 60, 80, 80, 100]  # jumps exactly at the boundaries 60 and 80
    final = pruning["curve"]["achieved"][-1]
    assert final == pytest.approx(0.9, abs=0.02)
    assert ys[:2] == [0.0, 0.0] and ys[5:7] == [final, final] and ys[7:9] == [0.0, 0.0] and ys[9:] == [final, final]
    ramp = ys[1:6]  # the sparsification phase: through its points, from 0 up to the sparse phase's value
    assert ramp[0] == 0.0 and all(a < b for a, b in zip(ramp, ramp[1:])) and ramp[-1] == final
    tx, ty = phase_line(pruning, pruning["curve"]["target"])
    assert tx == xs and ty[5] == pytest.approx(0.9)  # the plan reaches the target as the phase ends


def test_a_phase_shorter_than_the_logging_interval_still_gets_its_band_and_the_plans_value():
    pruning = pruning_record(every=50)  # sampled at 50 and 100, and at every phase start
    assert [(p["phase"], p["start"], p["end"]) for p in pruning["phases"]] == HISTORY_BANDS
    tx, ty = phase_line(pruning, pruning["curve"]["target"])
    assert list(zip(tx, ty))[-4:] == [(60, 0.0), (80, 0.0), (80, pytest.approx(0.9)), (100, pytest.approx(0.9))]
