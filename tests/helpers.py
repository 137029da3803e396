"""What the tests share: tiny models and data, one quiet Trainer, the pruning settings most tests use, loops that
drive a sparsifier, state helpers, probes, block zeroing, and the app's records and configs. ``conftest.py``
re-exports these and holds the fixtures; tests import them by name (``from helpers import ...``)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from sapp_lightning import ALGORITHMS, BlockPruning, BlockSparsifier, Phase, block_sparsity, keep_count
from sapp_lightning.blocks import BlockLayout, kernel_kind

ALGORITHM_IDS = tuple(ALGORITHMS)  # every registered algorithm: a new one is tested without anyone listing it

# --- TinyNet and its plan ---------------------------------------------------------------------------------------------
BLOCK = 4
PRUNED = {"conv": 14, "fc1": 192}  # blocks per pruned layer; fc2 (6 blocks) stays dense with min_blocks=10
# 64 samples in batches of 8, 10 epochs: 80 steps. Phases start at steps 0, 16, 48, 64 and 72.
PLAN = [("dense", 0.2), ("sparsify", 0.4), ("sparse", 0.2), ("dense", 0.1), ("sparse", 0.1)]
STEPS = 80
PHASE_STARTS = [0, 16, 48, 64, 72]
EXPECTED_KEPT = [keep_count(n, 0.5) for n in PRUNED.values()]  # kept blocks per pruned layer at 50%


class TinyNet(pl.LightningModule):
    """conv (27x8 kernel: 7x2 blocks of 4x4, a ragged edge) -> fc1 (128x24: 32x6) -> fc2 (24x4: 6x1)."""

    def __init__(self, optimizer: str = "sgd", lr: float = 0.05, weight_decay: float = 0.0, freeze_params=False):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc1 = nn.Linear(128, 24)
        self.fc2 = nn.Linear(24, 4)
        self.optimizer_name, self.lr, self.weight_decay = optimizer, lr, weight_decay
        # A user who lists parameters before fit: parameters added later are left out.
        self.frozen_params = list(self.parameters()) if freeze_params else None

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv(x)), 2)
        return self.fc2(F.relu(self.fc1(x.flatten(1))))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y))

    def configure_optimizers(self):
        params = self.frozen_params if self.frozen_params is not None else self.parameters()
        if self.optimizer_name == "adam":
            return torch.optim.Adam(params, lr=self.lr, weight_decay=self.weight_decay)
        return torch.optim.SGD(params, lr=self.lr, momentum=0.9, weight_decay=self.weight_decay)


def tiny_data(n: int = 64, seed: int = 0) -> TensorDataset:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 8, 8, generator=gen)
    y = torch.randint(0, 4, (n,), generator=gen)
    return TensorDataset(x, y)


def tiny_loader(n: int = 64, batch_size: int = 8) -> DataLoader:
    return DataLoader(tiny_data(n), batch_size=batch_size, shuffle=False)


# --- the quiet Trainer ------------------------------------------------------------------------------------------------
def make_trainer(tmp_path=None, callbacks=(), max_epochs: int | None = 10, *, trainer_class=None, **kwargs):
    """A Trainer that writes and prints nothing of its own (no logger, checkpoints, progress bar, model summary or
    sanity check), deterministic, on the CPU; ``kwargs`` override any of it. ``trainer_class``: another Trainer
    with the same arguments (``lightning.pytorch.Trainer``)."""
    options = dict(
        max_epochs=max_epochs,
        callbacks=list(callbacks),
        default_root_dir=tmp_path,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        deterministic=True,
        accelerator="cpu",
    )
    options.update(kwargs)
    return (trainer_class or pl.Trainer)(**options)


# --- pruning settings -------------------------------------------------------------------------------------------------
def pruning(algorithm: str = "sapp", sparsity: float = 0.5, cls=BlockPruning, **kwargs) -> BlockPruning:
    """TinyNet's pruning: blocks of 4, min_blocks=10 (conv and fc1), :data:`PLAN` unless ``plan`` says otherwise."""
    kwargs.setdefault("plan", PLAN)
    return cls(algorithm, sparsity=sparsity, block_size=BLOCK, min_blocks=10, **kwargs)


