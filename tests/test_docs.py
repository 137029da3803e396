"""Every command the README and docs/results.md show parses today: ``sapp-train`` overrides compose (a sweep's first
value of each list), ``sapp-results`` / ``sapp-export`` / ``bench/*.py`` arguments pass their parsers, ``make``
targets exist. Nothing is trained: a parser that accepts its arguments stops the command right there."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import re
import shlex
from pathlib import Path

import pytest
from helpers import compose_cfg
from hydra.core.override_parser.overrides_parser import OverridesParser

from sapp_lightning.app import cli

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", ROOT / "docs" / "results.md"]
PROGRAMS = ("sapp-train", "sapp-results", "sapp-export", "python", "make")


def commands(doc: Path) -> list[tuple[str, list[str]]]:
    """``(line, argv)`` of each command in the file's ``bash`` blocks, continuation lines joined, ``$VAR`` expanded
    from the block's own assignments, leading ``VAR=value`` environment settings dropped."""
    found = []
    for block in re.findall(r"```bash\n(.*?)```", doc.read_text(), flags=re.S):
        variables: dict[str, str] = {}
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #")[0].strip()
            if not line or line.startswith("#"):
                continue
            assignment = re.fullmatch(r"(\w+)=\"(.*)\"", line)
            if assignment:
                variables[assignment[1]] = assignment[2]
                continue
            for name, value in variables.items():
                line = line.replace(f"${name}", value)
            argv = shlex.split(line, comments=True)
            while argv and re.fullmatch(r"\w+=.*", argv[0]):
                argv = argv[1:]
            if argv and argv[0] in PROGRAMS:
                found.append((line, argv))
    return found


CASES = [pytest.param(argv, id=f"{doc.name}: {line[:90]}") for doc in DOCS for line, argv in commands(doc)]


class Parsed(Exception):
    pass


@pytest.fixture
def parse_only(monkeypatch):
    """argparse parses, then the command stops with :class:`Parsed` before doing anything."""
    original = argparse.ArgumentParser.parse_args

    def parse_args(self, args=None, namespace=None):
        raise Parsed(original(self, args, namespace))

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_args)


def first_of_each_sweep(overrides: list[str]) -> list[str]:
    """A multirun's overrides as one run: the first value of each comma list (Hydra's own parser)."""
    single = []
    for override, text in zip(OverridesParser.create().parse_overrides(overrides), overrides, strict=True):
        if override.is_sweep_override():
            single.append(f"{override.get_key_element()}={next(iter(override.sweep_string_iterator()))}")
        else:
            single.append(text)
    return single


def test_the_docs_show_commands_of_every_program():
    programs = {argv[0] for doc in DOCS for _, argv in commands(doc)}
    assert programs == set(PROGRAMS)


@pytest.mark.usefixtures("parse_only")
@pytest.mark.parametrize("argv", CASES)
def test_a_documented_command_parses(argv, tmp_path):
    program, args = argv[0], argv[1:]
    if program == "make":
        targets = set(re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), flags=re.M))
        assert set(a for a in args if "=" not in a) <= targets
    elif program == "sapp-train":
        overrides = [a for a in args if a not in ("-m", "--multirun", "--cfg", "job")]
        cfg = compose_cfg(first_of_each_sweep(overrides), tmp_path)
        assert cfg.pruning.algorithm  # composed down to the pruning group
    else:
        if program == "python":
            script, args = args[0], args[1:]
            assert script.startswith("bench/") and (ROOT / script).is_file(), script
            main = importlib.import_module(script.removesuffix(".py").replace("/", ".")).main
        else:
            main = {"sapp-results": cli.results, "sapp-export": cli.export}[program]
        with pytest.raises(Parsed):
            main(args)


def test_every_python_m_command_a_comment_names_runs_as_a_script():
    """``python -m MODULE`` in a recipe's or config's comments names a module that does something when run: a package
    with ``__main__.py`` or a module with a script block (without one, Python imports it and exits without a word)."""
    named = {
        match
        for path in [*(ROOT / "recipes").glob("*.yaml"), *(ROOT / "conf").rglob("*.yaml")]
        for match in re.findall(r"python -m ([\w.]+)", path.read_text())
    }
    assert "sapp_lightning.app.configs" in named  # the comments do name some
    for module in named:
        spec = importlib.util.find_spec(module)
        if spec.submodule_search_locations:  # a package: python -m runs its __main__
            assert importlib.util.find_spec(f"{module}.__main__") is not None, module
        else:
            assert 'if __name__ == "__main__"' in Path(spec.origin).read_text(), module
