"""Real-ESRGAN second-order degradation (Wang et al. 2021, §3.1): the ``degrade`` stage.

    LQ = JPEG ∘ [resize ↓s + sinc] ∘ (JPEG ∘ noise ∘ resize ∘ blur)² (USM(HQ))      (x4plus settings, paper §4.1)

``sample_kernels`` and ``degrade`` mirror realesrgan 0.3.0's ``RealESRGANDataset.__getitem__``
and ``RealESRGANModel.feed_data`` draw for draw (same global RNG calls, same order); what changes is
how two filters are summed, for speed: the USM Gaussian as two 1-D passes (``usm_sharp_separable``)
and, on CPU, the random blurs by OpenCV (``blur``). ``degrade_folder`` is the
stage: ``hq/<id>.png`` → ``lq/``, ``lq_up/``, ``index.json``, ``report.json``, each image under
its own seed (``layout.item_seed``); a bad input is skipped and reported, never fatal.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import math
import random
import re
from pathlib import Path
from typing import Any, Iterator

import cv2
import numpy as np
import torch
from PIL import Image
from torch.nn import functional as F

from consissr.compat import (
    ContiguousDiffJPEG,
    bound_onednn_primitive_cache,
    circular_lowpass_kernel,
    filter2D,
    random_add_gaussian_noise_pt,
    random_add_poisson_noise_pt,
    random_mixed_kernels,
    thread_private_random,
)
from consissr.config import DegradationOrder, DegradeParams, ParallelParams
from consissr.data import layout
from consissr.data.parallel import run_shards, shard_size, split
from consissr.errors import InputError
from consissr.io import atomic_dir, write_json

log = logging.getLogger(__name__)

_RESIZE_MODES = ["area", "bilinear", "bicubic"]  # the list feed_data draws from
_SAFE_ID = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")  # an id is used as a file name


# --------------------------------------------------------------------------------------------
# seeding
# --------------------------------------------------------------------------------------------
@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Seed python ``random``, numpy and torch's global RNGs (the ones Real-ESRGAN's code draws
    from), and restore their previous states on exit so callers' streams are left untouched.
    This thread's ``random.*`` draws come from a private generator seeded alike, so another thread
    (a Dask worker's event loop) cannot shift them (``compat.thread_private_random``)."""
    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    try:
        with thread_private_random(seed):
            yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])


# --------------------------------------------------------------------------------------------
# kernels: RealESRGANDataset.__getitem__
# --------------------------------------------------------------------------------------------
def _order_kernel(order: DegradationOrder, p: DegradeParams) -> np.ndarray:
    """One order's blur kernel, zero-padded to ``kernel_pad_size`` (dataset lines for kernel1/2)."""
    kernel_size = random.choice(p.kernel_range)
    if np.random.uniform() < order.sinc_prob:
        # this sinc filter setting is for kernels ranging from [7, 21]
        if kernel_size < 13:
            omega_c = np.random.uniform(np.pi / 3, np.pi)
        else:
            omega_c = np.random.uniform(np.pi / 5, np.pi)
        kernel = circular_lowpass_kernel(omega_c, kernel_size, pad_to=False)
    else:
        kernel = random_mixed_kernels(
            list(order.kernel_list), list(order.kernel_prob), kernel_size,
            order.blur_sigma, order.blur_sigma, [-math.pi, math.pi],
            order.betag_range, order.betap_range, noise_range=None)
    pad_size = (p.kernel_pad_size - kernel_size) // 2
    return np.pad(kernel, ((pad_size, pad_size), (pad_size, pad_size)))


