"""prefect.yaml loads with Prefect's own deploy-config loader: deployments, schedules, pools, entrypoint."""

import pytest
from conftest import REPO

PREFECT_YAML = REPO / "prefect.yaml"


@pytest.fixture(scope="module")
def deployments():
    import yaml
    from prefect.cli.deploy._config import _load_deploy_configs_and_actions
    from prefect.cli.deploy._models import PrefectYamlModel
    from rich.console import Console

    PrefectYamlModel.model_validate(yaml.safe_load(PREFECT_YAML.read_text()))  # raises naming the bad field
    configs, actions = _load_deploy_configs_and_actions(PREFECT_YAML, console=Console(quiet=True))
    assert actions["pull"], "the worker must move into the project checkout"
    return {d["name"]: d for d in configs}


def test_weekly_gpu_deployment_has_a_weekly_cron_on_the_gpu_pool(deployments):
    from prefect.cli.deploy._schedules import _schedule_config_to_deployment_schedule
    from prefect.client.schemas.schedules import CronSchedule

    gpu = deployments["weekly-gpu"]
    assert gpu["work_pool"]["name"] == "gpu"
    (schedule,) = [_schedule_config_to_deployment_schedule(s)["schedule"] for s in gpu["schedules"]]
    assert isinstance(schedule, CronSchedule)
    fields = schedule.cron.split()
    assert len(fields) == 5 and fields[2] == "*" and fields[3] == "*" and fields[4] not in ("*", "")  # once a week
    assert int(gpu["work_pool"]["job_variables"]["env"]["CONSISSR_NUM_GPUS"]) >= 1


def test_cpu_deployment_runs_the_embedded_default_unscheduled(deployments):
    cpu = deployments["embedded-cpu"]
    assert cpu["work_pool"]["name"] == "cpu" and not cpu["schedules"]
    assert cpu["parameters"]["profile"] == "embedded" and cpu["parameters"]["gpu_stages"] == []


def test_job_variables_exist_in_the_process_work_pool_template(deployments):
    from prefect.workers.process import ProcessWorker

    accepted = set(ProcessWorker.get_default_base_job_template()["variables"]["properties"])
    for d in deployments.values():
        assert set(d["work_pool"]["job_variables"]) <= accepted, d["name"]


def test_entrypoint_loads_the_retrain_flow_and_parameters_fit_its_signature(deployments):
    import inspect

    from prefect.flows import load_flow_from_entrypoint

    for d in deployments.values():
        flow = load_flow_from_entrypoint(str(REPO / d["entrypoint"]))
        assert flow.name == "retrain"
        assert set(d["parameters"]) <= set(inspect.signature(flow.fn).parameters), d["name"]
