"""GPU check: the paper profile with random weights on one GPU — a train_sdsr step and inference latency.

    .venv/bin/python benchmarks/gpu_check.py [--out benchmarks/results/gpu_check.json]   # one H100: < 8 min
    .venv/bin/python benchmarks/gpu_check.py --tiny                                     # CPU, seconds (the test)

Every part is built from configs inside the repo, no download: SD 2.1-base's UNet/VAE/text-encoder
configs (``consissr/models/sd_configs/``), the ControlNet and adapters from ``configs/paper.yaml``'s
``model`` section, the ViT-H-14 robust CLIP tower (open_clip, ``pretrained=None``) and the
RRDBNet x4plus shape (``gan``). ``--tiny``: the embedded backbone's configs and ``params.yaml``.
Measured:
* one ``train_sdsr`` step — Algorithm 1 through ``TalaObjective``, the loop's accelerate mixed
  precision (``train_sdsr.mixed_precision``, fp32 master weights), Adam, gradient clipping — at
  512² crops (latents 64²), batch 8, with and without gradient checkpointing: seconds per step
  (median after a warm-up step) and peak GPU memory;
* ``ConsisSRPipeline`` latency of a 128² → 512² upscale (one tile) with bf16 weights: GANEmb-10
  (preset ``rec``) and full-50, median of ``--repeats`` after a warm-up.
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from consissr.config import Params, load_params  # noqa: E402


@dataclasses.dataclass
class Profile:
    name: str
    params: Params
    unet: dict
    vae: dict
    text_encoder: dict
    clip_name: str
    out_size: int  # output pixels (= training crop side)
    batch: int  # train_sdsr batch
    dtype: torch.dtype  # inference weights


def paper_profile() -> Profile:
    from consissr.models.info import SD21_BASE_CONFIG_DIR

    def config(part):
        return json.loads((SD21_BASE_CONFIG_DIR / part / "config.json").read_text())

    params = load_params(ROOT / "configs" / "paper.yaml")
    return Profile("paper", params, config("unet"), config("vae"), config("text_encoder"), params.clip.model_name,
                   out_size=params.prepare.crop_size, batch=params.train_sdsr.global_batch_size, dtype=torch.bfloat16)


def tiny_profile() -> Profile:
    from consissr.models.backbone import TINY_CROP_SIZE, tiny_text_config, tiny_unet_config, tiny_vae_config

    vae = tiny_vae_config()
    factor = 2 ** (len(vae["block_out_channels"]) - 1)
    return Profile("tiny", load_params(ROOT / "params.yaml"),
                   tiny_unet_config(vae["latent_channels"], TINY_CROP_SIZE // factor), vae, tiny_text_config(),
                   "consissr-tiny-vit", out_size=64, batch=2, dtype=torch.float32)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_gib(device: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def build_backbone(profile: Profile, device: torch.device) -> SimpleNamespace:
    """UNet, VAE, text encoder (random, fp32, on ``device``), tokenizer and the SD noise schedule."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from consissr.models.backbone import SD_SCHEDULE, _clip_tokenizer_files

    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel.from_config(profile.unet)
        vae = AutoencoderKL.from_config(profile.vae)
        text_encoder = CLIPTextModel(CLIPTextConfig.from_dict(profile.text_encoder))
    with tempfile.TemporaryDirectory() as tmp:
        _clip_tokenizer_files(Path(tmp))
        tokenizer = CLIPTokenizer.from_pretrained(tmp, pad_token="!", model_max_length=77, local_files_only=True)
    return SimpleNamespace(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                           scheduler=DDPMScheduler(**SD_SCHEDULE))


