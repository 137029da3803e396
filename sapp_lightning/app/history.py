"""What a run's sparsifier did, as it did it: the resolved plan, the steps each phase covered, and block sparsity
(the plan's target, the achieved, each layer's) at every logging interval and phase boundary. The app writes it into
``results.json`` (``"pruning"``), and the figures and tables read it from there.

Example:
    >>> import torch
    >>> from sapp_lightning import BlockSparsifier
    >>> sparsifier = BlockSparsifier("acdc", 0.5, 4, min_blocks=1, plan=[("dense", 0.5), ("sparse", 0.5)])
    >>> history = PruningHistory(sparsifier, every_n_steps=2)
    >>> model = torch.nn.Sequential(torch.nn.Linear(8, 8))
    >>> _ = sparsifier.prepare(model); sparsifier.attach([]); sparsifier.start(total_steps=4)
    >>> for _ in range(4):
    ...     sparsifier.step(); history.sample()
    >>> sparsifier.commit()
    >>> record = history.to_dict()
    >>> [(p["phase"], p["start"], p["end"]) for p in record["phases"]]
    [('dense', 0, 2), ('sparse', 2, 4)]
    >>> record["curve"]["step"], record["curve"]["achieved"]
    ([0, 1, 2, 3, 4], [0.0, 0.0, 0.5, 0.5, 0.5])
"""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl

from sapp_lightning import BlockSparsifier, PruningEvent


class PruningHistory(pl.Callback):
    """Records a sparsifier's phases and sparsity curves for ``results.json``; a Lightning callback that samples
    after each ``every_n_steps``-th optimizer step (place it after the pruning callback) and keeps its record in
    checkpoints, so a resumed run's history is whole."""

    def __init__(self, sparsifier: BlockSparsifier, every_n_steps: int = 50) -> None:
        self.sparsifier = sparsifier
        self.every_n_steps = max(1, int(every_n_steps))
        self.plan: list[list[Any]] = []
        self.total_steps: int | None = None
        self.phases: list[dict[str, Any]] = []
        self.curve: dict[str, Any] = {"step": [], "target": [], "achieved": [], "layers": {}}
        sparsifier.add_listener(self._on_event)  # a bound method: ddp_spawn pickles the callback

    def _on_event(self, sparsifier: BlockSparsifier, event: PruningEvent) -> None:
        if event.kind == "phase_start":
            schedule = sparsifier.schedule
            self.plan, self.total_steps = schedule.plan.to_config(), schedule.total_steps
            index = event.segment_index
            if self.phases and self.phases[-1]["index"] == index:  # the same phase, entered again on a resume
                return
            self.phases.append({"index": index, "phase": event.phase.name.lower(), "start": event.step,
                                "end": schedule.ends[index]})  # fmt: skip
            self.sample()
        elif event.kind == "commit" and self.phases:  # where training stopped (early, or at the plan's end)
            self.phases[-1]["end"] = min(self.phases[-1]["end"], max(event.step, self.phases[-1]["start"] + 1))

    def sample(self) -> None:
        """One point of the curves: the masks the next forward pass (step ``steps_done``) trains with."""
        sparsifier = self.sparsifier
        step = sparsifier.steps_done
        curve = self.curve
        if curve["step"] and curve["step"][-1] == step:  # a phase start and a logging interval on the same step
            for key in ("step", "target", "achieved"):
                curve[key].pop()
            for values in curve["layers"].values():
                values.pop()
        curve["step"].append(step)
        curve["target"].append(round(sparsifier.target_sparsity(), 6))
        curve["achieved"].append(round(sparsifier.achieved_sparsity(), 6))
        for name, value in sparsifier.layer_sparsity().items():
            curve["layers"].setdefault(name, []).append(round(value, 6))

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if trainer.global_step % self.every_n_steps == 0 and self.sparsifier.cursor is not None:
            self.sample()

    def to_dict(self) -> dict[str, Any]:
        return {"plan": self.plan, "total_steps": self.total_steps, "phases": self.phases, "curve": self.curve}

    def state_dict(self) -> dict[str, Any]:
        return self.to_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.plan, self.total_steps = state_dict["plan"], state_dict["total_steps"]
        self.phases, self.curve = state_dict["phases"], state_dict["curve"]
