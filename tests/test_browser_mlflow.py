"""MLflow's UI in headless Chromium: two train_sdsr runs that differ in gamma, reached from the experiments list,
in the runs table (with their dataset and source) and the compare view."""

import os
import re
import signal
import subprocess
import sys
import urllib.parse

import pytest
import yaml
from conftest import REPO, chromium_page, free_port, venv_bin, wait_for_http

pytestmark = pytest.mark.slow


@pytest.fixture
def mlflow_server(tmp_path, monkeypatch):
    """`mlflow server` on 127.0.0.1 over a sqlite store with two train_sdsr runs (gamma 5 and 10)."""
    from consissr import tracking

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setattr(sys, "argv", ["consissr", "train-sdsr"])  # as `dvc repro train_sdsr` runs it
    for gamma in (5.0, 10.0):  # what the train_sdsr stage logs, without training
        with tracking.start_run("train_sdsr", params={"train_sdsr": {"gamma": gamma, "tala": True}}, root=REPO,
                                inputs={"latents": REPO / "data" / "latents"}) as run:
            run.log_metrics({"loss": 1.0 / gamma}, step=0)
    port = free_port()
    log = open(tmp_path / "server.log", "w")
    proc = subprocess.Popen([venv_bin("mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
                             "--backend-store-uri", uri, "--workers", "1"],
                            start_new_session=True, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for_http(f"http://127.0.0.1:{port}/health", proc, tmp_path / "server.log")
        yield f"http://127.0.0.1:{port}", uri
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # its own process group: the server and its workers
        proc.wait(30)
        log.close()


def test_both_runs_and_their_gamma_in_runs_table_and_compare_view(mlflow_server):
    from mlflow import MlflowClient

    url, uri = mlflow_server
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("consissr")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 2
    with chromium_page() as page:
        page.goto(f"{url}/#/experiments/{exp.experiment_id}/runs")
        page.get_by_text("2 matching runs").wait_for()
        page.get_by_text("train_sdsr γ=10").wait_for()  # both rows rendered
        page.get_by_text("train_sdsr γ=5").wait_for()
        table = page.inner_text("body")
        assert table.count("train_sdsr") >= 2
        # gamma in the runs table: its search box over params.`train_sdsr.gamma` finds one run per value
        for gamma in ("5.0", "10.0"):
            query = urllib.parse.quote(f"params.`train_sdsr.gamma` = '{gamma}'")
            page.goto(f"{url}/#/experiments/{exp.experiment_id}/runs?searchFilter={query}")
            page.get_by_text("1 matching run").wait_for()  # not "2 matching runs": the filter applied
            assert page.inner_text("body").count("train_sdsr") == 1

        ids = ",".join(f'"{r.info.run_id}"' for r in runs)
        page.goto(f'{url}/#/compare-runs?runs=[{ids}]&experiments=["{exp.experiment_id}"]')
        page.get_by_text("Comparing 2 Runs").wait_for()
        page.get_by_text("Run details").wait_for()
        compare = page.inner_text("body")
        for run in runs:
            assert run.info.run_id in compare
        row = [line for line in compare.splitlines() if line.startswith("train_sdsr.gamma\t")]
        assert row and sorted(row[0].split("\t")[1:]) == ["10.0", "5.0"], compare[-3000:]


def test_from_the_experiments_list_to_the_runs_table_with_each_runs_dataset_and_source(mlflow_server):
    """A newcomer's path in a fresh browser: the experiments list, MLflow's sidebar switch to "Model training"
    (once per browser: see the xfail below), one click on `consissr`, the runs table."""
    from mlflow import MlflowClient

    url, uri = mlflow_server
    assert MlflowClient(uri).get_experiment_by_name("consissr").tags["mlflow.experimentKind"] == \
        "custom_model_development"
    latents = yaml.safe_load((REPO / "dvc.lock").read_text())["stages"]["encode"]["outs"][0]
    assert latents["path"] == "data/latents"
    with chromium_page() as page:
        page.goto(f"{url}/#/experiments")
        page.get_by_text("Model training", exact=True).click()
        page.get_by_role("link", name="consissr", exact=True).click()
        page.get_by_text("2 matching runs").wait_for()
        page.get_by_text("consissr train-sdsr").nth(1).wait_for()  # the table's cells, rendered after the count
        lines = page.inner_text("body").splitlines()
        assert {"Run Name", "Dataset", "Source"} <= set(lines)
        assert {"train_sdsr γ=5 tala=on", "train_sdsr γ=10 tala=on"} <= {line.split(" @")[0] for line in lines}
        assert lines.count(f"data/latents ({latents['md5']})") == 2  # Dataset: name (DVC md5 digest)
        assert lines.count("consissr train-sdsr") == 2  # Source


@pytest.mark.xfail(strict=True, reason="MLflow 3.17's UI opens an experiment by the browser's GenAI / Model training "
                   "switch (GenAI until switched) and reads no mlflow.experimentKind; its newer WorkflowTypeProvider "
                   "follows the kind. When this passes, the README can drop the switch.")
def test_the_experiment_kind_alone_opens_the_runs_table(mlflow_server):
    url, _ = mlflow_server
    with chromium_page() as page:
        page.goto(f"{url}/#/experiments")
        page.get_by_role("link", name="consissr", exact=True).click()
        page.get_by_text(re.compile(r"^(2 matching runs|Token Usage)$")).first.wait_for()  # runs | GenAI overview
        assert "2 matching runs" in page.inner_text("body").splitlines()
