"""MLflow's UI in headless Chromium: two train_sdsr runs that differ in gamma, in the runs table and compare view."""

import os
import signal
import subprocess
import urllib.parse

import pytest
from conftest import chromium_page, free_port, venv_bin, wait_for_http

pytestmark = pytest.mark.slow


@pytest.fixture
def mlflow_server(tmp_path, monkeypatch):
    """`mlflow server` on 127.0.0.1 over a sqlite store with two train_sdsr runs (gamma 5 and 10)."""
    from consissr import tracking

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    for gamma in (5.0, 10.0):  # what the train_sdsr stage logs, without training
        with tracking.start_run("train_sdsr", params={"train_sdsr": {"gamma": gamma, "tala": True}}) as run:
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
        page.get_by_text("train_sdsr", exact=True).nth(1).wait_for()  # both rows rendered
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
