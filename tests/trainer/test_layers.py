"""The trainer's layers import one way: job -> evaluation -> engine -> patching -> kernels, with model, data
and storage below them and tracking beside evaluation. Read from the sources (every import statement, at
any depth, relative ones resolved), so an import that runs upward fails here."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2] / "trainer"

#: Layer -> the other layers it may import. ``testing`` holds the test helpers that ship with the package.
ALLOWED: dict[str, set[str]] = {
    "job": {"evaluation", "tracking", "engine", "patching", "kernels", "model", "data", "storage", "testing"},
    "evaluation": {"engine", "model", "data", "storage"},
    "tracking": {"storage"},
    "engine": {"patching", "kernels", "model", "data", "storage"},
    "patching": {"kernels", "model", "data"},
    "kernels": set(),
    "data": {"model", "storage"},
    "model": set(),
    "storage": set(),
    "testing": {"model", "data"},
}
#: The public entry points (``FastVisionModel``, ``VisionDataCollator``, ``python -m visionft.cli``): they
#: may reach any layer.
ENTRY_POINTS = {"visionft", "visionft.cli"}
#: The lazy public names of the package root, and the layer each one lives in.
PUBLIC_NAMES = {"visionft.FastVisionModel": "model", "visionft.VisionDataCollator": "data"}


def _module(path: Path, root: Path) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _layer(module: str) -> str | None:
    """``visionft.job.run`` -> ``job``; None for the package root."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def imports(path: Path, root: Path) -> list[tuple[int, str]]:
    """Every ``visionft`` module ``path`` imports, with its line."""
    module = _module(path, root)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            if target == "visionft":  # from visionft import patching, FastVisionModel
                found += [(node.lineno, f"visionft.{alias.name}") for alias in node.names]
            else:
                found.append((node.lineno, target))
    return [(line, m) for line, m in found if m.split(".")[0] == "visionft"]


def upward_imports(path: Path, root: Path) -> list[str]:
    """The imports of ``path`` that break the layer order, as ``line N: module (from -> to)``."""
    module = _module(path, root)
    own = _layer(module)
    if module in ENTRY_POINTS or own is None:
        return []
    wrong = []
    for line, target in imports(path, root):
        layer = PUBLIC_NAMES.get(target) or _layer(target)
        if target == "visionft.cli":
            layer = "entry point"
        if layer is None:  # ``import visionft``
            continue
        if layer != own and layer not in ALLOWED.get(own, set()):
            wrong.append(f"line {line}: {target} ({own} -> {layer})")
    return wrong


SOURCES = sorted((ROOT / "visionft").rglob("*.py"))


def test_every_module_sits_in_a_layer():
    modules = {_module(p, ROOT) for p in SOURCES} - ENTRY_POINTS
    outside = sorted(m for m in modules if _layer(m) not in ALLOWED)
    assert not outside, f"modules outside the layers (add a layer to ALLOWED or move them): {outside}"


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_run_down_the_layers(path):
    wrong = upward_imports(path, ROOT)
    assert not wrong, f"{path.relative_to(ROOT)} imports against the layer order: {wrong}"


def test_the_check_sees_upward_and_relative_imports(tmp_path):
    # Guards the test above: it must find an upward import however it is written.
    package = tmp_path / "visionft"
    (package / "data").mkdir(parents=True)
    (package / "data" / "bad.py").write_text(
        "from visionft.model import architectures\n"
        "def f():\n"
        "    from visionft.patching import enable_packing\n"
        "    from .. import engine\n"
        "    import visionft.job.run\n"
        "    from visionft import cli\n"
        "    from visionft import VisionDataCollator, FastVisionModel\n"
    )
    wrong = upward_imports(package / "data" / "bad.py", tmp_path)
    assert [w.split(":")[0] for w in wrong] == ["line 3", "line 4", "line 5", "line 6"], wrong
    assert "(data -> patching)" in wrong[0] and "(data -> engine)" in wrong[1]
