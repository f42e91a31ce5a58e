"""The GAN of GAN-Embedding mode (Algorithm 2, l. 1): basicsr's RRDBNet, run by realesrgan's RealESRGANer.

``data/models/gan/`` (stage ``train_gan``) holds ``gan_config.json`` ({"scale", "num_block",
"num_feat", "num_grow_ch", "weights", "sha256"}, and for pretrained weights "pretrained", "source",
"source_sha256") and, unless the config names a file elsewhere, ``gan.pth``: a plain RRDBNet state
dict under the key ``"params"``, the format ``RealESRGANer`` reads. ``gan.pretrained`` names
``realesrgan-x4plus-ncnn`` (the x4plus weights a pinned package ships, converted by ``ncnn_rrdb``
into ``gan.pth``) or a Real-ESRGAN ``.pth`` (named by absolute path, not copied). Weights are read
with ``torch.load(weights_only=True)``, matched key for key (strict) and checked against the
recorded sha256; every failure names the file.
"""

from __future__ import annotations

import collections
import hashlib
import io
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from consissr.compat import RealESRGANer, RRDBNet, cpu_native_bf16
from consissr.errors import InputError, ParamsError
from consissr.io import file_sha256, key_mismatch, load_weights_file, write_bytes, write_json

CONFIG_NAME = "gan_config.json"
WEIGHTS_NAME = "gan.pth"
WEIGHT_KEYS = ("params_ema", "params")  # RealESRGANer's order of preference
ARCH_KEYS = ("scale", "num_block", "num_feat", "num_grow_ch")
X4PLUS_ARCH = {"scale": 4, "num_block": 23, "num_feat": 64, "num_grow_ch": 32}  # RealESRGAN_x4plus.pth
X4PLUS_NCNN = "realesrgan-x4plus-ncnn"  # gan.pretrained: Real-ESRGAN x4plus as the pinned package ships it
# gan_config.json entries that say where the weights came from (kept when a pipeline saves its GAN)
PROVENANCE_KEYS = ("pretrained", "finetuned_from", "finetuned_from_sha256", "training")
GAN_PRECISIONS = ("auto", "fp32", "bf16")


class GanWeightsError(InputError):
    """A GAN folder, config or weights file that cannot be used (the message names the file)."""


def build_rrdbnet(*, scale: int, num_block: int, num_feat: int, num_grow_ch: int) -> RRDBNet:
    """basicsr's RRDBNet for RGB → RGB at ``scale`` (Real-ESRGAN's generator; x4plus: 23/64/32)."""
    return RRDBNet(num_in_ch=3, num_out_ch=3, scale=scale, num_block=num_block, num_feat=num_feat,
                   num_grow_ch=num_grow_ch)


