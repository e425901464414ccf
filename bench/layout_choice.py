"""Arithmetic behind the fixed-shape layout: padding and graph signatures of two ways to choose rows.

    python bench/layout_choice.py --samples 4000 --batch 4 [--json out.json]

Pure arithmetic over the sizes of the generated varied dataset (``visionft.testing.varied``: image
sides 56-1,008 px, answers 30-500 tokens), no model and no GPU:

- ``rows``: dataset-level best fit into fixed budgets (``visionft.data.rows``: one batch in, one row
  out, the buffer carrying what did not fit). Signatures = tiers used (at most two).
- ``ladder-R``: each batch keeps its own samples, packed into one row without padding, then padded up
  to the next rung of a geometric ladder of ratio R, in tokens and in vision units separately. Each
  (token rung, vision rung) pair is its own graph signature.
- ``padded``: what plain HF / Unsloth run, each batch right-padded to its longest sample (no graph).

Per layout: token and vision fill (real / computed), signatures over the first 30 steps and over the
whole run, and the share of steps that replay a graph when each new signature costs one eager warm-up
step before its capture and at most ``--max-graphs`` are captured.

Sample sizes: Qwen2.5-VL (``smart_resize`` of transformers' image processor: 28 px per merged token,
4 patches each; template overhead 25 tokens) and Gemma 3 (every image 256 tokens, 4,096 SigLIP
patches at 896 px; overhead 31 tokens).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "trainer"))

from visionft.data.rows import SampleSize, plan_tiers, simulate
from visionft.testing.varied import draw_samples

QWEN_OVERHEAD = 25
GEMMA_OVERHEAD = 31
GEMMA_IMAGE_TOKENS = 256
GEMMA_IMAGE_PATCHES = 4096


def _smart_resize(
    height: int, width: int, factor: int = 28, min_pixels: int = 3136, max_pixels: int = 1003520
):
    """Qwen2-VL's resize rule (sides to multiples of ``factor`` within the pixel bounds)."""
    h = max(factor, round(height / factor) * factor)
    w = max(factor, round(width / factor) * factor)
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return h, w


