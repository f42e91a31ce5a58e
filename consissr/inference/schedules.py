"""Sampling schedules (paper §3.1, Algorithm 2): respaced DDPM timesteps and the GANEmb start.

Timesteps follow diffusers' 0-based indexing: paper step t ∈ 1..T is index t − 1, so the paper's
t_max = 1000 (T) is index 999 and ``rec``'s t_max = 600 is index 599. The spaced list is IDDPM's
``space_timesteps(T, "N")`` (Nichol & Dhariwal 2021) restricted to [0, t_max − 1]: index
round(i·(t_max − 1)/(N − 1)), i = 0..N−1. diffusers' ``DDPMScheduler.set_timesteps(timesteps=...)``
then samples with the respaced betas β'_i = 1 − ᾱ_{t_i}/ᾱ_{t_{i−1}} (ᾱ before the first = 1), the
posterior variance of those betas, and no noise at the last step (t = 0).
"""

from __future__ import annotations

import torch

# Table 2 of the paper: GAN-Embedding presets (t_max in the paper's 1..T convention, steps)
GANEMB_PRESETS: dict[str, tuple[int, int]] = {"rec": (600, 10), "gen": (1000, 10)}
FULL_STEPS = 50  # §3.1: 50 spaced DDPM steps from x_T ~ N(0, I)


def spaced_timesteps(num_steps: int, t_max: int, num_train_timesteps: int = 1000) -> list[int]:
    """IDDPM's respaced timesteps in [0, t_max − 1] as diffusers indices, descending (first = t_max − 1)."""
    if not 1 <= t_max <= num_train_timesteps:
        raise ValueError(f"t_max must lie in 1..{num_train_timesteps} (paper convention), got {t_max}")
    if not 1 <= num_steps <= t_max:
        raise ValueError(f"the number of steps must lie in 1..t_max={t_max}, got {num_steps}")
    last = t_max - 1
    if num_steps == 1:
        return [last]
    ascending = [round(i * last / (num_steps - 1)) for i in range(num_steps)]
    return ascending[::-1]


def set_spaced_timesteps(scheduler, num_steps: int, t_max: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Put ``spaced_timesteps`` into a diffusers ``DDPMScheduler`` (custom timesteps); return them.

    With custom timesteps its ``step`` takes ᾱ_prev at the next entry of the list (its
    ``previous_timestep``), so the chain runs on the respaced betas (tests/test_inference.py checks
    one step against the formula).
    """
    T = scheduler.config.num_train_timesteps
    scheduler.set_timesteps(timesteps=spaced_timesteps(num_steps, t_max, T), device=device)
    return scheduler.timesteps


def gan_start_latent(scheduler, z_gan: torch.Tensor, noise: torch.Tensor, t_max: int) -> torch.Tensor:
    """Algorithm 2: x_{t_max} = √ᾱ_{t_max}·z_gan + √(1 − ᾱ_{t_max})·ε (z_gan already × scaling factor).

    ``t_max`` is the paper's (1..T); diffusers' ``add_noise`` takes the index t_max − 1.
    """
    index = torch.full((z_gan.shape[0],), t_max - 1, dtype=torch.long, device=z_gan.device)
    return scheduler.add_noise(z_gan, noise.to(z_gan), index)


__all__ = ["FULL_STEPS", "GANEMB_PRESETS", "gan_start_latent", "set_spaced_timesteps", "spaced_timesteps"]
