"""Inference: seconds per image, GANEmb-10 vs full-50, and peak memory of tiled upscales.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_inference.py

One model: ``load_pipeline(None)`` on the stage outputs under ``data/models`` (``dvc repro``;
the embedded tiny default). Without ``data/models/gan`` a tiny random RRDBNet stands in, saved
with ``consissr.models.gan.save_gan`` (the timing of a trained one is the same).

* speed: a 128² → 512² upscale, ``mode="full"`` (50 steps) and ``mode="ganemb"`` (preset ``rec``:
  10 steps from t_max 600), ``--repeats`` each after a warm-up, interleaved; the GAN alone is
  timed on the same input for its share of a GANEmb call. Tiling as the params say.
* memory: a tiled 4× GANEmb upscale of two or more input sizes (``--sizes``, each side ×2: pixel
  count ×4), each in a fresh subprocess: peak resident set size (VmHWM) during the call minus the
  RSS before it; the peak is reset to the current RSS first through ``/proc/self/clear_refs``
  (Linux). torch's CPU tensors live outside Python's allocator, so tracemalloc would not see them.
  The Δ includes the returned float32 image (``output_mib``, recorded beside it).
Prints a table and writes ``benchmarks/results/inference.json`` (``--memory-only``: only the
memory runs, written to ``benchmarks/results/inference_memory.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np
import torch

from benchmarks.common import machine, write_record
from consissr.config import load_params


def build_pipeline(gan_fallback: Path):
    from consissr.inference.pipeline import STAGE_DIRS, load_pipeline

    dirs = {k: ROOT / v for k, v in STAGE_DIRS.items()}
    if not (dirs["gan"] / "gan_config.json").is_file():
        from consissr.models.gan import build_rrdbnet, save_gan

        arch = {"scale": 4, "num_block": 2, "num_feat": 16, "num_grow_ch": 8}
        torch.manual_seed(0)
        save_gan(build_rrdbnet(**arch), gan_fallback, **arch)
        dirs["gan"] = gan_fallback
    defaults = load_params(ROOT / "params.yaml").inference
    pipe = load_pipeline(None, device="cpu", defaults=defaults, stage_dirs=dirs)
    pipe.set_progress_bar_config(disable=True)
    return pipe, dirs


def test_image(size: int, seed: int = 0) -> np.ndarray:
    """A photo (scikit-image's astronaut) resized to size², so the GAN and VAE see real content."""
    from PIL import Image
    from skimage import data

    return np.asarray(Image.fromarray(data.astronaut()).resize((size, size), Image.BICUBIC), dtype=np.float32) / 255


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def speed(pipe, size: int, repeats: int, seed: int, warmup: bool, tile_size: int | None) -> dict:
    lq = test_image(size)
    tile = {"tile_size": tile_size} if tile_size else {}
    runs = {"full-50": {"mode": "full", "num_inference_steps": 50}, "ganemb-rec-10": {"mode": "ganemb", "preset": "rec"}}
    calls = {name: (lambda kw=kw: pipe(lq, seed=seed, output_type="np", **tile, **kw)) for name, kw in runs.items()}
    gan_tile = pipe.plan(**tile).tile_size
    calls["gan"] = lambda: pipe.gan_upscale(lq, tile=gan_tile // pipe.scale if pipe.scale * size > gan_tile else 0)
    for call in calls.values() if warmup else ():
        call()
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            times[name].append(timed(call))
    median = {name: statistics.median(v) for name, v in times.items()}
    return {"input": size, "output": size * pipe.scale, "repeats": repeats, "seconds": times, "median": median,
            "ratio_ganemb_to_full": median["ganemb-rec-10"] / median["full-50"],
            "gan_share_of_ganemb": median["gan"] / median["ganemb-rec-10"],
            "tile_size": gan_tile, "warmup": warmup}


# --------------------------------------------------------------------------------------------
# memory, one size per subprocess
# --------------------------------------------------------------------------------------------
def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def memory_child(size: int, gan_dir: str, seed: int, steps: int) -> dict:
    pipe, _ = build_pipeline(Path(gan_dir))
    pipe(test_image(32), mode="ganemb", preset="rec", num_inference_steps=2, seed=seed, output_type="np")  # warm-up
    lq = test_image(size)
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    before = _status_kib("VmRSS")
    start = time.perf_counter()
    out = pipe(lq, mode="ganemb", preset="rec", num_inference_steps=steps, seed=seed, output_type="np").images
    seconds = time.perf_counter() - start
    peak = _status_kib("VmHWM")
    return {"input": size, "output": list(out.shape[1:3]), "rss_before_mib": before / 1024,
            "peak_rss_mib": peak / 1024, "peak_delta_mib": (peak - before) / 1024, "output_mib": out.nbytes / 2**20,
            "seconds": seconds,
            "steps": steps, "tile_size": pipe.defaults.tile_size, "tile_overlap": pipe.defaults.tile_overlap}


def memory(sizes: list[int], gan_dir: Path, seed: int, steps: int, threads: int) -> list[dict]:
    rows = []
    for size in sizes:
        out = subprocess.run([sys.executable, __file__, "--memory-child", str(size), "--gan-dir", str(gan_dir),
                              "--seed", str(seed), "--memory-steps", str(steps), "--threads", str(threads)],
                             check=True, capture_output=True, text=True,
                             env={**os.environ, "PYTHONPATH": str(ROOT)})
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(f"memory {size}²: peak RSS Δ {rows[-1]['peak_delta_mib']:.1f} MiB", file=sys.stderr, flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=128, help="input side of the speed runs")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 256],
                        help="input sides of the memory runs (the goal compares the first two)")
    parser.add_argument("--memory-only", action="store_true", help="skip the speed runs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-warmup", action="store_true", help="time the first calls too")
    parser.add_argument("--tile-size", type=int, help="tile size of the speed runs (default: params)")
    parser.add_argument("--memory-steps", type=int, default=10, help="GANEmb steps of the memory runs (peak is per step)")
    parser.add_argument("--out", type=Path, help="default: benchmarks/results/inference.json "
                        "(inference_memory.json with --memory-only)")
    parser.add_argument("--memory-child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--gan-dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.memory_child:
        print(json.dumps(memory_child(args.memory_child, str(args.gan_dir), args.seed, args.memory_steps)))
        return 0

    if len(args.sizes) < 2:
        parser.error("--sizes needs at least two input sides")
    results = ROOT / "benchmarks" / "results"
    out = args.out or results / ("inference_memory.json" if args.memory_only else "inference.json")
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        if args.memory_only:
            fast, dirs = None, {"gan": ROOT / "data/models/gan"}
            if not (dirs["gan"] / "gan_config.json").is_file():
                dirs["gan"] = Path(tmp) / "gan"  # each child builds the same seeded tiny GAN there
        else:
            pipe, dirs = build_pipeline(Path(tmp) / "gan")
            fast = speed(pipe, args.size, args.repeats, args.seed, not args.no_warmup, args.tile_size)
            del pipe
        mem = memory(args.sizes, dirs["gan"], args.seed, args.memory_steps, args.threads)
    first = mem[0]["peak_delta_mib"]
    record = {"speed": fast, "memory": mem, "memory_ratio": mem[1]["peak_delta_mib"] / first,
              "memory_pixel_ratio": (args.sizes[1] / args.sizes[0]) ** 2,
              "memory_ratios_to_first": [row["peak_delta_mib"] / first for row in mem],
              "gan": "data/models/gan" if dirs["gan"] == ROOT / "data/models/gan" else "tiny random RRDBNet (2 blocks, 16 features)",
              "machine": machine(load_before)}
    if fast is not None:
        m = fast["median"]
        print(f"| {args.size}² → {args.size * 4}² | full-50 {m['full-50']:.2f} s | GANEmb-10 {m['ganemb-rec-10']:.2f} s "
              f"| ratio {fast['ratio_ganemb_to_full']:.3f} | GAN {m['gan']:.3f} s ({fast['gan_share_of_ganemb']:.1%}) |")
    for row, ratio in zip(mem, record["memory_ratios_to_first"]):
        print(f"| memory {row['input']}² → {row['output']} | peak RSS Δ {row['peak_delta_mib']:.0f} MiB "
              f"(of which the output {row['output_mib']:.0f} MiB) | ×{ratio:.2f} | {row['seconds']:.1f} s |")
    print(f"memory ratio {record['memory_ratio']:.2f} for {record['memory_pixel_ratio']:.0f}× the pixels")
    write_record(out, record)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
