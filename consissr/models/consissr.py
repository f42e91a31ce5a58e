"""The ConsisSR network (paper §3.2–3.3, Fig. 3/5): frozen SD UNet + ControlNet + hybrid prompt.

``ConsisSRNet`` = the backbone's frozen UNet with the self-attention additions
(``self_attention.py``) on every ``attn1``, a ControlNet (``ControlNetModel.from_unet``)
conditioned on the LQ input, and the Hybrid Prompt Adapter (``hpa.py``) on every ``attn2`` of
both. A fresh net predicts exactly what the plain UNet predicts, bit for bit in fp32. Only the
trained parts are saved (``save_pretrained``: ``controlnet/`` + adapters safetensors + config
json); the frozen UNet comes back from the backbone.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from consissr.errors import InputError
from consissr.io import atomic_dir, write_json
from consissr.models.hpa import (
    IMAGE_TOKEN_MODES,
    IMAGE_TOKENS_KWARG,
    ImageProjection,
    MLPImageProjection,
    check_clip_embedding_width,
    clip_embedding_tokens,
    install_hybrid_prompt_adapter,
    set_hpa_scale,
)
from consissr.models.self_attention import install_self_attention

if TYPE_CHECKING:
    from consissr.config import ModelParams

CONFIG_NAME = "consissr_config.json"
WEIGHTS_NAME = "consissr_adapters.safetensors"
CONTROLNET_SUBFOLDER = "controlnet"
FORMAT_VERSION = 1
TRAINING_KEY = "training"  # consissr_config.json: {"steps", "prior_pretrained", "backbone", "tala", "gamma"}



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

    ``"latent_authors"``: the LQ latent as ``"latent"``, through the authors' hint block (their
    ``input_hint_block``: eight 3×3 convs 4→16→16→32→32→96→96→256→C0, none strided): diffusers'
    (16, 32, 96, 256) embedding with its strides set to 1 (``unstride_conditioning_embedding``;
    ``ConsisSRNet`` applies it on every build, so a reload keeps it).
    """
    from diffusers import ControlNetModel

    if conditioning == "latent":
        channels, embedding = unet.config.in_channels, (unet.config.block_out_channels[0],)
    elif conditioning == "latent_authors":
        channels, embedding = unet.config.in_channels, (16, 32, 96, 256)
    elif conditioning == "pixel":
        stages = vae_scale_factor.bit_length()  # f = 2^(stages - 1)
        if vae_scale_factor != 2 ** (stages - 1) or stages > 4:
            raise ValueError(f"pixel ControlNet conditioning needs a VAE factor of 1, 2, 4 or 8, got {vae_scale_factor}")
        channels, embedding = 3, (16, 32, 96, 256)[:stages]
    else:
        raise ValueError(f"controlnet_conditioning must be 'latent', 'pixel' or 'latent_authors', got {conditioning!r}")
    controlnet = ControlNetModel.from_unet(
        unet, conditioning_channels=channels, conditioning_embedding_out_channels=embedding)
    if conditioning == "latent_authors":
        unstride_conditioning_embedding(controlnet)
    return controlnet


def unstride_conditioning_embedding(controlnet: nn.Module) -> None:
    """Every conv of the ControlNet's conditioning embedding at stride 1 (``"latent_authors"``)."""
    for conv in controlnet.controlnet_cond_embedding.blocks:
        conv.stride = (1, 1)


