"""Llama 3.2 Vision (Mllama) rows of fixed shape, and their sync-free forward.

Mllama does not put image features into the text: each image is cut into up to ``max_num_tiles`` tiles
of one size, the vision model encodes every tile slot of every image (an image's unused slots hold zero
pixels and the model's own tile mask), and the projected features are the keys and values of the gated
cross-attention layers of the text model. Which text token sees which tile is the processor's
``cross_attention_mask`` (each image from its ``<|image|>`` token on); a token that sees no tile gets no
MLP output from a cross-attention layer (``full_text_row_masked_out_mask``).

A row's vision budget is a whole number of images, each of ``max_num_tiles`` tile slots (the cost of one
image is the same whatever its tiles): the samples' images one after another, each with its own tiles,
aspect-ratio id and tile mask, then empty slots up to the budget. An empty slot is one zero tile of
the 1x1 aspect ratio, so that its features are finite; no token attends to it. The vision model runs
each image alone, so an image's features do not depend on the row.

The cross-attention mask of the row is what each sample would have alone (a batch of one through the
model's own forward): its tokens see exactly the tiles of its own images that its mask allows; a token
before its sample's first image sees every tile slot of its sample's images with no mask (what the
model's mask preparation does for a row that sees nothing), and gets the MLP masked out. A text-only
sample alone skips the cross-attention layers; in the row its tokens (and the padding) attend only to
one zero key appended to the features, whose value is zero (the key and value projections have no
bias), so the layer adds nothing to them either. The padded batch of the model's own forward is not
the reference here: there a text-only sample's tokens attend to the padding image slots of the other
samples, so its loss depends on the batch.

Host side, the mask travels as ``cross_tiles`` ``(1, T, images, tiles)`` and ``cross_rows`` ``(1, T)``;
the device expands it to the additive mask over every vision token (``(1, 1, T, images * tiles *
patches + 1)``). Text: the samples one after another, then padding (``base.text_row``); positions count
from 0 per sample; the self-attention layers (Llama-style) are block-diagonal causal over the samples
and padding chunks (``patching.packed_attention``). The row forward calls the vision model, the
projector and the text model itself (``MllamaModel.forward`` would build the cross-attention mask of a
padded batch), with an empty 4D self-attention mask that the mask builder passes through as given.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from visionft.data.packing import PACKED_CU_SEQLENS, PACKED_MAX_SEQLEN
from visionft.data.rows import RowBudget, SampleSize
from visionft.patching.core import PatchReport
from visionft.patching.packed_attention import install as install_packed_attention
from visionft.patching.packed_attention import installed as packed_attention_installed
from visionft.patching.rows.base import (
    RowInfo,
    embed_on_host,
    row_batch,
    row_loss,
    segment_positions,
    text_row,
)


def _inner(hf: nn.Module) -> nn.Module:
    inner = getattr(hf, "model", None)
    if inner is None or not all(
        hasattr(inner, a) for a in ("vision_model", "multi_modal_projector", "language_model")
    ):
        raise ValueError(
            "rows: the model has no Mllama inner model (vision_model, multi_modal_projector, language_model)"
        )
    return inner


def _has_bias(linear: nn.Module) -> bool:
    base = getattr(linear, "base_layer", linear)  # a PEFT LoRA layer wraps the projection
    return getattr(base, "bias", None) is not None


class MllamaRows:
    """The Mllama row family of one model (module docstring).

    Args:
        hf (nn.Module): ``MllamaForConditionalGeneration`` (not the PEFT wrapper).
        pad_id (int): the token id that fills padding.
        fused (bool): the fused loss where the kernels run (the optimizations' switch). Default: True.

    Raises:
        ValueError: the aspect ratios have no 1x1 entry (the empty image slot), or a cross-attention
            projection has a bias (the zero key would not have a zero value).
    """

    name = "mllama"

    def __init__(self, hf: nn.Module, pad_id: int, fused: bool = True) -> None:
        inner = _inner(hf)
        vision = hf.config.vision_config
        self.pad_id = int(pad_id)
        self.fused = fused
        self.image_size = int(vision.image_size)
        self.channels = int(getattr(vision, "num_channels", 3))
        self.max_tiles = int(vision.max_num_tiles)
        self.tile_tokens = int(inner.vision_model.num_patches)  # patches + the class token
        self.patches_per_image = self.max_tiles * self.tile_tokens
        self.hidden = int(hf.config.get_text_config().hidden_size)
        ratios = [list(r) for r in vision.supported_aspect_ratios]
        if [1, 1] not in ratios:
            raise ValueError(f"rows: Mllama without a 1x1 aspect ratio ({ratios}) is not covered")
        self.empty_ratio_id = ratios.index([1, 1]) + 1  # id 0 is the processor's "no image"
        for name, module in inner.language_model.named_modules():
            if type(module).__name__ == "MllamaTextCrossAttention" and any(
                _has_bias(getattr(module, p)) for p in ("k_proj", "v_proj")
            ):
                raise ValueError(f"rows: {name} projects keys or values with a bias")
        self._inner = inner

    # -- host ---------------------------------------------------------------------------------------

    def plan_kwargs(self, max_sample_tokens: int) -> dict[str, int]:
        """Bounds for ``plan_tiers``: the vision budget counts whole images of ``max_num_tiles`` slots."""
        return {"patches_per_image": self.patches_per_image}

    @staticmethod
    def _images(sample: dict[str, torch.Tensor]) -> int:
        pixels = sample.get("pixel_values")
        return int(pixels.shape[1]) if pixels is not None else 0

    def sample_size(self, sample: dict[str, torch.Tensor]) -> SampleSize:
        images = self._images(sample)
        return SampleSize(int(sample["input_ids"].shape[1]), images * self.patches_per_image, images)

    def _tiles(self, value: torch.Tensor, dim: int) -> torch.Tensor:
        """``value`` with its tile dimension ``dim`` padded with zeros to ``max_num_tiles``."""
        have = int(value.shape[dim])
        if have > self.max_tiles:
            raise ValueError(f"rows: an image of {have} tile slots, over the model's {self.max_tiles}")
        if have == self.max_tiles:
            return value
        shape = list(value.shape)
        shape[dim] = self.max_tiles - have
        return torch.cat((value, value.new_zeros(shape)), dim=dim)

    def assemble(
        self, samples: Sequence[dict[str, torch.Tensor]], budget: RowBudget, tier: int
    ) -> dict[str, Any]:
        """The row batch of ``samples`` (host tensors of the budget's shapes; module docstring).

        Raises:
            ValueError: the samples do not fit ``budget``, or a sample's cross-attention mask does not
                match its images.
        """
        total, n_images, tiles = budget.tokens, budget.images, self.max_tiles
        text = text_row(samples, budget, self.pad_id)
        real = sum(self._images(s) for s in samples)
        if real > n_images:
            raise ValueError(f"rows: {real} images do not fit the row's {n_images}")
        side = self.image_size
        dtype = next((s["pixel_values"].dtype for s in samples if self._images(s)), torch.float32)
        pixels = torch.zeros((n_images, tiles, self.channels, side, side), dtype=dtype)
        ratio_ids = torch.full((n_images,), self.empty_ratio_id, dtype=torch.long)
        ratio_mask = torch.zeros((n_images, tiles), dtype=torch.long)
        ratio_mask[:, 0] = 1
        cross_tiles = torch.zeros((1, total, n_images, tiles), dtype=torch.bool)
        cross_rows = torch.zeros((1, total), dtype=torch.bool)
        slot = 0
        for sample, start in zip(samples, text.starts, strict=True):
            count = self._images(sample)
            if not count:
                continue
            n = int(sample["input_ids"].shape[1])
            end = slot + count
            pixels[slot:end] = self._tiles(sample["pixel_values"][0], 1)
            ratio_ids[slot:end] = sample["aspect_ratio_ids"][0]
            ratio_mask[slot:end] = self._tiles(sample["aspect_ratio_mask"][0], 1)
            mask = sample["cross_attention_mask"][0]
            if tuple(mask.shape[:2]) != (n, count):
                raise ValueError(
                    f"rows: a cross-attention mask of {tuple(mask.shape)} for {n} tokens and {count} images"
                )
            sees = self._tiles(mask, 2).bool()
            seen = sees.flatten(1).any(1)
            sees[~seen] = True  # a token that sees no tile attends to all of its sample's slots unmasked
            cross_tiles[0, start : start + n, slot:end] = sees
            cross_rows[0, start : start + n] = seen
            slot = end
        tensors = {
            "position_ids": segment_positions(text.cu_seqlens, total),
            "text_cu_seqlens": text.cu_seqlens,
            "pixel_values": pixels,
            "aspect_ratio_ids": ratio_ids,
            "aspect_ratio_mask": ratio_mask,
            "cross_tiles": cross_tiles,
            "cross_rows": cross_rows,
        }
        return row_batch(
            self.name,
            text,
            tensors,
            budget=budget,
            tier=tier,
            ints={"max_sample_tokens": budget.max_sample_tokens, "images": n_images},
            samples=len(samples),
            real_patches=real * self.patches_per_image,
        )

    def host_inputs(self, model: nn.Module, batch: dict[str, Any]) -> dict[str, Any]:
        return embed_on_host(model, batch)

    # -- device ---------------------------------------------------------------------------------------

    def cross_attention(
        self, tensors: dict[str, torch.Tensor], dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The additive cross-attention mask ``(1, 1, T, K + 1)`` over the row's ``K`` vision tokens and the
        zero key, and the text-row mask ``(1, 1, T, 1)`` (module docstring)."""
        tiles = tensors["cross_tiles"]
        total = tiles.shape[1]
        sees = tiles.to(torch.bool).repeat_interleave(self.tile_tokens, dim=3).reshape(1, total, -1)
        sees = torch.cat((sees, ~sees.any(dim=-1, keepdim=True)), dim=-1)
        additive = torch.zeros(sees.shape, dtype=dtype, device=sees.device)
        additive = additive.masked_fill(~sees, torch.finfo(dtype).min)
        rows = tensors["cross_rows"].to(dtype)[:, None, :, None]
        return additive[:, None], rows

    def forward(
        self, model: nn.Module, tensors: dict[str, torch.Tensor], info: RowInfo, num_items: Any = None
    ) -> torch.Tensor:
        """Forward + loss of one row batch on the device (module docstring); sync-free."""
        from visionft.patching import hf_model

        hf = hf_model(model)
        inner = _inner(hf)
        text = inner.language_model
        embeds = tensors.get("inputs_embeds")
        if embeds is None:
            embeds = text.get_input_embeddings()(tensors["input_ids"])
        states = mask = rows = None
        if info.int("images"):
            vision = inner.vision_model(
                pixel_values=tensors["pixel_values"][None],
                aspect_ratio_ids=tensors["aspect_ratio_ids"][None],
                aspect_ratio_mask=tensors["aspect_ratio_mask"][None],
            ).last_hidden_state
            states = inner.multi_modal_projector(vision).reshape(1, -1, self.hidden)
            states = torch.cat((states, states.new_zeros(1, 1, self.hidden)), dim=1)
            mask, rows = self.cross_attention(tensors, inner.dtype)
        passthrough = torch.ones((1, 1, 0, 0), dtype=torch.bool, device=embeds.device)
        out = text(
            inputs_embeds=embeds,
            attention_mask=passthrough,
            position_ids=tensors["position_ids"],
            cross_attention_states=states,
            cross_attention_mask=mask,
            full_text_row_masked_out_mask=rows,
            use_cache=False,
            **{
                PACKED_CU_SEQLENS: tensors["text_cu_seqlens"],
                PACKED_MAX_SEQLEN: info.int("max_sample_tokens"),
            },
        )
        return row_loss(out.last_hidden_state, hf.lm_head, tensors["shift_labels"], num_items, self.fused)


def install(hf: nn.Module, report: PatchReport, fused: bool = True) -> bool:
    """Installs the packed attention on the text self-attention layers (inert outside a row forward).
    Returns whether every one of them was recognised."""
    _inner(hf)
    return packed_attention_installed(hf) or install_packed_attention(hf, report)


#: The layout class ``visionft.patching.rows.enable_rows`` builds.
FAMILY = MllamaRows

__all__ = ["FAMILY", "MllamaRows", "install"]
