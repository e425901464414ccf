"""``EngineOptions``: the switches of the training engine, resolved once from the recipe and the environment.

The run resolves them before loading the model, settles the row layout once the model type is known
(``for_model_type``), and passes them on explicitly: ``optimizations`` to
``visionft.patching.apply_optimizations``, the whole object to the trainer (``visionft.engine.trainer``),
which hands it to the graph step (``visionft.engine.cuda_graphs``). Nothing below reads the environment.

The environment switches, for the operator of a training pod or a benchmark:

- ``VISIONFT_DISABLE_KERNELS=1``: no fused kernels (and so no graph steps), where no explicit
  ``optimizations`` is given (the recipe's ``training.optimizations`` is explicit);
- ``VISIONFT_CUDA_GRAPHS=0``: the kernels stay, every step runs eagerly;
- ``VISIONFT_SYNC_DEBUG=1``: the last eager step before each capture logs every host-device sync with its
  Python stack (each one is a place where the capture would fail).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from visionft_api.recipe import TrainingSettings

#: ``VISIONFT_DISABLE_KERNELS=1`` turns every optimization off (unless ``optimizations`` is explicit).
DISABLE_KERNELS_ENV = "VISIONFT_DISABLE_KERNELS"
#: ``VISIONFT_CUDA_GRAPHS=0`` keeps the optimizations but runs every step eagerly.
GRAPHS_ENV = "VISIONFT_CUDA_GRAPHS"
#: ``VISIONFT_SYNC_DEBUG=1`` logs every host-device sync of the last eager step before a capture.
SYNC_DEBUG_ENV = "VISIONFT_SYNC_DEBUG"

_OFF = ("0", "false", "no", "off")


@dataclass(frozen=True)
class EngineOptions:
    """What the engine does, decided once per run.

    Attributes:
        optimizations (bool): swap the fused kernels in and take this engine's training step.
            Default: True.
        cuda_graphs (bool): replay the step from CUDA graphs where the batch allows (needs
            ``optimizations``). Default: True.
        sync_debug (bool): log the host-device syncs of the last eager step before each capture.
            Default: False.
        packing (bool): train on packed rows (``training.packing``). Default: False.
        rows (bool): the packed rows have one fixed shape per tier (``visionft.data.rows``,
            ``visionft.patching.rows``): set by ``for_model_type`` where ``packing`` is on and the family has
            them (``ArchSpec.rows``); otherwise packed rows take each batch's own shape
            (``visionft.data.packing``). Default: False.
        offload_checkpoints (bool): checkpointed blocks keep their inputs in pinned host memory
            (``training.gradientCheckpointing: offload``); graph steps do it in a capturable form
            (``visionft.engine.host_offload``). Default: False.
    """

    optimizations: bool = True
    cuda_graphs: bool = True
    sync_debug: bool = False
    packing: bool = False
    rows: bool = False
    offload_checkpoints: bool = False

    @classmethod
    def resolve(
        cls,
        optimizations: bool | None = None,
        packing: bool = False,
        env: Mapping[str, str] | None = None,
        offload_checkpoints: bool = False,
    ) -> EngineOptions:
        """The options from explicit values and the environment switches (module docstring).

        Args:
            optimizations (bool | None): the switch; None reads ``VISIONFT_DISABLE_KERNELS``. Default: None.
            packing (bool): train on packed rows. Default: False.
            offload_checkpoints (bool): keep checkpointed inputs on the host. Default: False.
            env (Mapping[str, str] | None): the environment; ``os.environ`` when None. Default: None.

        Returns:
            EngineOptions: the options.
        """
        env = os.environ if env is None else env
        if optimizations is None:
            optimizations = env.get(DISABLE_KERNELS_ENV, "0").strip().lower() in ("", *_OFF)
        return cls(
            optimizations=bool(optimizations),
            cuda_graphs=env.get(GRAPHS_ENV, "1").strip().lower() not in _OFF,
            sync_debug=env.get(SYNC_DEBUG_ENV) == "1",
            packing=packing,
            offload_checkpoints=offload_checkpoints,
        )

    @classmethod
    def from_recipe(cls, training: TrainingSettings, env: Mapping[str, str] | None = None) -> EngineOptions:
        """The options of a recipe's ``training`` (``optimizations``, ``packing``, ``gradientCheckpointing``)."""
        return cls.resolve(
            optimizations=training.optimizations,
            packing=training.packing,
            env=env,
            offload_checkpoints=training.gradient_checkpointing == "offload",
        )

    def for_model_type(self, model_type: str | None) -> EngineOptions:
        """These options with the row layout settled for a model of ``model_type`` (``rows``)."""
        from visionft.model.architectures import get_arch_spec

        spec = get_arch_spec(model_type)
        return replace(self, rows=self.packing and spec is not None and spec.rows is not None)


__all__ = ["DISABLE_KERNELS_ENV", "GRAPHS_ENV", "SYNC_DEBUG_ENV", "EngineOptions"]
