"""The README's picture: LQ | bicubic | Real-ESRGAN x4plus | HQ on RealSR crops, from an evaluate run.

    .venv/bin/python scripts/realsr_grid.py data/benchmark/eval/RealSR --ids Canon_003_LR4 Nikon_050_LR4 \
        --out docs/images/realsr_grid.jpg

Reads ``<work>/{lq,hq,bicubic,gan}/<id>.png`` (an ``evaluate`` work folder of a run with
``save_outputs: true`` or the ids among its grid images, e.g. ``configs/gan_benchmark.yaml``), cuts
the same ``--crop``² window (HQ pixels, centred) from every panel and stacks one row per id.
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path

import numpy as np
from PIL import Image

from consissr.data.layout import read_rgb_array
from consissr.evaluation.report import image_grid
from consissr.io import write_bytes

COLUMNS = {"lq": "LQ (x4 nearest)", "bicubic": "bicubic", "gan": "Real-ESRGAN x4plus", "hq": "HQ"}


def row(work: Path, image_id: str, crop: int) -> np.ndarray:
    panels = {}
    for folder, label in COLUMNS.items():
        img = read_rgb_array(work / folder / f"{image_id}.png")
        if folder == "lq":
            img = np.repeat(np.repeat(img, 4, axis=0), 4, axis=1)
        top, left = (img.shape[0] - crop) // 2, (img.shape[1] - crop) // 2
        panels[label] = np.ascontiguousarray(img[top:top + crop, left:left + crop])
    return image_grid(panels, order=list(COLUMNS.values()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("work", type=Path, help="an evaluate work folder of one dataset, e.g. data/benchmark/eval/RealSR")
    ap.add_argument("--ids", nargs="+", required=True)
    ap.add_argument("--crop", type=int, default=256, help="HQ pixels of the window cut from each panel")
    ap.add_argument("--out", type=Path, default=Path("docs/images/realsr_grid.jpg"))
    args = ap.parse_args()
    rows = [row(args.work, i, args.crop) for i in args.ids]
    gap = np.full((4, rows[0].shape[1], 3), 255, np.uint8)
    grid = np.concatenate([r for pair in zip(rows, [gap] * len(rows)) for r in pair][:-1])
    buf = io.BytesIO()
    Image.fromarray(grid).save(buf, format="JPEG", quality=90)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_bytes(args.out, buf.getvalue())
    print(f"wrote {args.out} ({grid.shape[1]}x{grid.shape[0]})")


if __name__ == "__main__":
    main()
