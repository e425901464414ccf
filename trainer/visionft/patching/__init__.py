"""One place that swaps the fused kernels into a loaded model, per architecture, and takes them out.

Usage::

    from visionft.patching import apply_optimizations, revert_optimizations

    report = apply_optimizations(model)          # after loading (and after get_peft_model)
    ...train...
    revert_optimizations(model)                  # plain modules again

Which architecture gets which patch set is its family's entry in ``visionft.model.architectures``
(``patches``); a patch set is the ordered list of kinds its family takes, and each kind is written once in
``visionft.patching.kinds``. Every family has one: Qwen2-VL / Qwen2.5-VL, Qwen3-VL, Gemma 3, LLaVA 1.5 /
LLaVA-NeXT / Pixtral and Mllama. What is swapped (instance-level ``forward`` assignments, recorded for
``revert``):

- ``*RMSNorm`` modules -> ``kernels.rms_norm`` (Gemma's ``1 + w`` recognised by class name);
- ``nn.LayerNorm`` (vision towers: SigLIP, CLIP, Qwen3-VL, Mllama) -> the native kernel in the autocast
  dtype, so that no fp32 copy of its output is cast again by every linear that reads it (``layer_norm``);
- gated MLPs (``gate_proj``/``up_proj``/``down_proj`` + SiLU or tanh-GELU) -> ``kernels.glu``;
- rotary application -> ``kernels.rope`` (a module-global swap in the family's modeling module, or, for
  the LLaVA families, in their text model's);
- PEFT LoRA layers over NF4 or plain bases -> ``kernels.lora_nf4`` (no dequantized weight kept);
- ``lm_head`` + loss under training -> ``kernels.fused_linear_ce`` (no full logits);
- vision attention (Qwen2-VL/2.5-VL) -> one SDPA call over all windows instead of one per window
  (``patching.vision_attention``);
- a frozen input-embedding table -> pinned host memory (on CUDA; saves 1 GiB at a 150k vocabulary);
- text attention (Qwen2-VL/2.5-VL) -> block-diagonal causal over packed rows when the batch carries
  ``packed_cu_seqlens``, the original attention otherwise (``patching.packed_attention``).

Packed rows need that last swap for correctness, not speed: ``enable_packing(model)`` installs it on
its own when the optimizations are off or can't run (kept in a separate report, also undone by
``revert_optimizations``). A run calls it once, after loading (``visionft.job.run``);
``VisionDataCollator(..., packing=True)`` refuses a model without it.

The one switch: ``apply_optimizations(model, optimizations=False)`` leaves the model plain (a run resolves
it from ``training.optimizations`` and the environment: ``visionft.engine.options``); a keyword per kind
(``rope=False``) leaves that kind alone, and a keyword that names no kind is refused. An architecture
without a patch set (one registered without kernels), an unsupported transformers release, or a device
where Triton cannot run (CPU without ``TRITON_INTERPRET=1``) also leave it plain; each case logs one line
saying so.
"""

from __future__ import annotations

import functools
import importlib
import logging
from collections.abc import Callable

from torch import nn

from visionft.model.architectures import get_arch_spec, packing_attention_model_types
from visionft.patching import packed_attention
from visionft.patching.core import (
    PatchReport,
    kernels_can_run,
    transformers_supported,
)
from visionft.patching.kinds import apply_kinds

logger = logging.getLogger(__name__)


def patch_set(model_type: str | None) -> Callable[..., None] | None:
    """``model_type``'s patch set as one call ``(model, hf_model, report, **switches)``: the kinds that the
    module its family's entry names lists, run by ``kinds.apply_kinds``; None without a patch set."""
    spec = get_arch_spec(model_type)
    if spec is None or spec.patches is None:
        return None
    module = importlib.import_module(spec.patches)
    return functools.partial(
        apply_kinds,
        tuple(module.KINDS),
        modeling=spec.modeling[model_type],
        left_plain=getattr(module, "LEFT_PLAIN", None),
    )


_REPORT_ATTR = "_visionft_patch_report"
_PACKING_REPORT_ATTR = "_visionft_packing_report"
_ROWS_REPORT_ATTR = "_visionft_rows_report"  # visionft.patching.rows


def hf_model(model: nn.Module) -> nn.Module:
    """The Hugging Face model under a PEFT wrapper (or ``model`` itself)."""
    return _hf_model(model)


def patch_report(model: nn.Module) -> PatchReport | None:
    """What ``apply_optimizations`` did to ``model`` (HF model or PEFT wrapper); None if it never ran."""
    return getattr(_hf_model(model), _REPORT_ATTR, None)


