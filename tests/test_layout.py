"""The repository's three structural rules: no module shadows the standard library's `operator`,
the schema and the operator import without torch, and the schema has one source of truth."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# A meta-path finder that makes torch (and the libraries built on it) unimportable in a subprocess.
_BLOCK_TORCH = textwrap.dedent(
    """
    import sys
    class _Blocker:
        BLOCKED = ("torch", "transformers", "peft", "trl", "bitsandbytes", "triton", "accelerate")
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in self.BLOCKED:
                raise ImportError(f"{name} is blocked: this code path must not need it")
            return None
    sys.meta_path.insert(0, _Blocker())
    """
)


def _python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120, check=False
    )


def test_no_package_named_operator_shadows_the_standard_library() -> None:
    assert not (REPO / "operator" / "__init__.py").exists()
    assert not (REPO / "operator.py").exists()
    # From the repository root (where a bare `operator/` folder sits), `import operator` is still stdlib.
    result = _python(
        "import operator, sysconfig; print(operator.__file__); print(sysconfig.get_paths()['stdlib'])"
    )
    assert result.returncode == 0, result.stderr
    module_file, stdlib = result.stdout.split()
    assert module_file.startswith(stdlib), f"`import operator` resolved to {module_file}"


def test_schema_imports_without_torch() -> None:
    result = _python(_BLOCK_TORCH + "import visionft_api, visionft_api.crd; print('ok')")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_torch_blocker_really_blocks() -> None:
    # Guards the test above: if the blocker silently let torch through, the no-torch tests would prove nothing.
    result = _python(_BLOCK_TORCH + "import torch")
    assert result.returncode != 0
    assert "torch is blocked" in result.stderr


def test_operator_imports_without_torch() -> None:
    result = _python(_BLOCK_TORCH + "import visionft_operator.main; print('ok')")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_operator_and_trainer_use_the_one_schema() -> None:
    # Both sides import the schema package rather than defining models of their own.
    operator_sources = "\n".join(p.read_text() for p in (REPO / "operator").rglob("*.py"))
    trainer_sources = "\n".join(p.read_text() for p in (REPO / "trainer").rglob("*.py"))
    assert "visionft_api" in operator_sources
    assert "visionft_api" in trainer_sources
    for sources in (operator_sources, trainer_sources):
        assert "class VisionFineTuneSpec" not in sources
        assert "class TrainingRecipe" not in sources
