"""`consissr upscale`: file handling around the model (alpha, gray, 16-bit, EXIF, bad files, no overwrite).

The model is ``BicubicTestDouble`` (real bicubic ×4 behind the pipeline's call protocol); the
real pipeline's own tests live in test_inference.py.
"""

import logging

import cv2
import numpy as np
import pytest
from bicubic_double import BicubicTestDouble
from PIL import Image

from consissr import cli
from consissr.inference.upscale import UpscaleOptions, collect_inputs, training_warning, upscale_files


def ramp(h, w, seed=0):
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = (x * 9 + y * 5) % 256
    return np.dstack([base, 255 - base, rng.integers(0, 256, (h, w))]).astype(np.uint8)


def test_alpha_is_upscaled_by_the_gan_and_reattached(tmp_path):
    rgb = ramp(10, 12)
    alpha = np.tile(np.linspace(0, 255, 12).round().astype(np.uint8), (10, 1))
    Image.fromarray(np.dstack([rgb, alpha]), "RGBA").save(tmp_path / "a.png")
    pipe = BicubicTestDouble()
    report = upscale_files(pipe, [tmp_path / "a.png"], tmp_path / "out")
    assert report.ok
    with Image.open(tmp_path / "out" / "a.png") as img:
        assert (img.mode, img.size) == ("RGBA", (48, 40))
        out = np.asarray(img)
    # the alpha ramp survives: transparent on the left, opaque on the right, rising in between
    assert out[:, :4, 3].max() <= 20 and out[:, -4:, 3].min() >= 235
    assert np.all(np.diff(out[20, 4:-4, 3].astype(int)) >= 0)
    # the colour under the transparent edge is the photo's, not composited on white
    assert abs(int(out[:, :2, 0].mean()) - int(rgb[:, 0, 0].mean())) < 25 and out[:, :2, 0].mean() < 200
    assert len(pipe.calls) == 1  # the colour through the pipeline once; the alpha through gan_upscale


def test_gray_stays_gray(tmp_path):
    Image.fromarray(ramp(9, 11)[..., 0]).save(tmp_path / "g.png")
    Image.fromarray(ramp(9, 11)[..., 0]).convert("LA").save(tmp_path / "ga.png")
    assert upscale_files(BicubicTestDouble(), [tmp_path / "g.png", tmp_path / "ga.png"], tmp_path / "out").ok
    with Image.open(tmp_path / "out" / "g.png") as img:
        assert (img.mode, img.size) == ("L", (44, 36))
    with Image.open(tmp_path / "out" / "ga.png") as img:
        assert (img.mode, img.size) == ("LA", (44, 36))


def test_16_bit_stays_16_bit_with_its_precision(tmp_path):
    flat = np.full((8, 10, 3), (12345, 40000, 777), np.uint16)  # none a multiple of 257 (8-bit levels)
    cv2.imwrite(str(tmp_path / "rgb16.png"), cv2.cvtColor(flat, cv2.COLOR_RGB2BGR))
    ramp16 = (np.arange(8 * 10).reshape(8, 10) * 811 + 3).astype(np.uint16)
    cv2.imwrite(str(tmp_path / "gray16.png"), ramp16)
    assert upscale_files(BicubicTestDouble(), [tmp_path], tmp_path / "out").ok
    rgb = cv2.cvtColor(cv2.imread(str(tmp_path / "out" / "rgb16.png"), cv2.IMREAD_UNCHANGED), cv2.COLOR_BGR2RGB)
    assert rgb.dtype == np.uint16 and rgb.shape == (32, 40, 3)
    assert np.abs(rgb.astype(int) - (12345, 40000, 777)).max() <= 1  # bicubic of a constant is the constant
    gray = cv2.imread(str(tmp_path / "out" / "gray16.png"), cv2.IMREAD_UNCHANGED)
    assert gray.dtype == np.uint16 and gray.shape == (32, 40)
    assert np.count_nonzero(gray % 257) > gray.size // 2  # values between the 8-bit levels
    assert abs(float(gray.mean()) - float(ramp16.mean())) < 300


def test_exif_orientation_is_applied(tmp_path):
    stored = np.zeros((8, 12, 3), np.uint8)  # 12 wide, 8 high as stored
    stored[:3, :3] = (255, 0, 0)  # red top-left as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90° clockwise: stored top-left shows top-right
    Image.fromarray(stored).save(tmp_path / "r.png", exif=exif)
    assert upscale_files(BicubicTestDouble(), [tmp_path / "r.png"], tmp_path / "out").ok
    with Image.open(tmp_path / "out" / "r.png") as img:
        out = np.asarray(img)
        assert img.size == (32, 48) and not img.getexif().get(0x0112)
    assert out[2, -3, 0] > 200 and out[2, -3, 1] < 50 and out[2, 2, 0] < 50


