#!/usr/bin/env bash
# README command 2: all linters and all tests, on the real components (the test control plane and the S3
# server are started by the test suite itself). Extra arguments go to pytest, e.g. `scripts/test.sh -k crd`.
set -uo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH"
# Kernel tests run the Triton kernels on CPU through the interpreter; see tests/kernels/conftest.py.
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

status=0
run() { printf '\n==> %s\n' "$*"; "$@" || status=1; }

run ruff check .
run ruff format --check .
run mypy api/visionft_api operator/visionft_operator
run hadolint Dockerfile.operator Dockerfile.trainer

printf '\n==> pytest\n'
pytest "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
  # Exit code 5 means pytest collected no tests: for this project that is a broken suite, never a pass.
  echo "pytest collected no tests (exit 5): failing, since the suite must never be empty" >&2
  rc=1
fi
[ "$rc" -ne 0 ] && status=1
exit "$status"
