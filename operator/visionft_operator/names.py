"""Deterministic names and label values derived from a VisionFineTune's name.

Every child is named from the resource's name alone, so a restarted operator (or a second replica) finds
the objects it made instead of making new ones. A resource's name may be any DNS subdomain of up to 253
characters, which fits neither every child's name nor a label value:

- child names are DNS-1035 labels (at most 63 lowercase letters, digits and "-", starting with a letter),
  which every kind takes: a Service, the pods' host names of a multi-node Job (``<job>-<index>``);
- the ``visionft.io/name`` label value is at most 63 characters.

A name that fits is kept as it is; one that does not is shortened (and made a DNS-1035 label) with a hash
of the whole name, so two resources never share a child or a label value. The pods also carry the whole
name in the ``visionft.io/name`` annotation, which the operator reads back.
"""

from __future__ import annotations

import hashlib
import re

MAX_NAME = 63
_DIGEST = 8
_DNS_1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


def _digest(resource_name: str) -> str:
    return hashlib.sha256(resource_name.encode()).hexdigest()[:_DIGEST]


def child_name(resource_name: str, suffix: str = "trainer") -> str:
    """``<name>-<suffix>`` when that is a DNS-1035 label of at most 63 characters; otherwise a DNS-1035 label
    from the name's head, a hash of the whole name and the suffix."""
    full = f"{resource_name}-{suffix}"
    if len(full) <= MAX_NAME and _DNS_1035_LABEL.match(full):
        return full
    head = resource_name.replace(".", "-")
    if not head[:1].isalpha():
        head = f"x{head}"
    head = head[: MAX_NAME - len(suffix) - _DIGEST - 2].rstrip("-")
    return f"{head}-{_digest(resource_name)}-{suffix}"


def label_value(resource_name: str) -> str:
    """The ``visionft.io/name`` label value of a resource's children and pods: the name itself when it fits
    in a label value (63 characters), else its head and a hash of the whole name."""
    if len(resource_name) <= MAX_NAME:
        return resource_name
    head = resource_name[: MAX_NAME - _DIGEST - 1].rstrip("-.")
    return f"{head}-{_digest(resource_name)}"


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
