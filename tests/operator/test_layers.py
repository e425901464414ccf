"""The operator's folders are its architecture: the machinery in ``controller/`` knows nothing of the
domain but its names (``constants.py``), and the decision and everything it derives from are pure (no API
client, no clock). Read from the sources, every import statement at any depth."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "operator" / "visionft_operator"
#: The pure part: the decision function and the domain modules it reads.
PURE = ("decision", "status", "diagnosis", "children", "jobs", "gang", "deadline", "policy", "names")
#: What no pure module may import: the API client, the machinery's clock and cache, the clock of the host.
IMPURE = ("kubernetes", "visionft_operator.controller", "time")


def _imports(path: Path) -> list[str]:
    """Every module a source file imports (``from a import b`` counts as ``a.b`` too)."""
    found: list[str] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.append(node.module)
            found += [f"{node.module}.{alias.name}" for alias in node.names]
    return found


def _within(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


@pytest.mark.parametrize("path", sorted((PACKAGE / "controller").glob("*.py")), ids=lambda p: p.name)
def test_the_machinery_knows_only_the_operators_names(path: Path) -> None:
    domain = [
        m
        for m in _imports(path)
        if _within(m, "visionft_operator")
        and m != "visionft_operator"  # the base of ``from visionft_operator import constants``
        and not _within(m, "visionft_operator.controller")
        and not _within(m, "visionft_operator.constants")
    ]
    assert not domain, f"{path.name} imports the domain: {domain}"


@pytest.mark.parametrize("name", PURE)
def test_the_decision_and_what_it_reads_are_pure(name: str) -> None:
    impure = [m for m in _imports(PACKAGE / f"{name}.py") if any(_within(m, p) for p in IMPURE)]
    assert not impure, f"{name}.py imports {impure}"


def test_the_check_sees_imports() -> None:
    # Guards the two tests above: they must find what a module really imports.
    assert "visionft_operator.controller.kube" in _imports(PACKAGE / "reconciler.py")
    assert "visionft_operator.constants" in _imports(PACKAGE / "controller" / "kube.py")
