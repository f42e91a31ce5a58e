"""The Prefect `retrain` flow over `dvc repro <stage>` tasks, against a local Prefect server (`prefect server start`)."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import copy_tracked_files, set_params

pytestmark = pytest.mark.slow


def copy_repo(dest: Path) -> Path:
    """A git-initialised copy of the tracked files (the temp-copy pattern of test_dvc_pipeline.py)."""
    copy_tracked_files(dest)
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
    return dest


def run_flow_subprocess(repo: Path, server_env: dict, *args: str) -> subprocess.CompletedProcess:
    """Run the flow in a fresh interpreter against the session's Prefect server (conftest.prefect_server)."""
    env = dict(server_env, MLFLOW_TRACKING_URI=f"sqlite:///{repo / 'mlflow.db'}")
    return subprocess.run([sys.executable, str(Path(__file__).with_name("_retrain_driver.py")), str(repo), *args],
                          env=env, capture_output=True, text=True, timeout=900)


def result_of(proc) -> dict:
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    assert line, proc.stdout[-4000:] + proc.stderr[-4000:]
    return yaml.safe_load(line[-1][len("RESULT "):])


def test_retrain_completes_then_a_failing_stage_fails_the_flow_naming_it(tmp_path, prefect_server):
    repo = copy_repo(tmp_path / "repo")
    proc = run_flow_subprocess(repo, prefect_server, "pull,prepare,push")
    out = result_of(proc)
    assert out["state"] == "COMPLETED", proc.stdout[-4000:] + proc.stderr[-4000:]
    # every step ran; no remote configured: the syncs are skips, not failures
    assert out["result"]["steps"] == {"pull": "skipped", "prepare": "done", "push": "skipped"}
    outputs = out["result"]["outputs"]
    assert set(outputs) == {"data/prepared"} and all(outputs.values())
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    assert outputs["data/prepared"] == lock["prepare"]["outs"][0]["md5"]
    # every stage's MLflow run nests under the flow's run
    assert out["parent_runs"] == ["retrain"]
    assert out["nested_runs"] == ["prepare"]

    # prepare changes (it reruns), then degrade fails (its command reads a folder that is not there)
    set_params(repo / "params.yaml", {"prepare.crops_per_image": 2})
    dvc_yaml = (repo / "dvc.yaml").read_text()
    assert "--input data/prepared --out data/degraded" in dvc_yaml
    (repo / "dvc.yaml").write_text(dvc_yaml.replace("--input data/prepared --out data/degraded",
                                                    "--input data/no-such-folder --out data/degraded"))
    before = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    proc = run_flow_subprocess(repo, prefect_server, "prepare,degrade,encode")
    out = result_of(proc)
    assert out["state"] == "FAILED"
    assert "stage 'degrade' failed" in out["message"], out
    # what the earlier stage rebuilt in this run is still there and recorded
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    assert lock["prepare"]["outs"][0]["md5"] != outputs["data/prepared"]
    assert lock["prepare"]["params"]["params.yaml"]["prepare.crops_per_image"] == 2
    assert (repo / "data" / "prepared" / "index.json").is_file()
    assert lock["degrade"] == before["degrade"] and lock["encode"] == before["encode"]  # not rebuilt
    assert out["task_states"]["degrade"] == "FAILED" and "encode" not in out["task_states"]
    assert out["task_run_counts"]["degrade"] == 1  # no retry of a deterministic failure
