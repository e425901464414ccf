"""The few API calls the operator makes, on the kubernetes client (synchronous; callers run them in a
thread). Objects go in and come out as plain dicts in their wire (camelCase) form.

The operator only ever creates children, merge-patches a Job's ``suspend``/``activeDeadlineSeconds``, deletes a
multi-node run's failed Job (a group restart), writes its own status fields through the status
subresource, and deletes a resource whose TTL ran out. It never writes a resource's spec, labels or
annotations, and it never reads Secrets.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any, Literal

import kubernetes
from kubernetes.client.exceptions import ApiException
from visionft_api.resource import GROUP, PLURAL, VERSION

from visionft_operator import constants as c

MERGE_PATCH = "application/merge-patch+json"
# Every merge patch the operator sends: under its field manager, the answer left as raw JSON.
_MERGE = {"field_manager": c.FIELD_MANAGER, "_content_type": MERGE_PATCH, "_preload_content": False}

_lock = threading.Lock()
_api: kubernetes.client.ApiClient | None = None


def api_client() -> kubernetes.client.ApiClient:
    """One client per process: in-cluster credentials, else the kubeconfig ($KUBECONFIG)."""
    global _api
    with _lock:
        if _api is None:
            configuration = kubernetes.client.Configuration()
            try:
                kubernetes.config.load_incluster_config(client_configuration=configuration)
            except kubernetes.config.ConfigException:
                kubernetes.config.load_kube_config(client_configuration=configuration)
            send_bearer_token(configuration)
            _api = kubernetes.client.ApiClient(configuration)
        return _api


def send_bearer_token(configuration: kubernetes.client.Configuration) -> None:
    """Work around kubernetes-client 36: its config loaders store a token (in-cluster ServiceAccount
    token, kubeconfig ``token``) under api_key["authorization"], but its requests only send
    api_key["BearerToken"], so token-authenticated calls go out anonymous (403 system:anonymous).
    Copy the token over, also after each refresh of a rotating in-cluster token."""
    original = configuration.refresh_api_key_hook

    def refresh(conf: kubernetes.client.Configuration) -> None:
        if original is not None:
            original(conf)
        token = conf.api_key.get("authorization")
        if token and "BearerToken" not in conf.api_key_prefix:
            conf.api_key["BearerToken"] = token

    configuration.refresh_api_key_hook = refresh
    refresh(configuration)


def reset_client() -> None:
    """Forget the client (tests point the process at another cluster)."""
    global _api
    with _lock:
        _api = None


def _json(response: Any) -> dict[str, Any]:
    return json.loads(response.data)


def _core() -> kubernetes.client.CoreV1Api:
    return kubernetes.client.CoreV1Api(api_client())


def _batch() -> kubernetes.client.BatchV1Api:
    return kubernetes.client.BatchV1Api(api_client())


def _rbac() -> kubernetes.client.RbacAuthorizationV1Api:
    return kubernetes.client.RbacAuthorizationV1Api(api_client())


def _custom() -> kubernetes.client.CustomObjectsApi:
    return kubernetes.client.CustomObjectsApi(api_client())


def _create(kind: str, namespace: str, body: dict[str, Any], dry_run: bool) -> Any:
    options: dict[str, Any] = {"field_manager": c.FIELD_MANAGER, "_preload_content": False}
    if dry_run:
        options["dry_run"] = "All"
    if kind == "ServiceAccount":
        return _core().create_namespaced_service_account(namespace, body, **options)
    if kind == "ConfigMap":
        return _core().create_namespaced_config_map(namespace, body, **options)
    if kind == "Role":
        return _rbac().create_namespaced_role(namespace, body, **options)
    if kind == "RoleBinding":
        return _rbac().create_namespaced_role_binding(namespace, body, **options)
    if kind == "Service":
        return _core().create_namespaced_service(namespace, body, **options)
    if kind == "Job":
        return _batch().create_namespaced_job(namespace, body, **options)
    raise ValueError(kind)


_READ = {
    "ServiceAccount": lambda ns, name: _core().read_namespaced_service_account(
        name, ns, _preload_content=False
    ),
    "ConfigMap": lambda ns, name: _core().read_namespaced_config_map(name, ns, _preload_content=False),
    "Role": lambda ns, name: _rbac().read_namespaced_role(name, ns, _preload_content=False),
    "RoleBinding": lambda ns, name: _rbac().read_namespaced_role_binding(name, ns, _preload_content=False),
    "Service": lambda ns, name: _core().read_namespaced_service(name, ns, _preload_content=False),
    "Job": lambda ns, name: _batch().read_namespaced_job(name, ns, _preload_content=False),
}


_DELETE = {
    "ServiceAccount": lambda ns, name, **kw: _core().delete_namespaced_service_account(name, ns, **kw),
    "ConfigMap": lambda ns, name, **kw: _core().delete_namespaced_config_map(name, ns, **kw),
    "Role": lambda ns, name, **kw: _rbac().delete_namespaced_role(name, ns, **kw),
    "RoleBinding": lambda ns, name, **kw: _rbac().delete_namespaced_role_binding(name, ns, **kw),
    "Service": lambda ns, name, **kw: _core().delete_namespaced_service(name, ns, **kw),
    "Job": lambda ns, name, **kw: _batch().delete_namespaced_job(name, ns, **kw),
}


def delete_child(obj: dict[str, Any]) -> None:
    """Delete a child as read back from the apiserver, only if it is still the same object (uid
    precondition); gone already, or the name taken by another object, is no error."""
    meta = obj["metadata"]
    body = kubernetes.client.V1DeleteOptions(
        propagation_policy="Background", preconditions=kubernetes.client.V1Preconditions(uid=meta["uid"])
    )
    try:
        _DELETE[obj["kind"]](meta["namespace"], meta["name"], body=body, _preload_content=False)
    except ApiException as err:
        if err.status not in (404, 409):
            raise


class NotOurs(Exception):
    """A child's name is taken by an object that another owner controls."""


