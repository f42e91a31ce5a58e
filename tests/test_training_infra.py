"""The shared training loop (consissr/training/loop.py) and MLflow tracking (consissr/tracking.py).

Resume and DDP run the toy script tests/_toy_train.py in subprocesses (seeded, CPU): a SIGKILL
mid-run, then a rerun, must reproduce an uninterrupted run's losses and weights exactly.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from _toy_train import Toy
from conftest import REPO
from safetensors.torch import load_file
from torch import nn

from consissr.training import checkpoint, loop

TOY = REPO / "tests" / "_toy_train.py"


def _env() -> dict:
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
                OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")


def toy(*args: str, launcher: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *launcher, str(TOY), *args], check=False, cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=300)


def losses(path: Path) -> dict[int, str]:
    """step → loss (repr) of the last write for each step."""
    out = {}
    for line in path.read_text().splitlines():
        record = json.loads(line)
        out[record["step"]] = record["loss"]
    return out


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    proc = toy("--out", str(out / "run"), "--losses", str(out / "losses.jsonl"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"losses": losses(out / "losses.jsonl"), "weights": out / "run" / "weights-rank0.safetensors"}


# --------------------------------------------------------------------------------------------
# resume
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kill", [["--kill-at-step", "8"], ["--kill-in-checkpoint", "9"]],
                         ids=["after-step-8", "inside-checkpoint-9"])
def test_sigkilled_run_resumes_to_the_uninterrupted_losses_and_weights(uninterrupted, tmp_path, kill):
    out, log = tmp_path / "run", tmp_path / "losses.jsonl"
    killed = toy("--out", str(out), "--losses", str(log), *kill)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    ckpts = out / "checkpoints"
    assert sorted(p.name for p in checkpoint.checkpoint_dirs(out)) == ["step-00000003", "step-00000006"]
    if kill[0] == "--kill-in-checkpoint":
        partial = [p for p in ckpts.iterdir() if p.name.startswith(".step-00000009")]
        assert partial and (partial[0] / checkpoint.WEIGHTS_FILE).is_file() and not (partial[0] / checkpoint.STATE_FILE).exists()
    before = losses(log)
    assert max(before) in (8, 9)

    resumed = toy("--out", str(out), "--losses", str(log))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    after = losses(log)
    assert sorted(after) == list(range(1, 13))
    assert after == uninterrupted["losses"], "a resumed run diverged from the uninterrupted one"
    assert (out / "weights-rank0.safetensors").read_bytes() == uninterrupted["weights"].read_bytes()
    # the partial folder is gone and only the newest two checkpoints are kept
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-00000009", "step-00000012"]


def test_checkpoint_state_is_weights_only_and_holds_everything_to_resume(tmp_path):
    model, data = _toy_model(), _ToyData(7)
    settings = loop.LoopSettings(iterations=5, batch_size_per_device=3, lr=1e-2, betas=(0.9, 0.99), checkpoint_every=2,
                                 keep_checkpoints=2, seed=1, device="cpu")
    result = loop.train(model=model, loss_fn=_toy_loss, dataset=data, settings=settings, out_dir=tmp_path)
    assert [p.name for p in checkpoint.checkpoint_dirs(tmp_path)] == ["step-00000004", "step-00000005"]
    state = torch.load(tmp_path / "checkpoints" / "step-00000005" / checkpoint.STATE_FILE, weights_only=True)
    assert state["step"] == 5 and state["cursor"] == 15 and (state["epoch"], state["index"]) == (2, 1)
    assert {"optimizer", "scheduler", "rng", "history", "fingerprint"} <= set(state)
    assert set(state["rng"][0]) >= {"python", "numpy", "torch"}
    assert state["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.99)
    weights = load_file(tmp_path / "checkpoints" / "step-00000005" / checkpoint.WEIGHTS_FILE)
    assert set(weights) == {"body.weight", "body.bias"}  # trainable only: the frozen layer is not saved
    assert torch.equal(weights["body.weight"], result.model.body.weight.detach())


class _Stop(Exception):
    """Stands in for a kill: raised by the loss after two checkpointed steps."""


def _interrupted(out, settings, model=None, stop_at_call=3):
    calls = []

    def loss_fn(m, batch):
        calls.append(1)
        if len(calls) == stop_at_call:
            raise _Stop
        return _toy_loss(m, batch)

    with pytest.raises(_Stop):
        loop.train(model=model or _toy_model(), loss_fn=loss_fn, dataset=_ToyData(5), settings=settings, out_dir=out)
    assert [p.name for p in checkpoint.checkpoint_dirs(out)] == ["step-00000001", "step-00000002"]


def _rerun(out, settings, model=None):
    return loop.train(model=model or _toy_model(), loss_fn=_toy_loss, dataset=_ToyData(5), settings=settings,
                      out_dir=out)


SETTINGS = loop.LoopSettings(iterations=4, batch_size_per_device=2, lr=1e-2, checkpoint_every=1, seed=1, device="cpu")


def test_a_finished_run_is_rerun_afresh_and_its_checkpoints_set_aside(tmp_path, caplog):
    first = _rerun(tmp_path, SETTINGS)
    meta = checkpoint.read_meta(first.last_checkpoint)
    assert meta["complete"] is True and (first.step, first.resumed_from) == (4, None)
    with caplog.at_level("INFO"):
        again = _rerun(tmp_path, SETTINGS)
    assert (again.resumed_from, again.steps_run) == (None, 4)
    assert "finished at step 4; starting afresh" in caplog.text
    assert again.history["loss"] == first.history["loss"]  # seeded: the same run again
    stale = sorted(p.name for p in (tmp_path / checkpoint.CHECKPOINTS / checkpoint.STALE).glob("*/step-*"))
    assert stale == ["step-00000003", "step-00000004"]


def test_an_interrupted_run_resumes_across_cadence_changes(tmp_path):
    _interrupted(tmp_path, SETTINGS)
    meta = checkpoint.read_meta(checkpoint.latest_checkpoint(tmp_path))
    assert meta["complete"] is False
    resumed = _rerun(tmp_path, dataclasses.replace(SETTINGS, iterations=5, log_every=2, checkpoint_every=3))
    assert (resumed.resumed_from, resumed.steps_run) == (2, 3)


@pytest.mark.parametrize("change, why", [
    (dict(lr=2e-2), "settings.lr: 0.01 → 0.02"),
    (dict(batch_size_per_device=3), "settings.batch_size_per_device: 2 → 3"),
])
def test_a_changed_param_refuses_the_checkpoint_saying_why(tmp_path, caplog, change, why):
    _interrupted(tmp_path, SETTINGS)
    changed = _rerun(tmp_path, dataclasses.replace(SETTINGS, **change))
    assert (changed.resumed_from, changed.steps_run) == (None, 4)
    assert "not resuming checkpoint step-00000002" in caplog.text and why in caplog.text
    # set aside, not deleted, and not resumed
    stale = sorted(p.name for p in (tmp_path / checkpoint.CHECKPOINTS / checkpoint.STALE).glob("*/step-*"))
    assert stale == ["step-00000001", "step-00000002"]


def test_a_changed_trainable_shape_refuses_the_checkpoint_saying_why(tmp_path, caplog):
    _interrupted(tmp_path, SETTINGS, model=_toy_model(width=4))
    changed = _rerun(tmp_path, SETTINGS, model=_toy_model(width=6))
    assert changed.resumed_from is None
    assert "trainable.body.weight: [1, 4] → [1, 6]" in caplog.text


@pytest.fixture
def package_copy(tmp_path, monkeypatch):
    """The training-code hash taken over a copy of the package, so a test may edit its files."""
    import shutil

    copy = tmp_path / "pkg"
    shutil.copytree(checkpoint.PACKAGE_ROOT, copy, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(checkpoint, "PACKAGE_ROOT", copy)
    return copy


def test_an_edit_outside_the_training_path_does_not_stop_a_resume(tmp_path, package_copy, caplog):
    _interrupted(tmp_path / "run", SETTINGS)
    (package_copy / "tracking.py").write_text((package_copy / "tracking.py").read_text() + "\n# a log line\n")
    (package_copy / "cli.py").write_text("")
    (package_copy / "inference").mkdir(exist_ok=True)  # exists once branch infer is merged
    (package_copy / "inference" / "pipeline.py").write_text("x = 1\n")
    resumed = _rerun(tmp_path / "run", dataclasses.replace(SETTINGS, resume="strict"))
    assert (resumed.resumed_from, resumed.steps_run) == (2, 2)
    assert "training code changed" not in caplog.text


def test_a_training_code_change_warns_and_strict_refuses_it(tmp_path, package_copy, caplog):
    tala = package_copy / "training" / "tala.py"
    _interrupted(tmp_path / "auto", SETTINGS)
    _interrupted(tmp_path / "strict", SETTINGS)
    tala.write_text(tala.read_text() + "\n# edited\n")
    resumed = _rerun(tmp_path / "auto", SETTINGS)
    assert resumed.resumed_from == 2
    assert "although the training code changed" in caplog.text and "training/tala.py" in caplog.text
    caplog.clear()
    refused = _rerun(tmp_path / "strict", dataclasses.replace(SETTINGS, resume="strict"))
    assert refused.resumed_from is None
    assert "not resuming checkpoint step-00000002: training code (resume: strict): training/tala.py" in caplog.text


def test_sample_fn_logs_images_and_never_changes_the_trajectory(tmp_path):
    class Recorder:
        def __init__(self):
            self.metrics, self.images = [], []

        def log_metrics(self, metrics, step):
            self.metrics.append((step, dict(metrics)))

        def log_image(self, image, name, step=None):
            self.images.append((name, image.shape))

        def set_tags(self, tags): ...

    def noisy_loss(model, batch):  # uses the global RNG, as TALA's noise and timesteps do
        loss = model(batch["x"] + 0.1 * torch.randn_like(batch["x"]), batch["y"])
        return loss, {"aux": 2.0}

    def sample_fn(model, step):
        assert not model.training and not torch.is_grad_enabled()
        torch.randn(100), np.random.rand(), __import__("random").random()  # must not leak into training
        return {"grid": np.zeros((4, 6, 3), dtype=np.float32)}

    settings = loop.LoopSettings(iterations=4, batch_size_per_device=2, lr=1e-2, sample_every=2, log_every=2, seed=0,
                                 device="cpu")
    plain, sampled = Recorder(), Recorder()
    loop.train(model=_toy_model(), loss_fn=noisy_loss, dataset=_ToyData(5), settings=settings,
               out_dir=tmp_path / "a", tracker=plain)
    loop.train(model=_toy_model(), loss_fn=noisy_loss, dataset=_ToyData(5), settings=settings,
               out_dir=tmp_path / "b", tracker=sampled, sample_fn=sample_fn)
    assert sampled.metrics == plain.metrics
    assert [s for s, _ in sampled.metrics] == [2, 4] and sampled.metrics[0][1]["aux"] == 2.0
    assert sampled.images == [("samples/step-00000002/grid.png", (4, 6, 3)),
                              ("samples/step-00000004/grid.png", (4, 6, 3))]


# --------------------------------------------------------------------------------------------
# divergence
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_loss_stops_naming_step_and_last_checkpoint(tmp_path, bad):
    calls = []

    def loss_fn(model, batch):
        calls.append(1)
        loss = _toy_loss(model, batch)
        return loss * bad if len(calls) == 5 else loss

    settings = loop.LoopSettings(iterations=10, batch_size_per_device=2, lr=1e-2, checkpoint_every=2, seed=0, device="cpu")
    with pytest.raises(loop.TrainingDiverged) as err:
        loop.train(model=_toy_model(), loss_fn=loss_fn, dataset=_ToyData(6), settings=settings, out_dir=tmp_path)
    message = str(err.value)
    assert "step 5" in message
    assert str(tmp_path / "checkpoints" / "step-00000004") in message
    assert checkpoint.latest_checkpoint(tmp_path).name == "step-00000004"


def test_non_finite_loss_before_any_checkpoint_says_so(tmp_path):
    settings = loop.LoopSettings(iterations=3, batch_size_per_device=2, lr=1e-2, checkpoint_every=2, seed=0, device="cpu")
    with pytest.raises(loop.TrainingDiverged, match=r"step 1 .*none \(no checkpoint"):
        loop.train(model=_toy_model(), loss_fn=lambda m, b: _toy_loss(m, b) * float("nan"), dataset=_ToyData(4),
                   settings=settings, out_dir=tmp_path)


# --------------------------------------------------------------------------------------------
# DDP (two CPU processes, gloo) and data order
# --------------------------------------------------------------------------------------------
def test_two_process_ddp_leaves_identical_replicas_equal_to_one_big_batch(tmp_path):
    launcher = ("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2")
    ddp = toy("--out", str(tmp_path / "ddp"), "--iterations", "2", "--batch", "2", "--accum", "1",
              "--deterministic", "--checkpoint-every", "1", launcher=launcher)
    assert ddp.returncode == 0, ddp.stdout[-2000:] + ddp.stderr[-3000:]
    single = toy("--out", str(tmp_path / "single"), "--iterations", "2", "--batch", "4", "--accum", "1",
                 "--deterministic")
    assert single.returncode == 0, single.stderr[-3000:]

    w0, w1 = (load_file(tmp_path / "ddp" / f"weights-rank{r}.safetensors") for r in (0, 1))
    assert w0.keys() == w1.keys() and all(torch.equal(w0[k], w1[k]) for k in w0), "replicas differ"
    i0, i1 = (json.loads((tmp_path / "ddp" / f"indices-rank{r}.json").read_text()) for r in (0, 1))
    assert not set(i0) & set(i1), "both ranks trained on the same samples"
    big = json.loads((tmp_path / "single" / "indices-rank0.json").read_text())
    assert big == i0[:2] + i1[:2] + i0[2:] + i1[2:]
    ws = load_file(tmp_path / "single" / "weights-rank0.safetensors")
    for k in w0:  # gradients all-reduced (averaged) = the gradient of the global batch
        torch.testing.assert_close(w0[k], ws[k], rtol=1e-5, atol=1e-6)
    torch.manual_seed(0)  # the toy's init, to show the weights did move
    init = checkpoint.trainable_state(Toy(0.0))
    assert not torch.allclose(w0["body.0.weight"], init["body.0.weight"])
    meta = json.loads((tmp_path / "ddp" / "checkpoints" / "step-00000002" / checkpoint.META_FILE).read_text())
    assert meta["num_processes"] == 2
    state = checkpoint.load_checkpoint_state(tmp_path / "ddp" / "checkpoints" / "step-00000002")
    assert len(state["rng"]) == 2 and not torch.equal(state["rng"][0]["torch"], state["rng"][1]["torch"])


def test_stream_sampler_is_seeded_per_epoch_and_splits_ranks():
    n, b = 5, 2
    stream = np.concatenate([loop.epoch_permutation(n, 9, e) for e in range(4)])
    for world in (1, 2):
        for rank in range(world):
            it = iter(loop.StreamBatchSampler(n, seed=9, cursor=3, batch_size=b, rank=rank, world=world))
            for k in range(3):
                start = 3 + k * b * world + rank * b
                assert next(it) == stream[start:start + b].tolist()
    assert sorted(loop.epoch_permutation(n, 9, 0)) == list(range(n))
    assert loop.epoch_permutation(50, 9, 0).tolist() != loop.epoch_permutation(50, 9, 1).tolist()


# --------------------------------------------------------------------------------------------
# tracking
# --------------------------------------------------------------------------------------------
def test_tracking_logs_to_sqlite_with_artifacts_beside_it(tmp_path, monkeypatch):
    from mlflow import MlflowClient
    from PIL import Image

    from consissr import tracking
    from consissr.config import TrainClipParams

    monkeypatch.chdir(tmp_path)  # artifacts must not land in ./mlruns
    monkeypatch.delenv("RANK", raising=False)
    data = tmp_path / "data" / "prepared"
    data.mkdir(parents=True)
    (data / "index.json").write_text('{"items": []}')
    uri = f"sqlite:///{tmp_path / 'db' / 'mlflow.db'}"
    (tmp_path / "db").mkdir()
    with tracking.start_run("demo", params={"base.seed": 1, "train_clip": TrainClipParams()},
                            inputs={"prepared": data}, uri=uri, experiment="exp") as run:
        run.log_metrics({"loss": 0.5, "lr": 1e-3}, step=1)
        run.log_metrics({"loss": 0.25, "lr": 1e-3}, step=2)
        run.log_image(np.linspace(0, 1, 48).reshape(4, 4, 3), "samples/grid.png")
        run.log_image(Image.new("RGB", (8, 8), (255, 0, 0)), "samples/red.png")
        run.log_plot("plots/loss.png", [1, 2], {"loss": [0.5, 0.25]})
        run_id = run.run_id

    client = MlflowClient(uri)
    got = client.get_run(run_id)
    assert got.info.status == "FINISHED"
    assert got.data.params["train_clip.betas"] == "[0.9, 0.99]" and got.data.params["base.seed"] == "1"
    assert got.data.params["train_clip.max_grad_norm"] == "null"
    expected = hashlib.sha256((data / "index.json").read_bytes()).hexdigest()
    assert got.data.tags["input.prepared.hash"] == f"sha256:{expected}"
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "loss")] == [(1, 0.5), (2, 0.25)]
    names = {a.path for a in client.list_artifacts(run_id, "samples")}
    assert names == {"samples/grid.png", "samples/red.png"}
    assert (tmp_path / "db" / "mlartifacts" / "exp" / run_id / "artifacts" / "plots" / "loss.png").is_file()
    assert not (tmp_path / "mlruns").exists()


def test_failed_body_marks_the_run_failed(tmp_path):
    from mlflow import MlflowClient

    from consissr import tracking

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with pytest.raises(RuntimeError, match="boom"), tracking.start_run("demo", params={}, uri=uri,
                                                                       enabled=True) as run:
        run_id = run.run_id
        raise RuntimeError("boom")
    assert MlflowClient(uri).get_run(run_id).info.status == "FAILED"


def test_non_main_rank_does_not_touch_mlflow(tmp_path, monkeypatch):
    from consissr import tracking

    monkeypatch.setenv("RANK", "1")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with tracking.start_run("demo", params={"a": 1}, uri=uri) as run:
        assert isinstance(run, tracking.NullRun) and run.run_id is None
        run.log_metrics({"loss": 1.0}, step=1)
    assert not (tmp_path / "mlflow.db").exists()


def test_data_hash_prefers_the_dvc_lock_md5(tmp_path):
    from consissr import tracking

    folder = tmp_path / "data" / "degraded"
    folder.mkdir(parents=True)
    (folder / "index.json").write_text("{}")
    assert tracking.data_hash(folder).startswith("sha256:")
    (tmp_path / "dvc.lock").write_text(
        "schema: '2.0'\nstages:\n  degrade:\n    cmd: x\n    outs:\n    - path: data/degraded\n"
        "      hash: md5\n      md5: 0123abcd.dir\n")
    assert tracking.data_hash(folder) == "md5:0123abcd.dir"
    assert tracking.data_hash(tmp_path / "nothing") is None


# --------------------------------------------------------------------------------------------
# toy pieces for the in-process tests
# --------------------------------------------------------------------------------------------
class _Toy(nn.Module):
    def __init__(self, width=4):
        super().__init__()
        self.frozen = nn.Linear(4, width).requires_grad_(False)
        self.body = nn.Linear(width, 1)

    def forward(self, x, y):
        return ((self.body(self.frozen(x)).squeeze(-1) - y) ** 2).mean()


def _toy_model(width: int = 4) -> nn.Module:
    torch.manual_seed(0)
    return _Toy(width)


class _ToyData(torch.utils.data.Dataset):
    def __init__(self, n):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 4, generator=g)
        self.y = self.x.sum(-1)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "y": self.y[i]}


def _toy_loss(model, batch):
    return model(batch["x"], batch["y"])


def test_git_dirty_ignores_dvc_lock(tmp_path):
    """`dvc repro` rewrites dvc.lock while its stages run: that alone must not tag a run dirty."""
    from consissr import tracking

    def git(*args):
        subprocess.run(["git", "-c", "user.email=t@t", "-c", "user.name=t", *args], cwd=tmp_path, check=True,
                       capture_output=True)

    git("init", "-q")
    (tmp_path / "dvc.lock").write_text("a\n")
    (tmp_path / "code.py").write_text("x = 1\n")
    git("add", ".")
    git("commit", "-qm", "init")
    assert tracking.git_commit(tmp_path)[1] is False
    (tmp_path / "dvc.lock").write_text("b\n")
    assert tracking.git_commit(tmp_path)[1] is False
    (tmp_path / "code.py").write_text("x = 2\n")
    assert tracking.git_commit(tmp_path)[1] is True
