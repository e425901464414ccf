"""Fixed-shape rows for each architecture family (see ``base`` for the contract).

Which family has rows, and in which module, is its entry in ``visionft.model.architectures`` (``rows``).
Each such module defines ``FAMILY`` (the layout class, built as ``FAMILY(hf, pad_id, fused)``) and
``install(hf, report, fused)`` (the attentions its forward needs). Families without rows train on rows of
their own shapes (``visionft.data.packing``) or padded batches.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from torch import nn

from visionft.model.architectures import get_arch_spec, row_model_types
from visionft.patching.core import PatchReport
from visionft.patching.rows.base import ROW_KEY, RowFamily, RowInfo

_REPORT_ATTR = "_visionft_rows_report"


def row_module(model_type: str | None) -> ModuleType | None:
    """The row module of ``model_type``'s family (``ArchSpec.rows``), or None when it has no rows."""
    spec = get_arch_spec(model_type)
    return importlib.import_module(spec.rows) if spec is not None and spec.rows is not None else None


def rows_supported(model_type: str | None) -> bool:
    """Whether ``model_type`` has fixed-shape rows."""
    spec = get_arch_spec(model_type)
    return spec is not None and spec.rows is not None


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
    module = row_module(model_type)
    if module is None:
        raise ValueError(
            f"fixed-shape rows are built for {', '.join(row_model_types())}; this model is "
            f"model_type={model_type!r}"
        )
    report = getattr(hf, _REPORT_ATTR, None)
    if report is None:
        report = PatchReport(model_type=model_type or "")
        object.__setattr__(hf, _REPORT_ATTR, report)
    if not module.install(hf, report, fused):
        raise ValueError(f"rows: {model_type} layers are not the ones this release patches: {report.skipped}")
    return module.FAMILY(hf, pad_id, fused)


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


__all__ = ["ROW_KEY", "RowFamily", "RowInfo", "enable_rows", "revert_rows", "row_module", "rows_supported"]
