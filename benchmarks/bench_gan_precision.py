"""Where x4plus keeps fp32 under bf16 autocast: PSNR from fp32 on five photos, and the speed of one tile.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_gan_precision.py     # results/gan_precision.json

Three ways to run RRDBNet under ``torch.autocast(bfloat16)`` on the CPU, channels_last as ``load_gan`` leaves it:
- "fp32 trunk": what ``gan_upscale`` does (``_fp32_trunk``): the trunk and its 24 residual sums in fp32,
  each RRDB's dense blocks in bf16;
- "fp32 conv outputs": every convolution's output returned as fp32 (the dense blocks' 69 sums too);
- "bf16 throughout": plain autocast.
PSNR (peak 1) of each against the fp32 output, whole image, on five scikit-image photos area-downscaled to
96²; then the seconds of one 84² tile (a 64-px tile with its 10-px halo), all variants alternating, medians.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import cv2
import numpy as np
import torch
from skimage import data

from benchmarks.common import machine, write_record
from consissr.models.gan import X4PLUS_ARCH, X4PLUS_NCNN, _fp32_trunk, load_gan, record_pretrained

OUT = ROOT / "benchmarks" / "results" / "gan_precision.json"
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry")


def fp32_conv_outputs(model: torch.nn.Module) -> torch.nn.Module:
    for module in model.modules():
        if isinstance(module, torch.nn.Conv2d):
            module.register_forward_hook(lambda _m, _a, out: out.float())
    return model


def run(model: torch.nn.Module, x: torch.Tensor, bf16: bool) -> torch.Tensor:
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        return model(x).float().clamp(0, 1)


def as_input(rgb: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(rgb.astype(np.float32) / 255).permute(2, 0, 1)[None].contiguous()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=96, help="photos area-downscaled to this (square)")
    parser.add_argument("--rounds", type=int, default=4, help="timed rounds of the 84² tile")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        record_pretrained(X4PLUS_NCNN, tmp, **X4PLUS_ARCH)
        fp32 = load_gan(tmp).model.eval()
    variants = {"fp32 trunk": copy.deepcopy(fp32), "fp32 conv outputs": fp32_conv_outputs(copy.deepcopy(fp32)),
                "bf16 throughout": copy.deepcopy(fp32)}
    _fp32_trunk(variants["fp32 trunk"])

    psnr_db: dict[str, dict[str, float]] = {}
    for name in PHOTOS:
        rgb = cv2.resize(getattr(data, name)()[..., :3], (args.size, args.size), interpolation=cv2.INTER_AREA)
        x = as_input(rgb)
        ref = run(fp32, x, bf16=False)
        psnr_db[name] = {k: 10 * np.log10(1 / float(((run(m, x, bf16=True) - ref) ** 2).mean()))
                         for k, m in variants.items()}
        print(name, {k: round(v, 2) for k, v in psnr_db[name].items()}, flush=True)

    tile = as_input(data.astronaut()[100:184, 100:184])
    seconds: dict[str, list[float]] = {k: [] for k in variants}
    for m in variants.values():  # warm-up
        run(m, tile, bf16=True)
    for _ in range(args.rounds):
        for k, m in variants.items():
            start = time.perf_counter()
            run(m, tile, bf16=True)
            seconds[k].append(time.perf_counter() - start)
    median = {k: statistics.median(v) for k, v in seconds.items()}
    for k in variants:
        dbs = [psnr_db[p][k] for p in PHOTOS]
        print(f"{k}: {min(dbs):.2f}–{max(dbs):.2f} dB; 84² tile {median[k]:.3f} s "
              f"({median['fp32 conv outputs'] / median[k]:.3f}× fp32 conv outputs)")
    write_record(args.out, {"machine": machine(load_before), "size": args.size, "psnr_vs_fp32_db": psnr_db,
                            "tile_84_seconds": seconds, "tile_84_median_s": median})
    return 0


if __name__ == "__main__":
    sys.exit(main())
