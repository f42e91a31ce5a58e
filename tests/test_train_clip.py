"""Stage train_clip (Eq. 3) on its own tiny numpy-built pairs, tiny open_clip tower, CPU."""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

from consissr.config import ClipParams, TrainClipParams
from consissr.models.robust_clip import WEIGHTS_NAME, RobustCLIP

CLIP = ClipParams(model_name="consissr-tiny-vit", pretrained=None, image_size=224)
# the paper's lr and betas; the whole (6-pair) dataset in every batch, so the loss is on one
# fixed batch and must fall step by step
TRAIN = TrainClipParams(batch_size_per_device=6, lr=1e-5, betas=(0.9, 0.99), iterations=8, checkpoint_every=4,
                        keep_checkpoints=2, log_every=1)
SEED = 3


def make_pairs(root: Path, n: int = 6, size: int = 64) -> tuple[Path, Path]:
    """prepared/hq/<id>.png and degraded/{lq,lq_up}/<id>.png + index.json, from numpy patterns."""
    rng = np.random.default_rng(0)
    prepared, degraded = root / "prepared", root / "degraded"
    for folder in (prepared / "hq", degraded / "lq", degraded / "lq_up"):
        folder.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[0:size, 0:size] / size
    ids = []
    for k in range(n):
        f, phase = rng.uniform(1, 6, 3), rng.uniform(0, 6, 3)
        hq = np.stack([0.5 + 0.5 * np.sin(2 * np.pi * (f[c] * xx + f[(c + 1) % 3] * yy) + phase[c])
                       for c in range(3)], -1)
        hq = np.clip(hq + 0.1 * rng.standard_normal(hq.shape), 0, 1)
        lq = hq.reshape(size // 4, 4, size // 4, 4, 3).mean((1, 3))
        lq_up = np.clip(np.repeat(np.repeat(lq, 4, 0), 4, 1) + 0.05 * rng.standard_normal(hq.shape), 0, 1)
        image_id = f"pair{k}"
        ids.append(image_id)
        for array, path in ((hq, prepared / "hq"), (lq, degraded / "lq"), (lq_up, degraded / "lq_up")):
            Image.fromarray((array * 255).round().astype(np.uint8)).save(path / f"{image_id}.png")
    (prepared / "index.json").write_text(json.dumps({"items": [{"id": i} for i in ids]}))
    (degraded / "index.json").write_text(json.dumps({"items": [{"id": i} for i in ids]}))
    return prepared, degraded


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One train_clip run, with MLflow in a temporary sqlite store; run from a non-repo cwd."""
    from consissr.training.clip_stage import train_clip

    root = tmp_path_factory.mktemp("train_clip")
    prepared, degraded = make_pairs(root)
    uri = f"sqlite:///{root / 'mlflow.db'}"
    mp = pytest.MonkeyPatch()
    mp.setenv("MLFLOW_TRACKING_URI", uri)
    mp.setenv("MLFLOW_EXPERIMENT_NAME", "test-train-clip")
    mp.chdir(root)
    try:
        result = train_clip(prepared, degraded, root / "out", clip=CLIP, train=TRAIN, seed=SEED, device="cpu")
    finally:
        mp.undo()
    return {"root": root, "result": result, "uri": uri, "out": root / "out", "degraded": degraded}


def _fresh() -> RobustCLIP:
    torch.manual_seed(SEED)
    return RobustCLIP.from_params(CLIP)


def test_only_the_student_moves(trained):
    model, fresh = trained["result"].model, _fresh()
    for name, value in fresh.teacher.state_dict().items():
        assert torch.equal(model.teacher.state_dict()[name], value), f"teacher {name} changed"
    moved = [n for n, v in fresh.student.state_dict().items() if not torch.equal(model.student.state_dict()[n], v)]
    assert len(moved) > 0.9 * len(fresh.student.state_dict()), "the student barely trained"


def test_eq3_loss_falls(trained):
    losses = trained["result"].history["loss"]
    assert len(losses) == TRAIN.iterations
    assert losses[-1] < 0.7 * losses[0], losses
    assert sum(b <= a for a, b in itertools.pairwise(losses)) >= len(losses) - 2, losses


def test_saved_tower_reloads_bit_exactly(trained):
    restored = RobustCLIP.from_pretrained(trained["out"])
    student = trained["result"].model.student.state_dict()
    assert restored.student.state_dict().keys() == student.keys()
    for name, value in student.items():
        assert torch.equal(restored.student.state_dict()[name], value), name
    log = json.loads((trained["out"] / "train_log.json").read_text())
    assert log["steps"] == TRAIN.iterations and len(log["history"]) == TRAIN.iterations
    ckpts = sorted(p.name for p in (trained["out"] / "checkpoints").iterdir())
    assert ckpts == ["step-00000004", "step-00000008"]


def test_mlflow_run_holds_params_metrics_and_artifacts(trained, tmp_path):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=trained["uri"])
    experiment = client.get_experiment_by_name("test-train-clip")
    assert experiment.artifact_location.startswith((trained["root"] / "mlartifacts").as_uri())
    assert not (trained["root"] / "mlruns").exists(), "artifacts leaked into ./mlruns"
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["train_clip.lr"] == str(TRAIN.lr)
    assert params["train_clip.betas"] == "[0.9, 0.99]"
    assert params["clip.model_name"] == "consissr-tiny-vit"
    assert params["base.seed"] == str(SEED)
    assert set(params) >= {f"train_clip.{f.name}" for f in dataclasses.fields(TrainClipParams)}
    index_sha = hashlib.sha256((trained["degraded"] / "index.json").read_bytes()).hexdigest()
    assert run.data.tags["input.degraded.hash"] == f"sha256:{index_sha}"
    assert run.data.tags["stage"] == "train_clip"

    history = client.get_metric_history(run.info.run_id, "loss")
    assert [m.step for m in sorted(history, key=lambda m: m.step)] == list(range(1, TRAIN.iterations + 1))
    assert [m.value for m in sorted(history, key=lambda m: m.step)] == pytest.approx(
        trained["result"].history["loss"], rel=1e-12)
    assert len(client.get_metric_history(run.info.run_id, "lr")) == TRAIN.iterations

    def listing(path=None):
        out = []
        for item in client.list_artifacts(run.info.run_id, path):
            out += listing(item.path) if item.is_dir else [item.path]
        return out

    assert {"robust_clip/robust_clip.safetensors", "robust_clip/config.json", "plots/loss_curve.png",
            "train_log.json"} <= set(listing())
    local = Path(client.download_artifacts(run.info.run_id, "robust_clip/robust_clip.safetensors", str(tmp_path)))
    logged, saved = load_file(local), load_file(trained["out"] / WEIGHTS_NAME)
    assert logged.keys() == saved.keys() and all(torch.equal(logged[k], saved[k]) for k in saved)
    png = Path(client.download_artifacts(run.info.run_id, "plots/loss_curve.png", str(tmp_path)))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_rerun_after_a_finished_run_trains_afresh_to_the_same_weights(tmp_path, monkeypatch):
    from consissr.cli import main

    prepared, degraded = make_pairs(tmp_path, n=4, size=32)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.chdir(tmp_path)
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"clip": dataclasses.asdict(CLIP) | {"pretrained": None},
                                      "train_clip": {"iterations": 3, "batch_size_per_device": 2, "checkpoint_every": 2}}))
    argv = ["train-clip", "--params", str(params), "--prepared", str(prepared), "--degraded", str(degraded),
            "--out", str(tmp_path / "out"), "--set", "base.device=cpu", "--set", "train_clip.lq_source=lq"]
    assert main(argv) == 0
    first = load_file(tmp_path / "out" / WEIGHTS_NAME)
    log = json.loads((tmp_path / "out" / "train_log.json").read_text())
    assert (log["steps"], log["steps_run"], log["resumed_from"]) == (3, 3, None)

    # the final checkpoint carries the completion marker: a rerun (as after a code change, when
    # DVC reruns the stage) trains afresh, seeded, to the same weights
    assert main(argv) == 0
    log = json.loads((tmp_path / "out" / "train_log.json").read_text())
    assert (log["steps"], log["steps_run"], log["resumed_from"]) == (3, 3, None)
    second = load_file(tmp_path / "out" / WEIGHTS_NAME)
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert (tmp_path / "out" / "checkpoints" / "stale").is_dir()
