"""The image classifier logs train/acc at every step, and ``sapp-results --train-acc`` overlays runs' training accuracy
from their CSV logs: the paper's Fig. 3 (ACDC against SA++ at 90%)."""

from __future__ import annotations

import pytest
from test_app import compose_cfg

from sapp_lightning.app.cli import results
from sapp_lightning.app.plots import find_metrics_csv, read_train_accuracy, train_accuracy_figure
from sapp_lightning.app.synthetic import make_fashion_dir
from sapp_lightning.app.train import run


def test_the_image_classifier_logs_its_training_accuracy_at_every_step(tmp_path):
    import pytorch_lightning as pl
    import torch
    from pytorch_lightning.loggers import CSVLogger

    from sapp_lightning.app.models import ImageClassifier

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
    x = torch.randn(24, 3, 2, 2)
    y = net(x).argmax(1)  # labels the untrained net already gets right: accuracy 1 at the first step
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
    trainer = pl.Trainer(max_epochs=2, logger=CSVLogger(tmp_path), log_every_n_steps=1, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    trainer.fit(ImageClassifier(net, num_classes=3, lr=0.0), loader)
    accuracy = read_train_accuracy(tmp_path)
    assert accuracy.index.tolist() == list(range(6)) and accuracy.tolist() == [1.0] * 6


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """ACDC and SA++ at 90% on generated Fashion-MNIST, 2 epochs, train/acc logged at every step (CSV)."""
    root = tmp_path_factory.mktemp("fig3")
    make_fashion_dir(root / "fashion", n_train=200, n_test=20)
    overrides = ["recipe=fashion_mnist_demo", "model.net.hidden=[64]", "trainer.max_epochs=2", "data.batch_size=16"]
    overrides += ["data.val_size=40", "trainer.log_every_n_steps=1", "test=false", "~callbacks.mask_heatmaps"]
    overrides += ["trainer.enable_progress_bar=false", f"data.data_dir={root / 'fashion'}"]
    for algorithm in ("acdc", "sapp"):
        run(compose_cfg([*overrides, f"pruning={algorithm}"], root / "sweep" / algorithm))
    return root / "sweep"


@pytest.mark.slow
def test_train_accuracy_of_two_runs_is_overlaid_in_one_figure(two_runs, tmp_path):
    accuracy = read_train_accuracy(two_runs / "sapp")
    assert accuracy.index.tolist() == list(range(20)) and accuracy.between(0.0, 1.0).all()
    fig = train_accuracy_figure([two_runs])  # a sweep folder: each of its runs
    labels = fig.axes[0].get_legend_handles_labels()[1]
    assert labels == ["ACDC 90% 16x16 seed 0", "SA++ 90% 16x16 seed 0"]
    out = tmp_path / "train_acc.png"
    assert results([str(two_runs / "acdc"), str(two_runs / "sapp"), "--train-acc", str(out)]) == 0
    assert out.stat().st_size > 10_000


def test_a_log_without_train_accuracy_is_named(tmp_path, capsys):
    csv = tmp_path / "metrics.csv"
    csv.write_text("epoch,step,train/loss\n0,9,0.5\n")
    with pytest.raises(ValueError, match=r"metrics.csv logs no train/acc: the image classifier logs it"):
        read_train_accuracy(csv)
    assert results([str(csv), "--train-acc", str(tmp_path / "out.png")]) == 1  # a bare log: the figure only
    assert "logs no train/acc" in capsys.readouterr().err


def test_a_run_folder_resolves_to_its_newest_csv_version_and_several_runs_are_refused(tmp_path):
    for version in (0, 1):
        (tmp_path / "run" / "csv" / f"version_{version}").mkdir(parents=True)
        (tmp_path / "run" / "csv" / f"version_{version}" / "metrics.csv").write_text("step,train/acc\n0,0.5\n")
    assert find_metrics_csv(tmp_path / "run") == tmp_path / "run" / "csv" / "version_1" / "metrics.csv"
    (tmp_path / "other" / "csv" / "version_0").mkdir(parents=True)
    (tmp_path / "other" / "csv" / "version_0" / "metrics.csv").write_text("step,train/acc\n0,0.5\n")
    with pytest.raises(ValueError, match="several runs' logs below"):
        find_metrics_csv(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"no metrics.csv below .*logger=csv"):
        find_metrics_csv(tmp_path / "run" / "nothing")
