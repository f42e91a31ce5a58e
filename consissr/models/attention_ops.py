"""The multi-head core of diffusers' ``AttnProcessor2_0``, shared by this project's processors.

``HybridPromptAttnProcessor`` (hpa.py) and ``ConsisSelfAttnProcessor`` (self_attention.py) change
what goes into and comes out of the attention, not how heads are formed; both use these so the
head split, ``norm_q``/``norm_k`` and merge stay exactly diffusers' (a fresh adapter must equal
the vanilla UNet bit for bit).
"""

from __future__ import annotations

import torch


def split_heads(attn, x: torch.Tensor, norm=None) -> torch.Tensor:
    """(B, L, heads·d) → (B, heads, L, d), then ``norm`` (``attn.norm_q``/``attn.norm_k``) if set."""
    b = x.shape[0]
    x = x.view(b, -1, attn.heads, x.shape[-1] // attn.heads).transpose(1, 2)
    return norm(x) if norm is not None else x


def merge_heads(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, heads, L, d) → (B, L, heads·d) in ``dtype``."""
    b, h, length, d = x.shape
    return x.transpose(1, 2).reshape(b, length, h * d).to(dtype)


def prepare_mask_and_norm(attn, hidden_states: torch.Tensor, attention_mask, key_length: int):
    """AttnProcessor2_0's step before the projections: per-head attention mask and group norm."""
    batch_size = hidden_states.shape[0]
    if attention_mask is not None:
        attention_mask = attn.prepare_attention_mask(attention_mask, key_length, batch_size)
        attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
    if attn.group_norm is not None:
        hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
    return hidden_states, attention_mask


def project_out(attn, hidden_states: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
    """AttnProcessor2_0's output: ``to_out`` (linear, dropout), residual, rescale (token layout)."""
    hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
    if attn.residual_connection:
        hidden_states = hidden_states + residual
    return hidden_states / attn.rescale_output_factor
