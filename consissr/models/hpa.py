"""Hybrid Prompt Adapter (paper §3.3, Fig. 3): text and robust-CLIP image prompts in one cross-attention.

    out = to_out(Attn(Q, K_txt, V_txt) + scale · W_img(Attn(Q, K_img, V_img)))

with the layer's own frozen ``to_q``/``to_k``/``to_v`` for both branches. ``W_img`` (per-head
``Linear``, zero-initialised, the authors' ``to_out_ip``) is the only new weight per layer.
Image tokens (``image_tokens``): ``clip_embedding``, the paper's — the robust CLIP embedding
itself as one token, read by the frozen ``to_k``/``to_v`` ("domain alignment in CLIP embeddings";
needs D = C: ViT-H-14 and SD 2.1 are both 1024) — or ``ip_adapter`` (Table 3's "+ IP-Adapter"):
``ImageProjection`` (IP-Adapter's ``Linear(D → N·C)`` + ``LayerNorm``), not zero-initialised, as
zeroing both would leave neither a gradient. Tokens travel as
``cross_attention_kwargs={"ip_hidden_states": tokens}``. The trainable adapters live in the
``ModuleDict`` that ``install_hybrid_prompt_adapter`` returns, so the UNet's and ControlNet's
own ``state_dict`` stay diffusers' format.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from consissr.errors import ParamsError
from consissr.models.attention_ops import merge_heads, prepare_mask_and_norm, project_out, split_heads

IMAGE_TOKENS_KWARG = "ip_hidden_states"
IMAGE_TOKEN_MODES = ("clip_embedding", "ip_adapter", "authors_mlp")
_PROCESSOR_SUFFIX = ".processor"


def check_clip_embedding_width(image_embed_dim: int, cross_attention_dim: int) -> None:
    """``clip_embedding`` tokens go straight into the frozen ``to_k``/``to_v``: the widths must agree."""
    if image_embed_dim != cross_attention_dim:
        raise ParamsError(
            f"model.image_tokens: clip_embedding feeds the robust CLIP image embedding (width {image_embed_dim}) "
            f"to the UNet's frozen cross-attention K/V projections (width {cross_attention_dim}); the widths "
            f"differ: use image_tokens: ip_adapter (a learned projection) or a CLIP whose embedding width is "
            f"{cross_attention_dim}")


def clip_embedding_tokens(image_embeds: torch.Tensor) -> torch.Tensor:
    """The paper's image prompt: the CLIP embedding (B, D) as one token (B, 1, D), no projection (§3.3)."""
    return image_embeds.unsqueeze(1)


def module_key(layer_name: str) -> str:
    """``down_blocks.0.attentions.0.transformer_blocks.0.attn2`` → a legal ``ModuleDict`` key."""
    return layer_name.replace(".", "-")


class ImageProjection(nn.Module):
    """Robust CLIP image embedding (B, D) → N image tokens (B, N, C) (IP-Adapter's ImageProjModel).

    Args:
        image_embed_dim: D, the CLIP embedding width (ViT-H-14: 1024; tiny: 64).
        cross_attention_dim: C, the width the frozen ``to_k``/``to_v`` read (SD 2.1: 1024).
        num_tokens: N.
    """

    def __init__(self, *, image_embed_dim: int, cross_attention_dim: int, num_tokens: int = 4) -> None:
        super().__init__()
        self.num_tokens = num_tokens
        self.cross_attention_dim = cross_attention_dim
        self.proj = nn.Linear(image_embed_dim, num_tokens * cross_attention_dim)
        self.norm = nn.LayerNorm(cross_attention_dim)

    def forward(self, image_embeds: torch.Tensor) -> torch.Tensor:
        tokens = self.proj(image_embeds).reshape(-1, self.num_tokens, self.cross_attention_dim)
        return self.norm(tokens)


class MLPImageProjection(nn.Module):
    """The image-token head of the authors' released code (their ``ft_layers_4``), ``authors_mlp``.

    LayerNorm(D) → Linear(D → N·C) → GELU → (N, C) → Linear(C → C) → GELU → zero-initialised
    Linear(C → C). ``consissr convert-checkpoint`` maps their weights here.
    """

    def __init__(self, *, image_embed_dim: int, cross_attention_dim: int, num_tokens: int = 1) -> None:
        super().__init__()
        self.num_tokens = num_tokens
        self.cross_attention_dim = cross_attention_dim
        self.norm = nn.LayerNorm(image_embed_dim)
        self.proj = nn.Linear(image_embed_dim, num_tokens * cross_attention_dim)
        self.hidden = nn.Linear(cross_attention_dim, cross_attention_dim)
        self.out = nn.Linear(cross_attention_dim, cross_attention_dim)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, image_embeds: torch.Tensor) -> torch.Tensor:
        tokens = F.gelu(self.proj(self.norm(image_embeds))).reshape(-1, self.num_tokens, self.cross_attention_dim)
        return self.out(F.gelu(self.hidden(tokens)))


