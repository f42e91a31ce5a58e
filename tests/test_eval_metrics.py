"""Evaluation metrics: Y-channel PSNR/SSIM as BasicSR computes them, and the unavailable path."""

import json

import numpy as np
import pytest
from conftest import SHARED_DATA
from PIL import Image

from consissr.evaluation.metrics import HIGHER_IS_BETTER, MetricSuite, weight_files


def _photo_pairs():
    """Real photos (Set5 from ../shared/data, else scikit-image's) and a degraded copy of each."""
    folder = SHARED_DATA / "test" / "Set5"
    if folder.is_dir():
        images = [np.asarray(Image.open(p).convert("RGB")) for p in sorted(folder.glob("*.png"))[:3]]
    else:
        import skimage.data
        images = [skimage.data.astronaut(), skimage.data.chelsea(), skimage.data.coffee()]
    pairs = []
    rng = np.random.default_rng(0)
    for hq in images:
        hq = hq[:192, :192]  # NIQE needs at least 2 blocks of 96²
        blurred = np.asarray(Image.fromarray(hq).resize((48, 48), Image.BICUBIC).resize((192, 192), Image.BICUBIC))
        noisy = np.clip(blurred.astype(np.float64) + rng.normal(0, 3, blurred.shape), 0, 255).round().astype(np.uint8)
        pairs.append((noisy, hq))
    return pairs


def test_the_two_presets_agree_where_only_their_code_differs():
    """At the same border, BasicSR's PSNR (the authors' preset) and pyiqa's (the peers') are the same
    formula on the same Y; their SSIMs differ only by pyiqa's rounding of Y, which the unrounded pyiqa
    ssim function (``ssim_arch.ssim`` on float64 Y) removes: two implementations, checked against each other."""
    from pyiqa.archs.ssim_arch import ssim
    from pyiqa.utils.color_util import rgb2ycbcr

    from consissr.evaluation.metrics import _to_tensor, resolve_protocol

    authors = MetricSuite(["psnr", "ssim"], protocol="authors")
    peers = MetricSuite(["psnr", "ssim"], protocol=resolve_protocol("pyiqa", crop_border=4))
    for sr, hq in _photo_pairs():
        a, b = authors.score(sr, hq), peers.score(sr, hq)
        assert 15 < a["psnr"] < 40
        assert a["psnr"] == pytest.approx(b["psnr"], abs=2e-3)
        y = [rgb2ycbcr(_to_tensor(x).double())[:, :1, 4:-4, 4:-4] * 255.0 for x in (sr, hq)]
        assert a["ssim"] == pytest.approx(float(ssim(*y, data_range=255.0).mean()), abs=5e-5)


def test_border_crop_and_colour_space_matter():
    """The agreement above is not vacuous: no crop, or pyiqa's default YIQ luma, give other values."""
    from consissr.compat import calculate_psnr

    sr, hq = _photo_pairs()[0]
    sr = sr.copy()
    sr[:4] = 0  # damage only the border
    ref = calculate_psnr(sr[..., ::-1], hq[..., ::-1], crop_border=4, test_y_channel=True)
    assert MetricSuite(["psnr"], crop_border=4).score(sr, hq)["psnr"] == pytest.approx(ref, abs=2e-3)
    assert MetricSuite(["psnr"], crop_border=0).score(sr, hq)["psnr"] < ref - 3
    import pyiqa
    yiq = pyiqa.create_metric("psnr", test_y_channel=True, crop_border=4)
    from consissr.evaluation.metrics import _to_tensor
    assert abs(float(yiq(_to_tensor(sr), _to_tensor(hq))) - ref) > 0.2
    # pyiqa's own SSIM metric rounds Y first: further from basicsr than ours
    from consissr.compat import calculate_ssim
    ref_ssim = calculate_ssim(sr[..., ::-1], hq[..., ::-1], crop_border=4, test_y_channel=True)
    rounded = pyiqa.create_metric("ssim", test_y_channel=True, color_space="ycbcr", crop_border=4)
    assert abs(float(rounded(_to_tensor(sr), _to_tensor(hq))) - ref_ssim) > 1e-4


def test_empty_weights_dir_makes_metrics_unavailable_naming_the_file(tmp_path):
    names = list(HIGHER_IS_BETTER)
    suite = MetricSuite(names, weights_dir=tmp_path)
    sr, hq = _photo_pairs()[0]
    scores = suite.score(sr, hq)
    for name in ("lpips", "maniqa", "musiq", "clipiqa"):
        info = suite.info[name]
        assert not info.available and name not in scores
        assert info.needs == [str(tmp_path / rel) for rel in weight_files(name)]
        assert all(str(tmp_path) in need for need in info.needs)
        json.dumps(info.to_dict())
    assert weight_files("lpips")[0] == "pyiqa/LPIPS_v0.1_alex-df73285e.pth"
    assert weight_files("clipiqa") == ("clip/RN50.pt",)
    assert not any(tmp_path.iterdir()), "nothing may be downloaded into the weights folder"
    # always computed: psnr, ssim, PIQE (no weights), and pyiqa's NIQE on basicsr's shipped model parameters
    assert set(scores) == {"psnr", "ssim", "niqe", "piqe"}
    assert suite.info["niqe"].source.startswith("pyiqa niqe") and "niqe_pris_params.npz" in suite.info["niqe"].source
    assert "niqe_modelparameters.mat" in suite.info["niqe"].reason


