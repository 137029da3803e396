"""Block-sparse export: exact outputs, save/load round trip, layers left dense, error messages."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from torch import nn

from sapp_lightning import BlockPruning
from sapp_lightning.export import BlockSparseLinear, load_block_sparse, save_block_sparse, to_block_sparse


def _block_sparse_(linear: nn.Linear, block: int, keep_every: int) -> None:
    """Zero all but every ``keep_every``-th block of ``linear`` (a committed model's pattern)."""
    out_features, in_features = linear.weight.shape
    grid = torch.arange((out_features // block) * (in_features // block)).reshape(out_features // block, -1)
    keep = (grid % keep_every == 0).repeat_interleave(block, 0).repeat_interleave(block, 1)
    with torch.no_grad():
        linear.weight.mul_(keep)


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 32), nn.ReLU(), nn.Linear(32, 3))
    _block_sparse_(net[0], 8, keep_every=10)  # 90% zero blocks
    _block_sparse_(net[2], 8, keep_every=2)  # 50%
    return net


@pytest.mark.parametrize("layout", ["bsr", "csr", "auto"])
def test_outputs_match_the_dense_model(layout):
    net = _net()
    sparse = to_block_sparse(net, block_size=8, min_sparsity=0.5, layout=layout)
    assert isinstance(sparse[0], BlockSparseLinear) and isinstance(sparse[2], BlockSparseLinear)
    assert type(sparse[4]) is nn.Linear  # 4 x 6 blocks of 8, none zero
    assert type(net[0]) is nn.Linear  # not in place by default
    for shape in [(7, 64), (2, 5, 64)]:
        x = torch.randn(shape)
        torch.testing.assert_close(sparse(x), net(x))
    if layout != "auto":
        assert sparse[0].layout == layout


def test_layer_not_sparse_enough_stays_dense():
    net = _net()
    sparse = to_block_sparse(net, block_size=8, min_sparsity=0.8)
    assert isinstance(sparse[0], BlockSparseLinear)
    assert type(sparse[2]) is nn.Linear  # 50% < 80%


def test_nothing_sparse_warns_and_leaves_the_model():
    net = nn.Sequential(nn.Linear(16, 16))
    with pytest.warns(UserWarning, match="no nn.Linear layer"):
        out = to_block_sparse(net, block_size=4)
    assert type(out[0]) is nn.Linear


def test_save_load_round_trip(tmp_path):
    net = _net()
    sparse = to_block_sparse(net, block_size=8, min_sparsity=0.5, layout="bsr")
    path = tmp_path / "model.pt"
    save_block_sparse(sparse, path)
    torch.manual_seed(1)
    fresh = nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 32), nn.ReLU(), nn.Linear(32, 3))
    loaded = load_block_sparse(path, fresh)
    assert isinstance(loaded[0], BlockSparseLinear) and loaded[0].layout == "bsr"
    x = torch.randn(4, 64)
    torch.testing.assert_close(loaded(x), net(x))
    torch.testing.assert_close(loaded[0].to_dense_linear().weight, net[0].weight)


def test_edge_blocks_fall_back_to_csr():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(30, 20))
    with torch.no_grad():
        net[0].weight[:, 8:] = 0  # blocks of 8 do not tile 30 x 20
    sparse = to_block_sparse(net, block_size=8, min_sparsity=0.5)
    assert sparse[0].layout == "csr"
    x = torch.randn(3, 30)
    torch.testing.assert_close(sparse(x), net(x))
    with pytest.raises(ValueError, match="tile the weight"):
        to_block_sparse(net, block_size=8, min_sparsity=0.5, layout="bsr")


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda net: to_block_sparse(net, block_size=8, min_sparsity=1.5), "min_sparsity"),
        (lambda net: to_block_sparse(net, block_size=8, layout="coo"), "layout"),
        (lambda net: to_block_sparse(net, block_size=0), "block_size"),
        (lambda net: save_block_sparse(net, "unused.pt"), "no BlockSparseLinear"),
    ],
    ids=["min_sparsity", "layout", "block_size", "nothing_to_save"],
)
def test_each_error_message(call, match):
    with pytest.raises(ValueError, match=match):
        call(_net())


def test_load_into_another_architecture_is_refused(tmp_path):
    path = tmp_path / "model.pt"
    save_block_sparse(to_block_sparse(_net(), block_size=8), path)
    other = nn.Sequential(nn.Linear(64, 40), nn.ReLU(), nn.Linear(40, 32), nn.ReLU(), nn.Linear(32, 3))
    with pytest.raises(ValueError, match="build the same architecture"):
        load_block_sparse(path, other)
    torch.save({"x": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a block-sparse model"):
        load_block_sparse(tmp_path / "other.pt", _net())


class _Model(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 1))

    def training_step(self, batch, _):
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_export_after_block_pruning():
    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(64, 64), torch.randn(64, 1))
    model = _Model()
    pruning = BlockPruning("sapp", sparsity=0.75, block_size=8, min_blocks=16)
    kwargs = dict(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer = pl.Trainer(max_epochs=2, callbacks=[pruning], **kwargs)
    trainer.fit(model, torch.utils.data.DataLoader(data, batch_size=8))
    sparse = to_block_sparse(model.net, block_size=8, min_sparsity=0.7)
    assert isinstance(sparse[0], BlockSparseLinear) and type(sparse[2]) is nn.Linear
    x = torch.randn(5, 64)
    with torch.no_grad():
        torch.testing.assert_close(sparse(x), model.net(x))


class _Mask(nn.Module):
    def forward(self, weight):
        return weight


def test_uncommitted_model_is_refused():
    net = _net()
    torch.nn.utils.parametrize.register_parametrization(net[0], "weight", _Mask())  # what fit leaves before commit
    with pytest.raises(ValueError, match="not committed"):
        to_block_sparse(net, block_size=8)
