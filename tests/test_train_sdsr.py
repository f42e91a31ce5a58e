"""Stage train_sdsr (Algorithm 1, TALA) on a tiny real latent cache, tiny backbone and tiny robust CLIP, CPU.

The cache is built by the real ``encode`` stage from numpy-made pixel pairs (64² → latents 16², the embedded VAE downsamples 4×);
the robust CLIP is a tiny open_clip tower saved with ``RobustCLIP.save_pretrained``, its student
deliberately different from its teacher.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import REPO
from PIL import Image
from safetensors.torch import load_file
from test_train_clip import make_pairs

from consissr.config import BackboneParams, EmbedClipParams, EncodeParams, ModelParams, TrainSdsrParams
from consissr.data.layout import read_rgb
from consissr.errors import InputError, MissingInputError, ParamsError
from consissr.models.backbone import load_backbone
from consissr.models.consissr import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    ConsisSRNet,
    apply_trainable_policy,
)
from consissr.models.robust_clip import RobustCLIP
from consissr.training import checkpoint

SEED = 5
MODEL = ModelParams(pos_embed_grid=8, num_image_tokens=2)
BACKBONE = BackboneParams()
# γ = 1: p(t) = t/T, so about half the samples start from LQ (γ = 10 would give ~1 in 11)
TRAIN = TrainSdsrParams(global_batch_size=4, lr=1e-4, iterations=6, tala=True, gamma=1.0, prompt="fixed",
                        prompt_text="a photo", prompt_dropout=0.5, checkpoint_every=2, keep_checkpoints=2,
                        sample_every=3, sample_timesteps=(500, 1000), sample_count=2, log_every=1)
SIZE = 64  # pixels; latents 16²


def _run(data: dict, out: Path, *, train: TrainSdsrParams = TRAIN, robust_clip: Path | None = None,
         embeddings: Path | None = None):
    from consissr.training.sdsr_stage import train_sdsr

    return train_sdsr(data["latents"], data["degraded"], out, backbone_dir=data["backbone"],
                      robust_clip_dir=robust_clip or data["robust_clip"], backbone=BACKBONE, model=MODEL,
                      train=train, seed=SEED, device="cpu", embeddings_dir=embeddings)


def _lq_images(data: dict, ids: list[str]) -> torch.Tensor:
    return torch.stack([read_rgb(data["degraded"] / "lq_up" / f"{i}.png") for i in ids])


@pytest.fixture(scope="module")
def data(tmp_path_factory, tiny_backbone):
    """prepared/degraded pixel pairs → the real encode stage → data/latents; a saved robust CLIP."""
    from consissr.data.latent_cache import encode_pairs

    root = tmp_path_factory.mktemp("train_sdsr")
    prepared, degraded = make_pairs(root, n=6, size=SIZE)
    encode_pairs(prepared, degraded, root / "latents", encode=EncodeParams(batch_size=8, shard_size=4),
                 backbone=BACKBONE, device="cpu", backbone_dir=tiny_backbone)
    # a student that is not its teacher (as after train_clip), saved the way train_clip saves it
    torch.manual_seed(11)
    clip = RobustCLIP(model_name="consissr-tiny-vit", pretrained=None, image_size=224)
    with torch.no_grad():
        for p in clip.student.parameters():
            p.add_(0.05 * torch.randn_like(p))
    clip.save_pretrained(root / "robust_clip")
    return {"root": root, "latents": root / "latents", "degraded": degraded, "backbone": tiny_backbone,
            "robust_clip": root / "robust_clip", "uri": f"sqlite:///{root / 'mlflow.db'}", "teacher": clip}


@pytest.fixture(scope="module")
def trained(data):
    """One train_sdsr run (MLflow in a temporary sqlite store) that records the image embeddings
    every forward of the net receives."""
    captured: list[torch.Tensor] = []
    real_tokens = ConsisSRNet.image_tokens

    def spy(self, image_embeds):
        captured.append(image_embeds.detach().clone())
        return real_tokens(self, image_embeds)

    mp = pytest.MonkeyPatch()
    mp.setenv("MLFLOW_TRACKING_URI", data["uri"])
    mp.setenv("MLFLOW_EXPERIMENT_NAME", "test-train-sdsr")
    mp.chdir(REPO)  # the git commit tag comes from the working directory's repository
    mp.setattr(ConsisSRNet, "image_tokens", spy)
    try:
        result = _run(data, data["root"] / "out")
    finally:
        mp.undo()
    return {"result": result, "out": data["root"] / "out", "captured": captured}


def _fresh_net(data) -> tuple[ConsisSRNet, object]:
    backbone = load_backbone("embedded", embedded_dir=data["backbone"])
    torch.manual_seed(SEED)
    net = ConsisSRNet.from_backbone(backbone, MODEL, image_embed_dim=64)
    apply_trainable_policy(net)
    return net, backbone


def _state_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# --------------------------------------------------------------------------------------------
def test_only_the_training_policy_moves(trained, data):
    result = trained["result"]
    net = result.model.net
    fresh, fresh_backbone = _fresh_net(data)
    before = dict(fresh.named_parameters())
    moved, still, frozen = [], [], 0
    for name, p in net.named_parameters():
        assert p.requires_grad == before[name].requires_grad, name
        if p.requires_grad:
            (still if torch.equal(p, before[name]) else moved).append(name)
        else:
            frozen += 1
            assert torch.equal(p, before[name]), f"frozen {name} changed"
    assert not still, f"trainable parameters that never moved: {still[:10]}"
    # the SD UNet is entirely frozen; the ControlNet and the additions train
    assert not any(p.requires_grad for p in net.unet.parameters())
    assert any(n.startswith("controlnet.") for n in moved)
    # clip_embedding image tokens (the default): no image projection, the HPA output layers train
    assert {n.split(".")[0] for n in moved} == {"controlnet", "hpa_unet", "hpa_controlnet", "self_attention"}
    assert frozen > 0
    # VAE, text encoder and robust CLIP are untouched and frozen
    backbone, clip = result.extra["backbone"], result.extra["robust_clip"]
    for part in ("unet", "vae", "text_encoder"):
        assert _state_equal(getattr(backbone, part), getattr(fresh_backbone, part)), part
        assert not any(p.requires_grad for p in getattr(backbone, part).parameters()), part
    assert _state_equal(clip.student, RobustCLIP.from_pretrained(data["robust_clip"]).student)
    assert not any(p.requires_grad for p in clip.parameters())
    # what a checkpoint stores is exactly the policy's parameters
    stored = load_file(result.last_checkpoint / checkpoint.WEIGHTS_FILE)
    assert set(stored) == {f"net.{n}" for n, p in fresh.named_parameters() if p.requires_grad}


def test_image_embeddings_are_the_saved_robust_clip_students(trained, data, tmp_path, monkeypatch):
    result = trained["result"]
    ids = result.extra["ids"]
    with torch.no_grad():
        student = RobustCLIP.from_pretrained(data["robust_clip"]).eval().student_embeds(_lq_images(data, ids))
        teacher = data["teacher"].teacher_embeds(_lq_images(data, ids))
    used = result.extra["image_embeds"]
    torch.testing.assert_close(used, student, rtol=0, atol=1e-6)
    assert not torch.allclose(used, teacher, atol=1e-3), "the embeddings are the teacher's, not the student's"
    # every image embedding the net received in training and sampling is a saved student's row
    captured = torch.cat(trained["captured"])
    assert len(captured) >= TRAIN.iterations * TRAIN.global_batch_size
    distance = torch.cdist(captured, student, compute_mode="donot_use_mm_for_euclid_dist").min(dim=1).values
    assert distance.max() < 1e-5, distance.max()

    # change the saved student: the embeddings used change with it
    changed = RobustCLIP.from_pretrained(data["robust_clip"])
    with torch.no_grad():
        for p in changed.student.parameters():
            p.mul_(1.5)
    changed.save_pretrained(tmp_path / "robust_clip")
    changed.eval()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    again = _run(data, tmp_path / "out", robust_clip=tmp_path / "robust_clip",
                 train=dataclasses.replace(TRAIN, iterations=1, sample_every=0))
    with torch.no_grad():
        expected = changed.student_embeds(_lq_images(data, ids))
    torch.testing.assert_close(again.extra["image_embeds"], expected, rtol=0, atol=1e-6)
    assert not torch.allclose(again.extra["image_embeds"], used, atol=1e-3)


def test_tala_off_never_starts_from_lq(trained, data, tmp_path):
    from mlflow import MlflowClient

    mp = pytest.MonkeyPatch()
    mp.setenv("MLFLOW_TRACKING_URI", data["uri"])
    mp.setenv("MLFLOW_EXPERIMENT_NAME", "test-train-sdsr")
    try:
        off = _run(data, tmp_path / "out", train=dataclasses.replace(TRAIN, tala=False, iterations=3, sample_every=0))
    finally:
        mp.undo()
    client = MlflowClient(tracking_uri=data["uri"])

    def fractions(run_id):
        return [m.value for m in sorted(client.get_metric_history(run_id, "lq_start_fraction"), key=lambda m: m.step)]

    on_values, off_values = fractions(trained["result"].extra["mlflow_run_id"]), fractions(off.extra["mlflow_run_id"])
    assert off_values == [0.0] * 3
    assert len(on_values) == TRAIN.iterations and all(0.0 <= v <= 1.0 for v in on_values)
    assert 0.15 < np.mean(on_values) < 0.85, on_values  # γ = 1: E[p(t)] = 1/2


def test_mlflow_run_holds_params_metrics_samples_and_weights(trained, data, tmp_path):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=data["uri"])
    run = client.get_run(trained["result"].extra["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert set(params) >= {f"train_sdsr.{f.name}" for f in dataclasses.fields(TrainSdsrParams)}
    assert set(params) >= {f"model.{f.name}" for f in dataclasses.fields(ModelParams)}
    assert (params["train_sdsr.lr"], params["train_sdsr.betas"], params["train_sdsr.gamma"]) == (
        str(TRAIN.lr), "[0.9, 0.99]", "1.0")
    assert (params["base.seed"], params["backbone.pretrained"]) == (str(SEED), "embedded")
    tags = run.data.tags
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                          check=True).stdout.strip()
    assert tags["mlflow.source.git.commit"] == head
    manifest_sha = hashlib.sha256((data["latents"] / "manifest.json").read_bytes()).hexdigest()
    assert tags["input.latents.hash"] == f"sha256:{manifest_sha}"
    assert tags["stage"] == "train_sdsr" and tags["dataset.pairs"] == "6"

    history = trained["result"].history
    for name in ("loss", "lr", "lq_start_fraction"):
        metric = sorted(client.get_metric_history(run.info.run_id, name), key=lambda m: m.step)
        assert [m.step for m in metric] == list(range(1, TRAIN.iterations + 1)), name
    loss = sorted(client.get_metric_history(run.info.run_id, "loss"), key=lambda m: m.step)
    assert [m.value for m in loss] == pytest.approx(history["loss"], rel=1e-12)

    def listing(path=None):
        out = []
        for item in client.list_artifacts(run.info.run_id, path):
            out += listing(item.path) if item.is_dir else [item.path]
        return out

    files = set(listing())
    assert {"samples/step-00000003/grid.png", "samples/step-00000006/grid.png", f"consissr/{WEIGHTS_NAME}",
            f"consissr/{CONFIG_NAME}", "consissr/controlnet/config.json",
            "consissr/controlnet/diffusion_pytorch_model.safetensors", "plots/loss_curve.png",
            "train_log.json"} <= files
    assert not any("checkpoints" in f for f in files)
    grid = Image.open(client.download_artifacts(run.info.run_id, "samples/step-00000006/grid.png", str(tmp_path)))
    # a row per sample image; columns LQ | x̂0 at each sample timestep | HQ
    assert grid.size == ((2 + len(TRAIN.sample_timesteps)) * SIZE, TRAIN.sample_count * SIZE)
    logged = load_file(client.download_artifacts(run.info.run_id, f"consissr/{WEIGHTS_NAME}", str(tmp_path)))
    saved = load_file(trained["out"] / WEIGHTS_NAME)
    assert logged.keys() == saved.keys() and all(torch.equal(logged[k], saved[k]) for k in saved)


@torch.no_grad()
def test_saved_model_reloads_with_identical_outputs(trained, data):
    out = trained["out"]
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["checkpoints", "controlnet", CONFIG_NAME, WEIGHTS_NAME, "train_log.json"])
    assert sorted(p.name for p in checkpoint.checkpoint_dirs(out)) == ["step-00000004", "step-00000006"]
    net = copy.deepcopy(trained["result"].model.net).eval()
    restored = ConsisSRNet.from_pretrained(out, load_backbone("embedded", embedded_dir=data["backbone"])).eval()
    g = torch.Generator().manual_seed(0)
    c = net.unet.config.in_channels
    x = {"noisy_latents": torch.randn(2, c, 8, 8, generator=g), "t": torch.tensor([10, 900]),
         "encoder_hidden_states": torch.randn(2, 77, 64, generator=g),
         "lq_cond": torch.randn(2, c, 8, 8, generator=g), "image_embeds": torch.randn(2, 64, generator=g)}
    assert torch.equal(restored(**x), net(**x))
    assert not torch.equal(net(**x), _fresh_net(data)[0].eval()(**x)), "the saved net is the untrained one"


def test_saved_config_and_model_info_say_how_the_model_was_trained(trained, data, capsys):
    """contracts.md 3: consissr_config.json's "training" = steps trained, prior pretrained or not."""
    from consissr.config import Params
    from consissr.models.info import print_model_info

    saved = json.loads((trained["out"] / CONFIG_NAME).read_text())["training"]
    assert saved == {"steps": TRAIN.iterations, "prior_pretrained": False, "backbone": str(data["backbone"]),
                     "tala": TRAIN.tala, "gamma": TRAIN.gamma}
    restored = ConsisSRNet.from_pretrained(trained["out"], load_backbone("embedded", embedded_dir=data["backbone"]))
    assert restored.training_info == saved
    info = print_model_info(Params(), profile="paper", model_dir=trained["out"])
    assert info["training"] == saved
    out = capsys.readouterr().out
    assert f"trained {TRAIN.iterations} diffusion steps (TALA, γ=1) on" in out and "untrained prior" in out


