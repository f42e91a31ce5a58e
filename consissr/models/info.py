"""``consissr model-info``: total and trainable parameter counts per part, tiny and paper profiles.

The paper profile is built on the meta device (no memory, no download) from SD 2.1-base's UNet
config and the ViT-H-14 CLIP tower; the tiny one from the saved embedded backbone.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
from pathlib import Path
from typing import Any

from consissr.config import ModelParams, Params
from consissr.models.backbone import SD21_BASE_CONFIG_DIR
from consissr.models.consissr import ConsisSRNet, apply_trainable_policy, read_training_record
from consissr.models.self_attention import SelfAttentionAddition

# SD 2.1-base's UNet config (packaged with backbone.py's SD21_BASE_CONFIG_DIR) so the paper profile
# builds offline; diffusers' names ("attention_head_dim" there is really the number of heads per
# level: 320/5 = 640/10 = 1280/20 = 64 channels a head)
SD21_BASE_UNET_CONFIG: dict[str, Any] = json.loads((SD21_BASE_CONFIG_DIR / "unet" / "config.json").read_text())
SD21_BASE_UNET_PARAMETERS = 865_910_724  # what that config builds (the released weights' count)
PAPER_POS_EMBED_GRID = 64  # 512² training crops, paper §4.1
PAPER_CLIP = "ViT-H-14"  # robust CLIP tower, paper §4.1 (image embedding width 1024)
PAPER_CLIP_EMBED_DIM = 1024
TINY_CLIP = "consissr-tiny-vit"
TINY_CLIP_EMBED_DIM = 64


def _count(params) -> dict[str, int]:
    params = list(params)
    return {"total": sum(p.numel() for p in params), "trainable": sum(p.numel() for p in params if p.requires_grad)}


def count_parameters(net: ConsisSRNet) -> dict[str, dict[str, int]]:
    """Total / trainable parameters per part (after ``apply_trainable_policy``)."""
    pos, transposed = [], []
    for addition in net.self_attention.values():
        assert isinstance(addition, SelfAttentionAddition)
        if addition.pos_embed is not None:
            pos.append(addition.pos_embed)
        if addition.transposed is not None:
            transposed += list(addition.transposed.parameters())
    image_proj = net.image_proj.parameters() if net.image_proj is not None else ()
    return {
        "unet": _count(net.unet.parameters()),
        "pos_embed": _count(pos),
        "transposed_attention": _count(transposed),
        "controlnet": _count(net.controlnet.parameters()),
        "controlnet_self_attention": _count(net.self_attention_controlnet.parameters()),
        "hpa_unet": _count(net.hpa_unet.parameters()),
        "hpa_controlnet": _count(net.hpa_controlnet.parameters()),
        "image_projection": _count(image_proj),
    }


def build_paper_net_on_meta(params: ModelParams) -> ConsisSRNet:
    """The paper-scale net (SD 2.1-base UNet config, ViT-H-14 embedding) with no memory: meta device."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    config = {k: v for k, v in SD21_BASE_UNET_CONFIG.items() if not k.startswith("_")}
    with init_empty_weights():
        unet = UNet2DConditionModel(**config)
        return ConsisSRNet.from_backbone(
            unet, dataclasses.replace(params, pos_embed_grid=PAPER_POS_EMBED_GRID),
            image_embed_dim=PAPER_CLIP_EMBED_DIM)


def robust_clip_parameters(model_name: str) -> tuple[int, int] | None:
    """(parameters, embed_dim) of the robust CLIP student tower, built on the meta device.

    ``None`` when ``consissr.models.robust_clip`` is not available.
    """
    try:
        from consissr.models.robust_clip import RobustCLIP
    except ImportError:
        return None
    from accelerate import init_empty_weights

    with init_empty_weights():
        clip = RobustCLIP(model_name=model_name, pretrained=None, with_teacher=False, device="meta")
    return sum(p.numel() for p in clip.student.parameters()), clip.embed_dim


def model_info(params: Params, profile: str, backbone_dir: str | Path) -> dict[str, Any]:
    """Parameter counts for one profile: ``tiny`` (the saved embedded backbone) or ``paper`` (meta)."""
    from consissr.models.backbone import build_tiny_backbone, load_backbone

    clip_name = TINY_CLIP if profile == "tiny" else PAPER_CLIP
    clip = robust_clip_parameters(clip_name)
    embed_dim = clip[1] if clip else (TINY_CLIP_EMBED_DIM if profile == "tiny" else PAPER_CLIP_EMBED_DIM)
    if profile == "tiny":
        backbone_dir = Path(backbone_dir)
        with tempfile.TemporaryDirectory() as tmp:
            if not (backbone_dir / "model_index.json").is_file():
                backbone_dir = build_tiny_backbone(Path(tmp) / "backbone", seed=params.base.seed)
            unet = load_backbone("embedded", embedded_dir=backbone_dir).unet
        net = ConsisSRNet.from_backbone(unet, params.model, image_embed_dim=embed_dim)
        source = str(backbone_dir)
    elif profile == "paper":
        net = build_paper_net_on_meta(params.model)
        source = "SD 2.1-base UNet config (meta device)"
    else:
        raise ValueError(f"profile must be 'tiny' or 'paper', got {profile!r}")
    apply_trainable_policy(net)
    counts = count_parameters(net)
    counts["robust_clip"] = {"total": clip[0] if clip else 0, "trainable": 0}
    return {"profile": profile, "source": source, "clip": clip_name, "image_embed_dim": embed_dim,
            "pos_embed_grid": net.config["pos_embed_grid"], "counts": counts}


