"""Stage ``train_gan``: the RRDBNet that GAN-Embedding mode starts from (Algorithm 2, l. 1).

``gan.pretrained`` (default ``realesrgan-x4plus-ncnn``: Real-ESRGAN x4plus as a pinned package ships
it; or a Real-ESRGAN ``.pth``) with ``train_gan.iterations: 0``: no training; the weights are checked
and recorded with their source and sha256 in ``gan_config.json`` and the MLflow run (``consissr.models.gan``).

With ``iterations > 0`` the RRDBNet (``gan.num_block/num_feat/num_grow_ch``) is fitted with L1 from
the LQ images (``degraded/lq/<id>.png``) to their HQ crops (``prepared/hq/<id>.png``) on random
``patch_size``² LQ patches with flips and 90° turns, Adam, through the shared loop (checkpoints,
resume) — Real-ESRNet's recipe, minus its EMA and 1M steps — starting from the pretrained weights
(fine-tuning on one's own data) or, with ``gan.pretrained: null``, from ``train_gan.init``. The
result is ``gan.pth`` + ``gan_config.json``, scored through ``load_gan`` / ``gan_upscale``
(RealESRGANer) against bicubic on the training pairs; MLflow also gets the loss per step, LQ |
bicubic | GAN | HQ grids and ``plots/loss_curve.png``.
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from consissr import tracking
from consissr.compat import calculate_psnr
from consissr.config import GanParams, TrainGanParams
from consissr.data.pairs import PairedImageDataset
from consissr.errors import ParamsError
from consissr.io import write_json
from consissr.models.gan import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    bilinear_init,
    build_rrdbnet,
    gan_upscale,
    load_gan,
    pretrained_net,
    record_pretrained,
    save_gan,
)
from consissr.training import loop
from consissr.training.loop import LoopSettings, TrainResult
from consissr.training.report import report_training

log = logging.getLogger(__name__)

LQ_SOURCE = "lq"  # degraded/lq/<id>.png: the LQ image at 1/scale, the GAN's input size


def random_patches(lq: torch.Tensor, hq: torch.Tensor, *, patch: int, scale: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Aligned random LQ/HQ patches (``patch``² and ``scale·patch``²), each flipped and turned at random.

    Draws from the global torch RNG (the loop seeds it and saves it in checkpoints).
    """
    n, _, h, w = lq.shape
    if patch > min(h, w):
        raise ValueError(f"train_gan.patch_size {patch} is larger than the LQ images ({w}x{h})")
    if hq.shape[-2:] != (h * scale, w * scale):
        raise ValueError(f"HQ {tuple(hq.shape[-2:])} is not {scale}x the LQ {(h, w)}; degrade.scale must match the data")
    tops = torch.randint(0, h - patch + 1, (n,)).tolist()
    lefts = torch.randint(0, w - patch + 1, (n,)).tolist()
    flips = torch.randint(0, 2, (n,)).tolist()
    turns = torch.randint(0, 4, (n,)).tolist()
    lq_out, hq_out = [], []
    for i in range(n):
        a = lq[i, :, tops[i]:tops[i] + patch, lefts[i]:lefts[i] + patch]
        b = hq[i, :, tops[i] * scale:(tops[i] + patch) * scale, lefts[i] * scale:(lefts[i] + patch) * scale]
        if flips[i]:
            a, b = a.flip(-1), b.flip(-1)
        lq_out.append(a.rot90(turns[i], (-2, -1)))
        hq_out.append(b.rot90(turns[i], (-2, -1)))
    return torch.stack(lq_out), torch.stack(hq_out)


def l1_step(model: nn.Module, batch: dict, *, patch: int, scale: int) -> torch.Tensor:
    """One micro-batch: L1 between the RRDBNet's upscaled LQ patch and the HQ patch (Real-ESRNet's loss)."""
    lq, hq = random_patches(batch["lq"], batch["hq"], patch=patch, scale=scale)
    return F.l1_loss(model(lq), hq)


def bicubic(lq: torch.Tensor, scale: int) -> torch.Tensor:
    """The baseline: bicubic ×scale of (N, 3, h, w) in [0, 1], clamped."""
    return F.interpolate(lq, scale_factor=scale, mode="bicubic", align_corners=False).clamp(0.0, 1.0)


