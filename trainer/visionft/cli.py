"""``visionft-train``: run one training job from a trainer config file.

    visionft-train --config /etc/visionft/config.json      # the training pod
    visionft-train examples/quickstart.yaml                # the local quickstart

Exit codes: 0 success; 2 a config or data error (one line on stderr says what and how to fix it);
1 anything else (with its traceback, since that is a bug or an infrastructure failure). The config is
never printed: it may name endpoints, and credentials arrive only as environment variables, which are
never logged either.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

EXIT_OK, EXIT_FAILURE, EXIT_CONFIG = 0, 1, 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="visionft-train", description="Fine-tune a VLM from a trainer config."
    )
    parser.add_argument("file", nargs="?", help="the trainer config (YAML or JSON)")
    parser.add_argument("--config", dest="config", help="the trainer config (YAML or JSON)")
    parser.add_argument("--verbose", "-v", action="store_true", help="debug logging")
    return parser


def _one_line_validation(err) -> str:
    """A pydantic ValidationError as one line: ``field.path: message; ...``."""
    parts = []
    for item in err.errors():
        loc = ".".join(str(p) for p in item.get("loc", ()))
        parts.append(f"{loc}: {item.get('msg')}" if loc else str(item.get("msg")))
    return "invalid trainer config: " + "; ".join(parts)


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

    from pydantic import ValidationError
    from visionft_api.trainer_config import TrainerConfig

    try:
        config = TrainerConfig.from_file(path)
    except ValidationError as err:
        return _fail(_one_line_validation(err))
    except (OSError, ValueError) as err:
        return _fail(str(err))

    from visionft.data.images import BadSampleError
    from visionft.run import ConfigError, train

    try:
        train(config)
    except (ConfigError, BadSampleError, FileNotFoundError) as err:
        return _fail(str(err))
    except ValueError as err:
        # ValueErrors from loading and validation carry user-facing messages (model folder, dataset
        # format, LoRA switches); show them as one line but keep the traceback at debug level.
        logging.getLogger(__name__).debug("traceback", exc_info=True)
        return _fail(str(err))
    return EXIT_OK


def _fail(message: str) -> int:
    first = " ".join(message.split())
    print(f"visionft-train: error: {first}", file=sys.stderr)
    return EXIT_CONFIG


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
