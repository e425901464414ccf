"""Seed Triton's cache with the CUDA driver shim compiled when the trainer image was built.

`python visionft_triton_seed.py prebuild` compiles the shim (Dockerfile.trainer's build stage); importing the
module seeds the cache (the final stage's `.pth` line).

Triton compiles one small C module (its CUDA driver shim) the first time it launches a kernel, and the
trainer image's final stage has no C compiler. Dockerfile.trainer compiles the shim in its build stage into
$VISIONFT_TRITON_PREBUILT; at run time the cache ($TRITON_CACHE_DIR) is on the pod's empty scratch volume.
This module copies the prebuilt entries into the cache. The image installs it with a `.pth` line in the
virtual environment's site-packages, so it runs at every interpreter start (the trainer, torchrun and its
workers) before anything imports triton.

Best effort and quiet: when a variable is unset, or the copy fails, nothing happens, and Triton reports the
missing compiler itself if it ever needs one.
"""

from __future__ import annotations

import glob
import os
import shutil
import sys
import tempfile
from pathlib import Path


def seed(environ: dict[str, str] | os._Environ[str] = os.environ) -> list[str]:
    """Copy every prebuilt cache entry that the cache lacks; returns the entries copied."""
    source = environ.get("VISIONFT_TRITON_PREBUILT")
    target = environ.get("TRITON_CACHE_DIR")
    if not source or not target or not os.path.isdir(source):
        return []
    copied = []
    try:
        os.makedirs(target, exist_ok=True)
        for entry in sorted(os.listdir(source)):
            destination = os.path.join(target, entry)
            if os.path.exists(destination):
                continue
            # Copy beside the destination, then rename: concurrent workers never see a half-copied entry.
            staging = tempfile.mkdtemp(prefix=f".{entry}.", dir=target)
            shutil.copytree(os.path.join(source, entry), staging, dirs_exist_ok=True)
            try:
                os.rename(staging, destination)
                copied.append(entry)
            except OSError:
                shutil.rmtree(staging, ignore_errors=True)  # another process was first
    except OSError:
        return copied
    return copied


def prebuild() -> str:
    """Compile Triton's CUDA driver shim into $TRITON_CACHE_DIR, linking against $TRITON_LIBCUDA_PATH (the
    driver stub at build time). Returns the compiled file; raises SystemExit when Triton would still need a
    compiler at run time."""
    from triton.backends.nvidia import driver

    source = Path(driver.__file__).read_text()
    if "__triton_launcher" in source:
        # Triton before 3.9 also compiles a C launcher for every kernel signature: seeding can't cover that.
        raise SystemExit("this Triton compiles per-kernel launchers at run time: it needs a C compiler")
    try:
        driver.CudaUtils()
    except (ImportError, OSError, RuntimeError) as err:
        # The shim is in the cache before Triton loads it; loading it against the stub may fail.
        print(f"loading the shim against the driver stub failed, as it may: {err}", file=sys.stderr)
    built = glob.glob(os.path.join(os.environ["TRITON_CACHE_DIR"], "*", "cuda_utils*.so"))
    if not built:
        raise SystemExit("Triton's CUDA driver shim was not compiled")
    return built[0]


if __name__ == "__main__":
    if sys.argv[1:] != ["prebuild"]:
        raise SystemExit("usage: visionft_triton_seed.py prebuild")
    print(prebuild())
else:
    seed()