#: The answers of an apiserver that refused a write for what was written (its validation, an admission
#: plugin or policy, a quota, RBAC): a retry of the same write gets the same answer.
REFUSED = frozenset({400, 403, 404, 422})


def refused(err: BaseException) -> bool:
    return isinstance(err, ApiException) and err.status in REFUSED


def refusal_message(err: ApiException) -> str:
    """The apiserver's own words (its Status message), else the HTTP reason."""
    try:
        body = json.loads(err.body or "{}")
    except (TypeError, ValueError):
        body = {}
    message = body.get("message") if isinstance(body, dict) else None
    return str(message or err.reason or f"HTTP {err.status}")


def dry_run_create(obj: dict[str, Any]) -> None:
    """Ask the apiserver whether it would create the object (validation, admission, quota, RBAC), without
    creating it. An object of that name that is ours passes (it is adopted); one of another owner raises
    NotOurs."""
    try:
        _create(obj["kind"], obj["metadata"]["namespace"], obj, dry_run=True)
    except ApiException as err:
        if err.status != 409:
            raise
        _adoptable(obj)


def create_or_adopt(obj: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """Create the object; when it exists (409: a restarted operator, a second replica), return the
    existing one if it is ours. Returns (object, created)."""
    kind, ns = obj["kind"], obj["metadata"]["namespace"]
    try:
        return _json(_create(kind, ns, obj, dry_run=False)), True
    except ApiException as err:
        if err.status != 409:
            raise
    return _adoptable(obj), False


def _adoptable(obj: dict[str, Any]) -> dict[str, Any]:
    """The existing object of ``obj``'s name, when ``obj``'s owner owns it; else NotOurs."""
    kind, ns = obj["kind"], obj["metadata"]["namespace"]
    existing = _json(_READ[kind](ns, obj["metadata"]["name"]))
    want_uid = obj["metadata"]["ownerReferences"][0]["uid"]
    owners = existing["metadata"].get("ownerReferences") or []
    if not any(o.get("uid") == want_uid for o in owners):
        controller = next((o for o in owners if o.get("controller")), None)
        who = (
            f"{controller['kind']} {controller['name']} (uid {controller['uid']})" if controller else "nobody"
        )
        raise NotOurs(f"{kind} {ns}/{obj['metadata']['name']} exists and is controlled by {who}")
    return existing


def patch_job(namespace: str, name: str, patch: dict[str, Any]) -> dict[str, Any]:
    return _json(_batch().patch_namespaced_job(name, namespace, patch, **_MERGE))


def delete_job_foreground(namespace: str, name: str, uid: str) -> None:
    """Delete a Job in the foreground (it stays until all of its pods are gone), only if it is still the
    same object (uid precondition); gone already, or the name taken by another Job, is no error."""
    body = kubernetes.client.V1DeleteOptions(
        propagation_policy="Foreground", preconditions=kubernetes.client.V1Preconditions(uid=uid)
    )
    try:
        _batch().delete_namespaced_job(name, namespace, body=body, _preload_content=False)
    except ApiException as err:
        if err.status not in (404, 409):
            raise


def post_event(body: dict[str, Any], type_: str, reason: str, message: str) -> None:
    """Post a core/v1 Event about a VisionFineTune.

    Posted directly rather than through ``kopf.event``, whose queue exists only inside Kopf's per-object
    tasks: the periodic resync runs outside them, and a transition it observed would lose its Event.
    """
    meta = body["metadata"]
    now = datetime.now(UTC)
    event = {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
        "involvedObject": {
            "apiVersion": body.get("apiVersion", f"{GROUP}/{VERSION}"),
            "kind": body.get("kind", "VisionFineTune"),
            "name": meta["name"],
            "namespace": meta["namespace"],
            "uid": meta.get("uid"),
            "resourceVersion": meta.get("resourceVersion"),
        },
        "type": type_,
        "reason": reason,
        "message": message[:1024],
        "source": {"component": c.COMPONENT},
        "reportingComponent": c.COMPONENT,
        "reportingInstance": c.COMPONENT,
        "firstTimestamp": now.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "lastTimestamp": now.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "count": 1,
    }
    _core().create_namespaced_event(meta["namespace"], event)


def list_jobs(namespace: str) -> list[dict[str, Any]]:
    """The operator's Jobs in a namespace (for the policy's usage count)."""
    response = _batch().list_namespaced_job(
        namespace, label_selector=f"{c.LABEL_MANAGED_BY}={c.COMPONENT}", _preload_content=False
    )
    return _json(response).get("items") or []


#: Objects per page of the operator's own lists (its cache's sync): bounds what one page holds at once.
LIST_PAGE = 250


def _list_page(kind: str, namespace: str | None, token: str) -> Any:
    managed = f"{c.LABEL_MANAGED_BY}={c.COMPONENT}"
    page: dict[str, Any] = {"limit": LIST_PAGE, "_preload_content": False, "_request_timeout": 120}
    if token:
        page["_continue"] = token
    if kind == "VisionFineTune":
        if namespace is None:
            return _custom().list_cluster_custom_object(GROUP, VERSION, PLURAL, **page)
        return _custom().list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, **page)
    if kind == "Job":
        if namespace is None:
            return _batch().list_job_for_all_namespaces(label_selector=managed, **page)
        return _batch().list_namespaced_job(namespace, label_selector=managed, **page)
    if kind == "Pod":
        if namespace is None:
            return _core().list_pod_for_all_namespaces(label_selector=managed, **page)
        return _core().list_namespaced_pod(namespace, label_selector=managed, **page)
    raise ValueError(kind)