def train_step(objective, profile: Profile, device: torch.device, *, steps: int, embed_dim: int) -> dict:
    """Seconds per train_sdsr step and peak memory, with and without gradient checkpointing."""
    from consissr.models.consissr import apply_trainable_policy
    from consissr.training import loop
    from consissr.training.sdsr_stage import loop_settings

    train = profile.params.train_sdsr
    settings = loop_settings(train, seed=0, device=str(device))
    accelerator = loop._new_accelerator(settings)
    net, factor = objective.net, 2 ** (len(profile.vae["block_out_channels"]) - 1)  # the VAE's downsampling
    params = apply_trainable_policy(net)
    optimizer = torch.optim.Adam(params, lr=train.lr, betas=tuple(train.betas))
    model, optimizer = accelerator.prepare(objective.train(), optimizer)
    side, channels = profile.out_size // factor, net.unet.config.in_channels
    g = torch.Generator().manual_seed(0)
    batch = {"hq": torch.randn(profile.batch, channels, side, side, generator=g),
             "lq": torch.randn(profile.batch, channels, side, side, generator=g),
             "image_embeds": torch.randn(profile.batch, embed_dim, generator=g),
             "prompt": torch.zeros(profile.batch, dtype=torch.long)}
    if net.config["controlnet_conditioning"] == "pixel":
        batch["lq_pixels"] = torch.rand(profile.batch, 3, profile.out_size, profile.out_size, generator=g)
    batch = {k: v.to(accelerator.device) for k, v in batch.items()}

    def step() -> float:
        with accelerator.autocast():
            loss, _ = model(batch)
        accelerator.backward(loss)
        if train.max_grad_norm is not None:
            accelerator.clip_grad_norm_(params, train.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    results = {}
    for checkpointing in (True, False):  # on first: if off runs out of memory, on is still measured
        for part in (net.unet, net.controlnet):
            part.enable_gradient_checkpointing() if checkpointing else part.disable_gradient_checkpointing()
        key = "gradient_checkpointing" if checkpointing else "no_gradient_checkpointing"
        try:
            reset_peak(device)
            losses, times = [step()], []  # warm-up step
            for _ in range(steps):
                sync(device)
                start = time.perf_counter()
                losses.append(step())
                sync(device)
                times.append(time.perf_counter() - start)
            results[key] = {"seconds_per_step": round(statistics.median(times), 4), "peak_memory_gib": peak_gib(device),
                            "losses": [round(v, 5) for v in losses]}
        except torch.OutOfMemoryError as exc:
            optimizer.zero_grad(set_to_none=True)
            results[key] = {"oom": True, "error": str(exc).splitlines()[0]}
        for part in (net.unet, net.controlnet):
            part.disable_gradient_checkpointing()
    net.requires_grad_(False).eval()
    return {"batch": profile.batch, "crop": profile.out_size, "latent": side, "mixed_precision": train.mixed_precision,
            "max_grad_norm": train.max_grad_norm, "trainable_parameters": sum(p.numel() for p in params), **results}


def inference(bb: SimpleNamespace, net, profile: Profile, device: torch.device, *, repeats: int, full_steps: int) -> dict:
    """ConsisSRPipeline latency of one out_size² upscale: GANEmb-10 (rec) and full-``full_steps``."""
    from consissr.inference.pipeline import ConsisSRPipeline
    from consissr.models.gan import build_rrdbnet, load_gan, save_gan
    from consissr.models.robust_clip import RobustCLIP

    params = profile.params
    clip = RobustCLIP(model_name=profile.clip_name, pretrained=None, image_size=params.clip.image_size,
                      device=device, with_teacher=False)
    arch = {"scale": params.degrade.scale, "num_block": params.gan.num_block, "num_feat": params.gan.num_feat,
            "num_grow_ch": params.gan.num_grow_ch}
    with tempfile.TemporaryDirectory() as tmp:
        save_gan(build_rrdbnet(**arch), tmp, **arch)
        gan = load_gan(tmp, device=device)
    defaults = dict(dataclasses.asdict(params.inference), tile_size=profile.out_size,  # one tile
                    tile_overlap=min(params.inference.tile_overlap, profile.out_size // 2))
    pipe = ConsisSRPipeline(bb.vae, bb.text_encoder, bb.tokenizer, bb.scheduler, net, clip, gan, defaults=defaults)
    pipe.to(device, dtype=profile.dtype)
    pipe.set_progress_bar_config(disable=True)
    lq = np.random.default_rng(0).random((profile.out_size // pipe.scale,) * 2 + (3,), dtype=np.float32)
    calls = {"ganemb-rec-10": {"mode": "ganemb", "preset": "rec"},
             f"full-{full_steps}": {"mode": "full", "num_inference_steps": full_steps}}
    out: dict = {"output": profile.out_size, "weights_dtype": str(profile.dtype).removeprefix("torch.")}
    with torch.no_grad():
        pipe(lq, seed=0, output_type="np", **calls["ganemb-rec-10"])  # warm-up
        for name, kwargs in calls.items():
            reset_peak(device)
            times, shape = [], None
            for _ in range(repeats):
                sync(device)
                start = time.perf_counter()
                shape = pipe(lq, seed=0, output_type="np", **kwargs).images.shape
                sync(device)
                times.append(time.perf_counter() - start)
            out[name] = {"seconds": round(statistics.median(times), 4), "peak_memory_gib": peak_gib(device),
                         "output_shape": list(shape)}
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="the embedded profile's shapes on CPU (seconds)")
    parser.add_argument("--device", default=None, help="default: cuda when present, else cpu")
    parser.add_argument("--steps", type=int, default=3, help="timed train steps per setting (after one warm-up)")
    parser.add_argument("--repeats", type=int, default=3, help="timed upscales per mode (after one warm-up)")
    parser.add_argument("--full-steps", type=int, default=50)
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = parser.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    profile = tiny_profile() if args.tiny else paper_profile()
    if device.type == "cpu" and not args.tiny:
        print("warning: the paper profile on CPU takes hours; use --tiny or a GPU", file=sys.stderr)

    from consissr.models.consissr import ConsisSRNet
    from consissr.training.prompts import encode_prompts
    from consissr.training.tala import TalaObjective

    started = time.perf_counter()
    record: dict = {"profile": profile.name, "device": torch.cuda.get_device_name(device) if device.type == "cuda"
                    else "cpu", "torch": torch.__version__}
    bb = build_backbone(profile, device)
    from consissr.models.robust_clip import RobustCLIP  # the embedding width, from the tower's config

    with torch.device("meta"):
        embed_dim = RobustCLIP(model_name=profile.clip_name, pretrained=None, with_teacher=False, device="meta").embed_dim
    with torch.device(device):
        net = ConsisSRNet.from_backbone(bb, profile.params.model, image_embed_dim=embed_dim)
    record["model"] = {**net.config, "unet_parameters": sum(p.numel() for p in net.unet.parameters()),
                       "controlnet_parameters": sum(p.numel() for p in net.controlnet.parameters())}
    record["build_seconds"] = round(time.perf_counter() - started, 2)
    train = profile.params.train_sdsr
    prompt_embeds = encode_prompts(bb.tokenizer, bb.text_encoder, [""], device=device)
    objective = TalaObjective(net, alphas_cumprod=bb.scheduler.alphas_cumprod, prompt_embeds=prompt_embeds,
                              gamma=train.gamma, tala=train.tala, prompt_dropout=train.prompt_dropout)
    record["train_sdsr_step"] = train_step(objective, profile, device, steps=args.steps, embed_dim=embed_dim)
    del objective
    record["inference"] = inference(bb, net, profile, device, repeats=args.repeats, full_steps=args.full_steps)
    record["total_seconds"] = round(time.perf_counter() - started, 1)
    text = json.dumps(record, indent=2, default=str)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return record


if __name__ == "__main__":
    main()
