"""MLflow run provenance (consissr/tracking.py): nesting under the flow's run, git commit, dvc.lock input hashes, profile."""

import json
import subprocess

import pytest
import yaml
from conftest import REPO

from consissr import cli, tracking


@pytest.fixture
def store(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    for name in ("MLFLOW_PARENT_RUN_ID", "CONSISSR_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    from mlflow import MlflowClient

    return MlflowClient(uri, registry_uri=uri)


def test_stage_run_under_the_flow_run_is_nested_with_commit_input_hash_and_profile(store, monkeypatch):
    with tracking.start_run("retrain", params={"stages": ["prepare"]}) as parent:
        # what the flow hands its `dvc repro` subprocesses (pipelines/retrain.py _stage_env)
        monkeypatch.setenv("MLFLOW_PARENT_RUN_ID", parent.run_id)
        monkeypatch.setenv("CONSISSR_PROFILE", "paper")
        with tracking.start_run("degrade", params={"degrade": {"scale": 4}}, root=REPO,
                                inputs={"prepared": REPO / "data" / "prepared"}) as child:
            pass
    tags = store.get_run(child.run_id).data.tags
    assert tags["mlflow.parentRunId"] == parent.run_id
    assert "mlflow.parentRunId" not in store.get_run(parent.run_id).data.tags
    assert tags["profile"] == "paper" and tags["stage"] == "degrade"
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    assert tags["git_commit"] == head and tags["mlflow.source.git.commit"] == head
    lock = yaml.safe_load((REPO / "dvc.lock").read_text())["stages"]
    assert tags["input.prepared.hash"] == "md5:" + lock["prepare"]["outs"][0]["md5"]


def test_an_explicit_parent_wins_and_no_parent_means_a_top_level_run(store, monkeypatch):
    monkeypatch.setenv("MLFLOW_PARENT_RUN_ID", "0" * 32)
    with tracking.start_run("retrain", params={}, parent_run_id=None) as flow, \
            tracking.start_run("promote", params={}, parent_run_id="f" * 32) as explicit:
        pass
    assert store.get_run(flow.run_id).data.tags["mlflow.parentRunId"] == "0" * 32  # the environment's
    assert store.get_run(explicit.run_id).data.tags["mlflow.parentRunId"] == "f" * 32
    monkeypatch.delenv("MLFLOW_PARENT_RUN_ID")
    with tracking.start_run("evaluate", params={}) as alone:
        pass
    assert "mlflow.parentRunId" not in store.get_run(alone.run_id).data.tags and \
        "profile" not in store.get_run(alone.run_id).data.tags


@pytest.mark.parametrize("params_file, profile", [("params.yaml", "embedded"), ("configs/paper.yaml", "paper")])
def test_the_cli_sets_the_profile_of_the_stage_runs_from_its_params(params_file, profile, monkeypatch):
    monkeypatch.delenv("CONSISSR_PROFILE", raising=False)
    seen = []
    monkeypatch.setattr(cli, "run_prepare", lambda params, args: seen.append(cli.os.environ["CONSISSR_PROFILE"]))
    assert cli.main(["prepare", "--params", str(REPO / params_file)]) == 0
    assert seen == [profile]
    # the flow's own value stands (it passes its `profile` parameter down)
    monkeypatch.setenv("CONSISSR_PROFILE", "flow-given")
    cli.main(["prepare", "--params", str(REPO / params_file)])
    assert seen[-1] == "flow-given"


def test_consissr_promote_under_a_parent_nests_and_prints_the_decision(store, tmp_path, monkeypatch, capsys):
    (tmp_path / "cfg.yaml").write_text(
        "promote:\n  model_name: consissr-cli\n  alias: champion\n  rules:\n"
        "    - {dataset: embedded, file: metrics/embedded.json, key: methods.full.psnr.mean, direction: max}\n")
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics" / "embedded.json").write_text(json.dumps({"methods": {"full": {"psnr": {"mean": 21.5}}}}))
    (tmp_path / "pipeline").mkdir()
    (tmp_path / "pipeline" / "model_index.json").write_text("{}")
    monkeypatch.chdir(tmp_path)
    with tracking.start_run("retrain", params={}) as parent:
        monkeypatch.setenv("MLFLOW_PARENT_RUN_ID", parent.run_id)
        assert cli.main(["promote", "--config", "cfg.yaml", "--model-dir", "pipeline"]) == 0
    assert "version 1: promoted (no champion yet)" in capsys.readouterr().out
    runs = store.search_runs([store.get_experiment_by_name("consissr").experiment_id],
                             filter_string="attributes.run_name = 'promote'")
    assert len(runs) == 1 and runs[0].data.tags["mlflow.parentRunId"] == parent.run_id
    assert runs[0].data.tags["input.metrics.embedded.hash"].startswith("sha256:")  # no dvc.lock here: the file