def test_piqe_needs_no_weights_and_scores_small_crops(tmp_path):
    suite = MetricSuite(["piqe"], weights_dir=tmp_path)
    assert suite.info["piqe"].available and not suite.info["piqe"].higher_is_better
    _, hq = _photo_pairs()[0]
    crop = hq[:96, :96]  # below NIQE's 192² minimum: the reason the fidelity CPU budget uses PIQE
    assert 0 <= suite.score(crop)["piqe"] <= 100 and not any(tmp_path.iterdir())


@pytest.mark.parametrize("niqe", ["pyiqa", "basicsr"])
def test_both_niqe_implementations_prefer_the_sharp_photo(tmp_path, niqe):
    from consissr.evaluation.metrics import resolve_protocol

    suite = MetricSuite(["niqe"], protocol=resolve_protocol("authors", niqe=niqe), weights_dir=tmp_path)
    for degraded, hq in _photo_pairs()[:2]:
        assert suite.score(hq)["niqe"] < suite.score(degraded)["niqe"]


def test_protocol_presets_and_overrides():
    from consissr.errors import ParamsError
    from consissr.evaluation.metrics import resolve_protocol

    authors, peers = resolve_protocol("authors"), resolve_protocol("pyiqa")
    assert (authors.crop_border, authors.psnr_ssim, authors.niqe) == (4, "basicsr", "pyiqa")
    assert (peers.crop_border, peers.psnr_ssim, peers.niqe) == (0, "pyiqa", "pyiqa")
    mixed = resolve_protocol("pyiqa", crop_border=4, niqe="basicsr")
    assert (mixed.crop_border, mixed.psnr_ssim, mixed.niqe) == (4, "pyiqa", "basicsr")
    assert mixed.name == "pyiqa crop_border=4 niqe=basicsr"  # the report says what was changed
    with pytest.raises(ParamsError, match="unknown 'matlab'"):
        resolve_protocol("matlab")


def test_the_two_ssim_variants_differ_as_rounding_y_predicts():
    """The authors' preset is BasicSR's SSIM (unrounded Y); pyiqa's preset rounds Y first and reads lower
    on a smooth, slightly noisy image (rounding adds noise that is not in the reference)."""
    from consissr.compat import calculate_ssim

    sr, hq = _photo_pairs()[1]
    basic = MetricSuite(["ssim"], protocol="authors", crop_border=0).score(sr, hq)["ssim"]
    rounded = MetricSuite(["ssim"], protocol="pyiqa").score(sr, hq)["ssim"]
    assert basic == pytest.approx(calculate_ssim(sr[..., ::-1], hq[..., ::-1], crop_border=0, test_y_channel=True))
    assert 1e-4 < basic - rounded < 5e-3


def _osediff_log(path):
    import re

    rows = {}
    for line in path.read_text().splitlines():
        m = re.match(r"results_osediff/(\S+) \| PSNR: ([\d.]+); SSIM: ([\d.]+);.*NIQE: ([\d.]+)", line)
        if m:
            rows[m[1]] = dict(zip(("psnr", "ssim", "niqe"), map(float, m.groups()[1:])))
    return rows


def test_pyiqa_preset_reproduces_a_published_per_image_log():
    """OSEDiff's own log of its RealSR outputs (pyiqa psnr/ssim on Y, border 0; pyiqa niqe), image by image:
    PSNR within 0.001 dB, SSIM within 0.0005, NIQE within 0.01 — NIQE through pyiqa's code with the
    MATLAB model's parameters as basicsr ships them (pyiqa's own .mat cannot be downloaded here)."""
    from conftest import shared_data

    from consissr.data.sources import load_rgb

    root = shared_data("test", "RealSR10")
    log = _osediff_log(root / "osediff_metrics.log")
    assert len(log) == 10
    suite = MetricSuite(["psnr", "ssim", "niqe"], protocol="pyiqa", weights_dir=root / "no-weights-here")
    assert "niqe_pris_params.npz" in suite.info["niqe"].source and suite.info["niqe"].source.startswith("pyiqa")
    worst = {"psnr": 0.0, "ssim": 0.0, "niqe": 0.0}
    for name, ref in log.items():
        ours = suite.score(load_rgb(root / "osediff" / name)[0], load_rgb(root / "hr" / name)[0])
        for k in worst:
            worst[k] = max(worst[k], abs(ours[k] - ref[k]))
    assert worst["psnr"] < 1e-3 and worst["ssim"] < 5e-4 and worst["niqe"] < 1e-2, worst
    # basicsr's NIQE (another implementation of the same model) misses the log by more than that
    from consissr.evaluation.metrics import _basicsr_niqe
    name = "Canon_003_LR4.png"
    assert abs(_basicsr_niqe(load_rgb(root / "osediff" / name)[0]) - log[name]["niqe"]) > 0.01
