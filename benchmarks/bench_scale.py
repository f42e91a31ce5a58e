"""Scale benchmark of the data stages: prepare → degrade → encode on 1 and W Dask workers.

Sources: ImageNet-like JPEGs (500x375 / 375x500, quality 90) cut from the photos at hand (random
crops, flips and quarter turns of scikit-image's training photos and, when present, the
CBSD68 training photos; never the held-out evaluation photos). The paper profile's data settings
prepare them (centre crops at 512², as §4.1), degrade them (Real-ESRGAN x4plus, one variant) and
encode them with the embedded tiny VAE. Per stage: images/s, the peak RSS of each worker process
(the cluster is restarted before each stage), bytes per cached pair; then a projection to ImageNet.

    .venv/bin/python benchmarks/bench_scale.py --sizes 256 --workers 1 2

prints each stage's 2-over-1 speed-up and that of the three stages together (the goal: >= 0.9 W
on an idle machine). Without ``--backbone`` (default data/models/backbone) it encodes with a
freshly built embedded backbone (random tiny VAE: the same work per image as the trained one).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np
from PIL import Image

from benchmarks.common import machine, write_record
from consissr.config import ParallelParams, params_from_dict
from consissr.data.degradation import degrade_folder
from consissr.data.latent_cache import encode_pairs
from consissr.data.parallel import local_cluster
from consissr.data.sources import EMBEDDED_PHOTOS, _embedded_photo, prepare
from consissr.models.backbone import build_tiny_backbone

IMAGENET = 1_281_167  # ImageNet-1k training images
STAGES = ("prepare", "degrade", "encode")


def source_photos(folder: Path | None) -> list[np.ndarray]:
    photos = [np.ascontiguousarray(_embedded_photo(n)[..., :3]) for n in EMBEDDED_PHOTOS]
    if folder is not None and folder.is_dir():
        photos += [np.asarray(Image.open(p).convert("RGB")) for p in sorted(folder.glob("*.png"))]
    return [p for p in photos if min(p.shape[:2]) >= 256]


def make_sources(out: Path, n: int, photos: list[np.ndarray], seed: int = 0) -> None:
    """``n`` distinct JPEGs of ImageNet's typical size, each a random crop/flip/turn of a photo."""
    out.mkdir(parents=True, exist_ok=True)
    for k in range(n):
        rng = np.random.default_rng([seed, k])
        photo = photos[k % len(photos)]
        h, w = photo.shape[:2]
        ch = int(rng.integers(min(h, w) // 2, min(h, w) + 1))
        cw = min(w, int(ch * 4 / 3))
        y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
        crop = photo[y:y + ch, x:x + cw]
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        if rng.random() < 0.3:
            crop = np.rot90(crop)
        size = (500, 375) if crop.shape[1] >= crop.shape[0] else (375, 500)
        Image.fromarray(np.ascontiguousarray(crop)).resize(size, Image.Resampling.BICUBIC).save(
            out / f"img{k:06d}.jpg", quality=90)


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def worker_cpu(client) -> float:
    """CPU seconds all workers have used so far (user + system)."""
    return sum(client.run(_cpu_seconds).values())


def worker_peaks(client) -> list[float]:
    """Peak RSS (MiB) of each worker process since it started."""
    peaks = client.run(lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return sorted(peaks.values())


def run_size(n: int, workers: int, src: Path, work: Path, backbone: Path, encode_shard_size: int) -> dict:
    from dask.distributed import Client

    p = params_from_dict({
        "prepare": {"sources": [str(src)], "crop_size": 512, "crops_per_image": 1, "crop_mode": "center",
                    "extensions": [".jpg"]},
        "encode": {"batch_size": 8, "shard_size": encode_shard_size}})
    out = work / f"n{n}_w{workers}"
    shutil.rmtree(out, ignore_errors=True)
    record: dict = {"images": n, "workers": workers, "stages": {}}
    for stage in STAGES:
        t0 = time.perf_counter()  # a fresh cluster per stage: its workers' peak RSS is this stage's
        with (local_cluster(workers, start_timeout=ParallelParams().worker_start_timeout) as cluster,
              Client(cluster) as client):  # the stages' own cluster
            start_s = time.perf_counter() - t0
            parallel = ParallelParams(workers=workers, scheduler_address=cluster.scheduler_address)
            load = os.getloadavg()[0]
            cpu = worker_cpu(client)
            t = time.perf_counter()
            if stage == "prepare":
                prepare(p.prepare, out_dir=out / "prepared", seed=0, parallel=parallel)
            elif stage == "degrade":
                degrade_folder(out / "prepared", out / "degraded", p.degrade, seed=0, parallel=parallel)
            else:
                encode_pairs(out / "prepared", out / "degraded", out / "latents", encode=p.encode,
                             backbone=p.backbone, device="cpu", backbone_dir=backbone, parallel=parallel)
            seconds = time.perf_counter() - t
            cpu = worker_cpu(client) - cpu
            peaks = worker_peaks(client)
        rec = {"seconds": round(seconds, 2), "images_per_s": round(n / seconds, 3),
               "cluster_start_s": round(start_s, 1),
               # the workers' CPU seconds per image, and the cores they got: CPU s / (wall s x W)
               "worker_cpu_s_per_image": round(cpu / n, 3), "cores_used_of_w": round(cpu / seconds / workers, 3),
               "worker_peak_rss_mib": [round(m) for m in peaks],
               "load_1min": [round(load, 2), round(os.getloadavg()[0], 2)]}
        record["stages"][stage] = rec
        print(f"n={n} workers={workers} {stage}: {seconds:.1f} s, {n / seconds:.2f} img/s, worker peak RSS "
              f"{rec['worker_peak_rss_mib']} MiB, worker CPU {rec['worker_cpu_s_per_image']} s/img on "
              f"{rec['cores_used_of_w']:.0%} of {workers} cores, load {load:.1f}, cluster start {start_s:.0f} s",
              flush=True)
    manifest = json.loads((out / "latents" / "manifest.json").read_text())
    record["bytes_per_pair"] = {
        "prepared_hq_png": folder_bytes(out / "prepared" / "hq") // n,
        "degraded_png": (folder_bytes(out / "degraded" / "lq") + folder_bytes(out / "degraded" / "lq_up")) // n,
        "latents": sum((out / "latents" / s["file"]).stat().st_size for s in manifest["shards"]) // n,
    }
    record["latent_shape"] = manifest["latent_shape"]
    shutil.rmtree(out, ignore_errors=True)
    return record


def cpu_probe(n: int, src: Path, work: Path, backbone: Path) -> dict:
    """CPU seconds per image of each stage, in this process on one thread (``parallel.workers: 1``):
    what a worker spends, whatever else shares the machine."""
    p = params_from_dict({
        "prepare": {"sources": [str(src)], "crop_size": 512, "crops_per_image": 1, "crop_mode": "center",
                    "extensions": [".jpg"]},
        "encode": {"batch_size": 8, "shard_size": 64}})
    out = work / "probe"
    shutil.rmtree(out, ignore_errors=True)
    steps = {
        "prepare": lambda: prepare(p.prepare, out_dir=out / "prepared", seed=0),
        "degrade": lambda: degrade_folder(out / "prepared", out / "degraded", p.degrade, seed=0),
        "encode": lambda: encode_pairs(out / "prepared", out / "degraded", out / "latents", encode=p.encode,
                                       backbone=p.backbone, device="cpu", backbone_dir=backbone),
    }
    record = {"images": n}
    for stage in STAGES:
        steps[stage]()  # warm-up (imports, the VAE load) on the same images
        shutil.rmtree(out / "latents", ignore_errors=True)  # else encode reuses the warm-up's shards
        cpu, wall = time.process_time(), time.perf_counter()
        steps[stage]()
        record[stage] = {"cpu_s_per_image": round((time.process_time() - cpu) / n, 3),
                         "wall_s_per_image": round((time.perf_counter() - wall) / n, 3)}
        print(f"probe {stage}: {record[stage]}", flush=True)
    shutil.rmtree(out, ignore_errors=True)
    return record


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[256])
    # encode's parallelism is its number of shards: at ImageNet scale thousands, so a short run keeps
    # several per worker (256 images: 8 shards) lest one worker's last shard set the time
    ap.add_argument("--encode-shard-size", type=int, default=32)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--sources", type=int, default=None, help="JPEGs to make (default: the largest size)")
    ap.add_argument("--photos", type=Path, default=REPO.parent / "shared" / "data" / "train" / "CBSD68")
    ap.add_argument("--backbone", type=Path, default=REPO / "data" / "models" / "backbone")
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "scale.json")
    ap.add_argument("--cpu-probe", type=int, default=0, help="only the CPU-seconds probe on this many images")
    args = ap.parse_args()
    load_before = os.getloadavg()[0]
    work = args.work or Path(tempfile.mkdtemp(prefix="bench_scale_"))
    photos = source_photos(args.photos)
    total = args.sources or max(args.sizes)
    backbone = args.backbone
    if not (backbone / "vae").is_dir():
        backbone = build_tiny_backbone(work / "backbone", seed=0)
        print(f"{args.backbone} is absent: encoding with a fresh embedded backbone ({backbone})", flush=True)
    t = time.perf_counter()
    make_sources(work / "all", total, photos)
    print(f"{total} source JPEGs from {len(photos)} photos in {time.perf_counter() - t:.0f} s", flush=True)
    if args.cpu_probe:
        record = cpu_probe(args.cpu_probe, work / "all", work, backbone)
        write_record(args.out, {"machine": machine(load_before), "photos": len(photos), "cpu_probe": record})
        shutil.rmtree(work, ignore_errors=True)
        return
    runs = []
    for n in args.sizes:
        src = work / f"src{n}"
        src.mkdir(exist_ok=True)
        for k in range(n):
            dst = src / f"img{k:06d}.jpg"
            if not dst.exists():
                os.link(work / "all" / f"img{k:06d}.jpg", dst)
        for w in args.workers:
            runs.append(run_size(n, w, src, work, backbone, args.encode_shard_size))
            record = {"machine": machine(load_before), "photos": len(photos), "runs": runs,
                      "scaling": scaling(runs)}
            write_record(args.out, record)
    print(markdown(record["scaling"]))
    shutil.rmtree(work, ignore_errors=True)


def scaling(runs: list[dict]) -> list[dict]:
    """Per size and W > 1: each stage's speed-up over 1 worker, the three together's, and W's share."""
    one = {r["images"]: r for r in runs if r["workers"] == 1}
    rows = []
    for r in runs:
        base = one.get(r["images"])
        if r["workers"] == 1 or base is None:
            continue
        row = {"images": r["images"], "workers": r["workers"]}
        for stage in STAGES:
            row[stage] = round(base["stages"][stage]["seconds"] / r["stages"][stage]["seconds"], 3)
            row[f"{stage}_peak_rss_mib"] = max(r["stages"][stage]["worker_peak_rss_mib"])
        total_1 = sum(base["stages"][s]["seconds"] for s in STAGES)
        total_w = sum(r["stages"][s]["seconds"] for s in STAGES)
        row.update(all_three=round(total_1 / total_w, 3), seconds=[round(total_1, 1), round(total_w, 1)],
                   fraction_of_w=round(total_1 / total_w / r["workers"], 3))
        if all("worker_cpu_s_per_image" in x["stages"][s] for x in (base, r) for s in STAGES):
            cpu_1 = sum(base["stages"][s]["worker_cpu_s_per_image"] for s in STAGES)
            cpu_w = sum(r["stages"][s]["worker_cpu_s_per_image"] for s in STAGES)
            # W's extra CPU per image (parallel overhead) and the cores W's workers got (the rest went elsewhere)
            row.update(cpu_s_per_image=[cpu_1, round(cpu_w, 3)],
                       cores_used=round(cpu_w * r["images"] / total_w, 2))
        rows.append(row)
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| images | W | prepare | degrade | encode | all three (s: 1 → W) | ÷ W | worker CPU s / image (1, W) "
             "| cores W's workers got | peak RSS per worker, MiB (prepare / degrade / encode) |",
             "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in rows:
        lines.append(f"| {r['images']} | {r['workers']} | {r['prepare']:.2f}× | {r['degrade']:.2f}× | "
                     f"{r['encode']:.2f}× | **{r['all_three']:.2f}×** ({r['seconds'][0]} → {r['seconds'][1]}) | "
                     f"{r['fraction_of_w']:.2f} | {r.get('cpu_s_per_image', '')} | {r.get('cores_used', '')} | "
                     f"{r['prepare_peak_rss_mib']} / {r['degrade_peak_rss_mib']} / "
                     f"{r['encode_peak_rss_mib']} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
