"""Self-attention additions to the frozen UNet (paper Fig. 5): positional embedding + transposed attention.

    attn1(x) = SA(n1(x); Q + P, K + P) + TA(n1(x))      P: learned positional table, TA: Restormer's MDTA

Both are zero-initialised, one ``ConsisSelfAttnProcessor`` per ``attn1``. The positional table
is stored on the training grid (``pos_embed_grid``) and resized bilinearly to any other latent
size (the authors' code accepts 512² only); MDTA (Zamir et al. 2022) runs in parallel with the
self-attention on the block's own ``norm1`` output. A forward pre-hook on each
``Transformer2DModel`` records the layer's (h, w), which the token sequence does not carry. The
trainable modules live in the ``ModuleDict`` that ``install_self_attention`` returns.
"""

from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F
from torch import nn

from consissr.models.attention_ops import merge_heads, prepare_mask_and_norm, project_out, split_heads
from consissr.models.hpa import module_key

_PROCESSOR_SUFFIX = ".processor"
_LEVEL = re.compile(r"^(down_blocks|up_blocks)\.(\d+)\.|^(mid_block)\.")


class TransposedSelfAttention(nn.Module):
    """Restormer's multi-Dconv head transposed attention (MDTA) with a zero-initialised output.

    Args:
        dim: channels C of the tokens.
        heads: number of heads the channels are split into (the layer's own head count).
    """

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        self.heads = heads
        self.temperature = nn.Parameter(torch.ones(heads, 1, 1))
        self.qkv = nn.Conv2d(dim, dim * 3, kernel_size=1, bias=False)
        self.qkv_dwconv = nn.Conv2d(dim * 3, dim * 3, kernel_size=3, padding=1, groups=dim * 3, bias=False)
        self.project_out = nn.Conv2d(dim, dim, kernel_size=1, bias=False)
        nn.init.zeros_(self.project_out.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) → (B, C, h, w)."""
        b, c, h, w = x.shape
        q, k, v = self.qkv_dwconv(self.qkv(x)).chunk(3, dim=1)
        q, k, v = (t.reshape(b, self.heads, c // self.heads, h * w) for t in (q, k, v))
        q = F.normalize(q, dim=-1)
        k = F.normalize(k, dim=-1)
        attn = ((q @ k.transpose(-2, -1)) * self.temperature).softmax(dim=-1)  # (B, heads, C/h, C/h)
        out = (attn @ v).reshape(b, c, h, w)
        return self.project_out(out)


class AuthorsTransposedAttention(nn.Module):
    """The transposed attention as the authors' released code builds it (their ``attnT`` + ``normT``).

    It differs from Restormer's MDTA (``TransposedSelfAttention``): its own LayerNorm on the
    residual stream *after* the spatial self-attention (sequential, not parallel on ``norm1``),
    no L2 normalisation of Q/K and no learned temperature (the softmax scale is 1/sqrt(h·w), as
    their memory-efficient attention call gives), and a zero-initialised ``Linear`` output with
    bias. ``transposed_attention_form="authors"`` selects it (``consissr convert-checkpoint``).

    Args:
        dim: channels C of the tokens.
        heads: number of heads the channels are split into.
    """

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        self.heads = heads
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Conv2d(dim, dim * 3, kernel_size=1, bias=False)
        self.qkv_dwconv = nn.Conv2d(dim * 3, dim * 3, kernel_size=3, padding=1, groups=dim * 3, bias=False)
        self.to_out = nn.Linear(dim, dim)
        nn.init.zeros_(self.to_out.weight)
        nn.init.zeros_(self.to_out.bias)

    def forward(self, tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Residual stream (B, h·w, C) → its update (B, h·w, C)."""
        b, n, c = tokens.shape
        x = self.norm(tokens).transpose(1, 2).reshape(b, c, height, width)
        q, k, v = self.qkv_dwconv(self.qkv(x)).chunk(3, dim=1)
        q, k, v = (t.reshape(b, self.heads, c // self.heads, n) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v)  # channels attend to channels; scale 1/sqrt(h·w)
        return self.to_out(out.reshape(b, c, n).transpose(1, 2))


TRANSPOSED_FORMS = ("restormer", "authors")


class SelfAttentionAddition(nn.Module):
    """The trainable additions of one ``attn1``: positional table and/or transposed attention.

    Args:
        dim: the layer's token width (heads × head_dim).
        heads: the layer's head count.
        grid: (G_h, G_w), the layer's token grid at the training size.
        pos_embed / transposed_attention: which additions to build.
        transposed_form: ``"restormer"`` (``TransposedSelfAttention``, parallel on ``norm1``) or
            ``"authors"`` (``AuthorsTransposedAttention``, after the self-attention).
    """

    def __init__(self, *, dim: int, heads: int, grid: tuple[int, int], pos_embed: bool,
                 transposed_attention: bool, transposed_form: str = "restormer") -> None:
        super().__init__()
        if transposed_form not in TRANSPOSED_FORMS:
            raise ValueError(f"transposed_form must be one of {list(TRANSPOSED_FORMS)}, got {transposed_form!r}")
        self.heads = heads
        self.grid = tuple(grid)
        self.pos_embed = nn.Parameter(torch.zeros(1, dim // heads, *grid)) if pos_embed else None
        form = TransposedSelfAttention if transposed_form == "restormer" else AuthorsTransposedAttention
        self.transposed = form(dim, heads) if transposed_attention else None

    def positional(self, height: int, width: int, dtype: torch.dtype) -> torch.Tensor:
        """The table at (height, width), repeated over heads: (1, height·width, heads·head_dim)."""
        table = self.pos_embed
        if (height, width) != self.grid:
            table = F.interpolate(table, size=(height, width), mode="bilinear", align_corners=False)
        table = table.flatten(2).transpose(1, 2)  # (1, h·w, head_dim), row-major as the tokens
        return table.repeat(1, 1, self.heads).to(dtype)


class ConsisSelfAttnProcessor:
    """``attn1`` processor: diffusers' SDPA self-attention + positional embedding + transposed attention.

    ``spatial_shapes`` maps a token count to the (h, w) it came from; the pre-hook fills it.
    """

    def __init__(self, addition: SelfAttentionAddition) -> None:
        self.addition = addition
        self.spatial_shapes: dict[int, tuple[int, int]] = {}
        self.block_input: torch.Tensor | None = None  # the authors' form: set by the block's pre-hook

    def _shape(self, tokens: int) -> tuple[int, int]:
        shape = self.spatial_shapes.get(tokens)
        if shape is None:
            side = math.isqrt(tokens)
            if side * side != tokens:
                raise RuntimeError(
                    f"no spatial size recorded for {tokens} tokens; call the model through its "
                    f"forward so the Transformer2DModel hook sees the feature map")
            shape = (side, side)
        return shape

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if encoder_hidden_states is not None or hidden_states.ndim != 3:
            raise ValueError("ConsisSelfAttnProcessor serves token self-attention (B, h·w, C) only")
        batch_size, tokens, channels = hidden_states.shape
        height, width = self._shape(tokens)
        addition = self.addition

        # 1. transposed (channel) attention on the same normalised input, zero at start
        transposed = None
        authors = isinstance(addition.transposed, AuthorsTransposedAttention)
        if addition.transposed is not None and not authors:
            grid = hidden_states.transpose(1, 2).reshape(batch_size, channels, height, width)
            transposed = addition.transposed(grid).flatten(2).transpose(1, 2)

        # 2. spatial self-attention, as diffusers' AttnProcessor2_0, positions added to Q and K
        residual = hidden_states
        hidden_states, attention_mask = prepare_mask_and_norm(attn, hidden_states, attention_mask, tokens)
        query = attn.to_q(hidden_states)
        key = attn.to_k(hidden_states)
        value = attn.to_v(hidden_states)
        if addition.pos_embed is not None:
            position = addition.positional(height, width, query.dtype)
            query = query + position
            key = key + position
        query = split_heads(attn, query, attn.norm_q)
        key = split_heads(attn, key, attn.norm_k)
        value = split_heads(attn, value)
        hidden_states = merge_heads(F.scaled_dot_product_attention(
            query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False), query.dtype)
        hidden_states = project_out(attn, hidden_states, residual)

        # 3. both branches go into the block's residual stream
        if transposed is not None:
            hidden_states = hidden_states + transposed.to(hidden_states.dtype)
        if authors:  # x + SA + TA(normT(x + SA)): the block adds x back
            block_input, self.block_input = self.block_input, None
            if block_input is None:
                raise RuntimeError("the authors' transposed attention needs the block input; call the model "
                                   "through its forward so the BasicTransformerBlock hook sees it")
            update = addition.transposed(block_input + hidden_states, height, width)
            hidden_states = hidden_states + update.to(hidden_states.dtype)
        return hidden_states


def level_downsampling(layer_name: str, num_levels: int) -> int:
    """How much smaller than the latent a UNet layer's feature map is (1, 2, 4, ...)."""
    match = _LEVEL.match(layer_name)
    if match is None:
        raise ValueError(f"cannot tell the resolution level of {layer_name!r}")
    if match.group(3):
        return 2 ** (num_levels - 1)
    index = int(match.group(2))
    return 2 ** index if match.group(1) == "down_blocks" else 2 ** (num_levels - 1 - index)


def self_attention_layers(unet: nn.Module) -> list[str]:
    """Names of every self-attention layer (``...transformer_blocks.K.attn1``) of a UNet."""
    return [name[: -len(_PROCESSOR_SUFFIX)] for name in unet.attn_processors
            if name.endswith("attn1" + _PROCESSOR_SUFFIX)]


class _SelfAttentionHooks(nn.ModuleDict):
    """The per-layer additions, plus the pre-hook handles that feed their processors (h, w)."""

    hook_handles: list

    def remove_hooks(self) -> None:
        for handle in getattr(self, "hook_handles", []):
            handle.remove()
        self.hook_handles = []


def install_self_attention(
    unet: nn.Module,
    *,
    pos_embed: bool = True,
    pos_embed_grid: int = 64,
    transposed_attention: bool = True,
    additions: nn.ModuleDict | None = None,
    transposed_form: str = "restormer",
) -> nn.ModuleDict:
    """Install ``ConsisSelfAttnProcessor`` on every ``attn1`` of ``unet``; return the additions.

    Args:
        unet: a diffusers ``UNet2DConditionModel`` (modified in place: processors and hooks).
        pos_embed: add the learned absolute positional embedding.
        pos_embed_grid: latent side of the training crops (paper: 512 / 8 = 64); a level
            downsampled by f stores a ceil(grid / f)² table.
        transposed_attention: add the MDTA branch.
        additions: reuse existing additions (e.g. when loading) instead of new zero ones.
        transposed_form: ``"restormer"`` or ``"authors"`` (``SelfAttentionAddition``).

    With both flags off nothing is installed and an empty ``ModuleDict`` comes back.
    """
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    processors = dict(unet.attn_processors)
    if any(isinstance(p, ConsisSelfAttnProcessor) for p in processors.values()):
        raise ValueError("this UNet already has ConsisSR self-attention additions installed")
    result = _SelfAttentionHooks()
    if not (pos_embed or transposed_attention):
        return result
    num_levels = len(unet.config.block_out_channels)
    names = self_attention_layers(unet)
    for name in names:
        attn = unet.get_submodule(name)
        if additions is not None:
            addition = additions[module_key(name)]
        else:
            side = math.ceil(pos_embed_grid / level_downsampling(name, num_levels))
            addition = SelfAttentionAddition(
                dim=attn.inner_dim, heads=attn.heads, grid=(side, side), pos_embed=pos_embed,
                transposed_attention=transposed_attention, transposed_form=transposed_form,
            ).to(device=attn.to_q.weight.device, dtype=attn.to_q.weight.dtype)
        result[module_key(name)] = addition
        processors[name + _PROCESSOR_SUFFIX] = ConsisSelfAttnProcessor(addition)
    unet.set_attn_processor(processors)

    # every Transformer2DModel tells the processors of its blocks the (h, w) of its input
    handles = [module.register_forward_pre_hook(_record_spatial_shape, with_kwargs=True)
               for module in unet.modules() if isinstance(module, Transformer2DModel)]
    if transposed_attention and transposed_form == "authors":  # their attnT reads the residual stream
        from diffusers.models.attention import BasicTransformerBlock

        handles += [module.register_forward_pre_hook(_record_block_input, with_kwargs=True)
                    for module in unet.modules() if isinstance(module, BasicTransformerBlock)]
    result.hook_handles = handles
    return result


def _record_spatial_shape(module, args, kwargs) -> None:
    """Forward pre-hook of a ``Transformer2DModel``: (h, w) of its input to its blocks' processors.

    A module-level function that looks the processors up at call time, so a deep copy of the
    net (an EMA model) or a pickled one records into its own processors.
    """
    hidden_states = args[0] if args else kwargs["hidden_states"]
    height, width = hidden_states.shape[-2:]
    for block in module.transformer_blocks:
        processor = getattr(block.attn1, "processor", None)
        if isinstance(processor, ConsisSelfAttnProcessor):
            processor.spatial_shapes[height * width] = (height, width)


def _record_block_input(module, args, kwargs) -> None:
    """Forward pre-hook of a ``BasicTransformerBlock``: its input (the residual stream) to its
    ``attn1`` processor, which the authors' transposed attention reads after the self-attention."""
    processor = getattr(module.attn1, "processor", None)
    if isinstance(processor, ConsisSelfAttnProcessor):
        processor.block_input = args[0] if args else kwargs["hidden_states"]
