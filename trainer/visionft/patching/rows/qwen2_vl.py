"""Qwen2-VL / Qwen2.5-VL / Qwen3-VL rows of fixed shape, and their sync-free forward.

Host layout (``assemble``), for a row of ``T`` tokens and ``P`` patches:

- text: the samples' tokens one after another, then padding (``base.text_row``); M-RoPE positions of
  each sample as it would have alone (transformers' own ``get_rope_index`` per sample, on the host),
  zeros on padding; the segments as ``text_cu_seqlens``;
- vision: the samples' patches one after another, then zero patches to ``P``; per patch its rotary
  position (transformers' ``vision_utils``), zeros on padding; the images as segments of the tower's
  full attention (``vision_cu_seqlens``), padding patches in chunks of their own; for Qwen2.5-VL also
  the window order of the merged units (the padding units keep their place) and the windows as
  segments (``cu_window_seqlens``);
- where each merged unit's feature goes in the text (``image_positions``): the image tokens in row
  order, and ``T`` (a trash row) for padding units;
- Qwen3-VL: the taps and weights that resample the learned position table to each image's grid
  (``interp_indices``/``interp_weights``; zero weights on padding), and its DeepStack features go to the
  same positions of the early text layers (``install`` makes the text model's ``_deepstack_process`` add
  them at those positions instead of under a boolean mask).

Forward (``forward``): the vision tower with every layout tensor passed in (its own forward takes them
through ``vision_utils``' keyword arguments, so it computes nothing from ``grid_thw``), the features
written into the embeddings with one ``index_copy``, the text model with block-diagonal causal
attention (``patching.packed_attention``), and the loss (``base.row_loss``). The vision attention is
swapped for one that attends within the segments with the host bound ``max_seqlen`` (``install``);
both attentions are inert outside a row forward (they act on keyword arguments only a row forward
passes).
"""

from __future__ import annotations

import sys
import types
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from visionft.data.rows import RowBudget, SampleSize
from visionft.patching.core import PatchReport, kernels_can_run
from visionft.patching.packed_attention import install as install_packed_attention
from visionft.patching.rows.base import (
    RowInfo,
    embed_on_host,
    image_positions,
    padded_cu_seqlens,
    row_batch,
    row_loss,
    scatter_features,
    segments_attention,
    text_row,
)

VISION_ATTENTION_CLASSES = (
    "Qwen2_5_VLVisionAttention",
    "VisionAttention",
    "Qwen2VLVisionAttention",
    "Qwen3VLVisionAttention",
)

#: Keyword argument that marks the vision tower's attention calls of a row forward. It travels with
#: the tower's other keyword arguments down to every block, so that a checkpointed block's
#: recomputation (which replays the call with the same arguments) sees it too.
ROW_SEGMENTS = "visionft_row_segments"


def _inner(hf: nn.Module) -> nn.Module:
    inner = getattr(hf, "model", None)
    if inner is None or not hasattr(inner, "visual") or not hasattr(inner, "language_model"):
        raise ValueError("rows: the model has no Qwen2-VL-style inner model (visual + language_model)")
    return inner