@torch.no_grad()
def bilinear_init(model: RRDBNet) -> RRDBNet:
    """Make an RRDBNet start as two bilinear ×2 steps (scale 4), keeping its other weights random.

    Channels 0–2 carry the input straight through ``conv_first``, ``conv_hr`` and ``conv_last``
    (centre taps of 1; the LeakyReLUs see values ≥ 0); in ``conv_up1`` and ``conv_up2``, which
    follow a nearest ×2, they get the kernel [1, 2, 1]ᵀ[1, 2, 1]/16, which makes nearest ×2
    exactly bilinear ×2 (half-pixel centres) away from the zero-padded border. ``conv_body``
    starts at zero, so the RRDB trunk adds a learned residual from step one, as a
    zero-initialised residual branch does. At scales 2 and 1 (pixel-unshuffled input) channels
    0–2 read the top-left sample of each cell. A head start for minutes of CPU training, not
    Real-ESRNet's recipe (basicsr's random init).
    """
    cell = (4 // model.scale) ** 2  # pixel_unshuffle: input channel c·r² + i·r + j
    tent = torch.tensor([1.0, 2.0, 1.0])
    tent = torch.outer(tent, tent) / 16
    for conv in (model.conv_body, model.conv_last):
        conv.weight.zero_()
        conv.bias.zero_()
    for conv in (model.conv_first, model.conv_up1, model.conv_up2, model.conv_hr, model.conv_last):
        conv.weight[:3].zero_()
        conv.bias[:3].zero_()
        for c in range(3):
            if conv is model.conv_up1 or conv is model.conv_up2:
                conv.weight[c, c] = tent
            else:
                conv.weight[c, c * cell if conv is model.conv_first else c, 1, 1] = 1.0
    return model


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The RRDBNet state dict in a Real-ESRGAN ``.pth`` (key ``params_ema``, else ``params``)."""
    path = Path(path)
    if not path.is_file():
        raise GanWeightsError(f"{path}: GAN weights file not found")
    checkpoint = load_weights_file(path)
    if not isinstance(checkpoint, dict):
        raise GanWeightsError(f"{path}: expected a dict with key 'params_ema' or 'params', got {type(checkpoint).__name__}")
    for key in WEIGHT_KEYS:
        if key in checkpoint:
            state = checkpoint[key]
            if not isinstance(state, dict):
                raise GanWeightsError(f"{path}: {key!r} is not a state dict")
            return state
    raise GanWeightsError(f"{path}: no 'params_ema' or 'params' key (found {sorted(map(str, checkpoint))[:6]}); "
                          "RealESRGANer reads only those")


def check_weights(path: str | os.PathLike, **arch: int) -> RRDBNet:
    """Load ``path`` into ``build_rrdbnet(**arch)`` with a strict key and shape match; return the net."""
    path = Path(path)
    state = read_state_dict(path)
    model = build_rrdbnet(**arch)
    mismatch = key_mismatch(state, model.state_dict())
    if mismatch:
        desc = ", ".join(f"{k}={v}" for k, v in arch.items())
        raise GanWeightsError(f"{path}: does not fit RRDBNet({desc}): keys {mismatch}")
    model.load_state_dict(state, strict=True)
    return model


def save_gan(model: torch.nn.Module, out_dir: str | os.PathLike, *, scale: int, num_block: int, num_feat: int,
             num_grow_ch: int, provenance: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write ``gan.pth`` ({"params": state dict}) and ``gan_config.json`` (plus ``provenance``: where the
    weights came from) into ``out_dir``; return the config."""
    out_dir = Path(out_dir)
    weights = out_dir / WEIGHTS_NAME
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    buf = io.BytesIO()  # torch.save names the zip's folder after the file: a temp file's name would change the hash
    torch.save({"params": state}, buf)
    write_bytes(weights, buf.getvalue())
    config = {"scale": scale, "num_block": num_block, "num_feat": num_feat, "num_grow_ch": num_grow_ch,
              "weights": WEIGHTS_NAME, "sha256": file_sha256(weights), **(provenance or {})}
    write_json(out_dir / CONFIG_NAME, config)
    return config


def pretrained_net(pretrained: str, **arch: int) -> tuple[RRDBNet, dict[str, Any]]:
    """The RRDBNet (``arch``: scale, num_block, num_feat, num_grow_ch) that ``gan.pretrained`` names, checked,
    and its provenance ({"pretrained", "source", "source_sha256", ...}): ``realesrgan-x4plus-ncnn`` or a
    Real-ESRGAN ``.pth``."""
    if pretrained == X4PLUS_NCNN:
        from consissr.models import ncnn_rrdb

        if arch != X4PLUS_ARCH:
            raise ParamsError(f"gan: {X4PLUS_NCNN} is RRDBNet {X4PLUS_ARCH}; the params say {arch} "
                              "(set gan.num_block 23, num_feat 64, num_grow_ch 32, degrade.scale 4)")
        model, found = ncnn_rrdb.load_x4plus()
        return model, {"pretrained": True, "source": found["source"], "source_package": found["package"],
                       "source_sha256": found["bin_sha256"]}
    path = Path(pretrained).expanduser().resolve()
    model = check_weights(path, **arch)
    return model, {"pretrained": True, "source": str(path), "source_sha256": file_sha256(path)}


def record_pretrained(pretrained: str | os.PathLike, out_dir: str | os.PathLike, *, scale: int, num_block: int,
                      num_feat: int, num_grow_ch: int) -> dict[str, Any]:
    """Check the weights ``gan.pretrained`` names and record them in ``out_dir/gan_config.json``.

    A ``.pth`` (e.g. RealESRGAN_x4plus.pth) is named by absolute path and sha256, not copied (a
    ``gan.pth`` left by an earlier, trained run is removed); the package-shipped ncnn export is
    converted into ``gan.pth``.
    """
    arch = {"scale": scale, "num_block": num_block, "num_feat": num_feat, "num_grow_ch": num_grow_ch}
    model, provenance = pretrained_net(str(pretrained), **arch)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if str(pretrained) == X4PLUS_NCNN:
        return save_gan(model, out_dir, **arch, provenance=provenance)
    config = {**arch, "weights": provenance["source"], "sha256": provenance["source_sha256"], **provenance}
    write_json(out_dir / CONFIG_NAME, config)
    (out_dir / WEIGHTS_NAME).unlink(missing_ok=True)
    return config


def read_gan_config(gan_dir: str | os.PathLike) -> dict[str, Any]:
    """``gan_config.json`` of a GAN folder, validated."""
    path = Path(gan_dir) / CONFIG_NAME
    if not path.is_file():
        raise GanWeightsError(f"{path}: missing; run the train_gan stage (consissr train-gan) first")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise GanWeightsError(f"{path}: not valid JSON: {exc}") from None
    for key in (*ARCH_KEYS, "weights"):
        if not isinstance(config, dict) or key not in config:
            raise GanWeightsError(f"{path}: no {key!r} entry")
    for key in ARCH_KEYS:
        if isinstance(config[key], bool) or not isinstance(config[key], int) or config[key] < 1:
            raise GanWeightsError(f"{path}: {key!r} must be a positive integer, got {config[key]!r}")
    return config


def weights_path(gan_dir: str | os.PathLike) -> Path:
    """The weights file a GAN folder names (relative names are inside the folder)."""
    return Path(gan_dir) / read_gan_config(gan_dir)["weights"]  # an absolute name replaces the folder


def load_gan(gan_dir: str | os.PathLike, *, device: str | torch.device = "cpu", tile: int = 0, half: bool = False,
             tile_pad: int = 10, pre_pad: int = 10) -> RealESRGANer:
    """The GAN of a ``train_gan`` output folder as a ``realesrgan.RealESRGANer``.

    Args:
        gan_dir: a folder with ``gan_config.json`` (and ``gan.pth``, unless the config names a file).
        device: ``cpu`` | ``cuda`` | ``cuda:N`` | ``auto`` (CUDA when present).
        tile, tile_pad, pre_pad, half: RealESRGANer's own options (tile 0: whole image at once).
    """
    config = read_gan_config(gan_dir)
    path = weights_path(gan_dir)
    if not path.is_file():
        raise GanWeightsError(f"{path}: GAN weights named by {Path(gan_dir) / CONFIG_NAME} not found")
    if config.get("sha256") and file_sha256(path) != config["sha256"]:
        raise GanWeightsError(f"{path}: sha256 differs from the one recorded in {Path(gan_dir) / CONFIG_NAME}; "
                              "the file changed since the train_gan stage checked it (rerun the stage)")
    arch = {k: config[k] for k in ARCH_KEYS}
    model = check_weights(path, **arch)  # clear errors first; RealESRGANer then loads the same file
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    upsampler = RealESRGANer(scale=arch["scale"], model_path=str(path), model=model, tile=tile, tile_pad=tile_pad,
                             pre_pad=pre_pad, half=half, device=torch.device(device))
    if upsampler.device.type == "cpu":  # oneDNN's NHWC convolutions skip the layout reorders: 1.07–1.10× in
        upsampler.model.to(memory_format=torch.channels_last)  # fp32 and bf16 (benchmarks/README.md, GAN on the CPU)
    upsampler.provenance = {k: v for k, v in config.items() if k in PROVENANCE_KEYS or k.startswith("source")}
    return upsampler


def describe_source(config: dict[str, Any]) -> dict[str, str]:
    """Where a GAN folder's weights come from: {"source", "sha256"} of the pretrained file, or how it was trained."""
    if config.get("pretrained"):
        return {"source": str(config.get("source", config["weights"])),
                "sha256": str(config.get("source_sha256", config.get("sha256", "")))}
    steps = config.get("training", {}).get("steps", 0)
    if config.get("finetuned_from"):
        return {"source": f"fine-tuned {steps:,d} steps by train_gan from {config['finetuned_from']}",
                "sha256": str(config.get("sha256", ""))}
    return {"source": f"trained {steps:,d} steps from scratch by train_gan", "sha256": str(config.get("sha256", ""))}


def tile_for(image_shape: tuple[int, ...], scale: int, tile_size: int) -> int:
    """RealESRGANer's tile (input pixels) for an image whose output exceeds ``tile_size`` pixels, else 0."""
    return tile_size // scale if scale * max(image_shape[:2]) > tile_size else 0


def gan_precision(precision: str, device: str | torch.device) -> str:
    """``fp32`` or ``bf16``; ``auto`` is ``bf16`` on a CPU with native bf16 (AVX512-BF16 or AMX), else ``fp32``.

    On such a CPU, x4plus in bf16 runs about 2× as fast as in fp32, and its output stays above 50 dB
    PSNR from the fp32 one (benchmarks/README.md, "Real-ESRGAN on the CPU").
    """
    if precision not in GAN_PRECISIONS:
        raise ValueError(f"GAN precision must be one of {GAN_PRECISIONS}, got {precision!r}")
    if precision == "auto":
        return "bf16" if torch.device(device).type == "cpu" and cpu_native_bf16() else "fp32"
    return precision


def _fp32_trunk(model: torch.nn.Module) -> None:
    """Under autocast: RRDBNet's trunk and its 24 residual sums in fp32, the dense blocks in the autocast dtype.

    Two kinds of hook (once per model; no-ops outside autocast): ``conv_first`` returns fp32, so the trunk
    and the sums into it (each RRDB's ``out * 0.2 + x`` and ``feat + body_feat``) stay fp32 by type
    promotion; each RRDB's first dense block takes its input in the autocast dtype (bf16), so the blocks'
    concatenations and their own 69 residual sums run in bf16. On five scikit-image photos: 50.4–56.3 dB
    PSNR from the fp32 output, 0.2–0.5 dB under fp32 outputs for every convolution and 0.6–1.8 dB over bf16
    throughout, at the speed of bf16 throughout, 1.1× fp32 convolution outputs (benchmarks/bench_gan_precision.py;
    benchmarks/README.md, "Real-ESRGAN on the CPU").
    """
    if getattr(model, "_fp32_trunk", False):
        return

    def to_autocast_dtype(_module, args):
        x = args[0]
        return (x.to(torch.get_autocast_dtype(x.device.type)), *args[1:]) \
            if torch.is_autocast_enabled(x.device.type) else args

    model.conv_first.register_forward_hook(lambda _m, _args, out: out.float())
    for rrdb in model.body:
        rrdb.rdb1.register_forward_pre_hook(to_autocast_dtype)
    model._fp32_trunk = True


@torch.no_grad()
def gan_upscale(upsampler: RealESRGANer, image: np.ndarray, *, precision: str = "fp32") -> np.ndarray:
    """Upscale an RGB float image (H, W, 3) in [0, 1] → float32 (sH, sW, 3) in [0, 1].

    Runs RealESRGANer's own steps (pre-pad, whole-image or tiled forward, crop) on the float
    pixels. Its ``enhance`` would first quantise to 8/16 bit in BGR and guesses the bit depth from
    the maximum (a 16-bit image darker than 257/65535 would pass as 8-bit); the tensor steps
    below are ``enhance``'s own, minus that round trip. The network itself is RGB in and out.
    ``precision`` (``gan_precision``): ``bf16`` runs the network under bf16 autocast, its trunk in fp32
    (``_fp32_trunk``).
    """
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"gan_upscale: expected an RGB image of shape (H, W, 3), got {image.shape}")
    image = np.ascontiguousarray(image, dtype=np.float32)
    pre_pad = upsampler.pre_pad
    upsampler.pre_pad = min(pre_pad, image.shape[0] - 1, image.shape[1] - 1)  # reflect padding needs pad < size
    bf16 = gan_precision(precision, upsampler.device) == "bf16"
    if bf16:
        _fp32_trunk(upsampler.model)
    try:
        with torch.autocast(upsampler.device.type, dtype=torch.bfloat16, enabled=bf16):
            upsampler.pre_process(image)
            if upsampler.tile_size > 0:
                upsampler.tile_process()
            else:
                upsampler.process()
            output = upsampler.post_process()
    finally:
        upsampler.pre_pad = pre_pad
        for name in ("img", "output"):  # do not keep the last image's tensors alive on the device
            if hasattr(upsampler, name):
                delattr(upsampler, name)
    return output[0].float().clamp_(0.0, 1.0).permute(1, 2, 0).cpu().numpy()


