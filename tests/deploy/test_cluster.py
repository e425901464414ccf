"""The chart and the examples on the real control plane (etcd + kube-apiserver with RBAC, from
tests/harness): rendered manifests pass a server-side dry-run and then apply for real, the operator's
ServiceAccount can do everything the operator code needs and nothing more (`kubectl auth can-i`), and the
literal `kubectl apply -f examples/` creates every example, each accepted by the CRD's schema and CEL rules.

Each chart scenario gets its own release name and namespace, so the scenarios don't share RBAC objects.
"""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml
from visionft_operator import children

from tests.deploy.helm import CHART, SCENARIOS, helm, require_helm
from tests.deploy.permissions import required_permissions
from tests.deploy.test_rbac import trainer_grants
from tests.harness.kube import ControlPlane, find_kubectl

pytestmark = pytest.mark.cluster

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples"
SUFFIX = uuid.uuid4().hex[:5]
WATCHED = (f"pkg-a-{SUFFIX}", f"pkg-b-{SUFFIX}")
UNWATCHED = f"pkg-other-{SUFFIX}"

# What the operator must never be able to do, in any namespace it serves.
FORBIDDEN = [
    ["get", "secrets"],
    ["list", "secrets"],
    ["watch", "secrets"],
    ["*", "*"],
    ["create", "pods"],
    ["delete", "pods"],
    ["create", "pods/exec"],
    ["create", "clusterrolebindings.rbac.authorization.k8s.io"],
    ["create", "clusterroles.rbac.authorization.k8s.io"],
    ["escalate", "roles.rbac.authorization.k8s.io"],
    ["bind", "clusterroles.rbac.authorization.k8s.io"],
    ["impersonate", "serviceaccounts"],
    ["delete", "namespaces"],
    ["patch", "nodes"],
    ["update", "customresourcedefinitions.apiextensions.k8s.io"],
    # GitOps: what Git owns (spec, labels, annotations) is out of the operator's reach; only status is not.
    ["patch", "visionfinetunes.visionft.io"],
    ["update", "visionfinetunes.visionft.io"],
]


class Kubectl:
    """kubectl against the test control plane, as its admin; `can_i` asks as another subject."""

    def __init__(self, kubeconfig: Path) -> None:
        self.kubeconfig = kubeconfig

    def __call__(
        self, *args: str, check: bool = True, stdin: str | None = None, cwd: Path | None = None
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [str(find_kubectl()), f"--kubeconfig={self.kubeconfig}", *args],
            input=stdin,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
            cwd=cwd,
        )
        if check and result.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
        return result

    def can_i(self, subject: str, namespace: str, *args: str) -> bool:
        result = self("auth", "can-i", *args, f"--as={subject}", "-n", namespace, check=False)
        answer = result.stdout.strip()
        assert answer in {"yes", "no"}, f"can-i {args}: {result.stdout} {result.stderr}"
        return answer == "yes"

    def denied(self, subject: str, namespace: str, questions: list[list[str]]) -> list[list[str]]:
        """The questions (can-i argument lists) whose answer is "no"; asked a few at a time."""
        with ThreadPoolExecutor(max_workers=4) as pool:
            answers = list(pool.map(lambda args: self.can_i(subject, namespace, *args), questions))
        return [args for args, yes in zip(questions, answers) if not yes]

    def allowed(self, subject: str, namespace: str, questions: list[list[str]]) -> list[list[str]]:
        """The questions whose answer is "yes"."""
        no = self.denied(subject, namespace, questions)
        return [args for args in questions if args not in no]


