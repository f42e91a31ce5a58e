"""docs/orchestration.md's Prefect section against a real local Prefect server, and the finished `retrain` run in the UI (headless Chromium).

The walkthrough's commands run as written (the server on a free port): work pools, the GPU concurrency limit,
`prefect deploy --all` of prefect.yaml, `prefect deployment run` of the CPU deployment (a tiny stage list:
`pull` and `push`, skipped without a DVC remote) and a `prefect worker start --pool cpu` that runs it once.
"""

import json
import re
import subprocess
import urllib.request

import pytest
from conftest import REPO, chromium_page, copy_tracked_files, venv_bin

pytestmark = pytest.mark.slow

# docs/orchestration.md, verbatim (the test adds only what a terminal-less run needs: --no-prompt, --run-once, --param)
SERVER = "prefect server start --host 127.0.0.1"
POOLS = ["prefect work-pool create gpu --type process", "prefect work-pool create cpu --type process",
         "prefect gcl create gpu --limit 1"]
DEPLOY = "prefect deploy --all"
RUN = "prefect deployment run 'retrain/embedded-cpu'"
WORKER = "CONSISSR_REPO=$PWD prefect worker start --pool cpu"


def api(env: dict, path: str, body: dict | None = None):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(env["PREFECT_API_URL"] + path, data=data, headers={"Content-Type": "application/json"},
                                 method="GET" if body is None else "POST")
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.load(resp)


def prefect(env: dict, cwd, *args: str, timeout: float = 300) -> str:
    proc = subprocess.run([venv_bin("prefect"), *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, f"prefect {' '.join(args)}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout + proc.stderr


def test_docs_walkthrough_runs_retrain_and_the_ui_shows_it_completed_with_its_tasks(prefect_server, tmp_path):
    page = (REPO / "docs" / "orchestration.md").read_text()
    for command in [SERVER, *POOLS, DEPLOY, RUN, WORKER, "export PREFECT_API_URL=http://127.0.0.1:4200/api"]:
        assert command in page, f"docs/orchestration.md no longer shows {command!r}"
    env = prefect_server
    repo = copy_tracked_files(tmp_path / "repo")
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)

    # the pools and the limit at once (independent), then the deployments of prefect.yaml
    procs = [subprocess.Popen([venv_bin("prefect"), *c.split()[1:]], cwd=repo, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for c in POOLS]
    for command, proc in zip(POOLS, procs):
        out = proc.communicate(timeout=300)[0]
        assert proc.returncode == 0, f"{command}\n{out[-3000:]}"
    prefect(env, repo, "--no-prompt", *DEPLOY.split()[1:])
    weekly = api(env, "/deployments/name/retrain/weekly-gpu")
    assert weekly["work_pool_name"] == "gpu"
    assert [s["schedule"]["cron"] for s in weekly["schedules"]] == ["0 3 * * 1"]
    assert api(env, "/deployments/name/retrain/embedded-cpu")["work_pool_name"] == "cpu"

    out = prefect(env, repo, "deployment", "run", "retrain/embedded-cpu", "--param", 'stages=["pull","push"]',
                  "--param", "track=false")
    flow_run_id = re.search(r"UUID: ([0-9a-f-]{36})", out).group(1)
    prefect(dict(env, CONSISSR_REPO=str(repo)), repo, "worker", "start", "--pool", "cpu", "--run-once", timeout=400)

    # the API: the run Completed, its two tasks too (no remote: the syncs are logged skips)
    run = api(env, f"/flow_runs/{flow_run_id}")
    assert run["state"]["type"] == "COMPLETED", run["state"]
    tasks = api(env, "/task_runs/filter", {"flow_runs": {"id": {"any_": [flow_run_id]}}})
    assert sorted((t["name"], t["state"]["type"]) for t in tasks) == [("pull", "COMPLETED"), ("push", "COMPLETED")]

    ui = env["PREFECT_API_URL"].removesuffix("/api")
    with chromium_page() as page:
        page.goto(f"{ui}/runs/flow-run/{flow_run_id}")
        page.get_by_text(run["name"]).first.wait_for()
        page.get_by_text("Task Runs", exact=True).wait_for()
        # the run's header: its name, the flow, the deployment, the pool, the state (its parts load one by one)
        expected = (run["name"], "retrain", "embedded-cpu", "cpu", "Completed", "2 Task runs")
        for _ in range(60):
            header = page.inner_text("body").split("Task Runs")[0]
            if all(text in header for text in expected):
                break
            page.wait_for_timeout(500)
        for text in expected:
            assert text in header, header[-2000:]
        page.get_by_text("Task Runs", exact=True).click()
        page.get_by_text("(2 Completed)").wait_for()
        for _ in range(60):  # the count renders before the rows: wait for the rows themselves
            listing = page.inner_text("body").split("(2 Completed)")[1]
            rows = [line.strip() for line in listing.splitlines() if line.strip()]
            if {"pull", "push"} <= set(rows):
                break
            page.wait_for_timeout(500)
        for name in ("pull", "push"):  # each task run's name, followed by its state
            assert name in rows and rows[rows.index(name) + 1] == "Completed", rows[:20]
