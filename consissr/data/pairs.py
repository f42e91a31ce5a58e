"""LQ/HQ pixel pairs from the ``prepare`` and ``degrade`` stages, as a map-style Dataset.

Item ``i`` of ``degraded/index.json`` is ``{"id", "lq", "hq"}``: ``hq`` from ``prepared/hq/<id>.png``,
``lq`` from ``degraded/<lq_source>/<id>.png``, each float (3, H, W) in [0, 1]. An item depends
only on its index (the training loop's resume relies on it).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from torch.utils.data import Dataset

from consissr.data import layout
from consissr.errors import MissingInputError
from consissr.io import file_sha256


class PairedImageDataset(Dataset):
    """The degraded stage's LQ images with their HQ crops.

    Args:
        prepared_dir: the ``prepare`` output (``hq/<id>.png``).
        degraded_dir: the ``degrade`` output (``index.json``, ``lq/``, ``lq_up/``).
        lq_source: ``layout.LQ_UP`` or ``layout.LQ`` (checked by the params schema).
    """

    def __init__(self, prepared_dir: str | Path, degraded_dir: str | Path, *, lq_source: str = layout.LQ_UP) -> None:
        self.prepared, self.degraded = Path(prepared_dir), Path(degraded_dir)
        self.lq_source = lq_source
        self.ids = layout.read_ids(self.degraded, written_by="degrade")
        index_path = self.degraded / layout.INDEX
        for image_id in self.ids:
            for path in (self.hq_path(image_id), self.lq_path(image_id)):
                if not path.is_file():
                    raise MissingInputError(f"{path}: listed in {index_path} but missing")
        # identifies the pairs for checkpoint resume: the index lists ids, seeds and source hashes
        self.fingerprint = hashlib.sha256((file_sha256(index_path) + lq_source).encode()).hexdigest()[:16]

    def hq_path(self, image_id: str) -> Path:
        return layout.image_path(self.prepared, layout.HQ, image_id)

    def lq_path(self, image_id: str) -> Path:
        return layout.image_path(self.degraded, self.lq_source, image_id)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        image_id = self.ids[i]
        return {"id": image_id, "lq": layout.read_rgb(self.lq_path(image_id)),
                "hq": layout.read_rgb(self.hq_path(image_id))}
