"""TalaObjective: Algorithm 1 wired to the net (timestep index, target, condition, prompt dropout)."""

import types

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from torch import nn

from consissr.models.backbone import SD_SCHEDULE
from consissr.training.prompts import EMPTY_PROMPT
from consissr.training.tala import TalaObjective, tala_noising


class RecordingNet(nn.Module):
    """Stands in for ConsisSRNet: records what it is given, answers a fixed function of x_t."""

    def __init__(self):
        super().__init__()
        self.unet = types.SimpleNamespace(conv_in=nn.Conv2d(4, 4, 1))
        self.config = {"controlnet_conditioning": "latent"}
        self.weight = nn.Parameter(torch.tensor(0.5))
        self.calls = []

    def forward(self, noisy_latents, t, encoder_hidden_states, lq_cond, image_embeds):
        self.calls.append(dict(x=noisy_latents, t=t, text=encoder_hidden_states, cond=lq_cond, embeds=image_embeds))
        return self.weight * noisy_latents


def batch(n):
    g = torch.Generator().manual_seed(0)
    return {"hq": torch.randn(n, 4, 2, 2, generator=g), "lq": torch.randn(n, 4, 2, 2, generator=g),
            "image_embeds": torch.randn(n, 8, generator=g), "prompt": torch.ones(n, dtype=torch.long)}


def objective(**kw):
    prompts = torch.stack([torch.zeros(3, 5), torch.ones(3, 5)])  # row 0 = "", row 1 = a caption
    alphas = DDPMScheduler(**SD_SCHEDULE).alphas_cumprod
    return TalaObjective(RecordingNet(), alphas_cumprod=alphas, prompt_embeds=prompts, **kw), alphas


def test_the_net_sees_x_t_the_diffusers_index_and_the_lq_condition_and_the_loss_is_to_eps_star():
    obj, alphas = objective(gamma=10.0, tala=True, prompt_dropout=0.0)
    b = batch(64)
    torch.manual_seed(3)
    loss, extra = obj(b)
    torch.manual_seed(3)
    expected = tala_noising(b["hq"], b["lq"], alphas, gamma=10.0, enabled=True)  # the same global draws
    call = obj.net.calls[0]
    assert torch.equal(call["x"], expected.noisy_latents)
    assert torch.equal(call["t"], expected.timesteps) and call["t"].min() >= 0 and call["t"].max() <= 999
    assert torch.equal(call["cond"], b["lq"]) and torch.equal(call["embeds"], b["image_embeds"])
    assert torch.equal(call["text"], torch.ones(64, 3, 5))  # every sample's own prompt row
    torch.testing.assert_close(loss, F.mse_loss(0.5 * expected.noisy_latents, expected.target))
    assert extra["lq_start_fraction"] == expected.lq_start.float().mean()


def test_prompt_dropout_replaces_that_share_of_prompts_by_the_empty_one():
    obj, _ = objective(gamma=10.0, tala=True, prompt_dropout=0.3)
    torch.manual_seed(4)
    obj(batch(4000))
    text = obj.net.calls[0]["text"]
    dropped = (text == 0).all(dim=(1, 2))
    assert EMPTY_PROMPT == 0 and ((text == 1).all(dim=(1, 2)) | dropped).all()
    assert abs(dropped.float().mean().item() - 0.3) < 0.03
