"""Training throughput of the train_sdsr step, three ways to feed it, and where the time goes.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_training.py

The same model (tiny backbone: ConsisSR net on the embedded UNet, the tiny robust CLIP), the
same Algorithm-1 objective (``sdsr_stage.TalaObjective``), Adam, batch 4 of 128² crops
(latents 16²), fed four ways:

* ``cached``  — the latent cache (``LatentPairDataset``) with the robust CLIP embeddings computed
  once up front: what stage ``train_sdsr`` does;
* ``pixels``  — the cached LQ/HQ pixel pairs (``PairedImageDataset``), VAE-encoded and
  CLIP-embedded every step;
* ``online``  — the HQ crops degraded every step (``degradation.sample_kernels`` per image, then
  ``degrade`` on the batch, Real-ESRGAN's second-order pipeline), then VAE-encoded and
  CLIP-embedded, as the paper's (Real-ESRGAN-style) dataloader does;
* ``online_reference`` — the same online feed through realesrgan's own ``feed_data`` on basicsr's
  ops (``benchmarks/reference.py``), one image at a time as its DiffJPEG requires: the paper's
  dataloader as the official code runs it, without this project's faster USM sharpening.

Each way runs ``--warmup`` steps, then ``--steps`` timed steps, interleaved (a step of each way
per round, so that load from other processes hits the three alike); every step is split into data
(reading and collating), degradation, VAE encode, CLIP embed and forward+backward+Adam step.
Data come from ``data/{prepared,degraded,latents}`` and ``data/models/backbone`` when a
128² pipeline has been built there (``dvc repro encode``), else they are built in a temporary
folder with the same stage functions. Prints a markdown table and writes
``benchmarks/results/training.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch
from torch.utils.data import DataLoader

from benchmarks.common import machine, write_record
from benchmarks.reference import make_reference_model, reference_degrade
from consissr.config import (
    BackboneParams,
    DegradeParams,
    EncodeParams,
    ModelParams,
    PrepareParams,
)
from consissr.data.degradation import degrade, sample_kernels
from consissr.data.latent_cache import LatentPairDataset, encode_latents
from consissr.data.layout import read_rgb
from consissr.data.pairs import PairedImageDataset
from consissr.models.backbone import load_backbone
from consissr.models.consissr import ConsisSRNet, apply_trainable_policy
from consissr.models.robust_clip import RobustCLIP
from consissr.training.prompts import encode_prompts
from consissr.training.sdsr_stage import SdsrDataset, robust_clip_embeddings
from consissr.training.tala import TalaObjective

PARTS = ("data", "degradation", "vae_encode", "clip_embed", "train_step")
WAYS = ("cached", "pixels", "online", "online_reference")


def data_dirs(crop: int, tmp: Path) -> dict[str, Path]:
    """The repository's DVC outputs when they are a ``crop``² pipeline, else a fresh one in ``tmp``."""
    data = ROOT / "data"
    dirs = {"prepared": data / "prepared", "degraded": data / "degraded", "latents": data / "latents",
            "backbone": data / "models" / "backbone"}
    manifest = dirs["latents"] / "manifest.json"
    if (manifest.is_file() and (dirs["backbone"] / "model_index.json").is_file()
            and json.loads(manifest.read_text())["image_shape"][:2] == [crop, crop]):
        return dirs
    from consissr.data.degradation import degrade_folder
    from consissr.data.latent_cache import encode_pairs
    from consissr.data.sources import prepare
    from consissr.models.backbone import build_tiny_backbone

    dirs = {k: tmp / k for k in dirs}
    build_tiny_backbone(dirs["backbone"], seed=2024)
    prepare(PrepareParams(crop_size=crop), out_dir=dirs["prepared"], seed=2024)
    degrade_folder(dirs["prepared"], dirs["degraded"], DegradeParams(), seed=2024)
    encode_pairs(dirs["prepared"], dirs["degraded"], dirs["latents"], encode=EncodeParams(),
                 backbone=BackboneParams(), device="cpu", backbone_dir=dirs["backbone"])
    return dirs