def list_pages(kind: str, namespace: str | None) -> Iterator[list[dict[str, Any]]]:
    """Every VisionFineTune, or every Job or pod of the operator, in a namespace (None: the cluster), one
    page at a time, in wire form."""
    token = ""
    while True:
        body = _json(_list_page(kind, namespace, token))
        yield body.get("items") or []
        token = (body.get("metadata") or {}).get("continue") or ""
        if not token:
            return


def job_events(namespace: str, job_name: str, uid: str) -> list[dict[str, Any]]:
    """The Events of one Job (this very object: an earlier Job of the same name has another uid)."""
    selector = f"involvedObject.kind=Job,involvedObject.name={job_name},involvedObject.uid={uid}"
    response = _core().list_namespaced_event(namespace, field_selector=selector, _preload_content=False)
    return _json(response).get("items") or []


def read_resource(namespace: str, name: str) -> dict[str, Any] | None:
    try:
        return _json(
            _custom().get_namespaced_custom_object(
                GROUP, VERSION, namespace, PLURAL, name, _preload_content=False
            )
        )
    except ApiException as err:
        if err.status == 404:
            return None
        raise


def patch_status(
    namespace: str,
    name: str,
    status: dict[str, Any],
    remove_progress: Literal["all"] | tuple[str, ...] = (),
    resource_version: str | None = None,
) -> dict[str, Any]:
    """A JSON merge patch of the status subresource with the operator's fields. ``progress`` belongs to the
    trainer (server-side applied): the patch never sets it. It only removes what no longer holds:
    ``remove_progress`` is "all" (a past attempt's report) or the names of fields to drop (the ETA of a run
    that is over), and then only at the ``resource_version`` it was read at, so that a report that came
    meanwhile is never lost (the conflict, 409, is retried)."""
    assert "progress" not in status, "status.progress belongs to the trainer"
    patch: dict[str, Any] = {"status": dict(status)}
    if remove_progress:
        patch["status"]["progress"] = None if remove_progress == "all" else dict.fromkeys(remove_progress)
        if resource_version:
            patch["metadata"] = {"resourceVersion": resource_version}
    return _json(
        _custom().patch_namespaced_custom_object_status(
            GROUP, VERSION, namespace, PLURAL, name, patch, **_MERGE
        )
    )


def delete_resource(namespace: str, name: str, uid: str) -> None:
    """Delete a resource (TTL), only if it is still the same object (uid precondition)."""
    body = kubernetes.client.V1DeleteOptions(preconditions=kubernetes.client.V1Preconditions(uid=uid))
    try:
        _custom().delete_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, name, body=body, propagation_policy="Background"
        )
    except ApiException as err:
        if err.status not in (404, 409):
            raise