def test_a_bad_file_is_reported_and_skipped_and_the_exit_code_says_so(tmp_path, monkeypatch, capsys):
    src = tmp_path / "in"
    (src / "sub").mkdir(parents=True)
    Image.fromarray(ramp(6, 7)).save(src / "a.png")
    Image.fromarray(ramp(5, 9)).save(src / "sub" / "b.jpg")
    good = (src / "a.png").read_bytes()
    (src / "broken.png").write_bytes(good[: len(good) // 2])
    (src / "empty.jpg").write_bytes(b"")
    monkeypatch.setattr(cli, "_load_pipeline", lambda args: BicubicTestDouble())
    rc = cli.main(["upscale", str(src), "-o", str(tmp_path / "out"), "--steps", "2"])
    err = capsys.readouterr().err
    assert rc == 1
    assert "broken.png: corrupt or truncated image" in err and "empty.jpg: empty file" in err
    assert (tmp_path / "out" / "a.png").is_file() and (tmp_path / "out" / "sub" / "b.png").is_file()
    assert not (tmp_path / "out" / "broken.png").exists()
    assert sorted(p.name for p in (tmp_path / "out").rglob("*")) == ["a.png", "b.png", "sub"]  # no temp files


def test_an_existing_output_is_kept_unless_overwrite(tmp_path, monkeypatch, capsys):
    Image.fromarray(ramp(6, 7)).save(tmp_path / "a.png")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "a.png").write_bytes(b"the user's file")
    pipe = BicubicTestDouble()
    monkeypatch.setattr(cli, "_load_pipeline", lambda args: pipe)
    assert cli.main(["upscale", str(tmp_path / "a.png"), "-o", str(tmp_path / "out")]) == 1
    assert "exists (pass --overwrite" in capsys.readouterr().err
    assert (tmp_path / "out" / "a.png").read_bytes() == b"the user's file" and pipe.calls == []
    assert cli.main(["upscale", str(tmp_path / "a.png"), "-o", str(tmp_path / "out"), "--overwrite"]) == 0
    with Image.open(tmp_path / "out" / "a.png") as img:
        assert img.size == (28, 24)


def test_knobs_reach_the_pipeline(tmp_path, monkeypatch):
    Image.fromarray(ramp(6, 7)).save(tmp_path / "a.png")
    pipe = BicubicTestDouble()
    monkeypatch.setattr(cli, "_load_pipeline", lambda args: pipe)
    assert cli.main(["upscale", str(tmp_path / "a.png"), "-o", str(tmp_path / "out"), "--mode", "ganemb",
                     "--preset", "gen", "--steps", "4", "--t-max", "700", "--prompt", "a cat", "--guidance", "3",
                     "--negative-prompt", "blur", "--hpa-scale", "0.5", "--color-fix", "wavelet", "--seed", "9",
                     "--tile-size", "128"]) == 0
    assert pipe.calls == [{"num_inference_steps": 4, "mode": "ganemb", "preset": "gen", "t_max": 700,
                           "prompt": "a cat", "negative_prompt": "blur", "guidance_scale": 3.0, "hpa_scale": 0.5,
                           "color_fix": "wavelet", "seed": 9, "tile_size": 128}]
    assert UpscaleOptions().pipe_kwargs() == {}  # unset knobs leave the pipeline's defaults


def test_the_briefly_trained_warning_is_given_once(tmp_path, caplog):
    for i in range(3):
        Image.fromarray(ramp(5, 6, seed=i)).save(tmp_path / f"{i}.png")
    toy = BicubicTestDouble({"steps": 40, "prior_pretrained": False, "backbone": "embedded"})
    with caplog.at_level(logging.WARNING):
        upscale_files(toy, [tmp_path], tmp_path / "out")
    warnings = [r.getMessage() for r in caplog.records if "briefly trained" in r.getMessage()]
    assert len(warnings) == 1 and "SD 2.1" in warnings[0] and "40 training steps" in warnings[0]
    assert "--mode gan" in warnings[0]  # the real result this machine can give
    caplog.clear()
    with caplog.at_level(logging.WARNING):  # the GAN alone is no toy: no warning
        upscale_files(toy, [tmp_path], tmp_path / "out-gan", UpscaleOptions(mode="gan"))
    assert not [r for r in caplog.records if "briefly trained" in r.getMessage()]
    assert training_warning({"steps": 200_000, "prior_pretrained": True, "backbone": "sd2.1"}) is None
    assert training_warning({"steps": 200_000, "prior_pretrained": False}) is not None
    assert training_warning({}) is None


def test_outputs_that_would_share_a_name_are_told_apart(tmp_path):
    for name in ("c.png", "c.jpg"):
        Image.fromarray(ramp(5, 6)).save(tmp_path / name)
    outs = sorted(o.name for _, o in collect_inputs([tmp_path], tmp_path / "out"))
    assert outs == ["c_jpg.png", "c_png.png"]
    (tmp_path / "none").mkdir()
    with pytest.raises(FileNotFoundError, match="no image files"):
        upscale_files(BicubicTestDouble(), [tmp_path / "none"], tmp_path / "o2")