@pytest.fixture(scope="module")
def kubectl(control_plane: ControlPlane) -> Iterator[Kubectl]:
    require_helm()
    k = Kubectl(control_plane.kubeconfig)
    for namespace in (*WATCHED, UNWATCHED):
        k("create", "namespace", namespace)
    # The CRDs of the chart (VisionFineTune, Kopf peering), and a stand-in for the Prometheus Operator's
    # ServiceMonitor CRD, which the monitoring scenario renders.
    k("apply", "--server-side", "--force-conflicts", "-f", str(CHART / "crds"))
    k("apply", "--server-side", "-f", "-", stdin=_SERVICE_MONITOR_CRD)
    for crd in (
        "visionfinetunes.visionft.io",
        "kopfpeerings.kopf.dev",
        "servicemonitors.monitoring.coreos.com",
    ):
        k("wait", "--for=condition=Established", f"crd/{crd}", "--timeout=60s")
    yield k
    releases = [_release(scenario)[0] for scenario in SCENARIOS]
    selector = f"app.kubernetes.io/instance in ({','.join(releases)})"
    k(
        "delete",
        "clusterrole,clusterrolebinding,clusterkopfpeering",
        "-l",
        selector,
        "--wait=false",
        check=False,
    )
    for namespace in (*WATCHED, UNWATCHED, *releases):
        k("delete", "namespace", namespace, "--wait=false", check=False)


def _release(scenario: str) -> tuple[str, str]:
    """Release name and namespace of a scenario."""
    name = f"p{SUFFIX}-{scenario}"[:40]
    return name, name


def _install(kubectl: Kubectl, scenario: str) -> tuple[str, str]:
    """Apply a scenario's rendered manifests: a server-side dry-run first, then for real."""
    release, namespace = _release(scenario)
    kubectl("create", "namespace", namespace, check=False)
    rendered = _render_release(scenario)
    dry = kubectl(
        "apply", "--server-side", "--dry-run=server", "--validate=strict", "-f", "-", stdin=rendered
    )
    assert "serverside-applied (server dry run)" in dry.stdout
    kubectl("apply", "--server-side", "--validate=strict", "-f", "-", stdin=rendered)
    return release, namespace


def _render_release(scenario: str) -> str:
    release, namespace = _release(scenario)
    extra = ["--namespace", namespace]
    if "namespaced" in scenario:
        extra += ["--set", f"operator.watchNamespaces={{{','.join(WATCHED)}}}"]
    if "peering" in scenario:
        extra += ["--set", f"peering.name={release}"]
    return helm("template", release, str(CHART), *SCENARIOS[scenario], *extra).stdout


def _service_account(release: str, namespace: str) -> str:
    return f"system:serviceaccount:{namespace}:{release}-visionft"


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_rendered_chart_applies(kubectl: Kubectl, scenario: str) -> None:
    release, namespace = _install(kubectl, scenario)
    deployments = kubectl("get", "deployments", "-n", namespace, "-o", "name").stdout.split()
    assert deployments == [f"deployment.apps/{release}-visionft"]


def _needed() -> tuple[list[list[str]], dict[str, str]]:
    """can-i questions for every permission the operator code needs, and why each is needed."""
    permissions = [*required_permissions(), *trainer_grants()]
    return [p.can_i_args() for p in permissions], {" ".join(p.can_i_args()): p.why for p in permissions}


def test_cluster_wide_service_account_can_do_what_the_code_needs(kubectl: Kubectl) -> None:
    release, namespace = _install(kubectl, "default")
    subject = _service_account(release, namespace)
    questions, why = _needed()
    questions.append(["list", "customresourcedefinitions.apiextensions.k8s.io"])
    for target in (WATCHED[0], UNWATCHED):
        denied = kubectl.denied(subject, target, questions)
        assert not denied, [f"{' '.join(a)} in {target}: {why.get(' '.join(a), 'Kopf')}" for a in denied]


def test_cluster_wide_service_account_can_do_no_more(kubectl: Kubectl) -> None:
    release, namespace = _install(kubectl, "default")
    subject = _service_account(release, namespace)
    for target in (WATCHED[0], namespace, "kube-system"):
        allowed = kubectl.allowed(subject, target, FORBIDDEN)
        assert not allowed, f"{subject} may {allowed} in {target}"


def test_namespaced_service_account_is_confined_to_its_namespaces(kubectl: Kubectl) -> None:
    release, namespace = _install(kubectl, "namespaced")
    subject = _service_account(release, namespace)
    questions, why = _needed()
    for target in WATCHED:
        denied = kubectl.denied(subject, target, questions)
        assert not denied, [f"{' '.join(a)} in {target}: {why[' '.join(a)]}" for a in denied]
        allowed = kubectl.allowed(subject, target, FORBIDDEN)
        assert not allowed, f"{subject} may {allowed} in {target}"
    outside = [["list", "visionfinetunes.visionft.io"], ["create", "jobs.batch"], ["create", "configmaps"]]
    allowed = kubectl.allowed(subject, UNWATCHED, outside)
    assert not allowed, f"{subject} may {allowed} in {UNWATCHED}, which it does not watch"


