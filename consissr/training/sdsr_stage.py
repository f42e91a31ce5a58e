"""Stage ``train_sdsr``: diffusion training with Time-aware Latent Augmentation (paper §3.4, Algorithm 1).

For every sample of a batch of cached latents (``data/latents``, stage ``encode``)::

    t ~ U{1..T},  ε ~ N(0, I),  r ~ U(0, 1)                            (Alg. 1, l. 2–4)
    x_0' = x_LQ if r < p(t) = (t/T)^γ else x_HQ                          (l. 4–5)
    x_t  = √ᾱ_t·x_0' + √(1−ᾱ_t)·ε                                        (l. 6)
    ε*   = (x_t − √ᾱ_t·x_HQ) / √(1−ᾱ_t)                                  (l. 7)
    L    = ‖ε̂(x_t, t, c_txt, c_img, x_LQ) − ε*‖²                         (l. 8)

(``consissr.training.tala.tala_noising``; ``tala: false`` never starts from LQ: plain DDPM.)
The ControlNet is conditioned on the LQ latent (``model.controlnet_conditioning: latent``) or
the LQ image (``pixel``); the text prompt c_txt is empty, fixed or a caption per image, replaced
by the empty prompt with probability ``prompt_dropout`` (classifier-free guidance), and embedded
once per unique prompt by the frozen text encoder; the image prompt c_img is the robust CLIP
*student* embedding of the LQ image (``data/degraded/lq_up/<id>.png``), loaded from
``data/models/robust_clip`` (stage ``train_clip``, Eq. 3) and computed once up front, since that
CLIP is frozen here. Only ``apply_trainable_policy``'s parameters train (ControlNet,
HPA output layers and image projection, UNet self-attention additions), with Adam β=(0.9, 0.99)
(paper §4.1: lr 5e-5, batch 8, 200K iterations).

Outputs in ``out_dir`` (``data/models/consissr/``):
    ``controlnet/`` + ``consissr_adapters.safetensors`` + ``consissr_config.json`` — the trained
    parts (``ConsisSRNet.save_pretrained``; restore with ``ConsisSRNet.from_pretrained(out_dir,
    backbone)``); ``train_log.json``; ``checkpoints/step-XXXXXXXX/`` (``consissr.training.loop``).
MLflow (``consissr.tracking``): params, ``loss``/``lr``/``lq_start_fraction`` per step, a sample
grid (LQ | x̂0 at each of ``sample_timesteps`` | HQ, VAE-decoded) every ``sample_every`` steps,
the final weights under ``consissr/``, ``plots/loss_curve.png``; tags: git commit and the DVC
hashes of the latent cache, the degraded images, the backbone and the robust CLIP.

Scale notes (paper profile, several GPUs): every process embeds *all* LQ images with the robust
CLIP up front and holds the (N, D) table (ImageNet, ViT-H: 1.28M × 1024 float32 ≈ 5 GB), and the
prompt table holds every unique prompt's (77, C) embedding — fine for ``empty``/``fixed`` prompts,
too large for per-image captions at ImageNet scale. ``lq_start_fraction`` is the main process's
micro-batches only (the loop gathers the loss, not the extra metrics).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset, default_collate

from consissr.io import file_sha256
from consissr import tracking
from consissr.config import BackboneParams, ModelParams, TrainSdsrParams
from consissr.data.latent_cache import MANIFEST, LatentPairDataset
from consissr.data.pairs import read_rgb
from consissr.models.backbone import load_backbone
from consissr.models.consissr import CONFIG_NAME, ConsisSRNet, apply_trainable_policy, training_record
from consissr.models.robust_clip import WEIGHTS_NAME as CLIP_WEIGHTS_NAME
from consissr.models.robust_clip import RobustCLIP
from consissr.training import loop
from consissr.training.loop import LoopSettings, TrainResult
from consissr.training.tala import tala_noising

log = logging.getLogger(__name__)

LQ_PIXELS = "lq_up"  # degraded/lq_up/<id>.png: the LQ image at HQ size (CLIP input, pixel condition)
EMPTY_PROMPT = 0  # row of the prompt table holding the empty prompt ""


# --------------------------------------------------------------------------------------------
# Algorithm 1 as a module (the loop's DDP-wrapped model)
# --------------------------------------------------------------------------------------------
class TalaObjective(nn.Module):
    """``forward(batch)`` = one micro-batch of Algorithm 1: ``(loss, {"lq_start_fraction": ...})``.

    Args:
        net: the ``ConsisSRNet`` (after ``apply_trainable_policy``).
        alphas_cumprod: ᾱ of the backbone's noise schedule (T entries, diffusers indexing).
        prompt_embeds: the frozen text encoder's output for every unique prompt, (P, L, C);
            row ``EMPTY_PROMPT`` is the empty prompt.
        gamma: γ of p(t) = (t/T)^γ.
        tala: False = plain DDPM training (never start from LQ).
        prompt_dropout: chance of replacing a sample's prompt by the empty one.

    A batch holds ``lq``/``hq`` latents (B, C, h, w), ``image_embeds`` (B, D), ``prompt``
    (B,) rows of the prompt table and, for ``controlnet_conditioning: pixel``, ``lq_pixels``
    (B, 3, f·h, f·w) in [0, 1] (f: the VAE factor). Every random draw (t, ε, r, dropout) comes from the global torch
    RNG, which the loop's checkpoints save and restore.
    """

    def __init__(self, net: ConsisSRNet, *, alphas_cumprod: torch.Tensor, prompt_embeds: torch.Tensor,
                 gamma: float, tala: bool, prompt_dropout: float) -> None:
        super().__init__()
        self.net = net
        self.gamma, self.tala, self.prompt_dropout = float(gamma), bool(tala), float(prompt_dropout)
        self.register_buffer("alphas_cumprod", alphas_cumprod.detach().float().clone(), persistent=False)
        # the prompt table stays on the CPU, outside the module's buffers: with captions it can be
        # large, and DDP would copy every buffer to each GPU and broadcast it every step
        self.prompt_embeds = prompt_embeds.detach().float().cpu()

    def enable_gradient_checkpointing(self) -> None:
        """diffusers' switch on the UNet and the ControlNet (what the loop's setting calls)."""
        self.net.unet.enable_gradient_checkpointing()
        self.net.controlnet.enable_gradient_checkpointing()

    def text_embeds(self, prompt: torch.Tensor) -> torch.Tensor:
        """Rows ``prompt`` of the prompt table, on the prompt's device."""
        return self.prompt_embeds[prompt.cpu()].to(prompt.device)

    def condition(self, batch: dict) -> torch.Tensor:
        """The ControlNet condition: the LQ latent, or the LQ image for a pixel ControlNet."""
        dtype = self.net.unet.conv_in.weight.dtype
        cond = batch["lq_pixels"] if self.net.config["controlnet_conditioning"] == "pixel" else batch["lq"]
        return cond.to(dtype)

    def forward(self, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        dtype = self.net.unet.conv_in.weight.dtype
        hq, lq = batch["hq"].to(dtype), batch["lq"].to(dtype)
        # 1. Alg. 1, l. 2–7: t, ε, r; x_t from LQ where r < p(t), else HQ; the target ε*
        noised = tala_noising(hq, lq, self.alphas_cumprod, gamma=self.gamma, enabled=self.tala)
        # 2. the hybrid prompt: text (dropped to "" with prompt_dropout) + robust CLIP image embedding
        prompt = batch["prompt"]
        if self.prompt_dropout > 0:
            drop = torch.rand(prompt.shape, device=prompt.device) < self.prompt_dropout
            prompt = torch.where(drop, torch.full_like(prompt, EMPTY_PROMPT), prompt)
        # 3. l. 8: ε̂ and the MSE to ε*
        eps_hat = self.net(noised.noisy_latents, noised.timesteps, self.text_embeds(prompt),
                           self.condition(batch), batch["image_embeds"])
        loss = F.mse_loss(eps_hat.float(), noised.target.float())
        return loss, {"lq_start_fraction": noised.lq_start.float().mean().detach()}


def tala_step(model: nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The loop's ``loss_fn``: through ``model(...)`` so that DDP all-reduces the gradients."""
    return model(batch)


# --------------------------------------------------------------------------------------------
# data: cached latents + robust CLIP embeddings + prompt rows, by id
# --------------------------------------------------------------------------------------------
class SdsrDataset(Dataset):
    """The latent cache with each item's robust CLIP embedding and prompt row attached.

    Item ``i``: ``{"lq", "hq", "id"}`` of ``LatentPairDataset`` + ``image_embeds`` (D,) +
    ``prompt`` (a row of the prompt table) [+ ``lq_pixels`` (3, H, W) in [0, 1] when
    ``lq_pixel_dir`` is given]. Depends only on ``i``.
    """

    def __init__(self, latents: LatentPairDataset, image_embeds: torch.Tensor, prompt_rows: torch.Tensor,
                 lq_pixel_dir: Path | None = None) -> None:
        if not len(latents) == len(image_embeds) == len(prompt_rows):
            raise ValueError(f"{len(latents)} latent pairs, {len(image_embeds)} image embeddings and "
                             f"{len(prompt_rows)} prompts")
        self.latents, self.image_embeds, self.prompt_rows = latents, image_embeds, prompt_rows
        self.lq_pixel_dir = lq_pixel_dir
        self.ids = latents.ids

    def __len__(self) -> int:
        return len(self.latents)

    def __getitem__(self, i: int) -> dict:
        item = dict(self.latents[i])
        item["image_embeds"] = self.image_embeds[i]
        item["prompt"] = self.prompt_rows[i]
        if self.lq_pixel_dir is not None:
            item["lq_pixels"] = read_rgb(self.lq_pixel_dir / f"{item['id']}.png")
        return item


@torch.no_grad()
def robust_clip_embeddings(clip: RobustCLIP, lq_dir: str | os.PathLike, ids: Sequence[str], *,
                           device: torch.device, batch_size: int = 32) -> torch.Tensor:
    """E'(I_LQ) of ``lq_dir/<id>.png`` for every id, (N, D) float32 on CPU, in ``ids`` order."""
    lq_dir = Path(lq_dir)
    clip.to(device).eval()
    out = []
    for start in range(0, len(ids), batch_size):
        images = torch.stack([read_rgb(lq_dir / f"{i}.png") for i in ids[start:start + batch_size]])
        out.append(clip.student_embeds(images.to(device)).float().cpu())
    return torch.cat(out)


def read_captions(path: str | os.PathLike) -> dict[str, str]:
    """``id → caption`` from a JSON object or a TSV file (``id<TAB>caption`` a line; ``#`` comments)."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".json":
        data = json.loads(text)
        if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
            raise ValueError(f"{path}: expected a JSON object {{id: caption}}")
        return {str(k): v for k, v in data.items()}
    captions = {}
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        key, sep, caption = line.partition("\t")
        if not sep:
            raise ValueError(f"{path}:{n}: expected 'id<TAB>caption', got {line[:80]!r}")
        captions[key.strip()] = caption.strip()
    return captions


def prompt_table(train: TrainSdsrParams, ids: Sequence[str]) -> tuple[list[str], torch.Tensor, list[str]]:
    """(unique prompts with "" first, each id's row, ids without a caption) for ``train.prompt``."""
    if train.prompt == "empty":
        per_id = [""] * len(ids)
        missing: list[str] = []
    elif train.prompt == "fixed":
        if not train.prompt_text:
            raise ValueError("train_sdsr.prompt is 'fixed' but train_sdsr.prompt_text is empty")
        per_id, missing = [train.prompt_text] * len(ids), []
    else:
        if not train.caption_file:
            raise ValueError("train_sdsr.prompt is 'captions' but train_sdsr.caption_file is not set")
        captions = read_captions(train.caption_file)
        missing = [i for i in ids if i not in captions]
        if missing:
            log.warning("train_sdsr: %d of %d images have no caption in %s (e.g. %s); they get the empty prompt",
                        len(missing), len(ids), train.caption_file, ", ".join(missing[:5]))
        per_id = [captions.get(i, "") for i in ids]
    texts = [""] + sorted(set(per_id) - {""})
    row = {text: n for n, text in enumerate(texts)}
    return texts, torch.tensor([row[p] for p in per_id], dtype=torch.long), missing


@torch.no_grad()
def encode_prompts(tokenizer: Any, text_encoder: nn.Module, texts: Sequence[str], *, device: torch.device,
                   batch_size: int = 64) -> torch.Tensor:
    """The frozen text encoder's last hidden state for each prompt, (P, L, C) float32 on CPU
    (as diffusers' Stable Diffusion pipelines embed a prompt)."""
    text_encoder.to(device).eval()
    out = []
    for start in range(0, len(texts), batch_size):
        tokens = tokenizer(list(texts[start:start + batch_size]), padding="max_length",
                           max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt")
        out.append(text_encoder(tokens.input_ids.to(device))[0].float().cpu())
    return torch.cat(out)


# --------------------------------------------------------------------------------------------
# sample grids: LQ | x̂0 at each sample timestep | HQ
# --------------------------------------------------------------------------------------------
@torch.no_grad()
def decode_latents(vae: nn.Module, latents: torch.Tensor) -> torch.Tensor:
    """Scaled latents → images in [0, 1] (the inverse of ``latent_cache.encode_latents``)."""
    weight = next(vae.parameters())
    images = vae.decode(latents.to(weight) / vae.config.scaling_factor).sample
    return (images.float().clamp(-1, 1) + 1) / 2


def make_sample_fn(vae: nn.Module, dataset: SdsrDataset, *, timesteps: Sequence[int], count: int,
                   seed: int) -> Callable[[nn.Module, int], dict[str, np.ndarray]]:
    """A ``sample_fn`` for the loop: one grid, a row per image, columns LQ | x̂0(t) … | HQ.

    x_t is noised from the *LQ* latent, as inference starts (GAN-Embedding, Algorithm 2), with
    the same ε at every call (a generator seeded with ``seed``), so grids compare across steps;
    x̂0 = (x_t − √(1−ᾱ_t)·ε̂)/√ᾱ_t. The prompt is each image's own (never dropped).
    """
    batch = default_collate([dataset[i] for i in range(min(count, len(dataset)))])

    def sample(model: nn.Module, step: int) -> dict[str, np.ndarray]:
        device = model.alphas_cumprod.device
        vae.to(device)
        b = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        dtype = model.net.unet.conv_in.weight.dtype
        lq = b["lq"].to(dtype)
        eps = torch.randn(lq.shape, generator=torch.Generator().manual_seed(seed)).to(device, dtype)
        text, cond = model.text_embeds(b["prompt"]), model.condition(b)
        columns = [decode_latents(vae, lq)]
        for t in timesteps:  # paper t; diffusers index t − 1
            ab = model.alphas_cumprod[t - 1].to(dtype)
            x_t = ab.sqrt() * lq + (1 - ab).sqrt() * eps
            index = torch.full((lq.shape[0],), t - 1, device=device, dtype=torch.long)
            eps_hat = model.net(x_t, index, text, cond, b["image_embeds"])
            columns.append(decode_latents(vae, (x_t - (1 - ab).sqrt() * eps_hat) / ab.sqrt()))
        columns.append(decode_latents(vae, b["hq"]))
        grid = torch.cat([torch.cat(list(col), dim=1) for col in columns], dim=2)  # (3, rows·H, cols·W)
        return {"grid": grid.permute(1, 2, 0).cpu().numpy()}

    return sample


# --------------------------------------------------------------------------------------------
# the stage
# --------------------------------------------------------------------------------------------
def loop_settings(train: TrainSdsrParams, *, seed: int, device: str) -> LoopSettings:
    return LoopSettings.from_params(train, global_batch=True, seed=seed, device=device)  # batch_size is the total over processes and accumulation


def _work_device(device: str) -> torch.device:
    """Where this process computes the up-front embeddings (its own GPU under a launcher)."""
    if device == "cpu" or (device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if device.startswith("cuda:"):
        return torch.device(device)
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))


def _check(train: TrainSdsrParams, T: int) -> None:
    if not 0.0 <= train.prompt_dropout <= 1.0:
        raise ValueError(f"train_sdsr.prompt_dropout must be in [0, 1], got {train.prompt_dropout}")
    if train.gamma <= 0:
        raise ValueError(f"train_sdsr.gamma must be > 0, got {train.gamma}")
    bad = [t for t in train.sample_timesteps if not 1 <= t <= T]
    if bad:
        raise ValueError(f"train_sdsr.sample_timesteps must lie in 1..{T} (paper t), got {bad}")




def save_final(net: ConsisSRNet, out_dir: Path) -> None:
    """``net.save_pretrained`` into ``out_dir`` while keeping ``out_dir/checkpoints``.

    ``save_pretrained`` replaces its whole folder, so it writes a hidden one inside ``out_dir``
    whose entries are then moved in; the config json, which ``from_pretrained`` reads first,
    is removed before and moved in last, so an interrupted save never looks complete.
    """
    staging = net.save_pretrained(out_dir / ".final")
    (out_dir / CONFIG_NAME).unlink(missing_ok=True)
    for entry in sorted(staging.iterdir(), key=lambda p: p.name == CONFIG_NAME):
        target = out_dir / entry.name
        if target.is_dir():
            shutil.rmtree(target)
        os.replace(entry, target)
    staging.rmdir()


def train_sdsr(
    latents_dir: str | os.PathLike,
    degraded_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    backbone_dir: str | os.PathLike,
    robust_clip_dir: str | os.PathLike,
    backbone: BackboneParams,
    model: ModelParams,
    train: TrainSdsrParams,
    seed: int,
    device: str = "auto",
) -> TrainResult:
    """Train the ConsisSR net with Algorithm 1 on the latent cache; save it to ``out_dir``.

    Resumes from ``out_dir/checkpoints`` when a matching checkpoint is there. Under
    ``accelerate launch`` / ``torchrun`` every process runs this; only the main one writes
    ``out_dir`` and talks to MLflow. Returns the loop's ``TrainResult``: ``.model`` is the
    ``TalaObjective`` (``.model.net`` the ConsisSRNet); ``.extra`` holds ``image_embeds`` (N, D)
    and ``ids`` (the robust CLIP embeddings used, by latent-cache order), ``prompts`` (the
    prompt table), ``backbone``, ``robust_clip`` (the frozen parts) and ``mlflow_run_id``.
    """
    latents_dir, degraded_dir, out_dir = Path(latents_dir), Path(degraded_dir), Path(out_dir)
    robust_clip_dir = Path(robust_clip_dir)
    settings = loop_settings(train, seed=seed, device=device)
    work = _work_device(device)

    # 1. the frozen backbone (UNet, VAE, text encoder, tokenizer, noise schedule)
    bb = load_backbone(backbone.pretrained, revision=backbone.revision, embedded_dir=backbone_dir)
    alphas_cumprod = bb.noise_scheduler.alphas_cumprod
    _check(train, len(alphas_cumprod))
    prediction = bb.noise_scheduler.config.get("prediction_type", "epsilon")
    if prediction != "epsilon":  # Algorithm 1's target ε* is a noise target
        raise ValueError(f"backbone {bb.source}: prediction_type {prediction!r}; TALA (Algorithm 1) needs an "
                         "ε-prediction model such as stabilityai/stable-diffusion-2-1-base")

    # 2. data: cached latents; robust CLIP student embeddings of the LQ images (frozen here, so
    #    computed once); the prompt table embedded once by the frozen text encoder
    latents = LatentPairDataset(latents_dir)
    ids = list(latents.ids)
    clip = RobustCLIP.from_pretrained(robust_clip_dir, device=work)
    clip.requires_grad_(False)
    lq_dir = degraded_dir / LQ_PIXELS
    image_embeds = robust_clip_embeddings(clip, lq_dir, ids, device=work)
    clip.to("cpu")
    texts, prompt_rows, missing = prompt_table(train, ids)
    prompt_embeds = encode_prompts(bb.tokenizer, bb.text_encoder, texts, device=work)
    bb.text_encoder.to("cpu")
    pixel = model.controlnet_conditioning == "pixel"
    dataset = SdsrDataset(latents, image_embeds, prompt_rows, lq_dir if pixel else None)

    # 3. the net: frozen UNet + ControlNet + HPA + self-attention additions; seeded, so the new
    #    layers start the same on every rank and on resume (frozen weights are never checkpointed)
    torch.manual_seed(seed)
    net = ConsisSRNet.from_backbone(bb, model, image_embed_dim=clip.embed_dim)
    apply_trainable_policy(net)
    objective = TalaObjective(net, alphas_cumprod=alphas_cumprod, prompt_embeds=prompt_embeds,
                              gamma=train.gamma, tala=train.tala, prompt_dropout=train.prompt_dropout)
    sample_fn = None
    if train.sample_every and train.sample_timesteps and train.sample_count > 0:
        sample_fn = make_sample_fn(bb.vae, dataset, timesteps=train.sample_timesteps, count=train.sample_count,
                                   seed=seed)

    # what a checkpoint must match to be resumed (beyond the loop's own settings)
    fingerprint = {
        "model": model, "backbone": {"source": bb.source, "revision": backbone.revision},
        "latents": file_sha256(latents_dir / MANIFEST), "robust_clip": file_sha256(robust_clip_dir / CLIP_WEIGHTS_NAME),
        "prompts": hashlib.sha256(json.dumps([texts, prompt_rows.tolist()]).encode()).hexdigest()[:16],
        "tala": train.tala, "gamma": train.gamma, "prompt_dropout": train.prompt_dropout,
    }
    params = {"base.seed": seed, "base.device": device, "backbone": backbone, "model": model, "train_sdsr": train}
    inputs = {"latents": latents_dir, "degraded": degraded_dir, "backbone": Path(backbone_dir),
              "robust_clip": robust_clip_dir}
    with tracking.start_run("train_sdsr", params=params, inputs=inputs) as run:
        run.set_tags({"dataset.pairs": len(dataset), "image_embed_dim": clip.embed_dim,
                      "prompts.unique": len(texts), "prompts.missing_captions": len(missing),
                      "backbone.source": bb.source})
        # 4. Algorithm 1 through the shared loop (checkpoints, resume, DDP, mixed precision)
        result = loop.train(model=objective, loss_fn=tala_step, dataset=dataset, settings=settings,
                            out_dir=out_dir, tracker=run, sample_fn=sample_fn, fingerprint=fingerprint)
        result.extra.update(image_embeds=image_embeds, ids=ids, prompts=texts, backbone=bb, robust_clip=clip,
                            mlflow_run_id=run.run_id)

        # 5. the trained parts, the training log, MLflow artifacts (main process only)
        if result.is_main_process:
            trained = result.model.net
            trained.training_info = training_record(result.step, pretrained=backbone.pretrained, source=bb.source)
            save_final(trained, out_dir)
            trained_parts = [(entry, f"consissr/{entry.name}" if entry.is_dir() else "consissr")
                             for entry in sorted(out_dir.iterdir())
                             if entry.name not in (loop.TRAIN_LOG, loop.CHECKPOINTS) and not entry.name.startswith(".")]
            loop.report(result, out_dir, run, loss_label="train_sdsr (Algorithm 1) loss", artifacts=trained_parts)
    return result


__all__ = ["SdsrDataset", "TalaObjective", "decode_latents", "encode_prompts", "make_sample_fn", "prompt_table",
           "read_captions", "robust_clip_embeddings", "save_final", "tala_step", "train_sdsr"]
