"""Fixed-shape rows for each architecture family (see ``base`` for the contract).

``ROW_FAMILIES`` maps ``config.model_type`` to the family's class and its install function. Families
not listed train on rows of their own shapes (``visionft.data.packing``) or padded batches.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from visionft.patching.core import PatchReport
from visionft.patching.rows import gemma3, qwen2_vl
from visionft.patching.rows.base import ROW_KEY, RowFamily, RowInfo


@dataclass(frozen=True)
class RowSupport:
    """How one family builds its rows.

    Attributes:
        family (Callable[..., RowFamily]): builds the family's layout: ``(hf, pad_id, fused)``.
        install (Callable[..., bool]): installs the attentions its forward needs: ``(hf, report, fused)``.
    """

    family: Callable[..., RowFamily]
    install: Callable[..., bool]


ROW_FAMILIES: dict[str, RowSupport] = {
    "qwen2_vl": RowSupport(qwen2_vl.QwenRows, qwen2_vl.install),
    "qwen2_5_vl": RowSupport(qwen2_vl.QwenRows, qwen2_vl.install),
    "qwen3_vl": RowSupport(qwen2_vl.QwenRows, qwen2_vl.install),
    "gemma3": RowSupport(gemma3.GemmaRows, gemma3.install),
}

_REPORT_ATTR = "_visionft_rows_report"


def rows_supported(model_type: str | None) -> bool:
    """Whether ``model_type`` has fixed-shape rows."""
    return model_type in ROW_FAMILIES


def enable_rows(model: nn.Module, pad_id: int, fused: bool | None = None) -> RowFamily:
    """Installs the row attentions on ``model`` (HF model or PEFT wrapper; idempotent) and returns its
    family. Undone by ``visionft.patching.revert_optimizations``.

    Args:
        model (nn.Module): the model.
        pad_id (int): the token id that fills a row's padding.
        fused (bool | None): the row forward uses the fused kernels; None: when
            ``visionft.patching.apply_optimizations`` swapped kernels into ``model``. Default: None.

    Raises:
        ValueError: the architecture has no rows, or its layers are not the ones this release knows.
    """
    from visionft.patching import hf_model, patch_report

    hf = hf_model(model)
    if fused is None:
        main = patch_report(model)
        fused = bool(main is not None and main.enabled)
    model_type = getattr(getattr(hf, "config", None), "model_type", None)
    support = ROW_FAMILIES.get(model_type or "")
    if support is None:
        raise ValueError(
            f"fixed-shape rows are built for {', '.join(sorted(ROW_FAMILIES))}; this model is "
            f"model_type={model_type!r}"
        )
    report = getattr(hf, _REPORT_ATTR, None)
    if report is None:
        report = PatchReport(model_type=model_type or "")
        object.__setattr__(hf, _REPORT_ATTR, report)
    if not support.install(hf, report, fused):
        raise ValueError(f"rows: {model_type} layers are not the ones this release patches: {report.skipped}")
    return support.family(hf, pad_id, fused)


def revert_rows(model: nn.Module) -> bool:
    """Takes the row attentions out again; returns whether there were any."""
    from visionft.patching import hf_model

    hf = hf_model(model)
    report = getattr(hf, _REPORT_ATTR, None)
    if report is None:
        return False
    report.revert()
    object.__delattr__(hf, _REPORT_ATTR)
    return True


__all__ = ["ROW_FAMILIES", "ROW_KEY", "RowInfo", "RowSupport", "enable_rows", "revert_rows", "rows_supported"]