_KILLED = """
import os, signal, sys
from consissr import tracking
from consissr.cli import main
kill_at = int(os.environ["KILL_AT_STEP"])
real = tracking.Run.log_metrics
def log_metrics(self, metrics, step):
    real(self, metrics, step)
    if step == kill_at:  # after this step's update, before its checkpoint
        os.kill(os.getpid(), signal.SIGKILL)
tracking.Run.log_metrics = log_metrics
sys.exit(main(sys.argv[1:]))
"""


def test_cli_resumes_a_sigkilled_run_to_the_uninterrupted_losses(trained, data, tmp_path, monkeypatch):
    from consissr.cli import main

    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({
        "base": {"seed": SEED, "device": "cpu"}, "model": dataclasses.asdict(MODEL),
        "train_sdsr": json.loads(json.dumps(dataclasses.asdict(TRAIN)))}))
    out = tmp_path / "out"
    argv = ["train-sdsr", "--params", str(params), "--latents", str(data["latents"]), "--degraded",
            str(data["degraded"]), "--backbone", str(data["backbone"]), "--robust-clip", str(data["robust_clip"]),
            "--out", str(out)]
    env = dict(os.environ, KILL_AT_STEP="3", MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}",
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    killed = subprocess.run([sys.executable, "-c", _KILLED, *argv], check=False, cwd=tmp_path, env=env,
                            capture_output=True,
                            text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert [p.name for p in checkpoint.checkpoint_dirs(out)] == ["step-00000002"]
    assert not (out / CONFIG_NAME).exists()

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert main(argv) == 0
    log = json.loads((out / "train_log.json").read_text())
    assert (log["steps"], log["resumed_from"], log["steps_run"]) == (TRAIN.iterations, 2, TRAIN.iterations - 2)
    # equal up to float rounding: a loaded 2-core machine once gave 1.1251727 vs 1.1251726 at step 3 (the
    # subprocess and this process may reduce in another order); a wrong resume differs by far more
    assert [h["loss"] for h in log["history"]] == pytest.approx(trained["result"].history["loss"], rel=1e-5)
    resumed, uninterrupted = load_file(out / WEIGHTS_NAME), load_file(trained["out"] / WEIGHTS_NAME)
    assert all(torch.allclose(resumed[k], uninterrupted[k], rtol=1e-4, atol=1e-6) for k in uninterrupted)


# --------------------------------------------------------------------------------------------
# stage embed_clip: the robust CLIP embedding cache beside the latents
# --------------------------------------------------------------------------------------------
def test_embed_clip_shards_equal_the_students_embeddings_and_are_reused(data, tmp_path):
    from consissr.data.embedding_cache import ImageEmbeddingCache, embed_lq_images
    from consissr.data.latent_cache import LatentPairDataset

    out = tmp_path / "embeddings"
    manifest = embed_lq_images(data["latents"], data["degraded"], data["robust_clip"], out,
                               embed=EmbedClipParams(batch_size=3), device="cpu")
    latents = LatentPairDataset(data["latents"])
    # shard for shard beside the latents: same files, same ids
    assert [(s["file"], s["count"]) for s in manifest["shards"]] == [
        (s["file"], s["count"]) for s in latents.manifest["shards"]] and len(manifest["shards"]) == 2
    cache = ImageEmbeddingCache(out, verify=True)
    assert cache.ids == latents.ids and len(cache) == 6 and cache.embed_dim == 64
    with torch.no_grad():
        direct = RobustCLIP.from_pretrained(data["robust_clip"]).eval().student_embeds(_lq_images(data, latents.ids))
    torch.testing.assert_close(torch.stack([cache[i] for i in range(len(cache))]), direct, rtol=0, atol=1e-6)
    cache.check_matches(latents, data["robust_clip"])

    # a rerun reuses every shard byte for byte; the manifest is written last
    before = {p.name: p.read_bytes() for p in out.glob("shard-*.safetensors")}
    embed_lq_images(data["latents"], data["degraded"], data["robust_clip"], out,
                    embed=EmbedClipParams(batch_size=3), device="cpu")
    assert json.loads((out / "report.json").read_text())["shards_reused"] == 2
    assert {p.name: p.read_bytes() for p in out.glob("shard-*.safetensors")} == before

    # another robust CLIP: the cache is refused, by the check and by train_sdsr
    other = RobustCLIP.from_pretrained(data["robust_clip"])
    with torch.no_grad():
        next(other.student.parameters()).add_(1.0)
    other.save_pretrained(tmp_path / "other_clip")
    with pytest.raises(InputError, match="another robust CLIP"):
        _run(data, tmp_path / "out", robust_clip=tmp_path / "other_clip", embeddings=out,
             train=dataclasses.replace(TRAIN, iterations=1, sample_every=0))
    (out / "manifest.json").unlink()
    with pytest.raises(MissingInputError, match="rerun `consissr embed-clip`"):
        ImageEmbeddingCache(out)


def test_train_sdsr_reads_the_cache_per_batch_with_the_same_first_loss(trained, data, tmp_path, monkeypatch):
    from consissr.data.embedding_cache import ImageEmbeddingCache, embed_lq_images

    out = tmp_path / "embeddings"
    embed_lq_images(data["latents"], data["degraded"], data["robust_clip"], out, embed=EmbedClipParams(),
                    device="cpu")
    rows: list[int] = []
    real = ImageEmbeddingCache.__getitem__
    monkeypatch.setattr(ImageEmbeddingCache, "__getitem__", lambda self, i: rows.append(i) or real(self, i))
    received: list[torch.Tensor] = []
    real_tokens = ConsisSRNet.image_tokens
    monkeypatch.setattr(ConsisSRNet, "image_tokens",
                        lambda self, e: received.append(e.detach().clone()) or real_tokens(self, e))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    cached = _run(data, tmp_path / "out", embeddings=out, train=dataclasses.replace(TRAIN, iterations=1, sample_every=0))
    assert isinstance(cached.extra["image_embeds"], ImageEmbeddingCache) and cached.extra["robust_clip"] is None
    # read lazily: the rows of the one batch, not the whole table at start-up
    assert len(rows) == TRAIN.global_batch_size < len(cached.extra["ids"])
    # the first batch's embeddings are those the run without the cache computed (the HPA output
    # layers start at zero, so the first loss alone could not tell), and so is the first loss
    assert len(received) == 1
    torch.testing.assert_close(received[0], trained["captured"][0], rtol=0, atol=1e-6)
    assert cached.history["loss"][0] == pytest.approx(trained["result"].history["loss"][0], rel=1e-5)


# --------------------------------------------------------------------------------------------
def test_prompt_table_fixed_captions_and_missing(tmp_path, caplog):
    from consissr.training.prompts import prompt_table

    ids = ["a", "b", "c"]
    texts, rows, missing = prompt_table(TrainSdsrParams(prompt="empty"), ids)
    assert (texts, rows.tolist(), missing) == ([""], [0, 0, 0], [])
    texts, rows, _ = prompt_table(TrainSdsrParams(prompt="fixed", prompt_text="a photo"), ids)
    assert (texts, rows.tolist()) == (["", "a photo"], [1, 1, 1])
    for name, body in (("c.json", json.dumps({"a": "a cat", "c": "a cat", "x": "unused"})),
                       ("c.tsv", "# id\tcaption\na\ta cat\nc\ta cat\n")):
        (tmp_path / name).write_text(body)
        with caplog.at_level(logging.WARNING):
            texts, rows, missing = prompt_table(
                TrainSdsrParams(prompt="captions", caption_file=str(tmp_path / name)), ids)
        assert (texts, rows.tolist(), missing) == (["", "a cat"], [1, 0, 1], ["b"])
        assert "1 of 3 images have no caption" in caplog.text
    with pytest.raises(ParamsError, match="caption_file"):
        TrainSdsrParams(prompt="captions")
    with pytest.raises(ParamsError, match="prompt_text"):
        TrainSdsrParams(prompt="fixed")
    with pytest.raises(MissingInputError, match="nope.tsv"):
        prompt_table(TrainSdsrParams(prompt="captions", caption_file=str(tmp_path / "nope.tsv")), ids)