def paper_pruning(algorithm: str, sparsity: float = 0.5, **kwargs) -> BlockPruning:
    """As :func:`pruning`, with the paper's ImageNet plan for every algorithm but SA++ (which keeps :data:`PLAN`)."""
    kwargs.setdefault("plan", PLAN if algorithm == "sapp" else "imagenet")
    return BlockPruning(algorithm, sparsity=sparsity, block_size=BLOCK, min_blocks=10, **kwargs)


# --- state ------------------------------------------------------------------------------------------------------------
def state_of(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_same_state(a: dict, b: dict) -> None:
    assert list(a) == list(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key


def kept_blocks(model: nn.Module, prefix: str = "") -> list[int]:
    """Kept blocks of TinyNet's pruned layers (``prefix``: where TinyNet sits in ``model``)."""
    report = block_sparsity(model, BLOCK, min_blocks=10)
    assert [layer.name for layer in report.layers] == [prefix + name for name in PRUNED]
    return [layer.num_blocks - layer.zero_blocks for layer in report.layers]


def zero_blocks_(target, block_size, sparsity: float | None = None, *, blocks=None, param_name: str = "weight"):
    """Zero blocks of a weight in place, as a committed model has them, and return the weight: a random
    ``keep_count`` of the blocks kept at ``sparsity``, or the blocks numbered ``blocks`` (row-major on the block grid)
    zeroed. ``target``: a module (its ``param_name``, laid out as that module's kernel; MultiheadAttention's
    ``in_proj_weight`` as a Linear's) or a weight tensor (laid out by its number of dimensions).

    The same zeroing as ``bench/common.py::zero_random_blocks_`` and ``tests/test_export.py::_zero_blocks_``."""
    if isinstance(target, nn.Module):
        weight = getattr(target, param_name)
        kind = kernel_kind(target) if param_name == "weight" else "linear"
    else:
        weight, kind = target, None
    layout = BlockLayout.for_weight(weight, block_size, kind=kind)
    keep = torch.ones(layout.num_blocks, dtype=torch.bool)
    if sparsity is not None:
        keep = torch.zeros(layout.num_blocks, dtype=torch.bool)
        keep[torch.randperm(layout.num_blocks)[: keep_count(layout.num_blocks, sparsity)]] = True
    if blocks is not None:
        keep[list(blocks)] = False
    with torch.no_grad():
        layout.scale_(weight, keep.reshape(layout.grid_shape))
    return weight


def save_checkpoint_holding(path: Path, extra: object) -> Path:
    """A checkpoint file of one weight with ``extra`` (a pickled object, say) among its callbacks' state."""
    torch.save({"state_dict": {"fc.weight": torch.ones(2, 2)}, "callbacks": {"Evil": extra}}, path)
    return path


# --- callbacks that watch or poke a fit -------------------------------------------------------------------------------
class MaskRecorder(pl.Callback):
    """Placed before BlockPruning: keeps the masks as they are when fit ends, before the commit."""

    def __init__(self, callback: BlockPruning):
        self.callback, self.masks = callback, None

    def on_fit_end(self, trainer, pl_module):
        self.masks = [layer.mask.clone() for layer in self.callback.layers]


class OutputRecorder(pl.Callback):
    """Placed before BlockPruning: sees the masked model at fit end, before the commit (its output on ``probe``
    and its children's weights)."""

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


class Inject(pl.Callback):
    """Placed before BlockPruning: runs ``fn(callback)`` right after optimizer step ``step``."""

    def __init__(self, callback: BlockPruning, step: int, fn):
        self.callback, self.step, self.fn = callback, step, fn

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == self.step:
            with torch.no_grad():
                self.fn(self.callback)


class SaveAt(pl.Callback):
    """Placed after BlockPruning: ``trainer.save_checkpoint`` after the given optimizer steps, as
    ``ModelCheckpoint(every_n_train_steps=...)`` does (without writing a file at every step)."""

    def __init__(self, dirpath, steps):
        self.dirpath, self.steps = dirpath, set(steps)

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step in self.steps:
            trainer.save_checkpoint(self.dirpath / f"step={trainer.global_step}.ckpt")


class PhaseStarts:
    """A sparsifier listener: the step at which each phase started."""

    def __init__(self, sparsifier: BlockSparsifier):
        self.steps: list[int] = []
        sparsifier.add_listener(lambda s, event: self.steps.append(event.step) if event.kind == "phase_start" else None)


# --- fits of TinyNet --------------------------------------------------------------------------------------------------
class ResumableLoader(DataLoader):
    """A DataLoader that resumes mid-epoch: Lightning saves its ``state_dict`` in every checkpoint."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._skip, self._yielded = 0, 0

    def __iter__(self):
        skip, self._skip = self._skip, 0
        self._yielded = skip
        for index, batch in enumerate(super().__iter__()):
            if index >= skip:
                self._yielded += 1
                yield batch

    def state_dict(self):
        # Lightning 2.6 does not fetch ahead from a loader with a length: every batch yielded was trained on
        return {"consumed": self._yielded}

    def load_state_dict(self, state):
        self._skip = state["consumed"]


def resumable_loader() -> ResumableLoader:
    return ResumableLoader(tiny_data(), batch_size=8, shuffle=False)


def run(tmp_path, algorithm="sapp", ckpt_path=None, checkpoint=None, callback=None, **trainer_kwargs):
    """TinyNet (Adam) fit on the resumable loader with ``callback`` (:func:`pruning` of ``algorithm``) and a
    :class:`MaskRecorder`; ``checkpoint``: checkpoint callbacks. Returns the model, callback, recorder, trainer."""
    torch.manual_seed(0)
    model = TinyNet(optimizer="adam", lr=1e-2)
    callback = callback or pruning(algorithm)
    recorder = MaskRecorder(callback)
    checkpoints = [checkpoint] if isinstance(checkpoint, pl.Callback) else list(checkpoint or [])
    trainer = make_trainer(
        tmp_path, [recorder, callback, *checkpoints], enable_checkpointing=bool(checkpoints), **trainer_kwargs
    )
    trainer.fit(model, resumable_loader(), ckpt_path=ckpt_path)
    return model, callback, recorder, trainer


def fit_and_probe(tmp_path, algorithm, sparsity=0.5, model=None, extra_callbacks=(), **kwargs):
    """TinyNet (SGD) fit with :func:`paper_pruning`, an :class:`OutputRecorder` and a :class:`StepProbe`. Returns the
    model, callback, recorder, probe and the model's state_dict keys before fit."""
    torch.manual_seed(0)
    model = model or TinyNet()
    callback = paper_pruning(algorithm, sparsity, **kwargs)
    recorder = OutputRecorder(torch.randn(5, 3, 8, 8))
    probe = StepProbe(callback)
    trainer = make_trainer(tmp_path, [recorder, callback, probe, *extra_callbacks])
    keys_before = list(model.state_dict().keys())
    trainer.fit(model, tiny_loader())
    return model, callback, recorder, probe, keys_before


# The checkpoints conftest's ``full_runs`` writes: file, global step, phase.
RESUME_POINTS = {
    "dense": ("step=10.ckpt", 10, Phase.DENSE),
    "sparsify": ("step=29.ckpt", 29, Phase.SPARSIFY),
    "sparse": ("step=53.ckpt", 53, Phase.SPARSE),
    "epoch_end": ("epoch-step=40.ckpt", 40, Phase.SPARSIFY),
}


# --- a plain loop: TinyNet and a sparsifier on LOOP_PLAN --------------------------------------------------------------
LOOP_PLAN = [("dense", 0.2), ("sparsify", 0.4), ("sparse", 0.4)]  # 40 steps: sparsify [8, 24), sparse [24, 40)


def loop_sparsifier(algorithm="sapp", sparsity=0.5, **kwargs) -> BlockSparsifier:
    return BlockSparsifier(algorithm, sparsity, BLOCK, min_blocks=10, plan=LOOP_PLAN, **kwargs)


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


def attention_of(s: BlockSparsifier) -> list[torch.Tensor]:
    return [layer.reparam.attention().detach() for layer in s.layers]


# Weight shapes and block sizes the parametrizations are checked on.
REPARAM_SHAPES = {
    "linear": ((12, 8), (4, 4)),  # tiles: the block view
    "ragged": ((10, 7), (4, 4)),  # kernel 7 x 10: edge blocks of 3 rows and 2 columns
    "conv": ((6, 8, 3, 3), (4, 3)),  # 4 | cin: the conv block view
    "conv-ragged": ((6, 5, 3, 3), (4, 4)),  # 4 does not divide cin = 5: blocks span taps, padded copy
    "conv-1x1": ((6, 8, 1, 1), (4, 3)),
}


# --- models nobody here wrote, from tiny configs (no downloads) -------------------------------------------------------
# How tests prune them: 50% of the blocks of 8x8 of every layer with 4 or more, over a few steps.
MODEL_PLAN = [("dense", 0.25), ("sparsify", 0.25), ("sparse", 0.5)]
MODEL_SPARSITY, MODEL_BLOCK, MODEL_STEPS = 0.5, 8, 12


def tiny_bert():
    import transformers  # a test dependency ([dev]), never one of sapp_lightning

    config = transformers.BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=16, num_labels=2,
    )  # fmt: skip
    return transformers.BertForSequenceClassification(config)


def tiny_gpt2():
    import transformers

    config = transformers.GPT2Config(
        vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0
    )
    return transformers.GPT2LMHeadModel(config)


def tokens():
    return torch.randint(64, (4, 16), generator=torch.Generator().manual_seed(0))


def assert_exact_blocks(sparsifier: BlockSparsifier, sparsity: float) -> None:
    for layer in sparsifier.report().layers:
        assert layer.zero_blocks == layer.num_blocks - keep_count(layer.num_blocks, sparsity), layer.name


# --- a CTR model for the Criteo and MovieLens data modules ------------------------------------------------------------
class TinyCTR(pl.LightningModule):
    """One 2-wide embedding per categorical feature and a linear head; ``seen`` keeps each training batch's first
    dense feature."""

    def __init__(self, cardinalities: list[int], num_dense: int = 13, momentum: float = 0.0):
        super().__init__()
        self.embeddings = nn.ModuleList(nn.Embedding(c, 2) for c in cardinalities)
        self.head = nn.Linear(num_dense + 2 * len(cardinalities), 1)
        self.momentum = momentum
        self.seen: list[torch.Tensor] = []

    def forward(self, dense, cats):
        embedded = [e(cats[:, i]) for i, e in enumerate(self.embeddings)]
        return self.head(torch.cat([dense, *embedded], dim=1)).squeeze(1)

    def training_step(self, batch, _):
        dense, cats, label = batch
        self.seen.append(dense[:, 0].clone())
        return nn.functional.binary_cross_entropy_with_logits(self(dense, cats), label)

    def validation_step(self, batch, _):
        dense, cats, label = batch
        self.log("val_loss", nn.functional.binary_cross_entropy_with_logits(self(dense, cats), label))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=self.momentum)


