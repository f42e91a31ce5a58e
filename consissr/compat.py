"""The one place for third-party workarounds. Import basicsr / realesrgan only through here.

1. basicsr 1.4.2 and realesrgan 0.3.0 import ``torchvision.transforms.functional_tensor``,
   which current torchvision renamed to ``_functional_tensor``: alias it in ``sys.modules``
   before they are imported.
2. basicsr's ``DiffJPEG`` returns a channels-last-strided tensor, on which ``filter2D``'s
   ``.view`` fails for batch > 1: ``diff_jpeg`` returns a contiguous tensor.
3. ``realesrgan`` (for ``RealESRGANer``) is imported here too, after the alias of item 1.
4. pyiqa 0.1.16 resolves weight files into ``download_util.DEFAULT_CACHE_DIR``, fixed at import
   to ``torch.hub.get_dir()/pyiqa``, and torchvision backbones / its CLIP into
   ``torch.hub.get_dir()`` at call time: ``pyiqa_weights_dir`` points both at one folder while
   metrics are built (files checked beforehand, so nothing is downloaded).
5. pyiqa's MANIQA first builds timm's ``vit_base_patch8_224`` with ImageNet weights (a hub
   download), then overwrites every one of them with a strict load of the MANIQA checkpoint:
   ``pyiqa_weights_dir`` builds that ViT without the download.
6. basicsr's and realesrgan's degradations draw from Python's global ``random``, which a Dask
   worker's event-loop thread also draws from (comm retry jitter) while a task runs: under
   ``thread_private_random`` this thread's module-level ``random.*`` calls use its own seeded
   ``random.Random`` (same sequence as ``random.seed``), other threads the global one.
7. oneDNN (torch's CPU convolutions) caches one primitive per input shape, up to 1024 of them
   (a few MiB each); the degradation's random resizes give every image new shapes, so a process
   that degraded 250 images grew from 0.8 to 1.5 GiB. ``bound_onednn_primitive_cache`` caps the
   cache of the process that degrades (no slower: every image's shapes are new anyway).
8. bitsandbytes 0.50 (imported by diffusers on every model import) asks the ``kernels`` package for
   the hub kernel ``kernels-community/quantization-bitsandbytes`` on CPUs with AVX512-BF16; offline
   that logs two WARNINGs per process (kernels: the skipped trust check; bitsandbytes: the failed
   load), although nothing here is 4-bit quantized.
9. open_clip 3 logs on the root logger: six INFO lines of progress each time it builds a model, and
   "No pretrained weights loaded ... initialized randomly" (a WARNING) when it builds one without
   weights: here always on purpose, before the project loads its own (``RobustCLIP.from_pretrained``)
   or trains the tiny embedded towers from scratch.
10. pyiqa 0.1.16 gives its ``pyiqa`` logger a stderr handler of its own, at INFO, and logs a line for
    every network and metric it builds ("Network [NIQE] is created.").
    Importing this module drops the records of items 8 to 10, and only them
    (``quiet_third_party_noise``); ``consissr`` imports it before any command's code.
11. torch has no public query for native bf16 on the CPU (AVX512-BF16 or AMX, which oneDNN's bf16
    convolutions use; elsewhere bf16 is emulated and slower than fp32): ``cpu_native_bf16`` asks
    ``torch.cpu``'s private checks and answers False when a torch lacks them.
"""

from __future__ import annotations

import logging
import os
import random
import sys
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def _alias_functional_tensor() -> None:
    if "torchvision.transforms.functional_tensor" in sys.modules:
        return
    try:
        import torchvision.transforms._functional_tensor as _ft
    except ImportError:  # an old torchvision still has the public module
        return
    sys.modules["torchvision.transforms.functional_tensor"] = _ft


_alias_functional_tensor()


class _DropRecords(logging.Filter):
    """Drops a logger's records that are below ``level``, or whose message starts with one of ``starts``;
    given ``source``, only those logged from a file whose path contains it."""

    def __init__(self, starts: tuple[str, ...] = (), source: str | None = None, level: int = logging.NOTSET) -> None:
        super().__init__()
        self.starts, self.source, self.level = starts, source, level

    def filter(self, record: logging.LogRecord) -> bool:
        if self.source is not None and self.source not in record.pathname:
            return True
        return not (record.levelno < self.level or record.getMessage().startswith(self.starts))


# logger name: what it drops (items 8 to 10)
THIRD_PARTY_NOISE: dict[str, _DropRecords] = {
    "kernels._internals.hf_hub": _DropRecords(("Skipping publisher trust check for "
                                               "'kernels-community/quantization-bitsandbytes'",)),
    "bitsandbytes.backends.cpu.ops": _DropRecords(("Failed to load CPU gemm_4bit_forward from kernels-community",)),
    "root": _DropRecords(("No pretrained weights loaded for model ",), source=f"open_clip{os.sep}",
                         level=logging.WARNING),
    "pyiqa": _DropRecords(level=logging.WARNING),
}


