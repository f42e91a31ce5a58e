"""The one place for third-party workarounds. Import basicsr / realesrgan only through here.

1. basicsr 1.4.2 and realesrgan 0.3.0 import ``torchvision.transforms.functional_tensor``,
   which current torchvision renamed to ``_functional_tensor``: alias it in ``sys.modules``
   before they are imported.
2. basicsr's ``DiffJPEG`` returns a channels-last-strided tensor, on which ``filter2D``'s
   ``.view`` fails for batch > 1: ``diff_jpeg`` returns a contiguous tensor.
3. ``realesrgan`` (for ``RealESRGANer``) is imported here too, after the alias of item 1.
"""

from __future__ import annotations

import sys


def _alias_functional_tensor() -> None:
    if "torchvision.transforms.functional_tensor" in sys.modules:
        return
    try:
        import torchvision.transforms._functional_tensor as _ft
    except ImportError:  # an old torchvision still has the public module
        return
    sys.modules["torchvision.transforms.functional_tensor"] = _ft


_alias_functional_tensor()

import basicsr  # noqa: E402,F401  (after the alias)
from basicsr.archs.rrdbnet_arch import RRDBNet  # noqa: E402
from basicsr.data.degradations import (  # noqa: E402
    circular_lowpass_kernel,
    random_add_gaussian_noise_pt,
    random_add_poisson_noise_pt,
    random_mixed_kernels,
)
from basicsr.metrics import calculate_psnr  # noqa: E402
from basicsr.utils import DiffJPEG, USMSharp  # noqa: E402
from basicsr.utils.img_process_util import filter2D  # noqa: E402
from realesrgan import RealESRGANer  # noqa: E402


class ContiguousDiffJPEG(DiffJPEG):
    """basicsr's DiffJPEG whose output is contiguous (workaround 2)."""

    def forward(self, x, quality):  # noqa: D102
        return super().forward(x, quality=quality).contiguous()


__all__ = [
    "ContiguousDiffJPEG",
    "DiffJPEG",
    "RRDBNet",
    "RealESRGANer",
    "USMSharp",
    "calculate_psnr",
    "circular_lowpass_kernel",
    "filter2D",
    "random_add_gaussian_noise_pt",
    "random_add_poisson_noise_pt",
    "random_mixed_kernels",
]
