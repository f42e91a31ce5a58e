"""Stage ``train_clip``: robust CLIP fine-tuning (paper §3.3, Eq. 3).

    L_robust = || E'(I_LQ) - E(I_HQ) ||²                              (Eq. 3)

The student E' (a copy of the CLIP image tower) sees the degraded image, the frozen teacher E
the clean one; only the student trains (paper §4.1: Adam β = (0.9, 0.99), lr 1e-5, batch 8 per
GPU, 100K iterations), on the ``clip/`` pair set when ``prepare.clip_crop_size`` made one.
Writes ``robust_clip.safetensors`` + ``config.json``, ``train_log.json`` and ``checkpoints/`` into
``data/models/robust_clip/``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from consissr import tracking
from consissr.config import ClipParams, TrainClipParams
from consissr.data import layout
from consissr.data.pairs import PairedImageDataset
from consissr.models.robust_clip import CONFIG_NAME, WEIGHTS_NAME, RobustCLIP
from consissr.training import loop
from consissr.training.loop import LoopSettings, TrainResult
from consissr.training.report import report_training

log = logging.getLogger(__name__)


def robust_clip_step(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """One micro-batch of Eq. 3; ``model`` is the (possibly DDP-wrapped) RobustCLIP."""
    return model(batch["lq"], batch["hq"])  # RobustCLIP.forward = robust_clip_loss(E'(LQ), E(HQ))


def loop_settings(train: TrainClipParams, *, seed: int, device: str) -> LoopSettings:
    return LoopSettings.from_params(train, seed=seed, device=device, batch_size_per_device=train.batch_size_per_device)


def train_clip(
    prepared_dir: str | os.PathLike,
    degraded_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    clip: ClipParams,
    train: TrainClipParams,
    seed: int,
    device: str = "auto",
) -> TrainResult:
    """Fine-tune the robust CLIP student on the LQ/HQ pairs; save it to ``out_dir``.

    Resumes from ``out_dir/checkpoints`` when a matching checkpoint is there. Under
    ``accelerate launch`` / ``torchrun`` every process runs this; only the main one writes
    ``out_dir`` and talks to MLflow. Returns the loop's ``TrainResult`` (``.model`` is the
    RobustCLIP, teacher included).
    """
    prepared_dir, degraded_dir, out_dir = Path(prepared_dir), Path(degraded_dir), Path(out_dir)
    settings = loop_settings(train, seed=seed, device=device)

    # 1. data: LQ (degraded/lq_up or lq) and HQ (prepared/hq) pixel pairs; §4.1's own 224² centre
    #    crops (prepare.clip_crop_size: prepared/clip, degraded/clip) when prepared
    if (degraded_dir / layout.CLIP / layout.INDEX).is_file():
        prepared_dir, degraded_dir = prepared_dir / layout.CLIP, degraded_dir / layout.CLIP
        log.info("train_clip: the centre-crop pair set %s", degraded_dir)
    dataset = PairedImageDataset(prepared_dir, degraded_dir, lq_source=train.lq_source)

    # 2. teacher E and student E' (= E at the start); seeded, so a random tower is the same on
    #    every rank and on resume (the teacher is never checkpointed: it never changes)
    torch.manual_seed(seed)
    model = RobustCLIP.from_params(clip)

    # a weights file (clip.pretrained by path) is recorded by its sha256 too: in MLflow, and in the
    # resume fingerprint, so a checkpoint trained from other weights is not resumed
    weights = {"clip.pretrained_sha256": model.pretrained_sha256} if model.pretrained_sha256 else {}
    params = {"base.seed": seed, "base.device": device, "clip": clip, **weights, "train_clip": train}
    with tracking.start_run("train_clip", params=params,
                            inputs={"prepared": prepared_dir, "degraded": degraded_dir}) as run:
        run.set_tags({"dataset.pairs": len(dataset), "dataset.fingerprint": dataset.fingerprint})
        # 3. Eq. 3 through the shared loop (checkpoints, resume, DDP, mixed precision)
        result = loop.train(model=model, loss_fn=robust_clip_step, dataset=dataset, settings=settings,
                            out_dir=out_dir, tracker=run,
                            fingerprint={"clip": clip, **weights, "data": dataset.fingerprint})

        # 4. the final student, the training log, MLflow artifacts (main process only)
        if result.is_main_process:
            robust = result.model
            robust.save_pretrained(out_dir)
            report_training(result, out_dir, run, loss_label="train_clip (Eq. 3) loss",
                        artifacts=[(out_dir / WEIGHTS_NAME, "robust_clip"), (out_dir / CONFIG_NAME, "robust_clip")])
    return result
