"""Stage ``train_sdsr``: diffusion training with Time-aware Latent Augmentation (paper §3.4, Algorithm 1).

    L = ‖ε̂(x_t, t, c_txt, c_img, x_LQ) − ε*‖²,  x_t from x_LQ with probability (t/T)^γ   (Alg. 1, l. 2–8)

Wires the parts together: the cached latents (``encode``), the robust CLIP *student* embedding
of each LQ image (``train_clip``, Eq. 3; frozen here: read per batch from the ``embed_clip``
shards, or, without them, computed once up front — every process then holds the (N, D) table,
≈ 5 GB for ImageNet with ViT-H), the prompt table (``prompts.py``), the ConsisSR net with its
trainable policy, ``TalaObjective`` (``tala.py``) on the shared loop, sample grids, and the final
save into ``data/models/consissr/``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset, default_collate

from consissr import tracking
from consissr.config import BackboneParams, ModelParams, TrainSdsrParams
from consissr.data import layout
from consissr.data.embedding_cache import ImageEmbeddingCache, robust_clip_embeddings
from consissr.data.latent_cache import MANIFEST, LatentPairDataset
from consissr.errors import ParamsError
from consissr.io import file_sha256, move_into
from consissr.models.backbone import load_backbone
from consissr.models.consissr import CONFIG_NAME, ConsisSRNet, apply_trainable_policy, training_record
from consissr.models.robust_clip import WEIGHTS_NAME as CLIP_WEIGHTS_NAME
from consissr.models.robust_clip import RobustCLIP
from consissr.training import loop
from consissr.training.checkpoint import CHECKPOINTS
from consissr.training.loop import LoopSettings, TrainResult
from consissr.training.prompts import encode_prompts, prompt_table
from consissr.training.report import TRAIN_LOG, report_training
from consissr.training.tala import TalaObjective, tala_step

log = logging.getLogger(__name__)

LQ_PIXELS = layout.LQ_UP  # the LQ image at HQ size (CLIP input, pixel condition)


# --------------------------------------------------------------------------------------------
# data: cached latents + robust CLIP embeddings + prompt rows, by id
# --------------------------------------------------------------------------------------------
def draw_variant(seed: int, epoch: int, i: int, variants: int) -> int:
    """The degradation variant sample ``i`` sees in epoch ``epoch``: each run of K epochs visits its K
    variants in a seeded random order (the paper degrades anew at every visit; a cache holds K)."""
    if variants == 1:
        return 0
    order = np.random.default_rng([seed, i, epoch // variants]).permutation(variants)
    return int(order[epoch % variants])


class SdsrDataset(Dataset):
    """The latent cache with each item's robust CLIP embedding and prompt row attached.

    Item ``i``: ``{"lq", "hq", "id"}`` of ``LatentPairDataset`` + ``image_embeds`` (D,) (from a
    tensor, or read lazily from an ``ImageEmbeddingCache``) + ``prompt`` (a row of the prompt
    table) [+ ``lq_pixels`` (3, H, W) in [0, 1] when ``lq_pixel_dir`` is given]. Depends only on
    ``i``. With K > 1 degradation variants (a (K, N, D) tensor or a cache of K variants) the loop
    passes ``epoch·N + i`` (``epoch_indexed``) and the item is variant ``draw_variant(seed, epoch,
    i, K)``: LQ latent, embedding and pixels alike.
    """

    def __init__(self, latents: LatentPairDataset, image_embeds: torch.Tensor | ImageEmbeddingCache,
                 prompt_rows: torch.Tensor, lq_pixel_dir: Path | None = None, *, seed: int = 0) -> None:
        variants = getattr(latents, "variants", 1)
        cached = isinstance(image_embeds, ImageEmbeddingCache)
        if not cached and image_embeds.dim() == 2:
            image_embeds = image_embeds.unsqueeze(0)
        if cached:
            n_embeds, k_embeds = len(image_embeds), image_embeds.variants
        else:
            n_embeds, k_embeds = image_embeds.shape[1], image_embeds.shape[0]
        if not len(latents) == n_embeds == len(prompt_rows) or k_embeds != variants:
            raise ValueError(f"{len(latents)} latent pairs x {variants} variants, {n_embeds} x {k_embeds} "
                             f"image embeddings and {len(prompt_rows)} prompts")
        self.latents, self.image_embeds, self.prompt_rows = latents, image_embeds, prompt_rows
        self.lq_pixel_dir, self.seed, self.variants, self._cached = lq_pixel_dir, seed, variants, cached
        self.epoch_indexed = variants > 1
        self.ids = latents.ids

    def __len__(self) -> int:
        return len(self.latents)

    def __getitem__(self, index: int) -> dict:
        epoch, i = divmod(index, len(self.latents))
        variant = draw_variant(self.seed, epoch, i, self.variants)
        item = dict(self.latents.item(i, variant) if self.variants > 1 else self.latents[i])
        if self._cached:  # one row read from its shard (``[i]``: variant 0, as the latents above)
            item["image_embeds"] = self.image_embeds.item(i, variant) if self.variants > 1 else self.image_embeds[i]
        else:
            item["image_embeds"] = self.image_embeds[variant, i]
        item["prompt"] = self.prompt_rows[i]
        if self.lq_pixel_dir is not None:
            folder = layout.variant_dir(self.lq_pixel_dir.parent, variant) / self.lq_pixel_dir.name
            item["lq_pixels"] = layout.read_rgb(folder / f"{item['id']}.png")
        return item


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

    x_t is noised from the *LQ* latent (GAN-Embedding inference, Algorithm 2, starts from the
    Real-ESRGAN output's latent instead; training has no GAN), with the same ε at every call (a
    generator seeded with ``seed``), so grids compare across steps;
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
    return LoopSettings.from_params(train, seed=seed, device=device, global_batch_size=train.global_batch_size,
                                    sample_every=train.sample_every)


def _work_device(device: str) -> torch.device:
    """Where this process computes the up-front embeddings (its own GPU under a launcher)."""
    if device == "cpu" or (device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if device.startswith("cuda:"):
        return torch.device(device)
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))


def save_final(net: ConsisSRNet, out_dir: Path) -> None:
    """``net.save_pretrained`` into ``out_dir`` while keeping ``out_dir/checkpoints`` (config json moved in last)."""
    move_into(net.save_pretrained(out_dir / ".final"), out_dir, last=CONFIG_NAME)


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
    embeddings_dir: str | os.PathLike | None = None,
) -> TrainResult:
    """Train the ConsisSR net with Algorithm 1 on the latent cache; save it to ``out_dir``.

    Resumes from ``out_dir/checkpoints`` when a matching checkpoint is there. Under
    ``accelerate launch`` / ``torchrun`` every process runs this; only the main one writes
    ``out_dir`` and talks to MLflow. ``embeddings_dir``: the ``embed_clip`` cache (checked against
    the latents and ``robust_clip_dir``'s weights), read per batch; ``None`` embeds every LQ image
    up front. Returns the loop's ``TrainResult``: ``.model`` is the ``TalaObjective``
    (``.model.net`` the ConsisSRNet); ``.extra`` holds ``image_embeds`` ((N, D), (K, N, D) with K
    degradation variants, or the cache) and ``ids`` (the robust CLIP embeddings used, by
    latent-cache order), ``prompts`` (the prompt table), ``backbone``, ``robust_clip`` (the frozen
    parts; ``None`` with a cache) and ``mlflow_run_id``.
    """
    latents_dir, degraded_dir, out_dir = Path(latents_dir), Path(degraded_dir), Path(out_dir)
    robust_clip_dir = Path(robust_clip_dir)
    settings = loop_settings(train, seed=seed, device=device)
    work = _work_device(device)

    # 1. the frozen backbone (UNet, VAE, text encoder, tokenizer, noise schedule)
    bb = load_backbone(backbone.pretrained, revision=backbone.revision, embedded_dir=backbone_dir)
    alphas_cumprod = bb.noise_scheduler.alphas_cumprod
    too_late = [t for t in train.sample_timesteps if t > len(alphas_cumprod)]
    if too_late:  # the schema checks t >= 1; T comes from the backbone
        raise ParamsError(f"train_sdsr.sample_timesteps: must lie in 1..{len(alphas_cumprod)} (paper t), got {too_late}")
    prediction = bb.noise_scheduler.config.get("prediction_type", "epsilon")
    if prediction != "epsilon":  # Algorithm 1's target ε* is a noise target
        raise ParamsError(f"backbone {bb.source}: prediction_type {prediction!r}; TALA (Algorithm 1) needs an "
                         "ε-prediction model such as stabilityai/stable-diffusion-2-1-base")

    # 2. data: cached latents; robust CLIP student embeddings of the LQ images (frozen here: the
    #    embed_clip shards, read per batch, or computed once); the prompt table embedded once
    latents = LatentPairDataset(latents_dir)
    ids = list(latents.ids)
    lq_dir = degraded_dir / LQ_PIXELS
    clip = None
    if embeddings_dir is not None:
        image_embeds = ImageEmbeddingCache(embeddings_dir)
        image_embeds.check_matches(latents, robust_clip_dir)
        embed_dim = image_embeds.embed_dim
    else:
        clip = RobustCLIP.from_pretrained(robust_clip_dir, device=work)
        clip.requires_grad_(False)
        image_embeds = robust_clip_embeddings(clip, lq_dir, ids, device=work)
        if latents.variants > 1:  # degrade.variants: an embedding of every cached degradation, (K, N, D)
            image_embeds = torch.stack([image_embeds] + [
                robust_clip_embeddings(clip, layout.variant_dir(degraded_dir, v) / LQ_PIXELS, ids, device=work)
                for v in range(1, latents.variants)])
        clip.to("cpu")
        embed_dim = clip.embed_dim
    texts, prompt_rows, missing = prompt_table(train, ids)
    prompt_embeds = encode_prompts(bb.tokenizer, bb.text_encoder, texts, device=work)
    bb.text_encoder.to("cpu")
    pixel = model.controlnet_conditioning == "pixel"
    dataset = SdsrDataset(latents, image_embeds, prompt_rows, lq_dir if pixel else None, seed=seed)

    # 3. the net: frozen UNet + ControlNet + HPA + self-attention additions; seeded, so the new
    #    layers start the same on every rank and on resume (frozen weights are never checkpointed)
    torch.manual_seed(seed)
    net = ConsisSRNet.from_backbone(bb, model, image_embed_dim=embed_dim)
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
    if embeddings_dir is not None:
        inputs["embeddings"] = Path(embeddings_dir)
    with tracking.start_run("train_sdsr", params=params, inputs=inputs) as run:
        run.set_tags({"dataset.pairs": len(dataset), "image_embed_dim": embed_dim,
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
            trained.training_info = training_record(result.step, pretrained=backbone.pretrained, source=bb.source,
                                                    tala=train.tala, gamma=train.gamma)
            save_final(trained, out_dir)
            trained_parts = [(entry, f"consissr/{entry.name}" if entry.is_dir() else "consissr")
                             for entry in sorted(out_dir.iterdir())
                             if entry.name not in (TRAIN_LOG, CHECKPOINTS) and not entry.name.startswith(".")]
            report_training(result, out_dir, run, loss_label="train_sdsr (Algorithm 1) loss", artifacts=trained_parts)
    return result


__all__ = ["SdsrDataset", "decode_latents", "draw_variant", "make_sample_fn", "robust_clip_embeddings", "save_final",
           "train_sdsr"]
