"""The architecture registry: where each VLM keeps its vision tower, language model and projector.

``get_arch_spec(model_type)`` gives the ``ArchSpec``; ``classify_linear_modules(model)`` sorts a
model's Linear modules into vision/language x attention/MLP groups (with a keyword fallback for
unmapped architectures); ``register_arch`` adds an architecture.
"""

from visionft.models.classify import Group, classify_linear_modules, count_groups
from visionft.models.registry import get_arch_spec, register_arch, supported_model_types, unregister_arch
from visionft.models.spec import ArchSpec, ChatMarkers

__all__ = [
    "ArchSpec",
    "ChatMarkers",
    "Group",
    "classify_linear_modules",
    "count_groups",
    "get_arch_spec",
    "register_arch",
    "supported_model_types",
    "unregister_arch",
]