class GanMemo:
    """``gan_upscale`` outputs by input pixels, tile and precision, least recently used dropped beyond ``max_bytes``.

    Every GAN-Embedding setting starts from the same Real-ESRGAN output (Algorithm 2, l. 1): with a
    memo, ``evaluate`` runs the GAN once per image for ``gan``, ``ganemb-rec``, ``ganemb-gen`` and
    the Fig. 10 sweep. Hits return a copy; the GAN is deterministic, so the outputs are unchanged.
    One memo serves one GAN (the key does not name the weights).
    """

    def __init__(self, max_bytes: int = 1 << 30) -> None:
        self.max_bytes, self.hits, self.misses, self._bytes = max_bytes, 0, 0, 0
        self._outputs: collections.OrderedDict[tuple, np.ndarray] = collections.OrderedDict()

    def __call__(self, upsampler: RealESRGANer, image: np.ndarray, *, precision: str = "fp32") -> np.ndarray:
        image = np.ascontiguousarray(image, dtype=np.float32)
        precision = gan_precision(precision, upsampler.device)
        key = (hashlib.sha256(image.tobytes()).hexdigest(), image.shape, upsampler.tile_size, upsampler.pre_pad,
               precision)
        if key in self._outputs:
            self.hits += 1
            self._outputs.move_to_end(key)
            return self._outputs[key].copy()
        self.misses += 1
        output = gan_upscale(upsampler, image, precision=precision)
        self._outputs[key] = output.copy()
        self._bytes += output.nbytes
        while self._bytes > self.max_bytes and len(self._outputs) > 1:
            self._bytes -= self._outputs.popitem(last=False)[1].nbytes
        return output


__all__ = [
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "X4PLUS_ARCH",
    "X4PLUS_NCNN",
    "GAN_PRECISIONS",
    "GanMemo",
    "GanWeightsError",
    "bilinear_init",
    "build_rrdbnet",
    "check_weights",
    "describe_source",
    "gan_precision",
    "gan_upscale",
    "load_gan",
    "pretrained_net",
    "read_gan_config",
    "read_state_dict",
    "record_pretrained",
    "save_gan",
    "tile_for",
    "weights_path",
]
