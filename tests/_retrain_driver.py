"""Runs the retrain flow once (for tests/test_retrain_flow.py) and prints one RESULT line of JSON."""

import json
import os
import sys

sys.path.insert(0, os.environ["PYTHONPATH"])
from pipelines.retrain import retrain  # noqa: E402


def main(repo: str, stages: str) -> None:
    from mlflow import MlflowClient
    from prefect.client.orchestration import get_client

    state = retrain(stages=stages.split(","), repo=repo, return_state=True)
    flow_run_id = state.state_details.flow_run_id
    with get_client(sync_client=True) as client:
        tasks = [t for t in client.read_task_runs() if t.flow_run_id == flow_run_id]
    out = {"state": state.type.value, "message": state.message or "", "flow_run_id": str(flow_run_id),
           "task_states": {t.name: t.state.type.value for t in tasks},
           "task_run_counts": {t.name: t.run_count for t in tasks}, "parent_runs": [], "nested_runs": []}
    if state.is_completed():
        out["result"] = state.result()
    mlflow = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    exp = mlflow.get_experiment_by_name("consissr")
    if exp is not None:
        runs = mlflow.search_runs([exp.experiment_id])
        out["parent_runs"] = sorted(r.data.tags["stage"] for r in runs if "mlflow.parentRunId" not in r.data.tags)
        out["nested_runs"] = sorted(r.data.tags["stage"] for r in runs if "mlflow.parentRunId" in r.data.tags)
    print("RESULT " + json.dumps(out, default=str))


if __name__ == "__main__":
    main(*sys.argv[1:])
