"""Deterministic names of a VisionFineTune's children.

Every child is named from the resource's name alone, so a restarted operator (or a second replica) finds
the objects it made instead of making new ones. Job names must fit in a label value (63 characters); longer
resource names are shortened with a hash suffix that keeps them unique.
"""

from __future__ import annotations

import hashlib

MAX_NAME = 63


def child_name(resource_name: str, suffix: str = "trainer") -> str:
    """`<name>-<suffix>`, shortened to 63 characters with a stable hash when needed."""
    full = f"{resource_name}-{suffix}"
    if len(full) <= MAX_NAME:
        return full
    digest = hashlib.sha256(resource_name.encode()).hexdigest()[:8]
    head = resource_name[: MAX_NAME - len(suffix) - len(digest) - 2].rstrip("-.")
    return f"{head}-{digest}-{suffix}"


def job_name(resource_name: str) -> str:
    """The batch/v1 Job (and the ServiceAccount, Role and RoleBinding: one identity per run)."""
    return child_name(resource_name, "trainer")


def config_map_name(resource_name: str) -> str:
    """The ConfigMap with the trainer config."""
    return child_name(resource_name, "config")


def service_account_name(resource_name: str) -> str:
    return child_name(resource_name, "trainer")


def role_name(resource_name: str) -> str:
    return child_name(resource_name, "trainer")
