"""Prefect 3 flow ``retrain``: the DVC graph as tasks, ``dvc repro <stage>`` each (dvc.lock stays the record).

Steps are named in ``configs/retrain.yaml`` (or the ``stages`` parameter): ``pull`` / ``push`` sync the DVC
cache with the default remote (a logged skip when none is configured; the only retried steps, as their
failures pass), ``promote`` calls what ``consissr promote`` runs (MLflow registry, champion rule; the flow
returns its decision), anything else is a dvc.yaml stage. GPU stages hold one slot of the global concurrency limit ``gpu`` so two trainings never
share a GPU. One MLflow run spans the flow; each stage's run nests under it (``MLFLOW_PARENT_RUN_ID``).
A failing stage fails the flow naming the stage; what earlier stages built stays in the workspace,
the DVC cache and dvc.lock. Returns the outputs (path -> DVC hash), the metrics and the promote decision.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import yaml
from prefect import flow, get_run_logger, task
from prefect.concurrency.sync import concurrency
from prefect.runtime import flow_run

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "retrain.yaml"
SYNC_STEPS = ("pull", "push")


class StageFailed(RuntimeError):
    """A step of the flow exited non-zero; the message names it."""


def load_config(path: str | os.PathLike = CONFIG) -> dict[str, Any]:
    """The flow settings: ``stages``, ``gpu_stages``, ``gpu_limit``, ``promote`` (the champion rule)."""
    raw = yaml.safe_load(Path(path).read_text()) or {}
    for key in ("stages", "gpu_stages"):
        if not isinstance(raw.get(key), list) or not all(isinstance(s, str) for s in raw[key]):
            raise ValueError(f"{path}: {key!r} must be a list of step names")
    return raw


def _bin(name: str) -> str:
    """A console script of this interpreter's environment (dvc, consissr), else from PATH."""
    here = Path(sys.executable).parent / name
    return str(here) if here.exists() else name


def _run(cmd: list[str], repo: Path, env: dict[str, str], step: str) -> str:
    """Run ``cmd`` in ``repo`` streaming its output to the task log; StageFailed naming ``step`` on exit != 0."""
    logger = get_run_logger()
    logger.info("%s: %s", step, " ".join(cmd))
    proc = subprocess.Popen(cmd, cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line.rstrip())
        logger.info("%s | %s", step, line.rstrip())
    if proc.wait() != 0:
        tail = "\n".join(lines[-15:])
        raise StageFailed(f"stage {step!r} failed: {' '.join(cmd[:3])} exited {proc.returncode}\n{tail}")
    return "\n".join(lines)


def has_remote(repo: Path, env: dict[str, str]) -> bool:
    """True when the DVC project at ``repo`` has a default remote (``dvc remote default``)."""
    proc = subprocess.run([_bin("dvc"), "remote", "default"], cwd=repo, env=env, capture_output=True, text=True)
    return proc.returncode == 0 and bool(proc.stdout.strip())


@task(name="dvc-sync", task_run_name="{step}", retries=3, retry_delay_seconds=[10, 60, 300])
def dvc_sync(step: str, repo: str, env: dict[str, str]) -> str:
    """``dvc pull`` / ``dvc push`` with the default remote; retried (network, a lost share). Skip without one."""
    root = Path(repo)
    if not has_remote(root, env):
        get_run_logger().warning("%s skipped: no default DVC remote (docs/orchestration.md: a DVC remote)", step)
        return "skipped"
    # pull: --allow-missing, a stage never built yet is not an error (repro builds it)
    cmd = [_bin("dvc"), "pull", "--allow-missing"] if step == "pull" else [_bin("dvc"), "push"]
    _run(cmd, root, env, step)
    return "done"


@task(name="dvc-repro", task_run_name="{stage}")
def dvc_repro(stage: str, repo: str, env: dict[str, str], gpu: bool, gpu_limit: str = "gpu") -> str:
    """``dvc repro <stage>`` (its upstream too when stale); no retries: a stage failing is deterministic."""
    # a GPU stage holds one slot of the global limit (`prefect gcl create gpu --limit <GPUs per worker>`)
    with concurrency(gpu_limit, occupy=1) if gpu else nullcontext():
        _run([_bin("dvc"), "repro", stage], Path(repo), env, stage)
    return stage


@task(name="promote", task_run_name="promote")
def promote(repo: str, config: str, uri: str, parent_run_id: str | None, profile: str) -> dict[str, Any]:
    """What ``consissr promote`` runs (:func:`consissr.promote.promote`): log the pipeline as an MLflow model,
    register a version, move ``champion`` by the rule; returns the decision. No retries: it is deterministic."""
    from consissr.promote import promote as promote_pipeline

    decision = promote_pipeline(config, root=repo, uri=uri, parent_run_id=parent_run_id, profile=profile)
    get_run_logger().info("promote: version %s %s (champion was %s): %s", decision.version,
                          "promoted" if decision.promote else "not promoted", decision.previous or "none",
                          "; ".join(decision.reasons))
    return dataclasses.asdict(decision)