def sample_kernels(p: DegradeParams) -> dict[str, torch.Tensor]:
    """Draw ``kernel1``, ``kernel2`` and ``sinc_kernel`` (float32, ``kernel_pad_size`` square)
    exactly as ``RealESRGANDataset.__getitem__`` does, from the global ``random``/``np.random``."""
    kernel1 = _order_kernel(p.first, p)
    kernel2 = _order_kernel(p.second, p)
    # the final sinc kernel (a pulse, i.e. no filtering, with probability 1 - final_sinc_prob)
    if np.random.uniform() < p.final_sinc_prob:
        kernel_size = random.choice(p.kernel_range)
        omega_c = np.random.uniform(np.pi / 3, np.pi)
        sinc_kernel = torch.FloatTensor(circular_lowpass_kernel(omega_c, kernel_size, pad_to=p.kernel_pad_size))
    else:
        sinc_kernel = torch.zeros(p.kernel_pad_size, p.kernel_pad_size)
        sinc_kernel[p.kernel_pad_size // 2, p.kernel_pad_size // 2] = 1
    return {"kernel1": torch.FloatTensor(kernel1), "kernel2": torch.FloatTensor(kernel2),
            "sinc_kernel": sinc_kernel}


# --------------------------------------------------------------------------------------------
# USM sharpening
# --------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=4)
def _gaussian_1d(radius: int) -> np.ndarray:
    # basicsr's USMSharp: cv2.getGaussianKernel(radius, sigma=0) (sigma = 0.3*((radius-1)/2-1)+0.8),
    # which it turns into the 2-D kernel outer(g, g) and casts to float32
    return cv2.getGaussianKernel(radius, 0)[:, 0].astype(np.float32)


def _gaussian_blur_separable(img: torch.Tensor, kernel_1d: np.ndarray) -> torch.Tensor:
    """``filter2D(img, outer(k, k))`` as two 1-D passes (rows, then columns).

    ``filter2D`` pads with ``F.pad(mode="reflect")`` (mirror without repeating the edge pixel,
    i.e. cv2.BORDER_REFLECT_101) on all four sides and convolves with no padding; the Gaussian is
    symmetric, so correlation = convolution. On CPU, cv2.sepFilter2D with BORDER_REFLECT_101 is
    that sum up to float32 rounding (8 ms for a 512² RGB image here, vs 54 ms for two torch 1-D conv2d and 310 ms
    for filter2D); on other devices the two 1-D torch convolutions over the reflect-padded image.
    """
    b, c, h, w = img.shape
    k = kernel_1d.size
    if img.device.type == "cpu" and img.dtype == torch.float32:
        planes = img.detach().reshape(b * c, h, w).numpy()
        out = np.stack([cv2.sepFilter2D(plane, -1, kernel_1d, kernel_1d, borderType=cv2.BORDER_REFLECT_101)
                        for plane in planes])
        return torch.from_numpy(out).view(b, c, h, w)
    kernel = torch.from_numpy(kernel_1d).to(img)
    x = F.pad(img, (k // 2, k // 2, k // 2, k // 2), mode="reflect").reshape(b * c, 1, h + k - 1, w + k - 1)
    x = F.conv2d(x, kernel.view(1, 1, 1, k))
    x = F.conv2d(x, kernel.view(1, 1, k, 1))
    return x.view(b, c, h, w)


def usm_sharp_separable(img: torch.Tensor, *, radius: int = 51, weight: float = 0.5,
                        threshold: float = 10.0) -> torch.Tensor:
    """basicsr's ``USMSharp`` (same Gaussian, padding, mask threshold, soft mask and weight),
    blurring with two 1-D convolutions instead of one 51x51 2-D one.

    Why: on CPU ``USMSharp``'s two ``filter2D`` calls with the 51x51 Gaussian cost 2601
    multiply-adds per pixel and are ~80% of the reference degradation time; the Gaussian is
    separable (``USMSharp`` builds it as ``outer(g, g)``), so 2 x 51 taps give the same sum
    (benchmarks/README.md, "Degradation throughput"). The blurs differ from ``filter2D``'s by
    float32 rounding (~3e-6, the size of ``filter2D``'s own error against a float64 blur); where
    a residual lies within that noise of the threshold the hard mask can flip, which moves the
    output nearby by up to ~6e-4 (tests/test_degradation.py states and bounds both).

    Args:
        img: (B, C, H, W) in [0, 1].
        radius: Gaussian kernel size (made odd as ``USMSharp`` does; its default 50 -> 51).
        weight: sharpening weight, ``sharp = img + weight * (img - blur)``.
        threshold: residuals above ``threshold / 255`` enter the (then blurred) mask.
    """
    if radius % 2 == 0:
        radius += 1
    kernel_1d = _gaussian_1d(radius)
    blur = _gaussian_blur_separable(img, kernel_1d)
    residual = img - blur
    mask = (torch.abs(residual) * 255 > threshold).float()
    soft_mask = _gaussian_blur_separable(mask, kernel_1d)
    sharp = torch.clip(img + weight * residual, 0, 1)
    return soft_mask * sharp + (1 - soft_mask) * img


# --------------------------------------------------------------------------------------------
# the random blurs
# --------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=2)
def _pulse(k: int) -> torch.Tensor:
    pulse = torch.zeros(1, k, k)
    pulse[0, k // 2, k // 2] = 1
    return pulse


def blur(img: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """basicsr's ``filter2D(img, kernel)``: reflect padding, then correlation with the (1, K, K)
    kernel shared by the batch or with each item's of a (B, K, K) one.

    On CPU float32 each plane goes through ``cv2.filter2D`` (``BORDER_REFLECT_101`` is torch's
    "reflect"): the 21x21 blur of a 512² RGB image takes ~25 ms on one thread here against ~200 ms
    for torch's convolution of a one-channel image (benchmarks/README.md, "Degradation
    throughput"). The kernels are random (rotated anisotropic Gaussians, sinc, plateau), so not
    separable. The sums differ from ``filter2D``'s by float32 rounding (<= 1.3e-6), which a later
    rounding can amplify (tests/test_degradation.py says when). Other devices and dtypes, and the
    sizes ``filter2D`` rejects, keep ``filter2D``.
    """
    b, c, h, w = img.shape
    k = kernel.size(-1)
    if img.device.type != "cpu" or img.dtype != torch.float32 or k % 2 == 0 or k // 2 >= min(h, w):
        return filter2D(img, kernel)
    kernel = kernel.detach().to(torch.float32)
    if torch.equal(kernel, _pulse(k).expand_as(kernel)):  # the final "sinc" when not drawn: filter2D's
        return img.clone()                                 # sum is then exactly the pixel itself
    planes = img.detach().contiguous().numpy()
    kernels = kernel.contiguous().numpy()
    out = np.empty_like(planes)
    for i in range(b):
        kern = kernels[0 if kernels.shape[0] == 1 else i]
        for j in range(c):
            cv2.filter2D(planes[i, j], -1, kern, dst=out[i, j], borderType=cv2.BORDER_REFLECT_101)
    return torch.from_numpy(out)


# --------------------------------------------------------------------------------------------
# the degradation: RealESRGANModel.feed_data
# --------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def _jpeger() -> ContiguousDiffJPEG:
    return ContiguousDiffJPEG(differentiable=False)  # feed_data's DiffJPEG(differentiable=False)


def _random_scale(order: DegradationOrder) -> float:
    updown_type = random.choices(["up", "down", "keep"], order.resize_prob)[0]
    if updown_type == "up":
        return np.random.uniform(1, order.resize_range[1])
    if updown_type == "down":
        return np.random.uniform(order.resize_range[0], 1)
    return 1


def _add_noise(out: torch.Tensor, order: DegradationOrder) -> torch.Tensor:
    if np.random.uniform() < order.gaussian_noise_prob:
        return random_add_gaussian_noise_pt(out, sigma_range=order.noise_range, clip=True, rounds=False,
                                            gray_prob=order.gray_noise_prob)
    return random_add_poisson_noise_pt(out, scale_range=order.poisson_scale_range, gray_prob=order.gray_noise_prob,
                                       clip=True, rounds=False)


def _jpeg(out: torch.Tensor, order: DegradationOrder) -> torch.Tensor:
    jpeg_p = out.new_zeros(out.size(0)).uniform_(*order.jpeg_range)
    out = torch.clamp(out, 0, 1)  # clamp to [0, 1], otherwise JPEGer will result in unpleasant artifacts
    return _jpeger()(out, quality=jpeg_p)


def _resize_back_and_sinc(out: torch.Tensor, size: tuple[int, int], sinc_kernel: torch.Tensor) -> torch.Tensor:
    mode = random.choice(_RESIZE_MODES)
    out = F.interpolate(out, size=size, mode=mode)
    return blur(out, sinc_kernel)


def _batched(kernel: torch.Tensor) -> torch.Tensor:
    return kernel.unsqueeze(0) if kernel.dim() == 2 else kernel


@torch.no_grad()
def degrade(hq: torch.Tensor, kernels: dict[str, torch.Tensor], p: DegradeParams) -> tuple[torch.Tensor, torch.Tensor]:
    """Real-ESRGAN's second-order degradation of ``hq``; returns ``(lq, lq_up)``.

    The steps, and every draw from ``random`` / ``np.random`` / torch's RNG, follow
    ``RealESRGANModel.feed_data`` in order, so with the same RNG states and kernels the result is
    the reference's (up to the float32 rounding of ``usm_sharp_separable`` and ``blur``, see the tests).

    Args:
        hq: (B, 3, H, W) float in [0, 1]; H and W multiples of ``p.scale``.
        kernels: ``sample_kernels`` output; each kernel (K, K) (shared by the batch) or (B, K, K).
        p: the degradation parameters (Real-ESRGAN x4plus by default).

    Returns:
        lq: (B, 3, H/scale, W/scale), values in {0, 1/255, ..., 1}.
        lq_up: ``lq`` resized back to (H, W) with bicubic, clamped and rounded to 8 bit (the
            image ConsisSR conditions on).
    """
    if hq.dim() != 4 or hq.size(1) != 3:
        raise ValueError(f"hq must be (B, 3, H, W), got {tuple(hq.shape)}")
    ori_h, ori_w = hq.shape[-2:]
    if ori_h % p.scale or ori_w % p.scale:
        raise ValueError(f"hq size {ori_h}x{ori_w} is not a multiple of degrade.scale={p.scale}")
    kernel1, kernel2, sinc_kernel = (_batched(kernels[k]).to(hq) for k in ("kernel1", "kernel2", "sinc_kernel"))

    # 0. USM-sharpen the GT (feed_data degrades gt_usm, not gt)
    gt_usm = usm_sharp_separable(hq, radius=p.usm_radius, weight=p.usm_weight,
                                 threshold=p.usm_threshold) if p.usm_sharpen else hq

    # 1. first order: blur (always, in feed_data), random resize, noise, JPEG
    out = gt_usm
    if p.first.blur_prob >= 1 or np.random.uniform() < p.first.blur_prob:  # no draw at prob 1, as feed_data
        out = blur(out, kernel1)
    scale = _random_scale(p.first)
    mode = random.choice(_RESIZE_MODES)
    out = F.interpolate(out, scale_factor=scale, mode=mode)
    out = _add_noise(out, p.first)
    out = _jpeg(out, p.first)

    # 2. second order: blur (with probability), random resize relative to H/scale, noise
    if np.random.uniform() < p.second.blur_prob:
        out = blur(out, kernel2)
    scale = _random_scale(p.second)
    mode = random.choice(_RESIZE_MODES)
    out = F.interpolate(out, size=(int(ori_h / p.scale * scale), int(ori_w / p.scale * scale)), mode=mode)
    out = _add_noise(out, p.second)

    # 3. [resize back + sinc filter] and JPEG, in random order (Real-ESRGAN §3.1: other orders
    #    give twisted lines)
    lq_size = (ori_h // p.scale, ori_w // p.scale)
    if np.random.uniform() < 0.5:
        out = _resize_back_and_sinc(out, lq_size, sinc_kernel)
        out = _jpeg(out, p.second)
    else:
        out = _jpeg(out, p.second)
        out = _resize_back_and_sinc(out, lq_size, sinc_kernel)

    # 4. clamp and round to 8 bit; the upsampled copy for conditioning
    lq = torch.clamp((out * 255.0).round(), 0, 255) / 255.
    lq_up = F.interpolate(lq, size=(ori_h, ori_w), mode="bicubic", align_corners=False)
    lq_up = torch.clamp((lq_up * 255.0).round(), 0, 255) / 255.
    return lq.contiguous(), lq_up


def min_image_size(p: DegradeParams) -> int:
    """The smallest HQ side every random draw can degrade: the reflect padding of the USM
    Gaussian, of the blur kernel after the smallest first-order resize, and of the sinc kernel at
    H/scale must each be smaller than the side it pads (torch's reflect-pad rule)."""
    half = p.kernel_pad_size // 2
    sizes = [math.ceil((half + 1) / min(p.first.resize_range[0], 1.0)), (half + 1) * p.scale]
    if p.usm_sharpen:
        sizes.append((p.usm_radius | 1) // 2 + 1)
    return max(sizes)


# --------------------------------------------------------------------------------------------
# the stage
# --------------------------------------------------------------------------------------------
class _BadInput(Exception):
    """An HQ item that is skipped (the message is the reason written to report.json)."""


def _read_hq(path: Path, p: DegradeParams, min_size: int) -> torch.Tensor:
    try:
        with Image.open(path) as im:
            im.load()
            mode, arr = im.mode, np.asarray(im)
    except FileNotFoundError:
        raise _BadInput("file not found") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise _BadInput(f"unreadable image: {type(exc).__name__}: {exc}") from None
    if mode != "RGB":
        raise _BadInput(f"image mode {mode}, expected 8-bit RGB")
    h, w = arr.shape[:2]
    if h % p.scale or w % p.scale:
        raise _BadInput(f"size {h}x{w} is not a multiple of degrade.scale={p.scale}")
    if min(h, w) < min_size:
        raise _BadInput(f"size {h}x{w} is below the minimum side {min_size} for these degrade params")
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0).unsqueeze(0)


def _degrade_shard(todo: list[tuple[Any, str | None]], *, in_dir: Path, out_dir: Path, p: DegradeParams,
                   seed: int, variants: int) -> dict[str, list]:
    """Degrade one shard of (index item, reason to skip it or None) into ``out_dir``; return its records."""
    bound_onednn_primitive_cache()  # else the worker's memory grows with every image it degrades
    min_size = min_image_size(p)
    written: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    for item, reason in todo:
        image_id = item.get("id") if isinstance(item, dict) else None
        rel_hq = f"{layout.HQ}/{image_id}.png" if reason is None or "invalid id" not in reason else None
        try:
            if reason is not None:
                raise _BadInput(reason)
            hq = _read_hq(in_dir / rel_hq, p, min_size)
        except _BadInput as exc:
            log.warning("degrade: skipping %s (%s): %s", image_id, rel_hq, exc)
            skipped.append({"id": image_id if isinstance(image_id, str) else repr(image_id),
                            "path": rel_hq, "reason": str(exc)})
            continue
        record: dict[str, Any] = {}
        for v in range(variants):  # variant 0 is the set itself (lq/, lq_up/), the others v<k>/
            seed_v = layout.variant_seed(seed, image_id, v)
            with seeded(seed_v):
                kernels = sample_kernels(p)
                lq, lq_up = degrade(hq, kernels, p)
            folder = layout.variant_dir(out_dir, v)
            for kind, image in ((layout.LQ, lq), (layout.LQ_UP, lq_up)):
                layout.image_path(folder, kind, image_id).parent.mkdir(parents=True, exist_ok=True)
                layout.write_rgb_png(layout.image_path(folder, kind, image_id), image[0])
            paths = {kind: layout.image_path(folder, kind, image_id).relative_to(out_dir).as_posix()
                     for kind in (layout.LQ, layout.LQ_UP)}
            if v == 0:
                record = {"id": image_id, "hq": rel_hq, **paths,
                          "hq_size": list(hq.shape[-2:]), "lq_size": list(lq.shape[-2:]), "seed": seed_v}
                record.update({k: item[k] for k in ("source", "sha256") if k in item})
            else:
                record.setdefault("variants", []).append({**paths, "seed": seed_v})
        written.append(record)
    return {"written": written, "skipped": skipped}


def _degrade_set(in_dir: Path, tmp: Path, p: DegradeParams, *, seed: int, variants: int,
                 parallel: ParallelParams) -> dict[str, Any]:
    """Degrade the pair set of ``in_dir/index.json`` into the (temporary) folder ``tmp``; return its report."""
    items = layout.read_index(in_dir, written_by="prepare")
    # ids are checked here, before sharding: a duplicate is only visible over the whole list
    todo: list[tuple[Any, str | None]] = []
    seen: set[str] = set()
    for item in items:
        image_id = item.get("id") if isinstance(item, dict) else None
        reason = None
        if not isinstance(image_id, str) or not _SAFE_ID.fullmatch(image_id):
            reason = f"invalid id {image_id!r} (must be a plain file name)"
        elif image_id in seen:
            reason = "duplicate id"
        else:
            seen.add(image_id)
        todo.append((item, reason))
    (tmp / layout.LQ).mkdir(parents=True)
    (tmp / layout.LQ_UP).mkdir()
    fn = functools.partial(_degrade_shard, in_dir=in_dir, out_dir=tmp, p=p, seed=seed, variants=variants)
    recs = run_shards(fn, split(todo, shard_size(len(todo), parallel.workers)), parallel, desc="degrade")
    written = [w for r in recs for w in r["written"]]
    skipped = [s for r in recs for s in r["skipped"]]
    report = {"written": len(written), "skipped": skipped}
    if not written:
        first = f" (first problem: {skipped[0]['path']}: {skipped[0]['reason']})" if skipped else ""
        raise InputError(f"degrade: none of the {len(items)} items in {in_dir / layout.INDEX} could be "
                         f"degraded{first}")
    write_json(tmp / layout.REPORT, report)
    params = dataclasses.asdict(p)
    params.pop("variants")  # a property of the set (below), not of the degradation
    index = {"hq_dir": str(in_dir), "scale": p.scale, "base_seed": seed, "params": params, "items": written}
    if variants > 1:  # K = 1 keeps the earlier index bytes
        index["variants"] = variants
    write_json(tmp / layout.INDEX, index)
    log.info("degrade: wrote %d LQ images (%d variants each) from %s, skipped %d", len(written), variants, in_dir,
             len(skipped))
    return report


def degrade_folder(in_dir: str | Path, out_dir: str | Path, p: DegradeParams, *, seed: int,
                   parallel: ParallelParams | None = None) -> dict[str, Any]:
    """Degrade every item of ``in_dir/index.json`` (``in_dir/hq/<id>.png``) into ``out_dir``.

    Builds the folder beside ``out_dir`` and swaps it in when complete: ``lq/<id>.png`` (H/scale),
    ``lq_up/<id>.png`` (H), ``index.json`` (the written items: id, hq path relative to ``in_dir``,
    lq paths relative to ``out_dir``, sizes, per-image seed, plus the prepared item's source/sha256;
    with ``p.variants`` K > 1 also each item's ``variants`` [{lq, lq_up, seed}] of ``v<k>/``) and
    ``report.json`` (``{"written": n, "skipped": [{"id", "path", "reason"}]}``). A prepared
    ``clip/`` set (train_clip's centre crops) is degraded the same way into ``out_dir/clip/``, one
    variant. A missing, corrupt or unusable HQ file is skipped and reported; if no item can be
    degraded, raises ``InputError`` naming the first problem and leaves the previous ``out_dir`` as
    it was. Shards of the items run on ``parallel``'s Dask cluster.

    Returns the report dict.
    """
    in_dir, out_dir = Path(in_dir), Path(out_dir)
    parallel = parallel or ParallelParams()
    layout.read_index(in_dir, written_by="prepare")  # a missing index fails before any work
    # the folder is built beside out_dir and swapped in whole: no stale or half-written outputs
    with atomic_dir(out_dir) as tmp:
        report = _degrade_set(in_dir, tmp, p, seed=seed, variants=p.variants, parallel=parallel)
        if (in_dir / layout.CLIP / layout.INDEX).is_file():
            _degrade_set(in_dir / layout.CLIP, tmp / layout.CLIP, p, seed=seed, variants=1, parallel=parallel)
    log.info("degrade: wrote %d LQ images to %s, skipped %d", report["written"], out_dir, len(report["skipped"]))
    return report