def _hf_model(model: nn.Module) -> nn.Module:
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def apply_optimizations(model: nn.Module, optimizations: bool = True, **kinds: bool) -> PatchReport:
    """Swaps the fused kernels into ``model`` (an HF model or its PEFT wrapper); idempotent.

    Args:
        model (nn.Module): the loaded model, after ``get_peft_model`` if LoRA is used.
        optimizations (bool): the switch; False leaves the model plain. Default: True.
        **kinds (bool): turn single kinds off: ``rope``, ``rms_norm``, ``layer_norm``, ``glu``, ``lora``, ``fused_loss``,
            ``vision_attention``, ``offload_embeddings``, ``static_inputs`` (the hooks ``visionft.engine.cuda_graphs`` uses),
            ``packed_attention``.

    Returns:
        PatchReport: what was swapped and what was left plain (``report.enabled`` is False when
        nothing was).
    """
    hf = _hf_model(model)
    model_type = getattr(getattr(hf, "config", None), "model_type", type(hf).__name__)
    previous = getattr(hf, _REPORT_ATTR, None)
    if previous is not None:
        previous.revert()
    report = PatchReport(model_type=model_type)
    object.__setattr__(hf, _REPORT_ATTR, report)
    if not optimizations:
        report.requested = False
        report.skipped.append(
            "optimizations switched off (optimizations=False: training.optimizations or "
            "VISIONFT_DISABLE_KERNELS)"
        )
    elif (apply := patch_set(model_type)) is None:
        report.skipped.append(f"no patch set for model_type={model_type!r}; using the plain modules")
    else:
        supported, version = transformers_supported()
        param = next(hf.parameters(), None)
        if not supported:
            report.skipped.append(
                f"transformers {version} is outside the tested range; using the plain modules"
            )
        elif param is None or not kernels_can_run(param.device):
            where = param.device if param is not None else "no parameters"
            report.skipped.append(
                f"Triton kernels cannot run on {where} (CUDA, or CPU with TRITON_INTERPRET=1)"
            )
        else:
            apply(model, hf, report, **kinds)
    logger.info(report.summary())
    return report


def enable_packing(model: nn.Module) -> PatchReport:
    """Makes ``model``'s text attention block-diagonal for packed rows (``visionft.data.packing``); idempotent.

    ``apply_optimizations`` already does this for Qwen2-VL/2.5-VL; otherwise (optimizations off, or a
    device where they can't run) the packed attention alone is installed, in a report of its own.

    Args:
        model (nn.Module): the HF model or its PEFT wrapper.

    Returns:
        PatchReport: the report that holds the packed attention.

    Raises:
        ValueError: the architecture's family has no packed attention (``ArchSpec.packing``).
    """
    hf = _hf_model(model)
    model_type = getattr(getattr(hf, "config", None), "model_type", None)
    spec = get_arch_spec(model_type)
    if spec is None or not spec.packing:
        rows = (
            " (its family trains on fixed-shape rows: visionft.patching.rows.enable_rows)"
            if spec and spec.rows
            else ""
        )
        raise ValueError(
            f"the packed attention covers {' and '.join(packing_attention_model_types())} only, and this model "
            f"is model_type={model_type!r}{rows}"
        )
    main, own = getattr(hf, _REPORT_ATTR, None), getattr(hf, _PACKING_REPORT_ATTR, None)
    if packed_attention.installed(hf):
        holder = main if main is not None and main.counts.get("packed_attn") else own
        if holder is not None:
            return holder
    report = own or PatchReport(model_type=model_type or "")
    object.__setattr__(hf, _PACKING_REPORT_ATTR, report)
    if not packed_attention.install(hf, report):
        raise ValueError(
            "packing: the model's text attention layers are not the Qwen2-VL/2.5-VL ones this release "
            f"patches ({'; '.join(report.skipped) or 'none found'})"
        )
    logger.info("packed attention installed on %s for packed rows", model_type)
    return report


def revert_optimizations(model: nn.Module) -> bool:
    """Undoes ``apply_optimizations`` (and ``enable_packing``, ``rows.enable_rows``) on ``model``. Returns whether there was
    anything to undo."""
    hf = _hf_model(model)
    had = False
    for attr in (_ROWS_REPORT_ATTR, _REPORT_ATTR, _PACKING_REPORT_ATTR):  # newest swaps first
        report = getattr(hf, attr, None)
        if report is None:
            continue
        had = had or report.enabled
        report.revert()
        object.__delattr__(hf, attr)
    return had


__all__ = [
    "PatchReport",
    "apply_optimizations",
    "enable_packing",
    "hf_model",
    "patch_report",
    "patch_set",
    "revert_optimizations",
]
