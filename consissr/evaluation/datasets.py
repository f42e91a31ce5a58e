"""Evaluation sets from the ``evaluate.datasets`` registry: LQ/HQ pairs at a fixed ×scale crop protocol.

Kinds: ``synthetic`` (an HR folder, cropped and degraded by this project's Real-ESRGAN
``degrade`` under fixed per-crop seeds: StableSR's DIV2K-Val protocol), ``paired`` (LR and HR
folders matched by file name, centre crops: RealSR, DrealSR; StableSR's released crops have the
same names in ``test_LR/`` and ``test_HR/``), ``embedded`` (scikit-image photos held out of
training, degraded like ``synthetic``). A file without a partner, of a size that is not ×scale, or
smaller than the crop is skipped with the reason, never fatal. ``evaluate.folders`` adds outputs
made elsewhere, read by pair id (``folder_outputs``).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from consissr.config import DegradeParams, EvalDatasetParams, EvalFolderParams, EvaluateParams
from consissr.data.sources import EMBEDDED_EVAL_PHOTOS, content_hash, crop_boxes, load_rgb
from consissr.errors import InputError, MissingInputError, ParamsError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


@dataclass
class EvalItem:
    """One LQ/HQ pair; ``load()`` → (LQ, HQ) as HxWx3 uint8 RGB, HQ ``scale`` times the LQ size."""

    id: str
    source: str  # the file(s) or photo it comes from
    source_sha256: Callable[[], str]  # content hash of the whole decoded HR source (contamination check)
    load: Callable[[], tuple[np.ndarray, np.ndarray]]
    lr_size: tuple[int, int] | None = None  # paired: (h, w) of the whole LR image the crop comes from


@dataclass
class _Source:
    key: str
    label: str
    load: Callable[[], np.ndarray]  # HxWx3 uint8 RGB; ValueError (naming the file) when unusable


def _read(path: Path) -> np.ndarray:
    return load_rgb(path)[0]


def _skimage_photo(name: str) -> np.ndarray:
    import skimage.data

    return np.ascontiguousarray(getattr(skimage.data, name)())


@dataclass
class EvalSet:
    name: str
    kind: str
    paper: str | None
    items: list[EvalItem]
    skipped: list[dict] = field(default_factory=list)  # {"path", "reason"}


def centre_box(h: int, w: int, size: int) -> tuple[int, int]:
    """Top-left corner of the centred ``size``² box."""
    return (h - size) // 2, (w - size) // 2


def _image_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise MissingInputError(f"{folder}: evaluation image folder not found")
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def _by_stem(files: list[Path], suffix: str, skipped: list[dict]) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for path in files:
        stem = path.stem.removesuffix(suffix) if suffix else path.stem
        if stem in out:
            skipped.append({"path": str(path), "reason": f"name {stem!r} also used by {out[stem]}"})
            continue
        out[stem] = path
    return out


# --------------------------------------------------------------------------------------------
# paired: LR and HR folders matched by name, centre crops
# --------------------------------------------------------------------------------------------
def paired_set(entry: EvalDatasetParams, *, lr_crop: int, scale: int) -> EvalSet:
    """Match ``entry.lr`` and ``entry.hr`` by file stem (minus ``lr_suffix``/``hr_suffix``); each pair's
    LQ is the centre ``lr_crop``² crop (0: the whole image) and its HQ the same box ×``scale``."""
    if not entry.lr or not entry.hr:
        raise ParamsError(f"evaluate.datasets {entry.name!r}: a paired set needs both `lr` and `hr` folders")
    skipped: list[dict] = []
    lr_files = _by_stem(_image_files(Path(entry.lr)), entry.lr_suffix, skipped)
    hr_files = _by_stem(_image_files(Path(entry.hr)), entry.hr_suffix, skipped)
    for stem in sorted(set(lr_files) - set(hr_files)):
        skipped.append({"path": str(lr_files[stem]), "reason": f"no HR partner named {stem}{entry.hr_suffix}.* in {entry.hr}"})
    for stem in sorted(set(hr_files) - set(lr_files)):
        skipped.append({"path": str(hr_files[stem]), "reason": f"no LR partner named {stem}{entry.lr_suffix}.* in {entry.lr}"})
    items = []
    for stem in sorted(set(lr_files) & set(hr_files)):
        lr_path, hr_path = lr_files[stem], hr_files[stem]
        try:
            lr, hr = _read(lr_path), _read(hr_path)
        except ValueError as exc:  # the reader's error names the file and the problem
            skipped.append({"path": f"{lr_path} | {hr_path}", "reason": str(exc)})
            continue
        (h, w), (hh, hw) = lr.shape[:2], hr.shape[:2]
        if (hh, hw) != (h * scale, w * scale):
            skipped.append({"path": str(hr_path), "reason": f"size {hw}x{hh} is not {scale}x the LR size {w}x{h} of {lr_path}"})
            continue
        if lr_crop and min(h, w) < lr_crop:
            skipped.append({"path": str(lr_path), "reason": f"LR size {w}x{h} is smaller than evaluate.lr_crop {lr_crop}"})
            continue
        # only the crop is kept in memory; the loader re-reads the files when asked
        items.append(EvalItem(id=stem, source=f"{lr_path} | {hr_path}",
                              source_sha256=lambda p=hr_path: content_hash(_read(p)),
                              load=lambda a=lr_path, b=hr_path: _paired_crop(a, b, lr_crop, scale), lr_size=(h, w)))
    for s in skipped:
        log.warning("evaluate %s: skip %s: %s", entry.name, s["path"], s["reason"])
    return EvalSet(entry.name, entry.kind, entry.paper, items, skipped)


def _paired_crop(lr_path: Path, hr_path: Path, lr_crop: int, scale: int) -> tuple[np.ndarray, np.ndarray]:
    lr, hr = _read(lr_path), _read(hr_path)
    if not lr_crop:
        return lr, hr
    top, left = centre_box(*lr.shape[:2], lr_crop)
    return (lr[top:top + lr_crop, left:left + lr_crop],
            hr[top * scale:(top + lr_crop) * scale, left * scale:(left + lr_crop) * scale])


# --------------------------------------------------------------------------------------------
# folders: SR images made elsewhere, matched to the pairs by id
# --------------------------------------------------------------------------------------------
def folder_outputs(entry: EvalFolderParams, ids: list[str], skipped: list[dict]) -> dict[str, Path]:
    """``entry.path``'s SR image file of each pair id (``<id><suffix>.<ext>``, the folder itself, not its
    sub-folders); a pair without one, or a name used twice, is recorded in ``skipped`` and left out."""
    folder = Path(entry.path)
    if not folder.is_dir():
        raise MissingInputError(f"{folder}: evaluate.folders {entry.method!r}: folder not found")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    own: list[dict] = []
    by_id = _by_stem(files, entry.suffix, own)
    for image_id in ids:
        if image_id not in by_id:
            own.append({"path": str(folder / f"{image_id}{entry.suffix}.*"),
                        "reason": f"no {entry.method} output for pair {image_id}"})
    skipped += [{**s, "method": entry.method} for s in own]
    return {i: by_id[i] for i in ids if i in by_id}


def read_folder_output(path: Path, hq_shape: tuple[int, ...], *, lr_crop: int, scale: int,
                       lr_size: tuple[int, int] | None = None) -> np.ndarray:
    """An SR image of the evaluated HQ size; for a pair cut from a whole LR image of ``lr_size``, also the
    ×scale output of that whole image, cut to the evaluated centre box. Anything else is an
    ``InputError`` naming the file (a padded or otherwise scaled output would score misaligned)."""
    sr = _read(path)
    if sr.shape == tuple(hq_shape):
        return sr
    if lr_size and lr_crop and sr.shape[:2] == (lr_size[0] * scale, lr_size[1] * scale):
        top, left = centre_box(*lr_size, lr_crop)
        return sr[top * scale:(top + lr_crop) * scale, left * scale:(left + lr_crop) * scale]
    whole = f" nor x{scale} the whole LR image ({lr_size[1]}x{lr_size[0]})" if lr_size else ""
    raise InputError(f"{path}: size {sr.shape[1]}x{sr.shape[0]} is neither the evaluated HQ size "
                     f"{hq_shape[1]}x{hq_shape[0]}{whole}")


# --------------------------------------------------------------------------------------------
# synthetic and embedded: HR crops degraded with this project's `degrade`
# --------------------------------------------------------------------------------------------
def degrade_crop(hq: np.ndarray, p: DegradeParams, seed: int) -> np.ndarray:
    """Real-ESRGAN's second-order degradation of one HQ crop (uint8) under ``seed`` → LQ uint8."""
    from consissr.data.degradation import degrade, sample_kernels, seeded

    tensor = torch.from_numpy(hq.copy()).permute(2, 0, 1).float().div_(255.0).unsqueeze(0)
    with seeded(seed):
        lq, _ = degrade(tensor, sample_kernels(p), p)
    return (lq[0] * 255.0).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()


