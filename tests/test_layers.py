"""The layers of DESIGN.md, checked on the source: every import a module makes (lazy ones inside
functions included; those under `if TYPE_CHECKING:` are types only and left out) points down."""

from __future__ import annotations

import ast
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
