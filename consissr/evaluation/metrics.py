"""The paper's seven metrics through pyiqa, built once per stage, with availability reporting.

psnr/ssim: on the Y channel of YCbCr (BT.601) with a ``crop_border`` crop, as BasicSR's
``calculate_psnr``/``calculate_ssim(test_y_channel=True)`` and the authors' scripts. The others
(lpips, niqe, maniqa on PIPAL, musiq, clipiqa) need weight files: they are looked up in a folder
with torch.hub's layout (``pyiqa/``, ``checkpoints/``, ``clip/``; pyiqa's own cache is
``torch.hub.get_dir()``); a metric whose files are absent is reported unavailable with the paths it
needs and never scored. NIQE falls back to the parameters shipped in basicsr.
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable
from urllib.parse import urlparse

import numpy as np
import torch

from consissr.errors import ParamsError

log = logging.getLogger(__name__)

# higher is better, as results.yaml records it (the ↑/↓ of the paper's tables)
HIGHER_IS_BETTER = {"psnr": True, "ssim": True, "lpips": False, "niqe": False, "maniqa": True,
                    "musiq": True, "clipiqa": True, "piqe": False}  # piqe: no weights, any size ≥ 16²
FULL_REFERENCE = ("psnr", "ssim", "lpips")


def _basename(url: str) -> str:
    return os.path.basename(urlparse(url).path)


def weight_files(name: str) -> tuple[str, ...]:
    """Files (relative to a torch.hub folder) that pyiqa loads for metric ``name``; read from
    pyiqa's / torchvision's own URL tables so a new pin names its own files."""
    if name in ("psnr", "ssim", "piqe"):
        return ()
    if name == "lpips":
        from pyiqa.archs.lpips_arch import default_model_urls
        from torchvision.models import AlexNet_Weights

        return (f"pyiqa/{_basename(default_model_urls['0.1_alex'])}",
                f"checkpoints/{_basename(AlexNet_Weights.IMAGENET1K_V1.url)}")
    if name == "niqe":
        from pyiqa.archs.niqe_arch import default_model_urls

        return (f"pyiqa/{_basename(default_model_urls['url'])}",)
    if name == "maniqa":
        from pyiqa.archs.maniqa_arch import default_model_urls

        return (f"pyiqa/{_basename(default_model_urls['pipal'])}",)
    if name == "musiq":
        from pyiqa.archs.musiq_arch import default_model_urls

        return (f"pyiqa/{_basename(default_model_urls['koniq10k'])}",)
    if name == "clipiqa":
        from pyiqa.archs.clip_model import _MODELS

        return (f"clip/{_basename(_MODELS['RN50'])}",)
    raise ParamsError(f"evaluate.metrics: unknown metric {name!r}; known: {', '.join(HIGHER_IS_BETTER)}")


def _pyiqa_spec(name: str, crop_border: int) -> tuple[str, dict]:
    """pyiqa's metric name and options for one of ours."""
    y_channel = {"test_y_channel": True, "color_space": "ycbcr", "crop_border": crop_border}
    return {"psnr": ("psnr", y_channel), "ssim": ("ssim", y_channel), "lpips": ("lpips", {}),
            "niqe": ("niqe", {}), "maniqa": ("maniqa-pipal", {}), "musiq": ("musiq", {}),
            "clipiqa": ("clipiqa", {}), "piqe": ("piqe", {})}[name]


@dataclass
class MetricInfo:
    """What the stage records about a metric (the ``metrics`` block of metrics/<dataset>.json)."""

    name: str
    higher_is_better: bool
    full_reference: bool
    available: bool
    source: str = ""  # what computed it: "pyiqa <name> ..." or basicsr's NIQE
    needs: list[str] = field(default_factory=list)  # weight files absent (unavailable only)
    reason: str = ""

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v not in ("", [])}


def _to_tensor(img: np.ndarray) -> torch.Tensor:
    """HxWx3 uint8, or float in [0, 1] → (1, 3, H, W) float32 in [0, 1]."""
    arr = img.astype(np.float32) / 255.0 if img.dtype == np.uint8 else img.astype(np.float32)
    return torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1).unsqueeze(0).clamp_(0.0, 1.0)


def _y_channel_ssim(crop_border: int) -> Callable:
    """pyiqa's ``ssim`` on the unrounded BT.601 Y (float64, 0..255), as BasicSR: pyiqa's SSIM metric
    rounds Y to integers first, which reads 0.001–0.002 lower than BasicSR and the paper's tables."""
    from pyiqa.archs.ssim_arch import ssim
    from pyiqa.utils.color_util import rgb2ycbcr

    def score(sr: torch.Tensor, hq: torch.Tensor, img=None) -> float:
        if crop_border:
            sr, hq = (t[..., crop_border:-crop_border, crop_border:-crop_border] for t in (sr, hq))
        y_sr, y_hq = (rgb2ycbcr(t.double())[:, :1] * 255.0 for t in (sr, hq))
        return float(ssim(y_sr, y_hq, data_range=255.0).mean())
    return score


