"""The API permissions the operator needs, derived from its code, and a checker for RBAC rules.

The list is not written by hand: ``required_permissions()`` reads the operator's sources and collects
  - every kubernetes-client call (``create_namespaced_job``, ``read_namespaced_config_map``,
    ``patch_namespaced_custom_object_status``, ...), mapped to (API group, resource, verb);
  - every Kopf handler decorator (``@kopf.on.create(GROUP, VERSION, PLURAL)``, `@kopf.on.event("batch", "v1",
    "jobs")`, timers, daemons, indices), which need list and watch on their resource, and patch on it for
    Kopf's own finalizers, annotations and progress storage;
  - what Kopf itself does whatever the handlers are: posting Events.
A client call on a resource the table below does not know fails the derivation: a new kind of API call in
the operator can't slip past the chart's RBAC silently. tests/deploy/test_rbac.py checks the chart's rules
against this set, offline and with ``kubectl auth can-i`` on the real apiserver.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from visionft_api import resource as api_resource
from visionft_operator.controller import peering as operator_peering

REPO = Path(__file__).resolve().parents[2]
OPERATOR_SOURCES = REPO / "operator" / "visionft_operator"


@dataclass(frozen=True, order=True)
class Permission:
    """One (API group, resource[/subresource], verb) triple, as RBAC and ``kubectl auth can-i`` see it."""

    group: str
    resource: str
    verb: str
    why: str = ""

    def key(self) -> tuple[str, str, str]:
        return (self.group, self.resource, self.verb)

    def can_i_args(self) -> list[str]:
        """Arguments of ``kubectl auth can-i`` for this permission."""
        plural, _, sub = self.resource.partition("/")
        target = f"{plural}.{self.group}" if self.group else plural
        args = [self.verb, target]
        if sub:
            args.append(f"--subresource={sub}")
        return args


# The snake-case resource part of kubernetes-client method names -> (group, plural).
CLIENT_RESOURCES: dict[str, tuple[str, str]] = {
    "pod": ("", "pods"),
    "pod_log": ("", "pods/log"),
    "pod_status": ("", "pods/status"),
    "event": ("", "events"),
    "config_map": ("", "configmaps"),
    "service_account": ("", "serviceaccounts"),
    "service": ("", "services"),
    "secret": ("", "secrets"),
    "namespace": ("", "namespaces"),
    "persistent_volume_claim": ("", "persistentvolumeclaims"),
    "job": ("batch", "jobs"),
    "job_status": ("batch", "jobs/status"),
    "role": ("rbac.authorization.k8s.io", "roles"),
    "role_binding": ("rbac.authorization.k8s.io", "rolebindings"),
    "lease": ("coordination.k8s.io", "leases"),
    # The operator's only custom objects are its own resources (the call's group/plural arguments are
    # checked to be the schema's constants in ``_custom_object_target``).
    "custom_object": (api_resource.GROUP, api_resource.PLURAL),
    "custom_object_status": (api_resource.GROUP, f"{api_resource.PLURAL}/status"),
}
CLIENT_VERBS = {
    "create": "create",
    "get": "get",
    "read": "get",
    "patch": "patch",
    "replace": "update",
    "delete": "delete",
    "list": "list",
}
# kubernetes-client methods on namespaced resources say so (``create_namespaced_job``, ``list_job_for_all_namespaces``,
# ``get_namespaced_custom_object``); cluster-scoped ones are matched by name (CLUSTER_RESOURCES). Other calls
# with these verbs (``asyncio.create_task``, the operator's own ``read_job`` wrappers) are not API calls.
_CLIENT_CALL = re.compile(
    r"^(?P<verb>create|read|get|patch|replace|delete|list)_(?P<scope>namespaced_|cluster_)?(?P<what>[a-z_]+?)"
    r"(?P<all>_for_all_namespaces)?$"
)
CLUSTER_RESOURCES = {
    "namespace": ("", "namespaces"),
    "node": ("", "nodes"),
    "persistent_volume": ("", "persistentvolumes"),
    "cluster_role": ("rbac.authorization.k8s.io", "clusterroles"),
    "cluster_role_binding": ("rbac.authorization.k8s.io", "clusterrolebindings"),
    "custom_resource_definition": ("apiextensions.k8s.io", "customresourcedefinitions"),
}
_KOPF_HANDLERS = {"create", "update", "delete", "resume", "event", "field", "timer", "daemon", "index"}


def _sources() -> Iterator[tuple[Path, ast.Module]]:
    for path in sorted(OPERATOR_SOURCES.rglob("*.py")):
        yield path, ast.parse(path.read_text(), filename=str(path))


def _constant(node: ast.expr) -> str | None:
    """A string literal, or a name/attribute that refers to one of the schema's or operator's constants."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    name = node.attr if isinstance(node, ast.Attribute) else node.id if isinstance(node, ast.Name) else None
    if name is None:
        return None
    for module in (api_resource, operator_peering):
        value = getattr(module, name, None)
        if isinstance(value, str):
            return value
    return None


