#!/usr/bin/env bash
# A local cluster to try VisionFT on, on this machine (README, "A local cluster"): the test control plane,
# a real node (kubelet, containerd, runc) for the operator and CPU trainer pods, kwok's fake GPU nodes and an
# S3 server. Prints a kubeconfig and what to run; Ctrl-C stops it.
#
#   scripts/dev-cluster.sh [--install] [--gpu-nodes N] [--dir DIR]
#
# Needs root and what README command 1 sets up (the binaries of hack/build-test-cluster.sh and the images of
# hack/build-images.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/python -m tests.harness.dev_cluster "$@"