def comparison_grid(lq: torch.Tensor, sr: torch.Tensor, hq: torch.Tensor, *, scale: int) -> np.ndarray:
    """A row per pair, columns LQ (nearest ×scale) | bicubic | GAN | HQ, as (H, W, 3) float in [0, 1]."""
    columns = [F.interpolate(lq, scale_factor=scale, mode="nearest"), bicubic(lq, scale), sr.clamp(0, 1), hq]
    grid = torch.cat([torch.cat(list(col), dim=1) for col in columns], dim=2)  # (3, rows·H, cols·W)
    return grid.permute(1, 2, 0).float().cpu().numpy()


def make_sample_fn(dataset: PairedImageDataset, *, count: int, scale: int):
    """A ``sample_fn`` for the loop: the grid of the first ``count`` pairs, the net run on whole LQ images."""
    items = [dataset[i] for i in range(min(count, len(dataset)))]
    lq, hq = torch.stack([it["lq"] for it in items]), torch.stack([it["hq"] for it in items])

    def sample(model: nn.Module, step: int) -> dict[str, np.ndarray]:
        weight = next(model.parameters())
        return {"grid": comparison_grid(lq, model(lq.to(weight)).cpu(), hq, scale=scale)}

    return sample


def psnr_vs_bicubic(gan_dir: str | os.PathLike, dataset: PairedImageDataset, *, scale: int) -> dict[str, float]:
    """Mean PSNR (RGB, border of ``scale`` pixels cropped, basicsr's ``calculate_psnr``) of the saved GAN
    run through ``load_gan``/``gan_upscale`` (RealESRGANer) and of bicubic, over ``dataset``'s pairs."""
    upsampler = load_gan(gan_dir)
    gan, bic = [], []
    for i in range(len(dataset)):
        item = dataset[i]
        hq = item["hq"].permute(1, 2, 0).numpy() * 255.0
        sr = gan_upscale(upsampler, item["lq"].permute(1, 2, 0).numpy()) * 255.0
        up = bicubic(item["lq"][None], scale)[0].permute(1, 2, 0).numpy() * 255.0
        gan.append(calculate_psnr(sr, hq, crop_border=scale, input_order="HWC"))
        bic.append(calculate_psnr(up, hq, crop_border=scale, input_order="HWC"))
    return {"psnr_gan": float(np.mean(gan)), "psnr_bicubic": float(np.mean(bic)), "pairs": len(dataset)}


def loop_settings(train: TrainGanParams, *, seed: int, device: str) -> LoopSettings:
    """The loop's settings; spelled out rather than ``LoopSettings.from_params`` because the section has
    no ``gradient_checkpointing`` (basicsr's RRDBNet has no such switch)."""
    return LoopSettings(iterations=train.iterations, lr=train.lr, batch_size_per_device=train.batch_size_per_device,
                        betas=tuple(train.betas), lr_warmup_steps=train.lr_warmup_steps,
                        gradient_accumulation=train.gradient_accumulation, mixed_precision=train.mixed_precision,
                        max_grad_norm=train.max_grad_norm, checkpoint_every=train.checkpoint_every,
                        keep_checkpoints=train.keep_checkpoints, log_every=train.log_every,
                        sample_every=train.sample_every, num_workers=train.num_workers, seed=seed, device=device,
                        resume=train.resume)


