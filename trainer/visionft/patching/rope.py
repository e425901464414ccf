"""The rotary-embedding patch shared by the patch sets: a module-level function of a modeling module,
called by its text attention's forward, swapped for ``kernels.rope``.

- transformers 5.17 and earlier (Qwen2-VL / 2.5-VL): ``apply_multimodal_rotary_pos_emb(q, k, cos, sin,
  mrope_section)`` with ``cos``/``sin`` of shape ``(3, B, S, D)``; replaced by ``kernels.rope.apply_mrope``,
  which does the per-section stream selection inside the kernel.
- later 5.x releases, and every architecture without M-RoPE (Gemma 3): the rotary module recomposes the
  sections and attention calls ``apply_rotary_pos_emb(q, k, cos, sin)`` with ``(B, S, D)``; replaced by
  ``kernels.rope.apply_rope``.

Either way the replacement is checked against the original on a small random input first, and falls
back to the original for inputs it does not cover (``unsqueeze_dim != 1``, CPU without the interpreter).
The swap is of a module global, so it holds for every model of that modeling module in the process
until ``revert``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

import torch

from visionft.kernels.rope import apply_mrope, apply_rope
from visionft.patching.core import PatchReport, kernels_can_run, self_check


def _rope_inputs(device, dtype, mrope: bool):
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, 5, 16, generator=gen).to(device, dtype)
    k = torch.randn(1, 2, 5, 16, generator=gen).to(device, dtype)
    pos = torch.randint(0, 30, (3, 1, 5) if mrope else (1, 5), generator=gen).float()
    inv = 1.0 / (10000 ** (torch.arange(0, 16, 2).float() / 16))
    emb = torch.cat([pos[..., None] * inv] * 2, dim=-1)
    return q, k, emb.cos().to(device, dtype), emb.sin().to(device, dtype)


def patch_rope(modeling: str, device: torch.device, dtype: torch.dtype, report: PatchReport) -> None:
    """Swaps the rotary function of the modeling module ``modeling`` (see the module docstring).

    Args:
        modeling (str): the modeling module, e.g. ``"transformers.models.gemma3.modeling_gemma3"``.
        device (torch.device): where the self-check runs (the model's device).
        dtype (torch.dtype): the self-check's dtype; a non-float dtype (a 4-bit model's) checks in fp32.
        report (PatchReport): records the swap, or why it was left plain.
    """
    dtype = dtype if dtype.is_floating_point else torch.float32
    mod = importlib.import_module(modeling)
    if hasattr(mod, "apply_multimodal_rotary_pos_emb"):
        orig = mod.apply_multimodal_rotary_pos_emb
        q, k, c, s = _rope_inputs(device, dtype, mrope=True)
        ok = self_check(lambda: apply_mrope(q, k, c, s, [2, 3, 3]), lambda: orig(q, k, c, s, [2, 3, 3]), 2e-2)

        def fused_mrope(q, k, cos, sin, mrope_section, unsqueeze_dim=1):
            if unsqueeze_dim != 1 or cos.dim() != 4 or not kernels_can_run(q.device):
                return orig(q, k, cos, sin, mrope_section, unsqueeze_dim)
            return apply_mrope(q, k, cos, sin, mrope_section)

        fused: Callable = fused_mrope
        name = "apply_multimodal_rotary_pos_emb"
    elif hasattr(mod, "apply_rotary_pos_emb"):
        orig = mod.apply_rotary_pos_emb
        q, k, c, s = _rope_inputs(device, dtype, mrope=False)
        ok = self_check(lambda: apply_rope(q, k, c, s), lambda: orig(q, k, c, s), 2e-2)

        def fused_rope(q, k, cos, sin, unsqueeze_dim=1, **kwargs):
            if unsqueeze_dim != 1 or kwargs or cos.dim() != 3 or not kernels_can_run(q.device):
                return orig(q, k, cos, sin, unsqueeze_dim=unsqueeze_dim, **kwargs)
            return apply_rope(q, k, cos, sin)

        fused = fused_rope
        name = "apply_rotary_pos_emb"
    else:
        report.skipped.append(f"rope: {modeling} has no known rotary function")
        return
    if not ok:
        report.skipped.append(f"rope: {name} differs from the kernel on a test input (left plain)")
        return
    fused.__wrapped__ = orig  # type: ignore[attr-defined]
    report.swap(mod, name, fused, "rope")