def test_operator_may_create_the_trainer_role_and_binding(kubectl: Kubectl) -> None:
    # RBAC escalation prevention: creating the per-run Role needs the operator to hold what it grants.
    release, namespace = _install(kubectl, "namespaced")
    subject = _service_account(release, namespace)
    owner = children.Owner(namespace=WATCHED[0], name="escalation-check", uid=str(uuid.uuid4()))
    # For real, as the operator: the RoleBinding's escalation check needs the Role to exist.
    for obj in (children.role(owner), children.role_binding(owner)):
        obj["metadata"].pop("ownerReferences")
        kubectl("create", f"--as={subject}", "-f", "-", stdin=yaml.safe_dump(obj))
    for kind in ("rolebinding", "role"):
        kubectl("delete", kind, "escalation-check-trainer", "-n", WATCHED[0], f"--as={subject}")


def test_examples_apply_and_are_accepted_by_the_crd(kubectl: Kubectl) -> None:
    namespace = WATCHED[1]
    files = sorted(EXAMPLES.glob("*.yaml"))
    assert "quickstart.yaml" in {p.name for p in files}
    for path in files:
        # Strict field validation, server side: an unknown or misspelled field fails instead of being pruned.
        dry = kubectl("apply", "--dry-run=server", "--validate=strict", "-n", namespace, "-f", str(path))
        assert "(server dry run)" in dry.stdout, dry.stdout
    # The literal command of the README, from the repository root (kubectl's default validation is strict).
    result = kubectl("apply", "-f", "examples/", "-n", namespace, cwd=REPO)
    expected = {yaml.safe_load(p.read_text())["metadata"]["name"] for p in files}
    created = {line.split()[0] for line in result.stdout.splitlines() if line.endswith(" created")}
    assert created == {f"visionfinetune.visionft.io/{name}" for name in expected}, result.stdout
    assert not result.stderr.strip(), result.stderr  # no warning (e.g. an unknown field dropped)
    names = kubectl("get", "vft", "-n", namespace, "-o", "jsonpath={.items[*].metadata.name}").stdout.split()
    assert set(names) == expected
    # What the apiserver stored is what the files say (nothing pruned), with its defaults filled in.
    stored = yaml.safe_load(kubectl("get", "vft", "quickstart", "-n", namespace, "-o", "yaml").stdout)
    assert stored["spec"]["model"]["uri"] == "builtin://tiny-qwen2-vl"
    assert stored["spec"]["evaluation"]["samples"] == 100
    assert stored["spec"]["evaluation"]["split"] == "auto"  # a default the apiserver filled in
    assert stored["spec"]["resources"]["gpusPerNode"] == 0 and "output" not in stored["spec"]
    # The placeholder Secrets live in a subfolder that `kubectl apply -f examples/` does not read...
    secrets = kubectl("get", "secrets", "-n", namespace, "-o", "name").stdout.split()
    assert not [s for s in secrets if s.endswith(("-s3", "-token"))], secrets
    # ...and are valid Secrets when applied on purpose.
    placed = kubectl("apply", "--validate=strict", "-n", namespace, "-f", str(EXAMPLES / "secrets"))
    assert placed.stdout.count("secret/") == 3, placed.stdout


_SERVICE_MONITOR_CRD = """
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: servicemonitors.monitoring.coreos.com
spec:
  group: monitoring.coreos.com
  scope: Namespaced
  names: {kind: ServiceMonitor, listKind: ServiceMonitorList, plural: servicemonitors, singular: servicemonitor}
  versions:
    - name: v1
      served: true
      storage: true
      schema:
        openAPIV3Schema:
          type: object
          properties:
            spec: {type: object, x-kubernetes-preserve-unknown-fields: true}
"""


