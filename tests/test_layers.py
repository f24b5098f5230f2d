"""The layers of DESIGN.md, checked on the source: every import a module makes (lazy ones inside
functions included; those under `if TYPE_CHECKING:` are types only and left out) points down."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# package (or module) -> what none of its modules may import, with the modules excepted.
RULES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "app/ml": (("app.api", "app.serving", "app.store", "app.experiments", "app.settings",
                "workers", "fastapi", "sqlalchemy", "celery"), ()),
    "app/store": (("torch", "transformers", "app.api", "app.serving", "app.experiments",
                   "workers", "fastapi"), ()),
    "app/serving": (("app.api", "app.experiments", "workers", "fastapi", "app.store",
                     "app.settings", "app.notify", "sqlalchemy"), ("factory.py",)),
    "app/experiments": (("app.api", "workers", "fastapi"), ()),
    "app/api": (("torch", "transformers", "workers.execution", "workers.tasks"), ()),
    "workers": (("fastapi", "app.api", "app.serving"), ()),
    "app/job_spec.py": (("torch", "transformers", "app.api", "workers"), ()),
}  # fmt: skip


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    typing_only: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            typing_only |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    names: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
    return names


def _modules(where: str, excepted: tuple[str, ...]) -> list[Path]:
    path = ROOT / where
    files = [path] if path.is_file() else sorted(path.rglob("*.py"))
    return [f for f in files if f.name not in excepted]


@pytest.mark.parametrize("where", sorted(RULES))
def test_imports_point_down(where: str):
    forbidden, excepted = RULES[where]
    found = [
        f"{module.relative_to(ROOT)} imports {name}"
        for module in _modules(where, excepted)
        for name in sorted(_imports(module))
        if any(name == bad or name.startswith(bad + ".") for bad in forbidden)
    ]
    assert not found, found


def test_the_rules_see_real_imports():
    # The checker must find what is there, or every rule above would pass vacuously.
    assert "app.chains" in _imports(ROOT / "workers" / "execution.py")
    assert "torch" in _imports(ROOT / "app" / "serving" / "factory.py")
    assert "app.chains" not in _imports(ROOT / "app" / "serving" / "source.py")  # types only


def _module_name(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")


def _local_imports(path: Path, known: set[str]) -> set[str]:
    """The modules of `known` that `path` imports; `from package import module` names the module,
    not the package."""
    found: set[str] = set()
    for name in _imports(path):
        submodules = {f"{name}.{alias}" for alias in _imported_names(path, name)} & known
        found |= submodules or ({name} & known)
    return found


def _imported_names(path: Path, module: str) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    return {
        alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module == module
        for alias in node.names
    }


def _cycles(where: str) -> list[list[str]]:
    """The import cycles among the modules under `where` (lazy imports included)."""
    files = {_module_name(f): f for f in _modules(where, ())}
    graph = {name: _local_imports(f, set(files)) - {name} for name, f in files.items()}
    cycles, done = [], set()

    def visit(name: str, stack: list[str]) -> None:
        if name in stack:
            cycles.append([*stack[stack.index(name) :], name])
            return
        if name in done:
            return
        for dep in sorted(graph[name]):
            visit(dep, [*stack, name])
        done.add(name)

    for name in sorted(graph):
        visit(name, [])
    return cycles


def test_no_import_cycles():
    assert not _cycles("app"), _cycles("app")
    assert not _cycles("workers"), _cycles("workers")


def test_the_cycle_check_finds_a_cycle(tmp_path, monkeypatch):
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "a.py").write_text("def f():\n    from pkg.b import g\n")
    (package / "b.py").write_text("from pkg.a import f\n")
    # A package that re-exports a module importing its siblings is no cycle.
    (package / "__init__.py").write_text("from pkg.c import h\n")
    (package / "c.py").write_text("from pkg import a\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    assert _cycles("pkg") == [["pkg.a", "pkg.b", "pkg.a"]]
