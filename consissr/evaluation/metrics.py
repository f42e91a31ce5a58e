"""The paper's seven metrics through pyiqa (and BasicSR), built once per stage, with availability reporting.

A ``Protocol`` fixes what the tables of different papers leave open: the PSNR/SSIM border crop,
whose PSNR/SSIM on the BT.601 Y channel (BasicSR's on the unrounded Y, or pyiqa's, whose SSIM rounds
Y first), and whose NIQE. The other metrics (lpips, maniqa on PIPAL, musiq, clipiqa) need weight
files: they are looked up in a folder with torch.hub's layout (``pyiqa/``, ``checkpoints/``,
``clip/``; pyiqa's own cache is ``torch.hub.get_dir()``); a metric whose files are absent is reported
unavailable with the paths it needs and never scored.
"""

from __future__ import annotations

import dataclasses
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


@dataclass(frozen=True)
class Protocol:
    """How PSNR, SSIM and NIQE are computed (``evaluate.protocol`` and its overrides)."""

    name: str
    crop_border: int  # pixels cut from each side before PSNR/SSIM
    psnr_ssim: str  # "basicsr" (calculate_psnr/ssim, unrounded Y) | "pyiqa" (its psnr/ssim; ssim rounds Y)
    niqe: str  # "pyiqa" | "basicsr"


PROTOCOLS = {
    # the authors' README: BasicSR's PSNR/SSIM on Y with border 4, pyiqa for the rest
    "authors": Protocol("authors", crop_border=4, psnr_ssim="basicsr", niqe="pyiqa"),
    # the peers' public evaluation scripts (e.g. OSEDiff's): pyiqa's metrics, Y channel, no border
    "pyiqa": Protocol("pyiqa", crop_border=0, psnr_ssim="pyiqa", niqe="pyiqa"),
}


def resolve_protocol(name: str = "authors", *, crop_border: int | None = None, psnr_ssim: str | None = None,
                     niqe: str | None = None) -> Protocol:
    """A named preset with any of its three parts overridden (``None`` keeps the preset's)."""
    if name not in PROTOCOLS:
        raise ParamsError(f"evaluate.protocol: unknown {name!r}; known: {', '.join(PROTOCOLS)}")
    base = PROTOCOLS[name]
    changed = {k: v for k, v in (("crop_border", crop_border), ("psnr_ssim", psnr_ssim), ("niqe", niqe))
               if v is not None and v != getattr(base, k)}
    return dataclasses.replace(base, name=name + "".join(f" {k}={v}" for k, v in changed.items()), **changed)


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


def _basicsr_fidelity(name: str, crop_border: int) -> Callable:
    """BasicSR's ``calculate_psnr``/``calculate_ssim`` on the unrounded BT.601 Y (what the paper's
    tables and the authors' scripts use); BasicSR's Y conversion reads BGR."""
    from consissr.compat import calculate_psnr, calculate_ssim

    fn = calculate_psnr if name == "psnr" else calculate_ssim

    def score(sr: torch.Tensor, hq: torch.Tensor, img=None, ref=None) -> float:
        a, b = (np.asarray(x, np.float64) * (1.0 if x.dtype == np.uint8 else 255.0) for x in (img, ref))
        return float(fn(a[..., ::-1], b[..., ::-1], crop_border=crop_border, input_order="HWC", test_y_channel=True))
    return score


NIQE_PARAMS_SOURCE = "the MATLAB NIQE model's mu/cov as basicsr ships them (niqe_pris_params.npz)"


def pyiqa_niqe_offline(device: torch.device):
    """pyiqa's own NIQE without its download: pyiqa reads the MATLAB model's ``mu_prisparam`` and
    ``cov_prisparam`` from ``niqe_modelparameters.mat``; basicsr's wheel ships the same numbers
    (tests/test_eval_metrics.py), handed over here as an in-memory .mat."""
    import io

    import pyiqa
    import scipy.io

    from consissr.compat import NIQE_PRIS_PARAMS

    params = np.load(NIQE_PRIS_PARAMS)
    mat = io.BytesIO()
    scipy.io.savemat(mat, {"mu_prisparam": params["mu_pris_param"], "cov_prisparam": params["cov_pris_param"]})
    mat.seek(0)
    return pyiqa.create_metric("niqe", device=device, pretrained_model_path=mat)


