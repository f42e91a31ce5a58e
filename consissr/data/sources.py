"""Stage ``prepare``: image sources → normalised RGB → deterministic HQ crops.

``prepare.sources``: ``embedded`` (scikit-image's RGB photos), image folders (recursive, so
ImageNet's ``train/<class>/*.JPEG`` works) or list files. ``load_rgb`` normalises what it can and
rejects the rest with a reason; a bad file becomes a line in ``report.json``, never a stop.
Crops are seeded per source (``layout.item_seed``); the output folder is swapped in whole.
"""

from __future__ import annotations

import hashlib
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from tqdm import tqdm

from consissr.data import layout
from consissr.errors import InputError, MissingInputError
from consissr.io import atomic_dir, write_json

log = logging.getLogger(__name__)

# RGB photographs bundled in scikit-image's wheel (skimage.data.<name>()).
EMBEDDED_PHOTOS = (
    "astronaut", "chelsea", "coffee", "rocket", "motorcycle_left", "motorcycle_right",
    "hubble_deep_field", "retina", "immunohistochemistry", "colorwheel",
)


class BadImage(ValueError):
    """An input that cannot be turned into an RGB training image (the message says why)."""


@dataclass
class SourceImage:
    key: str  # stable, unique id stem
    label: str  # what a person would look for: a path or skimage:<name>
    load: Callable[[], tuple[np.ndarray, list[str]]]


# ---------------------------------------------------------------------------------------------
# decoding and normalisation
# ---------------------------------------------------------------------------------------------
def normalise(img: Image.Image) -> tuple[np.ndarray, list[str]]:
    """PIL image → HxWx3 uint8 RGB; returns the list of normalisations applied."""
    notes: list[str] = []
    transposed = ImageOps.exif_transpose(img)
    if transposed is not None and transposed is not img:
        orientation = img.getexif().get(0x0112, 1)
        if orientation != 1:
            notes.append(f"EXIF orientation {orientation} applied")
        img = transposed
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        peak = 65535.0 if mode.startswith("I;16") or arr.max() > 255 else 255.0
        arr = np.clip(np.round(arr / peak * 255.0), 0, 255).astype(np.uint8)
        notes.append(f"{mode} ({'16-bit' if peak > 255 else 'integer'}) grayscale scaled to 8-bit")
        img = Image.fromarray(arr, "L")
        mode = "L"
    has_alpha = mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in img.info)
    if has_alpha:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, rgba).convert("RGB")
        notes.append(f"{mode} with alpha composited on white")
    elif mode == "CMYK":
        img = img.convert("RGB")
        notes.append("CMYK converted to RGB")
    elif mode in ("L", "1"):
        img = img.convert("RGB")
        notes.append("grayscale replicated to RGB")
    elif mode != "RGB":
        img = img.convert("RGB")
        notes.append(f"{mode} converted to RGB")
    arr = np.asarray(img, dtype=np.uint8)
    return np.ascontiguousarray(arr), notes


