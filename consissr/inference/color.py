"""Colour correction of the super-resolved image against the upsampled LQ (as StableSR does).

``adain``: per-channel mean and standard deviation of the result replaced by the reference's
(adaptive instance normalisation; unbiased variance + 1e-5, as StableSR's ``calc_mean_std``).
``wavelet``: the result's high frequencies plus the reference's low frequencies, split by five
levels of an à-trous 3×3 binomial blur with dilation 1, 2, 4, 8, 16 and replicate padding
(StableSR's ``wavelet_reconstruction``). ``none``: unchanged. Images are (B, 3, H, W) in [0, 1].
``color_fix_rows_`` does the same on a large (H, W, 3) image in place, a strip of rows at a time.
"""

from __future__ import annotations

from collections.abc import Callable

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


def _sums(strips) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Per-channel Σx and Σx² (float64) and the count over (1, 3, h, w) or (3, h, w) strips."""
    total, squares, n = torch.zeros(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64), 0
    for x in strips:
        x = x.double().reshape(3, -1)
        total, squares, n = total + x.sum(1), squares + (x * x).sum(1), n + x.shape[1]
    return total, squares, n


def _mean_std_of(total: torch.Tensor, squares: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    mean = total / n
    var = (squares - n * mean * mean) / (n - 1)  # unbiased, as ``_mean_std``
    return mean.float(), (var + _EPS).sqrt().float()


def color_fix_rows_(image: torch.Tensor, reference: Callable[[int, int], torch.Tensor], method: str,
                    strip: int) -> torch.Tensor:
    """``color_fix`` of an (H, W, 3) float32 image in place, ``strip`` rows at a time.

    ``reference(r0, r1)`` gives the reference's rows r0:r1 as (1, 3, r1 − r0, W). ``adain``: the
    statistics are summed over the strips first (float64). ``wavelet``: each strip is fixed with
    ``2**levels − 1`` = 31 rows of context on both sides (the blurs' reach, 1 + 2 + … + 16), and
    the original rows above it are kept back while the strip above is written, so the result
    equals the whole-image ``wavelet_color_fix``. Memory: a few strips, never a second image.
    """
    height = image.shape[0]
    spans = [(r0, min(height, r0 + strip)) for r0 in range(0, height, strip)]
    if method == "adain":
        mean, std = _mean_std_of(*_sums(image[r0:r1].permute(2, 0, 1) for r0, r1 in spans))
        ref_mean, ref_std = _mean_std_of(*_sums(reference(r0, r1) for r0, r1 in spans))
        for r0, r1 in spans:
            rows = image[r0:r1]
            rows.sub_(mean).div_(std).mul_(ref_std).add_(ref_mean)
    elif method == "wavelet":
        halo = 2 ** _WAVELET_LEVELS - 1
        kept = image[:0].clone()  # original rows just above the strip (already overwritten in image)
        for r0, r1 in spans:
            top, bottom = r0 - kept.shape[0], min(height, r1 + halo)
            rows = torch.cat([kept, image[r0:bottom]])  # original values of rows top:bottom
            fixed = wavelet_color_fix(rows.permute(2, 0, 1)[None], reference(top, bottom).float())
            kept = rows[max(0, r1 - top - halo):r1 - top].clone()
            image[r0:r1] = fixed[0, :, r0 - top:r1 - top].permute(1, 2, 0)
    elif method != "none":
        raise ValueError(f"color_fix must be one of {list(COLOR_FIXES)}, got {method!r}")
    return image.clamp_(0.0, 1.0)


__all__ = ["COLOR_FIXES", "adain_color_fix", "color_fix", "color_fix_rows_", "wavelet_color_fix"]
