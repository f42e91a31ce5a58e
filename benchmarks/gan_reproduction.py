"""How much two departures from the published Real-ESRGAN runs can move its RealSR/DRealSR scores.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/gan_reproduction.py --lr datasets/RealSR/test_LR \
        --hr datasets/RealSR/test_HR --images 20

On the first ``--images`` pairs (StableSR's crops: 128² LR, 512² HR, same names), scored as the
peers' scripts score (pyiqa PSNR/SSIM on Y, border 0):

* the weights: the package's fp16 export rounds every weight of the official fp32 file to fp16;
  the unknown fp32 values lie within half an fp16 step of it. Two nets whose weights are moved by
  uniform noise of that size stand in for "the fp32 file": the spread of their scores around the
  export's bounds what the rounding can account for.
* the padding: ``load_gan`` runs RealESRGANer with ``pre_pad=10`` (reflect padding, cropped away);
  Real-ESRGAN's inference script defaults to ``pre_pad=0``.

Writes ``benchmarks/results/gan_reproduction.json``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np
import torch
from common import machine, write_record

from consissr.compat import RealESRGANer
from consissr.data.sources import load_rgb
from consissr.evaluation.metrics import MetricSuite
from consissr.evaluation.stage import to_uint8
from consissr.models.gan import WEIGHTS_NAME, X4PLUS_ARCH, gan_upscale, save_gan
from consissr.models.ncnn_rrdb import load_x4plus


def fp16_neighbour(net: torch.nn.Module, seed: int) -> torch.nn.Module:
    """A copy whose weights move by uniform noise within half an fp16 step (biases are fp32 already)."""
    import copy

    other = copy.deepcopy(net)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in other.named_parameters():
            if name.endswith("weight"):
                half = p.to(torch.float16)
                step = (torch.nextafter(half.abs(), torch.tensor(float("inf"), dtype=torch.float16)) - half.abs())
                p += (torch.rand(p.shape, generator=g) - 0.5) * step.float()
    return other


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lr", type=Path, required=True)
    ap.add_argument("--hr", type=Path, required=True)
    ap.add_argument("--images", type=int, default=20)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "gan_reproduction.json")
    args = ap.parse_args()
    load = os.getloadavg()[0]
    names = sorted(p.name for p in args.lr.glob("*.png"))[:args.images]
    net, provenance = load_x4plus()
    variants = {"export, pre_pad 10 (load_gan)": (net, 10), "export, pre_pad 0 (the inference script)": (net, 0),
                "fp32 stand-in A, pre_pad 10": (fp16_neighbour(net, 1), 10),
                "fp32 stand-in B, pre_pad 10": (fp16_neighbour(net, 2), 10)}
    suite = MetricSuite(["psnr", "ssim"], protocol="pyiqa")
    scores: dict[str, list[dict]] = {k: [] for k in variants}
    outputs: dict[str, list[np.ndarray]] = {k: [] for k in variants}
    upsamplers = {}
    with tempfile.TemporaryDirectory(prefix="gan-repro-") as tmp:
        for key, (model, pre_pad) in variants.items():  # RealESRGANer loads its weights from a file
            folder = Path(tmp) / str(len(upsamplers))
            save_gan(model, folder, **X4PLUS_ARCH)
            upsamplers[key] = RealESRGANer(scale=4, model_path=str(folder / WEIGHTS_NAME), model=model, tile=0,
                                           pre_pad=pre_pad, half=False, device=torch.device("cpu"))
    t0 = time.time()
    for i, name in enumerate(names):
        lq, hq = load_rgb(args.lr / name)[0], load_rgb(args.hr / name)[0]
        for key, up in upsamplers.items():
            sr = to_uint8(gan_upscale(up, lq.astype(np.float32) / 255.0))
            scores[key].append(suite.score(sr, hq))
            outputs[key].append(sr)
        print(f"{i + 1}/{len(names)} {name} {time.time() - t0:.0f} s", flush=True)
    base = "export, pre_pad 10 (load_gan)"
    summary = {}
    for key in variants:
        diff = [np.abs(a.astype(int) - b.astype(int)) for a, b in zip(outputs[key], outputs[base])]
        summary[key] = {"psnr": float(np.mean([s["psnr"] for s in scores[key]])),
                        "ssim": float(np.mean([s["ssim"] for s in scores[key]])),
                        "pixels_differing_from_export_pct": float(np.mean([(d > 0).mean() for d in diff]) * 100),
                        "max_abs_uint8_diff": int(max(d.max() for d in diff))}
        summary[key]["psnr_minus_export"] = summary[key]["psnr"] - summary[base]["psnr"]
        summary[key]["ssim_minus_export"] = summary[key]["ssim"] - summary[base]["ssim"]
        print(f"{key:44s} PSNR {summary[key]['psnr']:.4f} ({summary[key]['psnr_minus_export']:+.4f})  "
              f"SSIM {summary[key]['ssim']:.5f} ({summary[key]['ssim_minus_export']:+.5f})  "
              f"pixels moved {summary[key]['pixels_differing_from_export_pct']:.2f}%")
    write_record(args.out, {"machine": machine(load), "images": names, "lr": str(args.lr), "hr": str(args.hr),
                            "protocol": "pyiqa (psnr/ssim on Y, border 0)", "gan": provenance["source"],
                            "summary": summary, "seconds": time.time() - t0})


if __name__ == "__main__":
    main()