class ConsisSRNet(nn.Module):
    """Frozen SD UNet + ControlNet + hybrid prompt adapter + self-attention additions.

    Args:
        unet: the backbone's ``UNet2DConditionModel``. The net takes it over: processors and
            forward hooks are installed on it in place (no copy of the 866M weights).
        controlnet: a ``ControlNetModel`` for this UNet (``build_controlnet``); processors are
            installed on it too.
        image_embed_dim: D, the robust CLIP image embedding width (ViT-H-14: 1024; tiny: 64).
        num_image_tokens: N image tokens made from one embedding (``ip_adapter`` only).
        image_tokens: ``"clip_embedding"`` (the paper: the embedding is the one token, read by the
            frozen K/V; needs D == the UNet's cross-attention width, else ``ParamsError``),
            ``"ip_adapter"`` (``ImageProjection``: N learned tokens) or ``"authors_mlp"``
            (``MLPImageProjection``, the authors' released head).
        hpa_scale: run-time weight of the HPA image branch (also a property).
        pos_embed / pos_embed_grid / transposed_attention: the UNet self-attention additions
            (``self_attention.install_self_attention``).
        controlnet_self_attention: the same additions in the ControlNet too (the authors' code).
        controlnet_conditioning: recorded in the config ("latent", "pixel" or "latent_authors").
        transposed_attention_form: ``"restormer"`` or ``"authors"`` (``self_attention.py``).

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
        image_tokens: str = "clip_embedding",
        controlnet_self_attention: bool = False,
        transposed_attention_form: str = "restormer",
    ) -> None:
        super().__init__()
        if image_tokens not in IMAGE_TOKEN_MODES:
            raise ValueError(f"image_tokens must be one of {list(IMAGE_TOKEN_MODES)}, got {image_tokens!r}")
        self.config = dict(
            image_embed_dim=int(image_embed_dim), num_image_tokens=int(num_image_tokens),
            hpa_scale=float(hpa_scale), pos_embed=bool(pos_embed), pos_embed_grid=int(pos_embed_grid),
            transposed_attention=bool(transposed_attention), controlnet_conditioning=controlnet_conditioning,
            image_tokens=image_tokens, controlnet_self_attention=bool(controlnet_self_attention),
            transposed_attention_form=transposed_attention_form)
        if controlnet_conditioning == "latent_authors":
            unstride_conditioning_embedding(controlnet)
        self.unet = unet
        self.controlnet = controlnet
        # how the saved net was trained (``training_record``); saved under "training"
        self.training_info: dict[str, Any] = {}
        # 1. hybrid prompt: image tokens in the cross-attention width, adapters in both nets
        weight = unet.conv_in.weight
        self.image_proj: nn.Module | None = None  # clip_embedding: no new weight (§3.3)
        if image_tokens == "clip_embedding":
            check_clip_embedding_width(image_embed_dim, unet.config.cross_attention_dim)
        else:
            projection = ImageProjection if image_tokens == "ip_adapter" else MLPImageProjection
            self.image_proj = projection(
                image_embed_dim=image_embed_dim, cross_attention_dim=unet.config.cross_attention_dim,
                num_tokens=num_image_tokens).to(device=weight.device, dtype=weight.dtype)
        self.hpa_unet = install_hybrid_prompt_adapter(unet, scale=hpa_scale)
        self.hpa_controlnet = install_hybrid_prompt_adapter(controlnet, scale=hpa_scale)
        # 2. self-attention: positional embedding + transposed attention, in the UNet (Fig. 5) and
        #    optionally in the ControlNet (as the authors' code builds it)
        additions = dict(pos_embed=pos_embed, pos_embed_grid=pos_embed_grid, transposed_attention=transposed_attention,
                         transposed_form=transposed_attention_form)
        self.self_attention = install_self_attention(unet, **additions)
        self.self_attention_controlnet = (
            install_self_attention(controlnet, **additions) if controlnet_self_attention else nn.ModuleDict())

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
            controlnet_conditioning=params.controlnet_conditioning, image_tokens=params.image_tokens,
            controlnet_self_attention=params.controlnet_self_attention)

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
        """Robust CLIP embedding (B, D) → image tokens (B, N, C): (B, 1, D) for ``clip_embedding``."""
        if self.image_proj is None:
            return clip_embedding_tokens(image_embeds.to(self.unet.conv_in.weight.dtype))
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
        with atomic_dir(directory) as tmp:
            self.controlnet.save_pretrained(tmp / CONTROLNET_SUBFOLDER, safe_serialization=True)
            state = {k: v.detach().to("cpu").contiguous() for k, v in self.adapter_state_dict().items()}
            save_file(state, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
            config = dict(self.config, format_version=FORMAT_VERSION,
                          cross_attention_dim=self.unet.config.cross_attention_dim,
                          block_out_channels=list(self.unet.config.block_out_channels))
            if self.training_info:
                config[TRAINING_KEY] = self.training_info
            write_json(tmp / CONFIG_NAME, config, sort_keys=True)
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | Path, backbone: Any) -> ConsisSRNet:
        """Restore a saved net on ``backbone`` (a ``Backbone`` or its fresh UNet), exactly."""
        from diffusers import ControlNetModel
        from safetensors.torch import load_file

        directory = Path(directory)
        config = json.loads((directory / CONFIG_NAME).read_text())
        if config.pop("format_version") != FORMAT_VERSION:
            raise InputError(f"{directory}: unsupported format version")
        training_info = config.pop(TRAINING_KEY, {})
        config.setdefault("image_tokens", "ip_adapter")  # saved before the option existed
        config.setdefault("controlnet_self_attention", False)
        config.setdefault("transposed_attention_form", "restormer")
        unet = getattr(backbone, "unet", backbone)
        for key in ("cross_attention_dim", "block_out_channels"):
            saved, have = config.pop(key), unet.config[key]
            have = list(have) if isinstance(have, (list, tuple)) else have
            if saved != have:
                raise InputError(f"{directory}: saved for a UNet with {key}={saved}, got {have}")
        weight = unet.conv_in.weight
        controlnet = ControlNetModel.from_pretrained(directory / CONTROLNET_SUBFOLDER, torch_dtype=weight.dtype)
        if controlnet.device != weight.device:
            controlnet.to(weight.device)
        net = cls(unet, controlnet, **config)
        state = load_file(directory / WEIGHTS_NAME, device=str(weight.device))
        expected = set(net.adapter_state_dict())
        if set(state) != expected:
            missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
            raise InputError(f"{directory}: adapter weights do not match (missing {missing[:3]}, unexpected {unexpected[:3]})")
        net.load_state_dict(state, strict=False)
        net.training_info = training_info
        return net


def training_record(steps: int, *, pretrained: str, source: str, tala: bool, gamma: float) -> dict[str, Any]:
    """The ``"training"`` entry of ``consissr_config.json``: diffusion steps trained, whether the
    prior (the SD UNet) is pretrained — False for the embedded backbone, random by design — the
    backbone it was trained on, and the objective (TALA with its γ, or plain DDPM: Table 4's arms)."""
    from consissr.models.backbone import EMBEDDED

    return {"steps": int(steps), "prior_pretrained": pretrained != EMBEDDED, "backbone": str(source),
            "tala": bool(tala), "gamma": float(gamma)}


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

    * UNet: frozen; only the added positional tables and transposed attentions train (and the
      ControlNet's, with ``controlnet_self_attention``).
    * HPA: the zero-initialised image output layers (UNet and ControlNet) and, for ``ip_adapter``
      tokens, the image projection (``clip_embedding`` has none).
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
    hpa = [net.hpa_unet, net.hpa_controlnet, net.image_proj] if net.hpa_scale != 0 else []
    for module in (net.self_attention, *[m for m in hpa if m is not None]):
        module.requires_grad_(True)
    frozen = _controlnet_frozen_cross_attention(net.controlnet)
    for parameter in net.controlnet.parameters():
        parameter.requires_grad_(id(parameter) not in frozen)
    net.self_attention_controlnet.requires_grad_(True)
    return [p for p in net.parameters() if p.requires_grad]
