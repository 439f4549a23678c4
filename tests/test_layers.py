"""The package's imports point one way: no module imports, even lazily, one that imports it back."""

import ast
from pathlib import Path

from adapterhub.integrity import find_cycles

PACKAGE = Path(__file__).parent.parent / "adapterhub"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """Every adapterhub module `path` imports, at module level or inside a function."""
    name = _module_name(path)
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else [])) \
                if node.level else node.module
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {m for m in found if m in modules and m != name}


def test_no_import_cycles():
    paths = sorted(PACKAGE.rglob("*.py"))
    modules = {_module_name(p) for p in paths}
    graph = {_module_name(p): _imports(p, modules) for p in paths}
    assert graph["adapterhub.registry"], "the walker found no imports at all: it is broken, not the package clean"
    assert find_cycles(graph) == []


def test_the_walker_finds_a_cycle():
    assert find_cycles({"a": ["b"], "b": ["c"], "c": ["a"], "d": ["a"]}) == [["a", "b", "c", "a"]]


def test_only_the_catalogue_imports_tinydb():
    users = sorted(_module_name(p) for p in PACKAGE.rglob("*.py")
                   if any(isinstance(n, (ast.Import, ast.ImportFrom)) and "tinydb" in ((getattr(n, "module", None) or "")
                          + " ".join(a.name for a in n.names)) for n in ast.walk(ast.parse(p.read_text()))))
    assert users == ["adapterhub.store"]
