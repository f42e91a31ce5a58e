"""The end of a training stage (main process): ``train_log.json`` and the MLflow artifacts.

``train_log.json`` records this invocation (resumed from, steps run, seconds), so ``.dvcignore``
keeps it out of the stage's DVC hash: the same training gives the same hash.
"""

from __future__ import annotations

import logging
from pathlib import Path

from consissr.io import write_json
from consissr.tracking import Tracker
from consissr.training.loop import TrainResult

log = logging.getLogger(__name__)

TRAIN_LOG = "train_log.json"


def report_training(result: TrainResult, out_dir: Path, run: Tracker, *, artifacts: list[tuple[Path, str | None]],
                    loss_label: str) -> None:
    """Write ``out_dir/train_log.json``; log throughput, ``artifacts`` (path, artifact folder), the log and a loss curve."""
    history = result.history
    write_json(out_dir / TRAIN_LOG, {
        "steps": result.step, "resumed_from": result.resumed_from, "steps_run": result.steps_run,
        "seconds": round(result.seconds, 3), "num_processes": result.num_processes,
        "final_loss": history["loss"][-1] if history["loss"] else None,
        "history": [{"step": s, "loss": loss, "lr": lr}
                    for s, loss, lr in zip(history["step"], history["loss"], history["lr"])]})
    run.log_metrics({"steps_per_second": result.steps_run / max(result.seconds, 1e-9)}, result.step)
    for path, artifact_path in artifacts:
        run.log_artifact(path, artifact_path)
    run.log_artifact(out_dir / TRAIN_LOG)
    if history["step"]:
        run.log_plot("plots/loss_curve.png", history["step"], {loss_label: history["loss"]})
    log.info("%s: %d steps, final loss %s → %s", loss_label, result.step,
             history["loss"][-1] if history["loss"] else None, out_dir)
