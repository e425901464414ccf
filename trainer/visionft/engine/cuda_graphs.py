"""The training step's forward and backward as a CUDA graph, captured once per batch signature.

Why: the QLoRA step of a 7B VLM at batch 1 is bound by the host launching kernels (about 12,600
launches, the GPU busy a third of the step: ``bench/RESULTS.md``). A CUDA graph replays all of
them with one launch, so the step costs what the GPU needs, not what Python needs.

How one step runs (``CudaGraphTrainStep.__call__``):

1. ``patching.static_inputs.prepare`` computes every data-dependent value of the batch on the
   host (positions, vision windows, embeddings, the placeholder check). The batch's *signature*
   (shapes, dtypes, image grids) picks the graph.
2. The first ``warmup`` steps of a signature run eagerly (real training steps: Triton autotuning,
   cuBLAS and the allocator settle). The next one captures forward + backward into a graph.
3. Every later step of that signature copies the batch into the graph's input buffers and replays.

Fixed-shape rows (``visionft.data.rows``, ``visionft.patching.rows``) skip step 1: a row already carries
its layout as tensors of its tier's shapes, so its signature is the tier, one warm-up step per tier is
enough, and a run of varied data has at most two signatures. The row's forward is its family's own
(``RowPlan.loss``), eager where graphs are off (on the CPU, ``VISIONFT_CUDA_GRAPHS=0``).

Gradients: the graph is captured with every ``.grad`` unset, so backward allocates them inside
the graph's memory pool, late in the backward, where the activations were (as eager backward
does); a replay overwrites them and re-attaches them as ``.grad``. Where a gradient is pending at a
replay (gradient accumulation, or an eager step before it), it is first moved to a separate
accumulation buffer, allocated on first need, and the replay's gradients are added to it. So
``.grad`` always holds the sum since the last ``zero_grad``, as in eager PyTorch.

Not covered (each case runs the eager step and logs the reason once): a device other than CUDA,
architectures whose family has no graph steps (``graph_steps`` in ``visionft.model.architectures``),
batches it does not cover (padding, videos), dropout (recomputation under checkpointing would need the
RNG state saved inside the graph), more than ``max_graphs`` signatures. The optimizer step stays
eager: bitsandbytes' 8-bit AdamW passes its step count as a host scalar, which a graph would freeze.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
import traceback
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from visionft.engine.host_offload import HostOffload
from visionft.engine.options import EngineOptions
from visionft.model.architectures import get_arch_spec
from visionft.patching import PatchReport, hf_model, static_inputs
from visionft.patching.rows.base import ROW_KEY

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def _report_syncs() -> Iterator[None]:
    def show(message, category, filename, lineno, file=None, line=None):
        stack = "".join(traceback.format_stack(limit=12)[:-1])
        logger.warning("host-device sync: %s\n%s", message, stack)

    previous = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = show
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield
        finally:
            torch.cuda.set_sync_debug_mode(previous)


def model_reason(model: nn.Module, patch_report: PatchReport | None, rows: bool = False) -> str | None:
    """Why ``model`` can't use graphed steps at all (None when it can).

    Args:
        model (nn.Module): the model being trained (PEFT wrapper or HF model).
        patch_report (PatchReport | None): what ``visionft.patching.apply_optimizations`` did to it; None
            when it did not run.
        rows (bool): the batches are fixed-shape rows (``visionft.patching.rows``), whose forward needs
            no static-input hooks. Default: False.
    """
    hf = hf_model(model)
    model_type = getattr(getattr(hf, "config", None), "model_type", type(hf).__name__)
    spec = get_arch_spec(model_type)
    if not rows and (spec is None or not spec.graph_steps):
        return f"no static-input preparation for model_type={model_type!r}"
    param = next((p for p in model.parameters() if p.requires_grad), None)
    if param is None:
        return "no trainable parameters"
    if param.device.type != "cuda":
        return f"parameters are on {param.device.type}, and CUDA graphs need CUDA"
    if not rows and (patch_report is None or not patch_report.counts.get("static_inputs")):
        return "the optimizations are off (visionft.patching did not install the static-input hooks)"
    dropouts = [n for n, m in model.named_modules() if isinstance(m, nn.Dropout) and m.p > 0]
    if dropouts:
        return f"dropout is on ({dropouts[0]} p={model.get_submodule(dropouts[0]).p}; set it to 0)"
    return None


@dataclass
class RowPlan:
    """One fixed-shape row batch on the device (``visionft.patching.rows``): what a graph copies in,
    and the family forward that computes its loss.

    Attributes:
        signature (tuple): the row's tier and host ints (equal for every row of a tier).
        dynamic (dict[str, torch.Tensor]): the row's device tensors (and ``num_items_in_batch``).
        info (RowInfo): the row's host side.
        family: the family whose ``forward`` runs the row.
    """

    signature: tuple
    dynamic: dict[str, torch.Tensor]
    info: Any
    family: Any

    def loss(self, model: nn.Module, tensors: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        tensors = tensors if tensors is not None else self.dynamic
        return self.family.forward(model, tensors, self.info, tensors.get("num_items_in_batch"))


#: Row-batch keys the forward does not read (the Trainer counts with them).
_ROW_HOST_ONLY = {"labels", "attention_mask"}


@dataclass
class _Signature:
    warm: int = 0
    graph: torch.cuda.CUDAGraph | None = None
    buffers: dict[str, torch.Tensor] | None = None
    loss: torch.Tensor | None = None
    grads: list[torch.Tensor | None] | None = None
    scale: torch.Tensor | None = None
    plan: static_inputs.StaticPlan | RowPlan | None = None
    #: Trainable parameters (indices) the warm-up step gave no gradient: the forward never uses them.
    unused: frozenset[int] | None = None


class CudaGraphTrainStep:
    """Runs forward + backward of ``model`` on a batch, from a CUDA graph where it can (module docstring).

    Args:
        model (nn.Module): the model being trained (PEFT wrapper or HF model), after
            ``visionft.patching.apply_optimizations``.
        patch_report (PatchReport | None): what ``apply_optimizations`` did to ``model`` (graphs need its
            static-input hooks); None when it did not run.
        options (EngineOptions | None): the engine's switches (``sync_debug``); None for the defaults.
            Default: None.
        warmup (int): eager steps per signature before capturing it. Default: 2.
        max_graphs (int): signatures to capture; later ones run eagerly. Default: 4.
        autocast_dtype (torch.dtype | None): the autocast dtype of the forward, None for none.
            Default: torch.bfloat16.
        rows: the row family (``visionft.patching.rows``) whose fixed-shape batches this step takes;
            None for batches of their own shapes. Default: None.
        capture_guard (Callable[[], ContextManager] | None): entered around each capture, e.g. to hold
            a data loader thread off the device while the graph is recorded. Default: None.
    """

    def __init__(
        self,
        model: nn.Module,
        patch_report: PatchReport | None,
        *,
        options: EngineOptions | None = None,
        warmup: int = 2,
        max_graphs: int = 4,
        autocast_dtype: torch.dtype | None = torch.bfloat16,
        rows: Any = None,
        capture_guard: Any = None,
    ) -> None:
        if warmup < 1:
            raise ValueError(f"warmup={warmup} must be at least 1 (the first step settles autotuning)")
        self.model = model
        self.hf = hf_model(model)
        self.warmup = warmup
        self.max_graphs = max_graphs
        self.autocast_dtype = autocast_dtype
        self.options = options or EngineOptions()
        self.rows = rows
        self.capture_guard = capture_guard
        self.disabled = model_reason(model, patch_report, rows=rows is not None)
        self.captured = 0
        self.replays = 0
        self.eager_steps = 0
        self._said: set[str] = set()
        self._signatures: dict[tuple, _Signature] = {}
        self._vision_cache: dict[tuple, dict] = {}
        self._pool: Any = None
        self._params = [p for p in model.parameters() if p.requires_grad]
        self._accumulators: list[torch.Tensor] | None = None
        #: Host seconds spent preparing batches and launching replays (for benchmarks).
        self.host_seconds = {"prepare": 0.0, "replay": 0.0}
        #: Allocated bytes around each capture (for benchmarks): (allocated before, process peak
        #: before, process peak after, allocated after).
        self.capture_memory: list[tuple[int, int, int, int]] = []
        #: Holds checkpointed block inputs on the host (``training.gradientCheckpointing: offload``).
        self._offload = HostOffload() if self.options.offload_checkpoints else None
        if self.disabled:
            self._say(f"CUDA graphs off: {self.disabled}")
            return
        self._use_graph_safe_checkpointing()

    # -- public --------------------------------------------------------------------------------------

    def __call__(
        self, batch: dict[str, Any], loss_scale: float = 1.0, extra: dict[str, torch.Tensor] | None = None
    ) -> torch.Tensor:
        """Forward and backward of ``batch`` (gradients accumulate into ``.grad``); returns the loss.

        Args:
            batch (dict): model inputs with ``labels``, on the model's device.
            loss_scale (float): backward runs on ``loss * loss_scale`` (1 / accumulation steps).
            extra (dict | None): more forward keyword arguments that are device tensors and differ
                between steps, e.g. ``num_items_in_batch`` (copied into the graph like the batch).
        """
        extra = extra or {}
        if self.rows is not None and ROW_KEY in batch:
            start = time.perf_counter()
            row = self._row_plan(batch, extra)
            self.host_seconds["prepare"] += time.perf_counter() - start
            if self.disabled:
                return self._eager(batch, row, loss_scale)
            return self._graphed(row, loss_scale)
        if self.disabled:
            return self._eager({**batch, **extra}, None, loss_scale)
        start = time.perf_counter()
        try:
            plan = static_inputs.prepare(self.hf, batch, cache=self._vision_cache)
        except ValueError as err:
            self._say(f"CUDA graphs: eager step for this batch ({err})")
            return self._eager({**batch, **extra}, None, loss_scale)
        finally:
            self.host_seconds["prepare"] += time.perf_counter() - start
        plan.dynamic.update(extra)
        plan.signature += tuple(sorted(extra))
        return self._graphed(plan, loss_scale, batch)

    @property
    def replay_share(self) -> float:
        """Replayed steps / all steps so far (0 before the first step)."""
        total = self.replays + self.eager_steps
        return self.replays / total if total else 0.0

    def summary(self) -> dict[str, Any]:
        """Counts for logs and the run summary."""
        out: dict[str, Any] = {
            "captured": self.captured,
            "replays": self.replays,
            "eager_steps": self.eager_steps,
            "replay_share": round(self.replay_share, 4),
            "off": self.disabled,
        }
        if self._offload is not None and not self.disabled:
            out["offload"] = {
                "host_gib": round(self._offload.host_bytes() / 2**30, 3),
                "last_step_gib": round(self._offload.last["offloaded_bytes"] / 2**30, 3),
                "kept_on_device": self._offload.last["kept_on_device"],
            }
        return out

    # -- internals -------------------------------------------------------------------------------------

    def _row_plan(self, batch: dict[str, Any], extra: dict[str, torch.Tensor]) -> RowPlan:
        info = batch[ROW_KEY]
        host = {k: v for k, v in batch.items() if isinstance(v, torch.Tensor) and k not in _ROW_HOST_ONLY}
        host = self.rows.host_inputs(self.model, host)
        device = self._params[0].device if self._params else torch.device("cpu")
        tensors = {k: v.to(device, non_blocking=True) for k, v in host.items()}
        tensors.update(extra)
        signature = (*info.signature, tuple(sorted(tensors)))
        return RowPlan(signature=signature, dynamic=tensors, info=info, family=self.rows)

    def _graphed(self, plan, loss_scale: float, batch: dict[str, Any] | None = None) -> torch.Tensor:
        sig = self._signatures.setdefault(plan.signature, _Signature())
        if sig.graph is None:
            if self.captured >= self.max_graphs:
                self._say(f"CUDA graphs: {self.max_graphs} signatures captured; later ones run eagerly")
                return self._eager(batch or {}, plan, loss_scale)
            if sig.warm < self.warmup:
                sig.warm += 1
                if sig.warm == self.warmup and self.options.sync_debug:
                    with _report_syncs():
                        return self._eager(batch or {}, plan, loss_scale, sig)
                return self._eager(batch or {}, plan, loss_scale, sig)
            self._capture(sig, plan)
        return self._replay(sig, plan, loss_scale)

    def _say(self, msg: str) -> None:
        if msg not in self._said:
            self._said.add(msg)
            logger.info(msg)

    def _autocast(self, cache_enabled: bool = True):
        if self.autocast_dtype is None:
            return torch.autocast("cuda", enabled=False)
        return torch.autocast("cuda", dtype=self.autocast_dtype, cache_enabled=cache_enabled)

    def _offloading(self, key: tuple | None, capturing: bool = False):
        """Around a forward + backward: checkpointed inputs go to the host (when asked for)."""
        if self._offload is None or self.disabled:
            return contextlib.nullcontext()
        return self._offload.step(key, capturing=capturing)

    def _eager(
        self,
        batch: dict[str, Any],
        plan: static_inputs.StaticPlan | RowPlan | None,
        scale: float,
        sig: _Signature | None = None,
    ) -> torch.Tensor:
        self.eager_steps += 1
        fresh = [p.grad is None for p in self._params]
        # A signature that may still be captured keeps its host buffers for the capture.
        key = plan.signature if plan is not None and self.captured < self.max_graphs else None
        with self._offloading(key):
            if isinstance(plan, RowPlan):
                with self._autocast():
                    loss = plan.loss(self.model)
            elif plan is None:
                with self._autocast():
                    loss = self.model(**batch).loss
            else:
                with static_inputs.active(plan), self._autocast():
                    loss = self.model(**plan.model_kwargs()).loss
            (loss * scale if scale != 1.0 else loss).backward()
        if sig is not None:
            sig.unused = frozenset(
                i for i, (p, f) in enumerate(zip(self._params, fresh, strict=True)) if f and p.grad is None
            )
        return loss.detach()

    def _use_graph_safe_checkpointing(self) -> None:
        # Checkpointing saves and restores the CUDA RNG state around each recomputation; with no
        # dropout (checked in model_reason) there is nothing random to replay, and the state copy is
        # a host read that a capture refuses. Non-reentrant: the inputs are detached buffers.
        flag = "is_activation_checkpointing" if hasattr(self.hf, "is_activation_checkpointing") else ""
        if getattr(self.hf, flag or "is_gradient_checkpointing", False):
            from torch.utils.checkpoint import checkpoint

            func: Any = functools.partial(checkpoint, use_reentrant=False, preserve_rng_state=False)
            if self._offload is not None:
                func = self._offload.checkpoint
            for module in self.hf.modules():
                if getattr(module, "gradient_checkpointing", False) and hasattr(
                    module, "_gradient_checkpointing_func"
                ):
                    module._gradient_checkpointing_func = func

    def _replay(
        self, sig: _Signature, plan: static_inputs.StaticPlan | RowPlan, scale: float
    ) -> torch.Tensor:
        start = time.perf_counter()
        assert sig.graph is not None and sig.buffers is not None and sig.grads is not None
        assert sig.loss is not None and sig.scale is not None
        pending = [p.grad for p in self._params]
        accumulate = any(g is not None for g in pending)
        if accumulate:
            # The replay would overwrite gradients that live in a graph pool: move them aside first.
            acc = self._accumulator_views()
            for g, a in zip(pending, acc, strict=True):
                if g is None:
                    a.zero_()
                elif g is not a:
                    a.copy_(g)
        for key, buf in sig.buffers.items():
            buf.copy_(plan.dynamic[key], non_blocking=True)
        sig.scale.fill_(scale)
        sig.graph.replay()
        grads: list[torch.Tensor | None]
        if accumulate:
            pairs = [(a, g) for a, g in zip(acc, sig.grads, strict=True) if g is not None]
            if pairs:
                torch._foreach_add_([a for a, _ in pairs], [g for _, g in pairs])
            # A parameter that has no gradient in this graph keeps what was pending (or none).
            grads = [
                a if g is not None or p is not None else None
                for a, g, p in zip(acc, sig.grads, pending, strict=True)
            ]
        else:
            grads = list(sig.grads)
        for p, g in zip(self._params, grads, strict=True):
            p.grad = g
        self.replays += 1
        self.host_seconds["replay"] += time.perf_counter() - start
        return sig.loss.clone()

    def _accumulator_views(self) -> list[torch.Tensor]:
        if self._accumulators is None:
            self._say("CUDA graphs: gradients accumulate across replays; allocating an accumulation buffer")
            self._accumulators = [torch.empty_like(p) for p in self._params]
        return self._accumulators

    def _capture(self, sig: _Signature, plan: static_inputs.StaticPlan | RowPlan) -> None:
        sig.buffers = {k: v.clone() for k, v in plan.dynamic.items()}
        sig.scale = torch.ones((), dtype=torch.float32, device=self._params[0].device)
        # From here on the plan holds the buffers, not this batch's tensors (no second copy alive
        # during the capture); it keeps the signature's vision tensors, which the graph reads, alive.
        plan.dynamic = sig.buffers
        sig.plan = plan
        # Unset, so that backward allocates the gradients in the graph's pool (module docstring).
        pending = [p.grad for p in self._params]
        for p in self._params:
            p.grad = None
        graph = torch.cuda.CUDAGraph()
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        peak_so_far = torch.cuda.max_memory_allocated()
        guard = self.capture_guard() if self.capture_guard is not None else contextlib.nullcontext()
        # thread_local: other threads (the data loader's) may use CUDA while this one records.
        with (
            guard,
            torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"),
            self._offloading(plan.signature, capturing=True),
        ):
            if isinstance(plan, RowPlan):
                with self._autocast(cache_enabled=False):
                    loss = plan.loss(self.model, sig.buffers)
            else:
                with static_inputs.active(plan, sig.buffers), self._autocast(cache_enabled=False):
                    loss = self.model(**plan.model_kwargs(sig.buffers)).loss
            (loss.float() * sig.scale).backward()
        sig.grads = [p.grad for p in self._params]
        names = [n for n, p in self.model.named_parameters() if p.requires_grad]
        missing = [i for i, g in enumerate(sig.grads) if g is None]
        lost = [i for i in missing if sig.unused is None or i not in sig.unused]
        if lost:
            raise RuntimeError(
                f"CUDA graphs: the captured backward gives {names[lost[0]]} no gradient, "
                "which the eager step gave one"
            )
        if missing:
            # E.g. LLaVA's last vision layer: its output is not among the features the model takes.
            self._say(
                f"CUDA graphs: {len(missing)} trainable parameters get no gradient from this forward "
                f"(e.g. {names[missing[0]]}): they stay untrained"
            )
        for p, g in zip(self._params, pending, strict=True):
            p.grad = g  # the capture ran nothing: what was pending is still pending
        sig.loss = loss.detach()
        sig.graph = graph
        self.capture_memory.append(
            (before, peak_so_far, torch.cuda.max_memory_allocated(), torch.cuda.memory_allocated())
        )
        if self._pool is None:
            self._pool = graph.pool()
        self.captured += 1
        # The eager warm-up's cached blocks are not needed by the graph, which owns its own pool.
        torch.cuda.empty_cache()
        self._say(
            f"CUDA graphs: captured the step for signature {plan.signature[:2]} ({self.captured} so far)"
        )


__all__ = ["CudaGraphTrainStep", "RowPlan", "model_reason"]
