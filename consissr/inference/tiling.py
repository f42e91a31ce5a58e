"""Any image size: padding to what the VAE and UNet accept, tiles, Gaussian blending, streamed VAE tiling.

Latent diffusion on a large image runs the ControlNet + UNet tile by tile on overlapping latent
windows and blends their noise predictions with Gaussian weights (σ = 0.1 × tile side, centred,
as Tiled Diffusion / DiffBIR's ``sample_with_mixdiff`` weight them), then takes one scheduler
step on the whole latent, so the random draws do not depend on the tiling. The VAE encodes and
decodes tile by tile (linear blending, as diffusers' ``AutoencoderKL`` tiling) straight into one
latent or into the output image, and the 4× pixels it encodes (bicubic LQ, GAN output) are made
window by window from the LQ: memory is the image's own latents plus one tile, not the image.
"""

from __future__ import annotations

import math
from collections.abc import Callable

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


# --------------------------------------------------------------------------------------------
# streaming: windows of 4× images made on demand, VAE encode and decode tile by tile
# --------------------------------------------------------------------------------------------
# diffusers' AutoencoderKL.tiled_encode/tiled_decode keep every encoded/decoded tile in a list and
# concatenate them (plus a copy of the whole input as the argument): several image-sized buffers
# at once. The two functions below run the same per-tile VAE calls (``vae.encode``/``vae.decode``
# on one window, tiling off) and blend each result straight into one preallocated latent or the
# output image, so that only the result and one tile are alive.
Box = tuple[int, int, int, int]


def blend_weights(starts: list[int], length: int, size: int, overlap: int) -> list[torch.Tensor]:
    """1-D weights of windows ``[s, s + length)`` along an axis of ``size``, summing to 1 everywhere.

    Linear ramps over ``overlap`` at both ends (diffusers' blend profile), divided by their sum
    over the windows. The 2-D weight of a tile is the product of its row and column weights, so a
    grid of tiles sums to 1 too and blending needs no image-sized weight buffer.
    """
    n = min(length, size)
    i = torch.arange(n, dtype=torch.float64)
    ramp = torch.minimum(torch.minimum((i + 1) / (overlap + 1), (n - i) / (overlap + 1)), torch.ones(()))
    total = torch.zeros(size, dtype=torch.float64)
    for s in starts:
        total[s:s + n] += ramp
    return [(ramp / total[s:s + n]).float() for s in starts]


def _grid_weights(boxes: list[Box], height: int, width: int, overlap: int) -> Callable[[Box], torch.Tensor]:
    """box → its (1, 1, h, w) blend weight, for the boxes of ``tile_boxes(height, width, ...)``."""
    ys, xs = sorted({b[0] for b in boxes}), sorted({b[2] for b in boxes})
    wy = dict(zip(ys, blend_weights(ys, boxes[0][1] - boxes[0][0], height, overlap)))
    wx = dict(zip(xs, blend_weights(xs, boxes[0][3] - boxes[0][2], width, overlap)))
    return lambda box: (wy[box[0]][:, None] * wx[box[2]][None, :])[None, None]


def upscaled_window(lq: torch.Tensor, scale: int, box: Box, halo: int,
                    upscale: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Window ``box`` = (y0, y1, x0, x1) of the ``scale``× image ``upscale(lq)``, from an LQ crop.

    The crop reaches ``halo`` LQ pixels beyond the window (clipped at the image border); rows and
    columns past the ``scale``× image repeat its last one (``pad_to_multiple``'s padding).
    """
    h, w = lq.shape[-2:]
    y0, y1, x0, x1 = box
    iy1, ix1 = min(y1, scale * h), min(x1, scale * w)  # the part inside the image …
    iy0, ix0 = min(y0, iy1 - 1), min(x0, ix1 - 1)  # … at least its last row/column
    a, b = max(0, iy0 // scale - halo), min(h, -(-iy1 // scale) + halo)
    c, d = max(0, ix0 // scale - halo), min(w, -(-ix1 // scale) + halo)
    up = upscale(lq[..., a:b, c:d])[..., iy0 - scale * a:iy1 - scale * a, ix0 - scale * c:ix1 - scale * c]
    if iy1 < y1 or ix1 < x1:
        up = F.pad(up, (0, x1 - ix1, 0, y1 - iy1), mode="replicate")
    return up[..., y0 - iy0:, x0 - ix0:]


def tiled_encode(encode: Callable[[torch.Tensor], torch.Tensor], window: Callable[[Box], torch.Tensor],
                 height: int, width: int, tile: int, overlap: int, factor: int) -> torch.Tensor:
    """Latent of a (height, width) image read window by window: each tile encoded alone, blended.

    ``encode``: (1, 3, th, tw) pixels → (1, C, th/factor, tw/factor) latent. Returns float32.
    """
    boxes = tile_boxes(height, width, tile, overlap)
    latent_boxes = [tuple(v // factor for v in b) for b in boxes]
    weights = _grid_weights(latent_boxes, height // factor, width // factor, overlap // factor)
    latent = None
    for box, (y0, y1, x0, x1) in zip(boxes, latent_boxes):
        z = encode(window(box)).float()
        if latent is None:
            latent = z.new_zeros((1, z.shape[1], height // factor, width // factor))
        latent[..., y0:y1, x0:x1] += z * weights((y0, y1, x0, x1)).to(z.device)
    return latent


def tiled_decode_into(out: torch.Tensor, decode: Callable[[torch.Tensor], torch.Tensor], latents: torch.Tensor,
                      tile: int, overlap: int, factor: int) -> torch.Tensor:
    """Decode ``latents`` tile by tile (latent ``tile``/``overlap``) and blend into ``out`` (H, W, 3).

    ``out`` must hold zeros and may be smaller than the decoded image (the padding is dropped);
    ``decode``: (1, C, th, tw) latent → (1, 3, factor·th, factor·tw) pixels.
    """
    lh, lw = latents.shape[-2:]
    boxes = tile_boxes(lh, lw, tile, overlap)
    pixel_boxes = [tuple(v * factor for v in b) for b in boxes]
    weights = _grid_weights(pixel_boxes, lh * factor, lw * factor, overlap * factor)
    height, width = out.shape[:2]
    for (ly0, ly1, lx0, lx1), box in zip(boxes, pixel_boxes):
        y0, _, x0, _ = box
        pixels = (decode(latents[..., ly0:ly1, lx0:lx1]).float().cpu() * weights(box))[0]
        out[y0:y0 + pixels.shape[1], x0:x0 + pixels.shape[2]] += pixels[:, :height - y0, :width - x0].permute(1, 2, 0)
    return out


__all__ = ["blend_weights", "check_tiles", "gaussian_weights", "pad_to_multiple", "size_multiple", "tile_boxes",
           "tile_starts", "tiled_decode_into", "tiled_encode", "upscaled_window", "vae_scale_factor"]
