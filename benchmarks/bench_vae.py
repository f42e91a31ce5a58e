"""Tiny-VAE reconstruction quality per CPU second: which geometry and schedule to embed.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_vae.py --variants f4c8 f4c16w --seconds 150

Each variant is an ``AutoencoderKL`` (no attention anywhere) trained single-threaded by
``consissr.training.vae_stage.train_autoencoder`` on random crops of the embedded training
photos (scikit-image, less the stage's held-out ones) for ``--seconds`` of training CPU time
(``time.process_time``: other jobs on the machine do not count); every ``--eval-every`` seconds the reconstruction PSNR(Y) (decode(mode(encode(x))) vs x) is measured
on centre crops of Set5+Set14 (``/work/shared/data/test``; else the held-out embedded photos),
outside the timed part. Writes the curves to ``benchmarks/results/vae.json`` (variants merged
into what is there) and ``benchmarks/results/vae.png``, with the bicubic ×4 figure of the same
crops after the project's degradation for reference.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch

from benchmarks.common import machine
from consissr.config import TrainVaeParams
from consissr.models.backbone import tiny_vae_config
from consissr.training import vae_stage

TEST_DIR = Path("/work/shared/data/test")
OUT = ROOT / "benchmarks" / "results" / "vae.json"


def variant(down: int, channels: int, widths: tuple[int, ...], layers: int = 1, groups: int = 8, **train) -> dict:
    """``down`` = log2 of the downsampling factor (len(widths) = down + 1); ``groups``: GroupNorm groups."""
    assert len(widths) == down + 1
    return {"vae": {"latent_channels": channels, "block_out_channels": widths, "layers_per_block": layers,
                    "norm_num_groups": groups}, "train": train}


VARIANTS = {
    # the reference point: 4x/8ch, widths 16/32/32, constant lr 2e-3
    "f4c8_const": variant(2, 8, (16, 32, 32), schedule="const"),
    "f4c8": variant(2, 8, (16, 32, 32)),
    "f4c16": variant(2, 16, (16, 32, 32)),
    "f4c8_w32": variant(2, 8, (32, 32, 64)),
    "f4c16_w32": variant(2, 16, (32, 32, 64)),
    "f4c8_w32_l2": variant(2, 8, (32, 32, 64), layers=2),
    "f8c16": variant(3, 16, (16, 32, 32, 32)),
    "f4c8_bs16": variant(2, 8, (16, 32, 32), batch_size=16),
    "f4c8_kl0": variant(2, 8, (16, 32, 32), kl_weight=0.0),
    "f4c16_bs4": variant(2, 16, (16, 32, 32), batch_size=4),
    "f4c16_bs4_lr4": variant(2, 16, (16, 32, 32), batch_size=4, lr=4e-3),
    "f4c8_bs4_lr4": variant(2, 8, (16, 32, 32), batch_size=4, lr=4e-3),
    # the colour fix (issue 13): one GroupNorm group (8 groups of 2 channels lose each crop's colour)
    "f4c8_g1": variant(2, 8, (16, 32, 32), groups=1),
}


def build_vae(spec: dict, seed: int):
    from diffusers import AutoencoderKL

    cfg = tiny_vae_config()
    n = len(spec["block_out_channels"])
    cfg.update(spec, down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n)
    torch.manual_seed(seed)
    return AutoencoderKL(**cfg)


def centre_crop(image: torch.Tensor, size: int) -> torch.Tensor:
    h, w = image.shape[1:]
    s = min(size, h, w)
    y, x = (h - s) // 2, (w - s) // 2
    return image[:, y:y + s, x:x + s]


def eval_images(size: int, held_out: list[torch.Tensor]) -> tuple[str, list[torch.Tensor]]:
    from consissr.data.sources import load_rgb

    if TEST_DIR.is_dir():
        paths = sorted(TEST_DIR.rglob("*.png"))
        return (f"{TEST_DIR} (Set5+Set14, {len(paths)} centre crops {size}²)",
                [centre_crop(vae_stage.to_tensor(load_rgb(p)[0]), size) for p in paths])
    return "held-out embedded photos", [centre_crop(p, size) for p in held_out]


def bicubic_psnr(images: list[torch.Tensor], seed: int) -> float:
    """PSNR(Y) of the bicubic ×4 of the project's degraded LQ (default ``DegradeParams``)."""
    from consissr.config import DegradeParams
    from consissr.data.degradation import degrade, sample_kernels, seeded

    p, pairs = DegradeParams(), []
    for n, hq in enumerate(images):
        s = min(hq.shape[1:]) // 4 * 4
        hq = hq[None, :, :s, :s]
        with seeded(seed + n):
            _, lq_up = degrade(hq, sample_kernels(p), p)
        pairs.append((lq_up[0], hq[0]))
    return vae_stage.mean_psnr_y(pairs)


