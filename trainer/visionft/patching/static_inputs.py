"""Qwen2-VL / Qwen2.5-VL forward inputs with every data-dependent value computed ahead of the forward.

Why: a CUDA graph records kernels, not Python. Anything in the forward that reads a GPU value on the
host (``.tolist()``, ``.item()``, boolean indexing, an f-string of a tensor) or copies from pageable
host memory cannot be captured, and each such read also stalls the host in an eager step. In these
models (transformers 5.17–5.23) that is:

1. the 3-D M-RoPE positions (``compute_3d_position_ids`` → ``get_rope_index``: Python loops over ids);
2. the vision tower's rotary positions, ``cu_seqlens`` and (2.5) window index, built from ``grid_thw``
   with ``.tolist()`` and host tensors;
3. ``get_image_features``' per-image split (``image_grid_thw.prod(-1).tolist()``);
4. ``get_placeholder_mask``'s count check, whose message formats a CUDA tensor, and the backward of
   the ``masked_scatter`` that places the image features (``masked_select`` must count the mask);
5. the causal mask's "is anything padded" test (``attention_mask.all()``);
6. the host-memory embedding lookup of ``patching.modules.offload_input_embeddings``.

``prepare(hf_model, batch)`` computes 1–6 once per batch, outside any graph, with the model's own
code (``compute_3d_position_ids``, the input embedding, and transformers' ``vision_utils`` helpers,
which the vision forwards accept precomputed through their kwargs). ``active(plan)`` then makes
the forward use them: the vision forward receives the precomputed tensors,
``get_placeholder_mask`` builds the masks on the device without the host-side check (``prepare``
already checked the counts on the host), and the ``masked_scatter`` that consumes that mask becomes
an ``index_copy`` at the image tokens' precomputed positions (same values; its backward is a
gather). The numbers are those of the plain forward.

Only what a graph must never see varies between batches of one signature (the ids, embeddings,
positions, pixels and labels: copied into static buffers by ``visionft.engine.cuda_graphs``). Everything keyed
by the signature (``grid_thw`` and the vision tensors derived from it) is cached per signature, so
a captured graph keeps reading valid tensors. A packed row (``visionft.data.packing``) adds its
segment starts to what varies and its sample count and longest sample to the signature.
"""

from __future__ import annotations

import contextlib
import threading
import types
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from visionft.data.packing import PACKED_CU_SEQLENS, PACKED_MAX_SEQLEN
from visionft.patching.core import PatchReport

#: Batch keys this preparation understands; anything else (videos, 4-row packed position ids) is not covered.
_KNOWN_KEYS = {
    "input_ids",
    "attention_mask",
    "pixel_values",
    "image_grid_thw",
    "labels",
    "mm_token_type_ids",
    PACKED_CU_SEQLENS,
    PACKED_MAX_SEQLEN,
}

#: Plan tensors that are not model inputs (read by the hooks of ``install``).
_AUXILIARY = {"image_positions"}

_ACTIVE = threading.local()


@dataclass
class StaticPlan:
    """One batch made sync-free.

    Attributes:
        signature (tuple): what must be equal for two batches to share a captured graph (shapes,
            dtypes, the host ``grid_thw`` values).
        dynamic (dict[str, torch.Tensor]): device tensors that differ between batches of one
            signature; a graph copies them into its static buffers. All are model keyword arguments
            except ``image_positions`` (the flat indices of the image tokens).
        fixed (dict[str, Any]): keyword arguments identical for every batch of the signature (host
            ``image_grid_thw``, ``attention_mask=None``).
        vision (dict[str, Any]): the precomputed vision-tower inputs, cached per signature.
    """

    signature: tuple
    dynamic: dict[str, torch.Tensor]
    fixed: dict[str, Any]
    vision: dict[str, Any] = field(default_factory=dict)

    def model_kwargs(self, dynamic: dict[str, torch.Tensor] | None = None) -> dict[str, Any]:
        """The forward's keyword arguments, with ``dynamic`` (static buffers) in place of this batch's."""
        tensors = dynamic if dynamic is not None else self.dynamic
        return {**self.fixed, **{k: v for k, v in tensors.items() if k not in _AUXILIARY}}


def _inner(hf_model: nn.Module) -> nn.Module | None:
    inner = getattr(hf_model, "model", None)
    if inner is None or not hasattr(inner, "visual") or not hasattr(inner, "compute_3d_position_ids"):
        return None
    return inner


