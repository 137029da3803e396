"""Logging follows the library convention: no handler of the package's own, no level reset; the set-up summary
still shows where the application configured nothing, and names the class the user built."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

# each test starts a fresh interpreter (what importing does to logging, and what shows with no handler configured)
pytestmark = pytest.mark.slow

PLAIN_LOOP = """
import torch
from sapp_lightning import BlockSparsifier
model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 1))
BlockSparsifier("sapp", sparsity=0.75, block_size=8, min_blocks=16).prepare(model)
"""


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, check=True)


def test_importing_the_package_adds_no_handler_and_keeps_the_users_level():
    done = run_python(
        """
        import logging
        logging.getLogger("sapp_lightning").setLevel(logging.ERROR)
        import sapp_lightning
        log = logging.getLogger("sapp_lightning")
        print(log.level, len(log.handlers), log.propagate)
        """
    )
    assert done.stdout.split() == [str(40), "0", "True"]


def test_the_set_up_summary_shows_where_nothing_is_configured_and_names_the_sparsifier():
    done = run_python(PLAIN_LOOP)
    assert "BlockSparsifier(sapp): pruning 1 layer(s) to 75.0% block sparsity with 8x8 blocks" in done.stderr
    assert "0      Linear  8x8     yes" in done.stderr


def test_a_configured_application_decides_what_shows():
    quiet = run_python("import logging; logging.basicConfig(level=logging.WARNING)\n" + PLAIN_LOOP)
    assert "BlockSparsifier(sapp)" not in quiet.stderr
    shown = run_python("import logging; logging.basicConfig(level=logging.INFO)\n" + PLAIN_LOOP)
    assert "INFO:sapp_lightning.sparsifier:BlockSparsifier(sapp): pruning 1 layer(s)" in shown.stderr


def test_the_lightning_callback_names_itself():
    done = run_python(
        """
        import torch
        from sapp_lightning import BlockPruning
        model = torch.nn.Sequential(torch.nn.Linear(64, 64))
        BlockPruning("acdc", sparsity=0.5, block_size=8, min_blocks=16).sparsifier.prepare(model)
        """
    )
    assert "BlockPruning(acdc): pruning 1 layer(s)" in done.stderr
