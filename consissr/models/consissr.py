"""The ConsisSR network (paper §3.2–3.3, Fig. 3/5): frozen SD UNet + ControlNet + hybrid prompt.

``ConsisSRNet`` assembles

* the backbone's **UNet**, frozen, with the self-attention additions of ``self_attention.py``
  (positional embedding + transposed attention, zero-initialised) on every ``attn1``;
* a **ControlNet** made by ``ControlNetModel.from_unet`` and conditioned on the LQ input;
* the **Hybrid Prompt Adapter** of ``hpa.py`` on every ``attn2`` of both, fed by an
  ``ImageProjection`` of the robust CLIP image embedding.

A fresh net predicts exactly what the plain UNet predicts (every addition starts at zero and
the ControlNet's zero convolutions add zero residuals), bit for bit in fp32.

Only what is trained is saved (``save_pretrained``): the ControlNet through its own
``save_pretrained`` and the added parameters in one safetensors file with a config json.
The frozen UNet comes back from the backbone (``from_pretrained(directory, backbone)``).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from consissr.models.hpa import (
    IMAGE_TOKENS_KWARG,
    ImageProjection,
    install_hybrid_prompt_adapter,
    set_hpa_scale,
)
from consissr.models.self_attention import SelfAttentionAddition, install_self_attention

if TYPE_CHECKING:
    from consissr.config import ModelParams, Params

CONFIG_NAME = "consissr_config.json"
WEIGHTS_NAME = "consissr_adapters.safetensors"
CONTROLNET_SUBFOLDER = "controlnet"
FORMAT_VERSION = 1
TRAINING_KEY = "training"  # consissr_config.json: {"steps", "prior_pretrained", "backbone"} (training_record)

# stabilityai/stable-diffusion-2-1-base, unet/config.json (diffusers' names; "attention_head_dim"
# there is really the number of heads per level: 320/5 = 640/10 = 1280/20 = 64 channels a head)
SD21_BASE_UNET_CONFIG: dict[str, Any] = {
    "_class_name": "UNet2DConditionModel",
    "act_fn": "silu",
    "attention_head_dim": [5, 10, 20, 20],
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 1024,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1,
    "dual_cross_attention": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "num_class_embeds": None,
    "only_cross_attention": False,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "use_linear_projection": True,
}
SD21_BASE_UNET_PARAMETERS = 865_910_724  # what that config builds (the released weights' count)
PAPER_POS_EMBED_GRID = 64  # 512² training crops, paper §4.1
PAPER_CLIP = "ViT-H-14"  # robust CLIP tower, paper §4.1 (image embedding width 1024)
PAPER_CLIP_EMBED_DIM = 1024
TINY_CLIP = "consissr-tiny-vit"
TINY_CLIP_EMBED_DIM = 64


def build_controlnet(unet: nn.Module, conditioning: str = "latent", *, vae_scale_factor: int = 8):
    """``ControlNetModel.from_unet`` (encoder weights copied from the UNet) for the LQ condition.

    ``"latent"`` (default): the condition is the VAE latent of the LQ image, bicubically
    upsampled to the output size and scaled like the noisy latents — (B, C, h, w), the same
    size as ``noisy_latents``. The conditioning embedding has a single stage
    (``conditioning_embedding_out_channels=(C0,)``: 3×3 conv 4→C0, SiLU, zero 3×3 conv), so it
    does not downsample. Why latent: the encode stage already caches LQ latents, so training
    needs no pixels and no downsampling pyramid; it is what the authors' code feeds its
    ControlNet (a VAE-encoder latent, DiffBIR-style); and it fits any latent size by
    construction, which the non-square / non-512 inference relies on.

    ``"pixel"``: the LQ image itself, (B, 3, f·h, f·w) in [0, 1], through diffusers' default
    embedding (16, 32, 96, 256), cut to the stages that downsample by the VAE's factor f (SD: 8).
    """
    from diffusers import ControlNetModel

    if conditioning == "latent":
        channels, embedding = unet.config.in_channels, (unet.config.block_out_channels[0],)
    elif conditioning == "pixel":
        stages = vae_scale_factor.bit_length()  # f = 2^(stages - 1)
        if vae_scale_factor != 2 ** (stages - 1) or stages > 4:
            raise ValueError(f"pixel ControlNet conditioning needs a VAE factor of 1, 2, 4 or 8, got {vae_scale_factor}")
        channels, embedding = 3, (16, 32, 96, 256)[:stages]
    else:
        raise ValueError(f"controlnet_conditioning must be 'latent' or 'pixel', got {conditioning!r}")
    return ControlNetModel.from_unet(
        unet, conditioning_channels=channels, conditioning_embedding_out_channels=embedding)


class ConsisSRNet(nn.Module):
    """Frozen SD UNet + ControlNet + hybrid prompt adapter + self-attention additions.

    Args:
        unet: the backbone's ``UNet2DConditionModel``. The net takes it over: processors and
            forward hooks are installed on it in place (no copy of the 866M weights).
        controlnet: a ``ControlNetModel`` for this UNet (``build_controlnet``); processors are
            installed on it too.
        image_embed_dim: D, the robust CLIP image embedding width (ViT-H-14: 1024; tiny: 64).
        num_image_tokens: N image tokens made from one embedding.
        hpa_scale: run-time weight of the HPA image branch (also a property).
        pos_embed / pos_embed_grid / transposed_attention: the UNet self-attention additions
            (``self_attention.install_self_attention``).
        controlnet_conditioning: recorded in the config ("latent" or "pixel").

    Image tokens reach every HPA processor through the UNet's and ControlNet's normal forward as
    ``cross_attention_kwargs={"ip_hidden_states": tokens}`` (see ``hpa.py``).
    """

    def __init__(
        self,
        unet: nn.Module,
        controlnet: nn.Module,
        *,
        image_embed_dim: int,
        num_image_tokens: int = 4,
        hpa_scale: float = 1.0,
        pos_embed: bool = True,
        pos_embed_grid: int = 64,
        transposed_attention: bool = True,
        controlnet_conditioning: str = "latent",
    ) -> None:
        super().__init__()
        self.config = dict(
            image_embed_dim=int(image_embed_dim), num_image_tokens=int(num_image_tokens),
            hpa_scale=float(hpa_scale), pos_embed=bool(pos_embed), pos_embed_grid=int(pos_embed_grid),
            transposed_attention=bool(transposed_attention), controlnet_conditioning=controlnet_conditioning)
        self.unet = unet
        self.controlnet = controlnet
        # how the saved net was trained (``training_record``); saved under "training"
        self.training_info: dict[str, Any] = {}
        # 1. hybrid prompt: image tokens in the cross-attention width, adapters in both nets
        weight = unet.conv_in.weight
        self.image_proj = ImageProjection(
            image_embed_dim=image_embed_dim, cross_attention_dim=unet.config.cross_attention_dim,
            num_tokens=num_image_tokens).to(device=weight.device, dtype=weight.dtype)
        self.hpa_unet = install_hybrid_prompt_adapter(unet, scale=hpa_scale)
        self.hpa_controlnet = install_hybrid_prompt_adapter(controlnet, scale=hpa_scale)
        # 2. UNet self-attention: positional embedding + transposed attention
        self.self_attention = install_self_attention(
            unet, pos_embed=pos_embed, pos_embed_grid=pos_embed_grid,
            transposed_attention=transposed_attention)

    # ----------------------------------------------------------------------------------------
    # construction
    # ----------------------------------------------------------------------------------------
    @classmethod
    def from_backbone(cls, backbone: Any, params: ModelParams, *, image_embed_dim: int) -> ConsisSRNet:
        """A fresh net on ``backbone`` (a ``Backbone`` or its UNet) from the ``model:`` params."""
        unet = getattr(backbone, "unet", backbone)
        vae = getattr(backbone, "vae", None)
        factor = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 8
        controlnet = build_controlnet(unet, params.controlnet_conditioning, vae_scale_factor=factor)
        weight, control_weight = unet.conv_in.weight, controlnet.conv_in.weight
        if (control_weight.device, control_weight.dtype) != (weight.device, weight.dtype):
            controlnet.to(device=weight.device, dtype=weight.dtype)
        return cls(
            unet, controlnet, image_embed_dim=image_embed_dim, num_image_tokens=params.num_image_tokens,
            hpa_scale=params.hpa_scale, pos_embed=params.pos_embed, pos_embed_grid=params.pos_embed_grid,
            transposed_attention=params.transposed_attention,
            controlnet_conditioning=params.controlnet_conditioning)

    @property
    def hpa_scale(self) -> float:
        return self.config["hpa_scale"]

    @hpa_scale.setter
    def hpa_scale(self, scale: float) -> None:
        """Weight of the image branch in every hybrid cross-attention (UNet and ControlNet)."""
        self.config["hpa_scale"] = float(scale)
        set_hpa_scale(self.unet, scale)
        set_hpa_scale(self.controlnet, scale)

    # ----------------------------------------------------------------------------------------
    # forward
    # ----------------------------------------------------------------------------------------
    def image_tokens(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """Robust CLIP embedding (B, D) → image tokens (B, N, C)."""
        return self.image_proj(image_embeds.to(self.image_proj.proj.weight.dtype))

    def forward(
        self,
        noisy_latents: torch.Tensor,
        t: torch.Tensor | int,
        encoder_hidden_states: torch.Tensor,
        lq_cond: torch.Tensor,
        image_embeds: torch.Tensor | None = None,
        *,
        conditioning_scale: float = 1.0,
    ) -> torch.Tensor:
        """Noise prediction ε(z_t, t, c_txt, c_img, LQ).

        Args:
            noisy_latents: z_t, (B, C, h, w) (C: the VAE's latent channels); any h, w the UNet accepts.
            t: timesteps, (B,) or a scalar.
            encoder_hidden_states: text prompt embedding (B, 77, C).
            lq_cond: the ControlNet condition (``build_controlnet``: LQ latent (B, C, h, w) or
                LQ pixels (B, 3, f·h, f·w), f the VAE factor).
            image_embeds: robust CLIP image embedding (B, D); ``None`` = text prompt only.
            conditioning_scale: weight of the ControlNet residuals.
        """
        # 1. hybrid prompt: image tokens for every cross-attention of both nets
        attention_kwargs = None
        if image_embeds is not None:
            attention_kwargs = {IMAGE_TOKENS_KWARG: self.image_tokens(image_embeds)}
        # 2. ControlNet on the LQ condition
        down_residuals, mid_residual = self.controlnet(
            noisy_latents, t, encoder_hidden_states=encoder_hidden_states, controlnet_cond=lq_cond,
            conditioning_scale=conditioning_scale, cross_attention_kwargs=attention_kwargs,
            return_dict=False)
        # 3. the UNet with the control residuals
        return self.unet(
            noisy_latents, t, encoder_hidden_states=encoder_hidden_states,
            cross_attention_kwargs=attention_kwargs, down_block_additional_residuals=down_residuals,
            mid_block_additional_residual=mid_residual, return_dict=False)[0]

    # ----------------------------------------------------------------------------------------
    # save / load: only the trained parts
    # ----------------------------------------------------------------------------------------
    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """Everything this net adds to the backbone except the ControlNet."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith(("unet.", "controlnet."))}

    def save_pretrained(self, directory: str | Path) -> Path:
        """``controlnet/`` (diffusers' own format) + ``consissr_adapters.safetensors`` + config json.

        Written next to ``directory`` and swapped in, so an interrupted save leaves no half folder.
        """
        from safetensors.torch import save_file

        directory = Path(directory)
        tmp = directory.with_name(directory.name + ".tmp")
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        self.controlnet.save_pretrained(tmp / CONTROLNET_SUBFOLDER, safe_serialization=True)
        state = {k: v.detach().to("cpu").contiguous() for k, v in self.adapter_state_dict().items()}
        save_file(state, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        config = dict(self.config, format_version=FORMAT_VERSION,
                      cross_attention_dim=self.unet.config.cross_attention_dim,
                      block_out_channels=list(self.unet.config.block_out_channels))
        if self.training_info:
            config[TRAINING_KEY] = self.training_info
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        if directory.exists():
            shutil.rmtree(directory)
        tmp.rename(directory)
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | Path, backbone: Any) -> ConsisSRNet:
        """Restore a saved net on ``backbone`` (a ``Backbone`` or its fresh UNet), exactly."""
        from diffusers import ControlNetModel
        from safetensors.torch import load_file

        directory = Path(directory)
        config = json.loads((directory / CONFIG_NAME).read_text())
        if config.pop("format_version") != FORMAT_VERSION:
            raise ValueError(f"{directory}: unsupported format version")
        training_info = config.pop(TRAINING_KEY, {})
        unet = getattr(backbone, "unet", backbone)
        for key in ("cross_attention_dim", "block_out_channels"):
            saved, have = config.pop(key), unet.config[key]
            have = list(have) if isinstance(have, (list, tuple)) else have
            if saved != have:
                raise ValueError(f"{directory}: saved for a UNet with {key}={saved}, got {have}")
        weight = unet.conv_in.weight
        controlnet = ControlNetModel.from_pretrained(directory / CONTROLNET_SUBFOLDER, torch_dtype=weight.dtype)
        if controlnet.device != weight.device:
            controlnet.to(weight.device)
        net = cls(unet, controlnet, **config)
        state = load_file(directory / WEIGHTS_NAME, device=str(weight.device))
        expected = set(net.adapter_state_dict())
        if set(state) != expected:
            missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
            raise ValueError(f"{directory}: adapter weights do not match (missing {missing[:3]}, unexpected {unexpected[:3]})")
        net.load_state_dict(state, strict=False)
        net.training_info = training_info
        return net


def training_record(steps: int, *, pretrained: str, source: str) -> dict[str, Any]:
    """The ``"training"`` entry of ``consissr_config.json``: diffusion steps trained, whether the
    prior (the SD UNet) is pretrained — False for the embedded backbone, random by design — and
    the backbone it was trained on."""
    from consissr.models.backbone import EMBEDDED

    return {"steps": int(steps), "prior_pretrained": pretrained != EMBEDDED, "backbone": str(source)}


def read_training_record(model_dir: str | Path) -> dict[str, Any]:
    """The ``"training"`` entry of a saved net's config; {} when absent (no net, or an older save)."""
    path = Path(model_dir) / CONFIG_NAME
    if not path.is_file():
        return {}
    return json.loads(path.read_text()).get(TRAINING_KEY, {})


# --------------------------------------------------------------------------------------------
# what trains
# --------------------------------------------------------------------------------------------
def _controlnet_frozen_cross_attention(controlnet: nn.Module) -> set[int]:
    from diffusers.models.attention import BasicTransformerBlock

    frozen: set[int] = set()
    for module in controlnet.modules():
        if isinstance(module, BasicTransformerBlock) and module.attn2 is not None:
            for part in (module.norm2, module.attn2):
                frozen.update(id(p) for p in part.parameters())
    return frozen


def apply_trainable_policy(net: ConsisSRNet) -> list[nn.Parameter]:
    """Set ``requires_grad`` for SD-SR training (paper §3.3) and return the trainable parameters.

    * UNet: frozen; only the added positional tables and transposed attentions train.
    * HPA: the zero-initialised image output layers (UNet and ControlNet) and the image projection.
    * ControlNet: everything except its cross-attention sub-layers: every transformer block's
      ``norm2`` and ``attn2`` (``to_q``, ``to_k``, ``to_v``, ``to_out``) keep the SD weights, so
      the ControlNet reads the text and image prompt with the same frozen projections as the
      UNet. This is the authors' optimiser (``configure_optimizers`` skips ``attn2``/``norm2``
      names of the control model except ``to_out_ip``).
    * The robust CLIP tower is not part of this net (trained in its own stage, Eq. 3).
    * With ``hpa_scale == 0`` (the no-image-prompt ablation) the HPA layers never take part in the
      forward, so they stay frozen: a trainable parameter without gradient breaks DDP.
    """
    net.requires_grad_(False)
    hpa = (net.hpa_unet, net.hpa_controlnet, net.image_proj) if net.hpa_scale != 0 else ()
    for module in (net.self_attention, *hpa):
        module.requires_grad_(True)
    frozen = _controlnet_frozen_cross_attention(net.controlnet)
    for parameter in net.controlnet.parameters():
        parameter.requires_grad_(id(parameter) not in frozen)
    return [p for p in net.parameters() if p.requires_grad]


# --------------------------------------------------------------------------------------------
# parameter counts (`consissr model-info`)
# --------------------------------------------------------------------------------------------
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
    return {
        "unet": _count(net.unet.parameters()),
        "pos_embed": _count(pos),
        "transposed_attention": _count(transposed),
        "controlnet": _count(net.controlnet.parameters()),
        "hpa_unet": _count(net.hpa_unet.parameters()),
        "hpa_controlnet": _count(net.hpa_controlnet.parameters()),
        "image_projection": _count(net.image_proj.parameters()),
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
    ("hpa_unet", "HPA output layers, UNet"),
    ("hpa_controlnet", "HPA output layers, ControlNet"),
    ("image_projection", "HPA image projection"),
    ("robust_clip", "Robust CLIP student (own stage)"),
]


def describe_training(record: dict[str, Any]) -> str:
    """One line on how the saved diffusion model was trained (``training_record``)."""
    if not record:
        return "no trained ConsisSR model saved yet (run `dvc repro train_sdsr`)"
    prior = ("pretrained prior" if record["prior_pretrained"]
             else "untrained prior (the embedded backbone's UNet is random)")
    return f"trained {record['steps']:,d} diffusion steps on {record['backbone']}; {prior}"


def print_model_info(params: Params, profile: str = "both", backbone_dir: str | Path = "data/models/backbone",
                     model_dir: str | Path = "data/models/consissr") -> dict:
    """Print total and trainable parameter counts per part for the tiny and/or paper profile,
    and how the saved model in ``model_dir`` was trained."""
    profiles = ["tiny", "paper"] if profile == "both" else [profile]
    record = read_training_record(model_dir)
    print(f"Saved model {model_dir}: {describe_training(record)}")
    print()
    results: dict[str, Any] = {"training": record}
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
