"""What :func:`~sapp_lightning.export.to_block_sparse` did with every weight of a model."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from ..tables import text_table


@dataclass(frozen=True)
class ExportChoice:
    """One weight of the model: exported (``layout`` is the kernel: ``"own"``, ``"bsr"`` or ``"csr"``) or left
    dense (``layout is None``), and why."""

    name: str
    type_name: str
    layout: str | None
    reason: str = ""
    blocksize: tuple[int, int] | None = None  # (rows, cols) of the out x in weight's blocks; None for CSR
    nonzero_blocks: int | None = None
    num_blocks: int | None = None
    index_dtype: str | None = None

    @property
    def exported(self) -> bool:
        return self.layout is not None

    @property
    def kernel(self) -> str | None:
        return self.layout

    @property
    def zero_fraction(self) -> float | None:
        if self.num_blocks is None or self.nonzero_blocks is None:
            return None
        return 1.0 - self.nonzero_blocks / self.num_blocks


@dataclass(frozen=True)
class ExportSummary:
    """Every weight's :class:`ExportChoice`; :meth:`format` prints them, :meth:`to_dict` for JSON."""

    choices: tuple[ExportChoice, ...]
    batch_size: int
    block_size: tuple[int, int]

    @property
    def exported(self) -> list[ExportChoice]:
        return [c for c in self.choices if c.exported]

    @property
    def dense(self) -> list[ExportChoice]:
        return [c for c in self.choices if not c.exported]

    def __getitem__(self, name: str) -> ExportChoice:
        for choice in self.choices:
            if choice.name == name:
                return choice
        raise KeyError(name)

    def format(self) -> str:
        """One row per weight: its kernel (and blocks) or dense, zero blocks, index dtype, why."""
        rows = []
        for c in self.choices:
            kernel = "dense"
            if c.exported:
                kernel = c.layout + (f" {c.blocksize[0]}x{c.blocksize[1]}" if c.blocksize else "")
            zeros = "—"
            if c.zero_fraction is not None:
                zeros = f"{c.zero_fraction:.0%} ({c.nonzero_blocks}/{c.num_blocks} kept)"
            rows.append((c.name, c.type_name, kernel, zeros, c.index_dtype or "", c.reason))
        return text_table(("layer", "type", "kernel", "zero blocks", "indices", "why / note"), rows)

    def __str__(self) -> str:
        return self.format()

    def to_dict(self) -> dict[str, Any]:
        return {
            "batch_size": self.batch_size,
            "block_size": list(self.block_size),
            "layers": [{**asdict(c), "zero_fraction": c.zero_fraction} for c in self.choices],
        }
