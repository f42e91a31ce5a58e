"""MLflow run provenance (consissr/tracking.py): nesting under the flow's run, git commit, dvc.lock input hashes,
profile; run names, datasets, source tags and the experiment's kind."""

import hashlib
import json
import re
import subprocess

import pytest
import yaml
from conftest import REPO

from consissr import cli, tracking
from consissr.config import STAGE_PARAMS, EvaluateParams, TrainSdsrParams, load_params, section


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
def test_the_cli_sets_the_profile_of_the_stage_runs_from_its_params(params_file, profile, store, monkeypatch, tmp_path):
    monkeypatch.delenv("CONSISSR_PROFILE", raising=False)
    seen = []
    monkeypatch.setattr(cli, "run_prepare", lambda params, args: seen.append(cli.os.environ["CONSISSR_PROFILE"]))
    assert cli.main(["prepare", "--params", str(REPO / params_file), "--out", str(tmp_path / "p")]) == 0
    assert seen == [profile]
    # the flow's own value stands (it passes its `profile` parameter down)
    monkeypatch.setenv("CONSISSR_PROFILE", "flow-given")
    cli.main(["prepare", "--params", str(REPO / params_file), "--out", str(tmp_path / "p")])
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
                             filter_string="tags.stage = 'promote'")
    assert len(runs) == 1 and runs[0].data.tags["mlflow.parentRunId"] == parent.run_id
    assert runs[0].data.tags["input.metrics.embedded.hash"].startswith("sha256:")  # no dvc.lock here: the file


def test_a_data_stage_command_is_a_run_with_its_params_and_report(store, tmp_path):
    """prepare's code logs nothing itself: the CLI's run holds its params, its counts and report.json."""
    out = tmp_path / "prepared"
    assert cli.main(["prepare", "--params", str(REPO / "params.yaml"), "--set", "prepare.crops_per_image=1",
                     "--out", str(out)]) == 0
    runs = store.search_runs([store.get_experiment_by_name("consissr").experiment_id],
                             filter_string="tags.stage = 'prepare'")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    run = runs[0]
    written = len(json.loads((out / "index.json").read_text())["items"])
    assert written > 0 and run.data.metrics["crops_written"] == written
    assert run.data.params["prepare.crops_per_image"] == "1" and run.data.tags["profile"] == "embedded"
    assert [a.path for a in store.list_artifacts(run.info.run_id)] == ["report.json"]


# --------------------------------------------------------------------------------------------
# what the MLflow UI shows: run names, datasets, Source and Version, the experiment's kind
# --------------------------------------------------------------------------------------------
COMMIT = "abc1234def5678" + "0" * 26


def test_a_run_is_named_by_its_stage_what_sets_it_apart_and_its_commit():
    sdsr = {"base.seed": 1, "train_sdsr": TrainSdsrParams(gamma=5.0, tala=True, iterations=300)}
    assert tracking.run_name("train_sdsr", sdsr, (COMMIT, False)) == "train_sdsr γ=5 tala=on iters=300 @abc1234"
    ddpm = {"train_sdsr": TrainSdsrParams(tala=False, gamma=10.0, iterations=20)}
    assert tracking.run_name("train_sdsr", ddpm, (COMMIT, True)) == "train_sdsr γ=10 tala=off iters=20 @abc1234-dirty"
    ev = {"evaluate": EvaluateParams(methods=("bicubic", "full"), protocol="pyiqa")}
    assert tracking.run_name("evaluate", ev, (COMMIT, False)) == "evaluate methods=bicubic,full protocol=pyiqa @abc1234"
    # a weights path shows by its last part; outside git there is no commit; an unknown stage is its name
    gan = {"gan": {"pretrained": "/weights/RealESRGAN_x4plus.pth"}, "train_gan": {"iterations": 0}}
    assert tracking.run_name("train_gan", gan, None) == "train_gan from=RealESRGAN_x4plus.pth iters=0"
    assert tracking.run_name("retrain", {"stages": ["prepare"]}, (COMMIT, False)) == "retrain @abc1234"


