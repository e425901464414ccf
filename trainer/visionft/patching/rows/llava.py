"""LLaVA 1.5 and Pixtral rows of fixed shape, and their sync-free forward.

Both are ``LlavaForConditionalGeneration`` (model_type ``llava``); the vision tower decides the layout
(``LlavaFamily`` builds the layout of ``vision_config.model_type``):

- LLaVA 1.5 (CLIP tower): every image is resized to the tower's one resolution, so a row's vision budget
  is a whole number of images (as Gemma 3's): the samples' images, then zero images up to the budget,
  whose features go to a trash row. The tower runs as the model's own ``get_image_features`` on the
  ``(images, 3, S, S)`` batch; images never attend to each other there.
- Pixtral (Pixtral tower): images keep their own sizes, so a row's vision budget is a number of patches
  (as Qwen2-VL's): each image cut into its patches on the host (row-major, the order the tower flattens
  them in), then zero patches up to the budget; per patch its (row, column) for the 2D rotary
  embedding; the images as segments of the tower's block-diagonal attention (``vision_cu_seqlens``),
  padding patches in chunks of their own. The row forward runs the tower's own modules (the patch
  convolution on each patch, ``ln_pre``, the rotary table, the transformer) with the attention swapped
  for one that attends within the segments (``install``; inert without the row's keyword arguments).

Text, for both: the samples one after another, then padding (``base.text_row``); each sample's positions
count from 0 as they would alone; the text attention (Llama / Mistral) is block-diagonal causal over the
samples and padding chunks (``patching.packed_attention``, installed by ``install``). The text model gets
an empty 4D mask, which its mask builder passes through as given (it would otherwise look for packed
samples in the positions, a host-device sync); the packed attention never reads it, and the original
attention would fail on it rather than attend across samples.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from visionft.data.packing import PACKED_CU_SEQLENS, PACKED_MAX_SEQLEN
from visionft.data.rows import RowBudget, SampleSize
from visionft.patching.core import PatchReport, kernels_can_run
from visionft.patching.packed_attention import install as install_packed_attention
from visionft.patching.packed_attention import installed as packed_attention_installed
from visionft.patching.rows.base import (
    RowInfo,
    TextRow,
    embed_on_host,
    image_positions,
    install_once,
    padded_cu_seqlens,
    row_batch,
    row_loss,
    scatter_features,
    segment_positions,
    text_row,
)

#: Keyword arguments that carry the vision segments of a row forward down to Pixtral's attention. They
#: travel with the transformer's other keyword arguments to every layer, so that a checkpointed layer's
#: recomputation (which replays the call with the same arguments) sees them too.
ROW_VISION_CU_SEQLENS = "visionft_row_vision_cu_seqlens"
ROW_VISION_MAX_SEQLEN = "visionft_row_vision_max_seqlen"

PIXTRAL_ATTENTION_CLASSES = ("PixtralAttention",)


def _inner(hf: nn.Module) -> nn.Module:
    inner = getattr(hf, "model", None)
    if inner is None or not all(
        hasattr(inner, a) for a in ("vision_tower", "multi_modal_projector", "language_model")
    ):
        raise ValueError("rows: the model has no LLaVA inner model (vision_tower, projector, language_model)")
    return inner


def _vision_type(hf: nn.Module) -> str:
    return str(getattr(hf.config.vision_config, "model_type", ""))


class LlavaFamily:
    """The LLaVA row family of one model: built as ``LlavaFamily(hf, pad_id, fused)``, it is the layout of
    ``hf``'s vision tower, ``PixtralRows`` for a Pixtral tower and ``LlavaRows`` for CLIP. Holds what both
    share: the text row with each sample's own positions, the text forward and the loss.

    Raises:
        ValueError: another tower (LLaVA with a SigLIP or other tower is not covered).
    """

    name = "llava"

    def __new__(cls, hf: nn.Module, pad_id: int, fused: bool = True) -> LlavaFamily:
        if cls is LlavaFamily:
            kind = _vision_type(hf)
            layouts: dict[str, type[LlavaFamily]] = {"pixtral": PixtralRows, "clip_vision_model": LlavaRows}
            if kind not in layouts:
                raise ValueError(
                    f"rows: LLaVA with a {kind!r} vision tower is not covered (CLIP and Pixtral are)"
                )
            cls = layouts[kind]
        return super().__new__(cls)

    def __init__(self, hf: nn.Module, pad_id: int, fused: bool = True) -> None:
        config = hf.config
        text = config.get_text_config()
        self.pad_id = int(pad_id)
        self.fused = fused
        self.image_token_id = int(config.image_token_id)
        self.sliding_window = getattr(text, "sliding_window", None)

    def _text(
        self, samples: Sequence[dict[str, torch.Tensor]], budget: RowBudget
    ) -> tuple[TextRow, torch.Tensor]:
        if self.sliding_window is not None and budget.max_sample_tokens > int(self.sliding_window):
            raise ValueError(
                f"rows: samples of up to {budget.max_sample_tokens} tokens exceed the text model's sliding "
                f"window of {self.sliding_window}, which the packed attention does not apply; lower "
                "model.maxSeqLength to the window or set training.packing to false"
            )
        text = text_row(samples, budget, self.pad_id)
        return text, segment_positions(text.cu_seqlens, budget.tokens)

    def _row_batch(
        self, text: TextRow, positions: torch.Tensor, vision: dict[str, torch.Tensor], **info: Any
    ) -> dict[str, Any]:
        """The row batch: the text (positions and segments), the family's ``vision`` tensors, the
        ``RowInfo`` of ``info`` (``base.row_batch``)."""
        tensors = {"position_ids": positions, "text_cu_seqlens": text.cu_seqlens, **vision}
        return row_batch(self.name, text, tensors, **info)

    def _image_positions(self, text: TextRow, units: int, real: int) -> torch.Tensor:
        return image_positions(text, self.image_token_id, units, real)

    def host_inputs(self, model: nn.Module, batch: dict[str, Any]) -> dict[str, Any]:
        return embed_on_host(model, batch)

    def _text_loss(
        self,
        hf: nn.Module,
        inner: nn.Module,
        features: torch.Tensor | None,
        tensors: dict[str, torch.Tensor],
        info: RowInfo,
        num_items: Any,
    ) -> torch.Tensor:
        embeds = tensors.get("inputs_embeds")
        if embeds is None:
            embeds = inner.get_input_embeddings()(tensors["input_ids"])
        if features is not None:
            embeds = scatter_features(
                embeds, features.reshape(-1, features.shape[-1]), tensors["image_positions"]
            )
        passthrough = torch.ones((1, 1, 0, 0), dtype=torch.bool, device=embeds.device)
        out = inner.language_model(
            inputs_embeds=embeds,
            attention_mask=passthrough,
            position_ids=tensors["position_ids"],
            use_cache=False,
            **{
                PACKED_CU_SEQLENS: tensors["text_cu_seqlens"],
                PACKED_MAX_SEQLEN: info.int("max_sample_tokens"),
            },
        )
        return row_loss(out.last_hidden_state, hf.lm_head, tensors["shift_labels"], num_items, self.fused)


class LlavaRows(LlavaFamily):
    """LLaVA 1.5 rows (CLIP tower, one image size; module docstring).

    Args:
        hf (nn.Module): ``LlavaForConditionalGeneration`` (not the PEFT wrapper).
        pad_id (int): the token id that fills padding.
        fused (bool): the fused loss where the kernels run (the optimizations' switch). Default: True.
    """

    def __init__(self, hf: nn.Module, pad_id: int, fused: bool = True) -> None:
        super().__init__(hf, pad_id, fused)
        inner = _inner(hf)
        config = hf.config
        vision = config.vision_config
        self.image_size = int(vision.image_size)
        patches = (int(vision.image_size) // int(vision.patch_size)) ** 2
        strategy = config.vision_feature_select_strategy
        if strategy not in ("default", "full"):
            raise ValueError(f"rows: vision_feature_select_strategy={strategy!r} is not covered")
        # "default" drops the CLS token of each image; "full" keeps it.
        self.tokens_per_image = patches + (1 if strategy == "full" else 0)
        self.feature_layer = config.vision_feature_layer
        self.strategy = strategy
        self._inner = inner

    def plan_kwargs(self, max_sample_tokens: int) -> dict[str, int]:
        """Bounds for ``plan_tiers``: the vision budget counts whole images."""
        return {"patches_per_image": self.tokens_per_image}

    def sample_size(self, sample: dict[str, torch.Tensor]) -> SampleSize:
        pixels = sample.get("pixel_values")
        images = int(pixels.shape[0]) if pixels is not None else 0
        return SampleSize(int(sample["input_ids"].shape[1]), images * self.tokens_per_image, images)

    def assemble(
        self, samples: Sequence[dict[str, torch.Tensor]], budget: RowBudget, tier: int
    ) -> dict[str, Any]:
        """The row batch of ``samples`` (host tensors of the budget's shapes; module docstring).

        Raises:
            ValueError: the samples do not fit ``budget``, or a sample's image tokens do not match its images.
        """
        text, positions = self._text(samples, budget)
        n_images = budget.images
        pixel_list = [s["pixel_values"] for s in samples if s.get("pixel_values") is not None]
        real = sum(int(p.shape[0]) for p in pixel_list)
        if real > n_images:
            raise ValueError(f"rows: {real} images do not fit the row's {n_images}")
        pixels = torch.zeros(
            (n_images, 3, self.image_size, self.image_size),
            dtype=pixel_list[0].dtype if pixel_list else torch.float32,
        )
        if pixel_list:
            pixels[:real] = torch.cat(pixel_list)
        image_positions = self._image_positions(
            text, n_images * self.tokens_per_image, real * self.tokens_per_image
        )
        return self._row_batch(
            text,
            positions,
            {"pixel_values": pixels, "image_positions": image_positions},
            budget=budget,
            tier=tier,
            ints={"max_sample_tokens": budget.max_sample_tokens, "images": n_images},
            samples=len(samples),
            real_patches=real * self.tokens_per_image,
        )

    def forward(
        self, model: nn.Module, tensors: dict[str, torch.Tensor], info: RowInfo, num_items: Any = None
    ) -> torch.Tensor:
        """Forward + loss of one row batch on the device (module docstring); sync-free."""
        from visionft.patching import hf_model

        hf = hf_model(model)
        inner = _inner(hf)
        features = self.tile_features(inner, tensors["pixel_values"]) if info.int("images") else None
        return self._text_loss(hf, inner, features, tensors, info, num_items)

    def tile_features(self, inner: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
        """The projected features ``(N, tokens_per_image, D)`` of ``(N, 3, S, S)`` images (or tiles): the
        tower's hidden states of ``vision_feature_layer`` (several concatenated), the CLS token dropped
        under ``"default"``, then the projector, as the model's ``get_image_features`` computes them."""
        tower = inner.vision_tower
        out = tower(pixels.to(tower.dtype), output_hidden_states=True, return_dict=True)
        layers = [self.feature_layer] if isinstance(self.feature_layer, int) else list(self.feature_layer)
        hidden = torch.cat([out.hidden_states[i] for i in layers], dim=-1)
        if self.strategy == "default":
            hidden = hidden[:, 1:]
        return inner.multi_modal_projector(hidden)


class PixtralRows(LlavaFamily):
    """Pixtral rows (Pixtral tower, images of their own sizes; module docstring).

    Args:
        hf (nn.Module): ``LlavaForConditionalGeneration`` with a Pixtral vision tower.
        pad_id (int): the token id that fills padding.
        fused (bool): the fused rope and loss where the kernels run (the optimizations' switch).
            Default: True.

    Raises:
        ValueError: the model reads other tower layers than the last, or drops a feature
            (``vision_feature_select_strategy`` other than ``"full"``), which this layout does not build.
    """

    name = "pixtral"

    def __init__(self, hf: nn.Module, pad_id: int, fused: bool = True) -> None:
        super().__init__(hf, pad_id, fused)
        inner = _inner(hf)
        config = hf.config
        layers = int(config.vision_config.num_hidden_layers)
        if config.vision_feature_layer not in (-1, layers):
            raise ValueError(
                f"rows: Pixtral with vision_feature_layer={config.vision_feature_layer!r} is not covered "
                "(the last layer only)"
            )
        if config.vision_feature_select_strategy != "full":
            raise ValueError(
                f"rows: Pixtral with vision_feature_select_strategy={config.vision_feature_select_strategy!r} "
                'is not covered ("full" only)'
            )
        tower = inner.vision_tower
        self.patch_size = int(tower.patch_size)
        self.channels = int(config.vision_config.num_channels)
        side = int(config.vision_config.image_size) // self.patch_size
        self.max_image_patches = side * side

    def plan_kwargs(self, max_sample_tokens: int) -> dict[str, int]:
        """Bounds for ``plan_tiers``: every patch is one image token, and a sample has at most
        ``max_sample_tokens`` tokens."""
        return {"max_sample_patches": max_sample_tokens, "patch_multiple": 64}

    def _grid(self, sample: dict[str, torch.Tensor]) -> list[tuple[int, int]]:
        sizes = sample.get("image_sizes")
        if sample.get("pixel_values") is None or sizes is None:
            return []
        return [(int(h) // self.patch_size, int(w) // self.patch_size) for h, w in sizes.tolist()]

    def sample_size(self, sample: dict[str, torch.Tensor]) -> SampleSize:
        grid = self._grid(sample)
        return SampleSize(int(sample["input_ids"].shape[1]), sum(h * w for h, w in grid), len(grid))

    def segment_bounds(self, budget: RowBudget) -> dict[str, int]:
        """The host ints of every row of ``budget``: the longest sample, and the vision segments' bound
        (an image, or a padding chunk) and count."""
        return {
            "max_sample_tokens": budget.max_sample_tokens,
            "image_max": min(budget.patches, self.max_image_patches),
            "image_segments": budget.images + -(-budget.patches // self.max_image_patches) + 1,
        }

    def assemble(
        self, samples: Sequence[dict[str, torch.Tensor]], budget: RowBudget, tier: int
    ) -> dict[str, Any]:
        """The row batch of ``samples`` (host tensors of the budget's shapes; module docstring).

        Raises:
            ValueError: the samples do not fit ``budget``, or a sample's image tokens do not match its patches.
        """
        text, positions = self._text(samples, budget)
        bounds = self.segment_bounds(budget)
        p, total = self.patch_size, budget.patches
        pieces, grid_pos, lengths = [], [], []
        for sample in samples:
            pixels = sample.get("pixel_values")
            for i, (h, w) in enumerate(self._grid(sample)):
                image = pixels[i, :, : h * p, : w * p]
                pieces.append(
                    image.reshape(self.channels, h, p, w, p).permute(1, 3, 0, 2, 4).reshape(h * w, -1)
                )
                rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
                grid_pos.append(torch.stack((rows.reshape(-1), cols.reshape(-1)), dim=-1))
                lengths.append(h * w)
        real = sum(lengths)
        if real > total:
            raise ValueError(f"rows: {real} patches do not fit the row's {total}")
        if len(lengths) > budget.images:
            raise ValueError(f"rows: {len(lengths)} images do not fit the row's {budget.images}")
        dtype = pieces[0].dtype if pieces else torch.float32
        patches = torch.zeros((total, self.channels * p * p), dtype=dtype)
        vision_pos = torch.zeros((total, 2), dtype=torch.long)
        if pieces:
            patches[:real] = torch.cat(pieces)
            vision_pos[:real] = torch.cat(grid_pos)
        vision = {
            "pixel_values": patches,
            "vision_position_ids": vision_pos,
            "vision_cu_seqlens": padded_cu_seqlens(
                lengths, total, bounds["image_max"], bounds["image_segments"]
            ),
            "image_positions": self._image_positions(text, total, real),
        }
        return self._row_batch(
            text,
            positions,
            vision,
            budget=budget,
            tier=tier,
            ints=bounds,
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
        tower = inner.vision_tower
        conv = tower.patch_conv
        p = self.patch_size
        pixels = tensors["pixel_values"]
        n = pixels.shape[0]
        # The convolution on each patch alone: what the tower's one convolution over the image computes.
        embeds = conv(pixels.reshape(n, self.channels, p, p).to(conv.weight.dtype)).reshape(1, n, -1)
        embeds = tower.ln_pre(embeds)
        rotary = tower.patch_positional_embedding(embeds, tensors["vision_position_ids"])
        hidden = tower.transformer(
            embeds,
            attention_mask=None,
            position_embeddings=rotary,
            **{
                ROW_VISION_CU_SEQLENS: tensors["vision_cu_seqlens"],
                ROW_VISION_MAX_SEQLEN: info.int("image_max"),
            },
        ).last_hidden_state
        features = inner.multi_modal_projector(hidden)
        return self._text_loss(hf, inner, features, tensors, info, num_items)


def _make_pixtral_attention(orig, modeling, fused: bool):
    from visionft.patching.rows.base import segments_attention

    def forward(self, *args, **kwargs):
        cu_seqlens = kwargs.pop(ROW_VISION_CU_SEQLENS, None)
        if cu_seqlens is None:
            return orig(*args, **kwargs)
        max_len = kwargs.pop(ROW_VISION_MAX_SEQLEN)
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        _, n, _ = hidden.shape
        q = self.q_proj(hidden).view(1, n, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(hidden).view(1, n, self.num_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(hidden).view(1, n, self.num_heads, self.head_dim)[0]
        cos, sin = kwargs["position_embeddings"]
        if fused and kernels_can_run(q.device):
            from visionft.kernels.rope import apply_rope

            q, k = apply_rope(q, k, cos.unsqueeze(0), sin.unsqueeze(0))
        else:
            q, k = modeling.apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=0)
        out = segments_attention(
            q[0].transpose(0, 1),
            k[0].transpose(0, 1),
            v,
            cu_seqlens,
            int(max_len),
            self.scaling,
            causal=False,
        )
        return self.o_proj(out.reshape(1, n, -1)), None

    return forward


def install(hf: nn.Module, report: PatchReport, fused: bool = True) -> bool:
    """Installs the row attentions on ``hf`` (text: packed; Pixtral's vision: segments with a host bound);
    inert outside a row forward. Returns whether every attention layer was recognised."""
    _inner(hf)
    ok = True
    if _vision_type(hf) == "pixtral":
        for _, module in hf.named_modules():
            cls = type(module)
            if cls.__name__ not in PIXTRAL_ATTENTION_CLASSES:
                continue
            modeling = sys.modules.get(cls.__module__)
            attrs = ("q_proj", "k_proj", "v_proj", "o_proj", "num_heads", "head_dim", "scaling")
            if not all(hasattr(module, a) for a in attrs) or not hasattr(modeling, "apply_rotary_pos_emb"):
                report.skipped.append(f"rows: {cls.__name__} has an unexpected layout")
                ok = False
                continue
            install_once(
                report,
                module,
                functools.partial(_make_pixtral_attention, modeling=modeling, fused=fused),
                "row_vision_attn",
            )
    if not packed_attention_installed(hf):
        ok = install_packed_attention(hf, report) and ok
    return ok


#: The layout class ``visionft.patching.rows.enable_rows`` builds.
FAMILY = LlavaFamily

__all__ = ["FAMILY", "LlavaFamily", "LlavaRows", "PixtralRows", "install"]
