"""A generated dataset whose shapes vary from sample to sample, as users' data does.

Every sample has one image whose width and height are drawn independently from ``[min_side,
max_side]`` pixels (56 to 1,008 by default), a short question, and an answer of ``[min_answer,
max_answer]`` characters (30 to 500; one token each under the byte-level stand-in tokenizers of
``visionft.testing``). Images are smooth colour fields with a few shapes, so PNGs stay small.

``draw_samples`` gives the sizes alone (for arithmetic on layouts); ``write_imagefolder`` writes them
as an ``imagefolder`` dataset (``train/metadata.jsonl`` with ``file_name``, ``instruction`` and
``response``, plus the PNGs), which ``visionft-train`` reads with ``dataset.format: auto``.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

_WORDS = [
    "red",
    "blue",
    "green",
    "small",
    "large",
    "circle",
    "square",
    "line",
    "left",
    "right",
    "top",
    "bottom",
    "centre",
    "shape",
    "colour",
    "the",
    "a",
    "of",
    "and",
    "with",
    "near",
    "far",
    "bright",
    "dark",
    "edge",
    "corner",
    "two",
    "three",
    "many",
    "one",
    "image",
    "shows",
    "there",
    "is",
]
QUESTIONS = (
    "Describe the image.",
    "What shapes do you see, and where are they?",
    "Write a detailed caption for this picture.",
    "List every object in the image with its colour.",
)


@dataclass(frozen=True)
class VariedSample:
    """One sample's sizes and text.

    Attributes:
        width (int): image width in pixels.
        height (int): image height in pixels.
        question (str): the user turn's text.
        answer (str): the assistant turn's text.
        seed (int): the image's drawing seed.
    """

    width: int
    height: int
    question: str
    answer: str
    seed: int


def _answer(rng: random.Random, length: int) -> str:
    words: list[str] = []
    n = 0
    while n < length:
        word = rng.choice(_WORDS)
        words.append(word)
        n += len(word) + 1
    return " ".join(words)[:length].rstrip() + "."


def draw_samples(
    n: int,
    seed: int = 0,
    min_side: int = 56,
    max_side: int = 1008,
    min_answer: int = 30,
    max_answer: int = 500,
) -> list[VariedSample]:
    """``n`` samples with independently drawn image sides and answer lengths (deterministic in ``seed``)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        length = rng.randint(min_answer, max_answer)
        out.append(
            VariedSample(
                width=rng.randint(min_side, max_side),
                height=rng.randint(min_side, max_side),
                question=rng.choice(QUESTIONS),
                answer=_answer(rng, length - 1),
                seed=seed * 100_003 + i,
            )
        )
    return out


def draw_image(sample: VariedSample) -> Image.Image:
    """The sample's image: a colour field with a few rectangles and ellipses."""
    rng = random.Random(sample.seed)
    base = tuple(rng.randint(40, 215) for _ in range(3))
    image = Image.new("RGB", (sample.width, sample.height), base)  # type: ignore[arg-type]
    draw = ImageDraw.Draw(image)
    for _ in range(rng.randint(1, 4)):
        x0, y0 = rng.randrange(sample.width), rng.randrange(sample.height)
        x1 = min(sample.width - 1, x0 + rng.randint(4, max(4, sample.width // 2)))
        y1 = min(sample.height - 1, y0 + rng.randint(4, max(4, sample.height // 2)))
        fill = tuple(rng.randint(0, 255) for _ in range(3))
        (draw.rectangle if rng.random() < 0.5 else draw.ellipse)((x0, y0, x1, y1), fill=fill)  # type: ignore[arg-type]
    return image


def write_imagefolder(folder: str | Path, samples: list[VariedSample]) -> Path:
    """Writes ``samples`` as an imagefolder dataset under ``folder/train``; returns ``folder``."""
    folder = Path(folder)
    train = folder / "train"
    train.mkdir(parents=True, exist_ok=True)
    with open(train / "metadata.jsonl", "w") as meta:
        for i, sample in enumerate(samples):
            name = f"{i:06d}.png"
            draw_image(sample).save(train / name, optimize=False, compress_level=1)
            record = {"file_name": name, "instruction": sample.question, "response": sample.answer}
            meta.write(json.dumps(record) + "\n")
    return folder


__all__ = ["QUESTIONS", "VariedSample", "draw_image", "draw_samples", "write_imagefolder"]
