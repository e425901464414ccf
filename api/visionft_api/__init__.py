"""The VisionFineTune schema: one source of truth for the CRD, the operator and the trainer.

Torch-free by design: the operator imports this package and nothing of the trainer.
"""

from visionft_api.recipe import (
    DatasetColumns,
    DatasetSource,
    DpoSettings,
    LoraSettings,
    ModelSource,
    OutputTarget,
    StorageSettings,
    TrainingRecipe,
    TrainingSettings,
)
from visionft_api.resource import (
    API_VERSION,
    FINAL_PHASES,
    GROUP,
    KIND,
    PHASES,
    PLURAL,
    VERSION,
    Condition,
    Outputs,
    Progress,
    ResourceSettings,
    RunPolicy,
    Toleration,
    VisionFineTuneSpec,
    VisionFineTuneStatus,
)
from visionft_api.trainer_config import RuntimeSettings, StatusTarget, TrainerConfig

__all__ = [
    "API_VERSION",
    "FINAL_PHASES",
    "GROUP",
    "KIND",
    "PHASES",
    "PLURAL",
    "VERSION",
    "Condition",
    "DatasetColumns",
    "DatasetSource",
    "DpoSettings",
    "LoraSettings",
    "ModelSource",
    "OutputTarget",
    "Outputs",
    "Progress",
    "ResourceSettings",
    "RunPolicy",
    "RuntimeSettings",
    "StatusTarget",
    "StorageSettings",
    "Toleration",
    "TrainerConfig",
    "TrainingRecipe",
    "TrainingSettings",
    "VisionFineTuneSpec",
    "VisionFineTuneStatus",
]
