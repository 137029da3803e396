"""The fixtures tests share; the factories, constants and probes are in ``helpers.py`` (re-exported here for code that
imports them from ``conftest``)."""

from __future__ import annotations

import pytest
from helpers import (  # noqa: F401 (re-exported)
    ALGORITHM_IDS,
    BLOCK,
    PHASE_STARTS,
    PLAN,
    PRUNED,
    RESUME_POINTS,
    STEPS,
    Inject,
    MaskRecorder,
    ResumableLoader,
    SaveAt,
    TinyNet,
    assert_same_state,
    make_trainer,
    pruning,
    resumable_loader,
    run,
    state_of,
    tiny_data,
    tiny_loader,
)


@pytest.fixture(scope="session")
def full_runs(tmp_path_factory):
    """One uninterrupted :func:`helpers.run` per algorithm with a checkpoint at each of :data:`RESUME_POINTS`
    (cached for the session): ``full_runs(algorithm)`` gives the checkpoint folder, the final state and the masks
    before the commit."""
    from pytorch_lightning.callbacks import ModelCheckpoint

    cache = {}

    def get(algorithm):
        if algorithm not in cache:
            root = tmp_path_factory.mktemp(f"full-{algorithm}")
            mid_epoch = SaveAt(root / "ckpt", [step for name, step, _ in RESUME_POINTS.values() if name[0] == "s"])
            every_epoch = ModelCheckpoint(dirpath=root / "ckpt", filename="epoch-{step}", save_top_k=-1)
            model, callback, recorder, trainer = run(root, algorithm, checkpoint=[mid_epoch, every_epoch])
            assert trainer.global_step == STEPS
            cache[algorithm] = (root / "ckpt", state_of(model), recorder.masks)
        return cache[algorithm]

    return get


@pytest.fixture(scope="session")
def fashion_dir(tmp_path_factory):
    """Generated Fashion-MNIST files: 100 training and 20 test images (read only: tests write elsewhere)."""
    from sapp_lightning.app.synthetic import make_fashion_dir

    folder = tmp_path_factory.mktemp("fashion")
    make_fashion_dir(folder, n_train=100, n_test=20)
    return folder
