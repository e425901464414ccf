"""The kinds of swap that patch sets are made of: one entry per kind, and ``apply_kinds``, which runs a
family's kinds under the switches of ``visionft.patching.apply_optimizations``.

A family's patch set (``visionft.patching.qwen2_vl``, ``qwen3_vl``, ``gemma3``, ``llava``, ``mllama``) is a
module whose docstring says what it covers and why, with ``KINDS``, the ordered kinds it takes, and
optionally ``LEFT_PLAIN``, what it leaves alone (reported); what each kind does is written once, here.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from visionft.patching.core import PatchReport
from visionft.patching.modules import (
    offload_input_embeddings,
    patch_gated_mlps,
    patch_layer_norms,
    patch_lm_loss,
    patch_lora_layers,
    patch_rms_norms,
)
from visionft.patching.packed_attention import install as install_packed_attention
from visionft.patching.rope import patch_rope
from visionft.patching.static_inputs import install as install_static_inputs
from visionft.patching.vision_attention import patch_vision_attention


@dataclass(frozen=True)
class Target:
    """What one ``apply_optimizations`` call patches.

    Attributes:
        model (nn.Module): the PEFT wrapper, or ``hf_model`` itself (LoRA layers live under it).
        hf_model (nn.Module): the Hugging Face model.
        report (PatchReport): records every swap.
        modeling (str): the model type's transformers modeling module (its rotary function is swapped).
        device (torch.device): where the parameters are.
        dtype (torch.dtype): the model's dtype.
    """

    model: nn.Module
    hf_model: nn.Module
    report: PatchReport
    modeling: str
    device: torch.device
    dtype: torch.dtype


def _fused_loss(t: Target) -> None:
    config = t.hf_model.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if getattr(text, "final_logit_softcapping", None) is not None:
        # The fused loss takes the plain logits of lm_head; soft-capped ones would be trained wrong.
        t.report.skipped.append(
            f"{t.report.model_type}: final_logit_softcapping is set; the loss stays plain"
        )
        return
    patch_lm_loss(t.hf_model, t.report)


def _rope(t: Target) -> None:
    # LLaVA-style families take their text model from the checkpoint (Llama, Mistral, ...): when the
    # family's modeling module has no rotary function, the text model's own module holds the one its
    # attention calls.
    modeling = t.modeling
    if not _has_rotary(modeling):
        kind = str(getattr(t.hf_model.config.get_text_config(), "model_type", ""))
        modeling = f"transformers.models.{kind}.modeling_{kind}"
        if not kind or importlib.util.find_spec(f"transformers.models.{kind}") is None:
            t.report.skipped.append(f"rope: no rotary function in {t.modeling} or a text model {kind!r}")
            return
    patch_rope(modeling, t.device, t.dtype, t.report)


def _has_rotary(modeling: str) -> bool:
    module = importlib.import_module(modeling)
    return any(hasattr(module, f) for f in ("apply_rotary_pos_emb", "apply_multimodal_rotary_pos_emb"))


def _offload_embeddings(t: Target) -> None:
    if t.device.type == "cuda":  # on the CPU the table is in host memory already
        offload_input_embeddings(t.hf_model, t.report)


#: Every kind of swap, by the name ``apply_optimizations`` switches it with.
KINDS: dict[str, Callable[[Target], None]] = {
    "rope": _rope,
    "vision_attention": lambda t: patch_vision_attention(t.hf_model, t.report),
    "rms_norm": lambda t: patch_rms_norms(t.hf_model, t.report),
    "layer_norm": lambda t: patch_layer_norms(t.hf_model, t.report),
    "glu": lambda t: patch_gated_mlps(t.hf_model, t.report),
    "lora": lambda t: patch_lora_layers(t.model, t.report),
    "fused_loss": _fused_loss,
    "offload_embeddings": _offload_embeddings,
    # Inert until visionft.engine.cuda_graphs activates a plan.
    "static_inputs": lambda t: install_static_inputs(t.hf_model, t.report),
    # Inert until a batch carries packed_cu_seqlens (visionft.data.packing).
    "packed_attention": lambda t: install_packed_attention(t.hf_model, t.report),
}


def apply_kinds(
    kinds: Sequence[str],
    model: nn.Module,
    hf_model: nn.Module,
    report: PatchReport,
    *,
    modeling: str,
    left_plain: str | None = None,
    **switches: bool,
) -> None:
    """Runs ``kinds`` in order on the model, each unless its switch is False.

    Args:
        kinds (Sequence[str]): the family's kinds (names of ``KINDS``).
        model, hf_model, report, modeling: as in ``Target``.
        left_plain (str | None): what the family's set does not cover, for the report. Default: None.
        **switches (bool): ``apply_optimizations``' keyword switches; a kind the family does not take is
            ignored, a name that is no kind is refused.

    Raises:
        ValueError: a switch names no kind.
    """
    unknown = sorted(set(switches) - set(KINDS))
    if unknown:
        raise ValueError(f"no kind of swap is called {', '.join(unknown)}; the kinds are {', '.join(KINDS)}")
    target = Target(
        model=model,
        hf_model=hf_model,
        report=report,
        modeling=modeling,
        device=next(hf_model.parameters()).device,
        dtype=getattr(hf_model, "dtype", torch.float32),
    )
    for kind in kinds:
        if switches.get(kind, True):
            KINDS[kind](target)
    if left_plain:
        report.skipped.append(f"{report.model_type}: {left_plain}")


__all__ = ["KINDS", "Target", "apply_kinds"]
