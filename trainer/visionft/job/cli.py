"""``visionft-train``: run one training job from a trainer config or a VisionFineTune manifest.

    visionft-train --config /etc/visionft/config.json      # the training pod (the operator's config)
    visionft-train examples/quickstart.yaml                # the quickstart: a VisionFineTune, run here
    visionft-train my-run.yaml --work-dir /data/runs/a     # either kind, with another work folder

``visionft.job.config_file`` says how each kind of file is read (a manifest's cluster-only fields are ignored).

Exit codes: 0 success; 2 a config or data error (one line on stderr says what and how to fix it);
3 the run finished and published its outputs, but ``evaluation.failIfWorseThanBase`` fails it (its
headline metric is worse than the base model's; one line says by how much); 1 anything else (with its
traceback, since that is a bug or an infrastructure failure). The config is
never printed: it may name endpoints, and credentials arrive only as environment variables, which are
never logged either.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

EXIT_OK, EXIT_FAILURE, EXIT_CONFIG, EXIT_WORSE_THAN_BASE = 0, 1, 2, 3


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="visionft-train",
        description="Fine-tune a VLM from a trainer config or a VisionFineTune manifest.",
    )
    what = "a trainer config or a VisionFineTune manifest (YAML or JSON)"
    parser.add_argument("file", nargs="?", help=what)
    parser.add_argument("--config", dest="config", help=what)
    parser.add_argument(
        "--work-dir",
        dest="work_dir",
        help="the work folder: synced or generated inputs, and the output when the file sets none. "
        "Default: runs/<metadata.name> under the current directory for a manifest, runtime.workDir "
        "for a trainer config",
    )
    parser.add_argument("--verbose", "-v", action="store_true", help="debug logging")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``visionft-train`` console script; returns the exit code."""
    args = _parser().parse_args(argv)
    path = args.config or args.file
    if not path or (args.config and args.file and args.config != args.file):
        print("visionft-train: error: give one config file: visionft-train --config FILE", file=sys.stderr)
        return EXIT_CONFIG
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # Offline by design (no hub on the cluster or in CI); a local run may override these.
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        os.environ.setdefault(var, "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    from visionft.job import config_file

    try:
        loaded = config_file.load(path, work_dir=args.work_dir)
    except (OSError, ValueError) as err:
        return _fail(str(err))
    for note in loaded.notes:
        logging.getLogger(__name__).info(note)
    config = loaded.config

    from visionft.data.errors import BadSampleError
    from visionft.job.run import ConfigError, WorseThanBaseError, train

    try:
        train(config)
    except WorseThanBaseError as err:
        return _fail(str(err), EXIT_WORSE_THAN_BASE)
    except (ConfigError, BadSampleError, FileNotFoundError) as err:
        return _fail(str(err))
    except ValueError as err:
        # ValueErrors from loading and validation carry user-facing messages (model folder, dataset
        # format, LoRA switches); show them as one line but keep the traceback at debug level.
        logging.getLogger(__name__).debug("traceback", exc_info=True)
        return _fail(str(err))
    return EXIT_OK


def _fail(message: str, code: int = EXIT_CONFIG) -> int:
    first = " ".join(message.split())
    print(f"visionft-train: error: {first}", file=sys.stderr)
    return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