def run_variant(name: str, spec: dict, photos, images, *, seconds: float, eval_every: float, seed: int,
                steps: int = 0, eval_steps: int = 0) -> dict:
    """Train ``spec`` for ``steps`` (0: as many as ``seconds`` of CPU allow; the cosine ends there),
    measuring every ``eval_steps`` steps (0: every ``eval_every`` CPU seconds)."""
    base = TrainVaeParams()
    train = {"batch_size": base.batch_size, "crop_size": base.crop_size, "lr": base.lr, "kl_weight": base.kl_weight,
             "schedule": "cosine"}
    train.update(spec["train"])
    vae = build_vae(spec["vae"], seed)
    curve = [{"seconds": 0.0, "step": 0, **vae_stage.colour_errors(vae_stage.reconstruction_pairs(vae, images))}]
    if not steps:  # the cosine needs a step count: estimate it from a few timed steps
        probe = time.process_time()
        vae_stage.train_autoencoder(build_vae(spec["vae"], seed), photos, steps=5, batch_size=train["batch_size"],
                                    crop_size=train["crop_size"], lr=train["lr"], kl_weight=train["kl_weight"],
                                    seed=seed)
        steps = int(seconds / ((time.process_time() - probe) / 5))
    next_eval = [eval_every]

    def on_step(step: int, elapsed: float, parts: dict) -> None:
        if (eval_steps and step % eval_steps == 0) or (not eval_steps and elapsed >= next_eval[0]) or step == steps:
            curve.append({"seconds": round(elapsed, 1), "step": step, "loss": parts["loss"],
                          **vae_stage.colour_errors(vae_stage.reconstruction_pairs(vae, images))})
            next_eval[0] += eval_every
            print(f"{name}: {elapsed:6.1f} s step {step:5d} PSNR(Y) {curve[-1]['psnr_y']:.2f} dB "
                  f"PSNR(RGB) {curve[-1]['psnr_rgb']:.2f} dB", flush=True)

    vae_stage.train_autoencoder(vae, photos, steps=steps, seed=seed, on_step=on_step, clock=time.process_time,
                                **train)
    return {"spec": spec, "train": train, "steps": steps, "params": sum(p.numel() for p in vae.parameters()),
            "curve": curve, "best_psnr_y": max(c["psnr_y"] for c in curve[1:])}


def plot(record: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for name, res in record["variants"].items():
        ax.plot([c["seconds"] for c in res["curve"]], [c["psnr_y"] for c in res["curve"]], marker=".", label=name)
    bic = record["bicubic_x4_psnr_y"]
    ax.axhline(bic, color="gray", ls="--", label=f"bicubic x4 of degraded LQ ({bic:.1f} dB)")
    ax.axhline(bic + 5, color="red", ls=":", label=f"goal: bicubic + 5 dB ({bic + 5:.1f} dB)")
    ax.set_xlabel("training CPU seconds (1 thread)")
    ax.set_ylabel("reconstruction PSNR(Y), dB")
    ax.set_ylim(bottom=max(10, bic - 6))
    ax.set_title(f"tiny AutoencoderKL: {record['eval_set']}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=100)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", nargs="+", default=["f4c8_const", "f4c8"], choices=sorted(VARIANTS))
    ap.add_argument("--seconds", type=float, default=150.0)
    ap.add_argument("--steps", type=int, default=0, help="a fixed step count instead of --seconds")
    ap.add_argument("--eval-steps", type=int, default=0, help="measure every N steps instead of --eval-every")
    ap.add_argument("--eval-every", type=float, default=30.0)
    ap.add_argument("--eval-size", type=int, default=192)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=2024)
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--evaluate", type=Path, metavar="VAE_DIR",
                    help="only evaluate a saved VAE (e.g. data/models/vae) on the same crops; record it in --out")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]
    train_photos, held_out = vae_stage.embedded_split(TrainVaeParams().holdout)
    eval_set, images = eval_images(args.eval_size, held_out)
    record = json.loads(args.out.read_text()) if args.out.is_file() else {"variants": {}}
    record.update(eval_set=eval_set, bicubic_x4_psnr_y=bicubic_psnr(images, args.seed))
    print(f"eval: {eval_set}; bicubic x4 of degraded LQ: {record['bicubic_x4_psnr_y']:.2f} dB")
    if args.evaluate:
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(args.evaluate)
        stage = json.loads((args.evaluate / vae_stage.METRICS_NAME).read_text())
        log = args.evaluate / vae_stage.TRAIN_LOG
        record["stage_output"] = {"path": str(args.evaluate), "steps": stage["steps"],
                                  **vae_stage.colour_errors(vae_stage.reconstruction_pairs(vae, images)),
                                  "stage_metrics": stage,
                                  "train_log": json.loads(log.read_text()) if log.is_file() else None}
        print(f"{args.evaluate}: PSNR(Y) {record['stage_output']['psnr_y']:.2f} dB, "
              f"PSNR(RGB) {record['stage_output']['psnr_rgb']:.2f} dB")
        args.out.write_text(json.dumps(record, indent=2) + "\n")
        return
    for name in args.variants:
        record["variants"][name] = run_variant(name, VARIANTS[name], train_photos, images, seconds=args.seconds,
                                               eval_every=args.eval_every, seed=args.seed, steps=args.steps,
                                               eval_steps=args.eval_steps)
        record["variants"][name]["machine"] = machine(load_before)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(record, indent=2) + "\n")
        plot(record, args.out.with_suffix(".png"))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
