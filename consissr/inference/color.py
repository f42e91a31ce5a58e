"""Colour correction of the super-resolved image against the upsampled LQ (as StableSR does).

``adain``: per-channel mean and standard deviation of the result replaced by the reference's
(adaptive instance normalisation; unbiased variance + 1e-5, as StableSR's ``calc_mean_std``).
``wavelet``: the result's high frequencies plus the reference's low frequencies, split by five
levels of an à-trous 3×3 binomial blur with dilation 1, 2, 4, 8, 16 and replicate padding
(StableSR's ``wavelet_reconstruction``). ``none``: unchanged. Images are (B, 3, H, W) in [0, 1].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

COLOR_FIXES = ("adain", "wavelet", "none")
_EPS = 1e-5
_WAVELET_LEVELS = 5


def _mean_std(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    flat = x.flatten(2)
    return flat.mean(dim=2)[..., None, None], (flat.var(dim=2) + _EPS).sqrt()[..., None, None]


def adain_color_fix(image: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    mean, std = _mean_std(image)
    ref_mean, ref_std = _mean_std(reference)
    return (image - mean) / std * ref_std + ref_mean


def _binomial_blur(x: torch.Tensor, dilation: int) -> torch.Tensor:
    k1 = torch.tensor([0.25, 0.5, 0.25], dtype=x.dtype, device=x.device)
    kernel = (k1[:, None] * k1[None, :]).expand(x.shape[1], 1, 3, 3)
    x = F.pad(x, (dilation,) * 4, mode="replicate")
    return F.conv2d(x, kernel, groups=x.shape[1], dilation=dilation)


def _split_frequencies(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low): x = high + low, low the image after all blur levels."""
    low = x
    for level in range(_WAVELET_LEVELS):
        low = _binomial_blur(low, 2 ** level)
    return x - low, low


def wavelet_color_fix(image: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    high, _ = _split_frequencies(image)
    _, ref_low = _split_frequencies(reference)
    return high + ref_low


def color_fix(image: torch.Tensor, reference: torch.Tensor, method: str) -> torch.Tensor:
    """``method`` ∈ ``COLOR_FIXES``; the result clamped to [0, 1]."""
    if method == "adain":
        image = adain_color_fix(image.float(), reference.float())
    elif method == "wavelet":
        image = wavelet_color_fix(image.float(), reference.float())
    elif method != "none":
        raise ValueError(f"color_fix must be one of {list(COLOR_FIXES)}, got {method!r}")
    return image.clamp(0.0, 1.0)


__all__ = ["COLOR_FIXES", "adain_color_fix", "color_fix", "wavelet_color_fix"]
