"""A synthetic image task, generated offline: one coloured shape on a canvas; name its colour, its shape,
or both (a two-word caption).

Each image has one filled shape (circle, square or triangle) of random size and position, in one of four
colours, on a grey background with a little noise, so that the answer depends on the image and not on a
fixed pixel. The dataset is written as an ``imagefolder`` (``train/`` and ``test/`` folders of PNG files,
each with a ``metadata.jsonl`` giving ``file_name``, ``instruction``, ``response``, ``colour`` and
``shape``), which ``datasets.load_dataset("imagefolder", data_dir=...)`` and ``visionft.data.formats``
read directly.

The quickstart asks for the colour: four classes, so chance is 25%. Its preference form
(``make_shapes_preference_dataset``) pairs each image's colour (``chosen``) with a wrong one
(``rejected``): a model that does not look at the image prefers the right answer half of the time. The
caption task (``"caption"``, answers such as ``red triangle``) is harder: the colour is read off almost at
once, the shape (circle, square or triangle, of random size and place) takes a tiny model far longer, so
partial-credit metrics such as the character error rate show it learning step by step.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Literal

from PIL import Image, ImageDraw

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 70, 220),
    "yellow": (235, 210, 40),
}
SHAPES = ("circle", "square", "triangle")
QUESTIONS = {
    "colour": "What colour is the shape? Answer with one word.",
    "shape": "What shape is this? Answer with one word.",
    "caption": "Describe the shape in two words: its colour, then its shape.",
}


def draw_shape(colour: str, shape: str, size: int, rng: random.Random) -> Image.Image:
    """Draws one ``shape`` in ``colour`` on a noisy grey ``size`` x ``size`` canvas.

    Args:
        colour (str): a key of ``COLOURS``.
        shape (str): one of ``SHAPES``.
        size (int): the canvas side in pixels.
        rng (random.Random): the source of randomness (position, size, shade, noise).

    Returns:
        Image.Image: an RGB image.
    """
    grey = rng.randint(100, 160)
    image = Image.new("RGB", (size, size), (grey, grey, grey))
    pixels = image.load()
    for _ in range(size * size // 8):  # sparse speckle noise
        x, y = rng.randrange(size), rng.randrange(size)
        shade = grey + rng.randint(-30, 30)
        pixels[x, y] = (shade, shade, shade)
    side = rng.randint(size * 2 // 5, size * 3 // 4)
    left, top = rng.randint(0, size - side), rng.randint(0, size - side)
    box = (left, top, left + side - 1, top + side - 1)
    fill = tuple(max(0, min(255, c + rng.randint(-20, 20))) for c in COLOURS[colour])
    draw = ImageDraw.Draw(image)
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon(
            [(left + side // 2, top), (left, top + side - 1), (left + side - 1, top + side - 1)], fill=fill
        )
    return image


def make_shapes_dataset(
    out_dir: str | Path,
    train_size: int = 400,
    test_size: int = 100,
    image_size: int = 56,
    task: Literal["colour", "shape", "caption"] = "colour",
    seed: int = 0,
) -> Path:
    """Writes the shapes task as an imagefolder with ``train`` and ``test`` splits.

    Classes are balanced within each split (round-robin over the answers, in shuffled order; for captions,
    over the 12 colour and shape pairs).

    Args:
        out_dir (str | Path): the folder to create (files inside it are overwritten).
        train_size (int): training samples. Default: 400.
        test_size (int): held-out samples. Default: 100.
        image_size (int): canvas side in pixels. Default: 56 (a multiple of Qwen2-VL's 28).
        task ("colour" | "shape" | "caption"): what the answer names: the colour, the shape, or both
            (``"<colour> <shape>"``). Default: "colour".
        seed (int): makes the dataset reproducible. Default: 0.

    Returns:
        Path: ``out_dir``.
    """
    if task not in QUESTIONS:
        raise ValueError(f"task={task!r} must be one of {sorted(QUESTIONS)}")
    out = Path(out_dir)
    rng = random.Random(seed)
    for split, count in (("train", train_size), ("test", test_size)):
        folder = out / split
        folder.mkdir(parents=True, exist_ok=True)
        rows = []
        for i in range(count):
            if task == "caption":
                colour, shape = list(COLOURS)[i % len(COLOURS)], SHAPES[(i // len(COLOURS)) % len(SHAPES)]
            else:
                colour = list(COLOURS)[i % len(COLOURS)] if task == "colour" else rng.choice(list(COLOURS))
                shape = SHAPES[i % len(SHAPES)] if task == "shape" else rng.choice(SHAPES)
            name = f"{i:05d}.png"
            draw_shape(colour, shape, image_size, rng).save(folder / name)
            rows.append(
                {
                    "file_name": name,
                    "instruction": QUESTIONS[task],
                    "response": {"colour": colour, "shape": shape, "caption": f"{colour} {shape}"}[task],
                    "colour": colour,
                    "shape": shape,
                }
            )
        rng.shuffle(rows)
        (folder / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return out


def make_shapes_preference_dataset(
    out_dir: str | Path,
    train_size: int = 400,
    test_size: int = 100,
    image_size: int = 56,
    seed: int = 0,
) -> Path:
    """Writes the colour task as preference pairs: ``make_shapes_dataset``'s images and questions, each
    with ``chosen`` (the shape's colour) and ``rejected`` (another colour) instead of ``response``.

    Each colour is rejected as often as it is chosen (the wrong colour cycles through the other three), so
    that a preference for some words over others, whatever the image, is right half of the time.

    Args:
        out_dir (str | Path): the folder to create (files inside it are overwritten).
        train_size (int): training pairs. Default: 400.
        test_size (int): held-out pairs. Default: 100.
        image_size (int): canvas side in pixels. Default: 56.
        seed (int): makes the dataset reproducible. Default: 0.

    Returns:
        Path: ``out_dir``.
    """
    out = make_shapes_dataset(out_dir, train_size, test_size, image_size, task="colour", seed=seed)
    colours = list(COLOURS)
    for split in ("train", "test"):
        path = out / split / "metadata.jsonl"
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        for row in rows:
            number = int(Path(row["file_name"]).stem)  # the round-robin position that chose its colour
            offset = 1 + (number // len(colours)) % (len(colours) - 1)
            row["chosen"] = row.pop("response")
            row["rejected"] = colours[(colours.index(row["chosen"]) + offset) % len(colours)]
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return out
