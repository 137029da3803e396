"""Block pruning inside a Hugging Face ``transformers.Trainer``: a ``TrainerCallback`` over the Trainer-free
:class:`~sapp_lightning.BlockSparsifier`.

``transformers`` is not a dependency of sapp_lightning: this module imports it, the package root does not.

Example:
    >>> import torch
    >>> from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments
    >>> from sapp_lightning.huggingface import BlockPruningCallback
    >>> model = BertForSequenceClassification(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1,
    ...     num_attention_heads=2, intermediate_size=64, num_labels=2))
    >>> pruning = BlockPruningCallback("sapp", sparsity=0.5, block_size=8, min_blocks=8)
    >>> data = [{"input_ids": torch.randint(64, (8,)), "labels": torch.tensor(i % 2)} for i in range(32)]
    >>> args = TrainingArguments("/tmp/sapp-hf-doctest", max_steps=8, per_device_train_batch_size=8,
    ...     report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True)
    >>> _ = Trainer(model=model, args=args, train_dataset=data, callbacks=[pruning]).train()  # doctest: +ELLIPSIS
    {'train_runtime': ...}
    >>> report = pruning.sparsifier.report()
    >>> report.zero_blocks == report.num_blocks // 2
    True
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from .events import Lifecycle
from .sparsifier import BlockSparsifier

STATE_FILE = "block_pruning.json"


class BlockPruningCallback(TrainerCallback):
    """Prune the Trainer's model while it trains; the arguments are :class:`~sapp_lightning.BlockSparsifier`'s
    (or pass ``sparsifier=`` an existing one).

    The model is prepared when the Trainer is built (``on_init_end``), before it makes its optimizer, so that
    SA++'s logits are among the optimizer's parameters; the plan is laid over ``state.max_steps`` optimizer steps
    (gradient accumulation included); the logits' L2 gradient goes in after gradient clipping, right before each
    optimizer step; the masks move after each; the weights are committed when training ends, so
    ``save_pretrained`` writes plain weights under the model's own names. Each checkpoint folder gets the
    sparsifier's state (``block_pruning.json``), and ``trainer.train(resume_from_checkpoint=...)`` resumes it.
    """

    def __init__(self, *args: Any, sparsifier: BlockSparsifier | None = None, **kwargs: Any) -> None:
        if args and isinstance(args[0], BlockSparsifier):
            sparsifier, args = args[0], args[1:]
        if sparsifier is not None and (args or kwargs):
            raise ValueError("pass either a BlockSparsifier or its arguments to BlockPruningCallback, not both")
        self.sparsifier = sparsifier if sparsifier is not None else BlockSparsifier(*args, **kwargs)
        self.sparsifier.owner = type(self).__name__

    def on_init_end(self, args, state, control, model=None, **kwargs) -> None:
        if model is not None and self.sparsifier.lifecycle is Lifecycle.NEW:
            self.sparsifier.prepare(model)

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs) -> None:
        if self.sparsifier.lifecycle is Lifecycle.NEW:  # added after the Trainer was built
            self.sparsifier.prepare(model)
        if self.sparsifier.lifecycle is not Lifecycle.PREPARED:
            return
        if state.global_step > 0:  # resumed: the model's masks are loaded, the position in the plan is ours
            saved = Path(args.output_dir) / f"checkpoint-{state.global_step}" / STATE_FILE
            if not saved.is_file():
                raise FileNotFoundError(
                    f"resuming at step {state.global_step}, but {saved} is missing: the checkpoint was not written "
                    "with BlockPruningCallback"
                )
            self.sparsifier.load_state_dict(json.loads(saved.read_text()))
        self.sparsifier.attach([optimizer])
        self.sparsifier.start(int(state.max_steps))

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs) -> None:
        if optimizer is not None:
            self.sparsifier.before_optimizer_step(optimizer)

    def on_step_end(self, args, state, control, **kwargs) -> None:
        if self.sparsifier.lifecycle is Lifecycle.TRAINING:
            self.sparsifier.step()

    def on_save(self, args, state, control, **kwargs) -> None:
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if self.sparsifier.lifecycle is Lifecycle.TRAINING and folder.is_dir() and state.is_world_process_zero:
            (folder / STATE_FILE).write_text(json.dumps(self.sparsifier.state_dict()))

    def on_train_end(self, args, state, control, **kwargs) -> None:
        self.sparsifier.commit()
