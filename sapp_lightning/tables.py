"""One table printer for the whole package: the set-up and export summaries, the sparsity report and the app's
result tables all go through :func:`text_table`.

Example:
    >>> print(text_table(["layer", "blocks"], [["fc1", 192], ["fc2", 6]], align="lr"))
    layer  blocks
    fc1       192
    fc2         6
    >>> print(text_table(["method", "top-1"], [["SA++", "86.40"]], markdown=True))
    | method | top-1 |
    |--------|-------|
    | SA++   | 86.40 |
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def text_table(header: Sequence[Any], rows: Sequence[Sequence[Any]], markdown: bool = False, align: str = "") -> str:
    """``rows`` under ``header``: plain columns two spaces apart (trailing spaces stripped), or with
    ``markdown=True`` a GitHub-flavoured markdown table, which reads well in a terminal too.

    ``align`` gives each column's alignment, ``"l"`` or ``"r"`` (e.g. ``"lrr"``); missing letters mean left.
    """
    cells = [[str(c) for c in header], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    sides = align.ljust(len(widths), "l")

    def line(row: list[str]) -> str:
        padded = [c.rjust(w) if side == "r" else c.ljust(w) for c, w, side in zip(row, widths, sides)]
        return "| " + " | ".join(padded) + " |" if markdown else "  ".join(padded).rstrip()

    if not markdown:
        return "\n".join(map(line, cells))
    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(cells[0]), rule, *map(line, cells[1:])])
