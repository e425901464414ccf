"""Gemma 3 rows of fixed shape, and their sync-free forward.

Gemma 3's SigLIP tower takes every image at one resolution (896 px; ``mm_tokens_per_image`` tokens
each), so a row's vision budget is a whole number of images: the samples' images, then zero images up
to the budget, whose features go to a trash row. What varies is the text: the samples one after
another, then padding (``base.text_row``), each sample's positions counting from 0 as they would alone.

Attention is what Gemma 3 trains with, per sample: causal, bidirectional within each image, and on the
sliding-window layers limited to the window (``create_masks_for_vision_model`` of transformers: full =
causal OR same image; sliding = that AND ``q - kv < window``), and never across samples. The row's two
masks are built on the device from three host-made vectors (segment, image block and position of every
token) and passed to the text model as its mask mapping, which its forward takes as given; attention
itself is transformers' SDPA call with that mask. Padding tokens form segments of their own, so that
every query sees at least itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from visionft.data.rows import RowBudget, SampleSize
from visionft.patching.core import PatchReport
from visionft.patching.rows.base import RowInfo, row_batch, row_loss, scatter_features, text_row


def _inner(hf: nn.Module) -> nn.Module:
    inner = getattr(hf, "model", None)
    if inner is None or not all(
        hasattr(inner, a) for a in ("vision_tower", "multi_modal_projector", "language_model")
    ):
        raise ValueError(
            "rows: the model has no Gemma 3 inner model (vision_tower, projector, language_model)"
        )
    return inner


class GemmaRows:
    """The Gemma 3 row family of one model (module docstring).

    Args:
        hf (nn.Module): ``Gemma3ForConditionalGeneration`` (not the PEFT wrapper).
        pad_id (int): the token id that fills padding.
        fused (bool): the fused loss where the kernels run (the optimizations' switch). Default: True.

    Raises:
        ValueError: the text model attends bidirectionally (``use_bidirectional_attention``), which
            this layout does not build.
    """

    name = "gemma3"

    def __init__(self, hf: nn.Module, pad_id: int, fused: bool = True) -> None:
        inner = _inner(hf)
        config = hf.config
        text = config.get_text_config()
        if getattr(text, "use_bidirectional_attention", False):
            raise ValueError("rows: Gemma 3 with bidirectional text attention is not covered")
        vision = config.vision_config
        self.pad_id = int(pad_id)
        self.fused = fused
        self.image_token_id = int(config.image_token_id)
        self.vocab_size = int(text.vocab_size)
        self.tokens_per_image = int(config.mm_tokens_per_image)
        self.image_size = int(vision.image_size)
        self.patches_per_image = (int(vision.image_size) // int(vision.patch_size)) ** 2
        self.sliding_window = int(text.sliding_window) if getattr(text, "sliding_window", None) else None
        self.layer_types = set(getattr(text, "layer_types", None) or ["full_attention"])
        self._inner = inner

    # -- host ---------------------------------------------------------------------------------------

    def plan_kwargs(self, max_sample_tokens: int) -> dict[str, int]:
        """Bounds for ``plan_tiers``: the vision budget counts whole images."""
        return {"patches_per_image": self.patches_per_image}

    def sample_size(self, sample: dict[str, torch.Tensor]) -> SampleSize:
        pixels = sample.get("pixel_values")
        images = int(pixels.shape[0]) if pixels is not None else 0
        return SampleSize(int(sample["input_ids"].shape[1]), images * self.patches_per_image, images)

    def assemble(
        self, samples: Sequence[dict[str, torch.Tensor]], budget: RowBudget, tier: int
    ) -> dict[str, Any]:
        """The row batch of ``samples`` (host tensors of the budget's shapes; module docstring).

        Raises:
            ValueError: the samples do not fit ``budget``, or a sample's image tokens do not match its images.
        """
        total, n_images = budget.tokens, budget.images
        text = text_row(samples, budget, self.pad_id)
        positions = torch.zeros((1, total), dtype=torch.long)
        segment = torch.empty(total, dtype=torch.long)
        for i, (sample, start) in enumerate(zip(samples, text.starts, strict=True)):
            n = int(sample["input_ids"].shape[1])
            positions[0, start : start + n] = torch.arange(n)
            segment[start : start + n] = i
        # Padding in chunks of its own: causal within each, so every padding query sees itself.
        at, chunk_id = text.real, len(samples)
        while at < total:
            step = min(budget.max_sample_tokens, total - at)
            positions[0, at : at + step] = torch.arange(step)
            segment[at : at + step] = chunk_id
            at, chunk_id = at + step, chunk_id + 1
        is_image = text.input_ids[0] == self.image_token_id
        starts = is_image & ~torch.cat((torch.zeros(1, dtype=torch.bool), is_image[:-1]))
        block = torch.where(is_image, torch.cumsum(starts.long(), 0) - 1, torch.full_like(segment, -1))
        pixel_list = [s["pixel_values"] for s in samples if s.get("pixel_values") is not None]
        real_images = sum(int(p.shape[0]) for p in pixel_list)
        if real_images > n_images:
            raise ValueError(f"rows: {real_images} images do not fit the row's {n_images}")
        image_at = is_image.nonzero().reshape(-1)
        if int(image_at.shape[0]) != real_images * self.tokens_per_image:
            raise ValueError(
                f"rows: {int(image_at.shape[0])} image tokens for {real_images} images of "
                f"{self.tokens_per_image} tokens in the row"
            )
        pixels = torch.zeros(
            (n_images, 3, self.image_size, self.image_size),
            dtype=pixel_list[0].dtype if pixel_list else torch.float32,
        )
        if pixel_list:
            pixels[:real_images] = torch.cat(pixel_list)
        feature_at = torch.full((n_images * self.tokens_per_image,), total, dtype=torch.long)
        feature_at[: image_at.shape[0]] = image_at
        tensors = {
            "position_ids": positions,
            "segment_ids": segment,
            "image_blocks": block,
            "pixel_values": pixels,
            "image_positions": feature_at,
        }
        return row_batch(
            self.name,
            text,
            tensors,
            budget=budget,
            tier=tier,
            ints={"max_sample_tokens": budget.max_sample_tokens, "images": n_images},
            samples=len(samples),
            real_patches=real_images * self.patches_per_image,
        )

    def host_inputs(self, model: nn.Module, batch: dict[str, Any]) -> dict[str, Any]:
        return batch  # the embedding table is tied to lm_head: it stays on the device

    # -- device ---------------------------------------------------------------------------------------

    def masks(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The text model's mask mapping for the row: ``(1, 1, T, T)`` bool, True where a query attends."""
        seg, block, pos = tensors["segment_ids"], tensors["image_blocks"], tensors["position_ids"][0]
        same = seg[:, None] == seg[None, :]
        causal = pos[None, :] <= pos[:, None]
        image = (block[:, None] == block[None, :]) & (block[:, None] >= 0)
        full = same & (causal | image)
        out = {"full_attention": full[None, None]}
        if "sliding_attention" in self.layer_types:
            window = self.sliding_window or full.shape[-1]
            out["sliding_attention"] = (full & (pos[:, None] - pos[None, :] < window))[None, None]
        return out

    def forward(
        self, model: nn.Module, tensors: dict[str, torch.Tensor], info: RowInfo, num_items: Any = None
    ) -> torch.Tensor:
        """Forward + loss of one row batch on the device (module docstring); sync-free."""
        from visionft.patching import hf_model

        hf = hf_model(model)
        inner = _inner(hf)
        tower = inner.vision_tower
        pixels = tensors["pixel_values"].to(tower.dtype)
        features = inner.multi_modal_projector(tower(pixel_values=pixels).last_hidden_state)
        ids = tensors["input_ids"]
        if self.image_token_id >= self.vocab_size:  # out of the table, as the model's own forward does
            ids = torch.where(ids == self.image_token_id, torch.zeros_like(ids), ids)
        embeds = inner.get_input_embeddings()(ids)
        embeds = scatter_features(
            embeds, features.reshape(-1, features.shape[-1]), tensors["image_positions"]
        )
        out = inner.language_model(
            inputs_embeds=embeds,
            attention_mask=self.masks(tensors),
            position_ids=tensors["position_ids"],
            use_cache=False,
        )
        return row_loss(out.last_hidden_state, hf.lm_head, tensors["shift_labels"], num_items, self.fused)


def install(hf: nn.Module, report: PatchReport, fused: bool = True) -> bool:
    """Nothing to swap: the row forward passes its masks to the text model. Checks the layout."""
    _inner(hf)
    return True


#: The layout class ``visionft.patching.rows.enable_rows`` builds.
FAMILY = GemmaRows

__all__ = ["FAMILY", "GemmaRows", "install"]