def sizes_for(arch: str, n: int, seed: int = 0) -> list[SampleSize]:
    out = []
    for s in draw_samples(n, seed=seed):
        text = len(s.question) + len(s.answer)
        if arch == "qwen2_5_vl":
            h, w = _smart_resize(s.height, s.width)
            image_tokens = (h // 28) * (w // 28)
            out.append(SampleSize(QWEN_OVERHEAD + text + image_tokens + 2, 4 * image_tokens, 1))
        elif arch == "gemma3":
            out.append(SampleSize(GEMMA_OVERHEAD + text + GEMMA_IMAGE_TOKENS + 4, GEMMA_IMAGE_PATCHES, 1))
        else:
            raise ValueError(arch)
    return out


def _rung(x: int, base: int, ratio: float) -> int:
    k = max(0, math.ceil(math.log(max(x, 1) / base, ratio) - 1e-9))
    return int(math.ceil(base * ratio**k / 64) * 64)


def _replay_share(signatures: list, max_graphs: int, warmup: int = 1) -> float:
    seen: dict = {}
    replays = 0
    for sig in signatures:
        if sig in seen:
            if seen[sig] is not None:
                seen[sig] += 1
                if seen[sig] > warmup:
                    replays += 1
            continue
        captured = sum(1 for v in seen.values() if v is not None)
        seen[sig] = 1 if captured < max_graphs else None
        if warmup == 0 and seen[sig] is not None:
            replays += 1
    return replays / max(len(signatures), 1)


def ladder(sizes: list[SampleSize], batch: int, ratio: float, max_graphs: int, gemma: bool) -> dict:
    sigs, real_t, slot_t, real_p, slot_p = [], 0, 0, 0, 0
    for i in range(0, len(sizes) - batch + 1, batch):
        group = sizes[i : i + batch]
        t, p = sum(s.tokens for s in group), sum(s.patches for s in group)
        rt = _rung(t, 256, ratio)
        rp = p if gemma else _rung(p, 256, ratio)  # Gemma's images are whole: their count is the rung
        sigs.append((rt, rp))
        real_t, slot_t, real_p, slot_p = real_t + t, slot_t + rt, real_p + p, slot_p + rp
    return {
        "token_fill": round(real_t / slot_t, 4),
        "patch_fill": round(real_p / slot_p, 4),
        "signatures_30": len(set(sigs[:30])),
        "signatures_all": len(set(sigs)),
        "replay_share_30": round(_replay_share(sigs[:30], max_graphs), 3),
        "replay_share_all": round(_replay_share(sigs, max_graphs), 3),
    }


def padded(sizes: list[SampleSize], batch: int) -> dict:
    real, slots = 0, 0
    for i in range(0, len(sizes) - batch + 1, batch):
        group = sizes[i : i + batch]
        real += sum(s.tokens for s in group)
        slots += batch * max(s.tokens for s in group)
    return {"token_fill": round(real / slots, 4), "patch_fill": 1.0, "signatures_all": None}


def rows(
    sizes: list[SampleSize], batch: int, margin: float, max_graphs: int, gemma: bool, probe: int
) -> dict:
    tiers = plan_tiers(
        sizes[:probe],
        batch,
        max_sample_tokens=2048,
        margin=margin,
        patches_per_image=GEMMA_IMAGE_PATCHES if gemma else None,
        max_sample_patches=None if gemma else 4 * 2048,
    )
    stats = simulate(sizes, tiers)
    used = [i for i, c in enumerate(stats.tier_counts) if c]
    # Replays: each tier used costs one eager warm-up step (its first row), then replays.
    replay_all = (stats.steps - len(used)) / max(stats.steps, 1)
    first30 = simulate(sizes[: 30 * batch], tiers)
    used30 = [i for i, c in enumerate(first30.tier_counts) if c]
    return {
        **stats.as_dict(),
        "budgets": [[t.tokens, t.patches, t.images] for t in tiers.tiers],
        "signatures_30": len(used30),
        "signatures_all": len(used),
        "replay_share_30": round((first30.steps - len(used30)) / max(first30.steps, 1), 3),
        "replay_share_all": round(replay_all, 3),
    }


def study(n: int, batch: int, max_graphs: int = 8, probe: int = 256, seed: int = 0) -> dict:
    out: dict = {}
    for arch in ("qwen2_5_vl", "gemma3"):
        gemma = arch == "gemma3"
        sizes = sizes_for(arch, n, seed)
        res = {"padded": padded(sizes, batch)}
        for margin in (0.05, 0.08, 0.12):
            res[f"rows-m{margin}"] = rows(sizes, batch, margin, max_graphs, gemma, probe)
        for ratio in (1.125, 1.25, 1.5, 2.0):
            res[f"ladder-{ratio}"] = ladder(sizes, batch, ratio, max_graphs, gemma)
        out[arch] = res
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=4000)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--max-graphs", type=int, default=8)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    result = study(args.samples, args.batch, args.max_graphs)
    cols = [
        "token_fill",
        "patch_fill",
        "signatures_30",
        "signatures_all",
        "replay_share_30",
        "replay_share_all",
    ]
    for arch, res in result.items():
        print(f"\n## {arch}, batch {args.batch}, {args.samples} samples\n")
        print("| layout | " + " | ".join(cols) + " | notes |")
        print("|---" * (len(cols) + 2) + "|")
        for name, r in res.items():
            note = ""
            if name.startswith("rows"):
                note = f"budgets {r['budgets']}, tiers {r['tier_counts']}, {r['samples_per_row']} samples/row, max wait {r['max_wait']}"
            print(f"| {name} | " + " | ".join(str(r.get(c, "")) for c in cols) + f" | {note} |")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