def vae_factor(dirs: dict) -> int:
    widths = json.loads((dirs["backbone"] / "vae" / "config.json").read_text())["block_out_channels"]
    return 2 ** (len(widths) - 1)


class HQCrops(torch.utils.data.Dataset):
    """Only the HQ crops of the pairs: what an online-degradation dataloader reads."""

    def __init__(self, pairs: PairedImageDataset) -> None:
        self.pairs = pairs

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> dict:
        return {"hq": read_rgb(self.pairs.hq_path(self.pairs.ids[i]))}




def endless(loader):
    while True:
        yield from loader


def bench(dirs: dict[str, Path], *, batch: int, warmup: int, steps: int, seed: int) -> dict:
    torch.manual_seed(seed)
    bb = load_backbone("embedded", embedded_dir=dirs["backbone"])
    vae = bb.vae
    clip = RobustCLIP(model_name="consissr-tiny-vit", pretrained=None, with_teacher=False).eval()
    clip.requires_grad_(False)
    prompt_embeds = encode_prompts(bb.tokenizer, bb.text_encoder, [""], device=torch.device("cpu"))
    net = ConsisSRNet.from_backbone(bb, ModelParams(), image_embed_dim=clip.embed_dim)
    params = apply_trainable_policy(net)
    model = TalaObjective(net, alphas_cumprod=bb.noise_scheduler.alphas_cumprod, prompt_embeds=prompt_embeds,
                          gamma=10.0, tala=True, prompt_dropout=0.0).train()
    optimizer = torch.optim.Adam(params, lr=5e-5, betas=(0.9, 0.99))
    p = DegradeParams()

    latents = LatentPairDataset(dirs["latents"])
    image_embeds = robust_clip_embeddings(clip, dirs["degraded"] / "lq_up", latents.ids, device=torch.device("cpu"))
    cached = SdsrDataset(latents, image_embeds, torch.zeros(len(latents), dtype=torch.long))
    pairs = PairedImageDataset(dirs["prepared"], dirs["degraded"], lq_source="lq_up")
    loaders = {
        "cached": endless(DataLoader(cached, batch_size=batch, shuffle=True, drop_last=True)),
        "pixels": endless(DataLoader(pairs, batch_size=batch, shuffle=True, drop_last=True)),
        "online": endless(DataLoader(HQCrops(pairs), batch_size=batch, shuffle=True, drop_last=True)),
        "online_reference": endless(DataLoader(HQCrops(pairs), batch_size=batch, shuffle=True, drop_last=True)),
    }
    reference = make_reference_model(p, gt_size=hq_size(pairs))

    def step(way: str) -> dict[str, float]:
        t = {k: 0.0 for k in PARTS}
        start = time.perf_counter()
        b = next(loaders[way])
        t["data"] = time.perf_counter() - start
        if way != "cached":
            hq = b["hq"]
            start = time.perf_counter()
            if way == "online":  # per-image kernels, batch degradation (Real-ESRGAN dataset + feed_data)
                kernels = [sample_kernels(p) for _ in range(len(hq))]
                stacked = {k: torch.stack([kk[k] for kk in kernels]) for k in kernels[0]}
                lq_up = degrade(hq, stacked, p)[1]
            elif way == "online_reference":  # the same, through realesrgan's own feed_data + basicsr ops
                lqs = [reference_degrade(hq[i:i + 1], sample_kernels(p), p, reference) for i in range(len(hq))]
                lq_up = torch.cat([resize_back(lq, hq.shape[-2:]) for lq in lqs])
            else:
                lq_up = b["lq"]
            t["degradation"] = time.perf_counter() - start
            start = time.perf_counter()
            both = encode_latents(vae, torch.cat([lq_up, hq]) * 2 - 1)
            t["vae_encode"] = time.perf_counter() - start
            start = time.perf_counter()
            with torch.no_grad():
                embeds = clip.student_embeds(lq_up)
            t["clip_embed"] = time.perf_counter() - start
            b = {"lq": both[:len(hq)], "hq": both[len(hq):], "image_embeds": embeds,
                 "prompt": torch.zeros(len(hq), dtype=torch.long)}
        start = time.perf_counter()
        loss, _ = model(b)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        t["train_step"] = time.perf_counter() - start
        return t

    # warm up every way, then interleave the timed steps (one of each way per round), so that
    # load from other processes and slow drifts hit the three alike
    for way in WAYS:
        for _ in range(warmup):
            step(way)
    times: dict[str, list[dict[str, float]]] = {way: [] for way in WAYS}
    for _ in range(steps):
        for way in WAYS:
            times[way].append(step(way))
    results = {}
    for way in WAYS:
        per_step = [sum(t.values()) for t in times[way]]
        total = sum(per_step)
        results[way] = {
            "steps": steps, "it_per_s": steps / total, "s_per_step": total / steps,
            "s_per_step_median": statistics.median(per_step),
            "breakdown_s_per_step": {k: sum(t[k] for t in times[way]) / steps for k in PARTS},
        }
    for way in WAYS:
        results[way]["speedup_vs_online"] = results[way]["it_per_s"] / results["online"]["it_per_s"]
        results[way]["speedup_vs_online_reference"] = (
            results[way]["it_per_s"] / results["online_reference"]["it_per_s"])
    return results