def synthetic_from_sources(name: str, kind: str, paper: str | None, sources: list[_Source], *, count: int,
                           lr_crop: int, scale: int, degrade_params: DegradeParams, seed: int) -> EvalSet:
    """``count`` HR crops of ``lr_crop × scale``, spread evenly over ``sources`` at seeded positions,
    each degraded under its own seed (``layout.item_seed(seed, id)``)."""
    from consissr.data.degradation import min_image_size
    from consissr.data.layout import item_seed

    hr_size = lr_crop * scale
    if hr_size < min_image_size(degrade_params):
        raise ParamsError(f"evaluate.lr_crop {lr_crop}: HR crops of {hr_size}² are below the smallest size "
                         f"{min_image_size(degrade_params)} these degrade params can degrade")
    skipped: list[dict] = []
    usable: list[tuple[_Source, np.ndarray]] = []
    for src in sources:
        try:
            rgb = src.load()
        except ValueError as exc:
            skipped.append({"path": src.label, "reason": str(exc).removeprefix(f"{src.label}: ")})
            continue
        if min(rgb.shape[:2]) < hr_size:
            skipped.append({"path": src.label, "reason": f"smaller than the HR crop: {rgb.shape[1]}x{rgb.shape[0]} < {hr_size}"})
            continue
        usable.append((src, rgb))
    items: list[EvalItem] = []
    per_image = math.ceil(count / len(usable)) if usable else 0
    boxes = {src.key: crop_boxes(*rgb.shape[:2], hr_size, per_image, item_seed(seed, src.key)) for src, rgb in usable}
    for k in range(per_image):
        for src, rgb in usable:
            if len(items) == count or k >= len(boxes[src.key]):
                continue
            y, x = boxes[src.key][k]
            item_id = f"{src.key}_c{k}"
            hq, crop_seed = rgb[y:y + hr_size, x:x + hr_size], item_seed(seed, item_id)
            items.append(EvalItem(
                id=item_id, source=f"{src.label} box {x},{y},{hr_size}", source_sha256=lambda r=rgb: content_hash(r),
                load=lambda hq=hq, s=crop_seed: (degrade_crop(hq, degrade_params, s), hq)))
    for s in skipped:
        log.warning("evaluate %s: skip %s: %s", name, s["path"], s["reason"])
    return EvalSet(name, kind, paper, items, skipped)