def collect(repo: Path, env: dict[str, str], stages: list[str]) -> dict[str, Any]:
    """The outputs of ``stages`` from dvc.lock (path -> md5) and every metric (``dvc metrics show --json``)."""
    lock = yaml.safe_load((repo / "dvc.lock").read_text()) if (repo / "dvc.lock").is_file() else {}
    outs = {out["path"]: out.get("md5") for name, st in (lock or {}).get("stages", {}).items()
            if name in stages for out in st.get("outs", []) or []}
    proc = subprocess.run([_bin("dvc"), "metrics", "show", "--json"], cwd=repo, env=env, capture_output=True,
                          text=True)
    metrics: dict[str, Any] = {}
    if proc.returncode == 0 and proc.stdout.strip():
        for rev in json.loads(proc.stdout).values():
            for file, doc in (rev.get("data") or {}).items():
                metrics[file] = doc.get("data")
    return {"outputs": outs, "metrics": metrics}


def _stage_env(repo: Path, parent_run_id: str | None, profile: str, num_gpus: int) -> dict[str, str]:
    env = dict(os.environ, DVC_NO_ANALYTICS="1", CONSISSR_PROFILE=profile,
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    env.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{repo / 'mlflow.db'}")
    if parent_run_id:
        env["MLFLOW_PARENT_RUN_ID"] = parent_run_id
    if num_gpus > 1:  # consissr's training commands relaunch themselves through `accelerate launch`
        env["CONSISSR_NUM_PROCESSES"] = str(num_gpus)
    return env


@flow(name="retrain", log_prints=True)
def retrain(stages: list[str] | None = None, repo: str = ".", gpu_stages: list[str] | None = None,
            num_gpus: int | None = None, profile: str = "embedded", track: bool = True,
            config: str | None = None) -> dict[str, Any]:
    """Run ``stages`` in order (default: the config's); returns {"outputs", "metrics", "steps", "promote"}.

    ``num_gpus``: processes per training stage (default ``CONSISSR_NUM_GPUS`` of the job variables, else 1).
    ``track``: one MLflow run for the flow, the stages' runs nested under it.
    ``config``: the flow settings (default ``<repo>/configs/retrain.yaml``, else this checkout's).
    ``promote`` in the result: the decision of the promote step (None when it did not run).
    """
    from consissr import tracking

    root = Path(repo).resolve()
    config_path = Path(config) if config else (root / "configs" / "retrain.yaml")
    if not config_path.is_file() and not config:
        config_path = CONFIG
    settings = load_config(config_path)
    stages = list(stages if stages is not None else settings["stages"])
    gpu = set(gpu_stages if gpu_stages is not None else settings["gpu_stages"])
    num_gpus = int(num_gpus if num_gpus is not None else os.environ.get("CONSISSR_NUM_GPUS", "1"))
    logger = get_run_logger()
    steps: dict[str, str] = {}
    decision: dict[str, Any] | None = None
    uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{root / 'mlflow.db'}"
    with tracking.start_run("retrain", params={"stages": stages, "gpu_stages": sorted(gpu), "num_gpus": num_gpus},
                            tags={"profile": profile, "prefect.flow_run_id": flow_run.get_id()}, uri=uri,
                            enabled=track, root=root) as parent:
        env = _stage_env(root, parent.run_id, profile, num_gpus)
        for step in stages:
            if step in SYNC_STEPS:
                steps[step] = dvc_sync(step, str(root), env)
            elif step == "promote":
                decision = promote(str(root), str(config_path), env["MLFLOW_TRACKING_URI"], parent.run_id, profile)
                steps[step] = "promoted" if decision["promote"] else "kept"
            else:
                dvc_repro(step, str(root), env, step in gpu, settings.get("gpu_limit", "gpu"))
                steps[step] = "done"
            logger.info("step %s: %s", step, steps[step])
        result = collect(root, env, stages)
        for file, doc in result["metrics"].items():
            flat = {k: float(v) for k, v in tracking.flatten(doc or {}, f"{Path(file).stem}.").items()
                    if _is_number(v)}
            parent.log_metrics(flat, step=0)
    result["steps"] = steps
    result["promote"] = decision
    return result


def _is_number(value: str) -> bool:
    try:
        float(value)
    except ValueError:
        return False
    return True


if __name__ == "__main__":
    print(json.dumps(retrain(), indent=2))
