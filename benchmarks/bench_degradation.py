"""Throughput of the ``degrade`` stage vs realesrgan's own ``feed_data``, and where the time goes.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_degradation.py

Same HQ crops, same seeds, same kernels for both paths; one image per call (as the stage runs);
each (image, seed) timed ``--repeats`` times, alternating the two paths, after one warm-up
each. Reports the median seconds per image and images/s at each size, the USM sharpening share
(timed separately on the same crops: ``USMSharp``, which feed_data calls twice, vs
``usm_sharp_separable``, called once) and the first-order 21x21 blur of the full-size image
(basicsr's ``filter2D`` vs ``blur``), prints a markdown table and writes
benchmarks/results/degradation.json.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import skimage.data  # noqa: E402
import torch  # noqa: E402

from benchmarks.common import DISPATCH_KINDS, machine, with_dispatch, write_record  # noqa: E402
from benchmarks.reference import make_reference_model, reference_degrade  # noqa: E402
from consissr.compat import USMSharp, filter2D  # noqa: E402
from consissr.config import DegradeParams  # noqa: E402
from consissr.data.degradation import blur, degrade, sample_kernels, seeded, usm_sharp_separable  # noqa: E402

# (photo, top, left) crops of scikit-image's RGB photos; every one holds a 512² window
CROPS = [("astronaut", 0, 0), ("immunohistochemistry", 0, 0), ("retina", 400, 400), ("hubble_deep_field", 200, 300),
         ("coffee", 50, 50), ("rocket", 0, 100)]


def crops(size: int, n: int) -> list[torch.Tensor]:
    out = []
    for name, top, left in CROPS:
        arr = getattr(skimage.data, name)()[top:top + size, left:left + size, :3]
        if arr.shape[:2] == (size, size):
            out.append(torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1).float().div(255).unsqueeze(0))
        if len(out) == n:
            break
    return out


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bench_size(size: int, n_images: int, repeats: int, p: DegradeParams) -> dict:
    images = crops(size, n_images)
    model = make_reference_model(p, gt_size=size)
    usm = USMSharp(radius=p.usm_radius)
    cases = []
    for i, hq in enumerate(images):
        with seeded(i):
            kernels = sample_kernels(p)
        cases.append((i, hq, kernels))

    def ours(i, hq, kernels):
        with seeded(i):
            sample_kernels(p)  # advance the RNGs exactly as before the timed call's draws
            return timed(lambda: degrade(hq, kernels, p))

    def reference(i, hq, kernels):
        with seeded(i):
            sample_kernels(p)
            return timed(lambda: reference_degrade(hq, kernels, p, model=model))

    ours(*cases[0]), reference(*cases[0])  # warm-up: lazy inits, allocator, thread pools
    t_ours, t_ref, t_usm_sep, t_usm_2d, t_blur, t_filter2d = [], [], [], [], [], []
    for _ in range(repeats):
        for case in cases:
            t_ours.append(ours(*case))
            t_ref.append(reference(*case))
            hq = case[1]
            t_usm_sep.append(timed(lambda hq=hq: usm_sharp_separable(hq, radius=p.usm_radius)))
            t_usm_2d.append(timed(lambda hq=hq: usm(hq, weight=p.usm_weight, threshold=p.usm_threshold)))
            kernel = case[2]["kernel1"].unsqueeze(0)
            t_blur.append(timed(lambda hq=hq, kernel=kernel: blur(hq, kernel)))
            t_filter2d.append(timed(lambda hq=hq, kernel=kernel: filter2D(hq, kernel)))
    med = statistics.median
    ours_s, ref_s = med(t_ours), med(t_ref)
    usm_ours, usm_ref = med(t_usm_sep), 2 * med(t_usm_2d)  # feed_data sharpens the GT twice
    return {
        "size": size, "images": len(images), "repeats": repeats,
        "ours": {"s_per_image": ours_s, "images_per_s": 1 / ours_s, "usm_s": usm_ours, "rest_s": ours_s - usm_ours,
                 "usm_calls": 1, "first_blur_s": med(t_blur)},
        "reference": {"s_per_image": ref_s, "images_per_s": 1 / ref_s, "usm_s": usm_ref, "rest_s": ref_s - usm_ref,
                      "usm_calls": 2, "usm_one_call_s": med(t_usm_2d), "first_blur_s": med(t_filter2d)},
        "speedup": ref_s / ours_s,
        # the reference minus its second USM call (for its losses, not needed by the stage):
        "speedup_vs_reference_with_one_usm": (ref_s - med(t_usm_2d)) / ours_s,
    }


def markdown(results: list[dict]) -> str:
    lines = ["| size | path | s / image (median) | images / s | USM sharpening s | first 21×21 blur s | rest s | "
             "speed-up |", "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in results:
        ref, ours = r["reference"], r["ours"]
        lines.append(f"| {r['size']}² | reference `feed_data` (USMSharp 51×51 ×2, `filter2D`) | "
                     f"{ref['s_per_image']:.3f} | {ref['images_per_s']:.2f} | {ref['usm_s']:.3f} | "
                     f"{ref['first_blur_s']:.3f} | {ref['rest_s'] - ref['first_blur_s']:.3f} | 1.0× |")
        lines.append(f"| {r['size']}² | `degrade` (separable USM ×1, OpenCV `blur`) | {ours['s_per_image']:.3f} | "
                     f"{ours['images_per_s']:.2f} | {ours['usm_s']:.3f} | {ours['first_blur_s']:.3f} | "
                     f"{ours['rest_s'] - ours['first_blur_s']:.3f} | "
                     f"**{r['speedup']:.1f}×** ({r['speedup_vs_reference_with_one_usm']:.1f}× vs one USM call) |")
    return "\n".join(lines)




def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 128])
    parser.add_argument("--images", type=int, default=4, help="crops per size")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch and OpenCV threads (1: as a stage worker runs; 0: their defaults)")
    parser.add_argument("--dispatch", choices=list(DISPATCH_KINDS), default="native",
                        help="cap torch's, oneDNN's and OpenCV's instruction set, as on an older CPU")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "degradation.json")
    args = parser.parse_args(argv)
    with_dispatch(args.dispatch)  # re-runs the script under the kind's environment if it is not set

    p = DegradeParams()
    if args.threads:
        torch.set_num_threads(args.threads)
        cv2.setNumThreads(args.threads)
    load_before = os.getloadavg()[0]
    results = [bench_size(size, args.images, args.repeats, p) for size in args.sizes]
    table = markdown(results)
    print(table)
    record = {
        "machine": {**machine(load_before), "cv2_threads": cv2.getNumThreads()},
        "params": "DegradeParams() defaults (Real-ESRGAN x4plus)",
        "results": results, "table": table,
    }
    write_record(args.out, record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