def build_set(entry: EvalDatasetParams, ev: EvaluateParams, degrade_params: DegradeParams, seed: int) -> EvalSet:
    """One registry entry → its evaluation set (``ev.max_images`` applied)."""
    if entry.kind == "paired":
        out = paired_set(entry, lr_crop=ev.lr_crop, scale=ev.scale)
    else:
        if entry.kind == "synthetic":
            if not entry.hr:
                raise ParamsError(f"evaluate.datasets {entry.name!r}: a synthetic set needs an `hr` folder")
            sources = [_Source(path.stem, str(path), lambda p=path: _read(p)) for path in _image_files(Path(entry.hr))]
        else:
            sources = [_Source(f"embedded_{name}", f"skimage:{name}", lambda n=name: _skimage_photo(n))
                       for name in EMBEDDED_EVAL_PHOTOS]
        if degrade_params.scale != ev.scale:
            raise ParamsError(f"evaluate.scale {ev.scale} differs from degrade.scale {degrade_params.scale}")
        out = synthetic_from_sources(entry.name, entry.kind, entry.paper, sources, count=entry.count,
                                     lr_crop=ev.lr_crop, scale=ev.scale, degrade_params=degrade_params, seed=seed)
    if ev.max_images:
        out.items = out.items[:ev.max_images]
    if not out.items:
        first = f" (first problem: {out.skipped[0]['path']}: {out.skipped[0]['reason']})" if out.skipped else ""
        raise InputError(f"evaluate.datasets {entry.name!r}: no usable image pair{first}")
    return out