def unsupported_reason(hf_model: nn.Module, batch: dict[str, Any]) -> str | None:
    """Why ``batch`` can't be made sync-free for ``hf_model`` (None when it can)."""
    if _inner(hf_model) is None:
        return "the model has no Qwen2-VL-style inner model (visual + compute_3d_position_ids)"
    extra = sorted(set(batch) - _KNOWN_KEYS)
    if extra:
        return f"batch has inputs this path does not cover: {', '.join(extra)}"
    if "input_ids" not in batch or "pixel_values" not in batch or "image_grid_thw" not in batch:
        return "batch has no image (input_ids, pixel_values and image_grid_thw are all needed)"
    mask = batch.get("attention_mask")
    if mask is not None and not bool(mask.all()):
        return "some rows are padded (a padded batch needs the data-dependent causal mask)"
    if PACKED_CU_SEQLENS in batch and not isinstance(batch.get(PACKED_MAX_SEQLEN), int):
        return f"a packed batch needs {PACKED_MAX_SEQLEN} as a host int"
    return None


def _vision_inputs(visual: nn.Module, grid: torch.Tensor, device: torch.device) -> dict[str, Any]:
    from transformers import vision_utils

    out: dict[str, Any] = {
        "position_ids": vision_utils.get_vision_position_ids(grid, visual.spatial_merge_size),
        "cu_seqlens": vision_utils.get_vision_cu_seqlens(grid),
    }
    if getattr(visual, "window_size", None) is not None and hasattr(visual, "fullatt_block_indexes"):
        window_index, cu_window = vision_utils.get_vision_window_index(
            grid,
            spatial_merge_size=visual.spatial_merge_size,
            window_size=visual.window_size,
            patch_size=visual.patch_size,
        )
        out["window_index"], out["cu_window_seqlens"] = window_index, cu_window
    out = {k: v.to(device) for k, v in out.items()}
    # The windowed attention of patching.vision_attention reads each cu_seqlens tensor's lengths once
    # and caches them by tensor: reading them here keeps that read out of the graph.
    from visionft.patching.vision_attention import _layout

    for key in ("cu_seqlens", "cu_window_seqlens"):
        if key in out:
            _layout(out[key])
    return out