def _basicsr_niqe(img: np.ndarray) -> float:
    from consissr.compat import calculate_niqe

    arr = img.astype(np.float64) if img.dtype == np.uint8 else np.asarray(img, np.float64) * 255.0
    # basicsr's Y conversion reads BGR; niqe_pris_params.npz ships in the wheel; no border crop (as pyiqa)
    return float(calculate_niqe(arr[..., ::-1], crop_border=0, input_order="HWC", convert_to="y"))


class MetricSuite:
    """The requested metrics, each model loaded once.

    Args:
        names: metric names (``HIGHER_IS_BETTER`` keys).
        protocol: a ``Protocol`` or a ``PROTOCOLS`` name (PSNR/SSIM code and border, NIQE code).
        crop_border: with a protocol name, overrides its border.
        weights_dir: a torch.hub-layout folder; None: ``torch.hub.get_dir()`` (pyiqa's own cache).
        device: torch device for the metric networks.
    """

    def __init__(self, names, *, protocol: Protocol | str = "authors", crop_border: int | None = None,
                 weights_dir: str | Path | None = None, device: str | torch.device = "cpu") -> None:
        import pyiqa

        from consissr.compat import pyiqa_weights_dir

        if isinstance(protocol, Protocol):
            protocol = protocol if crop_border is None else dataclasses.replace(protocol, crop_border=crop_border)
        else:
            protocol = resolve_protocol(protocol, crop_border=crop_border)
        self.protocol = protocol
        self.device = torch.device(device)
        self.weights_dir = Path(weights_dir) if weights_dir else Path(torch.hub.get_dir())
        self.info: dict[str, MetricInfo] = {}
        self.failures: dict[str, str] = {}  # metric → the first per-image failure (that image has no value)
        self._fns: dict[str, Callable[..., float]] = {}
        border = protocol.crop_border
        for name in names:
            needs = weight_files(name)
            info = MetricInfo(name, HIGHER_IS_BETTER[name], name in FULL_REFERENCE, available=False)
            missing = [str(self.weights_dir / rel) for rel in needs if not (self.weights_dir / rel).is_file()]
            pyiqa_name, options = _pyiqa_spec(name, border)
            if name in ("psnr", "ssim") and protocol.psnr_ssim == "basicsr":
                info.available, info.source = True, f"basicsr calculate_{name} test_y_channel=True crop_border={border}"
                self._fns[name] = _basicsr_fidelity(name, border)
            elif name == "niqe" and protocol.niqe == "basicsr":
                info.available, info.source = True, "basicsr.metrics.calculate_niqe (niqe_pris_params.npz)"
                self._fns[name] = lambda sr, hq, img=None, ref=None: _basicsr_niqe(img)
            elif name == "niqe" and missing:
                info.available, info.source = True, f"pyiqa niqe with {NIQE_PARAMS_SOURCE}"
                info.reason = f"pyiqa's own copy absent: {', '.join(missing)}"
                self._fns[name] = self._wrap(pyiqa_niqe_offline(self.device), False)
            elif missing:
                info.needs, info.reason = missing, "weights absent"
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
        def score(sr: torch.Tensor, hq: torch.Tensor | None, img=None, ref=None) -> float:
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
                value = fn(sr_t, hq_t, img=sr, ref=hq)
            except (ValueError, RuntimeError, np.linalg.LinAlgError) as exc:  # e.g. NIQE below 2 blocks of 96²
                self.failures.setdefault(name, f"{sr.shape[1]}x{sr.shape[0]}: {type(exc).__name__}: {exc}")
                continue
            if np.isfinite(value):
                out[name] = value
            else:
                self.failures.setdefault(name, f"{sr.shape[1]}x{sr.shape[0]}: not finite ({value})")
        return out