class HybridPromptAdapter(nn.Module):
    """The trainable part of one hybrid cross-attention: the zero-initialised image output layer."""

    def __init__(self, head_dim: int) -> None:
        super().__init__()
        self.to_out_image = nn.Linear(head_dim, head_dim)
        nn.init.zeros_(self.to_out_image.weight)
        nn.init.zeros_(self.to_out_image.bias)

    def forward(self, image_heads: torch.Tensor) -> torch.Tensor:
        return self.to_out_image(image_heads)


class HybridPromptAttnProcessor:
    """Decoupled text + image cross-attention through the layer's own frozen projections.

    Args:
        adapter: this layer's ``HybridPromptAdapter`` (its ``to_out_image`` weight).
        scale: run-time weight of the image branch (``set_hpa_scale`` changes it in place).
    """

    def __init__(self, adapter: HybridPromptAdapter, scale: float = 1.0) -> None:
        self.adapter = adapter
        self.scale = float(scale)

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        ip_hidden_states: torch.Tensor | None = None,
    ) -> torch.Tensor:
        # 1. pre-process, exactly as diffusers' AttnProcessor2_0
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        key_length = (hidden_states if encoder_hidden_states is None else encoder_hidden_states).shape[1]
        hidden_states, attention_mask = prepare_mask_and_norm(attn, hidden_states, attention_mask, key_length)

        # 2. text branch: the layer's own attention
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        query = split_heads(attn, query, attn.norm_q)
        key = split_heads(attn, attn.to_k(encoder_hidden_states), attn.norm_k)
        value = split_heads(attn, attn.to_v(encoder_hidden_states))
        hidden_states = merge_heads(F.scaled_dot_product_attention(
            query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False), query.dtype)

        # 3. image branch: same query, the same frozen to_k/to_v, zero-initialised output layer
        if ip_hidden_states is not None and self.scale != 0.0:
            image_tokens = ip_hidden_states
            if attn.norm_cross:
                image_tokens = attn.norm_encoder_hidden_states(image_tokens)
            image_key = split_heads(attn, attn.to_k(image_tokens), attn.norm_k)
            image_value = split_heads(attn, attn.to_v(image_tokens))
            image = F.scaled_dot_product_attention(query, image_key, image_value, dropout_p=0.0, is_causal=False)
            image = merge_heads(self.adapter(image.to(query.dtype)), query.dtype)  # per head, then merged
            hidden_states = hidden_states + self.scale * image

        # 4. the layer's original output projection
        if input_ndim == 4:  # (to_out first, then back to the image layout, as diffusers)
            hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
            if attn.residual_connection:
                hidden_states = hidden_states + residual
            return hidden_states / attn.rescale_output_factor
        return project_out(attn, hidden_states, residual)


def cross_attention_layers(model: nn.Module) -> list[str]:
    """Names of every cross-attention layer (``...transformer_blocks.K.attn2``) of a UNet/ControlNet."""
    return [name[: -len(_PROCESSOR_SUFFIX)] for name in model.attn_processors
            if name.endswith("attn2" + _PROCESSOR_SUFFIX)]


def install_hybrid_prompt_adapter(
    model: nn.Module,
    *,
    scale: float = 1.0,
    adapters: nn.ModuleDict | None = None,
) -> nn.ModuleDict:
    """Put a ``HybridPromptAttnProcessor`` on every ``attn2`` of ``model`` (UNet or ControlNet).

    Other layers keep the processors they have. Returns the per-layer adapters keyed by
    ``module_key(layer name)``; pass ``adapters`` to reuse existing ones (e.g. when loading).
    """
    processors = dict(model.attn_processors)
    if any(isinstance(p, HybridPromptAttnProcessor) for p in processors.values()):
        raise ValueError(f"{type(model).__name__} already has hybrid prompt adapters installed")
    names = cross_attention_layers(model)
    if adapters is None:
        adapters = nn.ModuleDict()
        for name in names:
            attn = model.get_submodule(name)
            weight = attn.to_q.weight  # build where the layer lives (the meta device too)
            adapter = HybridPromptAdapter(attn.inner_dim // attn.heads)
            adapters[module_key(name)] = adapter.to(device=weight.device, dtype=weight.dtype)
    if set(adapters) != {module_key(name) for name in names}:
        raise ValueError(f"the adapters given do not match the cross-attention layers of {type(model).__name__}")
    for name in names:
        processors[name + _PROCESSOR_SUFFIX] = HybridPromptAttnProcessor(adapters[module_key(name)], scale)
    model.set_attn_processor(processors)
    return adapters


def set_hpa_scale(model: nn.Module, scale: float) -> None:
    """Set the image-branch weight of every hybrid cross-attention of ``model`` at run time."""
    for processor in model.attn_processors.values():
        if isinstance(processor, HybridPromptAttnProcessor):
            processor.scale = float(scale)
