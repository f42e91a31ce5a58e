"""Time-aware Latent Augmentation (TALA), paper §3.4 and Algorithm 1.

Timesteps here are the paper's: t ∈ {1, …, T}. diffusers indexes the same schedule from 0, so
the UNet and ``noise_scheduler.alphas_cumprod`` get ``t - 1`` (ᾱ_t of the paper is
``alphas_cumprod[t - 1]``: ᾱ_1 = 1 − β_1).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def tala_probability(t: torch.Tensor | float, T: int, gamma: float) -> torch.Tensor | float:
    """p(t) = (t/T)^γ: the chance that a sample's noising starts from the LQ latent (Alg. 1, l. 4).

    With γ = 10, p(T) = 1 and p(0.6T) ≈ 0.006: late (noisy) steps learn to start from LQ, as
    GAN-Embedding inference does, early steps keep learning from HQ.
    """
    return (t / T) ** gamma


@dataclass
class TalaBatch:
    noisy_latents: torch.Tensor  # x_t
    target: torch.Tensor  # ε*
    timesteps: torch.Tensor  # diffusers indices (paper t − 1)
    lq_start: torch.Tensor  # bool per sample: x_t started from the LQ latent


def tala_noising(
    hq: torch.Tensor,
    lq: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    *,
    gamma: float,
    enabled: bool = True,
    generator: torch.Generator | None = None,
) -> TalaBatch:
    """Algorithm 1, lines 2–7, for a batch of HQ/LQ latents.

    t ~ U{1..T}, ε ~ N(0, I), r ~ U(0, 1); x_0' = x_LQ where r < p(t) else x_HQ;
    x_t = √ᾱ_t·x_0' + √(1−ᾱ_t)·ε; target ε* = (x_t − √ᾱ_t·x_HQ)/√(1−ᾱ_t).

    The paper's Algorithm 1 prints the target with the opposite sign; the official code uses this
    one, whose HQ case is ε itself. ``enabled=False`` never starts from LQ: plain DDPM training.
    """
    b = hq.shape[0]
    T = alphas_cumprod.shape[0]
    device = hq.device
    t = torch.randint(1, T + 1, (b,), generator=generator, device=device)  # l. 2
    eps = torch.randn(hq.shape, generator=generator, device=device, dtype=hq.dtype)  # l. 3
    r = torch.rand(b, generator=generator, device=device)  # l. 4
    lq_start = (r < tala_probability(t.float(), T, gamma)) & enabled
    ab = alphas_cumprod.to(device=device, dtype=torch.float32)[t - 1].view(b, 1, 1, 1)
    sqrt_ab, sqrt_1mab = ab.sqrt().to(hq.dtype), (1 - ab).sqrt().to(hq.dtype)
    mask = lq_start.view(b, 1, 1, 1)
    x0 = torch.where(mask, lq, hq)  # l. 5
    x_t = sqrt_ab * x0 + sqrt_1mab * eps  # l. 6
    # l. 7: for HQ starts the residual formula is ε up to rounding; use ε itself there
    target = torch.where(mask, (x_t - sqrt_ab * hq) / sqrt_1mab, eps)
    return TalaBatch(x_t, target, t - 1, lq_start)
