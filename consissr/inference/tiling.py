"""Any image size: padding to what the VAE and UNet accept, tiles, Gaussian blending, VAE tiling.

Latent diffusion on a large image runs the ControlNet + UNet tile by tile on overlapping latent
windows and blends their noise predictions with Gaussian weights (σ = 0.1 × tile side, centred,
as Tiled Diffusion / DiffBIR's ``sample_with_mixdiff`` weight them), then takes one scheduler
step on the whole latent, so the random draws do not depend on the tiling. The VAE encodes and
decodes tile by tile through diffusers' own ``AutoencoderKL`` tiling (linear blending).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F


def vae_scale_factor(vae) -> int:
    return 2 ** (len(vae.config.block_out_channels) - 1)


def size_multiple(vae, unet) -> int:
    """Pixel multiple an image needs: the VAE's downsampling × the UNet's (2 per down level)."""
    return vae_scale_factor(vae) * 2 ** (len(unet.config.block_out_channels) - 1)


def pad_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Replicate-pad (B, C, H, W) at the bottom and right to multiples of ``multiple``."""
    h, w = x.shape[-2:]
    ph, pw = -h % multiple, -w % multiple
    return F.pad(x, (0, pw, 0, ph), mode="replicate") if ph or pw else x


def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Window starts along one axis: stride ``tile − overlap``, the last window flush with the end."""
    if size <= tile:
        return [0]
    starts = list(range(0, size - tile + 1, tile - overlap))
    if starts[-1] != size - tile:
        starts.append(size - tile)
    return starts


def tile_boxes(height: int, width: int, tile: int, overlap: int) -> list[tuple[int, int, int, int]]:
    """(y0, y1, x0, x1) windows covering a (height, width) grid; windows are min(tile, side) wide."""
    th, tw = min(tile, height), min(tile, width)
    return [(y, y + th, x, x + tw) for y in tile_starts(height, tile, overlap) for x in tile_starts(width, tile, overlap)]


def gaussian_weights(height: int, width: int, *, device=None, dtype=torch.float32) -> torch.Tensor:
    """(1, 1, height, width) separable Gaussian centred on the window, σ = 0.1 × side."""
    def axis(n: int) -> torch.Tensor:
        x = torch.arange(n, dtype=torch.float64)
        sigma = 0.1 * n
        return torch.exp(-0.5 * ((x - (n - 1) / 2) / sigma) ** 2) / (sigma * math.sqrt(2 * math.pi))

    return (axis(height)[:, None] * axis(width)[None, :]).to(device=device, dtype=dtype)[None, None]


def check_tiles(tile_size: int, tile_overlap: int, multiple: int) -> None:
    """Tile size and overlap (output pixels) that the VAE's tiling and the UNet both accept."""
    if tile_size <= 0 or tile_size % multiple:
        raise ValueError(f"tile_size must be a positive multiple of {multiple} pixels, got {tile_size}")
    if not 0 <= tile_overlap < tile_size or tile_overlap % multiple:
        raise ValueError(f"tile_overlap must be a multiple of {multiple} pixels in [0, tile_size), got {tile_overlap}")


@contextmanager
def vae_tiling(vae, tile_size: int | None, tile_overlap: int = 0) -> Iterator[None]:
    """diffusers' ``AutoencoderKL`` tiling with ``tile_size`` pixel tiles (``None``: off), restored after.

    Its tiles start every ``tile_sample_min_size·(1 − tile_overlap_factor)`` pixels and keep
    ``tile_sample_min_size − blend`` of each; both must be whole latent pixels for the output to
    be exactly scale × the latent, which ``check_tiles``' multiples guarantee (checked here too).
    """
    saved = (vae.use_tiling, vae.tile_sample_min_size, vae.tile_latent_min_size, vae.tile_overlap_factor)
    try:
        if tile_size is None:
            vae.disable_tiling()
        else:
            factor = vae_scale_factor(vae)
            vae.enable_tiling()
            vae.tile_sample_min_size, vae.tile_latent_min_size = tile_size, tile_size // factor
            vae.tile_overlap_factor = tile_overlap / tile_size
            stride = tile_size - tile_overlap
            derived = (int(tile_size * (1 - vae.tile_overlap_factor)), int(tile_size // factor * (1 - vae.tile_overlap_factor)) * factor,
                       tile_size - int(tile_size * vae.tile_overlap_factor),
                       (tile_size // factor - int(tile_size // factor * vae.tile_overlap_factor)) * factor)
            if derived != (stride,) * 4:
                raise ValueError(f"VAE tiling: tile_size={tile_size}, tile_overlap={tile_overlap} do not give whole "
                                 f"latent strides (got {derived}, want {stride}); choose multiples of {factor}")
        yield
    finally:
        vae.use_tiling, vae.tile_sample_min_size, vae.tile_latent_min_size, vae.tile_overlap_factor = saved


__all__ = ["check_tiles", "gaussian_weights", "pad_to_multiple", "size_multiple", "tile_boxes", "tile_starts",
           "vae_scale_factor", "vae_tiling"]