# --- the app: configs, run records, pictures --------------------------------------------------------------------------
def compose_cfg(overrides: list[str], output_dir: Path):
    """sapp-train's config as Hydra composes it for ``overrides``, writing into ``output_dir``."""
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig

    from sapp_lightning.app.configs import CONFIG_DIR

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("config", overrides=[*overrides, f"output_dir={output_dir}"], return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    return cfg


def record(algorithm: str, sparsity: float, block: int, seed: int, value: float, **extra) -> dict:
    """A run's results.json as ``sapp_lightning.app.train.run`` writes it (``value``: top-1 or, for CTR, BCE)."""
    task = extra.pop("task", "classification")
    val = {"val/acc": value, "val/loss": 1 - value} if task == "classification" else {"val/loss": value}
    dense = algorithm in ("dense", "none")
    return {
        "name": "demo", "algorithm": algorithm, "sparsity": sparsity, "block_size": block, "seed": seed,
        "data": "FashionMNISTDataModule", "model": "MLP", "task": task, "val": val | extra.pop("val", {}),
        "test": {k.replace("val/", "test/"): v for k, v in val.items()}, "achieved_block_sparsity": sparsity,
        "achieved_weight_sparsity": sparsity, "pruned_layers": [] if dense else ["net.1"], "fit_seconds": 1.0,
        "steps": 100, "epochs": 2,
    } | extra  # fmt: skip


def write_run(folder: Path, row: dict, overrides: list[str] | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "results.json").write_text(json.dumps(row))
    if overrides is not None:  # what Hydra records of a sweep's job
        (folder / ".hydra").mkdir()
        (folder / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    return folder


def write_jsonl(path: Path, rows: list[dict], torn: bool = True) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + ('{"key": "torn", "algo' if torn else ""))
    return path


def score_rows() -> list[dict]:
    """SA++ on two models with attention (plain or explicit) and magnitude scores; one unpaired run, one ACDC run."""
    rows = []
    for model, blocks in (("MLP", (8, 16)), ("SmallCNN", (16,))):
        for block in blocks:
            for sparsity in (0.8, 0.9):
                for seed in range(3):
                    attention = "" if model == "MLP" else "pruning.score=attention"
                    for variant, acc in ((attention, 0.80 + 0.01 * seed), ("pruning.score=magnitude", 0.79)):
                        cell = dict(model=model, block_size=block, sparsity=sparsity, seed=seed, variant=variant)
                        key = f"{model}{block}{sparsity}{seed}{variant}"
                        rows.append(dict(cell, key=key, algorithm="sapp", val={"val/acc": acc + block / 1000}))
    rows.append(dict(rows[0], key="unpaired", seed=7))
    rows.append(dict(rows[0], key="acdc", algorithm="acdc", variant="", val={"val/acc": 0.1}))
    return rows


def grid_rows() -> list[dict]:
    """Dense, two methods x two sparsities x two blocks x three seeds, and a variant run to be left out."""
    rows = [record("dense", 0.0, 0, s, 0.88 + s / 100) | {"key": f"dense/{s}"} for s in range(3)]
    for block in (8, 16):
        for sparsity in (0.7, 0.9):
            for method, base in (("acdc", 80.0), ("sapp", 82.0)):
                for s in range(3):
                    acc = (base - 10 * sparsity - block / 8 + s) / 100
                    rows.append(record(method, sparsity, block, s, acc) | {"key": f"{method}/{sparsity}/{block}/{s}"})
    rows.append(rows[-1] | {"key": "ablation", "variant": "pruning.schedule_exponent=2", "val": {"val/acc": 0.0}})
    return rows


# A plan of 100 steps: dense, sparsify (to 90%), sparse, dense, sparse.
HISTORY_PLAN = [("dense", 0.2), ("sparsify", 0.2), ("sparse", 0.2), ("dense", 0.2), ("sparse", 0.2)]
HISTORY_BANDS = [("dense", 0, 20), ("sparsify", 20, 40), ("sparse", 40, 60), ("dense", 60, 80), ("sparse", 80, 100)]


def pruning_record(algorithm: str = "sapp", every: int = 5, total: int = 100) -> dict:
    """What :class:`PruningHistory` records of a sparsifier driven through ``HISTORY_PLAN`` (two 32x32 layers, 4x4
    blocks), sampled after every ``every``-th step as the Lightning hook does."""
    from sapp_lightning.app.history import PruningHistory

    sparsifier = BlockSparsifier(algorithm, 0.9, 4, min_blocks=1, plan=HISTORY_PLAN)
    history = PruningHistory(sparsifier, every_n_steps=every)
    model = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.ReLU(), torch.nn.Linear(32, 32))
    sparsifier.prepare(model)
    sparsifier.attach([torch.optim.SGD(model.parameters(), lr=0.1)])  # no training: the masks follow the plan
    sparsifier.start(total_steps=total)
    for step in range(1, total + 1):
        sparsifier.step()
        if step % every == 0:
            history.sample()
    sparsifier.commit()
    return history.to_dict()


def run_record(algorithm: str = "sapp", **kwargs) -> dict:
    """A pruned run's results.json with its pruning record."""
    return record(algorithm, 0.9, 4, 0, 0.8) | {"pruning": pruning_record(algorithm, **kwargs)}


def png_pixels(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def rgb(color: str) -> np.ndarray:
    return np.array([int(color[i : i + 2], 16) for i in (1, 3, 5)])


def count_color(pixels: np.ndarray, color: str, tolerance: int = 0) -> int:
    return int((np.abs(pixels.astype(int) - rgb(color)).max(axis=-1) <= tolerance).sum())
