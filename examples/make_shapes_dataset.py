"""Writes the synthetic shapes task as an imagefolder dataset with train/ and test/ splits.

    python examples/make_shapes_dataset.py runs/quickstart/shapes --train 400 --test 100 --task colour

Each split folder holds PNG images and a metadata.jsonl with file_name, instruction, response, colour and
shape, which `visionft-train` reads with `dataset.format: imagefolder` (or auto).
"""

from __future__ import annotations

import argparse

from visionft.data.synthetic import QUESTIONS, make_shapes_dataset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", help="folder to write (created)")
    parser.add_argument("--train", type=int, default=400, help="training samples (default 400)")
    parser.add_argument("--test", type=int, default=100, help="held-out samples (default 100)")
    parser.add_argument("--size", type=int, default=56, help="image side in pixels (default 56)")
    parser.add_argument("--task", choices=sorted(QUESTIONS), default="colour", help="what the answer names")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    out = make_shapes_dataset(args.out_dir, args.train, args.test, args.size, args.task, args.seed)
    print(f"wrote {args.train} train and {args.test} test samples to {out}")


if __name__ == "__main__":
    main()
