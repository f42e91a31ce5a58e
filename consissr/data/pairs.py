"""LQ/HQ pixel pairs from the ``prepare`` and ``degrade`` stages, as a map-style Dataset.

Item ``i`` of ``degraded/index.json`` is ``{"id", "lq", "hq"}`` with ``hq`` read from
``prepared/hq/<id>.png`` and ``lq`` from ``degraded/<lq_source>/<id>.png`` (``lq_up``: the
degraded image resized back to HQ size; ``lq``: at 1/scale), each a float (3, H, W) tensor in
[0, 1]. An item depends only on its index (the training loop's resume relies on it).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset


def read_rgb(path: Path) -> torch.Tensor:
    """An 8-bit RGB PNG → float (3, H, W) in [0, 1]."""
    try:
        with Image.open(path) as img:
            if img.mode != "RGB":
                raise ValueError(f"{path}: expected an RGB image, got mode {img.mode}")
            array = np.asarray(img, dtype=np.uint8)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: missing") from None
    except OSError as exc:
        raise ValueError(f"{path}: unreadable: {exc}") from None
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255.0)


class PairedImageDataset(Dataset):
    """The degraded stage's LQ images with their HQ crops.

    Args:
        prepared_dir: the ``prepare`` output (``hq/<id>.png``).
        degraded_dir: the ``degrade`` output (``index.json``, ``lq/``, ``lq_up/``).
        lq_source: ``"lq_up"`` or ``"lq"``.
    """

    def __init__(self, prepared_dir: str | Path, degraded_dir: str | Path, *, lq_source: str = "lq_up") -> None:
        self.prepared, self.degraded = Path(prepared_dir), Path(degraded_dir)
        if lq_source not in ("lq_up", "lq"):
            raise ValueError(f"lq_source must be lq_up or lq, got {lq_source!r}")
        self.lq_source = lq_source
        index_path = self.degraded / "index.json"
        if not index_path.is_file():
            raise FileNotFoundError(f"{index_path}: missing; run the degrade stage first")
        raw = index_path.read_bytes()
        try:
            items = json.loads(raw)["items"]
            self.ids = [str(item["id"]) for item in items]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ValueError(f"{index_path}: expected {{\"items\": [{{\"id\": ...}}, ...]}}: {exc}") from None
        if not self.ids:
            raise ValueError(f"{index_path}: lists no pairs")
        for image_id in self.ids:
            for path in (self.hq_path(image_id), self.lq_path(image_id)):
                if not path.is_file():
                    raise FileNotFoundError(f"{path}: listed in {index_path} but missing")
        # identifies the pairs for checkpoint resume: the index lists ids, seeds and source hashes
        self.fingerprint = hashlib.sha256(raw + lq_source.encode()).hexdigest()[:16]

    def hq_path(self, image_id: str) -> Path:
        return self.prepared / "hq" / f"{image_id}.png"

    def lq_path(self, image_id: str) -> Path:
        return self.degraded / self.lq_source / f"{image_id}.png"

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        image_id = self.ids[i]
        return {"id": image_id, "lq": read_rgb(self.lq_path(image_id)), "hq": read_rgb(self.hq_path(image_id))}
