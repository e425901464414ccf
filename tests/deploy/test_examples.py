"""The examples (examples/*.yaml) and the GitOps manifests (deploy/), offline.

Each example must be a VisionFineTune that the pydantic model accepts (the apiserver's side, the literal
`kubectl apply -f examples/`, is in test_cluster.py), must not pin a namespace (so `kubectl apply -n NS`
works), and, when it reads S3, must name a Secret whose placeholder manifest (examples/secrets/, out of
reach of `kubectl apply -f examples/`) and `kubectl create secret` command are documented. The quickstart
needs neither: its sources are generated and it runs on CPU.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from visionft_api import API_VERSION, KIND, VisionFineTuneSpec
from visionft_api.recipe import is_builtin

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples"
SECRETS = EXAMPLES / "secrets"
EXAMPLE_FILES = sorted(EXAMPLES.glob("*.yaml"))
BUILTIN_EXAMPLES = ("quickstart", "preference-quickstart")  # generated model and data: no bucket
S3_EXAMPLE_FILES = [
    path
    for path in EXAMPLE_FILES
    if VisionFineTuneSpec.model_validate(yaml.safe_load(path.read_text())["spec"]).uses_s3()
]


def documents(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def test_the_promised_examples_exist() -> None:
    names = {path.stem for path in EXAMPLE_FILES}
    assert {
        "quickstart",
        "preference-quickstart",
        "latex-ocr",
        "radiology-captioning",
        "multi-gpu",
        "kueue-queue",
        "suspended",
        "shape-captions",
        "receipt-fields",
    } <= names


@pytest.mark.parametrize("path", EXAMPLE_FILES, ids=lambda p: p.name)
def test_example_is_a_valid_visionfinetune(path: Path) -> None:
    docs = documents(path)
    assert len(docs) == 1
    (doc,) = docs
    assert doc["apiVersion"] == API_VERSION
    assert doc["kind"] == KIND
    assert "namespace" not in doc["metadata"], "leave the namespace to `kubectl apply -n`"
    VisionFineTuneSpec.model_validate(doc["spec"])


@pytest.mark.parametrize("path", S3_EXAMPLE_FILES, ids=lambda p: p.name)
def test_example_secret_is_documented_with_placeholders(path: Path) -> None:
    spec = documents(path)[0]["spec"]
    secret = spec.get("storage", {}).get("credentialsSecret")
    assert secret, "every example names its credentials Secret"
    assert f"kubectl create secret generic {secret}" in path.read_text()
    manifest = SECRETS / f"{secret}.yaml"
    assert manifest.exists(), f"{manifest.relative_to(REPO)} (placeholder Secret) is missing"
    (doc,) = documents(manifest)
    assert doc["kind"] == "Secret"
    assert doc["metadata"]["name"] == secret
    data = doc["stringData"]
    assert set(data) == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
    assert all(value.startswith("REPLACE-ME") for value in data.values())


def test_examples_cover_multi_gpu_kueue_and_suspend() -> None:
    specs = {path.stem: documents(path)[0]["spec"] for path in EXAMPLE_FILES}
    assert specs["multi-gpu"]["resources"]["nodes"] > 1
    assert specs["multi-gpu"]["resources"]["gpusPerNode"] > 1
    assert specs["kueue-queue"]["queueName"]
    assert specs["suspended"]["suspend"] is True


@pytest.mark.parametrize("name", BUILTIN_EXAMPLES)
def test_the_quickstarts_need_no_bucket_secret_or_gpu(name: str) -> None:
    (doc,) = documents(EXAMPLES / f"{name}.yaml")
    assert doc["metadata"]["name"] == name
    spec = VisionFineTuneSpec.model_validate(doc["spec"])
    assert is_builtin(spec.model.uri) and is_builtin(spec.dataset.uri)
    assert spec.output is None and not spec.uses_s3() and spec.storage.credentials_secret is None
    assert spec.resources.gpus_per_node == 0 and not spec.model.load_in_4bit  # 4-bit needs a GPU
    if name == "preference-quickstart":  # scored by preference accuracy before and after
        assert spec.method == "dpo" and spec.dataset.uri == "builtin://shapes-preference"
        assert spec.dataset.eval_samples > 0
    else:
        assert (
            spec.evaluation is not None and spec.evaluation.samples == 100
        )  # scored before, during and after


def test_the_harder_generated_task_keeps_and_publishes_its_best_checkpoint() -> None:
    (doc,) = documents(EXAMPLES / "shape-captions.yaml")
    spec = VisionFineTuneSpec.model_validate(doc["spec"])
    assert spec.dataset.uri == "builtin://shape-captions" and not spec.uses_s3()
    assert spec.evaluation is not None and spec.evaluation.headline == "cer"
    assert spec.evaluation.keep_best is not None and spec.evaluation.keep_best.use_for_output


def test_each_kind_of_task_is_scored_by_its_metrics() -> None:
    headline = {}
    for path in EXAMPLE_FILES:
        spec = VisionFineTuneSpec.model_validate(documents(path)[0]["spec"])
        if spec.evaluation is not None:
            headline[path.stem] = spec.evaluation.metrics
    assert headline["quickstart"][0] == "exactMatch"  # a colour name
    assert headline["latex-ocr"][0] == "cer"  # transcription
    assert headline["radiology-captioning"][:2] == ["rougeL", "bleu"]  # captioning
    assert headline["receipt-fields"][:2] == ["jsonFieldMatch", "jsonValidity"]  # structured answers


def test_the_tracking_token_is_documented_with_a_placeholder() -> None:
    (doc,) = documents(EXAMPLES / "latex-ocr.yaml")
    mlflow = VisionFineTuneSpec.model_validate(doc["spec"]).tracking.mlflow  # type: ignore[union-attr]
    assert mlflow is not None and mlflow.token_secret == "mlflow-token"
    assert "kubectl create secret generic mlflow-token" in (EXAMPLES / "latex-ocr.yaml").read_text()
    (secret,) = documents(SECRETS / "mlflow-token.yaml")
    assert secret["stringData"] == {"MLFLOW_TRACKING_TOKEN": "REPLACE-ME-mlflow-token"}


def test_example_folder_holds_only_resources() -> None:
    # `kubectl apply -f examples/` reads the .yaml, .yml and .json files of the folder (not of its
    # subfolders): they must be Kubernetes objects, and none of them a placeholder Secret.
    for path in EXAMPLES.iterdir():
        if path.is_file() and path.suffix in {".yaml", ".yml", ".json"}:
            for doc in documents(path):
                assert {"apiVersion", "kind", "metadata"} <= set(doc), path.name
                assert doc["kind"] == KIND, f"{path.name}: only VisionFineTunes belong in examples/"
    assert sorted(p.name for p in SECRETS.iterdir()) == [
        "latex-ocr-s3.yaml",
        "mlflow-token.yaml",
        "radiology-s3.yaml",
    ]
    # Flux reads a Kustomization's folder recursively: examples/.sourceignore keeps secrets/ out of it.
    ignored = (EXAMPLES / ".sourceignore").read_text().split("\n")
    assert "secrets/" in ignored


def test_gitops_manifests_point_at_the_repo_paths() -> None:
    app = documents(REPO / "deploy" / "argocd" / "application.yaml")
    kinds = {doc["kind"] for doc in app}
    assert kinds == {"Application"}
    paths = {doc["spec"]["source"].get("path") for doc in app}
    assert "charts/visionft" in paths
    for doc in app:
        path = doc["spec"]["source"].get("path")
        assert (REPO / path).is_dir(), path
    flux = documents(REPO / "deploy" / "flux" / "kustomization.yaml")
    by_kind: dict[str, list[dict]] = {}
    for doc in flux:
        by_kind.setdefault(doc["kind"], []).append(doc)
    assert "GitRepository" in by_kind and "Kustomization" in by_kind
    for kustomization in by_kind["Kustomization"]:
        assert (REPO / kustomization["spec"]["path"].lstrip("./")).is_dir()