def quiet_third_party_noise() -> None:
    """Attach the filters of items 8 to 10 (once) to their loggers, which need not exist yet."""
    for name, drop in THIRD_PARTY_NOISE.items():
        logger = logging.getLogger(None if name == "root" else name)
        if drop not in logger.filters:
            logger.addFilter(drop)


quiet_third_party_noise()

import basicsr  # noqa: E402,F401  (after the alias)
from basicsr.archs.rrdbnet_arch import RRDBNet  # noqa: E402
from basicsr.data.degradations import (  # noqa: E402
    circular_lowpass_kernel,
    random_add_gaussian_noise_pt,
    random_add_poisson_noise_pt,
    random_mixed_kernels,
)
from basicsr.metrics import calculate_niqe, calculate_psnr, calculate_ssim  # noqa: E402
from basicsr.metrics.niqe import __file__ as _niqe_file  # noqa: E402
from basicsr.utils import DiffJPEG, USMSharp  # noqa: E402
from basicsr.utils.img_process_util import filter2D  # noqa: E402
from realesrgan import RealESRGANer  # noqa: E402

# the MATLAB NIQE model's parameters, shipped in basicsr's wheel (pyiqa downloads its copy)
NIQE_PRIS_PARAMS = Path(_niqe_file).with_name("niqe_pris_params.npz")


class ContiguousDiffJPEG(DiffJPEG):
    """basicsr's DiffJPEG whose output is contiguous (workaround 2)."""

    def forward(self, x, quality):  # noqa: D102
        return super().forward(x, quality=quality).contiguous()


@contextmanager
def pyiqa_weights_dir(hub_dir: str | Path) -> Iterator[None]:
    """Build pyiqa metrics from the weights under ``hub_dir`` (torch.hub layout; workarounds 4, 5)."""
    import pyiqa.utils.download_util as download_util
    import timm
    import torch.hub

    saved = torch.hub._hub_dir, download_util.DEFAULT_CACHE_DIR, timm.create_model
    create_model = timm.create_model

    def no_vit_download(name, *args, **kwargs):
        if name == "vit_base_patch8_224":
            kwargs["pretrained"] = False
        return create_model(name, *args, **kwargs)

    torch.hub.set_dir(str(hub_dir))
    download_util.DEFAULT_CACHE_DIR = str(Path(hub_dir) / "pyiqa")
    timm.create_model = no_vit_download
    try:
        yield
    finally:
        torch.hub._hub_dir, download_util.DEFAULT_CACHE_DIR, timm.create_model = saved


_RANDOM_DRAWS = ("random", "uniform", "choice", "choices", "randint", "randrange", "sample", "shuffle", "gauss",
                 "normalvariate", "getrandbits", "randbytes", "triangular", "betavariate", "expovariate")


@contextmanager
def thread_private_random(seed: int) -> Iterator[None]:
    """Module-level ``random.*`` draws of the calling thread come from ``random.Random(seed)`` (item 6).

    Not re-entrant across threads: one seeded block at a time per process (Dask workers here run
    one thread each).
    """
    private, owner = random.Random(seed), threading.get_ident()
    saved = {name: getattr(random, name) for name in _RANDOM_DRAWS}

    def dispatch(name):
        mine, theirs = getattr(private, name), saved[name]
        return lambda *args, **kwargs: (mine if threading.get_ident() == owner else theirs)(*args, **kwargs)

    for name in _RANDOM_DRAWS:
        setattr(random, name, dispatch(name))
    try:
        yield
    finally:
        for name, original in saved.items():
            setattr(random, name, original)


ONEDNN_CACHE_CAPACITY = 16


def bound_onednn_primitive_cache() -> None:
    """Cap oneDNN's primitive cache at ``ONEDNN_CACHE_CAPACITY`` unless the user set it (item 7).

    oneDNN reads the variable once, at the process's first convolution: call this before it (a
    Dask worker's first task, the degrade stage's process); later calls change nothing.
    """
    os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", str(ONEDNN_CACHE_CAPACITY))


def cpu_native_bf16() -> bool:
    """Whether this CPU computes bf16 dot products natively (item 11)."""
    import torch

    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


__all__ = [
    "NIQE_PRIS_PARAMS",
    "ContiguousDiffJPEG",
    "DiffJPEG",
    "RRDBNet",
    "RealESRGANer",
    "USMSharp",
    "bound_onednn_primitive_cache",
    "calculate_niqe",
    "calculate_psnr",
    "calculate_ssim",
    "circular_lowpass_kernel",
    "cpu_native_bf16",
    "filter2D",
    "pyiqa_weights_dir",
    "quiet_third_party_noise",
    "random_add_gaussian_noise_pt",
    "random_add_poisson_noise_pt",
    "random_mixed_kernels",
    "thread_private_random",
]