def _basicsr_niqe(img: np.ndarray) -> float:
    from consissr.compat import calculate_niqe

    arr = img.astype(np.float64) if img.dtype == np.uint8 else np.asarray(img, np.float64) * 255.0
    # basicsr's Y conversion reads BGR; niqe_pris_params.npz ships in the wheel; no border crop (as pyiqa)
    return float(calculate_niqe(arr[..., ::-1], crop_border=0, input_order="HWC", convert_to="y"))


class MetricSuite:
    """The requested metrics, each model loaded once.

    Args:
        names: metric names (``HIGHER_IS_BETTER`` keys).
        weights_dir: a torch.hub-layout folder; None: ``torch.hub.get_dir()`` (pyiqa's own cache).
        crop_border: border cropped before psnr/ssim.
        device: torch device for the metric networks.
    """

    def __init__(self, names, *, weights_dir: str | Path | None = None, crop_border: int = 4,
                 device: str | torch.device = "cpu") -> None:
        import pyiqa

        from consissr.compat import pyiqa_weights_dir

        self.device = torch.device(device)
        self.weights_dir = Path(weights_dir) if weights_dir else Path(torch.hub.get_dir())
        self.info: dict[str, MetricInfo] = {}
        self.failures: dict[str, str] = {}  # metric → the first per-image failure (that image has no value)
        self._fns: dict[str, Callable[[torch.Tensor, torch.Tensor | None], float]] = {}
        for name in names:
            needs = weight_files(name)
            info = MetricInfo(name, HIGHER_IS_BETTER[name], name in FULL_REFERENCE, available=False)
            missing = [str(self.weights_dir / rel) for rel in needs if not (self.weights_dir / rel).is_file()]
            pyiqa_name, options = _pyiqa_spec(name, crop_border)
            if missing and name == "niqe":
                info.available, info.source = True, "basicsr.metrics.calculate_niqe (niqe_pris_params.npz)"
                info.reason = f"pyiqa's parameters absent: {', '.join(missing)}"
                self._fns[name] = lambda sr, hq, img=None: _basicsr_niqe(img)
            elif missing:
                info.needs, info.reason = missing, "weights absent"
            elif name == "ssim":
                info.available = True
                info.source = f"pyiqa.archs.ssim_arch.ssim on the unrounded YCbCr Y, crop_border={crop_border}"
                self._fns[name] = _y_channel_ssim(crop_border)
            else:
                try:
                    with pyiqa_weights_dir(self.weights_dir):
                        metric = pyiqa.create_metric(pyiqa_name, device=self.device, **options)
                except Exception as exc:  # a corrupt or mismatched weight file: recorded, not fatal
                    info.reason = f"pyiqa could not build {pyiqa_name}: {type(exc).__name__}: {exc}"
                else:
                    info.available = True
                    info.source = f"pyiqa {pyiqa_name}" + "".join(f" {k}={v}" for k, v in options.items())
                    self._fns[name] = self._wrap(metric, info.full_reference)
            if not info.available:
                log.warning("metric %s unavailable: %s%s", name, info.reason,
                            f" (needs {', '.join(info.needs)})" if info.needs else "")
            self.info[name] = info

    def _wrap(self, metric, full_reference: bool):
        def score(sr: torch.Tensor, hq: torch.Tensor | None, img=None) -> float:
            out = metric(sr.to(self.device), hq.to(self.device)) if full_reference else metric(sr.to(self.device))
            return float(out.detach().float().mean().cpu())
        return score

    @property
    def available(self) -> list[str]:
        return [n for n, i in self.info.items() if i.available]

    @torch.no_grad()
    def score(self, sr: np.ndarray, hq: np.ndarray | None = None) -> dict[str, float]:
        """Every available metric of ``sr`` (HxWx3 uint8 or float in [0, 1]); full-reference ones
        only when ``hq`` (same size) is given."""
        if hq is not None and hq.shape != sr.shape:
            raise ValueError(f"output {sr.shape} and reference {hq.shape} differ in size")
        sr_t, hq_t = _to_tensor(sr), (None if hq is None else _to_tensor(hq))
        out = {}
        for name, fn in self._fns.items():
            if self.info[name].full_reference and hq_t is None:
                continue
            try:
                value = fn(sr_t, hq_t, img=sr)
            except (ValueError, RuntimeError, np.linalg.LinAlgError) as exc:  # e.g. NIQE below 2 blocks of 96²
                self.failures.setdefault(name, f"{sr.shape[1]}x{sr.shape[0]}: {type(exc).__name__}: {exc}")
                continue
            if np.isfinite(value):
                out[name] = value
            else:
                self.failures.setdefault(name, f"{sr.shape[1]}x{sr.shape[0]}: not finite ({value})")
        return out
