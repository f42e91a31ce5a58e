"""The Prefect `retrain` flow over `dvc repro <stage>` tasks, against a local (ephemeral) Prefect API."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import REPO, SHORT_TRAINING, copy_tracked_files, set_params

pytestmark = pytest.mark.slow


def copy_repo(dest: Path) -> Path:
    """A git-initialised copy of the tracked files (the temp-copy pattern of test_dvc_pipeline.py)."""
    copy_tracked_files(dest)
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
    return dest


def run_flow_subprocess(repo: Path, home: Path, *args: str) -> subprocess.CompletedProcess:
    """Run the flow in a fresh interpreter (its own ephemeral Prefect server under PREFECT_HOME=home)."""
    env = dict(os.environ, PREFECT_HOME=str(home), PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="180",
               PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_API_URL="", PREFECT_LOGGING_LEVEL="INFO",
               PYTHONPATH=str(REPO), MLFLOW_TRACKING_URI=f"sqlite:///{repo / 'mlflow.db'}",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    env.pop("PREFECT_API_URL")
    return subprocess.run([sys.executable, str(Path(__file__).with_name("_retrain_driver.py")), str(repo), *args],
                          env=env, capture_output=True, text=True, timeout=900)


def result_of(proc) -> dict:
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    assert line, proc.stdout[-4000:] + proc.stderr[-4000:]
    return yaml.safe_load(line[-1][len("RESULT "):])


def test_retrain_completes_then_a_failing_stage_fails_the_flow_naming_it(tmp_path):
    repo = copy_repo(tmp_path / "repo")
    set_params(repo / "params.yaml", SHORT_TRAINING)
    home = tmp_path / "prefect"
    proc = run_flow_subprocess(repo, home, "pull,backbone,prepare,push")
    out = result_of(proc)
    assert out["state"] == "COMPLETED", proc.stdout[-4000:] + proc.stderr[-4000:]
    # every step ran; no remote configured: the syncs are skips, not failures
    assert out["result"]["steps"] == {"pull": "skipped", "backbone": "done", "prepare": "done", "push": "skipped"}
    outputs = out["result"]["outputs"]
    assert set(outputs) == {"data/models/backbone", "data/prepared"} and all(outputs.values())
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    assert outputs["data/prepared"] == lock["prepare"]["outs"][0]["md5"]
    # the stages' MLflow runs nest under the flow's run (prepare logs none: check the parent exists)
    assert out["parent_runs"] == ["retrain"]

    # prepare changes (it reruns), then degrade fails (its command reads a folder that is not there)
    set_params(repo / "params.yaml", {"prepare.crops_per_image": 2})
    dvc_yaml = (repo / "dvc.yaml").read_text()
    assert "--input data/prepared --out data/degraded" in dvc_yaml
    (repo / "dvc.yaml").write_text(dvc_yaml.replace("--input data/prepared --out data/degraded",
                                                    "--input data/no-such-folder --out data/degraded"))
    before = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    proc = run_flow_subprocess(repo, home, "backbone,prepare,degrade,encode")
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
