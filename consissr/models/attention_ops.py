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
