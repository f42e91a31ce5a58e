"""The one reader of a user's image files (prepare, upscale, evaluation datasets).

``read_image`` checks the pixel count from the header before decoding (``max_pixels``: above it a
"larger than the limit" error, never PIL's bomb traceback), decodes with at most one extra copy of
the pixels, keeps 16-bit samples and the alpha channel, applies the EXIF orientation, and raises
``ImageError`` naming the file and the problem. Callers choose what to do with the pixels:
``DecodedImage.rgb8`` is prepare's normalisation, ``color_float``/``alpha_float`` feed upscale.
"""

from __future__ import annotations

import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from consissr.errors import InputError

# PIL's own default (Image.MAX_IMAGE_PIXELS: 1 GiB of 24-bit pixels / 4 / 3 = 89.5 Mpx)
DEFAULT_MAX_PIXELS = 89_478_485
_JPEG_DRAFT_SCALES = (2, 4, 8)  # libjpeg's DCT scaling: decode at 1/2, 1/4, 1/8 for free
_PIL_LIMIT_LOCK = threading.Lock()


class ImageError(InputError):
    """A file that cannot be used as an image; ``str()`` is "<path>: <reason>"."""

    def __init__(self, path: str | Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = str(path), reason


@dataclass
class DecodedImage:
    """Pixels as stored: H×W×C with C = 1 (gray), 2 (gray+alpha), 3 (RGB) or 4 (RGBA); uint8 or uint16."""

    path: Path
    pixels: np.ndarray
    notes: list[str] = field(default_factory=list)  # what reading did (EXIF orientation, CMYK, draft scale)

    @property
    def bits(self) -> int:
        return 16 if self.pixels.dtype == np.uint16 else 8

    @property
    def is_gray(self) -> bool:
        return self.pixels.shape[2] <= 2

    @property
    def has_alpha(self) -> bool:
        return self.pixels.shape[2] in (2, 4)

    @property
    def size(self) -> tuple[int, int]:
        return self.pixels.shape[1], self.pixels.shape[0]

    def color_float(self) -> np.ndarray:
        """H×W×3 float32 in [0, 1] (gray replicated; alpha left out), full precision of 16-bit input."""
        color = self.pixels[..., :1] if self.is_gray else self.pixels[..., :3]
        out = np.empty((*color.shape[:2], 3), np.float32)
        np.multiply(color, np.float32(1.0 / (65535 if self.bits == 16 else 255)), out=out, casting="unsafe")
        return out

    def alpha_float(self) -> np.ndarray | None:
        """H×W float32 in [0, 1], or None without an alpha channel."""
        if not self.has_alpha:
            return None
        return self.pixels[..., -1].astype(np.float32) / (65535 if self.bits == 16 else 255)

    def rgb8(self) -> tuple[np.ndarray, list[str]]:
        """8-bit RGB for training crops: 16-bit rounded (v/257), alpha composited on white, gray replicated."""
        notes = list(self.notes)
        px = self.pixels
        if px.dtype == np.uint16:
            notes.append("16-bit " + ("grayscale" if self.is_gray else "colour") + " scaled to 8-bit")
            px = ((px.astype(np.uint32) * 2 + 257) // 514).astype(np.uint8)  # round(v / 257), no ties
        if self.has_alpha:
            color, alpha = px[..., :-1].astype(np.uint16), px[..., -1:].astype(np.uint16)
            # c·a + 255·(255 − a) ≤ 65025 fits uint16; + 127 rounds the division
            px = ((color * alpha + 255 * (255 - alpha) + 127) // 255).astype(np.uint8)
            notes.append(f"{'gray' if self.is_gray else 'colour'} with alpha composited on white")
        if px.shape[2] == 1:
            px = np.repeat(px, 3, axis=2)
            notes.append("grayscale replicated to RGB")
        return np.ascontiguousarray(px), notes


def read_image(path: str | Path, *, max_pixels: int = DEFAULT_MAX_PIXELS, min_side: int | None = None
               ) -> DecodedImage:
    """Decode ``path`` (first frame of an animation) or raise ``ImageError``.

    Above ``max_pixels`` the file is refused before decoding, unless it is a JPEG and ``min_side`` is
    given: then libjpeg decodes it at the smallest 1/2, 1/4 or 1/8 scale that fits the limit while
    the shorter side stays ≥ ``min_side`` (what the caller's crops need), and a note says so.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise ImageError(path, f"cannot read: {exc.strerror or exc}") from None
    if size == 0:
        raise ImageError(path, "empty file (0 bytes)")
    try:
        with _open_unlimited(path) as img:
            notes = _limit_or_draft(path, img, max_pixels, min_side)
            if getattr(img, "is_animated", False):
                img.seek(0)
            img.load()
            orientation = _orientation(img)
            pixels, mode_notes = _pixels(path, img, bool(notes))
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError(path, "not an image (no decoder recognises it)") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageError(path, f"corrupt or truncated image: {exc}") from None
    if orientation not in (0, 1):
        pixels = np.ascontiguousarray(orient(pixels, orientation))
        notes.append(f"EXIF orientation {orientation} applied")
    return DecodedImage(path, pixels, notes + mode_notes)


class _open_unlimited:
    """``Image.open`` with PIL's global bomb check lifted for the header read only: the caller's own
    ``max_pixels`` replaces it (PIL would raise or warn at its own limit, without a usable message)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __enter__(self) -> Image.Image:
        with _PIL_LIMIT_LOCK, warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
            try:
                self.img = Image.open(self.path)
            finally:
                Image.MAX_IMAGE_PIXELS = saved
        return self.img

    def __exit__(self, *exc) -> None:
        self.img.close()


def _limit_or_draft(path: Path, img: Image.Image, max_pixels: int, min_side: int | None) -> list[str]:
    w, h = img.size
    if w * h <= max_pixels:
        return []
    if min_side is not None and img.format == "JPEG":
        for k in _JPEG_DRAFT_SCALES:
            dw, dh = -(-w // k), -(-h // k)  # libjpeg rounds the scaled size up
            if min(dw, dh) < min_side:
                break
            if dw * dh <= max_pixels:
                img.draft(img.mode, (dw, dh))
                return [(f"decoded at 1/{k} scale ({img.size[0]}x{img.size[1]}, JPEG draft mode): "
                         f"{w * h} pixels > the limit {max_pixels}")]
    raise ImageError(path, f"larger than the limit: {w * h} pixels > {max_pixels} ({w}x{h})")


def _orientation(img: Image.Image) -> int:
    try:
        return int(img.getexif().get(0x0112, 1))
    except (ValueError, TypeError, KeyError, OSError, SyntaxError):  # a malformed EXIF block keeps the picture
        return 1


def orient(a: np.ndarray, orientation: int) -> np.ndarray:
    """EXIF orientation 1–8 applied to H×W(×C) pixels, as ``PIL.ImageOps.exif_transpose`` does."""
    if orientation in (5, 6, 7, 8):
        a = np.swapaxes(a, 0, 1)  # transpose, then the flips below
        flips = {5: (), 6: (1,), 7: (0, 1), 8: (0,)}[orientation]
    else:
        flips = {2: (1,), 3: (0, 1), 4: (0,)}.get(orientation, ())
    return np.flip(a, flips) if flips else a


def _pixels(path: Path, img: Image.Image, drafted: bool) -> tuple[np.ndarray, list[str]]:
    mode = img.mode
    if mode in ("RGB", "RGBA", "LA") and not drafted and _bit_depth(img) == 16:
        wide = _read_16bit(path, mode)
        if wide is not None:
            return wide, []
    if mode in ("I;16", "I;16L", "I;16B", "I;16N"):
        return _as_array(img, None).astype(np.uint16, copy=False)[..., None], []
    if mode in ("I", "F"):  # 32-bit integer or float gray: 16-bit when the values need it
        arr = np.asarray(img)
        wide = arr.max(initial=0) > 255
        out = np.clip(np.rint(arr), 0, 65535 if wide else 255).astype(np.uint16 if wide else np.uint8)
        return out[..., None], [f"{mode} grayscale read as {'16' if wide else '8'}-bit"]
    notes, convert = [], None
    if mode == "1":
        convert = "L"
    elif mode == "P" or mode == "PA":
        convert = "RGBA" if mode == "PA" or "transparency" in img.info else "RGB"
    elif mode not in ("L", "LA", "RGB", "RGBA"):
        notes.append(f"{mode} converted to RGB")
        convert = "RGBA" if "A" in mode else "RGB"
    arr = _as_array(img, convert)
    return (arr[..., None] if arr.ndim == 2 else arr), notes


def _as_array(img: Image.Image, convert: str | None) -> np.ndarray:
    # strip by strip into one array: ``np.asarray(img)`` would hold a bytes copy and the array at
    # once (and ``convert`` a third full image) beside PIL's own 4-bytes-per-pixel buffer
    w, h = img.size
    step = max(1, (1 << 22) // max(w, 1))  # ~4 Mpx per strip
    out = None
    for y in range(0, h, step):
        strip = img.crop((0, y, w, min(y + step, h)))
        a = np.asarray(strip.convert(convert) if convert else strip)
        if out is None:
            out = np.empty((h, *a.shape[1:]), a.dtype)
        out[y:y + a.shape[0]] = a
    return out


def _read_16bit(path: Path, mode: str) -> np.ndarray | None:
    # Pillow decodes 16-bit colour (and gray+alpha) PNG/TIFF to 8 bits by truncation; OpenCV keeps
    # all 16 (its own pixel limit, 2**30, is above any max_pixels that passes the check above).
    import cv2

    raw = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if raw is None or raw.dtype != np.uint16 or raw.ndim != 3:
        return None
    if mode == "LA":
        return np.ascontiguousarray(raw[..., [0, 3]] if raw.shape[2] == 4 else raw[..., :1])
    return cv2.cvtColor(raw, cv2.COLOR_BGRA2RGBA if raw.shape[2] == 4 else cv2.COLOR_BGR2RGB)


def _bit_depth(img: Image.Image) -> int:
    if img.format == "PNG":
        # Pillow does not expose the PNG bit depth: it is byte 24 of the file (IHDR)
        fp = getattr(img, "filename", None)
        if fp:
            with open(fp, "rb") as f:
                head = f.read(25)
            if head[:8] == b"\x89PNG\r\n\x1a\n":
                return head[24]
    if img.format == "TIFF":
        bps = img.tag_v2.get(258) if hasattr(img, "tag_v2") else None
        if bps:
            return int(bps[0] if isinstance(bps, tuple) else bps)
    return 8
