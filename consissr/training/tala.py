"""Time-aware Latent Augmentation (TALA), paper §3.4 and Algorithm 1, and the objective built on it.

Timesteps here are the paper's: t ∈ {1, …, T}. diffusers indexes the same schedule from 0, so
the UNet and ``noise_scheduler.alphas_cumprod`` get ``t - 1`` (ᾱ_t of the paper is
``alphas_cumprod[t - 1]``: ᾱ_1 = 1 − β_1). ``TalaObjective`` is one micro-batch of Algorithm 1
(l. 2–8) on the ConsisSR net, the module the training loop trains.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from consissr.training.prompts import EMPTY_PROMPT

if TYPE_CHECKING:
    from consissr.models.consissr import ConsisSRNet


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


# --------------------------------------------------------------------------------------------
# Algorithm 1 as a module (the training loop's DDP-wrapped model)
# --------------------------------------------------------------------------------------------
class TalaObjective(nn.Module):
    """``forward(batch)`` = one micro-batch of Algorithm 1: ``(loss, {"lq_start_fraction": ...})``.

    Args:
        net: the ``ConsisSRNet`` (after ``apply_trainable_policy``).
        alphas_cumprod: ᾱ of the backbone's noise schedule (T entries, diffusers indexing).
        prompt_embeds: the frozen text encoder's output for every unique prompt, (P, L, C);
            row ``EMPTY_PROMPT`` is the empty prompt.
        gamma: γ of p(t) = (t/T)^γ.
        tala: False = plain DDPM training (never start from LQ).
        prompt_dropout: chance of replacing a sample's prompt by the empty one.

    A batch holds ``lq``/``hq`` latents (B, C, h, w), ``image_embeds`` (B, D), ``prompt``
    (B,) rows of the prompt table and, for ``controlnet_conditioning: pixel``, ``lq_pixels``
    (B, 3, f·h, f·w) in [0, 1] (f: the VAE factor). Every random draw (t, ε, r, dropout) comes from the global torch
    RNG, which the loop's checkpoints save and restore.
    """

    def __init__(self, net: ConsisSRNet, *, alphas_cumprod: torch.Tensor, prompt_embeds: torch.Tensor,
                 gamma: float, tala: bool, prompt_dropout: float) -> None:
        super().__init__()
        self.net = net
        self.gamma, self.tala, self.prompt_dropout = float(gamma), bool(tala), float(prompt_dropout)
        self.register_buffer("alphas_cumprod", alphas_cumprod.detach().float().clone(), persistent=False)
        # the prompt table stays on the CPU, outside the module's buffers: with captions it can be
        # large, and DDP would copy every buffer to each GPU and broadcast it every step
        self.prompt_embeds = prompt_embeds.detach().float().cpu()

    def enable_gradient_checkpointing(self) -> None:
        """diffusers' switch on the UNet and the ControlNet (what the loop's setting calls)."""
        self.net.unet.enable_gradient_checkpointing()
        self.net.controlnet.enable_gradient_checkpointing()

    def text_embeds(self, prompt: torch.Tensor) -> torch.Tensor:
        """Rows ``prompt`` of the prompt table, on the prompt's device."""
        return self.prompt_embeds[prompt.cpu()].to(prompt.device)

    def condition(self, batch: dict) -> torch.Tensor:
        """The ControlNet condition: the LQ latent, or the LQ image for a pixel ControlNet."""
        dtype = self.net.unet.conv_in.weight.dtype
        cond = batch["lq_pixels"] if self.net.config["controlnet_conditioning"] == "pixel" else batch["lq"]
        return cond.to(dtype)

    def forward(self, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        dtype = self.net.unet.conv_in.weight.dtype
        hq, lq = batch["hq"].to(dtype), batch["lq"].to(dtype)
        # 1. Alg. 1, l. 2–7: t, ε, r; x_t from LQ where r < p(t), else HQ; the target ε*
        noised = tala_noising(hq, lq, self.alphas_cumprod, gamma=self.gamma, enabled=self.tala)
        # 2. the hybrid prompt: text (dropped to "" with prompt_dropout) + robust CLIP image embedding
        prompt = batch["prompt"]
        if self.prompt_dropout > 0:
            drop = torch.rand(prompt.shape, device=prompt.device) < self.prompt_dropout
            prompt = torch.where(drop, torch.full_like(prompt, EMPTY_PROMPT), prompt)
        # 3. l. 8: ε̂ and the MSE to ε*
        eps_hat = self.net(noised.noisy_latents, noised.timesteps, self.text_embeds(prompt),
                           self.condition(batch), batch["image_embeds"])
        loss = F.mse_loss(eps_hat.float(), noised.target.float())
        return loss, {"lq_start_fraction": noised.lq_start.float().mean().detach()}


def tala_step(model: nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The loop's ``loss_fn``: through ``model(...)`` so that DDP all-reduces the gradients."""
    return model(batch)


__all__ = ["TalaBatch", "TalaObjective", "tala_noising", "tala_probability", "tala_step"]
