"""The reference degradation: realesrgan 0.3.0's own ``RealESRGANModel.feed_data``, run on CPU.

Used by tests/test_degradation.py (numerical equivalence) and benchmarks/bench_degradation.py
(throughput), so both compare against the very same call. ``feed_data`` is called unbound on a
minimal stand-in for the model: building a real ``RealESRGANModel`` would build networks,
losses and optimizers and move them to CUDA.
"""

from __future__ import annotations

import types
from typing import Any

import torch

from consissr import compat  # noqa: F401  (the torchvision alias must precede realesrgan)
from consissr.compat import DiffJPEG, USMSharp
from consissr.config import DegradeParams

# isort: split
from realesrgan.models.realesrgan_model import RealESRGANModel


def reference_opt(p: DegradeParams, gt_size: int) -> dict[str, Any]:
    """The model-section keys of Real-ESRGAN's train_realesrnet_x4plus.yml that feed_data reads."""
    f, s = p.first, p.second
    return {
        "scale": p.scale, "gt_size": gt_size, "high_order_degradation": True,
        "resize_prob": list(f.resize_prob), "resize_range": list(f.resize_range),
        "gaussian_noise_prob": f.gaussian_noise_prob, "noise_range": list(f.noise_range),
        "poisson_scale_range": list(f.poisson_scale_range), "gray_noise_prob": f.gray_noise_prob,
        "jpeg_range": list(f.jpeg_range),
        "second_blur_prob": s.blur_prob,
        "resize_prob2": list(s.resize_prob), "resize_range2": list(s.resize_range),
        "gaussian_noise_prob2": s.gaussian_noise_prob, "noise_range2": list(s.noise_range),
        "poisson_scale_range2": list(s.poisson_scale_range), "gray_noise_prob2": s.gray_noise_prob,
        "jpeg_range2": list(s.jpeg_range),
    }


def make_reference_model(p: DegradeParams, gt_size: int) -> types.SimpleNamespace:
    """The attributes ``feed_data`` touches. ``gt_size`` = the image size makes its
    ``paired_random_crop`` a no-op; ``_dequeue_and_enqueue`` (the training pair pool) is a no-op."""
    usm = USMSharp(radius=p.usm_radius)

    def usm_sharpener(img: torch.Tensor) -> torch.Tensor:
        return usm(img, weight=p.usm_weight, threshold=p.usm_threshold) if p.usm_sharpen else img

    return types.SimpleNamespace(
        opt=reference_opt(p, gt_size), device="cpu", is_train=True,
        usm_sharpener=usm_sharpener, jpeger=DiffJPEG(differentiable=False),
        _dequeue_and_enqueue=lambda: None)


def reference_degrade(hq: torch.Tensor, kernels: dict[str, torch.Tensor], p: DegradeParams,
                      model: types.SimpleNamespace | None = None) -> torch.Tensor:
    """``RealESRGANModel.feed_data`` on a (1, 3, H, H) batch; returns its ``lq``.

    The RNG draws are the caller's: seed ``random``, ``np.random`` and torch before calling,
    exactly as before ``consissr.data.degradation.degrade``. Note that feed_data also USM-sharpens
    the GT a second time after the pair pool (for its losses): part of the reference's cost.
    """
    if hq.size(0) != 1:  # basicsr's DiffJPEG output breaks filter2D for batch > 1 (compat.py, 2)
        raise ValueError("the reference path runs one image at a time")
    model = model or make_reference_model(p, gt_size=hq.size(-1))
    data = {"gt": hq, **{k: v.unsqueeze(0) if v.dim() == 2 else v for k, v in kernels.items()}}
    RealESRGANModel.feed_data(model, data)
    return model.lq


def reference_kernels(p: DegradeParams) -> dict[str, torch.Tensor]:
    """``RealESRGANDataset.__getitem__``'s kernels, from the caller's ``random``/``np.random`` state.

    Called unbound on a stand-in dataset whose "file" is a 400x400 PNG (its crop-or-pad size, so
    no crop draw) with flips and rotations off (no draws): the kernel draws come first.
    """
    import cv2
    import numpy as np
    from realesrgan.data.realesrgan_dataset import RealESRGANDataset

    if p.kernel_pad_size != 21 or tuple(p.kernel_range) != tuple(range(7, 22, 2)):
        raise ValueError("RealESRGANDataset hard-codes kernel sizes 7..21 padded to 21")
    png = cv2.imencode(".png", np.zeros((400, 400, 3), np.uint8))[1].tobytes()
    f, s = p.first, p.second
    pulse = torch.zeros(21, 21)
    pulse[10, 10] = 1
    dataset = types.SimpleNamespace(
        file_client=types.SimpleNamespace(get=lambda path, key: png), paths=["stand-in.png"],
        opt={"use_hflip": False, "use_rot": False, "sinc_prob": f.sinc_prob, "sinc_prob2": s.sinc_prob,
             "final_sinc_prob": p.final_sinc_prob},
        kernel_list=list(f.kernel_list), kernel_prob=list(f.kernel_prob), blur_sigma=list(f.blur_sigma),
        betag_range=list(f.betag_range), betap_range=list(f.betap_range), sinc_prob=f.sinc_prob,
        kernel_list2=list(s.kernel_list), kernel_prob2=list(s.kernel_prob), blur_sigma2=list(s.blur_sigma),
        betag_range2=list(s.betag_range), betap_range2=list(s.betap_range), sinc_prob2=s.sinc_prob,
        final_sinc_prob=p.final_sinc_prob, kernel_range=[2 * v + 1 for v in range(3, 11)], pulse_tensor=pulse)
    out = RealESRGANDataset.__getitem__(dataset, 0)
    return {k: out[k] for k in ("kernel1", "kernel2", "sinc_kernel")}