def prepare(hf_model: nn.Module, batch: dict[str, Any], cache: dict[tuple, dict] | None = None) -> StaticPlan:
    """Computes the data-dependent inputs of ``batch`` ahead of the forward (see the module docstring).

    Args:
        hf_model (nn.Module): the Qwen2-VL / Qwen2.5-VL ``ForConditionalGeneration`` (not the PEFT wrapper).
        batch (dict): the collator's batch, on the model's device.
        cache (dict | None): per-signature vision inputs, reused across calls. Default: None.

    Raises:
        ValueError: the batch is not covered (``unsupported_reason``), or its image placeholder count
            does not match its images.
    """
    reason = unsupported_reason(hf_model, batch)
    if reason:
        raise ValueError(reason)
    inner = _inner(hf_model)
    assert inner is not None
    visual = inner.visual
    input_ids = batch["input_ids"]
    device = input_ids.device
    grid = batch["image_grid_thw"].to("cpu")
    merge = visual.spatial_merge_size
    n_features = int((grid.prod(-1) // merge**2).sum())
    n_placeholders = int((input_ids == inner.config.image_token_id).sum())
    if n_placeholders != n_features:
        raise ValueError(
            f"image tokens and image features do not match: {n_placeholders} placeholders for "
            f"{n_features} features (grid_thw {grid.tolist()})"
        )
    signature = (
        tuple(input_ids.shape),
        tuple(batch["pixel_values"].shape),
        str(batch["pixel_values"].dtype),
        tuple(map(tuple, grid.tolist())),
        "labels" in batch,
    )
    vision = cache.get(signature) if cache is not None else None
    if vision is None:
        vision = _vision_inputs(visual, grid, device)
        if cache is not None:
            cache[signature] = vision
    with torch.no_grad():
        position_ids = inner.compute_3d_position_ids(
            input_ids=input_ids,
            image_grid_thw=batch["image_grid_thw"],
            video_grid_thw=None,
            inputs_embeds=None,
            attention_mask=batch.get("attention_mask"),
            past_key_values=None,
            mm_token_type_ids=batch.get("mm_token_type_ids"),
        )
        if position_ids is None:  # what the text model does itself when it gets none
            seq = torch.arange(input_ids.shape[1], device=device)
            position_ids = seq.view(1, 1, -1).expand(3, input_ids.shape[0], -1)
        # Detached: the table is frozen, and a leaf that needs no grad is what a graph's buffer is.
        inputs_embeds = inner.get_input_embeddings()(input_ids).detach()
    dynamic = {
        "input_ids": input_ids,
        "inputs_embeds": inputs_embeds,
        "position_ids": position_ids.contiguous(),
        # The forward's first step casts the pixels to the tower's dtype; done here, the graph's input
        # buffer is half the size.
        "pixel_values": batch["pixel_values"].to(visual.dtype),
        "image_positions": (input_ids.reshape(-1) == inner.config.image_token_id).nonzero().reshape(-1),
    }
    if "labels" in batch:
        dynamic["labels"] = batch["labels"]
    fixed = {"image_grid_thw": grid, "attention_mask": None}
    if PACKED_CU_SEQLENS in batch:
        # A packed row (visionft.data.packing): the segment starts vary between batches of one
        # signature and are copied in like the ids; the number of segments (the tensor's shape) and
        # the longest one (a host int the varlen kernel is launched with) are part of the signature.
        cu_seqlens = batch[PACKED_CU_SEQLENS].to(device=device, dtype=torch.int32)
        dynamic[PACKED_CU_SEQLENS] = cu_seqlens
        fixed[PACKED_MAX_SEQLEN] = batch[PACKED_MAX_SEQLEN]
        signature += ("packed", int(cu_seqlens.shape[0]) - 1, batch[PACKED_MAX_SEQLEN])
    return StaticPlan(signature=signature, dynamic=dynamic, fixed=fixed, vision=vision)


class _ImageScatter(TorchFunctionMode):
    """Turns ``inputs_embeds.masked_scatter(image_mask, features)`` into an ``index_copy`` at the
    precomputed image positions, for the masks that ``get_placeholder_mask`` handed out in this
    forward. Same result; the backward gathers rows instead of counting the mask on the host."""

    def __init__(self, positions: torch.Tensor) -> None:
        super().__init__()
        self.positions = positions
        self.masks: list[torch.Tensor] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.masked_scatter and len(args) == 3 and any(args[1] is m for m in self.masks):
            embeds, _, features = args
            width = embeds.shape[-1]
            rows = features.reshape(-1, width).to(embeds.dtype)
            return embeds.reshape(-1, width).index_copy(0, self.positions, rows).view_as(embeds)
        return func(*args, **kwargs)


@contextlib.contextmanager
def active(plan: StaticPlan, tensors: dict[str, torch.Tensor] | None = None) -> Iterator[None]:
    """Within this block, the patched forwards of ``install`` use ``plan``'s precomputed inputs.

    Args:
        plan (StaticPlan): from ``prepare``.
        tensors (dict | None): stand-ins for ``plan.dynamic`` (a graph's static buffers). Default: None.
    """
    previous = (getattr(_ACTIVE, "plan", None), getattr(_ACTIVE, "scatter", None))
    scatter = _ImageScatter((tensors if tensors is not None else plan.dynamic)["image_positions"])
    _ACTIVE.plan, _ACTIVE.scatter = plan, scatter
    try:
        with scatter:
            yield
    finally:
        _ACTIVE.plan, _ACTIVE.scatter = previous


def install(hf_model: nn.Module, report: PatchReport) -> bool:
    """Adds the two instance-level hooks ``active`` needs; they do nothing while no plan is active.

    Returns whether the model has the Qwen2-VL layout they hook into.
    """
    inner = _inner(hf_model)
    if inner is None or not hasattr(inner, "get_placeholder_mask"):
        report.skipped.append("static inputs: no Qwen2-VL-style inner model (CUDA graphs unavailable)")
        return False
    visual = inner.visual
    visual_forward = visual.forward  # bound: the class forward with its decorators
    placeholder_mask = inner.get_placeholder_mask
    image_token, video_token = inner.config.image_token_id, inner.config.video_token_id

    def vision_forward(self, hidden_states, grid_thw=None, **kwargs):
        plan = getattr(_ACTIVE, "plan", None)
        if plan is not None:
            kwargs = {**plan.vision, **kwargs}
        return visual_forward(hidden_states, grid_thw=grid_thw, **kwargs)

    def get_placeholder_mask(self, input_ids, inputs_embeds, image_features=None, video_features=None):
        if getattr(_ACTIVE, "plan", None) is None or input_ids is None:
            return placeholder_mask(
                input_ids,
                inputs_embeds=inputs_embeds,
                image_features=image_features,
                video_features=video_features,
            )
        # Counts were checked on the host by ``prepare``; this is the same mask, built on the device,
        # and remembered so that the masked_scatter consuming it uses the precomputed positions.
        image = (input_ids == image_token).unsqueeze(-1)
        _ACTIVE.scatter.masks.append(image)
        return image, (input_ids == video_token).unsqueeze(-1)

    report.swap(visual, "forward", types.MethodType(vision_forward, visual), "static_inputs")
    report.swap(inner, "get_placeholder_mask", types.MethodType(get_placeholder_mask, inner), "static_mask")
    report.counts.pop("static_mask", None)  # one hook set, counted once
    return True


__all__ = ["StaticPlan", "active", "install", "prepare", "unsupported_reason"]
