"""The GAN (consissr/models/gan.py) and its stage train_gan (consissr/training/gan_stage.py)."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch

from consissr.compat import RealESRGANer
from consissr.models.gan import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    GanWeightsError,
    build_rrdbnet,
    gan_upscale,
    load_gan,
    save_gan,
)

TINY = {"scale": 4, "num_block": 1, "num_feat": 8, "num_grow_ch": 4}


def nearest_rrdbnet(**arch) -> torch.nn.Module:
    """An RRDBNet that is exactly 4x nearest-neighbour upsampling: the RRDB trunk is zeroed and every
    other conv passes channels 0..2 through its centre tap (the LeakyReLUs see only values ≥ 0)."""
    net = build_rrdbnet(**arch)
    with torch.no_grad():
        for p in net.parameters():
            p.zero_()
        for conv in (net.conv_first, net.conv_up1, net.conv_up2, net.conv_hr, net.conv_last):
            for c in range(3):
                conv.weight[c, c, 1, 1] = 1.0
    return net


@pytest.fixture()
def nearest_gan(tmp_path):
    gan_dir = tmp_path / "gan"
    save_gan(nearest_rrdbnet(**TINY), gan_dir, **TINY)
    return gan_dir


def test_saved_gan_is_what_realesrganer_loads(nearest_gan):
    config = json.loads((nearest_gan / CONFIG_NAME).read_text())
    assert {k: config[k] for k in TINY} == TINY
    assert config["weights"] == WEIGHTS_NAME
    assert config["sha256"] == hashlib.sha256((nearest_gan / WEIGHTS_NAME).read_bytes()).hexdigest()
    # realesrgan's own loader on the file (not through load_gan): 67x45 BGR uint8 -> 268x180
    upsampler = RealESRGANer(scale=4, model_path=str(nearest_gan / WEIGHTS_NAME), model=build_rrdbnet(**TINY),
                             tile=0, pre_pad=10, half=False, device=torch.device("cpu"))
    rng = np.random.default_rng(0)
    bgr = rng.integers(0, 256, size=(45, 67, 3), dtype=np.uint8)
    out, mode = upsampler.enhance(bgr)
    assert mode == "RGB" and out.shape == (180, 268, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, bgr.repeat(4, 0).repeat(4, 1))


@pytest.mark.parametrize("tile", [0, 32])
def test_gan_upscale_is_exact_rgb_float(nearest_gan, tile):
    upsampler = load_gan(nearest_gan, tile=tile)
    rng = np.random.default_rng(1)
    image = rng.random((45, 67, 3), dtype=np.float32)
    out = gan_upscale(upsampler, image)
    assert out.shape == (180, 268, 3) and out.dtype == np.float32
    # no 8-bit quantisation, no channel swap, no shift
    np.testing.assert_allclose(out, image.repeat(4, 0).repeat(4, 1), atol=1e-6)
    red = np.zeros((9, 7, 3), np.float32)
    red[..., 0] = 1.0
    out = gan_upscale(upsampler, red)  # smaller than pre_pad: the padding shrinks to fit
    assert out.shape == (36, 28, 3)
    assert out[..., 0].min() > 0.99 and out[..., 1:].max() < 0.01


def test_gan_upscale_agrees_with_enhance_on_a_random_net(tmp_path):
    torch.manual_seed(0)
    gan_dir = tmp_path / "gan"
    save_gan(build_rrdbnet(**TINY), gan_dir, **TINY)  # random weights: channels mix
    upsampler = load_gan(gan_dir)
    rng = np.random.default_rng(2)
    rgb8 = rng.integers(0, 256, size=(20, 24, 3), dtype=np.uint8)
    ours = gan_upscale(upsampler, rgb8.astype(np.float32) / 255.0)
    bgr_out, _ = upsampler.enhance(rgb8[..., ::-1].copy())
    theirs = bgr_out[..., ::-1].astype(np.float32) / 255.0
    assert np.abs(ours - theirs).max() <= 0.5 / 255 + 1e-6  # enhance rounds to 8 bit


def test_bad_weights_name_the_file(tmp_path, nearest_gan):
    pth = nearest_gan / WEIGHTS_NAME
    # wrong architecture
    other = tmp_path / "other"
    save_gan(build_rrdbnet(**{**TINY, "num_block": 2}), other, **{**TINY, "num_block": 2})
    (other / CONFIG_NAME).write_text(json.dumps({**json.loads((other / CONFIG_NAME).read_text()), "num_block": 1}))
    with pytest.raises(GanWeightsError, match=r"gan\.pth: does not fit RRDBNet\(.*unexpected"):
        load_gan(other)
    # changed after the stage recorded it
    data = bytearray(pth.read_bytes())
    data[-100] ^= 0xFF
    pth.write_bytes(bytes(data))
    with pytest.raises(GanWeightsError, match="sha256 differs"):
        load_gan(nearest_gan)
    # corrupt file (recorded hash removed so the reader itself is reached)
    config = json.loads((nearest_gan / CONFIG_NAME).read_text())
    config.pop("sha256")
    (nearest_gan / CONFIG_NAME).write_text(json.dumps(config))
    pth.write_bytes(b"not a checkpoint")
    with pytest.raises(GanWeightsError, match=f"{pth}: not a readable PyTorch weights file"):
        load_gan(nearest_gan)
    # a state dict under an unknown key
    torch.save({"state_dict": build_rrdbnet(**TINY).state_dict()}, pth)
    with pytest.raises(GanWeightsError, match="no 'params_ema' or 'params' key"):
        load_gan(nearest_gan)
    # no config at all
    with pytest.raises(GanWeightsError, match=f"{tmp_path / 'none' / CONFIG_NAME}: missing"):
        load_gan(tmp_path / "none")