@pytest.mark.parametrize("stage", sorted(set(tracking.RUN_NAME_PARAMS) & set(STAGE_PARAMS)))
def test_run_name_params_are_params_the_stage_logs(stage):
    """A renamed param would silently drop out of the run names: each named key is one the stage logs."""
    params = load_params(REPO / "params.yaml")
    logged = tracking.flatten({dotted: section(params, dotted) for dotted in STAGE_PARAMS[stage]})
    for key, _ in tracking.RUN_NAME_PARAMS[stage]:
        assert key in logged, f"{stage}: {key} is not among its logged params"


@pytest.mark.parametrize("argv, source", [
    (["/home/u/.venv/bin/consissr", "train-sdsr", "--params", "params.yaml"], "consissr train-sdsr"),
    (["/repo/consissr/cli.py", "evaluate"], "consissr evaluate"),  # python -m consissr.cli (accelerate's relaunch)
    (["/repo/pipelines/retrain.py"], "retrain.py"),
])
def test_the_source_is_the_command_that_ran(argv, source):
    assert tracking.source_name(argv) == source


def test_each_input_is_a_dataset_with_the_dvc_hash_as_digest_and_the_run_has_source_and_version(
        store, tmp_path, monkeypatch):
    monkeypatch.setattr(tracking.sys, "argv", ["/x/bin/consissr", "train-sdsr"])
    manifest_only = tmp_path / "latents"  # outside the repository: no dvc.lock, its manifest's sha256
    manifest_only.mkdir()
    (manifest_only / "manifest.json").write_text('{"shards": []}')
    params = {"train_sdsr": {"gamma": 5.0, "tala": True, "iterations": 2}}
    with tracking.start_run("train_sdsr", params=params, root=REPO,
                            inputs={"prepared": REPO / "data" / "prepared", "latents": manifest_only}) as run:
        pass
    got = store.get_run(run.run_id)
    lock = yaml.safe_load((REPO / "dvc.lock").read_text())["stages"]
    by_name = {d.dataset.name: d for d in got.inputs.dataset_inputs}
    assert set(by_name) == {"data/prepared", str(manifest_only)}
    prepared = by_name["data/prepared"]
    assert prepared.dataset.digest == lock["prepare"]["outs"][0]["md5"]
    assert json.loads(prepared.dataset.source)["uri"].endswith(str(REPO / "data" / "prepared"))
    assert {t.key: t.value for t in prepared.tags} == {"mlflow.data.context": "training"}
    sha = hashlib.sha256((manifest_only / "manifest.json").read_bytes()).hexdigest()
    assert by_name[str(manifest_only)].dataset.digest == sha[:36]
    tags = got.data.tags
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    assert tags["mlflow.source.name"] == "consissr train-sdsr" and tags["mlflow.source.type"] == "LOCAL"
    assert tags["mlflow.source.git.commit"] == head
    assert re.fullmatch(rf"train_sdsr γ=5 tala=on iters=2 @{head[:7]}(-dirty)?", got.info.run_name)


def test_an_input_without_a_hash_is_no_dataset(store, tmp_path):
    with tracking.start_run("evaluate", params={}, inputs={"pipeline": tmp_path / "absent"}) as run:
        pass
    got = store.get_run(run.run_id)
    assert got.inputs.dataset_inputs == [] and got.data.tags["input.pipeline.hash"] == "missing"


def test_the_experiment_is_created_as_model_training_and_a_kind_the_user_chose_stays(store):
    with tracking.start_run("prepare", params={}):
        pass
    assert store.get_experiment_by_name("consissr").tags["mlflow.experimentKind"] == "custom_model_development"
    # an experiment made before (no kind) gets it; one the user switched to GenAI keeps that
    old = store.create_experiment("older")
    chosen = store.create_experiment("chosen", tags={"mlflow.experimentKind": "genai_development"})
    for name in ("older", "chosen"):
        with tracking.start_run("prepare", params={}, experiment=name):
            pass
    assert store.get_experiment(old).tags["mlflow.experimentKind"] == "custom_model_development"
    assert store.get_experiment(chosen).tags["mlflow.experimentKind"] == "genai_development"