class QwenRows:
    """The Qwen2-VL / Qwen2.5-VL row family of one model (module docstring).

    Args:
        hf (nn.Module): the ``ForConditionalGeneration`` model (not the PEFT wrapper).
        pad_id (int): the token id that fills padding.
        fused (bool): use the fused kernels (rope, loss) where they run: the optimizations' switch.
            Default: True.
    """

    name = "qwen2_vl"

    def __init__(self, hf: nn.Module, pad_id: int, fused: bool = True) -> None:
        inner = _inner(hf)
        visual = inner.visual
        self.pad_id = int(pad_id)
        self.fused = fused
        self.image_token_id = int(inner.config.image_token_id)
        self.merge = int(visual.spatial_merge_size)
        self.unit = self.merge**2
        self.windowed = getattr(visual, "window_size", None) is not None and hasattr(
            visual, "fullatt_block_indexes"
        )
        self.window_patches = (
            (int(visual.window_size) // int(visual.config.patch_size)) ** 2 if self.windowed else 0
        )
        self.window_size = int(visual.window_size) if self.windowed else 0
        self.patch_size = int(visual.config.patch_size)
        self.interpolated = hasattr(visual, "num_grid_per_side")
        self.deepstack = bool(getattr(visual, "deepstack_visual_indexes", None))
        if self.interpolated:
            self.grid_per_side = int(visual.num_grid_per_side)
            self.interpolation = (visual.interpolation_mode, bool(visual.interpolation_align_corners))
        self._rope_index = inner.get_rope_index

    # -- host ---------------------------------------------------------------------------------------

    def plan_kwargs(self, max_sample_tokens: int) -> dict[str, int]:
        """Bounds for ``plan_tiers``: an image token stands for ``merge**2`` patches, and a sample has
        at most ``max_sample_tokens`` tokens."""
        return {"max_sample_patches": self.unit * max_sample_tokens, "patch_multiple": 64}

    def sample_size(self, sample: dict[str, torch.Tensor]) -> SampleSize:
        grid = sample.get("image_grid_thw")
        patches = int(grid.prod(-1).sum()) if grid is not None else 0
        images = int(grid.shape[0]) if grid is not None else 0
        return SampleSize(int(sample["input_ids"].shape[1]), patches, images)

    def _positions(self, sample: dict[str, torch.Tensor]) -> torch.Tensor:
        ids = sample["input_ids"]
        grid = sample.get("image_grid_thw")
        mm = sample.get("mm_token_type_ids")
        if grid is not None and mm is not None:
            with torch.no_grad():
                pos, _ = self._rope_index(ids, mm, image_grid_thw=grid, attention_mask=None)
            return pos.to(torch.long)
        # What the text model does itself without 3-D positions: 0, 1, 2, ... on all three axes.
        return torch.arange(ids.shape[1]).view(1, 1, -1).expand(3, 1, -1)

    def segment_bounds(self, budget: RowBudget) -> dict[str, int]:
        """The host ints of every row of ``budget`` (segment counts and the longest segment of each kind)."""
        units = budget.patches // self.unit
        bounds = {
            "max_sample_tokens": budget.max_sample_tokens,
            "image_max": budget.patches,
            "image_segments": budget.images + 2,
        }
        if self.windowed:
            bounds["window_max"] = self.window_patches
            bounds["window_segments"] = max(units, 1)
        return bounds

    def assemble(
        self, samples: Sequence[dict[str, torch.Tensor]], budget: RowBudget, tier: int
    ) -> dict[str, Any]:
        """The row batch of ``samples`` (host tensors of the budget's shapes; module docstring).

        Raises:
            ValueError: the samples do not fit ``budget``, or a sample's image tokens do not match its
                image features.
        """
        from transformers import vision_utils

        total, patches = budget.tokens, budget.patches
        if patches % self.unit:
            raise ValueError(f"rows: the patch budget {patches} is not a multiple of {self.unit}")
        bounds = self.segment_bounds(budget)
        text = text_row(samples, budget, self.pad_id)
        positions = torch.zeros((3, 1, total), dtype=torch.long)
        for sample, start in zip(samples, text.starts, strict=True):
            pos = self._positions(sample)
            positions[:, :, start : start + pos.shape[-1]] = pos
        grids = [s["image_grid_thw"] for s in samples if s.get("image_grid_thw") is not None]
        pixel_list = [s["pixel_values"] for s in samples if s.get("pixel_values") is not None]
        width = pixel_list[0].shape[-1] if pixel_list else 0
        real = sum(int(p.shape[0]) for p in pixel_list)
        if real > patches:
            raise ValueError(f"rows: {real} patches do not fit the row's {patches}")
        units, real_units = patches // self.unit, real // self.unit
        batch: dict[str, Any] = {"position_ids": positions, "text_cu_seqlens": text.cu_seqlens}
        if width == 0:  # no image in the row: the tower still runs, on zeros, at the fixed shape
            width = 3 * 2 * self.patch_size**2
        pixels = torch.zeros((patches, width), dtype=pixel_list[0].dtype if pixel_list else torch.float32)
        vision_pos = torch.zeros((patches, 2), dtype=torch.long)
        image_lengths: list[int] = []
        if pixel_list:
            pixels[:real] = torch.cat(pixel_list)
            grid = torch.cat(grids)
            vision_pos[:real] = vision_utils.get_vision_position_ids(grid, self.merge)
            image_lengths = [int(h * w) for t, h, w in grid.tolist() for _ in range(int(t))]
        batch["pixel_values"] = pixels
        batch["vision_position_ids"] = vision_pos
        if self.interpolated:
            taps = 4 if self.interpolation[0] == "bilinear" else 16
            indices = torch.zeros((patches, taps), dtype=torch.long)
            weights = torch.zeros((patches, taps), dtype=torch.float32)
            if pixel_list:
                idx, w = vision_utils.get_vision_interpolation_indices_and_weights(
                    grid,
                    num_grid_per_side=self.grid_per_side,
                    mode=self.interpolation[0],
                    align_corners=self.interpolation[1],
                    spatial_merge_size=self.merge,
                )
                indices[:real], weights[:real] = idx, w
            batch["interp_indices"], batch["interp_weights"] = indices, weights
        batch["vision_cu_seqlens"] = padded_cu_seqlens(
            image_lengths, patches, bounds["image_max"], bounds["image_segments"]
        )
        if self.windowed:
            window_index = torch.arange(units, dtype=torch.long)
            window_lengths: list[int] = []
            if pixel_list:
                index, cu_window = vision_utils.get_vision_window_index(
                    grid,
                    spatial_merge_size=self.merge,
                    window_size=self.window_size,
                    patch_size=self.patch_size,
                )
                window_index[:real_units] = index
                window_lengths = (cu_window[1:] - cu_window[:-1]).tolist()
            batch["window_index"] = window_index
            batch["cu_window_seqlens"] = padded_cu_seqlens(
                window_lengths, patches, bounds["window_max"], bounds["window_segments"]
            )
        batch["image_positions"] = image_positions(text, self.image_token_id, units, real_units)
        return row_batch(
            self.name,
            text,
            batch,
            budget=budget,
            tier=tier,
            ints=bounds,
            samples=len(samples),
            real_patches=real,
        )

    # -- device ---------------------------------------------------------------------------------------

    def forward(
        self, model: nn.Module, tensors: dict[str, torch.Tensor], info: RowInfo, num_items: Any = None
    ) -> torch.Tensor:
        """Forward + loss of one row batch on the device (module docstring); sync-free."""
        from visionft.patching import hf_model

        hf = hf_model(model)
        inner = _inner(hf)
        visual = inner.visual
        vision_kwargs: dict[str, Any] = {
            ROW_SEGMENTS: True,
            "position_ids": tensors["vision_position_ids"],
            "cu_seqlens": tensors["vision_cu_seqlens"],
            "max_seqlen": info.int("image_max"),
        }
        if self.windowed:
            vision_kwargs.update(
                window_index=tensors["window_index"],
                cu_window_seqlens=tensors["cu_window_seqlens"],
                max_window_seqlen=info.int("window_max"),
            )
        if self.interpolated:
            vision_kwargs.update(
                interp_indices=tensors["interp_indices"], interp_weights=tensors["interp_weights"]
            )
        vision = visual(tensors["pixel_values"].to(visual.dtype), grid_thw=None, **vision_kwargs)
        embeds = tensors.get("inputs_embeds")
        if embeds is None:
            embeds = inner.get_input_embeddings()(tensors["input_ids"])
        embeds = scatter_features(embeds, vision.pooler_output, tensors["image_positions"])
        text_kwargs: dict[str, Any] = {"attention_mask": {"full_attention": None, "sliding_attention": None}}
        if self.deepstack:
            # The early layers add each DeepStack feature at its image token (install's _deepstack_process).
            text_kwargs = {
                "attention_mask": None,
                "visual_pos_masks": tensors["image_positions"],
                "deepstack_visual_embeds": vision.deepstack_features,
            }
        out = inner.language_model(
            input_ids=None,
            inputs_embeds=embeds,
            position_ids=tensors["position_ids"],
            use_cache=False,
            packed_cu_seqlens=tensors["text_cu_seqlens"],
            packed_max_seqlen=info.int("max_sample_tokens"),
            **text_kwargs,
        )
        return row_loss(out.last_hidden_state, hf.lm_head, tensors["shift_labels"], num_items, self.fused)

    def host_inputs(self, model: nn.Module, batch: dict[str, Any]) -> dict[str, Any]:
        return embed_on_host(model, batch)


def _make_vision_forward(orig, modeling, fused: bool):
    def forward(self, hidden_states, cu_seqlens, *args, **kwargs):
        if not kwargs.pop(ROW_SEGMENTS, False) or args:
            return orig(hidden_states, cu_seqlens, *args, **kwargs)
        max_len = kwargs.get("max_seqlen")
        cos, sin = kwargs["position_embeddings"]
        seq = hidden_states.shape[0]
        q, k, v = self.qkv(hidden_states).reshape(seq, 3, self.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        if fused and kernels_can_run(q.device):
            from visionft.kernels.rope import apply_rope

            qr, kr = apply_rope(
                q.unsqueeze(0).transpose(1, 2),
                k.unsqueeze(0).transpose(1, 2),
                cos.unsqueeze(0),
                sin.unsqueeze(0),
            )
            q, k = qr.transpose(1, 2)[0], kr.transpose(1, 2)[0]
        else:
            q, k = modeling.apply_rotary_pos_emb_vision(q, k, cos, sin)
        scale = getattr(self, "scaling", q.shape[-1] ** -0.5)
        out = segments_attention(q, k, v, cu_seqlens, int(max_len), scale, causal=False)
        return self.proj(out.reshape(seq, -1))

    return forward


def install(hf: nn.Module, report: PatchReport, fused: bool = True) -> bool:
    """Installs the row attentions (vision: segments with a host bound; text: packed) on ``hf``; inert
    outside a row forward. Returns whether every attention layer was recognised."""
    ok = True
    for _, module in hf.named_modules():
        cls = type(module)
        if cls.__name__ not in VISION_ATTENTION_CLASSES:
            continue
        modeling = sys.modules.get(cls.__module__)
        if not all(hasattr(module, a) for a in ("qkv", "proj", "num_heads")) or not hasattr(
            modeling, "apply_rotary_pos_emb_vision"
        ):
            report.skipped.append(f"rows: {cls.__name__} has an unexpected layout")
            ok = False
            continue
        current = module.forward
        if getattr(getattr(current, "__func__", None), "_visionft_row_vision", False):
            continue
        forward = _make_vision_forward(current, modeling, fused)
        forward._visionft_row_vision = True  # type: ignore[attr-defined]
        report.swap(module, "forward", types.MethodType(forward, module), "row_vision_attn")
    from visionft.patching.packed_attention import installed

    if not installed(hf):
        ok = install_packed_attention(hf, report) and ok
    text = getattr(getattr(hf, "model", None), "language_model", None)
    deepstack = getattr(text, "_deepstack_process", None)
    if deepstack is not None and not getattr(
        getattr(deepstack, "__func__", deepstack), "_visionft_rows", False
    ):
        report.swap(
            text, "_deepstack_process", types.MethodType(_make_deepstack(deepstack), text), "row_deepstack"
        )
    return ok


def _make_deepstack(orig):
    def deepstack_process(self, hidden_states, visual_pos_masks, visual_embeds):
        if visual_pos_masks.dtype == torch.bool:
            return orig(hidden_states, visual_pos_masks, visual_embeds)
        # A row: ``visual_pos_masks`` holds the image tokens' positions (``T`` for padding features).
        batch, total, width = hidden_states.shape
        flat = torch.cat((hidden_states.reshape(total, width), hidden_states.new_zeros(1, width)))
        flat = flat.index_add(0, visual_pos_masks, visual_embeds.to(flat.dtype))
        return flat[:total].reshape(batch, total, width)

    deepstack_process._visionft_rows = True  # type: ignore[attr-defined]
    return deepstack_process


#: The layout class ``visionft.patching.rows.enable_rows`` builds.
FAMILY = QwenRows

__all__ = ["FAMILY", "QwenRows", "install"]
