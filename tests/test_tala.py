"""TALA (Algorithm 1): p(t) and the noising/target of the training step."""

import torch
from diffusers import DDPMScheduler

from consissr.models.backbone import SD_SCHEDULE
from consissr.training.tala import tala_noising, tala_probability

T = 1000


def alphas():
    return DDPMScheduler(**SD_SCHEDULE).alphas_cumprod


def test_probability_properties():
    t = torch.arange(1, T + 1, dtype=torch.float64)
    p = tala_probability(t, T, 10.0)
    assert p[-1] == 1.0  # p(T) = 1
    assert tala_probability(0.6 * T, T, 10.0) < 0.01
    assert torch.all(p[1:] > p[:-1])  # strictly increasing
    assert torch.all((p > 0) & (p <= 1))


def batch(n=4096, c=4, s=2):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, c, s, s, generator=g), torch.randn(n, c, s, s, generator=g)


def test_hq_started_target_is_exactly_eps_and_lq_started_is_the_residual():
    hq, lq = batch()
    ab = alphas()
    out = tala_noising(hq, lq, ab, gamma=10.0, generator=torch.Generator().manual_seed(1))
    # replay the same draws to recover ε
    g = torch.Generator().manual_seed(1)
    t = torch.randint(1, T + 1, (hq.shape[0],), generator=g)
    eps = torch.randn(hq.shape, generator=g)
    assert torch.equal(out.timesteps, t - 1)
    h = ~out.lq_start
    assert h.any() and out.lq_start.any()
    assert torch.equal(out.target[h], eps[h])
    a = ab[t - 1].view(-1, 1, 1, 1)
    expected_xt = torch.where(out.lq_start.view(-1, 1, 1, 1), lq, hq) * a.sqrt() + (1 - a).sqrt() * eps
    torch.testing.assert_close(out.noisy_latents, expected_xt)
    m = out.lq_start
    residual = eps + (a.sqrt() / (1 - a).sqrt()) * (lq - hq)
    torch.testing.assert_close(out.target[m], residual[m], rtol=1e-4, atol=1e-4)
    assert not torch.allclose(out.target[m], eps[m])  # the LQ case is not plain ε


def test_fraction_of_lq_starts_matches_expected_probability():
    hq, lq = batch(n=200_000, c=1, s=1)
    out = tala_noising(hq, lq, alphas(), gamma=10.0, generator=torch.Generator().manual_seed(2))
    expected = tala_probability(torch.arange(1, T + 1, dtype=torch.float64), T, 10.0).mean().item()
    # E[p(t)] = mean over t of (t/T)^10 ≈ 1/11; binomial std for n=200k is ~0.0006
    assert abs(out.lq_start.double().mean().item() - expected) < 0.003
    assert abs(expected - 1 / 11) < 0.002


def test_disabled_is_plain_ddpm():
    hq, lq = batch(n=512)
    out = tala_noising(hq, lq, alphas(), gamma=10.0, enabled=False, generator=torch.Generator().manual_seed(3))
    assert not out.lq_start.any()
    g = torch.Generator().manual_seed(3)
    torch.randint(1, T + 1, (512,), generator=g)
    assert torch.equal(out.target, torch.randn(hq.shape, generator=g))