def train_gan(
    prepared_dir: str | os.PathLike,
    degraded_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    gan: GanParams,
    train: TrainGanParams,
    scale: int,
    seed: int,
    device: str = "auto",
) -> dict[str, Any]:
    """Check and record ``gan.pretrained`` (0 iterations), or fit / fine-tune the GAN; write ``out_dir``; return
    its config.

    Resumes from ``out_dir/checkpoints`` when a matching checkpoint is there.
    """
    prepared_dir, degraded_dir, out_dir = Path(prepared_dir), Path(degraded_dir), Path(out_dir)
    arch = {"scale": scale, "num_block": gan.num_block, "num_feat": gan.num_feat, "num_grow_ch": gan.num_grow_ch}
    params = {"base.seed": seed, "base.device": device, "degrade.scale": scale, "gan": gan, "train_gan": train}

    # pretrained weights as they are: checked and recorded (a .pth by path; the ncnn export converted)
    if gan.pretrained is not None and train.iterations == 0:
        with tracking.start_run("train_gan", params=params) as run:
            config = record_pretrained(gan.pretrained, out_dir, **arch)
            run.set_tags({"gan.weights": config["weights"], "gan.sha256": config["sha256"],
                          "gan.source": config["source"], "gan.source_sha256": config["source_sha256"]})
            run.log_artifact(out_dir / CONFIG_NAME, "gan")
        log.info("train_gan: %s (sha256 %s) in %s", config["source"], config["source_sha256"][:12], out_dir)
        return config

    if train.iterations == 0:
        raise ParamsError("train_gan.iterations: 0 with gan.pretrained null would save an untrained GAN; "
                          "name pretrained weights (gan.pretrained) or set iterations > 0")
    # 1. data: LQ (degraded/lq, 1/scale) and HQ (prepared/hq) pairs, whole images; patches in the step
    dataset = PairedImageDataset(prepared_dir, degraded_dir, lq_source=LQ_SOURCE)
    settings = loop_settings(train, seed=seed, device=device)

    # 2. the RRDBNet: the pretrained one (fine-tuning), else seeded (the same on every rank and on resume)
    torch.manual_seed(seed)
    provenance: dict[str, Any] = {}
    if gan.pretrained is not None:
        model, source = pretrained_net(gan.pretrained, **arch)
        provenance = {"finetuned_from": source["source"], "finetuned_from_sha256": source["source_sha256"]}
    else:
        model = build_rrdbnet(**arch)
        if train.init == "bilinear":
            bilinear_init(model)
    step = functools.partial(l1_step, patch=train.patch_size, scale=scale)
    sample_fn = (make_sample_fn(dataset, count=train.sample_count, scale=scale)
                 if train.sample_every and train.sample_count > 0 else None)

    with tracking.start_run("train_gan", params=params,
                            inputs={"prepared": prepared_dir, "degraded": degraded_dir}) as run:
        run.set_tags({"dataset.pairs": len(dataset), "dataset.fingerprint": dataset.fingerprint,
                      "gan.parameters": sum(p.numel() for p in model.parameters())})
        # 3. L1 through the shared loop (checkpoints, resume, DDP, mixed precision)
        result: TrainResult = loop.train(
            model=model, loss_fn=step, dataset=dataset, settings=settings, out_dir=out_dir, tracker=run,
            sample_fn=sample_fn, fingerprint={"arch": arch, "patch_size": train.patch_size, "init": train.init,
                                              "data": dataset.fingerprint,  # the start's hash, not its path
                                              "start": provenance.get("finetuned_from_sha256")})
        config: dict[str, Any] = {}
        # 4. gan.pth + gan_config.json, scored through RealESRGANer; the log and MLflow artifacts
        if result.is_main_process:
            config = save_gan(result.model, out_dir, **arch, provenance=provenance)
            scores = psnr_vs_bicubic(out_dir, dataset, scale=scale)
            config["training"] = {"steps": result.step, **scores}
            write_json(out_dir / CONFIG_NAME, config)
            run.log_metrics({k: v for k, v in scores.items() if k != "pairs"}, result.step)
            items = [dataset[i] for i in range(min(max(train.sample_count, 1), len(dataset)))]
            upsampler = load_gan(out_dir)
            sr = torch.stack([torch.from_numpy(gan_upscale(upsampler, it["lq"].permute(1, 2, 0).numpy())).permute(2, 0, 1)
                              for it in items])
            run.log_image(comparison_grid(torch.stack([it["lq"] for it in items]), sr,
                                          torch.stack([it["hq"] for it in items]), scale=scale),
                          "samples/final/lq_bicubic_gan_hq.png")
            report_training(result, out_dir, run, loss_label="train_gan L1 loss",
                            artifacts=[(out_dir / WEIGHTS_NAME, "gan"), (out_dir / CONFIG_NAME, "gan")])
            log.info("train_gan: PSNR on the %d training pairs: GAN %.2f dB, bicubic %.2f dB", scores["pairs"],
                     scores["psnr_gan"], scores["psnr_bicubic"])
    return config


__all__ = ["bicubic", "comparison_grid", "l1_step", "make_sample_fn", "psnr_vs_bicubic", "random_patches", "train_gan"]
