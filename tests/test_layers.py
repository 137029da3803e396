"""The layers you can see in the tree: the pure-torch core imports nothing of the adapters or the app, the adapters
import only the core, the app only the public API, and no module imports itself back through others."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "sapp_lightning"
ADAPTERS = {"sapp_lightning.callback", "sapp_lightning.lightning", "sapp_lightning.huggingface"}
#: what the app may import of the library: the package's root and its documented submodules
PUBLIC = {
    "sapp_lightning",
    "sapp_lightning.algorithms",
    "sapp_lightning.export",
    "sapp_lightning.schedules",
    "sapp_lightning.tables",
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _script_block(node: ast.AST) -> bool:
    """``if __name__ == "__main__":``: what runs when the file is a script (``python -m``), as the module
    ``__main__``, not an import of the package's module."""
    test = node.test if isinstance(node, ast.If) else None
    return (
        isinstance(test, ast.Compare)
        and isinstance(test.left, ast.Name)
        and test.left.id == "__name__"
        and [getattr(c, "value", None) for c in test.comparators] == ["__main__"]
    )


def imports(path: Path) -> set[str]:
    """Every sapp_lightning module ``path`` imports, at any depth of the file (type-only imports too), but for its
    script block."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text())
    script = {id(n) for block in ast.walk(tree) if _script_block(block) for n in ast.walk(block)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in script:
            continue
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.startswith("sapp_lightning"):
                # "from . import x" and "from .pkg import name" may name a submodule
                for alias in node.names:
                    candidate = f"{target}.{alias.name}"
                    found.add(candidate if resolve(candidate) else target)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("sapp_lightning")}
    return {m for m in (resolve(f) for f in found) if m and m != name}


def resolve(name: str) -> str | None:
    """The module a dotted name refers to (a name inside a module resolves to the module)."""
    while name:
        path = PACKAGE.parent / name.replace(".", "/")
        if path.with_suffix(".py").is_file() or (path / "__init__.py").is_file():
            return name
        name = name.rpartition(".")[0]
    return None


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}
GRAPH = {name: imports(path) for name, path in MODULES.items()}


def layer(name: str) -> str:
    if name.startswith("sapp_lightning.app") or name in ("sapp_lightning.conf", "sapp_lightning.recipes"):
        return "app"
    return "adapter" if name in ADAPTERS else "core"


def test_the_package_has_the_three_layers():
    layers = {layer(name) for name in MODULES}
    assert layers == {"core", "adapter", "app"}


@pytest.mark.parametrize("name", [n for n in MODULES if layer(n) == "core"])
def test_the_core_imports_neither_the_adapters_nor_the_app(name):
    outside = sorted(m for m in GRAPH[name] if layer(m) != "core" and not (name == "sapp_lightning" and m in ADAPTERS))
    assert not outside, f"{name} imports {outside}"


@pytest.mark.parametrize("name", sorted(ADAPTERS))
def test_adapters_import_only_the_core(name):
    assert all(layer(m) != "app" for m in GRAPH[name]), GRAPH[name]


@pytest.mark.parametrize("name", [n for n in MODULES if layer(n) == "app"])
def test_the_app_imports_only_the_public_api(name):
    private = sorted(m for m in GRAPH[name] if layer(m) != "app" and m not in PUBLIC | ADAPTERS)
    assert not private, f"{name} imports {private}; the app uses the public API ({', '.join(sorted(PUBLIC))})"


def test_no_import_circle():
    cycles = []

    def visit(name: str, path: list[str]) -> None:
        for nxt in sorted(GRAPH.get(name, ())):
            if nxt == path[0]:
                cycles.append(" -> ".join([*path, nxt]))
            elif nxt not in path and len(path) < 12 and nxt > path[0]:  # each cycle once, from its smallest name
                visit(nxt, [*path, nxt])

    for start in sorted(GRAPH):
        visit(start, [start])
    # a package's __init__ re-exporting its own submodules is not a circle of the design
    cycles = [c for c in cycles if not _package_reexport(c)]
    assert not cycles, "\n".join(cycles)


def _package_reexport(cycle: str) -> bool:
    names = cycle.split(" -> ")
    return any(b.startswith(a + ".") or a.startswith(b + ".") for a, b in zip(names, names[1:]))
