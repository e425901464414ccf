"""Reads one MLflow run back with MLflow's own client and prints it as JSON (run by tests/harness/mlflow_server.py
in the MLflow server's venv, so it imports nothing of the project).

    python mlflow_read.py TRACKING_URI EXPERIMENT RUN_NAME DOWNLOAD_DIR
"""

from __future__ import annotations

import json
import sys

from mlflow.tracking import MlflowClient


def _artifacts(client: MlflowClient, run_id: str, path: str | None = None) -> list[str]:
    out = []
    for item in client.list_artifacts(run_id, path):
        if item.is_dir:
            out += _artifacts(client, run_id, item.path)
        else:
            out.append(item.path)
    return out


def main() -> None:
    uri, experiment_name, run_name, download = sys.argv[1:5]
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name(experiment_name)
    if experiment is None:
        raise SystemExit(f"no experiment {experiment_name}")
    runs = client.search_runs([experiment.experiment_id], filter_string=f"attributes.run_name = '{run_name}'")
    if len(runs) != 1:
        raise SystemExit(f"{len(runs)} runs named {run_name}")
    run = runs[0]
    run_id = run.info.run_id
    history = {
        key: [(m.step, m.value) for m in client.get_metric_history(run_id, key)] for key in run.data.metrics
    }
    files = sorted(_artifacts(client, run_id))
    client.download_artifacts(run_id, "", download)
    print(
        json.dumps(
            {
                "run_id": run_id,
                "status": run.info.status,
                "artifact_uri": run.info.artifact_uri,
                "params": run.data.params,
                "tags": run.data.tags,
                "metrics": history,
                "artifacts": files,
            }
        )
    )


if __name__ == "__main__":
    main()
