"""Stage ``prepare``: image sources → normalised RGB → deterministic HQ crops.

``prepare.sources``: ``embedded`` (scikit-image's RGB photos), image folders (recursive, so
ImageNet's ``train/<class>/*.JPEG`` works) or list files. Every file is decoded by
``consissr.data.images.read_image`` (via ``load_rgb``), which normalises what it can and rejects the
rest with a reason; a bad file becomes a line in ``report.json``, never a stop. Ids and every
recorded name are relative to their source, so moving the data changes no output byte. Crops are
random (seeded per source, ``layout.item_seed``) or central (§4.1); ``prepare.clip_crop_size`` adds
train_clip's centre crops in ``clip/``. Shards of the sources run on ``parallel``'s Dask cluster and
write into the output folder, which is swapped in whole.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image

from consissr.config import ParallelParams
from consissr.data import layout
from consissr.data.images import DEFAULT_MAX_PIXELS, ImageError, read_image
from consissr.data.parallel import run_shards, shard_size, split
from consissr.errors import InputError, MissingInputError
from consissr.io import atomic_dir, write_json

log = logging.getLogger(__name__)

# RGB photographs bundled in scikit-image's wheel (skimage.data.<name>()).
EMBEDDED_PHOTOS = (
    "astronaut", "rocket", "motorcycle_left", "motorcycle_right",
    "hubble_deep_field", "retina", "immunohistochemistry", "colorwheel",
)
# held out of training: the evaluate stage's embedded default (the contamination guard checks them)
EMBEDDED_EVAL_PHOTOS = ("chelsea", "coffee")


@dataclass
class SourceImage:
    key: str  # unique id stem, the same wherever the data lives
    label: str  # the name relative to its source (or skimage:<name>): what outputs record
    source: int  # position in prepare.sources
    path: Path | None  # the file, for messages
    load: Callable[..., tuple[np.ndarray, list[str]]]  # (max_pixels=, min_side=) -> RGB uint8, notes


# ---------------------------------------------------------------------------------------------
# decoding and normalisation (consissr.data.images is the one reader)
# ---------------------------------------------------------------------------------------------
def load_rgb(path: str | Path, *, max_pixels: int = DEFAULT_MAX_PIXELS, min_side: int | None = None
             ) -> tuple[np.ndarray, list[str]]:
    """Decode an image file into RGB uint8 plus the normalisations applied; raise ``ImageError``."""
    return read_image(path, max_pixels=max_pixels, min_side=min_side).rgb8()


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


def _embedded_rgb(name: str, **_) -> tuple[np.ndarray, list[str]]:
    return np.ascontiguousarray(_embedded_photo(name)), []


def _files(entry: str, extensions: tuple[str, ...]) -> list[tuple[str, Path]]:
    """(name relative to the source, path) of every image of a folder or list-file entry."""
    path = Path(entry)
    exts = {e.lower() for e in extensions}
    if path.is_dir():
        return [(p.relative_to(path).as_posix(), p)
                for p in sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in exts)]
    if path.is_file():
        lines = [ln.strip() for ln in path.read_text().splitlines()]
        return [(ln, path.parent / ln) for ln in lines if ln and not ln.startswith("#")]
    raise MissingInputError(f"prepare.sources: {entry!r} is neither 'embedded', a folder nor a list file")


def iter_sources(sources: tuple[str, ...], extensions: tuple[str, ...], duplicates: list | None = None
                 ) -> list[SourceImage]:
    """Every image of every source once, with an id that does not depend on where the data lives.

    The id is the name relative to its source (the path below a folder, a list file's line as
    written) without its extension, made file-name safe; prefixed by the source's position
    (``s<i>_``) only where two sources hold the same name; with a hash of the relative name appended
    where one source holds two names that slug alike. The same file listed twice is used once (and
    noted in ``duplicates``).
    """
    found: list[tuple[int, str, str, Path | None]] = []  # source index, base id, label, path
    seen_files: set[str] = set()
    for index, entry in enumerate(sources):
        if entry == "embedded":
            if "embedded" not in sources[:index]:
                found += [(index, f"embedded_{name}", f"skimage:{name}", None) for name in EMBEDDED_PHOTOS]
            continue
        for rel, path in _files(entry, extensions):
            resolved = str(path.resolve())
            if resolved in seen_files:
                if duplicates is not None:
                    duplicates.append({"source": index, "path": rel, "reason": "listed more than once; used once"})
                continue
            seen_files.add(resolved)
            found.append((index, _slug(str(PurePosixPath(rel).with_suffix(""))), rel, path))
    sources_of: dict[str, set[int]] = {}
    for index, base, _, _ in found:
        sources_of.setdefault(base, set()).add(index)
    items, keys = [], set()
    for index, base, label, path in found:
        key = f"s{index}_{base}" if len(sources_of[base]) > 1 else base
        if key in keys:  # e.g. a-b.png and a_b.png, c.png and c.jpg, or names cut by the slug's length
            key = f"{key}_{hashlib.sha256(f'{index}:{label}'.encode()).hexdigest()[:8]}"
        keys.add(key)
        load = partial(_embedded_rgb, label.removeprefix("skimage:")) if path is None else partial(load_rgb, path)
        items.append(SourceImage(key=key, label=label, source=index, path=path, load=load))
    return items


def eval_hashes(eval_dirs: tuple[str, ...], extensions: tuple[str, ...], *, max_pixels: int = DEFAULT_MAX_PIXELS
                ) -> dict[str, str]:
    """content hash → evaluation file, for the contamination guard."""
    out: dict[str, str] = {}
    for name in EMBEDDED_EVAL_PHOTOS:
        out[content_hash(_embedded_rgb(name)[0])] = f"skimage:{name}"
    for entry in eval_dirs:
        for _, path in _files(entry, extensions):
            try:
                rgb, _ = load_rgb(path, max_pixels=max_pixels)
            except ImageError as exc:
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


def center_crop(rgb: np.ndarray, size: int) -> tuple[np.ndarray, dict]:
    """The short side resized to ``size`` (PIL bicubic; none when it already is), then the centre square.

    §4.1's "central patches of size 512x512" as the authors' code cuts them (resize, centre crop),
    so an ImageNet photo of about 500x375 is used, not skipped. Returns the crop and its record
    (``box`` [x, y, size, size] in the resized image, ``resized`` [w, h]).
    """
    h, w = rgb.shape[:2]
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    if (nh, nw) != (h, w):
        rgb = np.asarray(Image.fromarray(rgb).resize((nw, nh), Image.Resampling.BICUBIC))
    y, x = (nh - size) // 2, (nw - size) // 2
    return np.ascontiguousarray(rgb[y:y + size, x:x + size]), {"box": [x, y, size, size], "resized": [nw, nh]}


def _crops(rgb: np.ndarray, p, seed: int, key: str) -> list[tuple[np.ndarray, dict]]:
    """The training crops of one image (``prepare.crop_mode``) with their records."""
    if p.crop_mode == "center":
        return [center_crop(rgb, p.crop_size)]
    h, w = rgb.shape[:2]
    return [(rgb[y:y + p.crop_size, x:x + p.crop_size], {"box": [x, y, p.crop_size, p.crop_size]})
            for y, x in crop_boxes(h, w, p.crop_size, p.crops_per_image, layout.item_seed(seed, key))]


# ---------------------------------------------------------------------------------------------
# stage
# ---------------------------------------------------------------------------------------------
class ContaminationError(InputError):
    pass


def _prepare_shard(sources: list[SourceImage], *, p, seed: int, guard: dict[str, str], out_dir: Path) -> dict:
    """Crop one shard of the sources into ``out_dir`` (hq/, clip/hq/); return its records."""
    rec: dict = {"seen": 0, "used": 0, "items": [], "clip_items": [], "normalised": [], "skipped": []}
    min_side = max(p.crop_size, p.clip_crop_size or 0)
    for src in sources:
        rec["seen"] += 1
        where = src.path or src.label  # logs name the file; outputs record only the relative label
        try:
            rgb, notes = src.load(max_pixels=p.max_image_pixels, min_side=min_side)
        except ImageError as exc:
            log.warning("skip %s", exc)
            rec["skipped"].append({"source": src.source, "path": src.label, "reason": exc.reason})
            continue
        digest = content_hash(rgb)
        if digest in guard:
            raise ContaminationError(f"training image {where} has the same pixels as evaluation image {guard[digest]}")
        h, w = rgb.shape[:2]
        if p.crop_mode == "random" and min(h, w) < p.crop_size:
            reason = f"smaller than the crop: {w}x{h} < prepare.crop_size {p.crop_size}"
            log.warning("skip %s: %s", where, reason)
            rec["skipped"].append({"source": src.source, "path": src.label, "reason": reason})
            continue
        if notes:
            rec["normalised"].append({"source": src.source, "path": src.label, "how": notes})
            log.info("normalised %s: %s", where, "; ".join(notes))
        rec["used"] += 1
        for k, (crop, where_cut) in enumerate(_crops(rgb, p, seed, src.key)):
            item_id = f"{src.key}_c{k}"
            layout.write_rgb_png(layout.image_path(out_dir, layout.HQ, item_id), crop)
            rec["items"].append({"id": item_id, "source": src.label, **where_cut, "source_sha256": digest,
                                 "sha256": content_hash(crop)})
        if p.clip_crop_size:
            crop, where_cut = center_crop(rgb, p.clip_crop_size)
            layout.write_rgb_png(layout.image_path(out_dir / layout.CLIP, layout.HQ, src.key), crop)
            rec["clip_items"].append({"id": src.key, "source": src.label, **where_cut, "source_sha256": digest,
                                      "sha256": content_hash(crop)})
    return rec


def prepare(p, *, out_dir: str | Path, seed: int, parallel: ParallelParams | None = None) -> dict:
    """Write ``out_dir/hq/<id>.png`` crops, ``index.json`` and ``report.json`` (and ``clip/`` when asked).

    ``p`` is ``config.PrepareParams``; the sources are cut in shards on ``parallel``'s cluster.
    Raises ``ContaminationError`` when a training image equals an evaluation image, and
    ``InputError`` when no input could be used.
    """
    out_dir = Path(out_dir)
    parallel = parallel or ParallelParams()
    guard = eval_hashes(p.eval_dirs, p.extensions, max_pixels=p.max_image_pixels)
    duplicates: list = []
    sources = iter_sources(p.sources, p.extensions, duplicates)
    with atomic_dir(out_dir) as tmp:
        (tmp / layout.HQ).mkdir()
        if p.clip_crop_size:
            (tmp / layout.CLIP / layout.HQ).mkdir(parents=True)
        shards = split(sources, shard_size(len(sources), parallel.workers))
        fn = partial(_prepare_shard, p=p, seed=seed, guard=guard, out_dir=tmp)
        recs = run_shards(fn, shards, parallel, desc="prepare")
        items = [i for r in recs for i in r["items"]]
        skipped = [s for r in recs for s in r["skipped"]]
        report = {"files_seen": sum(r["seen"] for r in recs), "images_used": sum(r["used"] for r in recs),
                  "crops_written": len(items), "normalised": [n for r in recs for n in r["normalised"]],
                  "skipped": skipped, "duplicates": duplicates}
        if not items:
            raise InputError(
                f"prepare: none of the {report['files_seen']} input files in {list(p.sources)} could be used"
                + (f" (first problem: {skipped[0]['path']}: {skipped[0]['reason']})" if skipped else ""))
        index = {"crop_size": p.crop_size, "count": len(items), "items": items}
        if p.crop_mode != "random":  # the random default's index keeps its earlier bytes
            index = {"crop_size": p.crop_size, "crop_mode": p.crop_mode, "count": len(items), "items": items}
        write_json(tmp / layout.INDEX, index)
        if p.clip_crop_size:
            clip_items = [i for r in recs for i in r["clip_items"]]
            write_json(tmp / layout.CLIP / layout.INDEX, {"crop_size": p.clip_crop_size, "crop_mode": "center",
                                                   "count": len(clip_items), "items": clip_items})
            report["clip_crops_written"] = len(clip_items)
        write_json(tmp / layout.REPORT, report)
    log.info("prepare: %d crops from %d images, %d skipped", len(items), report["images_used"], len(skipped))
    return report