def _client_permissions(tree: ast.Module, where: str) -> Iterator[Permission]:
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
            continue
        match = _CLIENT_CALL.match(node.func.attr)
        if match is None:
            continue
        what = match["what"]
        verb = CLIENT_VERBS[match["verb"]]
        if not (match["scope"] or match["all"]):
            if what in CLUSTER_RESOURCES:
                group, plural = CLUSTER_RESOURCES[what]
                yield Permission(
                    group, plural, verb, f"{where}:{node.lineno} {node.func.attr} (cluster-scoped)"
                )
            continue
        if what.endswith("_collection") and verb == "delete":
            what, verb = what.removesuffix("_collection"), "deletecollection"
        if what not in CLIENT_RESOURCES:
            raise LookupError(
                f"{where}:{node.lineno}: `{node.func.attr}` calls the API on `{what}`, which "
                "tests/deploy/permissions.py does not know: add it to CLIENT_RESOURCES, then grant it in "
                "charts/visionft/templates/_helpers.tpl if the operator really needs it"
            )
        if what.startswith("custom_object"):
            peering_plural = _custom_object_target(node, where)
            if peering_plural is not None:
                yield Permission(
                    PEERING_GROUP, peering_plural, verb, f"{where}:{node.lineno} {node.func.attr} (peering)"
                )
                continue
        group, plural = CLIENT_RESOURCES[what]
        yield Permission(group, plural, verb, f"{where}:{node.lineno} {node.func.attr}")


# Kopf's peering objects: the operator reads them only when peering is on (several replicas).
PEERING_GROUP = "kopf.dev"
PEERING_PLURALS = {"kopfpeerings", "clusterkopfpeerings"}


def _custom_object_target(node: ast.Call, where: str) -> str | None:
    """Custom-object calls must address the VisionFineTune resource (GROUP, ..., PLURAL), or Kopf's peering
    objects, whose plural is returned (None for the VisionFineTune)."""
    values = [_constant(arg) for arg in node.args]
    if PEERING_GROUP in values:
        plurals = PEERING_PLURALS.intersection(v for v in values if v)
        if len(plurals) == 1:
            return plurals.pop()
    if api_resource.GROUP not in values or api_resource.PLURAL not in values:
        raise LookupError(
            f"{where}:{node.lineno}: `{node.func.attr}` addresses a custom resource other than "  # type: ignore[attr-defined]
            f"{api_resource.PLURAL}.{api_resource.GROUP}: extend tests/deploy/permissions.py"
        )
    return None


def _kopf_resource(decorator: ast.Call) -> tuple[str, str] | None:
    """(group, plural) of a Kopf handler decorator's resource selector."""
    args = [_constant(arg) for arg in decorator.args]
    kwargs = {kw.arg: _constant(kw.value) for kw in decorator.keywords if kw.arg}
    if kwargs.get("plural"):
        group = kwargs.get("group") or ""
        return group, str(kwargs["plural"])
    args = [a for a in args if a is not None]
    if not args:
        return None
    plural = args[-1]
    head = args[0] if len(args) >= 2 else ""
    group = "" if re.match(r"^v\d", head) else head.split("/")[0]
    return group, plural


def _kopf_handler(node: ast.AST) -> ast.Call | None:
    """``kopf.on.event(...)``, ``kopf.timer(...)``, ``kopf.daemon(...)``, ``kopf.index(...)`` with a resource selector,
    whether used as a decorator or called as ``kopf.on.event(...)(fn)``."""
    if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
        return None
    if node.func.attr not in _KOPF_HANDLERS or not ast.unparse(node.func).startswith("kopf."):
        return None
    return node


def _kopf_permissions(tree: ast.Module, where: str) -> Iterator[Permission]:
    for node in ast.walk(tree):
        handler = _kopf_handler(node)
        if handler is None:
            continue
        target = _kopf_resource(handler)
        if target is None:
            continue
        group, plural = target
        kind = handler.func.attr  # type: ignore[attr-defined]
        why = f"{where}:{handler.lineno} {ast.unparse(handler.func)}"
        yield Permission(group, plural, "list", why)
        yield Permission(group, plural, "watch", why)
        if kind not in {"event", "index"}:
            # Change-detecting handlers, timers and daemons make Kopf store finalizers, its last-handled
            # annotation and handler progress on the object.
            yield Permission(group, plural, "patch", why + " (Kopf's own bookkeeping)")


# What Kopf does for any operator: post Events (kopf.info/warn/exception and handler failures).
KOPF_FRAMEWORK = (Permission("", "events", "create", "Kopf posts Events"),)


def required_permissions(peering_plural: str | None = None) -> list[Permission]:
    """Every permission the operator code uses, deduplicated by (group, resource, verb). Peering calls count
    only when peering is on, for the plural of that mode (kopfpeerings when namespaced, clusterkopfpeerings
    when cluster-wide)."""
    found: dict[tuple[str, str, str], Permission] = {}
    for path, tree in _sources():
        where = str(path.relative_to(REPO))
        for permission in (*_client_permissions(tree, where), *_kopf_permissions(tree, where)):
            if permission.group == PEERING_GROUP and permission.resource != peering_plural:
                continue
            found.setdefault(permission.key(), permission)
    for permission in KOPF_FRAMEWORK:
        found.setdefault(permission.key(), permission)
    return sorted(found.values())


def rules_allow(rules: Iterable[dict[str, Any]], group: str, resource: str, verb: str) -> bool:
    """Whether RBAC rules (as in a Role) allow a verb on every object of a resource (no resourceNames)."""
    for rule in rules:
        if rule.get("resourceNames"):
            continue
        groups, resources, verbs = (rule.get(k) or [] for k in ("apiGroups", "resources", "verbs"))
        if (
            (group in groups or "*" in groups)
            and (resource in resources or "*" in resources)
            and (verb in verbs or "*" in verbs)
        ):
            return True
    return False