def hq_size(pairs: PairedImageDataset) -> int:
    return int(pairs[0]["hq"].shape[-1])


def resize_back(lq: torch.Tensor, size) -> torch.Tensor:
    """LQ → HQ size as ``degrade`` does for ``lq_up`` (bicubic, clamped, 8-bit)."""
    up = torch.nn.functional.interpolate(lq, size=tuple(size), mode="bicubic", align_corners=False)
    return (up.clamp(0, 1) * 255).round() / 255


def markdown(results: dict) -> str:
    lines = ["| feed | it/s | s / step | data | degradation | VAE encode | CLIP embed | fwd+bwd+step | vs online | vs online (reference ops) |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    labels = {"cached": "cached latents (`LatentPairDataset`)", "pixels": "cached pixels, VAE + CLIP every step",
              "online": "online degradation (this project's `degrade`), VAE + CLIP every step",
              "online_reference": "online degradation (realesrgan `feed_data`, basicsr ops), VAE + CLIP every step"}
    for way in WAYS:
        r = results[way]
        parts = " | ".join(f"{r['breakdown_s_per_step'][k]:.3f}" for k in PARTS)
        lines.append(f"| {labels[way]} | {r['it_per_s']:.2f} | {r['s_per_step']:.3f} | {parts} | "
                     f"**{r['speedup_vs_online']:.2f}×** | **{r['speedup_vs_online_reference']:.2f}×** |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--crop", type=int, default=128)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "training.json")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        dirs = data_dirs(args.crop, Path(tmp))
        load_before = os.getloadavg()[0]
        results = bench(dirs, batch=args.batch, warmup=args.warmup, steps=args.steps, seed=args.seed)
        latent = args.crop // vae_factor(dirs)
        source = "data/ (DVC outputs)" if dirs["latents"].is_relative_to(ROOT) else "built in a temporary folder"
    table = markdown(results)
    print(table)
    record = {
        "machine": machine(load_before),
        "setup": {"profile": "tiny", "crop": args.crop, "latent": latent, "batch": args.batch,
                  "warmup": args.warmup, "steps": args.steps, "data": source,
                  "model": "ConsisSRNet(ModelParams()) on the embedded backbone, tiny robust CLIP, Adam"},
        "results": results, "table": table,
    }
    write_record(args.out, record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
