"""``consissr upscale``: files and folders through any upscaler with the pipeline's call signature.

RGB goes through the pipeline as float32 [0, 1] (16-bit precision kept); an alpha channel is
upscaled by the GAN alone and re-attached; gray in gives gray out; 16-bit in gives 16-bit out;
EXIF orientation is applied by the reader. A bad file is reported and skipped; an existing output
is kept unless ``overwrite``. Outputs are PNG, written atomically.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from PIL import Image
from tqdm import tqdm

from consissr.data.images import DEFAULT_MAX_PIXELS, DecodedImage, ImageError, read_image
from consissr.io import atomic_path

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
# below this many diffusion training steps (or with a random prior) outputs only show the machinery
BRIEF_TRAINING_STEPS = 10_000
_LUMA = np.array([0.299, 0.587, 0.114], np.float32)  # ITU-R BT.601, as PIL's convert("L")


class Upscaler(Protocol):
    """What ``upscale_files`` needs of ``consissr.inference.pipeline.ConsisSRPipeline``."""

    scale: int
    training_info: dict

    def __call__(self, image: Any, **kwargs: Any) -> Any: ...  # .images: N×H×W×3 float for output_type="np"

    def gan_upscale(self, image: np.ndarray) -> np.ndarray: ...


@dataclass
class UpscaleOptions:
    """The pipeline's knobs; ``None`` leaves the pipeline's default."""

    mode: str | None = None
    preset: str | None = None
    num_inference_steps: int | None = None
    t_max: int | None = None
    prompt: str | None = None
    negative_prompt: str | None = None
    guidance_scale: float | None = None
    hpa_scale: float | None = None
    color_fix: str | None = None
    seed: int | None = None
    tile_size: int | None = None

    def pipe_kwargs(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass
class UpscaleReport:
    written: list[str] = field(default_factory=list)
    failed: list[dict[str, str]] = field(default_factory=list)  # {"path", "reason"}

    @property
    def ok(self) -> bool:
        return not self.failed


def training_warning(info: dict, *, gan_hint: str = "use `--mode gan`") -> str | None:
    """The text to show once when the model is a briefly trained toy, else None."""
    if not info:
        return None
    steps, pretrained = info.get("steps"), info.get("prior_pretrained")
    if pretrained is not False and (steps is None or steps >= BRIEF_TRAINING_STEPS):
        return None
    what = ", ".join(x for x in (f"{steps} training steps" if steps is not None else "",
                                 "a prior trained from scratch" if pretrained is False else "",
                                 f"backbone {info['backbone']}" if info.get("backbone") else "") if x)
    return (f"this diffusion model is a briefly trained one ({what}): its images show the pipeline working, not "
            f"real super-resolution. For a real result on this machine {gan_hint} (Real-ESRGAN x4plus); for "
            "the diffusion model, train train_sdsr for many more steps or use the paper configuration with SD 2.1 "
            "(configs/paper.yaml).")


def collect_inputs(inputs: list[str | Path], out_dir: str | Path) -> list[tuple[Path, Path]]:
    """(input file, output PNG) pairs: a file goes to ``out_dir/<stem>.png``, a folder's images keep
    their sub-folders below ``out_dir``. Inputs whose outputs would share a name get ``<stem>_<ext>.png``."""
    out_dir = Path(out_dir)
    pairs: list[tuple[Path, Path]] = []
    for entry in map(Path, inputs):
        if entry.is_dir():
            files = sorted(p for p in entry.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
            pairs += [(p, out_dir / p.relative_to(entry).with_suffix(".png")) for p in files]
        else:  # a missing or unreadable file is reported when it is read
            pairs.append((entry, out_dir / (entry.stem + ".png")))
    counts: dict[Path, int] = {}
    for _, out in pairs:
        counts[out] = counts.get(out, 0) + 1
    return [(src, out.with_name(f"{src.stem}_{src.suffix.lstrip('.').lower()}.png") if counts[out] > 1 else out)
            for src, out in pairs]


def upscale_image(pipe: Upscaler, image: DecodedImage, options: UpscaleOptions) -> np.ndarray:
    """H×W×C pixels → (sH)×(sW)×C of the same channel layout and bit depth."""
    rgb = pipe(image.color_float(), output_type="np", **options.pipe_kwargs()).images[0]
    rgb = np.clip(np.asarray(rgb, np.float32), 0.0, 1.0)
    channels = [rgb @ _LUMA] if image.is_gray else [rgb[..., i] for i in range(3)]
    alpha = image.alpha_float()
    if alpha is not None:  # the GAN alone: the diffusion model knows nothing of transparency
        up = pipe.gan_upscale(np.repeat(alpha[..., None], 3, axis=2))
        channels.append(np.clip(np.asarray(up, np.float32).mean(axis=2), 0.0, 1.0))
    out = np.stack(channels, axis=2)
    peak = 65535 if image.bits == 16 else 255
    return np.rint(out * peak).astype(np.uint16 if image.bits == 16 else np.uint8)


def write_png(path: Path, pixels: np.ndarray) -> None:
    """H×W×C (1–4 channels, uint8 or uint16) as PNG, atomically."""
    with atomic_path(path) as tmp:
        if pixels.dtype == np.uint8:
            mode = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}[pixels.shape[2]]
            Image.fromarray(pixels[..., 0] if mode == "L" else pixels, mode).save(tmp, format="PNG")
            return
        import cv2

        if pixels.shape[2] == 2:  # no 16-bit gray+alpha writer: replicate the gray (still gray pixels)
            pixels = pixels[..., [0, 0, 0, 1]]
        order = {1: None, 3: cv2.COLOR_RGB2BGR, 4: cv2.COLOR_RGBA2BGRA}[pixels.shape[2]]
        data = pixels[..., 0] if order is None else cv2.cvtColor(pixels, order)
        if not cv2.imwrite(str(tmp), data):
            raise OSError(f"{path}: OpenCV could not write the PNG")


def upscale_files(pipe: Upscaler, inputs: list[str | Path], out_dir: str | Path, options: UpscaleOptions | None = None,
                  *, overwrite: bool = False, max_pixels: int = DEFAULT_MAX_PIXELS) -> UpscaleReport:
    """Upscale every input file (folders searched recursively) into ``out_dir``; never raises for one file."""
    options = options or UpscaleOptions()
    report = UpscaleReport()
    mode = options.mode or getattr(getattr(pipe, "defaults", None), "mode", None)
    warning = None if mode == "gan" else training_warning(getattr(pipe, "training_info", {}) or {})
    if warning:
        log.warning("%s", warning)
    pairs = collect_inputs(inputs, out_dir)
    if not pairs:
        raise FileNotFoundError(f"upscale: no image files in {[str(i) for i in inputs]}")
    for src, out in tqdm(pairs, desc="upscale", unit="img"):
        try:
            if out.exists() and not overwrite:
                raise FileExistsError(f"{out} exists (pass --overwrite to replace it)")
            image = read_image(src, max_pixels=max_pixels)
            write_png(out, upscale_image(pipe, image, options))
        except ImageError as exc:
            _fail(report, src, exc.reason)
        except (FileExistsError, OSError, ValueError, RuntimeError) as exc:
            _fail(report, src, str(exc))
        else:
            report.written.append(str(out))
            log.info("wrote %s", out)
    log.info("upscale: %d written, %d failed", len(report.written), len(report.failed))
    return report


def _fail(report: UpscaleReport, src: Path, reason: str) -> None:
    log.error("%s: %s", src, reason)
    report.failed.append({"path": str(src), "reason": reason})
