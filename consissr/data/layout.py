"""The on-disk contract between stages: folder names, ``index.json``, RGB PNGs, per-item seeds.

``prepare`` writes ``hq/<id>.png`` + ``index.json``; ``degrade`` writes ``lq/<id>.png`` (1/scale),
``lq_up/<id>.png`` (the LQ image resized back to HQ size) + ``index.json``; later stages read
them only through this module. Every item is processed under its own seed, ``item_seed(seed, id)``,
so an output does not depend on the processing order or on the other items.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from consissr.errors import InputError, MissingInputError

HQ = "hq"  # prepare: the HQ crops
LQ = "lq"  # degrade: LQ at 1/scale
LQ_UP = "lq_up"  # degrade: LQ resized back to HQ size (CLIP input, pixel ControlNet condition, encode)
CLIP = "clip"  # prepare / degrade: train_clip's centre-crop pair set (prepare.clip_crop_size), a set of its own
INDEX = "index.json"
REPORT = "report.json"


def image_path(folder: str | Path, kind: str, item_id: str) -> Path:
    """``folder/<kind>/<id>.png`` (kind: ``HQ``, ``LQ`` or ``LQ_UP``)."""
    return Path(folder) / kind / f"{item_id}.png"


def item_seed(base_seed: int, key: str) -> int:
    """The per-item seed: the first 4 bytes of sha256("<base_seed>:<key>") (numpy wants < 2**32)."""
    return int.from_bytes(hashlib.sha256(f"{base_seed}:{key}".encode()).digest()[:4], "little")


def variant_dir(folder: str | Path, variant: int) -> Path:
    """Where degradation variant ``variant`` of a degraded set lives: the set's own folder for 0
    (``lq/``, ``lq_up/``), ``v<k>/`` inside it for the others (``degrade.variants``)."""
    return Path(folder) if variant == 0 else Path(folder) / f"v{variant}"


def variant_seed(base_seed: int, key: str, variant: int) -> int:
    """The seed of degradation variant ``variant`` of item ``key`` (variant 0: ``item_seed``)."""
    return item_seed(base_seed, key if variant == 0 else f"{key}#v{variant}")


def read_index(folder: str | Path, *, written_by: str) -> list[Any]:
    """The ``items`` list of ``folder/index.json`` (``written_by``: the stage to run when it is missing)."""
    return _read_index_file(folder, written_by)["items"]


def read_variants(folder: str | Path) -> int:
    """How many degradation variants a degraded set holds (``degrade.variants``; 1 when its index names none)."""
    variants = _read_index_file(folder, "degrade").get("variants", 1)
    if not isinstance(variants, int) or isinstance(variants, bool) or variants < 1:
        raise InputError(f"{Path(folder) / INDEX}: \"variants\" must be an integer >= 1, got {variants!r}")
    return variants


def _read_index_file(folder: str | Path, written_by: str) -> dict[str, Any]:
    path = Path(folder) / INDEX
    if not path.is_file():
        raise MissingInputError(f"{path}: missing; run the {written_by} stage first")
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: not valid JSON: {exc}") from None
    items = index.get("items") if isinstance(index, dict) else None
    if not isinstance(items, list):
        raise InputError(f"{path}: expected {{\"items\": [...]}}")
    return index


def read_ids(folder: str | Path, *, written_by: str) -> list[str]:
    """The item ids of ``folder/index.json``, in order; an empty index or an item without id is an error."""
    items = read_index(folder, written_by=written_by)
    path = Path(folder) / INDEX
    try:
        ids = [str(item["id"]) for item in items]
    except (KeyError, TypeError) as exc:
        raise InputError(f"{path}: expected {{\"items\": [{{\"id\": ...}}, ...]}}: {exc}") from None
    if not ids:
        raise InputError(f"{path}: lists no items")
    return ids


def read_rgb_array(path: str | Path) -> np.ndarray:
    """An 8-bit RGB PNG written by a stage → uint8 (H, W, 3)."""
    try:
        with Image.open(path) as img:
            if img.mode != "RGB":
                raise InputError(f"{path}: expected an RGB image, got mode {img.mode}")
            return np.asarray(img, dtype=np.uint8).copy()
    except FileNotFoundError:
        raise MissingInputError(f"{path}: missing") from None
    except OSError as exc:
        raise InputError(f"{path}: unreadable: {exc}") from None


def read_rgb(path: str | Path) -> torch.Tensor:
    """An 8-bit RGB PNG written by a stage → float (3, H, W) in [0, 1]."""
    return torch.from_numpy(read_rgb_array(path)).permute(2, 0, 1).float().div_(255.0)


def write_rgb_png(path: str | Path, image: np.ndarray | torch.Tensor) -> None:
    """uint8 (H, W, 3), or float (3, H, W) in [0, 1] (rounded to 8 bit), as an RGB PNG."""
    if isinstance(image, torch.Tensor):
        image = (image.detach().cpu() * 255.0).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
    Image.fromarray(np.ascontiguousarray(image), mode="RGB").save(path, format="PNG")


__all__ = ["CLIP", "HQ", "INDEX", "LQ", "LQ_UP", "REPORT", "image_path", "item_seed", "read_ids", "read_index",
           "read_variants",
           "read_rgb", "read_rgb_array", "variant_dir", "variant_seed", "write_rgb_png"]
