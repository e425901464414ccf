"""``python -m visionft.cli``: the ``visionft-train`` command (``visionft.job.cli``) under its module path,
which the training pod's command line names."""

from __future__ import annotations

import sys

from visionft.job.cli import main

__all__ = ["main"]

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
