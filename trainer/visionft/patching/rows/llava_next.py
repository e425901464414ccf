"""LLaVA-NeXT rows of fixed shape ("anyres" tiles), and their sync-free forward.

LLaVA-NeXT (``LlavaNextForConditionalGeneration``) resizes each image to the best of its grid pinpoints
and cuts it into tiles of the CLIP tower's size, plus one base tile (the whole image downscaled). The
tower runs on each tile alone; the model then lays an image's features out as: the base tile's features,
then the grid tiles' features merged into one map, unpadded to the image's own aspect ratio (rows or
columns of the letterbox cut off), with the learned ``image_newline`` after each row of that map. So
both the number of tiles and the number of image tokens vary per image.

A row's vision budget here is a number of tiles (the tower's batch): the samples' tiles one after
another, then zero tiles up to the budget. The layout of the features is precomputed on the host as one
gather: ``image_sources`` holds, for each image token of the row, the index of its feature in the table
of every tile's projected features (``tile * tokens_per_tile + patch``) followed by ``image_newline``;
``image_positions`` holds where that token sits in the text (the trash row for the unused slots). Both
have one slot per text position, so their shapes never depend on the data. The sources are computed by
running the model's own ``pack_image_features`` on tensors of indices instead of features, so the
unpadding and newline rules are exactly the model's.

Text, the CLIP tower, the projector and the loss are LLaVA 1.5's (``llava.LlavaRows``): a Mistral or
Llama text model with the packed attention (``llava.install``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from visionft.data.rows import RowBudget, SampleSize
from visionft.patching.rows.base import RowInfo
from visionft.patching.rows.llava import LlavaRows, _inner, install


class LlavaNextRows(LlavaRows):
    """LLaVA-NeXT rows (anyres tiles of a CLIP tower; module docstring).

    Args:
        hf (nn.Module): ``LlavaNextForConditionalGeneration`` (not the PEFT wrapper).
        pad_id (int): the token id that fills padding.
        fused (bool): the fused loss where the kernels run (the optimizations' switch). Default: True.

    Raises:
        ValueError: another tower than CLIP, or ``vision_feature_select_strategy`` other than
            ``"default"`` (the model's own unpadding assumes the CLS token is dropped).
    """

    name = "llava_next"

    def __init__(self, hf: nn.Module, pad_id: int, fused: bool = True) -> None:
        kind = str(getattr(hf.config.vision_config, "model_type", ""))
        if kind != "clip_vision_model":
            raise ValueError(f"rows: LLaVA-NeXT with a {kind!r} vision tower is not covered (CLIP is)")
        super().__init__(hf, pad_id, fused)
        if self.strategy != "default":
            raise ValueError(
                f"rows: LLaVA-NeXT with vision_feature_select_strategy={self.strategy!r} is not covered "
                '("default" only)'
            )
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        self._tiles_of = image_size_to_num_patches
        self.pinpoints = [list(p) for p in hf.config.image_grid_pinpoints]
        # The most tiles one image can take: the largest pinpoint's grid plus the base tile.
        self.max_image_tiles = (
            max((int(h) // self.image_size) * (int(w) // self.image_size) for h, w in self.pinpoints) + 1
        )

    def plan_kwargs(self, max_sample_tokens: int) -> dict[str, int]:
        """Bounds for ``plan_tiers``: the vision budget counts tiles, each a whole tower pass. Every image
        has at least its base tile's tokens, so a sample of ``max_sample_tokens`` holds at most that many
        tokens' worth of images, each of at most ``max_image_tiles`` tiles: tier 1 holds any sample the
        collator accepts, however many images it has."""
        images = max(1, max_sample_tokens // self.tokens_per_image)
        return {"patch_multiple": 1, "max_sample_patches": images * self.max_image_tiles}

    def _tiles(self, sample: dict[str, torch.Tensor]) -> list[int]:
        sizes = sample.get("image_sizes")
        if sample.get("pixel_values") is None or sizes is None:
            return []
        return [self._tiles_of(size, self.pinpoints, self.image_size) for size in sizes.tolist()]

    def sample_size(self, sample: dict[str, torch.Tensor]) -> SampleSize:
        tiles = self._tiles(sample)
        return SampleSize(int(sample["input_ids"].shape[1]), sum(tiles), len(tiles))

    def image_sources(self, first_tile: int, tiles: int, size: Sequence[int], newline: int) -> torch.Tensor:
        """Where each image token of one image reads its feature: indices into the row's table of tile
        features (``tile * tokens_per_image + patch``, the image's tiles starting at ``first_tile``),
        ``newline`` for the newline; ``size`` is the image's original (height, width)."""
        per_tile = self.tokens_per_image
        index = (first_tile + torch.arange(tiles))[:, None] * per_tile + torch.arange(per_tile)
        packed, _ = self._inner.pack_image_features(
            [index.unsqueeze(-1)],
            torch.tensor([list(size)]),
            self.strategy,
            image_newline=torch.tensor([newline]),
        )
        return packed[0].reshape(-1)

    def assemble(
        self, samples: Sequence[dict[str, torch.Tensor]], budget: RowBudget, tier: int
    ) -> dict[str, Any]:
        """The row batch of ``samples`` (host tensors of the budget's shapes; module docstring).

        Raises:
            ValueError: the samples do not fit ``budget``, or a sample's image tokens do not match its
                images' features.
        """
        text, positions = self._text(samples, budget)
        n_tiles = budget.patches
        newline = n_tiles * self.tokens_per_image  # the table's last entry
        pieces, sources, real = [], [], 0
        for sample in samples:
            for i, n in enumerate(self._tiles(sample)):
                size = sample["image_sizes"][i].tolist()
                sources.append(self.image_sources(real, n, size, newline))
                pieces.append(sample["pixel_values"][i, :n])
                real += n
        images = len(pieces)
        if real > n_tiles:
            raise ValueError(f"rows: {real} tiles do not fit the row's {n_tiles}")
        if images > budget.images:
            raise ValueError(f"rows: {images} images do not fit the row's {budget.images}")
        pixels = torch.zeros(
            (n_tiles, 3, self.image_size, self.image_size),
            dtype=pieces[0].dtype if pieces else torch.float32,
        )
        if pieces:
            pixels[:real] = torch.cat(pieces)
        slots = budget.tokens
        image_sources = torch.full((slots,), newline, dtype=torch.long)
        tokens = sum(int(s.shape[0]) for s in sources)
        if tokens:
            image_sources[:tokens] = torch.cat(sources)
        vision = {
            "pixel_values": pixels,
            "image_sources": image_sources,
            "image_positions": self._image_positions(text, slots, tokens),
        }
        return self._row_batch(
            text,
            positions,
            vision,
            budget=budget,
            tier=tier,
            ints={"max_sample_tokens": budget.max_sample_tokens, "tiles": n_tiles},
            samples=len(samples),
            real_patches=real,
        )

    def forward(
        self, model: nn.Module, tensors: dict[str, torch.Tensor], info: RowInfo, num_items: Any = None
    ) -> torch.Tensor:
        """Forward + loss of one row batch on the device (module docstring); sync-free."""
        from visionft.patching import hf_model

        hf = hf_model(model)
        inner = _inner(hf)
        features = None
        if info.int("tiles"):
            tiles = self.tile_features(inner, tensors["pixel_values"])
            table = torch.cat((tiles.reshape(-1, tiles.shape[-1]), inner.image_newline[None].to(tiles.dtype)))
            features = table.index_select(0, tensors["image_sources"])
        return self._text_loss(hf, inner, features, tensors, info, num_items)


#: The layout class ``visionft.patching.rows.enable_rows`` builds.
FAMILY = LlavaNextRows

__all__ = ["FAMILY", "LlavaNextRows", "install"]