_ROWS = [
    ("unet", "UNet (frozen SD)"),
    ("pos_embed", "  + positional embeddings"),
    ("transposed_attention", "  + transposed attention"),
    ("controlnet", "ControlNet"),
    ("controlnet_self_attention", "  + pos. emb. / transposed attn."),
    ("hpa_unet", "HPA output layers, UNet"),
    ("hpa_controlnet", "HPA output layers, ControlNet"),
    ("image_projection", "HPA image projection (ip_adapter)"),
    ("robust_clip", "Robust CLIP student (own stage)"),
]


def describe_training(record: dict[str, Any]) -> str:
    """One line on how the saved diffusion model was trained (``consissr.training_record``)."""
    if not record:
        return "no trained ConsisSR model saved yet (run `dvc repro train_sdsr`)"
    prior = ("pretrained prior" if record["prior_pretrained"]
             else "untrained prior (the embedded backbone's UNet is random)")
    objective = {True: f"TALA, γ={record.get('gamma'):g}", False: "DDPM (TALA off)"}.get(record.get("tala"))
    objective = f" ({objective})" if objective else ""  # older saves do not record it
    return f"trained {record['steps']:,d} diffusion steps{objective} on {record['backbone']}; {prior}"


def describe_gan(gan_dir: str | Path) -> tuple[str, dict[str, Any]]:
    """One line on the GAN of GAN-Embedding (``gan_config.json``): its source and hashes, or how it was trained."""
    from consissr.models.gan import GanWeightsError, describe_source, read_gan_config

    try:
        config = read_gan_config(gan_dir)
    except GanWeightsError:
        return "no GAN saved yet (run `dvc repro train_gan`)", {}
    arch = f"RRDBNet {config['num_block']} blocks, {config['num_feat']} features, x{config['scale']}"
    source = describe_source(config)
    what = f"{source['source']} (sha256 {source['sha256']})" if config.get("pretrained") else source["source"]
    return f"{arch}; {what}; weights {config['weights']} (sha256 {config.get('sha256', 'not recorded')})", config


def describe_robust_clip(robust_clip_dir: str | Path) -> tuple[str, dict[str, Any]]:
    """One line on the saved robust CLIP student (``config.json``): the open_clip model and the
    weights its towers started from — a tag, or a weights file by path with its sha256."""
    config_path = Path(robust_clip_dir) / "config.json"
    if not config_path.is_file():
        return "no robust CLIP saved yet (run `dvc repro train_clip`)", {}
    config = json.loads(config_path.read_text())
    pretrained = config.get("pretrained")
    if pretrained is None:
        source = "randomly initialised towers"
    elif config.get("pretrained_sha256"):
        source = f"weights file {pretrained} (sha256 {config['pretrained_sha256']})"
    else:
        source = f"open_clip weights {pretrained!r}"
    return f"{config.get('model_name')}, started from {source}", config


def print_model_info(params: Params, profile: str = "both", backbone_dir: str | Path = "data/models/backbone",
                     model_dir: str | Path = "data/models/consissr", gan_dir: str | Path = "data/models/gan",
                     robust_clip_dir: str | Path = "data/models/robust_clip") -> dict:
    """Print total and trainable parameter counts per part for the tiny and/or paper profile,
    how the saved model in ``model_dir`` was trained, and what the robust CLIP in
    ``robust_clip_dir`` and the GAN in ``gan_dir`` started from."""
    profiles = ["tiny", "paper"] if profile == "both" else [profile]
    record = read_training_record(model_dir)
    clip_line, clip_config = describe_robust_clip(robust_clip_dir)
    gan_line, gan_config = describe_gan(gan_dir)
    print(f"Saved model {model_dir}: {describe_training(record)}")
    print(f"Robust CLIP {robust_clip_dir}: {clip_line}")
    print(f"GAN {gan_dir}: {gan_line}")
    print()
    results: dict[str, Any] = {"training": record, "robust_clip": clip_config, "gan": gan_config}
    for name in profiles:
        info = model_info(params, name, backbone_dir)
        results[name] = info
        counts = info["counts"]
        print(f"ConsisSR {name} profile — {info['source']}; CLIP {info['clip']} (D={info['image_embed_dim']}), "
              f"pos-embedding grid {info['pos_embed_grid']}")
        print(f"  {'part':34s} {'total':>14s} {'trainable':>14s}")
        for key, label in _ROWS:
            c = counts[key]
            print(f"  {label:34s} {c['total']:>14,d} {c['trainable']:>14,d}")
        net_total = sum(c["total"] for k, c in counts.items() if k != "robust_clip")
        net_trainable = sum(c["trainable"] for c in counts.values())
        print(f"  {'SD-SR net total':34s} {net_total:>14,d} {net_trainable:>14,d}")
        print()
    return results
