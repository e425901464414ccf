#!/usr/bin/env bash
# Install the MLflow tracking server that the tracking tests start, into its own virtual environment.
#
#   hack/install-mlflow-server.sh          # install when missing or at another version
#
# Output: .cache/mlflow-server/ (a venv with `mlflow server` and boto3 for artifacts on S3), and a stamp
# .cache/mlflow-server/.visionft-version naming what it was built from. The server has a venv of its own
# because its wheel pins pyarrow below the version the project's environment pins (constraints.txt); the
# trainer talks to it over HTTP only (visionft.tracking.mlflow), so nothing of it enters the project's
# environment. hack/mlflow-server-constraints.txt pins every package of this venv.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VISIONFT_MLFLOW_VENV:-$ROOT/.cache/mlflow-server}"
CONSTRAINTS="$ROOT/hack/mlflow-server-constraints.txt"
PYTHON="${PYTHON:-python3}"
STAMP="$VENV/.visionft-version"
WANT="$(sha256sum "$CONSTRAINTS" | cut -c1-16)"

if [ -x "$VENV/bin/mlflow" ] && [ "$(cat "$STAMP" 2>/dev/null)" = "$WANT" ]; then
  exit 0
fi
printf '[install-mlflow-server] installing the MLflow server into %s\n' "$VENV" >&2
rm -rf "$VENV"
"$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --disable-pip-version-check -c "$CONSTRAINTS" mlflow boto3
echo "$WANT" > "$STAMP"
