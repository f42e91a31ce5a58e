"""Stages ``train_vae`` and ``vae_ceiling``: a tiny AutoencoderKL that reconstructs photos, and its ceiling.

``train_vae`` (embedded profile only; SD 2.1 keeps its VAE): SD's autoencoder loss without the
GAN (Rombach et al. 2022, App. G) — L1 + L2 on random flipped/rotated crops of the training
photos, ``kl_weight``·KL(q(z|x) ‖ N(0, I)) per input element, LPIPS when its weights are on this
machine (else a log line) — with Adam and a cosine lr; then ``scaling_factor`` = 1/std of the
training latents, as SD's 0.18215 was set (LDM §4.3.2). ``vae_ceiling``: reconstruction PSNR(Y)
of the backbone's VAE on the HQ crops (what train_sdsr's grids can show at best) against the
bicubic ×4 figure of the degraded LQ. Both log to MLflow (figures, reconstruction grid).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from consissr.errors import InputError, ParamsError

log = logging.getLogger(__name__)

METRICS_NAME = "vae_metrics.json"
GRID_NAME = "vae_reconstructions.png"
TRAIN_LOG = "train_log.json"  # the time taken: outside the DVC hash (.dvcignore), like the other stages'


# --------------------------------------------------------------------------------------------
# measures
# --------------------------------------------------------------------------------------------
def rgb_to_y(images: torch.Tensor) -> torch.Tensor:
    """ITU-R BT.601 luma of (…, 3, H, W) RGB in [0, 1], in [16/255, 235/255] (as basicsr's PSNR-Y)."""
    w = images.new_tensor([65.481, 128.553, 24.966]).view(3, 1, 1)
    return ((images * w).sum(-3) + 16.0) / 255.0


def psnr_y(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR (dB) of the luma of two RGB images in [0, 1] (8-bit rounded first)."""
    a, b = (torch.round(x.float().clamp(0, 1) * 255) / 255 for x in (a, b))
    mse = F.mse_loss(rgb_to_y(a), rgb_to_y(b)).item()
    return 10 * math.log10(1.0 / max(mse, 1e-12))


def mean_psnr_y(pairs: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> float:
    return float(np.mean([psnr_y(a, b) for a, b in pairs])) if pairs else float("nan")


def psnr_rgb(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR (dB) over the three RGB channels of two images in [0, 1] (8-bit rounded first)."""
    a, b = (torch.round(x.float().clamp(0, 1) * 255) / 255 for x in (a, b))
    return 10 * math.log10(1.0 / max(F.mse_loss(a, b).item(), 1e-12))


def colour_errors(pairs: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, Any]:
    """PSNR(Y), PSNR(RGB) and the mean |per-channel mean difference| (R, G, B; in [0, 1] units) of
    (reconstruction, original) pairs: a VAE that loses colour keeps PSNR(Y) but not the other two."""
    if not pairs:
        return {"psnr_y": float("nan"), "psnr_rgb": float("nan"), "channel_mean_error": [float("nan")] * 3}
    shift = torch.stack([(a.float().mean((-2, -1)) - b.float().mean((-2, -1))).abs() for a, b in pairs]).mean(0)
    return {"psnr_y": mean_psnr_y(pairs), "psnr_rgb": float(np.mean([psnr_rgb(a, b) for a, b in pairs])),
            "channel_mean_error": [round(float(v), 5) for v in shift]}


def vae_scale_factor(vae: Any) -> int:
    return 2 ** (len(vae.config.block_out_channels) - 1)


@torch.no_grad()
def reconstruct(vae: nn.Module, image: torch.Tensor) -> torch.Tensor:
    """decode(mode(encode(x))) of one (3, H, W) image in [0, 1] (cropped to the VAE's factor)."""
    f = vae_scale_factor(vae)
    h, w = image.shape[-2] // f * f, image.shape[-1] // f * f
    weight = next(vae.parameters())
    x = image[None, :, :h, :w].to(weight) * 2 - 1
    out = vae.decode(vae.encode(x).latent_dist.mode()).sample
    return ((out.float().clamp(-1, 1) + 1) / 2)[0].cpu()


def reconstruction_pairs(vae: nn.Module, images: Sequence[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(``reconstruct``, original cropped to the VAE's factor) of (3, H, W) images in [0, 1]."""
    was_training = vae.training
    vae.eval()
    f = vae_scale_factor(vae)
    pairs = [(reconstruct(vae, im), im[:, :im.shape[1] // f * f, :im.shape[2] // f * f]) for im in images]
    vae.train(was_training)
    return pairs


def reconstruction_psnr(vae: nn.Module, images: Sequence[torch.Tensor]) -> float:
    """Mean PSNR(Y) of ``reconstruct`` over (3, H, W) images in [0, 1]."""
    return mean_psnr_y(reconstruction_pairs(vae, images))


# --------------------------------------------------------------------------------------------
# photos
# --------------------------------------------------------------------------------------------
def to_tensor(rgb: np.ndarray) -> torch.Tensor:
    """HxWx3 uint8 → (3, H, W) float32 in [0, 1]."""
    return torch.from_numpy(np.array(rgb, copy=True)).permute(2, 0, 1).float() / 255.0


AUTO_HOLDOUT = "auto"
EMBEDDED_HOLDOUT = ("embedded_coffee",)  # evaluate's photo of the embedded set: out of training already


def pick_holdout(ids: Sequence[str], min_side: dict[str, int], crop_size: int) -> tuple[str, ...]:
    """``train_vae.holdout: auto`` for sources other than the embedded set: one photo, the id with the
    smallest SHA-256 (a pick that depends on the ids alone, not on their order or on the machine),
    among those that leave a training photo of at least ``crop_size``; none when no such photo is left."""
    for key in sorted(ids, key=lambda k: hashlib.sha256(k.encode()).hexdigest()):
        if any(min_side[k] >= crop_size for k in ids if k != key):
            return (key,)
    return ()


def load_photos(sources: Sequence[str], extensions: Sequence[str], holdout: str | Sequence[str],
                crop_size: int = 1) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
    """(training photos, {id: held-out photo}) from ``prepare.sources``; unreadable files are skipped
    with a log line (``prepare`` reports them). ``holdout`` is ids, or ``"auto"``: the embedded set's
    ``EMBEDDED_HOLDOUT`` when the sources include it, else ``pick_holdout``. Raises when a named
    ``holdout`` id is not a source."""
    from consissr.data.images import ImageError
    from consissr.data.sources import iter_sources

    photos: dict[str, torch.Tensor] = {}
    for src in iter_sources(tuple(sources), tuple(extensions)):
        try:
            rgb, _ = src.load()
        except ImageError as exc:
            log.warning("train_vae: skip %s", exc)
            continue
        photos[src.key] = to_tensor(rgb)
    if holdout == AUTO_HOLDOUT:
        holdout = EMBEDDED_HOLDOUT if "embedded" in sources else pick_holdout(
            list(photos), {k: min(v.shape[1:]) for k, v in photos.items()}, crop_size)
    held = {k: photos.pop(k) for k in holdout if k in photos}
    if "embedded" in sources:  # the evaluate stage's photos, already out of training: the natural hold-out
        from consissr.data.sources import EMBEDDED_EVAL_PHOTOS, _embedded_rgb

        for name in EMBEDDED_EVAL_PHOTOS:
            if f"embedded_{name}" in holdout:
                held[f"embedded_{name}"] = to_tensor(_embedded_rgb(name)[0])
    missing = sorted(set(holdout) - set(held))
    if missing:
        raise ParamsError(f"train_vae.holdout: {missing} are not ids of prepare.sources {list(sources)}")
    return list(photos.values()), held


def embedded_split(holdout: Sequence[str]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The embedded photos split as the stage splits them: (training, held-out)."""
    train, held = load_photos(("embedded",), (), holdout)
    return train, list(held.values())


# --------------------------------------------------------------------------------------------
# training
# --------------------------------------------------------------------------------------------
def random_crops(photos: Sequence[torch.Tensor], count: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` random ``size``² crops of (3, H, W) photos, each flipped/rotated at random; in [-1, 1]."""
    def draw(high: int) -> int:
        return int(torch.randint(high, (1,), generator=generator))

    crops = []
    for _ in range(count):
        photo = photos[draw(len(photos))]
        y, x = draw(photo.shape[1] - size + 1), draw(photo.shape[2] - size + 1)
        crop = photo[:, y:y + size, x:x + size]
        if draw(2):
            crop = crop.flip(-1)
        crops.append(torch.rot90(crop, draw(4), dims=(-2, -1)))
    return torch.stack(crops) * 2 - 1


def cosine_lr(step: int, steps: int, lr: float, final_fraction: float = 0.02, warmup: int = 20) -> float:
    """Linear warm-up, then cosine decay from ``lr`` to ``final_fraction``·``lr`` at ``steps``."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, steps - warmup))
    return lr * (final_fraction + (1 - final_fraction) * 0.5 * (1 + math.cos(math.pi * progress)))


def autoencoder_loss(vae: nn.Module, x: torch.Tensor, *, kl_weight: float, generator: torch.Generator,
                     perceptual: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
                     perceptual_weight: float = 0.0) -> tuple[torch.Tensor, dict[str, float]]:
    """L1 + L2 + kl_weight·KL (per input element) [+ perceptual_weight·LPIPS] of x in [-1, 1]."""
    posterior = vae.encode(x).latent_dist
    rec = vae.decode(posterior.sample(generator=generator)).sample
    l1, l2 = (rec - x).abs().mean(), (rec - x).pow(2).mean()
    kl = posterior.kl().mean() / x[0].numel()
    loss = l1 + l2 + kl_weight * kl
    parts = {"l1": l1.item(), "l2": l2.item(), "kl": kl.item()}
    if perceptual is not None and perceptual_weight > 0:
        lp = perceptual(rec, x).mean()
        loss = loss + perceptual_weight * lp
        parts["lpips"] = lp.item()
    return loss, parts


def train_autoencoder(
    vae: nn.Module,
    photos: Sequence[torch.Tensor],
    *,
    steps: int,
    batch_size: int,
    crop_size: int,
    lr: float,
    kl_weight: float,
    seed: int,
    perceptual: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    perceptual_weight: float = 0.0,
    schedule: str = "cosine",
    warmup_steps: int = 20,
    max_grad_norm: float | None = None,
    ema_decay: float = 0.0,
    on_step: Callable[[int, float, dict[str, float]], None] | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, float]:
    """Adam on ``autoencoder_loss`` for ``steps`` steps; returns the last step's loss parts.

    ``max_grad_norm`` clips the gradient norm; ``ema_decay`` > 0 keeps an exponential moving average
    of the weights (torch's ``AveragedModel``) and leaves it in ``vae`` at the end. With them and
    enough steps, where training ends hardly depends on the float rounding of the CPU it runs on
    (benchmarks/bench_vae_cpu_kinds.py: four instruction-set dispatches within 0.17 dB at 2400 steps,
    0.49 dB at 600).
    ``on_step(step, train_seconds, parts)`` is called after every step, outside the part timed
    by ``clock`` (wall time; ``time.process_time`` counts CPU seconds, robust to other load).
    """
    photos = [p for p in photos if min(p.shape[1:]) >= crop_size]
    if not photos:
        raise InputError(f"train_vae: no training photo is at least {crop_size}² (train_vae.crop_size)")
    generator = torch.Generator().manual_seed(seed)
    sample_generator = torch.Generator().manual_seed(seed + 1)
    optimizer = torch.optim.Adam(vae.parameters(), lr=lr)
    average = (torch.optim.swa_utils.AveragedModel(vae, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(
        ema_decay)) if ema_decay > 0 else None)
    vae.train()
    parts: dict[str, float] = {}
    elapsed = 0.0
    for step in range(steps):
        start = clock()
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(step, steps, lr, warmup=warmup_steps) if schedule == "cosine" else lr
        x = random_crops(photos, batch_size, crop_size, generator)
        loss, parts = autoencoder_loss(vae, x, kl_weight=kl_weight, generator=sample_generator,
                                       perceptual=perceptual, perceptual_weight=perceptual_weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(vae.parameters(), max_grad_norm)
        optimizer.step()
        if average is not None:
            average.update_parameters(vae)
        elapsed += clock() - start
        parts = {**parts, "loss": loss.item(), "lr": optimizer.param_groups[0]["lr"]}
        if on_step is not None:
            on_step(step + 1, elapsed, parts)
    if average is not None:
        vae.load_state_dict(average.module.state_dict())
    vae.eval()
    return parts


@torch.no_grad()
def latent_std(vae: nn.Module, photos: Sequence[torch.Tensor], *, crop_size: int, count: int, seed: int) -> float:
    """Std of the posterior-mode latents of ``count`` random crops (SD: scaling_factor = 1/std)."""
    crops = random_crops(photos, count, crop_size, torch.Generator().manual_seed(seed))
    return float(vae.encode(crops).latent_dist.mode().std())


# --------------------------------------------------------------------------------------------
# the stage
# --------------------------------------------------------------------------------------------
def load_lpips(weight: float) -> tuple[Callable | None, str]:
    """pyiqa's LPIPS (VGG) as a loss when ``weight`` > 0 and its weights load offline."""
    if weight <= 0:
        return None, "off (train_vae.lpips_weight = 0)"
    try:
        import pyiqa

        metric = pyiqa.create_metric("lpips", as_loss=True, device="cpu")
    except Exception as exc:  # noqa: BLE001 - any failure to get the weights means: no LPIPS term
        log.warning("train_vae: LPIPS weights not available (%s: %s); training without the LPIPS term",
                    type(exc).__name__, str(exc).splitlines()[0][:200] if str(exc) else "")
        return None, f"skipped: weights not available ({type(exc).__name__})"
    metric.requires_grad_(False)

    def lpips(rec: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return metric((rec.clamp(-1, 1) + 1) / 2, (x + 1) / 2)

    return lpips, f"on (weight {weight})"


def reconstruction_grid(vae: nn.Module, images: Sequence[torch.Tensor], size: int = 128) -> np.ndarray:
    """Rows of centre crops: original | reconstruction, as (H, W, 3) float in [0, 1]."""
    rows = []
    for image in images:
        h, w = image.shape[1:]
        s = min(size, h, w)
        crop = image[:, (h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s]
        crop = F.interpolate(crop[None], size=(size, size), mode="bicubic", align_corners=False)[0].clamp(0, 1)
        rows.append(torch.cat([crop, reconstruct(vae, crop)], dim=2))
    return torch.cat(rows, dim=1).permute(1, 2, 0).numpy()


def _save_png(path: Path, image: np.ndarray) -> None:
    from PIL import Image

    Image.fromarray((np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8)).save(path)


def train_vae(out_dir: str | Path, *, pretrained: str, sources: Sequence[str], extensions: Sequence[str],
              eval_dirs: Sequence[str], train: Any, seed: int, device: str = "auto") -> dict[str, Any]:
    """Train the embedded backbone's AutoencoderKL on the ``prepare.sources`` photos; write ``out_dir``.

    ``pretrained`` is ``backbone.pretrained``; ``sources``/``extensions``/``eval_dirs`` the
    ``prepare`` ones; ``train`` is ``config.TrainVaeParams``.
    ``out_dir`` gets the VAE (``save_pretrained``), ``vae_metrics.json`` (held-out and
    ``prepare.eval_dirs`` reconstruction PSNR(Y), scaling factor; deterministic, so in the DVC
    hash), ``vae_reconstructions.png`` and ``train_log.json`` (the time taken; outside the hash).
    For a real backbone the folder holds only the metrics file saying the VAE is not trained here.
    Returns the metrics with the time.
    """
    from diffusers import AutoencoderKL
    from tqdm import tqdm

    from consissr import tracking
    from consissr.data.latent_cache import resolve_device
    from consissr.io import atomic_dir, write_json
    from consissr.models.backbone import EMBEDDED, tiny_vae_config

    out_dir = Path(out_dir)
    if pretrained != EMBEDDED:
        metrics: dict[str, Any] = {"trained": False, "reason": f"backbone {pretrained!r} keeps its own VAE"}
        with atomic_dir(out_dir) as tmp:
            write_json(tmp / METRICS_NAME, metrics)
        log.info("train_vae: %s", metrics["reason"])
        return metrics

    photos, held = load_photos(sources, extensions, train.holdout, train.crop_size)
    evals = {"holdout": list(held.values())} if held else {}
    evals.update(_eval_dir_images(eval_dirs, extensions))
    work = resolve_device(device)
    torch.manual_seed(seed)
    vae = AutoencoderKL(**tiny_vae_config()).to(work)
    perceptual, lpips_state = load_lpips(train.lpips_weight)
    log.info("train_vae: %d training photos, held out %s; %d steps of %d crops %d²; LPIPS %s",
             len(photos), list(held) or "none", train.steps, train.batch_size, train.crop_size, lpips_state)
    params = {"base.seed": seed, "base.device": device, "backbone.pretrained": pretrained,
              "prepare.sources": sources, "prepare.extensions": extensions, "prepare.eval_dirs": eval_dirs,
              "train_vae": train}
    with tracking.start_run("train_vae", params=params) as run, _torch_threads(train.threads):
        curve: dict[str, list[float]] = {"loss": [], "l1": []}
        curve_steps: list[int] = []
        bar = tqdm(total=train.steps, desc="train_vae", unit="step")

        def on_step(step: int, elapsed: float, parts: dict[str, float]) -> None:
            bar.update(1)
            run.log_metrics({f"vae_{k}": v for k, v in parts.items()}, step=step)
            if step % 10 == 0 or step == train.steps:
                curve_steps.append(step)
                curve["loss"].append(parts["loss"])
                curve["l1"].append(parts["l1"])
                bar.set_postfix(loss=f"{parts['loss']:.4f}")

        start = time.perf_counter()
        photos_dev = [p.to(work) for p in photos]
        train_autoencoder(vae, photos_dev, steps=train.steps, batch_size=train.batch_size,
                          crop_size=train.crop_size, lr=train.lr, kl_weight=train.kl_weight, seed=seed,
                          perceptual=perceptual, perceptual_weight=train.lpips_weight,
                          warmup_steps=train.warmup_steps, max_grad_norm=train.max_grad_norm,
                          ema_decay=train.ema_decay, on_step=on_step)
        seconds = time.perf_counter() - start
        bar.close()
        # LDM §4.3.2: latents rescaled to unit variance by 1/std of the training latents
        std = latent_std(vae, photos_dev, crop_size=train.crop_size, count=64, seed=seed)
        vae.register_to_config(scaling_factor=1.0 / std)
        vae.to("cpu")
        metrics = {
            "trained": True, "steps": train.steps, "training_photos": len(photos), "holdout": list(held),
            "latent_channels": vae.config.latent_channels, "vae_scale_factor": vae_scale_factor(vae),
            "latent_std": std, "scaling_factor": 1.0 / std, "lpips": lpips_state,
            "psnr_y": {}, "psnr_rgb": {}, "channel_mean_error": {}}
        for key, images in evals.items():  # PSNR(RGB) and the channel means catch a VAE that loses colour
            for name, value in colour_errors(reconstruction_pairs(vae, images)).items():
                metrics[name][key] = value
        timing = {"train_seconds": round(seconds, 1), "threads": torch.get_num_threads(), "device": str(work)}
        grid = reconstruction_grid(vae, [im for images in evals.values() for im in images][:4] or photos[:2])
        with atomic_dir(out_dir) as tmp:
            vae.save_pretrained(tmp, safe_serialization=True)
            write_json(tmp / METRICS_NAME, metrics)
            write_json(tmp / TRAIN_LOG, timing)
            _save_png(tmp / GRID_NAME, grid)
        log.info("train_vae: %.1f s; reconstruction PSNR(Y) %s, PSNR(RGB) %s; scaling_factor %.4f", seconds,
                 {k: round(v, 2) for k, v in metrics["psnr_y"].items()},
                 {k: round(v, 2) for k, v in metrics["psnr_rgb"].items()}, 1.0 / std)
        run.log_metrics({"vae_train_seconds": seconds, "vae_scaling_factor": 1.0 / std,
                         **{f"vae_{m}_{_metric_key(k)}": v for m in ("psnr_y", "psnr_rgb")
                            for k, v in metrics[m].items()}},
                        step=train.steps)
        run.log_image(grid, GRID_NAME)
        run.log_plot("plots/vae_loss.png", curve_steps, curve, logy=True)
        run.log_artifact(out_dir, "vae")
    return {**metrics, **timing}


@contextlib.contextmanager
def _torch_threads(count: int) -> Iterator[None]:
    """torch's CPU threads set to ``count`` (0: unchanged) inside the block."""
    before = torch.get_num_threads()
    if count:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def vae_ceiling(prepared_dir: str | Path, degraded_dir: str | Path, backbone_dir: str | Path, out: str | Path, *,
                backbone: Any, device: str = "auto") -> dict[str, Any]:
    """Stage ``vae_ceiling``: what the backbone's VAE can show of the training crops, against bicubic.

    ``ceiling_psnr_y``: decode(encode(HQ)) vs HQ over ``prepared/hq`` (what the HQ column of
    train_sdsr's sample grid shows); ``bicubic_x4_psnr_y``: ``degraded/lq_up`` (the degraded LQ,
    bicubic ×scale) vs HQ. Writes the JSON ``out`` (a DVC metrics file) and logs both to MLflow.
    """
    from consissr import tracking
    from consissr.data import layout
    from consissr.data.latent_cache import resolve_device
    from consissr.io import write_json
    from consissr.models.backbone import load_vae, resolve_source

    prepared_dir, degraded_dir = Path(prepared_dir), Path(degraded_dir)
    source = resolve_source(backbone.pretrained, backbone_dir)
    vae = load_vae(source, revision=backbone.revision).to(resolve_device(device)).eval()
    ids = layout.read_ids(degraded_dir, written_by="degrade")
    hq = [layout.read_rgb(layout.image_path(prepared_dir, layout.HQ, i)) for i in ids]
    bicubic = mean_psnr_y([(layout.read_rgb(layout.image_path(degraded_dir, layout.LQ_UP, i)), h)
                           for i, h in zip(ids, hq)])
    rec = colour_errors(reconstruction_pairs(vae, hq))
    ceiling = rec["psnr_y"]
    metrics = {"backbone": source, "pairs": len(hq), "ceiling_psnr_y": ceiling, "bicubic_x4_psnr_y": bicubic,
               "ceiling_over_bicubic_db": ceiling - bicubic, "ceiling_psnr_rgb": rec["psnr_rgb"],
               "ceiling_channel_mean_error": rec["channel_mean_error"]}
    write_json(out, metrics)
    log.info("vae_ceiling: VAE reconstruction PSNR(Y) %.2f dB (RGB %.2f dB), bicubic x4 of the degraded LQ %.2f dB "
             "(%d crops)", ceiling, rec["psnr_rgb"], bicubic, len(hq))
    with tracking.start_run("vae_ceiling", params={"backbone": backbone, "base.device": device},
                            inputs={"prepared": prepared_dir, "degraded": degraded_dir,
                                    "backbone": Path(backbone_dir)}) as run:
        run.log_metrics({k: v for k, v in metrics.items() if isinstance(v, float)}, step=0)
        run.log_image(reconstruction_grid(vae, hq[:4]), "vae_ceiling_grid.png")
    return metrics


def _metric_key(name: str) -> str:
    return "".join(c if c.isalnum() or c in "_-./" else "_" for c in name)


def _eval_dir_images(eval_dirs: Sequence[str], extensions: Sequence[str]) -> dict[str, list[torch.Tensor]]:
    """{"eval:<folder>": photos} for ``prepare.eval_dirs`` (the evaluation images)."""
    from consissr.data.images import ImageError
    from consissr.data.sources import _files, load_rgb

    out: dict[str, list[torch.Tensor]] = {}
    for entry in eval_dirs:
        images = []
        for _, path in _files(entry, tuple(extensions)):
            try:
                images.append(to_tensor(load_rgb(path)[0]))
            except ImageError as exc:
                log.warning("train_vae: skip evaluation image: %s", exc)
        if images:
            out[f"eval:{entry}"] = images
    return out
