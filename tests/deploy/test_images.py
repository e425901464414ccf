"""The built images, run as containers (podman, runc) the way a pod runs them: the operator's answers `--help`
and imports without torch; the trainer's runs the quickstart manifest to completion on a read-only root
filesystem as uid 65532, with no network and only /scratch writable, and its held-out accuracy rises. A
second build on the same machine builds nothing: each image's tag is a key of its inputs.

The images are those of `hack/build-images.sh` (README command 1 builds them): the operator image from
Dockerfile.operator and the CPU variant of Dockerfile.trainer, both on a Debian base made on this machine.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.harness.node import IMAGES_SCRIPT, Images

pytestmark = [pytest.mark.images]

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = REPO / "examples" / "quickstart.yaml"
UID = "65532"


def run(images: Images, image: str, *argv: str, volumes: tuple[str, ...] = (), timeout: float = 120,
        entrypoint: str | None = None) -> subprocess.CompletedProcess[str]:  # fmt: skip
    """`podman run` confined as the operator's pod spec confines a container: read-only root filesystem with
    no tmpfs added, the image's own user, every capability dropped, no privilege escalation, no network."""
    command = ["podman", "run", "--rm", "--no-healthcheck", "--network=none", "--read-only",
               "--read-only-tmpfs=false", "--cap-drop=ALL", "--security-opt=no-new-privileges"]  # fmt: skip
    for volume in volumes:
        command += ["-v", volume]
    if entrypoint is not None:
        command += ["--entrypoint", entrypoint]
    return subprocess.run([*command, image, *argv], capture_output=True, text=True, timeout=timeout, check=False,
                          env=images.podman_env())  # fmt: skip


def test_operator_image_answers_help_as_its_user(built_images: Images) -> None:
    image = built_images.operator
    result = run(built_images, image, "--help")
    assert result.returncode == 0 and "usage: visionft-operator" in result.stdout, result.stderr
    assert run(built_images, image, "-u", entrypoint="id").stdout.strip() == UID
    imports = run(
        built_images, image, "-c", "import visionft_operator.main, visionft_api, kopf", entrypoint="python"
    )
    assert imports.returncode == 0, imports.stderr
    no_torch = run(built_images, image, "-c", "import torch", entrypoint="python")
    assert no_torch.returncode != 0 and "No module named 'torch'" in no_torch.stderr


def test_trainer_image_runs_the_quickstart_read_only(built_images: Images, tmp_path: Path) -> None:
    image = built_images.trainer
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    # The pod's emptyDir is writable by the pod's fsGroup; here the folder belongs to the image's user.
    subprocess.run(["chown", f"{UID}:{UID}", str(scratch)], check=True)
    volumes = (f"{scratch}:/scratch", f"{QUICKSTART}:/config/quickstart.yaml:ro")
    # Nothing but /scratch is writable: not the root filesystem, not /tmp.
    probe = "import sys\nfor path in sys.argv[1:]:\n    try:\n        open(path, 'w')\n    except OSError as e:\n        print(path, e.strerror)\n    else:\n        print(path, 'written')"  # fmt: skip
    written = run(built_images, image, "-c", probe, "/opt/venv/x", "/tmp/x", "/x", "/scratch/x",
                  volumes=volumes, entrypoint="python").stdout.splitlines()  # fmt: skip
    assert written == ["/opt/venv/x Read-only file system", "/tmp/x Read-only file system",
                       "/x Read-only file system", "/scratch/x written"], written  # fmt: skip

    result = run(built_images, image, "/config/quickstart.yaml", volumes=volumes, timeout=1200)
    assert result.returncode == 0, result.stderr[-4000:]
    # The held-out exact match before and after training, as the run wrote it to its output folder.
    metrics = json.loads((scratch / "runs" / "quickstart" / "output" / "metrics.json").read_text())
    before, after = metrics["base"]["values"]["exactMatch"], metrics["final"]["values"]["exactMatch"]
    # Chance is 25% over four colours; the untrained tiny model scores about 0, the trained one about 0.99.
    assert after >= 0.8 and after - before >= 0.5, (before, after, result.stdout[-3000:])
    outputs = scratch / "runs" / "quickstart" / "output"
    assert (outputs / "run.json").exists() and any(outputs.rglob("adapter_model.safetensors")), sorted(
        p.relative_to(scratch).as_posix() for p in scratch.rglob("*")
    )
    owners = {path.stat().st_uid for path in scratch.rglob("*")}
    assert owners == {int(UID)}, owners  # written by the image's user, not root


#: What hack/build-images.sh reads: the Dockerfiles and the sources they copy.
BUILD_INPUTS = ("hack/build-images.sh", "Dockerfile.operator", "Dockerfile.trainer", "pyproject.toml",
                "README.md", "constraints.txt", "api", "operator", "trainer", "deploy/docker")  # fmt: skip


def check_build(root: Path) -> subprocess.CompletedProcess[str]:
    """`hack/build-images.sh --check` of the checkout at `root`: builds nothing, exits 1 if it would."""
    return subprocess.run(["bash", str(root / IMAGES_SCRIPT), "--check"], capture_output=True, text=True,
                          timeout=300, check=False, env={**os.environ, "PYTHON": sys.executable})  # fmt: skip


def test_a_warm_machine_rebuilds_no_image(built_images: Images, tmp_path: Path) -> None:
    """The build, run again on the same sources, finds every image up to date, also in another checkout (its
    keys are of content, not of mtimes or paths); an edit of the trainer's code changes the trainer's key
    alone."""
    refs = (built_images.pause, built_images.operator, built_images.trainer)
    warm = check_build(REPO)
    assert warm.returncode == 0, warm.stderr
    assert all(f" {ref}: up to date" in warm.stderr for ref in refs), warm.stderr

    copy = tmp_path / "checkout"
    for path in BUILD_INPUTS:
        source = REPO / path
        if source.is_dir():
            shutil.copytree(source, copy / path, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            (copy / path).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, copy / path)
    assert check_build(copy).returncode == 0

    with (copy / "trainer" / "visionft" / "__init__.py").open("a") as module:
        module.write("# an edit\n")
    edited = check_build(copy)
    assert edited.returncode == 1, edited.stderr
    assert f" {built_images.operator}: up to date" in edited.stderr, edited.stderr
    assert f" {built_images.trainer}: up to date" not in edited.stderr, edited.stderr
    assert "to build: trainer;" in edited.stderr, edited.stderr