def load_rgb(path: str | Path) -> tuple[np.ndarray, list[str]]:
    """Decode an image file into RGB uint8; raise ``BadImage`` naming the file and the problem."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise BadImage(f"{path}: cannot read: {exc.strerror or exc}") from None
    if size == 0:
        raise BadImage(f"{path}: empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                img.load()
                if getattr(img, "is_animated", False):
                    img.seek(0)
                return _normalise_16bit_rgb(path, img)
    except UnidentifiedImageError:
        raise BadImage(f"{path}: not an image (no decoder recognises it)") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombWarning) as exc:
        raise BadImage(f"{path}: corrupt or truncated image: {exc}") from None


def _normalise_16bit_rgb(path: Path, img: Image.Image) -> tuple[np.ndarray, list[str]]:
    # Pillow decodes 16-bit-per-channel colour PNG/TIFF to 8-bit "RGB" by truncation; OpenCV
    # keeps all 16 bits, so such files are re-read with it and rounded to 8 bits.
    if img.mode in ("RGB", "RGBA") and img.format in ("PNG", "TIFF") and _bit_depth(img) == 16:
        import cv2

        raw = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        if raw is not None and raw.dtype == np.uint16 and raw.ndim == 3:
            raw = cv2.cvtColor(raw, cv2.COLOR_BGRA2RGBA if raw.shape[2] == 4 else cv2.COLOR_BGR2RGB)
            arr8 = np.round(raw.astype(np.float64) / 257.0).astype(np.uint8)
            out, notes = normalise(Image.fromarray(arr8, "RGBA" if arr8.shape[2] == 4 else "RGB"))
            return out, ["16-bit colour scaled to 8-bit"] + notes
    return normalise(img)


def _bit_depth(img: Image.Image) -> int:
    if img.format == "PNG":
        # Pillow does not expose the PNG bit depth: read it from the IHDR chunk (byte 24)
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


def content_hash(rgb: np.ndarray) -> str:
    """Hash of decoded pixels (shape + bytes): equal images, whatever their file format."""
    h = hashlib.sha256(repr(rgb.shape).encode())
    h.update(np.ascontiguousarray(rgb).tobytes())
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# sources
# ---------------------------------------------------------------------------------------------
def _slug(text: str) -> str:
    out = "".join(c if c.isalnum() else "_" for c in text).strip("_")
    return out[-60:] or "img"


def _embedded_photo(name: str) -> np.ndarray:
    import skimage.data

    if name.startswith("motorcycle_"):  # stereo_motorcycle() returns (left, right, disparity)
        left, right, _ = skimage.data.stereo_motorcycle()
        return left if name.endswith("left") else right
    return getattr(skimage.data, name)()


def _embedded() -> Iterator[SourceImage]:
    for name in EMBEDDED_PHOTOS:
        def load(name=name):
            return normalise(Image.fromarray(np.asarray(_embedded_photo(name))))
        yield SourceImage(key=f"embedded_{name}", label=f"skimage:{name}", load=load)


def _files(entry: str, extensions: tuple[str, ...]) -> list[Path]:
    path = Path(entry)
    exts = {e.lower() for e in extensions}
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in exts)
    if path.is_file():
        lines = [ln.strip() for ln in path.read_text().splitlines()]
        return [(path.parent / ln) if not Path(ln).is_absolute() else Path(ln)
                for ln in lines if ln and not ln.startswith("#")]
    raise MissingInputError(f"prepare.sources: {entry!r} is neither 'embedded', a folder nor a list file")


def iter_sources(sources: tuple[str, ...], extensions: tuple[str, ...], duplicates: list | None = None
                 ) -> Iterator[SourceImage]:
    """Every image of every source once. The same file listed twice is yielded once (and noted in
    ``duplicates``); distinct files whose readable ids would clash get a hash of their path appended."""
    seen_files: set[str] = set()
    keys: set[str] = set()
    for index, entry in enumerate(sources):
        if entry == "embedded":
            items = list(_embedded())
        else:
            items = []
            for path in _files(entry, extensions):
                resolved = str(path.resolve())
                if resolved in seen_files:
                    if duplicates is not None:
                        duplicates.append({"path": str(path), "reason": "listed more than once; used once"})
                    continue
                seen_files.add(resolved)
                key = f"s{index}_{_slug(str(path))}"
                if key in keys:  # e.g. a-b.png and a_b.png, or a name cut by the slug's length
                    key = f"{key}_{hashlib.sha256(resolved.encode()).hexdigest()[:8]}"
                keys.add(key)
                items.append(SourceImage(key=key, label=str(path), load=lambda p=path: load_rgb(p)))
        for item in items:
            if entry == "embedded":
                if item.key in keys:  # `embedded` named twice
                    continue
                keys.add(item.key)
            yield item


def eval_hashes(eval_dirs: tuple[str, ...], extensions: tuple[str, ...]) -> dict[str, str]:
    """content hash → evaluation file, for the contamination guard."""
    out: dict[str, str] = {}
    for entry in eval_dirs:
        for path in _files(entry, extensions):
            try:
                rgb, _ = load_rgb(path)
            except BadImage as exc:
                log.warning("contamination guard: cannot read evaluation image: %s", exc)
                continue
            out[content_hash(rgb)] = str(path)
    return out


def crop_boxes(h: int, w: int, size: int, count: int, seed: int) -> list[tuple[int, int]]:
    """``count`` distinct top-left corners, the same for the same (image, seed)."""
    rng = np.random.default_rng(seed)
    boxes: list[tuple[int, int]] = []
    for _ in range(count * 4):
        box = (int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1)))
        if box not in boxes:
            boxes.append(box)
        if len(boxes) == count:
            break
    return boxes


# ---------------------------------------------------------------------------------------------
# stage
# ---------------------------------------------------------------------------------------------
class ContaminationError(InputError):
    pass


def prepare(p, *, out_dir: str | Path, seed: int) -> dict:
    """Write ``out_dir/hq/<id>.png`` crops, ``index.json`` and ``report.json``.

    ``p`` is ``config.PrepareParams``. Raises ``ContaminationError`` when a training image
    equals an evaluation image, and ``InputError`` when no input could be used.
    """
    out_dir = Path(out_dir)
    guard = eval_hashes(p.eval_dirs, p.extensions)
    items, skipped, normalised, duplicates = [], [], [], []
    seen_files = 0
    with atomic_dir(out_dir) as tmp:
        (tmp / layout.HQ).mkdir()
        for src in tqdm(list(iter_sources(p.sources, p.extensions, duplicates)), desc="prepare", unit="img"):
            seen_files += 1
            try:
                rgb, notes = src.load()
            except BadImage as exc:
                log.warning("skip %s", exc)
                skipped.append({"path": src.label, "reason": str(exc).removeprefix(f"{src.label}: ")})
                continue
            digest = content_hash(rgb)
            if digest in guard:
                raise ContaminationError(
                    f"training image {src.label} has the same pixels as evaluation image {guard[digest]}")
            h, w = rgb.shape[:2]
            if min(h, w) < p.crop_size:
                reason = f"smaller than the crop: {w}x{h} < prepare.crop_size {p.crop_size}"
                log.warning("skip %s: %s", src.label, reason)
                skipped.append({"path": src.label, "reason": reason})
                continue
            if notes:
                normalised.append({"path": src.label, "how": notes})
                log.info("normalised %s: %s", src.label, "; ".join(notes))
            for k, (y, x) in enumerate(crop_boxes(h, w, p.crop_size, p.crops_per_image,
                                                    layout.item_seed(seed, src.key))):
                crop = rgb[y:y + p.crop_size, x:x + p.crop_size]
                item_id = f"{src.key}_c{k}"
                layout.write_rgb_png(layout.image_path(tmp, layout.HQ, item_id), crop)
                items.append({"id": item_id, "source": src.label, "box": [x, y, p.crop_size, p.crop_size],
                              "source_sha256": digest, "sha256": content_hash(crop)})
        report = {"files_seen": seen_files, "images_used": len({i["source"] for i in items}),
                  "crops_written": len(items), "normalised": normalised, "skipped": skipped,
                  "duplicates": duplicates}
        if not items:
            raise InputError(
                f"prepare: none of the {seen_files} input files in {list(p.sources)} could be used"
                + (f" (first problem: {skipped[0]['path']}: {skipped[0]['reason']})" if skipped else ""))
        write_json(tmp / layout.INDEX, {"crop_size": p.crop_size, "count": len(items), "items": items})
        write_json(tmp / layout.REPORT, report)
    log.info("prepare: %d crops from %d images, %d skipped", len(items), report["images_used"], len(skipped))
    return report