def test_helm_install_and_uninstall(kubectl: Kubectl) -> None:
    release = f"p{SUFFIX}-helm"
    common = ["--namespace", release, f"--kubeconfig={kubectl.kubeconfig}"]
    installed = helm("install", release, str(CHART), "--create-namespace", *common)
    assert "STATUS: deployed" in installed.stdout
    # NOTES.txt: a first job that needs no bucket or GPU, then a real fine-tune.
    assert "kubectl apply -n team-a -f examples/quickstart.yaml" in installed.stdout
    assert "kubectl apply -n team-a -f examples/latex-ocr.yaml" in installed.stdout
    assert kubectl("get", "deployment", f"{release}-visionft", "-n", release).returncode == 0
    helm("uninstall", release, "--wait", *common)
    assert kubectl("get", "clusterrole", f"{release}-visionft", check=False).returncode != 0


def test_operator_runs_under_the_charts_service_account(
    kubectl: Kubectl, control_plane: ControlPlane, tmp_path: Path
) -> None:
    """The real operator, authenticated with a token of the chart's ServiceAccount (namespaced mode),
    reconciles an example into a Job without a single Forbidden, and writes nothing that Git owns."""
    from tests.operator.kube import OperatorProcess, wait_for

    release, namespace = _install(kubectl, "namespaced")
    identity = control_plane.as_service_account(namespace, f"{release}-visionft", create=False)
    target = WATCHED[0]
    kubectl("apply", "-n", target, "-f", str(EXAMPLES / "secrets" / "latex-ocr-s3.yaml"))
    operator = OperatorProcess(str(identity.kubeconfig), [target], tmp_path / "operator.log").start()
    try:
        kubectl("apply", "--server-side", "-n", target, "-f", str(EXAMPLES / "latex-ocr.yaml"))

        def reconciled() -> bool:
            vft = yaml.safe_load(kubectl("get", "vft", "latex-ocr", "-n", target, "-o", "yaml").stdout)
            job = kubectl("get", "jobs", "-n", target, "-l", "visionft.io/name=latex-ocr", "-o", "name")
            return bool(vft.get("status", {}).get("phase")) and bool(job.stdout.strip())

        try:
            wait_for(
                reconciled, timeout=60, what="the operator to reconcile latex-ocr under its ServiceAccount"
            )
        except TimeoutError as err:
            raise AssertionError(f"{err}; operator log:\n{operator.logs()[-6000:]}") from None
    finally:
        operator.stop()
    log = operator.logs()
    assert "Forbidden" not in log and " 403" not in log, log[-4000:]
    vft = yaml.safe_load(
        kubectl("get", "vft", "latex-ocr", "-n", target, "-o", "yaml", "--show-managed-fields").stdout
    )
    for entry in vft["metadata"]["managedFields"]:
        if entry["manager"] != "kubectl":
            # Only status is written by anyone but the user (Git): no drift for Argo CD or Flux.
            assert entry.get("subresource") == "status", entry
    kubectl("delete", "vft", "latex-ocr", "-n", target, "--wait=false")


def test_operator_pod_meets_pod_security_restricted(kubectl: Kubectl) -> None:
    # The apiserver's PodSecurity admission enforces the "restricted" standard on the operator's pod.
    _release_name, namespace = _install(kubectl, "default")
    label = "pod-security.kubernetes.io/enforce"
    kubectl("label", "namespace", namespace, f"{label}=restricted", "--overwrite")
    try:
        docs = [d for d in yaml.safe_load_all(_render_release("default")) if d]
        (deployment,) = [d for d in docs if d["kind"] == "Deployment"]
        spec = deployment["spec"]["template"]["spec"]
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "operator-psa-check"}, "spec": spec}
        result = kubectl(
            "create", "--dry-run=server", "-n", namespace, "-f", "-", stdin=yaml.safe_dump(pod), check=False
        )
        assert result.returncode == 0, result.stderr
        # Guard: without the chart's securityContext, the same pod is refused (admission is really on).
        bare = {**pod, "spec": {**spec, "securityContext": {}}}
        bare["spec"]["containers"] = [{**c, "securityContext": {}} for c in spec["containers"]]
        refused = kubectl(
            "create", "--dry-run=server", "-n", namespace, "-f", "-", stdin=yaml.safe_dump(bare), check=False
        )
        assert "violates PodSecurity" in refused.stderr, refused.stderr
    finally:
        kubectl("label", "namespace", namespace, f"{label}-")
